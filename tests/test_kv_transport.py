"""Transport choice by topology and the transport descriptors a migration carries: what each pool offers under
--kv-transport, which transport a puller picks, the checks on a peer's endpoint info and CUDA IPC descriptor, and
the decode front refusing a forged IPC handle or an endpoint of an unknown engine. The IPC copies themselves run
in tests/test_kv_ipc_gpu.py (GPU only)."""
from __future__ import annotations

import asyncio
import copy
import time

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.pd import migration as mig
from engine.pd import topology
from engine.pd.ipc import check_descriptor, check_extent
from engine.pd.ranges import TransferError, check_peer_info
from engine.pd.transfer import KVTransferAgent
from engine.sampling_params import SamplingParams
from engine.server.kv_sources import KnownKVSources

PART = {"handle": "ab" * 66, "size": 1 << 20, "offset": 0, "tensor_offset": 0, "ref_counter": "2f70" * 4,
        "ref_counter_offset": 3, "event": "cd" * 64, "event_sync": True}
IPC = {"device_uuid": "GPU-1234", "pool": dict(PART), "id": {**PART, "size": 512}}


def peer(transports=("ipc", "tcp"), host_id="h1", ipc=IPC, **extra) -> dict:
    info = {"agent_id": "a" * 32, "host": "127.0.0.1", "port": 5555, "host_id": host_id,
            "transports": list(transports), "region": "kv", "num_blocks": 8, "pool_blocks": 64, "staged": True,
            "mr_info": {"kv": {"addr": 1, "length": 4096}, "id": {"addr": 2, "length": 32}}, "ipc": ipc,
            "block_shape": [2, 2, 4, 2, 8], "dtype": "bfloat16", "block_bytes": 512}
    return {**info, **extra}


def test_offers_follow_the_setting_pool_and_machine():
    assert topology.offers("auto", pool_is_cuda=False, has_rdma_nic=False) == ("tcp",)
    assert topology.offers("auto", pool_is_cuda=True, has_rdma_nic=False) == ("ipc", "tcp")
    assert topology.offers("auto", pool_is_cuda=True, has_rdma_nic=True) == ("ipc", "tcp")   # RDMA only when named
    assert topology.offers("rdma", pool_is_cuda=True, has_rdma_nic=True) == ("rdma",)
    assert topology.offers("ipc", pool_is_cuda=True, has_rdma_nic=True) == ("ipc",)
    assert topology.offers("tcp", pool_is_cuda=True, has_rdma_nic=True) == ("tcp",)
    with pytest.raises(TransferError, match="not on a GPU"):
        topology.offers("ipc", pool_is_cuda=False, has_rdma_nic=False)
    with pytest.raises(TransferError, match="no RDMA NIC"):
        topology.offers("rdma", pool_is_cuda=True, has_rdma_nic=False)
    with pytest.raises(TransferError, match="unknown kv transport"):
        topology.offers("nvlink", pool_is_cuda=True, has_rdma_nic=False)


def test_choose_takes_the_best_shared_transport():
    gpu, seen = ("ipc", "tcp"), frozenset({"GPU-1234"})
    assert topology.choose(gpu, peer(), "h1", seen) == "ipc"
    assert topology.choose(gpu, peer(), "h2", seen) == "tcp"         # another host (or IPC namespace): no IPC
    assert topology.choose(gpu, peer(), "h1") == "tcp"               # its GPU is not visible here
    assert topology.choose(gpu, peer(ipc=None), "h1", seen) == "tcp"  # nothing exported
    assert topology.choose(("tcp",), peer(), "h1", seen) == "tcp"    # this engine forced to TCP
    assert topology.choose(("ipc", "rdma", "tcp"), peer(("ipc", "rdma", "tcp")), "h2", seen) == "rdma"
    with pytest.raises(TransferError, match="no KV transport in common"):
        topology.choose(gpu, peer(("ipc",)), "h2", seen)             # IPC-only source on another host
    with pytest.raises(TransferError, match="no KV transport in common"):
        topology.choose(("ipc",), peer(("tcp",)), "h1", seen)


