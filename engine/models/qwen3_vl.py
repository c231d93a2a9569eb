"""Qwen3-VL: a vision transformer (patch embedding, interpolated learned positions plus 2-D rotary, blocks, a
2x2 patch merger, and "deepstack" mergers that tap early blocks) feeding the Qwen3 decoder, whose rope is
multimodal (time, height and width positions interleaved over the rotary frequencies). The vision tower is
replicated on every tensor-parallel rank; the decoder is Qwen3's, sharded as usual. Module names follow the
checkpoint (`model.visual.*`, `model.language_model.*`, `lm_head`). Qwen3-VL-MoE (below) swaps in Qwen3-MoE's
feed-forward blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel import ParallelContext
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.config import ModelConfig
from engine.models.llama import LlamaDecoderLayer, LlamaModel
from engine.models.qwen3 import Qwen3ForCausalLM
from engine.models.qwen3_moe import Qwen3MoeForCausalLM
from engine.multimodal.step import MultiModalStep
from kernels.attention import AttentionBackend, AttentionMetadata


# ---- the vision tower -------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionPatchEmbed(nn.Module):
    def __init__(self, v):
        super().__init__()
        k = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_channels, v.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # a stride-equals-kernel Conv3d over one patch is a matmul with the flattened kernel
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.num_heads = v.num_heads
        self.head_dim = v.hidden_size // v.num_heads
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=True)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(v.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(v.dtype)
        # full (bidirectional) attention within each image; [1, heads, tokens, dim]: SDPA's fused kernels take
        # 4-D inputs only (3-D ones fall back to the unfused path, which materialises the score matrix)
        out = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qi, ki, vi)))[0].transpose(0, 1)
               for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return self.proj(torch.cat(out).reshape(T, -1))


class VisionMLP(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.linear_fc1 = nn.Linear(v.hidden_size, v.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(v.intermediate_size, v.hidden_size, bias=True)
        self.approximate = "tanh" if v.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.norm1 = nn.LayerNorm(v.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(v.hidden_size, eps=1e-6)
        self.attn = VisionAttention(v)
        self.mlp = VisionMLP(v)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """2x2 neighbouring patches (adjacent rows after patchifying) -> one token of the decoder's width."""

    def __init__(self, v, postshuffle_norm: bool):
        super().__init__()
        self.merged = v.hidden_size * v.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else v.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, v.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.merged)) if self.postshuffle_norm else self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VLVisionModel(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.merge = v.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(v)
        self.pos_embed = nn.Embedding(v.num_position_embeddings, v.hidden_size)
        self.side = int(v.num_position_embeddings ** 0.5)
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.depth))
        self.merger = VisionPatchMerger(v, postshuffle_norm=False)
        self.deepstack_visual_indexes = list(v.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(VisionPatchMerger(v, postshuffle_norm=True)
                                                   for _ in self.deepstack_visual_indexes)
        head_dim = v.hidden_size // v.num_heads
        theta = float((getattr(v, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.rope_dim = head_dim // 2  # half the head rotates with the row, half with the column
        self.theta = theta

    def _block_order(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """A [h, w, ...] grid in the order patches arrive: each merge window's patches adjacent."""
        m = self.merge
        return t.reshape(h // m, m, w // m, m, *t.shape[2:]).transpose(1, 2).reshape(h * w, *t.shape[2:])

    def _positions(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch: the learned position embedding, bilinearly resampled (align_corners) from its square
        table to the image's grid; and the rotary cos/sin of its (row, column)."""
        n = self.side
        table = self.pos_embed.weight
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rope_dim, 2, dtype=torch.float32, device=device)
                                         / self.rope_dim))
        pos, angles = [], []
        for t, h, w in grids:
            ys = torch.linspace(0, n - 1, h, device=device)
            xs = torch.linspace(0, n - 1, w, device=device)
            y0, x0 = ys.long(), xs.long()
            y1, x1 = (y0 + 1).clamp(max=n - 1), (x0 + 1).clamp(max=n - 1)
            dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
            emb = ((1 - dy) * (1 - dx) * table[y0[:, None] * n + x0[None, :]].float()
                   + (1 - dy) * dx * table[y0[:, None] * n + x1[None, :]].float()
                   + dy * (1 - dx) * table[y1[:, None] * n + x0[None, :]].float()
                   + dy * dx * table[y1[:, None] * n + x1[None, :]].float())
            pos.append(self._block_order(emb, h, w).repeat(t, 1))
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            rc = self._block_order(torch.stack([rows, cols], -1), h, w).float()  # [h*w, 2]
            angles.append((rc[:, :, None] * inv_freq).reshape(h * w, -1).repeat(t, 1))
        freqs = torch.cat(angles)
        freqs = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [N, 1, head_dim]
        return torch.cat(pos), freqs

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """patches [N, 3 * T * P * P] of the images back to back -> (embeddings [N / merge**2, out_hidden],
        the deepstack features, each like the embeddings)."""
        x = self.patch_embed(patches)
        pos, freqs = self._positions(grids, x.device)
        x = x + pos.to(x.dtype)
        cos, sin = freqs.cos(), freqs.sin()
        lengths = [t * h * w for t, h, w in grids]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


# ---- the decoder ------------------------------------------------------------------------------------------
class Qwen3VLModel(nn.Module):
    def __init__(self, visual: nn.Module, language_model: LlamaModel):
        super().__init__()
        self.visual = visual
        self.language_model = language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers


class Qwen3VLForConditionalGeneration(Qwen3ForCausalLM):
    """`forward(input_ids, positions, meta, mm)`: `mm` (MultiModalStep) splices image embeddings into the
    step; `encode_images` runs the vision tower."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, backend: AttentionBackend, max_positions: int,
                 device: torch.device):
        nn.Module.__init__(self)
        rotary = self.make_rotary(cfg, max_positions, device)
        self.rotary = rotary
        layers = [LlamaDecoderLayer(cfg, self.make_attention(cfg, parallel, backend, rotary),
                                    self.make_mlp(cfg, parallel, i, device)) for i in range(cfg.num_hidden_layers)]
        self.model = Qwen3VLModel(Qwen3VLVisionModel(cfg.vision), LlamaModel(cfg, parallel, layers))
        self.lm_head = (self.model.language_model.embed_tokens if cfg.tie_word_embeddings
                        else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel))
        self.spatial_merge_size = cfg.vision.spatial_merge_size
        self.num_deepstack = len(cfg.vision.deepstack_visual_indexes)
        # which rope axis (0 time, 1 height, 2 width) each rotary frequency follows: interleaved T H W T H W ...,
        # height and width each over the first 3 * section of the frequencies
        section = (cfg.hf.rope_parameters or {}).get("mrope_section", [24, 20, 20])
        with torch.device("cpu"):  # the model is built on the meta device; this index is real
            axis = torch.zeros(cfg.head_dim // 2, dtype=torch.int64)
            for a in (1, 2):
                axis[a:section[a] * 3:3] = a
            self.mrope_axis = torch.cat([axis, axis]).to(device)  # the table holds cos then sin

    def mrope_table(self, positions3: torch.Tensor) -> torch.Tensor:
        """Per-token rotary table [T, head_dim] for (time, height, width) positions [3, T]."""
        rows = self.rotary.cos_sin_cache[positions3]  # [3, T, head_dim]
        return rows.gather(0, self.mrope_axis.expand(1, rows.shape[1], -1))[0]

    def encode_images(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]):
        return self.model.visual(patches, grids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm: MultiModalStep | None = None) -> torch.Tensor:
        lm = self.model.language_model
        hidden, residual = lm.embed_tokens(input_ids), None
        cos_sin = None
        if mm is not None and len(mm.rows):
            hidden = hidden.index_copy(0, mm.rows, mm.embeds.to(hidden.dtype))
        if mm is not None:
            if mm.mrope_positions is not None:
                cos_sin = self.mrope_table(mm.mrope_positions)
                positions = torch.arange(len(input_ids), device=input_ids.device)
        for i, layer in enumerate(lm.layers):
            hidden, residual = layer(positions, hidden, residual, meta, cos_sin)
            if mm is not None and i < len(mm.deepstack):
                hidden = hidden.index_add(0, mm.rows, mm.deepstack[i].to(hidden.dtype))
        hidden, _ = lm.norm(hidden, residual)
        return hidden


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL-MoE: the same vision tower and multimodal rope over Qwen3-MoE's decoder layers."""

    make_mlp = Qwen3MoeForCausalLM.make_mlp
