"""Time `pytest -m smoke` against the bare `import torch; from transformers import LlamaForCausalLM`.

Goal: the smoke suite takes at most 3x that import, measured in the same run.
    python bench/smoke_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    imp, smoke = [], []
    for _ in range(a.repeat):
        imp.append(timed([sys.executable, "-c", "import torch; from transformers import LlamaForCausalLM"]))
        smoke.append(timed([sys.executable, "-m", "pytest", "-m", "smoke", "-q", "-p", "no:cacheprovider"]))
    i, s = statistics.median(imp), statistics.median(smoke)
    print(f"import torch + LlamaForCausalLM: {i:.2f} s (median of {a.repeat}: {', '.join(f'{x:.2f}' for x in imp)})")
    print(f"pytest -m smoke:                 {s:.2f} s (median of {a.repeat}: {', '.join(f'{x:.2f}' for x in smoke)})")
    print(f"ratio: {s / i:.2f}x (goal <= 3x)")


if __name__ == "__main__":
    main()
