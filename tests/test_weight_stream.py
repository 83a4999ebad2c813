"""The weight stream (megatron_rlvr/rollout/weight_stream.py) between real processes over gloo:
what arrives is what was sent, bit for bit, in order, on every receiver, send after send; a member
that never joins or dies mid-stream ends in a WeightSyncError, never a hang."""
import multiprocessing as mp
import os
import time

import pytest
import torch

from megatron_rlvr.rollout.base import WeightSyncError
from megatron_rlvr.rollout.weight_stream import WeightReceiver, WeightSender

pytestmark = pytest.mark.slow


def _tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [("layer.0.w", torch.randn(3, 5, generator=g)),                 # 60 B
            ("layer.0.b", torch.randn(7, generator=g).to(torch.bfloat16)),  # 14 B
            ("mask", torch.tensor([True, False, True])),                    # 3 B
            ("scale", torch.tensor(3.5, dtype=torch.float64)),              # 8 B, 0-dim
            ("ids", torch.arange(10)),                                      # 80 B
            ("big", torch.randn(64, 64, generator=g))]                      # 16384 B


def _receive(host, port, rank, world, sends, queue, die_after_buckets=None):
    receiver = WeightReceiver(host, port, rank, world, timeout_s=10)
    for _ in range(sends):
        got = []
        for name, t in receiver.receive():
            got.append((name, t.dtype, tuple(t.shape), t.clone().view(-1).view(torch.uint8)
                        .tolist() if t.numel() else []))
            if die_after_buckets is not None and len(got) >= die_after_buckets:
                os._exit(0)
        queue.put(got)


def _expected(seed):
    return [(n, t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).tolist())
            for n, t in _tensors(seed)]


def test_stream_arrives_bit_exact_on_every_receiver_send_after_send():
    ctx = mp.get_context("spawn")
    sender = WeightSender(2, timeout_s=30, host="127.0.0.1")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receive, args=(sender.host, sender.port, r, 3, 2, queue))
             for r in (1, 2)]
    for p in procs:
        p.start()
    sender.connect()
    # 100 bytes a bucket: the first five tensors (165 B) close one bucket at `ids`, `big` goes
    # alone, so both a shared bucket and a flush mid-stream happen.
    stats = [sender.send(_tensors(seed), bucket_mb=100 / 2**20) for seed in (0, 1)]
    received = [queue.get(timeout=60) for _ in range(4)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for s in stats:
        assert (s.tensors, s.buckets, s.bytes) == (6, 2, 60 + 14 + 3 + 8 + 80 + 16384)
    for seed in (0, 1):  # each receiver got send 0 then send 1
        assert _expected(seed) in received
    assert sorted(map(str, received)) == sorted(map(str, [_expected(0), _expected(1)] * 2))
    assert received[0][1][1] == torch.bfloat16 and received[0][3][2] == ()


def test_a_receiver_that_never_joins_fails_connect():
    sender = WeightSender(1, timeout_s=3, host="127.0.0.1")
    start = time.time()
    with pytest.raises(WeightSyncError, match=r"weight stream group 127\.0\.0\.1:\d+ \(2 members"):
        sender.connect()
    assert time.time() - start < 30


def test_a_receiver_dying_mid_stream_fails_send():
    ctx = mp.get_context("spawn")
    sender = WeightSender(1, timeout_s=10, host="127.0.0.1")
    queue = ctx.Queue()  # kept alive until the child has unpickled it
    proc = ctx.Process(target=_receive, args=(sender.host, sender.port, 1, 2, 1, queue, 2))
    proc.start()
    sender.connect()
    big = [(f"t{i}", torch.randn(256, 256)) for i in range(40)]  # 40 buckets of 256 KiB
    start = time.time()
    with pytest.raises(WeightSyncError, match="broadcast of the bucket"):
        sender.send(iter(big), bucket_mb=0.25)
    assert time.time() - start < 60
    proc.join(10)
