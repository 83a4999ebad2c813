"""Train/inference mismatch correction (algos/rollout_correction.py) against hand-computed values,
and its config section (algorithm.rollout_correction). Expected numbers are written out or computed
with plain Python `math`, never with the module."""
import math
import threading

import pytest
import torch
import yaml

from megatron_rlvr.algos import rollout_correction as rc
from megatron_rlvr.algos.policy_loss import aggregate_loss
from megatron_rlvr.config import ConfigError, config_to_dict, load_config

NAN = float("nan")
# Three padded sequences [3, 5]; LOG_W = logp_old - logp_rollout at the response positions (MASK).
MASK = [[0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [1, 1, 0, 0, 0]]
LOG_W = [[None, 0.1, 1.0, -0.9, None],
         [None, None, -0.05, 0.02, 0.3],
         [0.8, -0.8, None, None, None]]
TOKENS = [lw for row in LOG_W for lw in row if lw is not None]  # the 8 response tokens


def _inputs():
    """old / rollout log-probs whose difference is LOG_W; NaN garbage outside the mask."""
    old = torch.full((3, 5), NAN)
    rollout = torch.full((3, 5), NAN)
    for i, row in enumerate(LOG_W):
        for j, lw in enumerate(row):
            if lw is not None:
                rollout[i, j] = -1.5 - 0.1 * j   # any value: only the difference matters
                old[i, j] = rollout[i, j] + lw
    return old, rollout, torch.tensor(MASK, dtype=torch.bool)


def _expect(weights_by_row, keep_by_row=None):
    """Hand weights per response token (row lists in MASK order) -> dense [3, 5] tensors."""
    w = torch.zeros(3, 5, dtype=torch.float64)
    keep = torch.zeros(3, 5, dtype=torch.bool)
    for i, row in enumerate(MASK):
        cols = [j for j, m in enumerate(row) if m]
        for k, j in enumerate(cols):
            kept = keep_by_row is None or keep_by_row[i][k]
            keep[i, j] = kept
            w[i, j] = weights_by_row[i][k] if kept else 0.0
    return w, keep


def _close(actual, expected, tol=1e-6):
    """Elementwise |a - e| <= tol * (1 + |e|) (torch.testing's first call costs seconds here)."""
    a, e = actual.double(), torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape and bool(((a - e).abs() <= tol * (1 + e.abs())).all()), (a, e)


def _k3_sum(log_ws):
    return sum(math.exp(x) - 1 - x for x in log_ws)


def _check(out, w, keep, *, clipped, masked):
    assert out.weights.dtype == torch.float32 and not out.weights.requires_grad
    assert torch.equal(out.mask, keep)
    _close(out.weights, w)
    m = out.metrics
    assert set(m) == set(rc.METRIC_KEYS)
    assert m["corr_tokens_count"].item() == 8
    assert m["corr_kept_count"].item() == 8 - masked
    assert m["corr_clipped_count"].item() == clipped
    assert m["corr_masked_count"].item() == masked
    assert m["corr_weight_sum"].item() == pytest.approx(float(w.sum()), rel=1e-6)
    assert m["corr_kl_sum"].item() == pytest.approx(_k3_sum(TOKENS), rel=1e-6)


E = math.exp


def test_token_truncate():
    old, roll, mask = _inputs()
    out = rc.compute_rollout_correction(old, roll, mask, level="token", method="truncate", cap=2.0)
    assert out.mask is not mask          # a new tensor: editing it leaves the response mask alone
    # e^1.0 = 2.718 and e^0.8 = 2.226 are capped at 2; e^-0.9, e^-0.8 stay (no lower bound)
    w, keep = _expect([[E(0.1), 2.0, E(-0.9)], [E(-0.05), E(0.02), E(0.3)], [2.0, E(-0.8)]])
    _check(out, w, keep, clipped=2, masked=0)
    assert out.seq_weights is None and out.seq_kept is None
    f = rc.finalize_metrics(out.metrics)
    assert f["rollout_corr/weight_mean"] == pytest.approx(
        (E(0.1) + 2 + E(-0.9) + E(-0.05) + E(0.02) + E(0.3) + 2 + E(-0.8)) / 8)
    assert f["rollout_corr/clipped_fraction"] == 2 / 8
    assert f["rollout_corr/masked_fraction"] == 0.0
    assert f["rollout_corr/kl"] == pytest.approx(_k3_sum(TOKENS) / 8)


def test_token_mask():
    out = rc.compute_rollout_correction(*_inputs(), level="token", method="mask", cap=2.0)
    # |log w| > log 2 = 0.693 is dropped: 1.0, -0.9, 0.8, -0.8; the rest keep their true weight
    w, keep = _expect([[E(0.1), 0, 0], [E(-0.05), E(0.02), E(0.3)], [0, 0]],
                      [[1, 0, 0], [1, 1, 1], [0, 0]])
    _check(out, w, keep, clipped=0, masked=4)
    f = rc.finalize_metrics(out.metrics)
    kept = E(0.1) + E(-0.05) + E(0.02) + E(0.3)
    assert f["rollout_corr/weight_mean"] == pytest.approx(kept / 4)
    assert f["rollout_corr/masked_fraction"] == 4 / 8


def test_bounds_are_inclusive():
    # log w exactly log C (and -log C): kept, not truncated
    old = torch.tensor([[math.log(2.0), -math.log(2.0), 0.0]], dtype=torch.float64)
    roll = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for method in ("truncate", "mask"):
        out = rc.compute_rollout_correction(old, roll, mask, method=method, cap=2.0)
        assert out.mask.all() and out.metrics["corr_clipped_count"].item() == 0
        _close(out.weights, [[2.0, 0.5, 1.0]])


# Per-sequence log-weight sums: 0.1 + 1.0 - 0.9 = 0.2;  -0.05 + 0.02 + 0.3 = 0.27;  0.8 - 0.8 = 0.
# cap 1.25 (log 1.25 = 0.2231): sequence 0 is inside, sequence 1 above, sequence 2 at weight 1.


def test_sequence_truncate():
    out = rc.compute_rollout_correction(*_inputs(), level="sequence", method="truncate", cap=1.25)
    w, keep = _expect([[E(0.2)] * 3, [1.25] * 3, [1.0] * 2])
    _check(out, w, keep, clipped=3, masked=0)          # clipped counts tokens: sequence 1's three
    _close(out.seq_weights, [E(0.2), 1.25, 1.0])
    assert out.seq_kept.tolist() == [True, True, True]


def test_sequence_mask():
    out = rc.compute_rollout_correction(*_inputs(), level="sequence", method="mask", cap=1.25)
    w, keep = _expect([[E(0.2)] * 3, [0] * 3, [1.0] * 2], [[1] * 3, [0] * 3, [1] * 2])
    _check(out, w, keep, clipped=0, masked=3)
    assert out.seq_kept.tolist() == [True, False, True]
    _close(out.seq_weights, [E(0.2), 0.0, 1.0])
    # the product, not the geometric mean: at cap 2 every sequence is inside (e^0.27 = 1.31)
    out = rc.compute_rollout_correction(*_inputs(), level="sequence", method="mask", cap=2.0)
    assert out.mask.equal(torch.tensor(MASK, dtype=torch.bool))


# Geometric means: 0.2 / 3 = 0.0667, 0.27 / 3 = 0.09, 0; cap 1.08 (log 1.08 = 0.0770).


def test_geometric_truncate_and_mask():
    out = rc.compute_rollout_correction(*_inputs(), level="geometric", method="truncate", cap=1.08)
    w, keep = _expect([[E(0.2 / 3)] * 3, [1.08] * 3, [1.0] * 2])
    _check(out, w, keep, clipped=3, masked=0)
    out = rc.compute_rollout_correction(*_inputs(), level="geometric", method="mask", cap=1.08)
    w, keep = _expect([[E(0.2 / 3)] * 3, [0] * 3, [1.0] * 2], [[1] * 3, [0] * 3, [1] * 2])
    _check(out, w, keep, clipped=0, masked=3)


def test_masked_tokens_leave_the_denominator():
    """The proposed use in the loss: token_loss * weights, aggregated over the returned mask."""
    old, roll, mask = _inputs()
    token_loss = torch.arange(15, dtype=torch.float32).view(3, 5) / 10  # loss of token (i, j)
    out = rc.compute_rollout_correction(old, roll, mask, level="token", method="mask", cap=2.0)
    loss = aggregate_loss(token_loss * out.weights, out.mask, "token-mean")
    # kept: (0,1) w e^0.1, (1,2) e^-0.05, (1,3) e^0.02, (1,4) e^0.3; divided by 4 tokens, not 8
    hand = (0.1 * E(0.1) + 0.7 * E(-0.05) + 0.8 * E(0.02) + 0.9 * E(0.3)) / 4
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    out = rc.compute_rollout_correction(old, roll, mask, level="sequence", method="mask", cap=1.25)
    loss = aggregate_loss(token_loss * out.weights, out.mask, "token-mean")
    hand = ((0.1 + 0.2 + 0.3) * E(0.2) + (1.0 + 1.1) * 1.0) / 5   # sequence 1 dropped: 5 tokens
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def _packed():
    """The same three sequences packed in one row [1, 11]: sequence 0 = padded row 0's first 4
    positions, sequence 1 = row 1's last 3, sequence 2 = row 2's first 2, then 2 pad positions."""
    old, roll, mask = _inputs()
    pieces = [(0, slice(0, 4)), (1, slice(2, 5)), (2, slice(0, 2))]
    cat = lambda t, pad: torch.cat([t[i, s] for i, s in pieces] + [pad]).unsqueeze(0)  # noqa: E731
    cu = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
    return (cat(old, torch.full((2,), NAN)), cat(roll, torch.full((2,), NAN)),
            cat(mask, torch.zeros(2, dtype=torch.bool)), cu, pieces)


@pytest.mark.parametrize("level", rc.LEVELS)
@pytest.mark.parametrize("method", rc.METHODS)
def test_packed_equals_padded(level, method):
    cap = {"token": 2.0, "sequence": 1.25, "geometric": 1.08}[level]
    padded = rc.compute_rollout_correction(*_inputs(), level=level, method=method, cap=cap)
    old, roll, mask, cu, pieces = _packed()
    ids = rc.seq_index_from_cu_seqlens(cu, 11)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # pad positions: one past the last
    packed = rc.compute_rollout_correction(old, roll, mask, level=level, method=method, cap=cap,
                                           seq_index=ids.view(1, -1), num_seqs=3)
    for name in ("weights", "mask"):
        a, b = getattr(padded, name), getattr(packed, name)
        expect = torch.cat([a[i, s] for i, s in pieces] + [b.new_zeros(2)])
        assert torch.equal(b[0], expect), name
    for k in rc.METRIC_KEYS:
        assert packed.metrics[k].item() == pytest.approx(padded.metrics[k].item(), rel=1e-12)
    # whatever the ids of positions outside the mask (batch.py gives trailing padding id 0)
    ids[9:] = 0
    again = rc.compute_rollout_correction(old, roll, mask, level=level, method=method, cap=cap,
                                          seq_index=ids.view(1, -1), num_seqs=3)
    assert torch.equal(again.weights, packed.weights) and torch.equal(again.mask, packed.mask)


class _FakeCPDist:
    """All-reduce (SUM) between threads standing for the ranks of one context-parallel group."""

    def __init__(self, size):
        self.size, self.slots = size, {}
        self.barrier = threading.Barrier(size, timeout=10)  # a failed peer: no hang
        self.calls = 0

    def get_world_size(self, group):
        return self.size

    def all_reduce(self, t, group=None):
        self.slots[threading.get_ident()] = t.clone()
        self.barrier.wait()
        total = sum(self.slots.values())
        self.barrier.wait()
        t.copy_(total)
        self.calls += 1


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("level", ["sequence", "geometric"])
def test_context_parallel_split_matches_whole(level, layout, monkeypatch):
    """Each sequence's tokens split over 2 CP ranks (by position, as the CP slicing does): each
    rank's weights equal the whole micro-batch's at its positions; metrics add up."""
    fake = _FakeCPDist(2)
    monkeypatch.setattr(rc, "dist", fake)
    cap = 1.25 if level == "sequence" else 1.08
    if layout == "padded":
        old, roll, mask = _inputs()
        ids, n, cols = None, None, [[0, 1, 4], [2, 3]]   # rank 0 / rank 1 positions of each row
    else:
        old, roll, mask, cu, _ = _packed()
        ids, n, cols = rc.seq_index_from_cu_seqlens(cu, 11).view(1, -1), 3, \
            [[0, 1, 2, 7, 8, 9], [3, 4, 5, 6, 10]]
    whole = rc.compute_rollout_correction(old, roll, mask, level=level, method="mask", cap=cap,
                                          seq_index=ids, num_seqs=n)
    assert whole.metrics["corr_masked_count"].item() == 3   # sequence 1 dropped
    results = [None, None]

    def rank(r):
        c = cols[r]
        results[r] = rc.compute_rollout_correction(
            old[:, c], roll[:, c], mask[:, c], level=level, method="mask", cap=cap,
            seq_index=None if ids is None else ids[:, c], num_seqs=n, cp_group=object())

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert fake.calls == 2
    for r, c in enumerate(cols):
        assert torch.equal(results[r].weights, whole.weights[:, c])
        assert torch.equal(results[r].mask, whole.mask[:, c])
        assert torch.equal(results[r].seq_kept, whole.seq_kept)
    for k in rc.METRIC_KEYS:
        assert results[0].metrics[k].item() + results[1].metrics[k].item() == \
            pytest.approx(whole.metrics[k].item(), rel=1e-12)


def test_token_level_needs_no_collective(monkeypatch):
    fake = _FakeCPDist(2)
    monkeypatch.setattr(rc, "dist", fake)
    rc.compute_rollout_correction(*_inputs(), level="token", cp_group=object())
    assert fake.calls == 0


@pytest.mark.parametrize("level", rc.LEVELS)
def test_stays_on_the_device_without_host_syncs(level):
    """On the meta device every op must run without data: no host tensors, no .item(), no
    data-dependent shapes; all outputs are on the inputs' device."""
    old, roll, mask, cu, _ = _packed()
    dev = torch.device("meta")
    ids = rc.seq_index_from_cu_seqlens(cu.to(dev), 11).view(1, -1)
    out = rc.compute_rollout_correction(old.to(dev), roll.to(dev), mask.to(dev), level=level,
                                        method="mask", seq_index=ids, num_seqs=3)
    tensors = [out.weights, out.mask, *out.metrics.values()]
    if level != "token":
        tensors += [out.seq_weights, out.seq_kept]
    assert all(t.device == dev for t in tensors)


def test_weights_are_detached():
    old, roll, mask = _inputs()
    old.requires_grad_(True)
    for level in rc.LEVELS:
        out = rc.compute_rollout_correction(old, roll, mask, level=level)
        assert not out.weights.requires_grad
        assert not any(v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(cap=1.0), "cap must be a finite number > 1"),
    (dict(cap=0.5), "cap must be a finite number > 1"),
    (dict(cap=float("inf")), "cap must be a finite number > 1"),
    (dict(cap=float("nan")), "cap must be a finite number > 1"),
    (dict(cap=True), "cap must be a finite number > 1"),
    (dict(level="seq"), "level must be one of token, sequence, geometric, got 'seq'"),
    (dict(method="clip"), "method must be one of truncate, mask, got 'clip'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        rc.compute_rollout_correction(*_inputs(), **kwargs)


def test_bad_shapes():
    old, roll, mask = _inputs()
    with pytest.raises(ValueError, match="must have the same shape"):
        rc.compute_rollout_correction(old, roll[:, :4], mask)
    flat = [t.reshape(-1) for t in (old, roll, mask)]
    with pytest.raises(ValueError, match="needs seq_index and num_seqs"):
        rc.compute_rollout_correction(*flat, level="sequence")
    rc.compute_rollout_correction(*flat, level="token")            # token level: no ids needed
    ids = torch.zeros(15, dtype=torch.long)
    with pytest.raises(ValueError, match="needs num_seqs >= 1"):
        rc.compute_rollout_correction(*flat, level="sequence", seq_index=ids)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        rc.compute_rollout_correction(*flat, level="sequence", seq_index=ids.float(), num_seqs=1)
    with pytest.raises(ValueError, match=r"seq_index \(3, 5\) must have the shape"):
        rc.compute_rollout_correction(*flat, level="sequence", seq_index=ids.view(3, 5), num_seqs=1)
    with pytest.raises(ValueError, match="num_seqs 2 != 3 rows"):
        rc.compute_rollout_correction(old, roll, mask, level="sequence", num_seqs=2)


def test_finalize_metrics_of_nothing():
    zeros = {k: 0.0 for k in rc.METRIC_KEYS}
    assert rc.finalize_metrics(zeros) == {"rollout_corr/weight_mean": 0.0,
                                          "rollout_corr/clipped_fraction": 0.0,
                                          "rollout_corr/masked_fraction": 0.0,
                                          "rollout_corr/kl": 0.0}


# --------------------------------------------------------------------------- config

REQUIRED = ["model.hf_dir=/m", "data.train_files=[/t.parquet]", "eval.every_n_steps=0",
            "eval.at_start=false"]


def test_config_defaults_and_auto_resolution():
    c = load_config(None, REQUIRED).algorithm.rollout_correction
    assert (c.enabled, c.level, c.method, c.cap) == ("auto", "token", "truncate", 2.0)
    assert c.active(off_policy=False) is False and c.active(off_policy=True) is True
    c.enabled = False
    assert c.active(off_policy=True) is False
    c.enabled = True
    assert c.active(off_policy=False) is True


def test_config_yaml_and_dotted_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  clip_ratio_high: 0.28\n  rollout_correction:\n"
                    "    enabled: on\n    level: sequence\n    method: mask\n    cap: 5\n")
    c = load_config(str(path), [*REQUIRED, "algorithm.rollout_correction.cap=3"])
    rcfg = c.algorithm.rollout_correction
    assert (rcfg.enabled, rcfg.level, rcfg.method, rcfg.cap) == (True, "sequence", "mask", 3.0)
    assert isinstance(rcfg.cap, float) and c.algorithm.clip_ratio_high == 0.28
    c2 = load_config(None, [*REQUIRED, "algorithm.rollout_correction.enabled=auto",
                            "algorithm.rollout_correction.level=geometric"])
    assert c2.algorithm.rollout_correction.enabled == "auto"
    assert c2.algorithm.rollout_correction.level == "geometric"
    # round trip through the saved YAML
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(config_to_dict(c)))
    assert load_config(str(saved), []) == c


