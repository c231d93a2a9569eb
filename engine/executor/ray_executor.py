"""`ray`: ranks 1..N-1 as Ray actors on an existing Ray cluster (`--ray-address`; none: the one this node
belongs to, or a local one). A placement group holds one bundle per rank (a GPU each, a CPU on CPU engines),
packed onto as few nodes as possible; bundle 0 is pinned to this node and held for rank 0, which runs in the
engine-core process. Ray places and starts the actors; each step still travels over rank 0's channel (TCP on
this node's address), and the ranks' collectives over their own process group. Every node needs this package
installed and the model at the same path."""
from __future__ import annotations

import logging
import os

from engine.executor.distributed import DistributedExecutor

log = logging.getLogger(__name__)
PLACEMENT_TIMEOUT_S = 120.0


class _RankActor:
    """The process of one rank > 0: runs the worker loop until rank 0 sends `shutdown`."""

    def run(self, log_level: int, channel_secret: str, *args) -> int:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from engine.executor.worker_main import run_worker
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU: it is device 0 here
        return run_worker(*args, device_index=0, channel_secret=channel_secret)


class _Holder:
    """Holds bundle 0 (rank 0's GPU) so that Ray gives it to nothing else; says which GPU it is."""

    def gpu_ids(self) -> list:
        import ray
        return ray.get_gpu_ids()


class RayExecutor(DistributedExecutor):
    def driver_host(self) -> str:
        """This node's address as the cluster knows it (its `node:<ip>` resource pins rank 0's bundle)."""
        import ray
        if not ray.is_initialized():
            ray.init(address=self.config.ray_address, log_to_driver=True, include_dashboard=False,
                     configure_logging=False)
        node_id = ray.get_runtime_context().get_node_id()
        return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)

    def channel_address(self, host: str) -> str:
        return f"tcp://{host}:*"

    def _resource(self) -> str:
        return "CPU" if self.config.device == "cpu" else "GPU"

    def start_workers(self, rendezvous: str, channel_address: str) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        host, res = rendezvous.rsplit(":", 1)[0], self._resource()
        bundles = [{res: 1.0, f"node:{host}": 0.001}] + [{res: 1.0} for _ in range(1, self.world_size)]
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the Ray cluster cannot place {self.world_size} bundles of one {res} each "
                               f"(resources: {ray.cluster_resources()})") from None
        strategy = lambda i: PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
        opts = {"num_gpus": 1} if res == "GPU" else {"num_cpus": 1}
        self.holder = None
        if res == "GPU":
            self.holder = ray.remote(_Holder).options(scheduling_strategy=strategy(0), **opts).remote()
        actor_cls = ray.remote(_RankActor)
        self.actors = [actor_cls.options(scheduling_strategy=strategy(r), name=None, **opts).remote()
                       for r in range(1, self.world_size)]
        level = logging.getLogger().getEffectiveLevel()
        self.runs = [a.run.remote(level, self.channel_secret, self.config, str(self._model_path),
                                  self._max_model_len, r, self.world_size, rendezvous, channel_address)
                     for r, a in enumerate(self.actors, start=1)]

    def driver_device_index(self) -> int | None:
        if self.holder is None:
            return None
        import ray
        ids = ray.get(self.holder.gpu_ids.remote())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        # Ray's ids are the node's device numbers; map into this process's visible set
        return visible.split(",").index(str(ids[0])) if visible else int(ids[0])

    def wait_for_worker_exit(self) -> str | None:
        import ray
        done, _ = ray.wait(self.runs, num_returns=1)
        if self._stopping:
            return None
        rank = self.runs.index(done[0]) + 1
        try:
            code = ray.get(done[0])
            why = f"exited with code {code}"
        except Exception as e:  # RayActorError when the actor process died
            why = f"died: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return f"worker rank {rank} (Ray actor) {why}; the engine cannot continue without it"

    def stop_workers(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        for actor in getattr(self, "actors", []) + ([self.holder] if getattr(self, "holder", None) else []):
            ray.kill(actor)
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
