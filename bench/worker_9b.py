"""The 9B worker (`configs/worker_9b.yaml`) on N GPUs, in one launch: the build (time and host
memory per rank), real optimizer steps at each sequence length (tokens/s per GPU, MFU, peak
memory per GPU next to `kdtrain info`'s prediction), and optionally a sharded checkpoint (the
training time it costs) and an exact-resume check at another world size.

    python bench/worker_9b.py --gpus 2 --seqs 4096 8192 16384 [--steps 3] [--grad-accum 2]
        [--set optimizer.state_dtype=8bit train.compile=true] [--checkpoint] [--resume-gpus 2 4]
        [--compare-gpus 2] [--gpu-memory-gib 78.5]

Each sequence length runs one warm-up step (compilation, first allocations) and then ``--steps``
timed steps; the figures are the median step. ``--checkpoint`` saves after the timed steps and
reports how long training was held up: ``save()`` itself plus what the next step took beyond the
median (with ``train.async_checkpoint`` the shards are written in the background, and only the
host copy can hold the next optimizer step), and when the checkpoint was published. ``--resume-gpus``
relaunches from that checkpoint on each listed GPU count and compares the next step's loss with
the uninterrupted run's (the step after the checkpoint runs at the first length). A dry run on CPU
processes, before GPU time is spent: ``--set arch.d_model=64 arch.n_layers=2 arch.n_heads=4
arch.n_kv_heads=2 arch.d_head=16 arch.d_ff=128 train.device=cpu train.precision=fp32``. ``--compare-gpus``
runs the first length on other GPU counts (same micro-batches per GPU) and prints the scaling of
the total tokens/s. ``--gpu-memory-gib`` lets each process use only that much of its GPU
(``torch.cuda.set_per_process_memory_fraction``; the trainer's ``auto`` plan follows it): an 80 GB
card's plan and memory limit on a larger card, though not its speed. The lengths are driven by
the bench, one after the other, as the curriculum of ``configs/worker_9b.yaml`` runs them. Data: synthetic KD JSONL (random tokens, top-64 rows) cut to each length;
tokenizer: the toy tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import PEAK, print_gpu_gaps, synthetic_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "worker_9b.yaml"
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def overrides(a, out: Path) -> list[str]:
    return [f"io.tokenizer_path={out / 'tok'}", f"io.train_shards=[{out / 'data.jsonl'}]", "io.val_shards=[]",
            f"io.output_dir={out / 'run'}", f"train.seq_lengths=[{max(a.seqs)}]", "curriculum.schedule=[]",
            "train.micro_batch_size=1", f"train.grad_accum={a.grad_accum}", "train.keep_checkpoints=1",
            "tracing.use_tensorboard=false", "tracing.console_log=false", "train.steps=100000", *a.set]


def worker(a) -> None:
    """One rank: build, step at each length, optionally checkpoint or resume; rank 0 prints."""
    import torch
    import torch.distributed as dist

    from kdtrain.config import load_config
    from kdtrain.model import flops_per_token, memory_estimate
    from kdtrain.trainer import Trainer

    out = Path(a.out)
    cfg, _ = load_config([a.config], overrides(a, out))
    card = ""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(local).total_memory
        card = f" on {torch.cuda.get_device_name(local)} ({total / 2**30:.1f} GiB"
        if a.gpu_memory_gib and a.gpu_memory_gib * 2**30 < total:
            # a smaller card's memory on a larger one: the allocator stops there, and the trainer
            # plans for it (kdtrain.model.usable_gpu_bytes)
            torch.cuda.set_per_process_memory_fraction(a.gpu_memory_gib * 2**30 / total, local)
            card += f", capped at {a.gpu_memory_gib:.1f} GiB"
        card += ")"
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=a.resume, log=False)
    build_s = time.perf_counter() - t0
    rank, world, dev = trainer.dist.rank, trainer.dist.world_size, trainer.device
    cuda = dev.type == "cuda"

    def across(x: float, op) -> float:  # max or sum over ranks
        t = torch.tensor([x], dtype=torch.float64, device=dev)
        if trainer.dist.enabled:
            dist.all_reduce(t, op=op)
        return t.item()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rss = across(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, dist.ReduceOp.MAX)  # KiB -> GiB
    say = print if rank == 0 else (lambda *args, **kw: None)
    say(f"world {world}{card}: Trainer built in {build_s:.1f} s (model, shards, data), host peak RSS per rank "
        f"{rss:.1f} GiB", flush=True)

    pad = trainer.tokenizer.pad_token_id

    def step(seq: int) -> tuple[float, dict]:
        batches = trainer.micro_batches(seq)
        row = {"tokens": sum(int((b["input_ids"] != pad).sum()) for b in batches)}  # this rank's
        sync()
        t = time.perf_counter()
        row.update(trainer.train_step(batches))
        sync()
        return time.perf_counter() - t, row

    if a.resume:
        _, row = step(a.seqs[0])
        say(f"RESUMED world {world} step {trainer.step}: total {row['total']:.6f}", flush=True)
        if rank == 0:
            (out / f"resumed_{world}.json").write_text(json.dumps({"step": trainer.step, "total": row["total"]}))
        trainer.dist.close()
        return
    results = []
    for seq in a.seqs:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        warm, _ = step(seq)
        times, rows = zip(*[step(seq) for _ in range(a.steps)])
        dt = statistics.median(times)
        tps = across(statistics.mean(r["tokens"] for r in rows), dist.ReduceOp.SUM) / world / dt
        peak = across(torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0, dist.ReduceOp.MAX)
        mfu = tps * flops_per_token(cfg.arch, seq) / PEAK
        k, reshard = trainer.checkpointed_layers, trainer.reshard_after_forward
        predicted = memory_estimate(cfg, world, seq, k, reshard)["total"] / 2**30
        results.append({"seq": seq, "tokens_per_s_per_gpu": tps, "mfu": mfu, "peak_gib": peak, "step_s": dt,
                        "warmup_s": warm, "checkpointed_layers": k, "reshard_after_forward": reshard,
                        "predicted_gib": predicted, "totals": [r["total"] for r in rows]})
        say(f"seq {seq:6d}: {tps:8,.0f} tok/s/GPU  MFU {100 * mfu:5.1f}%  peak {peak:5.1f} GiB/GPU (kdtrain info "
            f"{predicted:.1f}; {k}/{cfg.arch.n_layers} layers checkpointed, gathered weights "
            f"{'resharded' if reshard else 'kept'})  step {dt:.2f} s (warm-up {warm:.1f} s)  "
            f"loss {rows[-1]['total']:.4f}", flush=True)
        if a.profile and seq == a.seqs[0]:
            profile_step(lambda: step(seq), rank, cuda)
    for i in range(a.checkpoint):
        # Lost training time: save() itself plus what the next step took over the median step
        # (the background copy to host memory it may wait for). The first save also allocates the
        # host buffers that later ones reuse; each is waited for (published) before the next.
        sync()
        t = time.perf_counter()
        path = trainer.save()
        held = time.perf_counter() - t
        after, row = step(a.seqs[0])
        t_pub = time.perf_counter()
        trainer.wait_for_checkpoint()
        published = time.perf_counter() - t
        waited = time.perf_counter() - t_pub
        lost = held + max(0.0, after - results[0]["step_s"])
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if rank == 0 else 0
        say(f"checkpoint {i + 1} {Path(path).name} ({'background' if cfg.train.async_checkpoint else 'foreground'}): "
            f"{size / 1e9:.1f} GB; save() held training {held:.1f} s, the next step took {after:.2f} s (median "
            f"{results[0]['step_s']:.2f} s), published {published:.1f} s after save() (then waited {waited:.1f} s); "
            f"training time lost {lost:.1f} s", flush=True)
        say(f"NEXT step {trainer.step}: total {row['total']:.6f}", flush=True)
        results.append({"checkpoint_gb": size / 1e9, "save_held_s": held, "step_after_s": after,
                        "published_after_s": published, "lost_s": lost, "next_total": row["total"],
                        "next_step": trainer.step})
    if rank == 0:
        (out / f"results_{world}.json").write_text(json.dumps({"build_s": build_s, "host_rss_gib": rss,
                                                               "runs": results}, indent=1))
    trainer.dist.close()


def profile_step(run, rank: int, cuda: bool) -> None:
    """One more step under the profiler on every rank; rank 0 prints its top CUDA kernels and
    where its GPU sat idle (``throughput.print_gpu_gaps``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=rank == 0) as prof:
        dt, _ = run()
    if rank == 0:
        print(f"profiled step: {dt:.2f} s (profiler overhead included)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=80))
        if cuda:
            print_gpu_gaps(prof)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--config", default=str(CONFIG), help="another student config")
    p.add_argument("--seqs", type=int, nargs="+", default=[4096])
    p.add_argument("--steps", type=int, default=3, help="timed steps per sequence length (after one warm-up)")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--out", default="/tmp/worker_9b")
    p.add_argument("--set", nargs="*", default=[], help="extra kdtrain overrides")
    p.add_argument("--checkpoint", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="save N times (default 1) after the timed steps, a step after each, and time the stall")
    p.add_argument("--resume-gpus", type=int, nargs="*", default=[], help="resume that checkpoint on these counts")
    p.add_argument("--compare-gpus", type=int, nargs="*", default=[],
                   help="also run the first length on these GPU counts: scaling of total tokens/s")
    p.add_argument("--profile", action="store_true", help="profile one more step at the first length (rank 0 prints)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="use at most this much of each GPU (a smaller card's memory on a larger one)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per launch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from kdtrain.config import load_config
    from kdtrain.model import memory_estimate
    from kdtrain.tokenizer import build_toy_tokenizer

    if not (out / "tok").is_dir():
        build_toy_tokenizer(out / "tok")
    synthetic_dataset(out / "data.jsonl", a.gpus * a.grad_accum, max(a.seqs))
    for seq in a.seqs:
        cfg, _ = load_config([a.config], overrides(a, out) + [f"train.seq_lengths=[{seq}]"])
        print(f"kdtrain info, seq {seq}, {a.gpus} GPUs: {memory_estimate(cfg, a.gpus)['total'] / 2**30:.1f} GiB/GPU")
    shutil.rmtree(out / "run", ignore_errors=True)

    def launch(n: int, *extra: str, seqs: list[int] = a.seqs) -> bool:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
               "--worker", "--config", a.config, "--out", str(out), "--seqs", *map(str, seqs), "--steps", str(a.steps),
               "--grad-accum", str(a.grad_accum),
               *(["--gpu-memory-gib", str(a.gpu_memory_gib)] if a.gpu_memory_gib else []), "--set", *a.set, *extra]
        try:
            subprocess.run(cmd, check=True, env={**os.environ, **ENV}, timeout=a.timeout)
            return True
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            print(f"launch on {n} GPUs failed: {e}", flush=True)
            return False

    print(f"disk free under {out}: {shutil.disk_usage(out).free / 1e9:.0f} GB", flush=True)
    if not launch(a.gpus, *(["--checkpoint", str(max(a.checkpoint, 1))] if a.checkpoint or a.resume_gpus else []),
                  *(["--profile"] if a.profile else [])):
        sys.exit(1)
    main_run = json.loads((out / f"results_{a.gpus}.json").read_text())["runs"]
    for n in a.resume_gpus:
        # The same global batch on n GPUs: grad_accum scales so that micro-batches x ranks is fixed.
        if (a.gpus * a.grad_accum) % n:
            print(f"skip resume on {n} GPUs: {a.gpus * a.grad_accum} micro-batches do not split over {n}")
            continue
        accum = a.gpus * a.grad_accum // n
        (out / f"resumed_{n}.json").unlink(missing_ok=True)
        if launch(n, "--resume", "--set", *a.set, f"train.grad_accum={accum}"):
            got, want = json.loads((out / f"resumed_{n}.json").read_text()), main_run[-1]
            print(f"resume on {n} GPUs: step {got['step']} total {got['total']:.6f}, uninterrupted "
                  f"{want['next_total']:.6f} (step {want['next_step']}): relative difference "
                  f"{abs(got['total'] - want['next_total']) / abs(want['next_total']):.2e}", flush=True)
    for n in a.compare_gpus:
        shutil.rmtree(out / f"compare_{n}", ignore_errors=True)
        if launch(n, "--set", *a.set, f"io.output_dir={out / f'compare_{n}'}", seqs=a.seqs[:1]):
            other = json.loads((out / f"results_{n}.json").read_text())["runs"][0]
            mine = main_run[0]
            ratio = a.gpus * mine["tokens_per_s_per_gpu"] / (n * other["tokens_per_s_per_gpu"])
            print(f"scaling at seq {mine['seq']}: {n} GPUs {n * other['tokens_per_s_per_gpu']:,.0f} tok/s, {a.gpus} GPUs "
                  f"{a.gpus * mine['tokens_per_s_per_gpu']:,.0f} tok/s: {ratio:.2f}x (ideal {a.gpus / n:.2f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
