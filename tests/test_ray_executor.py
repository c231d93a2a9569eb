"""The Ray executor on a local Ray instance started by the test (`ray start --head`, loopback): a
tensor_parallel_size 2 engine whose rank 1 is a Ray actor placed by a placement group gives exactly the
tokens of one rank, and shuts its actor down."""
from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

from engine.sampling_params import SamplingParams
from tests.support.server import free_port
from tests.test_engine_parity import assert_matches_hf, greedy, mixed_prompts

ray = pytest.importorskip("ray", reason="ray is a test dependency (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def ray_address():
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    cmd = ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}"
    if ray.is_initialized():
        ray.shutdown()
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_tp2_equals_one_rank(ray_address, tiny_models, llm_cache):
    from engine.llm import LLM
    path = tiny_models["qwen3"]
    llm = LLM(str(path), device="cpu", dtype="float32", kv_cache_memory_bytes=32 << 20, tensor_parallel_size=2,
              distributed_executor_backend="ray", ray_address=ray_address)
    try:
        prompts = mixed_prompts(llm.engine.model_config.vocab_size, seed=11, lengths=(2, 17, 40))
        assert_matches_hf(path, prompts, llm.generate(prompts, greedy()))
        params = [SamplingParams(temperature=0.8, seed=i, max_tokens=8, ignore_eos=True) for i in range(len(prompts))]
        ref = llm_cache.get(path).generate(prompts, params)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == \
            [o.outputs[0].token_ids for o in ref]
        assert llm.engine.executor.collective_rpc("num_block_tables") == [0, 0]
        pg_id = llm.engine.executor.pg.id.hex()
        placed = ray.util.placement_group_table()[pg_id]
        assert placed["state"] == "CREATED" and len(placed["bundles"]) == 2
    finally:
        llm.shutdown()
    assert ray.util.placement_group_table()[pg_id]["state"] == "REMOVED"  # its bundles are given back
