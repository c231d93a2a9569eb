"""KV pulls over CUDA IPC between two processes on one GPU: exact bytes, the transport the agents pick, a stale or
forged handle refused by the identity check, and a source killed before or during the pull. GPU only (CUDA IPC
needs a GPU); the transport choice and descriptor checks run on CPU in tests/test_kv_transport.py."""
import multiprocessing as mp
import os
import signal

import pytest
import torch

from engine.pd.transfer import KVTransferAgent, TransferError, TransferState
from tests.test_kv_transfer import bitwise_equal, expected_after, make_pool, mixed_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")


def _serve(conn, num_blocks: int, seed: int, transport: str, staging: int) -> None:
    pool = make_pool(num_blocks, seed).cuda()
    agent = KVTransferAgent(pool, transport=transport, staging_blocks=0 if transport == "ipc" else staging)
    staged = agent.stage_out(list(range(8)))    # what a prefill engine does when it parks a request
    conn.send((agent.endpoint_info(), list(staged.remote_ids)))
    conn.recv()     # until told to stop (or killed)
    agent.close()


@pytest.fixture
def source():
    """A source engine's rank in a child process: (process, endpoint info, staged ids of blocks 0-7)."""
    ctx = mp.get_context("spawn")
    started = []

    def start(transport="auto", seed=11, num_blocks=400, staging=64):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, num_blocks, seed, transport, staging), daemon=True)
        proc.start()
        assert parent.poll(120), "source process did not start"
        started.append((proc, parent))
        return (proc, *parent.recv())

    yield start
    for proc, parent in started:
        if proc.is_alive():
            parent.send("stop")
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_ipc_pull_exact_bytes_and_transport_choice(source):
    _, info, _ = source("auto")
    assert info["transports"] == ["ipc", "tcp"] and info["ipc"] and info["staged"]
    dst = make_pool(400, 12).cuda()
    before = dst.clone()
    remote, local = mixed_pairs(seed=1)
    with KVTransferAgent(dst, staging_blocks=64) as sink:
        assert sink.choose(info) == "ipc"
        t = sink.start_pull(info, remote, local, timeout_s=30)
        assert t.transport == "ipc" and t.wait() is TransferState.DONE, t.error
        assert bitwise_equal(dst.cpu(), expected_after(before.cpu(), make_pool(400, 11), remote, local))
        assert t.num_ranges == 141 and t.gbps > 0
        again = sink.start_pull(info, [0, 1], [0, 1], timeout_s=30)   # the mapping is reused
        assert again.wait() is TransferState.DONE and len(sink._ipc_peers) == 1
        m = sink.metrics()
        assert m.transfers == 2 and m.bytes == (len(remote) + 2) * sink.block_bytes


def test_tcp_forced_engine_pulls_the_staged_copy(source):
    _, info, staged = source("auto", seed=21)
    dst = make_pool(64, 22).cuda()
    with KVTransferAgent(dst, transport="tcp", staging_blocks=16) as sink:
        assert sink.choose(info) == "tcp"
        t = sink.start_pull(info, list(range(8)), list(range(10, 18)), timeout_s=30, staged_block_ids=staged)
        assert t.transport == "tcp" and t.wait() is TransferState.DONE, t.error
        assert bitwise_equal(dst[10:18].cpu(), make_pool(400, 21)[:8])


def test_full_staging_area_still_serves_ipc_and_refuses_tcp(source):
    _, info, ids = source("auto", seed=71, staging=4)   # 8 blocks parked, 4 staging slots
    assert info["staged"] and ids == list(range(8))      # unstaged: the pool blocks themselves
    dst = make_pool(64, 72).cuda()
    with KVTransferAgent(dst, staging_blocks=16) as sink, \
            KVTransferAgent(make_pool(64, 73).cuda(), transport="tcp", staging_blocks=16) as tcp_only:
        with pytest.raises(TransferError, match="was not staged"):
            tcp_only.start_pull(info, ids, ids)
        assert sink.start_pull(info, ids, list(range(20, 28)), timeout_s=30).wait() is TransferState.DONE
        assert bitwise_equal(dst[20:28].cpu(), make_pool(400, 71)[:8])


def test_ipc_only_source_and_forged_handles(source):
    _, info, staged = source("ipc", seed=31)
    assert info["transports"] == ["ipc"] and not info["staged"] and staged == list(range(8))
    dst = make_pool(64, 32).cuda()
    before = dst.clone()
    with KVTransferAgent(dst, staging_blocks=16) as sink, \
            KVTransferAgent(make_pool(64, 33).cuda(), transport="tcp", staging_blocks=16) as tcp_only:
        with pytest.raises(TransferError, match="no KV transport in common"):
            tcp_only.start_pull(info, [0], [0])
        # the id tensor's handle presented as the pool's, and another agent's id: refused before any copy
        swapped = {**info, "ipc": {**info["ipc"], "pool": info["ipc"]["id"]}}
        t = sink.start_pull(swapped, [0], [0], timeout_s=30)
        assert t.state is TransferState.FAILED and "smaller than" in t.error
        impostor = {**info, "agent_id": "f" * 32}
        t = sink.start_pull(impostor, [0], [0], timeout_s=30)
        assert t.state is TransferState.FAILED and "does not open the pool of the agent" in t.error
        assert bitwise_equal(dst, before) and len(sink._ipc_peers) == 0
        t = sink.start_pull(info, [3], [5], timeout_s=30)
        assert t.wait() is TransferState.DONE, t.error
        assert bitwise_equal(dst[5].cpu(), make_pool(400, 31)[3])


