"""`slipstream bench profile` on the CPU: a tiny MoE shape with random weights, profiled by operator."""
import json

from engine.bench.profile import main

TINY_MOE = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "intermediate_size": 256, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}


def test_profile_prints_a_table_per_batch_size(capsys):
    # 7 prompts of 3,000 tokens take three prefill steps (8,192-token budget), during which the first sequences
    # already decode: they must still be running when the whole batch decodes together
    assert main(["--model-shape", "qwen3-30b-a3b", "--override", json.dumps(TINY_MOE), "--device", "cpu",
                 "--dtype", "float32", "--batch", "1,7", "--steps", "2", "--prompt-len", "3000", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "device: CPU" in out and "2 layers" in out
    for batch in (1, 7):
        head = f"### batch {batch}: 2 decode steps; per step "
        assert head in out, out
        table = out.split(head)[1].split("###")[0]
        rows = [line for line in table.splitlines() if line.startswith("| `")]
        assert len(rows) == 5 and all(float(r.split("|")[3]) > 0 for r in rows), table
    assert "aten::mm" in out  # the projections and experts' matmuls are there
