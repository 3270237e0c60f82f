"""The 9B worker (`configs/worker_9b.yaml`) on N GPUs: real optimizer steps at seq 4096 with
FSDP2, activation checkpointing and CPU-offloaded optimizer state, a sharded checkpoint, and a
resume from it. Prints tokens/s per GPU, MFU and peak memory per GPU, next to `kdtrain info`'s
prediction.

    python bench/worker_9b.py --gpus 2 [--steps 3] [--out /tmp/w9b]

Data: synthetic KD JSONL (random tokens, top-64 rows), tokenizer: the toy tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import PEAK, synthetic_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "worker_9b.yaml"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--out", default="/tmp/worker_9b")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--timeout", type=float, default=None, help="seconds per launch")
    p.add_argument("--no-resume", action="store_true", help="skip the resume run (it writes a second checkpoint)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from kdtrain.config import load_config
    from kdtrain.model import flops_per_token, memory_estimate
    from kdtrain.tokenizer import build_toy_tokenizer

    if not (out / "tok").is_dir():
        build_toy_tokenizer(out / "tok")
    data = out / f"data{a.seq}.jsonl"
    if not data.exists():
        synthetic_dataset(data, 2 * a.gpus * a.grad_accum, a.seq)
    overrides = [f"io.tokenizer_path={out / 'tok'}", f"io.train_shards=[{data}]", "io.val_shards=[]",
                 f"io.output_dir={out / 'run'}", f"train.seq_lengths=[{a.seq}]", "curriculum.schedule=[]",
                 "train.micro_batch_size=1", f"train.grad_accum={a.grad_accum}", "train.cpu_offload=true",
                 "train.keep_checkpoints=1", "tracing.use_tensorboard=false", "tracing.console_log=false", *a.set]
    cfg, _ = load_config([CONFIG], overrides + [f"train.steps={a.steps}"])
    predicted = memory_estimate(cfg, a.gpus)["total"] / 2**30
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

    def launch(steps: int, resume: bool) -> float:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.gpus}",
               "-m", "kdtrain", "train", str(CONFIG), *overrides, f"train.steps={steps}"] + (["--resume"] if resume else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, timeout=a.timeout)
        return time.perf_counter() - t0

    ckdir = out / "run" / "checkpoints"
    shutil.rmtree(out / "run", ignore_errors=True)  # each bench run starts a new training run
    print(f"disk free under {out}: {shutil.disk_usage(out).free / 1e9:.0f} GB", flush=True)
    try:
        wall = launch(a.steps, resume=False)
        size = sum(f.stat().st_size for f in ckdir.rglob("*") if f.is_file())
        print(f"first run: {a.steps} steps in {wall:.0f} s (incl. start-up, build, data, checkpoint); "
              f"checkpoint {size / 1e9:.1f} GB: {[p.name for p in sorted(ckdir.glob('step_*'))]}", flush=True)
        if not a.no_resume:
            # With one 9B checkpoint on a 128 GB disk, the resumed run's own checkpoint is refused
            # (kdtrain checks the free space before writing); the resumed step is logged first.
            try:
                wall = launch(a.steps + 1, resume=True)
                print(f"resumed run: 1 step in {wall:.0f} s (incl. start-up, build, load, checkpoint)")
            except subprocess.CalledProcessError as e:
                print(f"resumed run exited with {e.returncode}: if step {a.steps + 1} is listed below, it trained "
                      "and only its checkpoint failed (see the message above, e.g. not enough disk)")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"launch failed or timed out: {e}")
    finally:
        metrics = out / "run" / "metrics.jsonl"
        rows2 = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
        print(f"checkpoints: {[p.name for p in sorted(ckdir.glob('step_*'))]}")
    f_tok = flops_per_token(cfg.arch, a.seq)
    for r in rows2:
        tps = r["tokens_per_s_per_gpu"]
        print(f"step {r['step']}: total {r['total']:.4f}  {tps:,.0f} tok/s/GPU  MFU {100 * tps * f_tok / PEAK:.1f}%  "
              f"peak {r['peak_mem_gib']:.1f} GiB/GPU")
    measured = max((r["peak_mem_gib"] for r in rows2), default=float("nan"))
    print(f"kdtrain info predicts {predicted:.1f} GiB/GPU; measured max {measured:.1f}")


if __name__ == "__main__":
    main()
