"""Disaggregated rollout: vLLM engines as Ray actors, driven by the trainer's rank 0.

Each `EngineActor` holds one `VLLMEngine` (vllm_tp GPUs, or one CPU) in its own process, in a
placement group bundle of its own. It runs one call at a time, so a weight load never interleaves
with a generation: a sync waits for the round in flight, then the next round uses the new weights
(the engine "pauses" for the load). Weights arrive over `weight_stream` (a process group between
rank 0 and the engines), never through Ray's object store. Each engine records the policy version
it holds and returns it with every generation.

Faults: every call has a deadline (`timeout_s`); an engine that died or does not answer ends in a
`RolloutError` naming it (index, Ray actor id, node, pid). `shutdown` kills the actors and stops a
Ray that the fleet started; it is idempotent and also runs at exit.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from megatron_rlvr import ray_cluster

from .base import RolloutError, RolloutOutput, SamplingParams, WeightSyncStats
from .vllm_engine import VLLMEngineConfig
from .weight_stream import WeightSender


class EngineActorImpl:
    """The body of an engine actor (wrapped by `ray.remote` in `RolloutFleet`)."""

    def __init__(self, config: VLLMEngineConfig, threads: int):
        ray_cluster.clean_worker_env()
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        from .vllm_engine import VLLMEngine

        self.engine = VLLMEngine(config)
        self.version = 0  # the checkpoint it was built from
        self.receiver = None

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> tuple[RolloutOutput, int]:
        return self.engine.generate(prompts, params), self.version

    def join_weights(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        from .weight_stream import WeightReceiver

        self.receiver = WeightReceiver(host, port, rank, world, timeout_s=timeout_s)

    def load_weights(self, version: int) -> WeightSyncStats:
        self.engine.wake_up(tags=["weights"])
        stats = self.engine.update_weights(self.receiver.receive())
        self.engine.wake_up(tags=["kv_cache"])
        self.version = version
        return stats

    def get_version(self) -> int:
        return self.version

    def shutdown(self) -> None:
        self.engine.shutdown()


@dataclass
class FleetConfig:
    engine: VLLMEngineConfig          # each engine's settings (tensor_parallel_size = vllm_tp)
    engines: int = 1
    vllm_tp: int = 1
    ray_address: str = ""             # "" = start a local Ray; else join it ("auto", host:port)
    cpus_per_engine: float = 1.0
    timeout_s: float = 1800.0         # deadline of any call (a generation round, a weight load)
    extra_cpus: float = 0.0           # other actors' CPUs a local Ray must also hold (rewards)


class RolloutFleet:
    """The engines, seen from trainer rank 0. `generate` and `sync_weights` may be called from
    different threads (the producer generates while the trainer syncs); the engines order them."""

    def __init__(self, cfg: FleetConfig):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        self._lock = threading.Lock()
        self._closed = False
        self._remove_pg = remove_placement_group
        on_gpu = torch.cuda.is_available()
        ray_cluster.acquire(cfg.ray_address,
                            num_cpus=cfg.engines * cfg.cpus_per_engine + cfg.extra_cpus)
        bundle = {"GPU": cfg.vllm_tp, "CPU": cfg.cpus_per_engine} if on_gpu \
            else {"CPU": cfg.cpus_per_engine}
        self._pg = placement_group([dict(bundle) for _ in range(cfg.engines)], strategy="PACK")
        atexit.register(self.shutdown)
        try:
            ray.get(self._pg.ready(), timeout=cfg.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RolloutError(f"Ray could not place {cfg.engines} rollout engine(s) of {bundle} "
                               f"within {cfg.timeout_s:.0f} s; cluster resources: "
                               f"{ray.cluster_resources()}") from None
        actor_cls = ray.remote(EngineActorImpl)
        engine_cfg = dataclasses.replace(cfg.engine, tensor_parallel_size=cfg.vllm_tp)
        threads = max(1, int(cfg.cpus_per_engine))
        self.actors = [actor_cls.options(
            num_cpus=cfg.cpus_per_engine, num_gpus=cfg.vllm_tp if on_gpu else 0,
            max_concurrency=1, max_restarts=0, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=i),
        ).remote(engine_cfg, threads) for i in range(cfg.engines)]
        self._where = [f"Ray actor {a._actor_id.hex()}" for a in self.actors]
        infos = self._get([a.info.remote() for a in self.actors], "starting")
        self._where = [f"Ray actor {a._actor_id.hex()}, node {i['node']}, pid {i['pid']}"
                       for a, i in zip(self.actors, infos)]
        # The weight stream: rank 0 of 1 + engines. Joins first, so the rendezvous can complete.
        self.sender = WeightSender(cfg.engines, timeout_s=cfg.timeout_s)
        joins = [a.join_weights.remote(self.sender.host, self.sender.port, i + 1,
                                       cfg.engines + 1, cfg.timeout_s)
                 for i, a in enumerate(self.actors)]
        self.sender.connect()
        self._get(joins, "joining the weight stream")

    @property
    def num_engines(self) -> int:
        return len(self.actors)

    def _name(self, i: int) -> str:
        return f"rollout engine {i} of {len(self.actors)} ({self._where[i]})"

    def _get(self, refs: list, doing: str) -> list:
        """ray.get with the fleet's deadline; a dead or silent engine is named."""
        import ray

        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.cfg.timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise RolloutError(f"{self._name(i)} did not answer within "
                                   f"{self.cfg.timeout_s:.0f} s while {doing} "
                                   "(trainer.collective_timeout_s)") from None
            except ray.exceptions.RayActorError as e:
                raise RolloutError(f"{self._name(i)} died while {doing}: "
                                   f"{str(e).splitlines()[0]}") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise RolloutError(f"{self._name(i)} failed while {doing}: "
                                   f"{type(cause).__name__}: {cause}") from None
        return out

    def generate(self, prompts_per_engine: list[list[list[int]]],
                 params_per_engine: list[SamplingParams]) -> list[tuple[RolloutOutput, int]]:
        """Every engine generates its prompts at once; (output, weight version) per engine."""
        if self._closed:
            raise RolloutError("the rollout fleet is shut down")
        refs = [a.generate.remote(p, sp) for a, p, sp
                in zip(self.actors, prompts_per_engine, params_per_engine)]
        return self._get(refs, "generating")

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int,
                     bucket_mb: float) -> WeightSyncStats:
        """Stream the weights to every engine; they load them after the call they are in."""
        with self._lock:
            loads = [a.load_weights.remote(version) for a in self.actors]
            try:
                stats = self.sender.send(named_tensors, bucket_mb=bucket_mb)
            except Exception as e:
                # Name the engine that made the stream fail, if one died.
                self._get(loads, "loading weights")
                raise e
            self._get(loads, "loading weights")
            return stats

    def versions(self) -> list[int]:
        return self._get([a.get_version.remote() for a in self.actors], "reporting its version")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray

        if ray.is_initialized():
            for a in getattr(self, "actors", []):
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            try:
                self._remove_pg(self._pg)
            except Exception:  # noqa: BLE001
                pass
        if getattr(self, "sender", None) is not None:
            self.sender.close()
        ray_cluster.release()
