"""Which transport moves a hand-off's bytes: what this engine's pool can offer under `--kv-transport`, and the
best transport a puller shares with the source it pulls from. Pure functions; no I/O beyond reading the host id.

Preference, best first: `ipc` (same host, both pools on GPUs: device-to-device copies, no host staging), `rdma`
(GPUDirect through DLSlime's RDMAEndpoint), `tcp` (DLSlime's TcpEndpoint; GPU pools staged through pinned host
memory). `auto` offers everything the pool and the machine can do; naming one transport offers only that one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket

from engine.pd.ranges import TransferError

TRANSPORTS = ("ipc", "rdma", "tcp")  # best first
CHOICES = ("auto", *TRANSPORTS)


@functools.cache
def host_id() -> str:
    """Where CUDA IPC works: the kernel's boot id (equal for every process and container on one machine,
    different across machines and reboots) and the IPC namespace (containers share it only with `ipc: host`;
    CUDA IPC and torch's shared reference counts need it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = f"host:{socket.gethostname()}"
    try:
        namespace = os.readlink("/proc/self/ns/ipc")
    except OSError:
        namespace = "ipc:?"
    return f"{boot}/{namespace}"


def offers(setting: str, pool_is_cuda: bool, has_rdma_nic: bool) -> tuple[str, ...]:
    """The transports an engine serves and pulls with. Raises TransferError when the setting names one that
    this pool or machine cannot do (an operator error worth failing start-up for)."""
    if setting not in CHOICES:
        raise TransferError(f"unknown kv transport {setting!r} (expected one of {', '.join(CHOICES)})")
    possible = {"ipc": pool_is_cuda, "rdma": has_rdma_nic, "tcp": True}
    if setting != "auto":
        if not possible[setting]:
            why = "the KV pool is not on a GPU" if setting == "ipc" else "no RDMA NIC was found"
            raise TransferError(f"kv transport {setting!r} is not possible here: {why}")
        return (setting,)
    # auto leaves RDMA out until it has been measured on a real NIC
    return tuple(t for t in TRANSPORTS if possible[t] and t != "rdma")


def choose(local: tuple[str, ...], peer: dict, local_host: str, gpus: frozenset[str] = frozenset()) -> str:
    """The best transport both sides offer. IPC also needs the same host and IPC namespace (the peer's
    `host_id`), the peer's exported pool (`ipc`) and its GPU among this process's (`gpus`, by UUID); the peer's
    offers come from its endpoint info (`transports`)."""
    theirs = set(peer.get("transports") or ())
    for t in TRANSPORTS:
        if t not in local or t not in theirs:
            continue
        if t == "ipc" and (peer.get("host_id") != local_host or not isinstance(peer.get("ipc"), dict)
                           or peer["ipc"].get("device_uuid") not in gpus or peer["ipc"].get("pid") == os.getpid()):
            continue  # (a process cannot open its own IPC handles: two engines of one process copy otherwise)
        return t
    raise TransferError(f"no KV transport in common: the source offers {sorted(theirs)} "
                        f"(host {str(peer.get('host_id'))[:8]}), this engine {list(local)} (host {local_host[:8]}); "
                        "IPC needs the same host, IPC namespace and a visible GPU; run both with --kv-transport "
                        "auto or the same transport")


def ipc_digest(descriptor: dict | None) -> str | None:
    """A short fingerprint of a CUDA IPC descriptor: registered with the control plane, so that a decode front
    refuses a migration whose handle is not the one its source exported."""
    if not descriptor:
        return None
    return hashlib.sha256(json.dumps(descriptor, sort_keys=True).encode()).hexdigest()[:32]
