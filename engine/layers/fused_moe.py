"""FusedMoE: a layer's routed experts as two stacked weights, run by kernels.moe.fused_experts.

How the experts are split over the ranks:
- tensor parallel (default): every rank holds every expert, a slice of its intermediate dimension (gate/up
  rows, down columns); partial outputs are summed over the ranks like a row-parallel layer's.
- expert parallel (`expert_parallel` in the ParallelContext): every rank holds whole experts, as the
  ExpertPlacement says; it computes the pairs routed to them and the sum over the ranks combines them.

Checkpoints store one tensor per expert and projection (`experts.7.gate_proj.weight`); `checkpoint_names`
maps them onto the stacks, and another rank's experts are never read.

Shared experts (DeepSeek's always-on MLP of `num_shared` experts' width) can live in the same stacks, after
the routed experts: the router gives every token their slots with weight 1 and the grouped GEMMs run them with
the routed ones (at batch 1 that is one launch for the gate-up and one for the down projection instead of
four: two GEMMs, the SiLU and the add). Only without expert parallelism (every rank holds every expert); the
checkpoint's `shared_experts.*` tensors arrive as `shared.*` (the model renames them), the i-th expert's width
of intermediate features being shared expert E + i."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.distributed.all2all import moe_all_to_all
from engine.distributed.parallel import ParallelContext
from engine.layers.linear import block_fp8_params, copy_checked
from kernels.moe import fused_experts, select_experts, select_experts_grouped


@dataclass(frozen=True)
class Routing:
    """How a router's logits pick a token's experts and weights."""

    top_k: int
    renormalize: bool  # the chosen weights sum to 1 (Qwen3's norm_topk_prob)
    scoring: str = "softmax"  # softmax (Qwen; DeepSeek-V2 with groups), or sigmoid (DeepSeek-V3)
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    num_shared: int = 0  # always-on experts after the routed ones: every token's last slots, weight 1

    def select(self, logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
        if self.scoring == "softmax" and self.num_groups == 1 and self.routed_scaling == 1.0 and not self.num_shared:
            return select_experts(logits, self.top_k, self.renormalize)
        return select_experts_grouped(logits, correction_bias, self.top_k, self.num_groups, self.topk_groups,
                                      self.renormalize, self.routed_scaling, self.scoring, self.num_shared)


@dataclass(frozen=True)
class ExpertPlacement:
    """Which rank holds each expert. Even and contiguous by default; a load balancer may hand another
    layout (any assignment whose ranks hold equally many experts)."""

    owner: tuple[int, ...]  # expert id -> rank

    @classmethod
    def even(cls, num_experts: int, ranks: int) -> "ExpertPlacement":
        if num_experts % ranks:
            raise ValueError(f"num_experts ({num_experts}) is not divisible by the {ranks} expert-parallel ranks")
        per = num_experts // ranks
        return cls(tuple(e // per for e in range(num_experts)))

    def local_experts(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owner) if r == rank]

    def expert_map(self, rank: int, device: torch.device) -> torch.Tensor:
        """global expert id -> index among this rank's experts, -1 for the others' (int64)."""
        m = torch.full((len(self.owner),), -1, dtype=torch.int64, device="cpu")  # real even under meta
        for i, e in enumerate(self.local_experts(rank)):
            m[e] = i
        return m.to(device)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, routing: Routing, hidden_size: int, intermediate_size: int,
                 parallel: ParallelContext, device: torch.device, placement: ExpertPlacement | None = None):
        super().__init__()
        self.num_experts, self.routing, self.parallel = num_experts, routing, parallel
        self.top_k, self.num_shared = routing.top_k, routing.num_shared
        if parallel.ep_size > 1:
            assert not self.num_shared, "shared experts in the routed stacks need every expert on every rank"
            self.placement = placement or ExpertPlacement.even(num_experts, parallel.ep_size)
            self.local = self.placement.local_experts(parallel.ep_rank)
            self.inter_start, inter = 0, intermediate_size
            # plain attributes computed on `device` (the module is built on meta; these are not weights)
            self.expert_map = self.placement.expert_map(parallel.ep_rank, device)
            self.owner = torch.tensor(self.placement.owner, dtype=torch.int64, device="cpu").to(device)
        else:
            self.placement, self.local = None, list(range(num_experts + self.num_shared))
            self.inter_start, inter = parallel.shard(intermediate_size, "moe_intermediate_size")
            self.expert_map = None
        self.inter_local, self.intermediate_size, self.hidden_size = inter, intermediate_size, hidden_size
        self.fused_checkpoint = False  # the checkpoint stacks the experts (Qwen3-VL-MoE) instead of naming each
        self.w13_weight = nn.Parameter(torch.empty(len(self.local), 2 * inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(len(self.local), hidden_size, inter), requires_grad=False)
        # block-FP8 experts (DeepSeek-V3 checkpoints): row-expanded scales beside E4M3 weights (to_block_fp8)
        self.register_parameter("w13_weight_scale_inv", None)
        self.register_parameter("w2_weight_scale_inv", None)
        self.block_k = 0

    def block_fp8_fits(self, block: tuple[int, int]) -> bool:
        # a TP split of the intermediate features on a block edge, and so each shared expert's width
        return self.inter_start % block[1] == 0 and (self.num_shared < 2 or self.intermediate_size % block[1] == 0)

    def to_block_fp8(self, block: tuple[int, int]) -> None:
        """E4M3 expert weights and row-expanded block scales (before loading; see engine/layers/linear.py)."""
        dev = self.w13_weight.device
        self.w13_weight, self.w13_weight_scale_inv = block_fp8_params(tuple(self.w13_weight.shape), block[1], dev)
        self.w2_weight, self.w2_weight_scale_inv = block_fp8_params(tuple(self.w2_weight.shape), block[1], dev)
        self.block_k = block[1]

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 expert_map: torch.Tensor | None = None) -> torch.Tensor:
        return fused_experts(x, self.w13_weight, self.w2_weight, weights, ids, expert_map,
                             self.w13_weight_scale_inv, self.w2_weight_scale_inv, self.block_k)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor,
                correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        weights, ids = self.routing.select(router_logits, correction_bias)
        if self.parallel.dp_size > 1:  # tokens differ per DP group: they travel to their experts and back
            return moe_all_to_all(self.parallel, self.owner, x, weights, ids, self.expert_map, self._local)
        out = self._experts(x, weights, ids, self.expert_map)
        return self.parallel.all_reduce(out)  # TP: partial sums; EP: each rank's experts' share

    def _local(self, x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Received pairs, one expert each (ids already this rank's indices)."""
        return self._experts(x, weights, local_ids)

    # ---- checkpoint ----------------------------------------------------------------------------
    def checkpoint_names(self) -> dict[str, tuple[str, object]]:
        """Checkpoint names below this module's path -> (parameter, shard id) for the experts held here: one
        tensor per expert and projection, or (Qwen3-VL-MoE) all experts stacked in `gate_up_proj` / `down_proj`."""
        names = {"gate_up_proj": ("w13_weight", (None, "stacked_gate_up")),
                 "down_proj": ("w2_weight", (None, "stacked_down"))}
        suffixes = ("weight", "weight_scale_inv") if self.block_k else ("weight",)
        for i, e in enumerate(self.local):
            # the shared experts: one checkpoint tensor per projection for all of them
            key = (e, i) if e < self.num_experts else ("shared", "shared")
            for suffix in suffixes:
                names[f"{key[0]}.gate_proj.{suffix}"] = (f"w13_{suffix}", (key[1], "gate"))
                names[f"{key[0]}.up_proj.{suffix}"] = (f"w13_{suffix}", (key[1], "up"))
                names[f"{key[0]}.down_proj.{suffix}"] = (f"w2_{suffix}", (key[1], "down"))
        return names

    def ignored_checkpoint_names(self) -> list[str]:
        """Other ranks' experts: present in the checkpoint, never read here."""
        held = set(self.local)
        return [f"{e}.{p}.{suffix}" for e in range(self.num_experts) if e not in held
                for p in ("gate_proj", "up_proj", "down_proj") for suffix in ("weight", "weight_scale_inv")]

    def shard_ids(self, name: str) -> tuple:
        """The shards a complete load fills: the stacked tensor, or each expert's (whichever the checkpoint has)."""
        stacked = lambda shard: shard[0] is None
        return tuple(shard for pname, shard in self.checkpoint_names().values()
                     if pname == name and stacked(shard) == self.fused_checkpoint)

    def load_weight(self, name: str, tensor, shard_id) -> None:
        i, proj = shard_id
        if i is None:
            if self.block_k:
                from engine.errors import UnsupportedModelError
                raise UnsupportedModelError("FP8 experts stacked in one tensor are not supported", param="model")
            self.fused_checkpoint = True
            self._load_stacked(tensor, proj)
        elif i == "shared":  # the shared MLP: the j-th expert's width of its intermediate features is expert E + j
            for j in range(self.num_shared):
                self._load_expert(name, self.num_experts + j, tensor, proj, j * self.intermediate_size)
        else:
            self._load_expert(name, i, tensor, proj)

    def _load_expert(self, name: str, i: int, tensor, proj: str, offset: int = 0) -> None:
        """This rank's slice of an expert's projection, whose intermediate features start at `offset` of the
        checkpoint tensor's (a weight, or its row-expanded scales: RowScales answers narrow)."""
        n, start, param = self.inter_local, offset + self.inter_start, getattr(self, name).data[i]
        what = f"expert {self.local[i]} {proj} {name}"
        if proj == "down":
            copy_checked(param, tensor.narrow(1, start, n), what)
        else:
            copy_checked(param.narrow(0, 0 if proj == "gate" else n, n), tensor.narrow(0, start, n), what)

    def _load_stacked(self, tensor, proj: str) -> None:
        """All experts in one tensor: [E, 2I, H] and [E, H, I] as transformers 5 saves them, or [E, H, 2I] and
        [E, I, H] as Qwen3-VL-MoE's released checkpoints hold them; each rank copies its experts' slice."""
        from engine.errors import UnsupportedModelError
        E, H, I, n, lo = self.num_experts, self.hidden_size, self.intermediate_size, self.inter_local, self.inter_start
        rows = 2 * I if proj == "stacked_gate_up" else H  # the Linear layout's [out, in]
        cols = H if proj == "stacked_gate_up" else I
        shape = tuple(tensor.shape)
        if rows == cols or shape not in ((E, rows, cols), (E, cols, rows)):
            raise UnsupportedModelError(f"stacked experts {proj.removeprefix('stacked_')} of shape {list(shape)} fit "
                                        f"neither [{E}, {rows}, {cols}] nor [{E}, {cols}, {rows}] unambiguously",
                                        param="model")
        transposed = shape == (E, cols, rows)
        for i, e in enumerate(self.local[:len(self.local) - self.num_shared]):
            w = tensor.narrow(0, e, 1)[0]
            w = w.t() if transposed else w  # [out, in]
            if proj == "stacked_down":
                copy_checked(self.w2_weight.data[i], w[:, lo:lo + n], f"expert {e} down")
            else:
                copy_checked(self.w13_weight.data[i, :n], w[lo:lo + n], f"expert {e} gate")
                copy_checked(self.w13_weight.data[i, n:], w[I + lo:I + lo + n], f"expert {e} up")
