"""Parallel linear layers (Megatron-style). Each holds this rank's shard of its weight and loads it itself:
`load_weight(name, tensor, shard_id)` reads only the rows (column-parallel) or columns (row-parallel) that
the rank keeps from a lazily read checkpoint tensor (engine/models/weights.py). A layer that fuses several
checkpoint projections into one GEMM (QKV, gate/up) names them in `checkpoint_shards`, so the loader maps
checkpoint names to shards without help from the model class.

The GEMM itself is kernels.linear (small decode batches on a GPU take the skinny split-K kernel).

Block-FP8 checkpoints (DeepSeek-V3, Kimi-K2): `to_block_fp8` turns a layer's weight into E4M3 with a
`weight_scale_inv` beside it, [out_local, ceil(in_local / 128)], each row its block's scale. Expanded along
the rows, the scales shard with the same row arithmetic as the weight (any split, any fused projection);
only a split of the input features has to fall on block edges. The checkpoint's block scales reach
`load_weight` as a `RowScales` view that answers the weight's `narrow` calls in scale coordinates."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed.parallel import ParallelContext
from kernels.linear import block_fp8_linear, linear

SINGLE = ParallelContext()


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def block_fp8_params(shape: tuple[int, ...], block_k: int, device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
    """An E4M3 weight [..., out, in] and its row-expanded block scales [..., out, ceil(in / block_k)] (float32)."""
    param = lambda *s, dtype: nn.Parameter(torch.empty(*s, dtype=dtype, device=device), requires_grad=False)
    return (param(*shape, dtype=torch.float8_e4m3fn),
            param(*shape[:-1], -(-shape[-1] // block_k), dtype=torch.float32))


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W [out_local, in_local] this rank's shard."""

    # checkpoint projection (a sibling module's name) -> shard id, for layers that fuse several
    checkpoint_shards: dict[str, object] = {}

    # False where the model needs the weight itself in its dtype (MLA folds kv_b_proj into q and the output)
    block_fp8_capable = True
    input_start = 0  # where this rank's input features start (row-parallel layers split them)

    def __init__(self, in_local: int, out_local: int, bias: bool, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.weight = _param(out_local, in_local)
        self.bias = _param(out_local) if bias else None
        self.register_parameter("weight_scale_inv", None)
        self.block_k = 0

    def gemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale_inv is not None:
            return block_fp8_linear(x, self.weight, self.weight_scale_inv, self.block_k, bias)
        return linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.bias)

    def block_fp8_fits(self, block: tuple[int, int]) -> bool:
        return self.block_fp8_capable and self.input_start % block[1] == 0

    def to_block_fp8(self, block: tuple[int, int]) -> None:
        """E4M3 weight and row-expanded block scales, in place of the model-dtype weight (before loading)."""
        self.weight, self.weight_scale_inv = block_fp8_params(tuple(self.weight.shape), block[1], self.weight.device)
        self.block_k = block[1]

    def shard_ids(self, name: str) -> tuple:
        """The shards that fill parameter `name` (the loader checks that every one arrived)."""
        return tuple(self.checkpoint_shards.values()) or (None,)

    def load_weight(self, name: str, tensor, shard_id=None) -> None:
        copy_checked(getattr(self, name).data, tensor.full(), name)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: ParallelContext = SINGLE):
        super().__init__(in_features, out_features, bias, parallel)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays sharded (no collective)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: ParallelContext = SINGLE):
        self.out_start, out_local = parallel.shard(out_features, "output features")
        super().__init__(in_features, out_local, bias, parallel)

    def load_weight(self, name: str, tensor, shard_id=None) -> None:
        param = getattr(self, name).data
        copy_checked(param, tensor.narrow(0, self.out_start, param.shape[0]), name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections of one input in one GEMM (gate and up; MLA's query and latent projections): each rank
    keeps its share of every projection, side by side, or the whole of a `replicated` one. `unbiased` sources have
    no bias in the checkpoint (their rows of the fused bias stay zero)."""

    def __init__(self, in_features: int, output_sizes: list[int], sources: tuple[str, ...], bias: bool = False,
                 parallel: ParallelContext = SINGLE, replicated: tuple[bool, ...] = (),
                 unbiased: tuple[str, ...] = ()):
        self.output_sizes = output_sizes
        self.checkpoint_shards = {name: i for i, name in enumerate(sources)}
        self.replicated = replicated or (False,) * len(sources)
        self.unbiased = unbiased
        self.local_sizes = [n if self.replicated[i] else parallel.shard(n, f"projection {sources[i]}")[1]
                            for i, n in enumerate(output_sizes)]
        LinearBase.__init__(self, in_features, sum(self.local_sizes), bias, parallel)

    def shard_ids(self, name: str) -> tuple:
        if name == "bias":
            return tuple(i for source, i in self.checkpoint_shards.items() if source not in self.unbiased)
        return super().shard_ids(name)

    def rows(self, shard_id: int) -> tuple[int, int]:
        return sum(self.local_sizes[:shard_id]), self.local_sizes[shard_id]

    def load_weight(self, name: str, tensor, shard_id=None) -> None:
        param = getattr(self, name).data
        if name == "bias":  # the model is built on the meta device: unbiased rows are zeroed as the bias loads
            for source in self.unbiased:
                param.narrow(0, *self.rows(self.checkpoint_shards[source])).zero_()
        offset, size = self.rows(shard_id)
        dst = param.narrow(0, offset, size)
        start = 0 if self.replicated[shard_id] else self.parallel.tp_rank * size
        copy_checked(dst, tensor.narrow(0, start, size), f"{name} shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one GEMM. Query heads are split across ranks; KV heads are split too, or replicated when
    there are fewer KV heads than ranks (each rank keeps the one its query heads attend to)."""

    checkpoint_shards = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 parallel: ParallelContext = SINGLE):
        tp = parallel.tp_size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by tensor_parallel_size {tp}")
        if (num_kv_heads % tp) if num_kv_heads >= tp else (tp % num_kv_heads):
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) and tensor_parallel_size {tp}: one must divide "
                             "the other")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        # the first KV head this rank keeps (replicated KV: ranks tp / num_kv_heads apart share one)
        self.kv_head_start = (parallel.tp_rank * self.num_kv_heads if num_kv_heads >= tp
                              else parallel.tp_rank // (tp // num_kv_heads))
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias, parallel)

    def load_weight(self, name: str, tensor, shard_id=None) -> None:
        param = getattr(self, name).data
        if shard_id == "q":
            dst, src_start = param.narrow(0, 0, self.q_size), self.parallel.tp_rank * self.q_size
        else:
            dst = param.narrow(0, self.q_size + (0 if shard_id == "k" else self.kv_size), self.kv_size)
            src_start = self.kv_head_start * self.head_dim
        copy_checked(dst, tensor.narrow(0, src_start, dst.shape[0]), f"{name} shard {shard_id}")


class RowParallelLinear(LinearBase):
    """Input features split across ranks (the input is the sharded output of a column-parallel layer); the
    partial products are summed over the ranks, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: ParallelContext = SINGLE):
        self.in_start, in_local = parallel.shard(in_features, "input features")
        super().__init__(in_local, out_features, bias, parallel)
        self.input_start = self.in_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return self.gemm(x, self.bias)
        y = self.parallel.all_reduce(self.gemm(x, None))
        return y if self.bias is None else y.add_(self.bias)

    def load_weight(self, name: str, tensor, shard_id=None) -> None:
        param = getattr(self, name).data
        if name == "bias":
            return copy_checked(param, tensor.full(), name)
        # the weight's column count: a scale tensor (RowScales) answers in its own coordinates
        copy_checked(param, tensor.narrow(1, self.in_start, self.weight.shape[1]), name)
