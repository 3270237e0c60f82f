"""Time `kdtrain train` on the toy config, after import: 50 optimizer steps on the CPU.

    python bench/toy_train_time.py [--steps 50]

Builds the toy artifacts in a temporary directory, then times (a) Trainer construction and
(b) `fit()` separately, so the figure is the training loop itself, not Python's imports.
It also checks that the per-step cost does not grow with the dataset size (10 vs 1000 samples).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def run(toy_dir: Path, steps: int, samples: int) -> tuple[float, float, float]:
    from kdtrain.config import load_config
    from kdtrain.toy import make_toy
    from kdtrain.trainer import Trainer

    paths = make_toy(toy_dir / f"toy{samples}", samples=samples)
    cfg, _ = load_config([paths["config"]], [f"io.output_dir={toy_dir / f'run{samples}'}", f"train.steps={steps}",
                                             "tracing.console_log=false", "io.val_shards=[]"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    t1 = time.perf_counter()
    rows = trainer.fit()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, rows[-1]["total"] / rows[0]["total"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    t0 = time.perf_counter()
    import kdtrain.trainer  # noqa: F401  (the import is not part of the figure)
    print(f"import kdtrain.trainer: {time.perf_counter() - t0:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for samples in (10, 1000):
            setup, fit, ratio = run(Path(tmp), a.steps, samples)
            print(f"{samples:5d} samples: setup {setup:.2f} s, {a.steps} steps {fit:.2f} s "
                  f"({1000 * fit / a.steps:.1f} ms/step incl. final checkpoint + plot), last/first loss {ratio:.2f}")


if __name__ == "__main__":
    main()
