"""Metrics: console progress bar, ``metrics.jsonl`` (one object per optimizer step, flushed line
by line so the file is valid JSONL from the first step), TensorBoard and W&B when enabled, and a
loss-curve PNG at the end. Only rank 0 logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import Config, ConfigError


def check_tracing(cfg: Config) -> None:
    """``tracing.use_tensorboard`` / ``use_wandb`` need their packages: say so before training."""
    import importlib.util

    for key, package, extra in (("use_tensorboard", "tensorboard", "tensorboard"), ("use_wandb", "wandb", "wandb")):
        if getattr(cfg.tracing, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracing.{key} is true but the '{package}' package is not installed: "
                              f"pip install 'kdtrain[{extra}]' (or set tracing.{key}=false).")


class MetricsWriteError(OSError):
    """A metrics file or the loss plot could not be written (a full disk, a permission)."""


def _write_error(path, e: OSError) -> MetricsWriteError:
    return MetricsWriteError(e.errno, f"cannot write {path} ({e.strerror or e}); free disk space or fix the "
                             "permissions, then resume with --resume")


def _truncate_after(path: Path, step: int) -> None:
    """Keep the rows of steps <= ``step`` (rewritten atomically); a torn last line is dropped too."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
    tmp.replace(path)


class Metrics:
    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True):
        t = cfg.tracing
        self.enabled = enabled
        self.run_dir = run_dir
        self.log_dir = Path(t.log_dir) if t.log_dir else run_dir / "logs"
        self.history: list[dict] = []
        self.bar = self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        if t.console_log:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if t.json_log:
            path = self.jsonl_path = run_dir / "metrics.jsonl"
            try:
                if start_step and path.is_file():  # steps after the starting one are trained again: drop their rows
                    _truncate_after(path, start_step)
                self.jsonl = open(path, "a" if start_step else "w", encoding="utf-8")
            except OSError as e:
                raise _write_error(path, e) from None
        if t.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if t.use_wandb:
            import wandb

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=t.wandb_project, dir=str(self.log_dir), config=cfg.to_dict())

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.history.append(row)
        if self.jsonl:
            try:
                self.jsonl.write(json.dumps(row) + "\n")
                self.jsonl.flush()
            except OSError as e:
                raise _write_error(self.jsonl_path, e) from None
        step = row["step"]
        if self.tb:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("val_", "val/") if key.startswith("val_") else f"train/{key}",
                                       value, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self.bar:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{row['total']:.4f}", lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
        if self.jsonl:
            try:
                self.jsonl.close()
            except OSError:  # already reported by log(); the buffer has nowhere to go
                pass
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.history:
            path = self.run_dir / "loss_curve.png"
            try:
                plot_losses(self.history, path)
            except OSError as e:
                raise _write_error(path, e) from None


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in ("total", "kl_div", "ce_teacher", "ce_ground_truth"):
        ys = [r.get(key, math.nan) for r in rows]
        if any(y for y in ys):
            ax.plot(steps, ys, label=key, linewidth=2 if key == "total" else 1)
    val = [(r["step"], r["val_total"]) for r in rows if "val_total" in r]
    if val:
        ax.plot(*zip(*val), "o--", label="val total")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
