"""Programmatic dependent launch (kernels/triton/pdl.py): each kernel of a step starts while the previous one
runs and must wait before it reads what that one wrote or writes anything itself. A batch-1 layer chain of the
PDL kernels (norms, skinny GEMMs with their shared split-K workspace, router, fused MoE, combine, the GQA and
latent decode kernels) in one CUDA graph, replayed on new inputs: a kernel reading its input too early would see
the previous replay's values. Every stage is checked against its torch reference applied to the graph's own
previous stage. Needs a Hopper (or newer) GPU and triton; the CPU run only checks that PDL stays off."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kernels.triton import pdl

HAS_PDL_GPU = (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
               and torch.cuda.get_device_capability()[0] >= 9)


def test_pdl_is_off_without_a_hopper_gpu():
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available():
        on = torch.cuda.get_device_capability()[0] >= 9
        assert pdl.launch_options(torch.device("cuda")) == ({"PDL": True, "launch_pdl": True} if on else {"PDL": False})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.skipif(not HAS_PDL_GPU, reason="PDL needs a compute capability 9.0+ GPU and triton")
def test_layer_chain_under_a_graph_waits_for_each_input():
    from kernels.linear import linear, router_linear
    from kernels.moe import fused_experts, select_experts
    from kernels.moe.torch_ref import fused_experts_ref, select_experts_ref
    from kernels.norm import add_rms_norm, add_rms_norm_ref
    from kernels.triton.decode_attention import decode_attention
    from kernels.triton.mla_attention import mla_attention

    dev, bf = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=bf, std=0.05: (torch.randn(*s, device=dev, generator=g) * std).to(dtype)
    H, E, I, layers = 2048, 16, 256, 3
    W = [dict(qkv=rnd(5120, H), o=rnd(H, 4096), r=rnd(E, H, dtype=torch.float32),
              n=rnd(H) + 1, w13=rnd(E, 2 * I, H), w2=rnd(E, H, I)) for _ in range(layers)]
    # a GQA page pool (32 query heads over 4 KV heads) and a latent pool (8 heads x 576), 600 keys, one sequence
    kv = rnd(40, 2, 16, 4, 128, std=1.0)
    lat = rnd(40, 16, 576, std=1.0)
    seq_lens = torch.tensor([600], dtype=torch.int32, device=dev)
    bt = torch.randperm(40, device=dev, generator=g)[:38].to(torch.int32)[None]
    cu = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    x_in = torch.empty(1, H, dtype=bf, device=dev)

    def chain():
        stages, x, res = [], x_in, torch.zeros_like(x_in)
        for w in W:
            h, res = add_rms_norm(x, res, w["n"], 1e-6)
            qkv = linear(h, w["qkv"])
            attn = decode_attention(qkv[:, :4096].reshape(1, 32, 128), kv, seq_lens, bt, 128 ** -0.5)
            latent = mla_attention(qkv[:, :8 * 576].reshape(1, 8, 576), lat, seq_lens, bt, cu, None, 512,
                                   576 ** -0.5)
            o = linear(attn.reshape(1, 4096), w["o"])  # K = 4096: the split-K path and its shared counters
            h2, res2 = add_rms_norm(o, res, w["n"], 1e-6)
            logits = router_linear(h2, w["r"])
            tw, ids = select_experts(logits, 4, True)
            x = fused_experts(h2, w["w13"], w["w2"], tw, ids) + latent.reshape(1, -1)[:, :H]
            stages.append((h, res, qkv, attn, latent, o, h2, res2, logits, tw, ids, x))
            res = res2
        return stages

    x_in.copy_(rnd(1, H, std=1.0))
    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stages = chain()
    for replay in range(3):  # new inputs each time: a stale read would see the previous replay's values
        x_in.copy_(rnd(1, H, std=1.0))
        graph.replay()
        torch.cuda.synchronize()
        x, res = x_in, torch.zeros_like(x_in)
        for w, (h, r, qkv, attn, latent, o, h2, r2, logits, tw, ids, out) in zip(W, stages):
            rh, rr = add_rms_norm_ref(x, res, w["n"], 1e-6)
            assert torch.equal(r, rr) and rel_err(h, rh) < 1e-2, replay
            assert rel_err(qkv, F.linear(h, w["qkv"])) < 1e-2
            q = qkv[:, :4096].reshape(1, 32, 128).float()
            keys = kv[bt[0].long(), 0].reshape(-1, 4, 128)[:600].float().repeat_interleave(8, 1)
            vals = kv[bt[0].long(), 1].reshape(-1, 4, 128)[:600].float().repeat_interleave(8, 1)
            p = torch.softmax(torch.einsum("hd,khd->hk", q[0], keys) * 128 ** -0.5, -1)
            assert rel_err(attn[0], torch.einsum("hk,khd->hd", p, vals)) < 2e-2
            ql = qkv[:, :8 * 576].reshape(8, 576).float()
            lk = lat[bt[0].long()].reshape(-1, 576)[:600].float()
            pl = torch.softmax(ql @ lk.T * 576 ** -0.5, -1)
            assert rel_err(latent[0], pl @ lk[:, :512]) < 2e-2
            assert rel_err(o, F.linear(attn.reshape(1, 4096), w["o"])) < 1e-2
            rh2, rr2 = add_rms_norm_ref(o, r, w["n"], 1e-6)
            assert torch.equal(r2, rr2) and rel_err(h2, rh2) < 1e-2
            assert rel_err(logits, F.linear(h2.float(), w["r"])) < 1e-5
            ref_w, ref_ids = select_experts_ref(logits, 4, True)
            assert torch.equal(ids.long(), ref_ids.long()) and rel_err(tw, ref_w) < 1e-5
            moe = fused_experts_ref(h2, w["w13"], w["w2"], tw, ids)
            assert rel_err(out, moe + latent.reshape(1, -1)[:, :H]) < 2e-2
            x, res = out, r2
