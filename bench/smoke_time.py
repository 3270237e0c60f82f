"""Time `pytest -m smoke` against the bare `import torch; from transformers import LlamaForCausalLM`.

Goal: the smoke suite takes at most 3x that import, measured in the same run.
    python bench/smoke_time.py [--repeat 3]

Wall time is the goal's measure. CPU time (user + system of the child) and the load average
are printed beside it: on a shared machine, other jobs stretch wall time, CPU time much less.
Python caches compiled modules (``__pycache__``) unless ``PYTHONDONTWRITEBYTECODE`` is set, as it is
on some CI images: then every run compiles kdtrain and the test modules again (the import's
packages come precompiled). The bench says which, and ``--write-bytecode`` unsets the variable for
both commands (the first run then fills the cache).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return dt, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def line(name: str, runs: list[tuple[float, float]]) -> tuple[float, float]:
    wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
    print(f"{name:33s}{wall:6.2f} s (median of {len(runs)}: {', '.join(f'{w:.2f}' for w, _ in runs)}), "
          f"CPU {cpu:.2f} s")
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--write-bytecode", action="store_true", help="unset PYTHONDONTWRITEBYTECODE for both commands")
    a = p.parse_args()
    if a.write_bytecode:
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    print("bytecode cache:", "off (PYTHONDONTWRITEBYTECODE)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "on")
    imp, smoke = [], []
    load = [os.getloadavg()[0]]
    for _ in range(a.repeat):
        imp.append(timed([sys.executable, "-c", "import torch; from transformers import LlamaForCausalLM"]))
        smoke.append(timed([sys.executable, "-m", "pytest", "-m", "smoke", "-q", "-p", "no:cacheprovider"]))
        load.append(os.getloadavg()[0])
    i, ic = line("import torch + LlamaForCausalLM:", imp)
    s, sc = line("pytest -m smoke:", smoke)
    print(f"ratio: {s / i:.2f}x (goal <= 3x); CPU time {sc / ic:.2f}x; "
          f"1-min load average {', '.join(f'{x:.1f}' for x in load)} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
