"""The start-up GEMM warm-up (engine/worker/warmup.py): which row counts it runs, on a real tiny model."""
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.layers.linear import LinearBase
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.worker.warmup import projection_row_counts, warm_up_gemms


def test_projection_row_counts():
    counts = projection_row_counts(16384)
    assert counts[:8] == [1, 2, 3, 4, 6, 8, 12, 16] and counts[-1] == 16384 and counts == sorted(set(counts))
    assert all(1 << k in counts for k in range(15))
    assert projection_row_counts(1) == [1] and projection_row_counts(7) == [1, 2, 3, 4, 6, 7]


def test_warm_up_runs_every_logits_row_count_and_each_projection_shape(tiny_models, monkeypatch):
    # Qwen2: an untied lm_head (its own vocab table: warmed through compute_logits only)
    core = EngineCore(EngineConfig(model=str(tiny_models["qwen2"]), device="cpu", dtype="float32", num_kv_blocks=64))
    model = core.runner.model
    logits_rows, proj_rows = [], {}
    compute_logits = model.compute_logits
    model.compute_logits = lambda h: logits_rows.append(h.shape[0]) or compute_logits(h)
    gemm = LinearBase.gemm

    def record(layer, x, bias=None):
        out = gemm(layer, x, bias)
        proj_rows.setdefault(tuple(layer.weight.shape), []).append(x.shape[0])
        assert out.shape == (x.shape[0], layer.weight.shape[0])
        return out

    monkeypatch.setattr(LinearBase, "gemm", record)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and isinstance(model.lm_head, VocabParallelEmbedding) and model.lm_head is not model.model.embed_tokens
    seconds = warm_up_gemms(model, core.runner.hidden_size, torch.float32, torch.device("cpu"), 5, 40)
    assert seconds >= 0
    assert logits_rows == [1, 2, 3, 4, 5]
    # one GEMM per distinct weight shape (every layer's q/k/v fused projection has the same shape)
    assert set(proj_rows) == {tuple(m.weight.shape) for m in linears}
    assert all(rows == projection_row_counts(40) for rows in proj_rows.values())
    core.shutdown()
