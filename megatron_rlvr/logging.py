"""What a run reports: one readable line per step, metrics.jsonl, tensorboard, wandb, PNG plots.

Only rank 0 writes. `metrics.jsonl` is the source of truth (one JSON object per step or
evaluation, appended and flushed at once, so a killed run keeps every finished step); tensorboard
and wandb mirror it; the plots are drawn from it at the end.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

PLOTTED = ("reward/acc", "reward/mean", "response_length/mean", "entropy/mean",
           "tokens/kept_fraction", "loss/pg", "grad_norm", "rollout/logprob_mismatch_mean")


class MetricsLogger:
    def __init__(self, output_dir: str, *, enabled: bool, run_name: str, total_steps: int,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "",
                 wandb_mode: str = "offline", config: dict | None = None, resume: bool = False):
        self.enabled = enabled
        self.output_dir = output_dir
        self.total_steps = total_steps
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        self._t0 = time.time()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if wandb:
            os.environ.setdefault("WANDB_MODE", wandb_mode)
            import wandb as wb
            self._wandb = wb.init(project=wandb_project, name=run_name, config=config or {},
                                  dir=output_dir, mode=wandb_mode, resume="allow")

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines of steps after the checkpoint (they will be redone)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def line(self, step: int, m: dict[str, float]) -> None:
        """The one readable line per step."""
        if not self.enabled:
            return
        elapsed = time.time() - self._t0
        bar = _bar(step, self.total_steps)
        parts = [f"step {step}/{self.total_steps} {bar}",
                 f"acc {m.get('reward/acc', float('nan')):.3f}",
                 f"reward {m.get('reward/mean', float('nan')):+.3f}",
                 f"len {m.get('response_length/mean', float('nan')):.1f}",
                 f"H {m.get('entropy/mean', float('nan')):.3f}",
                 f"kept {m.get('tokens/kept_fraction', float('nan')):.2f}",
                 f"loss {m.get('loss/pg', float('nan')):+.4f}",
                 f"gnorm {m.get('grad_norm', float('nan')):.3f}",
                 f"{m.get('timing/step_s', 0.0):.1f}s/step",
                 f"elapsed {elapsed / 60:.1f}m"]
        print(" | ".join(parts), flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self, plots: bool = True) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if plots:
            plot_metrics(self.path, os.path.join(self.output_dir, "plots"))


def _bar(step: int, total: int, width: int = 20) -> str:
    done = int(width * step / max(total, 1))
    return "[" + "#" * done + "." * (width - done) + "]"


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """One PNG per main curve (and per validation metric) from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return []
    records = read_metrics(metrics_path)
    keys = [k for k in PLOTTED if any(k in r for r in records)]
    keys += sorted({k for r in records for k in r if k.startswith("val/")})
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, key.replace("/", "_").replace("@", "at") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
