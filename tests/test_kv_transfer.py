"""KV-block pulls over DLSlime TCP: exact bytes, validation, and failure modes (dead, hung,
unreachable and impostor peers) — in one process and between two processes."""
import multiprocessing as mp
import os
import random
import signal
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from engine.pd.transfer import TERMINAL, KVTransferAgent, TransferError, TransferState

# layers, K/V, block_size, kv_heads, head_dim: 512-byte blocks in bf16
SHAPE = (2, 2, 4, 2, 8)


def make_pool(num_blocks: int, seed: int, shape=SHAPE, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**15, 2**15, (num_blocks, *shape), generator=g, dtype=torch.int16)
    return bits.view(dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Random bit patterns include NaNs, so compare bits, not values.
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def mixed_pairs(seed: int = 0):
    """One long run, 100 scattered remote blocks and 40 blocks reversed locally: 141 runs,
    given in shuffled order (the agent sorts them)."""
    pairs = [(r, 100 + r) for r in range(60)]
    pairs += [(100 + 2 * i, 200 + i) for i in range(100)]
    pairs += [(300 + i, 399 - i) for i in range(40)]
    random.Random(seed).shuffle(pairs)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def expected_after(dst_before, src, remote, local):
    out = dst_before.clone()
    out[local] = src[remote]
    return out


def test_pull_in_process_exact_bytes_and_bounded_batches():
    src, dst = make_pool(400, 1), make_pool(400, 2)
    src_before, dst_before = src.clone(), dst.clone()
    remote, local = mixed_pairs()
    with KVTransferAgent(src) as source, KVTransferAgent(dst, max_range_bytes=4 << 10) as sink:
        t = sink.start_pull(source.endpoint_info(), remote, local, timeout_s=10)
        assert t.wait() is TransferState.DONE, t.error
        # The 60-block run is split into 8-block pieces: 8 + 100 + 40 ranges.
        assert t.num_ranges == 148 and t.num_calls >= 5
        assert bitwise_equal(dst, expected_after(dst_before, src, remote, local))
        assert bitwise_equal(src, src_before)
        m = sink.metrics()
        assert (m.transfers, m.failed, m.timed_out) == (1, 0, 0)
        assert m.bytes == t.bytes == 200 * sink.block_bytes and m.gbps > 0
        assert 32 < m.peak_inflight <= 64
        # A second pull reuses the cached connection.
        t2 = sink.start_pull(source.endpoint_info(), [5], [5], timeout_s=10)
        assert t2.wait() is TransferState.DONE and len(sink._links) == 1
        assert bitwise_equal(dst[5], src[5])


def test_staged_pull_waits_for_slots_then_lands():
    src, dst = make_pool(64, 3), make_pool(64, 4)
    dst_before = dst.clone()
    with KVTransferAgent(src, staging_blocks=48) as source, \
            KVTransferAgent(dst, staging_blocks=32) as sink:
        staged = source.stage_out(list(range(10, 50)))
        assert staged.ready() and sorted(staged.remote_ids) == list(range(40))
        info = source.endpoint_info()
        assert info["staged"] and info["num_blocks"] == 48 and info["pool_blocks"] == 64
        # 2 x 20 blocks through a 32-slot staging area: the second waits for slots. `a` first gets
        # past the connection's identity probe and takes its 20 slots: the poll that issues its reads
        # leaves it PULLING, and only a later poll can land it and free them. start_pull polls once
        # itself (on a fast machine the probe is already answered there), so poll only while PENDING.
        a = sink.start_pull(info, list(range(10, 30)), list(range(20)), timeout_s=10,
                            staged_block_ids=staged.remote_ids[:20])
        deadline = time.monotonic() + 10
        while a.state is TransferState.PENDING:
            a.poll()
            assert time.monotonic() < deadline, "the first pull never started"
            time.sleep(0.0002)
        assert a.state is TransferState.PULLING
        b = sink.start_pull(info, list(range(30, 50)), list(range(40, 60)), timeout_s=10,
                            staged_block_ids=staged.remote_ids[20:])
        assert b.state is TransferState.PENDING
        while not (a.state in TERMINAL and b.state in TERMINAL):  # both driven, as the engine does
            assert {a.poll(), b.poll()} != {TransferState.PULLING}, "both pulls hold staging slots at once"
            assert time.monotonic() < deadline, (a.state, b.state)
            time.sleep(0.0002)
        assert a.state is TransferState.DONE, a.error
        assert b.state is TransferState.DONE, b.error
        source.release(staged)
        source.release(staged)   # idempotent
        exp = dst_before.clone()
        exp[0:20], exp[40:60] = src[10:30], src[30:50]
        assert bitwise_equal(dst, exp)
        with pytest.raises(TransferError, match="was not staged"):
            sink.start_pull(info, list(range(20)), list(range(20)))
        with pytest.raises(TransferError, match="exceeds the staging area"):
            sink.start_pull(info, list(range(33)), list(range(33)), staged_block_ids=list(range(33)))


# -- cross-process -----------------------------------------------------------------------

def _serve(conn, num_blocks: int, seed: int) -> None:
    agent = KVTransferAgent(make_pool(num_blocks, seed))
    conn.send(agent.endpoint_info())
    conn.recv()     # until told to stop (or killed)
    agent.close()


@pytest.fixture(scope="module")
def sources():
    """Two source engines in child processes, started together (each start imports torch,
    seconds on a busy machine): (process, endpoint info) with pools make_pool(400, 11 + i)."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_serve, args=(child, 400, 11 + i), daemon=True)
             for i, (_, child) in enumerate(pipes)]
    for proc in procs:
        proc.start()
    try:
        for parent, _ in pipes:
            assert parent.poll(60), "source process did not start"
        yield [(proc, parent.recv()) for proc, (parent, _) in zip(procs, pipes)]
    finally:
        for proc, (parent, _) in zip(procs, pipes):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)
                parent.send("stop")
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def test_pull_across_processes(sources):
    _, info = sources[0]
    dst = make_pool(400, 12)
    dst_before = dst.clone()
    remote, local = mixed_pairs(seed=1)
    with KVTransferAgent(dst) as sink:
        t = sink.start_pull(info, remote, local, timeout_s=10)
        assert t.wait() is TransferState.DONE, t.error
        assert bitwise_equal(dst, expected_after(dst_before, make_pool(400, 11), remote, local))
        assert t.elapsed_ms > 0 and t.gbps > 0


def stop_process(pid: int) -> None:
    """SIGSTOP, then wait until every thread is really stopped (delivery is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(st in "Tt" for st in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def test_peer_killed_or_hung_fails_within_timeout(sources):
    proc, info = sources[1]
    dst = make_pool(64, 22)
    with KVTransferAgent(dst) as sink, \
            KVTransferAgent(make_pool(64, 23), staging_blocks=8) as staged:
        for agent in (sink, staged):
            assert agent.start_pull(info, [0, 1], [0, 1], timeout_s=10).wait() is TransferState.DONE
        # Hung peer (stopped, its kernel still accepts connections): timed out. An abandoned
        # read might still land: in the pool blocks (flagged) or in staging (quarantined).
        stop_process(proc.pid)
        t = sink.start_pull(info, [2, 3], [2, 3], timeout_s=0.5)
        ts = staged.start_pull(info, [2, 3], [2, 3], timeout_s=0.5)
        assert t.wait() is TransferState.TIMED_OUT and "not done within" in t.error
        assert not t.safe_to_free and t.elapsed_ms < 3000
        assert ts.wait() is TransferState.TIMED_OUT and ts.safe_to_free
        os.kill(proc.pid, signal.SIGCONT)
        # Reconnects (the hung link was dropped), then the peer dies.
        assert sink.start_pull(info, [4], [4], timeout_s=10).wait() is TransferState.DONE
        proc.kill()
        proc.join()
        t = sink.start_pull(info, list(range(8, 40)), list(range(8, 40)), timeout_s=10)
        assert t.wait() is TransferState.FAILED and t.elapsed_ms < 5000, t.error
        assert "peer dead" in t.error and t.safe_to_free
        # A fresh connection to the dead address fails fast too.
        t = sink.start_pull(info, [5], [5], timeout_s=10)
        assert t.wait() is TransferState.FAILED and "cannot connect" in t.error
        m = sink.metrics()
        assert (m.transfers, m.failed, m.timed_out) == (2, 2, 1)


# -- validation ---------------------------------------------------------------------------

def test_validation_errors_transfer_nothing():
    src, dst = make_pool(16, 31), make_pool(16, 32)
    dst_before = dst.clone()
    with KVTransferAgent(src) as source, KVTransferAgent(dst) as sink:
        info = source.endpoint_info()
        bad = [
            (info, [16], [0], "remote block id 16 out of range"),
            (info, [0], [-1], "local block id -1 out of range"),
            (info, [0, 1], [0], "length mismatch"),
            (info, [0, 1], [3, 3], "duplicate local"),
            (info, [0.0], [0], "not an integer"),
            ({**info, "num_blocks": 10**6}, [100], [0], "exceeds the peer's advertised region"),
            ({**info, "mr_info": {}}, [0], [0], "malformed"),
            ({**info, "transports": ["rdma"]}, [0], [0], "no KV transport in common"),
            ({**info, "transports": ["ipc"], "pool_blocks": 16, "ipc": {}}, [0], [0],
             "no KV transport in common"),   # a CPU pool pulls over TCP only
        ]
        for peer, remote, local, msg in bad:
            with pytest.raises(TransferError, match=msg):
                sink.start_pull(peer, remote, local)
        for pool in (make_pool(16, 0, shape=(2, 2, 4, 2, 16)),   # head_dim
                     make_pool(16, 0, shape=(3, 2, 4, 2, 8)),    # layers
                     make_pool(16, 0, dtype=torch.float16)):     # dtype
            with KVTransferAgent(pool) as other, pytest.raises(TransferError, match="incompatible"):
                sink.start_pull(other.endpoint_info(), [0], [0])
        assert bitwise_equal(dst, dst_before)
        assert sink.metrics().transfers == 0 and not sink._links


# -- unreachable and impostor peers -------------------------------------------------------

@contextmanager
def listener(answer: bytes | None):
    """A TCP listener that is not a DLSlime peer: silent (never accepts) or answering junk."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
                conn.recv(4096)
                conn.sendall(answer)
            except OSError:
                return
    if answer is not None:
        threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def test_unreachable_silent_and_impostor_peers_do_not_hang():
    src, dst = make_pool(8, 41), make_pool(8, 42)
    dst_before = dst.clone()
    with KVTransferAgent(src) as source, KVTransferAgent(dst) as sink:
        info = source.endpoint_info()
        with listener(None) as port:
            pass                     # now closed: nothing listens on `port`
        t = sink.start_pull({**info, "port": port}, [0], [0], timeout_s=5)
        assert t.wait() is TransferState.FAILED and "cannot connect" in t.error
        with listener(None) as port:
            t = sink.start_pull({**info, "port": port}, [0], [0], timeout_s=0.3)
            assert t.wait() is TransferState.TIMED_OUT
            assert t.safe_to_free     # only the identity probe was out, never a KV read
        with listener(b"\0" * 256) as port:
            t = sink.start_pull({**info, "port": port}, [0, 1], [0, 1], timeout_s=5)
            assert t.wait() is TransferState.FAILED and "identity probe" in t.error
        assert bitwise_equal(dst, dst_before)


def test_close_fails_active_pulls_and_is_idempotent():
    src, dst = make_pool(8, 51), make_pool(8, 52)
    source, sink = KVTransferAgent(src), KVTransferAgent(dst)
    with listener(None) as port:
        t = sink.start_pull({**source.endpoint_info(), "port": port}, [0], [0], timeout_s=30)
        assert t.poll() is TransferState.PENDING
        sink.close()
        sink.close()
    assert t.state is TransferState.FAILED and "closed" in t.error
    with pytest.raises(TransferError, match="closed"):
        sink.start_pull(source.endpoint_info(), [0], [0])
    source.close()


# -- connect-back links (RDMA's path, run with TCP data endpoints) ----------------------------

def tcp_data_endpoint():
    import dlslime
    return dlslime.TcpEndpoint("127.0.0.1", 0)


def test_connect_back_link_pulls_exact_bytes():
    """RDMA's path end to end (mailbox handshake, a data endpoint per puller, identity probe, bounded
    reads of the pool itself) with only the data endpoints' constructor swapped for TCP's."""
    src, dst = make_pool(400, 81), make_pool(400, 82)
    dst_before = dst.clone()
    remote, local = mixed_pairs(seed=3)
    with KVTransferAgent(src, transport="rdma", data_endpoint=tcp_data_endpoint) as source, \
            KVTransferAgent(dst, transport="rdma", data_endpoint=tcp_data_endpoint) as sink:
        info = source.endpoint_info()
        assert info["transports"] == ["rdma"] and "hs" in info["mr_info"]
        t = sink.start_pull(info, remote, local, timeout_s=10)
        assert t.transport == "rdma" and t.wait() is TransferState.DONE, t.error
        assert bitwise_equal(dst, expected_after(dst_before, src, remote, local))
        assert t.num_calls <= len(t._ranges) and source._mailbox.num_served == 1
        again = sink.start_pull(info, [7], [7], timeout_s=10)       # the link is reused
        assert again.wait() is TransferState.DONE and source._mailbox.num_served == 1
        with pytest.raises(TransferError, match="out of range"):
            sink.start_pull(info, [400], [0])
        impostor = sink.start_pull({**info, "agent_id": "f" * 32}, [0], [0], timeout_s=10)
        assert impostor.wait() is TransferState.FAILED and "identity probe" in impostor.error
        with KVTransferAgent(make_pool(8, 83)) as tcp_only, \
                pytest.raises(TransferError, match="no KV transport in common"):
            tcp_only.start_pull(info, [0], [0])


def test_mailbox_answers_a_malformed_request_with_an_error():
    from engine.pd import handshake as hs
    pool, ident = make_pool(4, 84), torch.zeros(32, dtype=torch.uint8)
    box = hs.Mailbox(tcp_data_endpoint, pool, ident)
    try:
        box.close()   # driven by hand here
        req = box.buf[:hs.HALF]
        hs._encode(req, {"agent_id": "short", "info": {}})
        req[:8] = torch.tensor(list((5).to_bytes(8, "little")), dtype=torch.uint8)
        assert box.serve_once() == 1 and box.serve_once() == 0     # answered once
        reply = box.buf[hs.HALF:2 * hs.HALF]
        assert hs._nonce(reply) == 5 and "expected {agent_id, info}" in hs._decode(reply)["error"]
        assert box.num_served == 0
    finally:
        box.close()