def test_host_id_is_shared_by_processes_of_one_host_and_ipc_namespace():
    import subprocess
    import sys
    other = subprocess.run([sys.executable, "-c", "from engine.pd import topology; print(topology.host_id())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert other == topology.host_id() and "/ipc:" in other


def test_peer_info_checks_per_transport():
    ipc_only = peer(("ipc",), mr_info={"id": {"addr": 2, "length": 32}})
    assert check_peer_info(ipc_only)["region_length"] == 0           # an IPC-only pool registers no KV region
    with pytest.raises(TransferError, match="malformed"):
        check_peer_info(peer(("tcp",), mr_info={"id": {"addr": 2, "length": 32}}))
    with pytest.raises(TransferError, match="malformed"):
        check_peer_info({k: v for k, v in peer().items() if k != "pool_blocks"})
    with pytest.raises(TransferError, match="bad field types"):
        check_peer_info({**peer(), "transports": "ipc"})
    with pytest.raises(TransferError, match="bad field types"):
        check_peer_info(peer(host_id=7))
    legacy = {k: v for k, v in peer().items() if k not in ("transports", "host_id")}
    assert check_peer_info(legacy)["transports"] == ["tcp"]          # info from before transports existed


def test_ipc_descriptor_checks():
    assert check_descriptor(copy.deepcopy(IPC)) == IPC
    for path, value, msg in [(("pool", "handle"), "zz", "malformed"), (("id", "size"), -1, "bad field types"),
                             (("pool", "event_sync"), 1, "bad field types"), (("device_uuid",), 3, "bad field")]:
        bad = copy.deepcopy(IPC)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(TransferError, match=msg):
            check_descriptor(bad)
    bad = copy.deepcopy(IPC)
    del bad["id"]["ref_counter"]
    with pytest.raises(TransferError, match="missing or bad"):
        check_descriptor(bad)
    check_extent(IPC["pool"], 1 << 20, "pool")
    with pytest.raises(TransferError, match="smaller than"):
        check_extent({**IPC["pool"], "tensor_offset": 512}, 1 << 20, "pool")   # claims more than it exports


def test_cpu_agent_advertises_tcp_only_and_refuses_an_ipc_only_source():
    pool = torch.zeros(8, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
    with KVTransferAgent(pool) as agent:
        info = agent.endpoint_info()
        assert info["transports"] == ["tcp"] and info["ipc"] is None and not info["staged"]
        assert info["host_id"] == topology.host_id() and info["pool_blocks"] == 8
        assert agent.choose(info) == "tcp"
        with pytest.raises(TransferError, match="no KV transport in common"):
            agent.start_pull({**info, "transports": ["ipc"], "ipc": IPC}, [0], [0])
    with pytest.raises(TransferError, match="not on a GPU"):
        KVTransferAgent(pool, transport="ipc")


def _migration(transfer, staged=None) -> mig.Migration:
    return mig.Migration(version=mig.VERSION, engine_id="e" * 32, seq_id=7, transfer=transfer,
                         kv_spec=mig.KVCacheSpec(2, 2, 4, 4, "bfloat16"), block_ids=[[5, 9]],
                         staged_block_ids=staged, prompt_token_ids=[1, 2, 3, 4, 5], first_token=6,
                         params=SamplingParams(max_tokens=4), sampling_seed=1)


def test_migration_carries_pool_and_staged_ids():
    m = mig.decode(mig.encode(_migration([peer()], staged=[[0, 1]])))
    assert m.block_ids == [[5, 9]] and m.staged_block_ids == [[0, 1]]
    assert m.transfer[0]["ipc"] == IPC and m.transfer[0]["transports"] == ["ipc", "tcp"]
    assert mig.decode(mig.encode(_migration([peer()]))).staged_block_ids is None
    with pytest.raises(InvalidRequestError, match="staged block list per tensor-parallel rank"):
        mig.decode(mig.encode(_migration([peer()], staged=[[0, 1], [2, 3]])))
    with pytest.raises(InvalidRequestError, match="block count"):
        mig.decode(mig.encode(_migration([peer()], staged=[[0]])))


def test_decode_front_refuses_forged_ipc_handles_and_unknown_engines():
    registered = peer()
    sources = KnownKVSources(discovery=None)  # the registration as the control plane listed it
    sources.known["e" * 32] = ([[registered["agent_id"], registered["host"], registered["port"],
                                 topology.ipc_digest(registered["ipc"])]], time.monotonic())
    sources._refreshed = time.monotonic()    # just listed: an unknown id is not looked up again

    def check(transfer, engine_id="e" * 32):
        m = _migration(transfer)
        m.engine_id = engine_id
        asyncio.run(sources.check({"migration": mig.encode(m)}))

    check([registered])
    forged = copy.deepcopy(registered)
    forged["ipc"]["pool"]["handle"] = "ef" * 66   # another allocation on the same GPU
    with pytest.raises(InvalidRequestError, match="CUDA IPC handle"):
        check([forged])
    with pytest.raises(InvalidRequestError, match="CUDA IPC handle"):
        check([{**registered, "ipc": None}])
    with pytest.raises(InvalidRequestError, match="not registered"):
        check([registered], engine_id="f" * 32)


def test_bench_transfer_prints_its_table_and_refuses_ipc_without_a_gpu():
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "engine.cli.main", "bench", "transfer", "--tokens", "32", "--repeats", "1",
           "--layers", "2", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "transport tcp" in out.stdout and "contiguous" in out.stdout and "MISMATCH" not in out.stdout
    out = subprocess.run([*cmd, "--transport", "ipc"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs --device cuda" in out.stderr