def test_source_killed_before_the_pull_fails_only_that_pull(source):
    proc, info, _ = source("ipc", seed=41)
    dst = make_pool(64, 42).cuda()
    with KVTransferAgent(dst, staging_blocks=16) as sink:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        t = sink.start_pull(info, [0, 1], [0, 1], timeout_s=30)
        assert t.wait() is TransferState.FAILED and "CUDA IPC" in t.error and t.safe_to_free
        # the engine's own pool and CUDA context are fine: another source still pulls
        _, other, _ = source("ipc", seed=43)
        assert sink.start_pull(other, [2], [2], timeout_s=30).wait() is TransferState.DONE
        assert bitwise_equal(dst[2].cpu(), make_pool(400, 43)[2])


def test_source_killed_after_mapping_still_reads_what_it_wrote(source):
    """The mapping keeps the dead source's allocation alive: its blocks (written before the migration was
    published) still read back exactly, and dropping the mapping releases the allocation."""
    proc, info, _ = source("ipc", seed=51)
    dst = make_pool(64, 52).cuda()
    with KVTransferAgent(dst, staging_blocks=16) as sink:
        assert sink.start_pull(info, [0], [0], timeout_s=30).wait() is TransferState.DONE
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        t = sink.start_pull(info, [4, 5], [4, 5], timeout_s=30)
        assert t.wait() in (TransferState.DONE, TransferState.FAILED), t.error
        if t.state is TransferState.DONE:
            assert bitwise_equal(dst[4:6].cpu(), make_pool(400, 51)[4:6])
        sink._ipc_peers.drop(info["agent_id"])
        torch.cuda.synchronize()
        assert torch.isfinite(dst.float()).any()   # the context survived


# -- engines: 1P1D over CUDA IPC ---------------------------------------------------------------------------------

GPU_ARGS = ["--device", "cuda", "--gpu-memory-utilization", "0.05"]


def test_1p1d_over_ipc_equals_hybrid_and_survives_a_dead_prefill(cluster):
    """Prefill and decode on one GPU, KV over CUDA IPC only (so every pull that succeeds went over IPC): the same
    tokens as a hybrid engine on the same GPU, streamed and not; then a prefill engine killed after handing off
    fails at most that request, and every pool is full again."""
    from tests.support.server import start_server
    from tests.test_pd_cluster import assert_pools_full, model_name, post, run_all, url, workload
    hybrid = start_server(cluster.model, cluster.log_dir, *GPU_ARGS)  # on its own: not in the router's scope
    try:
        reqs = workload(32, seed=3)
        for b in reqs:
            b["model"] = model_name(hybrid)
        expected = run_all(url(hybrid, ""), reqs)
    finally:
        hybrid.stop()
    prefill, decode = cluster.engines_of(("prefill", *GPU_ARGS, "--kv-transport", "ipc"),
                                         ("decode", *GPU_ARGS, "--kv-transport", "ipc"))
    router = cluster.start_router()
    router.wait_engines(2)
    assert run_all(router.url, reqs) == expected
    stats = decode.engine_info()["stats"]
    assert stats["kv_transfers"] >= 32 and stats["kv_transfers_failed"] == 0 and stats["kv_transfer_bytes"] > 0
    assert_pools_full(cluster)

    body = {"model": model_name(prefill), "prompt": list(range(5, 45)), "max_tokens": 4, "temperature": 0.0,
            "kv_transfer_params": {"do_remote_decode": True}}
    kv = post(url(prefill, "/v1/completions"), body)[1]["kv_transfer_params"]
    prefill.stop(sig=9)
    status, answer = post(url(decode, "/v1/completions"), {**body, "kv_transfer_params": {"migration": kv["migration"]}})
    # the decode engine mapped the prefill pool for the earlier pulls: the dead engine's blocks, written before it
    # answered, may still be read (200); a pull that cannot be made is a 503 for this request alone
    assert status in (200, 503), answer
    info = decode.wait_kv_free(timeout=15)
    assert info["stats"]["num_free_blocks"] == info["stats"]["num_blocks"]
    assert decode.get_json("/health")[0] == 200


def test_block_copy_kernel_matches_the_reference():
    from engine.pd.ranges import coalesce
    from kernels.block_copy import copy_blocks, copy_blocks_ref
    remote, local = mixed_pairs(seed=5)
    pairs = sorted(zip(remote, local))
    runs = coalesce([p[0] for p in pairs], [p[1] for p in pairs])
    for shape, dtype in [((2, 2, 4, 2, 8), torch.bfloat16), ((3, 2, 16, 1, 24), torch.float32),
                         ((1, 3, 1, 1, 3), torch.float8_e4m3fn)]:    # 9-byte blocks: the reference path
        nbytes = 400 * torch.empty(shape, dtype=dtype).nbytes
        g = torch.Generator().manual_seed(61)
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).view(dtype).view(400, *shape).cuda()
        dst, ref = torch.zeros_like(src), torch.zeros_like(src)
        copy_blocks(dst, src, runs)
        copy_blocks_ref(ref, src, runs)
        torch.cuda.synchronize()
        assert torch.equal(dst.view(torch.uint8), ref.view(torch.uint8)), (shape, dtype)
