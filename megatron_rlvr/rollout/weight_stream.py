"""Trainer -> rollout engines: the weights as a stream of broadcasts over a standalone group.

The trainer's rank 0 and the disaggregated engines (Ray actors, in other processes and possibly on
other nodes) form a process group of their own: a `TCPStore` on rank 0's node and a
`ProcessGroupGloo` (CPU) or `ProcessGroupNCCL` (GPU) over it, independent of torch.distributed's
default group, so a torchrun rank holds both. No weight goes through Ray's object store or a disk.

A stream is self-describing, so the sender can pass tensors on as the trainer gathers them
without a manifest agreed beforehand, and never holds more than a bucket:

    header  int64 [meta_bytes, data_bytes]          ([0, 0] ends the stream)
    meta    uint8 JSON: [[name, dtype, shape, offset, nbytes], ...]
    data    uint8, the bucket's tensors' bytes back to back

Each piece is one broadcast from rank 0. Only the gloo path runs in this project's tests (CPU);
the NCCL path is written for GPUs (device buffers, the same protocol) and not tested here. Across
nodes gloo binds the address the hostname resolves to: where that is a loopback address (Debian's
127.0.1.1), set GLOO_SOCKET_IFNAME on both sides, as for torchrun's own gloo groups.
"""
from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from .base import WeightSyncError, WeightSyncStats

_PREFIX = "megatron_rlvr_weights"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                               torch.bool)}


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def node_address() -> str:
    """An address of this node that other nodes can reach (the one routing outwards)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: only picks the interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _group(store, rank: int, world: int, timeout_s: float, backend: str):
    prefixed = dist.PrefixStore(_PREFIX, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world, timedelta(seconds=timeout_s))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(prefixed, rank, world, opts)
    raise ValueError(f"weight stream backend must be 'gloo' or 'nccl', got {backend!r}")


class _Endpoint:
    def __init__(self, host: str, port: int, world_size: int, timeout_s: float, backend: str):
        self.host, self.port, self.world_size = host, port, world_size
        self.timeout_s, self.backend = timeout_s, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if backend == "nccl" else torch.device("cpu")
        self.pg = None

    def _where(self) -> str:
        return f"weight stream group {self.host}:{self.port} ({self.world_size} members)"

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        try:
            self.pg.broadcast(tensor, 0).wait()
        except Exception as e:  # gloo/NCCL errors say nothing of which group or stream
            raise WeightSyncError(f"{self._where()}: broadcast of the {what} failed (a member "
                                  f"died or stopped answering within {self.timeout_s:.0f} s): "
                                  f"{e}") from e

    def close(self) -> None:
        self.pg = None


class WeightSender(_Endpoint):
    """Rank 0: hosts the store; `connect` once, then `send` after every training step."""

    def __init__(self, num_receivers: int, *, timeout_s: float, host: str | None = None,
                 port: int = 0, backend: str | None = None):
        host = host or node_address()
        self._store = dist.TCPStore(host, port, num_receivers + 1, is_master=True,
                                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        super().__init__(host, self._store.port, num_receivers + 1, timeout_s,
                         backend or default_backend())

    def connect(self) -> None:
        """Returns once every receiver has joined (they join from their own processes)."""
        try:
            self.pg = _group(self._store, 0, self.world_size, self.timeout_s, self.backend)
        except Exception as e:
            raise WeightSyncError(f"{self._where()}: not every engine joined within "
                                  f"{self.timeout_s:.0f} s: {e}") from e
        # NCCL's constructor does no rendezvous: a first broadcast proves every member is there.
        self._broadcast(torch.ones(1, device=self.device), "greeting")

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
             bucket_mb: float) -> WeightSyncStats:
        if self.pg is None:
            raise WeightSyncError(f"{self._where()}: send before connect")
        start = time.perf_counter()
        stats = WeightSyncStats()
        limit = max(1, int(bucket_mb * 2**20))
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in named_tensors:
            if str(tensor.dtype) not in _DTYPES:
                raise WeightSyncError(f"{self._where()}: tensor {name!r} has dtype "
                                      f"{tensor.dtype}, which the stream does not carry "
                                      f"({sorted(_DTYPES)})")
            bucket.append((name, tensor.detach()))
            size += tensor.numel() * tensor.element_size()
            stats.tensors += 1
            if size >= limit:
                stats.bytes += self._send_bucket(bucket)
                stats.buckets += 1
                bucket, size = [], 0
        if bucket:
            stats.bytes += self._send_bucket(bucket)
            stats.buckets += 1
        self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device), "end marker")
        stats.seconds = time.perf_counter() - start
        return stats

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        meta, parts, offset = [], [], 0
        for name, t in bucket:
            raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else \
                torch.empty(0, dtype=torch.uint8, device=t.device)
            meta.append([name, str(t.dtype), list(t.shape), offset, raw.numel()])
            parts.append(raw.to(self.device))
            pad = -raw.numel() % 8  # every tensor starts 8-byte aligned, so it can be viewed
            if pad:
                parts.append(torch.zeros(pad, dtype=torch.uint8, device=self.device))
            offset += raw.numel() + pad
        meta_bytes = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        self._broadcast(torch.tensor([meta_bytes.numel(), data.numel()], dtype=torch.int64,
                                     device=self.device), "bucket header")
        self._broadcast(meta_bytes.to(self.device), "bucket names")
        if data.numel():
            self._broadcast(data.to(self.device), "bucket data")
        return sum(m[4] for m in meta)


class WeightReceiver(_Endpoint):
    """An engine's end: joins the group (blocks until everyone has), then `receive` per send."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, timeout_s: float,
                 backend: str | None = None):
        super().__init__(host, port, world_size, timeout_s, backend or default_backend())
        try:
            store = dist.TCPStore(host, port, world_size, is_master=False,
                                  timeout=timedelta(seconds=timeout_s))
            self.pg = _group(store, rank, world_size, timeout_s, self.backend)
        except Exception as e:
            raise WeightSyncError(f"{self._where()}: rank {rank} could not join: {e}") from e
        self._broadcast(torch.zeros(1, device=self.device), "greeting")

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one `send`, in order, with their names, dtypes and shapes."""
        while True:
            header = torch.zeros(2, dtype=torch.int64, device=self.device)
            self._broadcast(header, "bucket header")
            meta_bytes, data_bytes = (int(x) for x in header.tolist())
            if meta_bytes == 0:
                return
            meta = torch.empty(meta_bytes, dtype=torch.uint8, device=self.device)
            self._broadcast(meta, "bucket names")
            data = torch.empty(data_bytes, dtype=torch.uint8, device=self.device)
            if data_bytes:
                self._broadcast(data, "bucket data")
            for name, dtype, shape, offset, nbytes in json.loads(meta.cpu().numpy().tobytes()):
                raw = data[offset:offset + nbytes]
                yield name, raw.view(_DTYPES[dtype]).reshape(shape)