@pytest.mark.parametrize("override, message", [
    ("algorithm.rollout_correction.capp=3",
     "unknown field algorithm.rollout_correction.capp; did you mean 'cap'?"),
    ("algorithm.rollout_corection.cap=3",
     "bad override 'algorithm.rollout_corection.cap=3': algorithm.rollout_corection is not a "
     "group"),
    ("algorithm.clip_ratio_c.cap=3", "algorithm.clip_ratio_c is not a group of fields"),
    ("algorithm.rollout_correction.cap=1", "algorithm.rollout_correction.cap must be > 1"),
    ("algorithm.rollout_correction.cap=.inf", "algorithm.rollout_correction.cap: must be a finite"),
    ("algorithm.rollout_correction.level=seq",
     "algorithm.rollout_correction.level: 'seq' is not one of 'token' | 'sequence' | 'geometric'"),
    ("algorithm.rollout_correction.enabled=maybe",
     "algorithm.rollout_correction.enabled: expected bool | 'auto', got str 'maybe'"),
    ("algorithm.rollout_correction=3",
     "algorithm.rollout_correction: expected a mapping of fields, got int"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*REQUIRED, override])
    assert message in str(e.value)


def test_config_yaml_typo_in_group(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  rollout_corection:\n    cap: 3\n")
    with pytest.raises(ConfigError, match="unknown field algorithm.rollout_corection; did you "
                                          "mean 'rollout_correction'"):
        load_config(str(path), REQUIRED)
    path.write_text("algorithm:\n  rollout_correction:\n    methd: mask\n")
    with pytest.raises(ConfigError, match="unknown field algorithm.rollout_correction.methd; "
                                          "did you mean 'method'"):
        load_config(str(path), REQUIRED)


# ----------------------------------------------------------------------------- in the loss
# The loss the trainer calls (`dapo_loss`) with the correction on, against a float64 formula:
# per-token PPO loss x the importance weight, dropped tokens/sequences out of numerator and count.

@pytest.fixture(scope="module")
def one_rank():
    from megatron_rlvr.parallel import destroy_distributed, init_distributed
    init_distributed()
    yield
    destroy_distributed()


@pytest.mark.parametrize("level,method,mode", [
    ("token", "truncate", "token-mean"), ("token", "mask", "token-mean"),
    ("sequence", "mask", "token-mean"), ("sequence", "mask", "seq-mean-token-mean"),
    ("geometric", "truncate", "seq-mean-token-sum")])
def test_dapo_loss_applies_the_correction(one_rank, level, method, mode):
    from dapo_reference import C, EPS_HIGH, EPS_LOW, N, T, make_inputs, reference_stats, token_loss
    from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss

    cap = 1.5
    inp = make_inputs(0)
    mask = inp["response_mask"]
    s = LossSettings(temperature=T, clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH,
                     clip_ratio_c=C, loss_agg_mode=mode, ratio=1.0, scope="global",
                     norm="kept_tokens", select="top", correction=(level, method, cap))
    mb = {"labels": inp["labels"], "response_mask": mask, "advantages": inp["advantages"],
          "old_logprobs_local": inp["old_logprobs"], "rollout_logprobs": inp["rollout_logprobs"]}
    num, den, logs = dapo_loss(mb, inp["logits"], s)
    got = (num / den).item()

    # Reference, float64, written from the definitions.
    logp, _ = reference_stats(inp["logits"], inp["labels"])
    pg = token_loss(logp, inp["old_logprobs"].double(), inp["advantages"].double())
    log_w = (inp["old_logprobs"].double() - inp["rollout_logprobs"].double()) * mask
    if level == "token":
        w = log_w.exp()
    else:
        per_seq = log_w.sum(-1) if level == "sequence" else log_w.sum(-1) / mask.sum(-1)
        w = per_seq.exp()[:, None].expand_as(log_w)
    if method == "truncate":
        keep, weight = mask, torch.clamp(w, max=cap)
    else:
        keep, weight = mask & (w >= 1 / cap) & (w <= cap), w
    assert 0 < int(keep.sum()) < int(mask.sum()) or method == "truncate"
    kept = pg * weight * keep
    if mode == "token-mean":
        want = kept.sum() / keep.sum()
    else:
        alive = keep.any(-1) if method == "mask" and level != "token" else torch.ones(N, dtype=bool)
        per_seq = kept.sum(-1) if mode == "seq-mean-token-sum" \
            else kept.sum(-1) / keep.sum(-1).clamp(min=1)
        want = per_seq.sum() / alive.sum()
    assert got == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    # The metrics the trainer reports, from the same definitions.
    assert logs["corr_tokens_count"].item() == mask.sum().item()
    assert logs["corr_kept_count"].item() == keep.sum().item()
    if method == "truncate":
        assert logs["corr_clipped_count"].item() == ((w > cap) & mask).sum().item()
