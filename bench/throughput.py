"""Training throughput of `kdtrain train` vs the naive HF-style KD step (DESIGN.md), one GPU or several.

    python bench/throughput.py [--seqs 2048 4096] [--steps 8] [--online] [--naive] [--grad-accum N]
    torchrun --nproc-per-node 2 bench/throughput.py --seqs 2048    # the same step on 2 GPUs (FSDP2)
    python bench/throughput.py --seqs --curves fp32 8bit 4bit      # loss curves per optimizer state

Student: a 1.1B Llama (d_model 2048, 22 layers, 32 heads, 4 KV heads, d_ff 5632, vocab 32000).
Data: synthetic KD JSONL (random response tokens, a normalised random top-64 per position),
written to a temporary directory and read by the real data pipeline. The kdtrain figure is the
real `Trainer` (bf16, chunked loss, torch.compile); the naive baseline is an HF forward with
full logits, fp32 log-softmax and a gather, eager and compiled. `--online` adds the online
1.1B-teacher mode and its naive counterpart (full-vocabulary KL). Prints tokens/s per GPU, MFU
(DESIGN.md formula, peak 989 TFLOP/s), peak memory, and the step's forward + backward and
optimizer halves timed apart (medians). ``--grad-accum N`` makes one optimizer
step cover N micro-batches, for kdtrain and the naive step alike. Under ``torchrun`` each rank
runs the same per-GPU batch (FSDP2-sharded student) and rank 0 prints tokens/s per GPU.
``--curves`` trains the student eagerly for ``--curve-steps`` steps from the same seed and data
once per ``optimizer.state_dtype`` and prints the loss curves and their largest gap to fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

PEAK = 989e12
ARCH = {"d_model": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "d_head": 64, "d_ff": 5632,
        "vocab_size": 32000, "max_seq_len": 4096}
BATCH = {2048: 8, 4096: 4}
K = 64
PROFILE = False
ACCUM = 1
SDPA = None  # set in main(): a context choosing the attention kernels
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def synthetic_dataset(path: Path, n: int, seq: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        resp = [rng.randrange(3, 32000) for _ in range(seq - 3)]
        ids, lps = [], []
        for tok in resp:
            row = [tok] + [t for t in rng.sample(range(3, 32000), K) if t != tok][: K - 1]
            raw = sorted((rng.random() * 5 for _ in range(K)), reverse=True)
            z = math.log(sum(math.exp(v) for v in raw) + 1.0)  # leave some tail mass
            ids.append(row)
            lps.append([round(v - z, 5) for v in raw])
        lines.append(json.dumps({"prompt": "p", "teacher_text": "t", "response_ids": resp,
                                 "teacher_topk": {"ids": ids, "logprobs": lps, "temperature": 1.0}}))
    path.write_text("\n".join(lines) + "\n")


def f_tok(arch: dict, seq: int) -> float:
    from kdtrain.config import ArchConfig
    from kdtrain.model import flops_per_token

    return flops_per_token(ArchConfig(**arch), seq)


def say(*args, **kw) -> None:
    if RANK == 0:
        print(*args, **kw)


def report(name: str, tokens: int, times: list[float], flops: float, peak: float) -> dict:
    dt = statistics.median(times)
    tps = tokens / dt
    say(f"{name:44s} {tps:10,.0f} tok/s  MFU {100 * tps * flops / PEAK:5.1f}%  peak {peak / 2**30:6.1f} GiB  "
          f"({dt * 1000:.0f} ms/step)", flush=True)
    return {"name": name, "tokens_per_s": tps, "mfu": tps * flops / PEAK, "peak_gib": peak / 2**30}


def reset():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench_kdtrain(tmp: Path, seq: int, steps: int, teacher_dir: Path | None, extra: list[str]) -> dict:
    from kdtrain.config import load_config
    from kdtrain.trainer import Trainer

    B = BATCH[seq]
    data = tmp / f"data{seq}.jsonl"
    if not data.exists():
        synthetic_dataset(data, B * 2 * ACCUM, seq)
    overrides = [f"arch.{k}={v}" for k, v in ARCH.items()] + [
        f"io.tokenizer_path={tmp / 'tok'}", f"io.train_shards=[{data}]", "io.val_shards=[]",
        f"io.output_dir={tmp / 'run'}", f"train.seq_lengths=[{seq}]", f"train.micro_batch_size={B}",
        f"train.grad_accum={ACCUM}", "train.precision=bf16", "train.compile=true", "train.device=cuda",
        f"train.steps={steps + 3}", "distillation.ce_ground_truth_weight=0", "tracing.console_log=false",
        "train.loss_chunk_size=8192", *extra]  # larger chunks: fewer launches, 1.3 GiB more than 4096
    if teacher_dir:
        overrides += ["kd.teacher=online", f"kd.teacher_path={teacher_dir}"]
    cfg, _ = load_config([], overrides)
    reset()
    trainer = Trainer(cfg, log=False)
    times, phases = [], []
    for i in range(steps + 3):
        batches = trainer.micro_batches(seq)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with SDPA():  # train_step's two halves, timed apart (the optimizer half starts with a host sync anyway)
            sums = trainer.forward_backward(batches)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            row = trainer.optimizer_step(sums)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
            phases.append(t1 - t0)
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile

        batches = trainer.micro_batches(seq)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            trainer.train_step(batches)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90))
        print_gpu_gaps(prof)
    name = f"kdtrain {'online' if teacher_dir else 'top-64'} seq {seq} x{B}" + (f" x{ACCUM} accum" if ACCUM > 1 else "")
    r = report(name, ACCUM * B * seq, times, f_tok(ARCH, seq), torch.cuda.max_memory_allocated())
    say(f"{'':44s} last step: total {row['total']:.4f}, grad norm {row['grad_norm']:.3f} "
          f"(clipped above {cfg.optimizer.grad_clip}); forward + backward {1000 * statistics.median(phases):.1f} ms, "
          f"optimizer {1000 * statistics.median(t - f for t, f in zip(times, phases)):.1f} ms (medians)")
    if teacher_dir:
        sys_flops = f_tok(ARCH, seq) + 2 * teacher_params() + 4 * ARCH["n_layers"] * ARCH["d_model"] * seq
        say(f"{'':44s} system MFU {100 * r['tokens_per_s'] * sys_flops / PEAK:5.1f}%")
        r["system_mfu"] = r["tokens_per_s"] * sys_flops / PEAK
    del trainer
    return r


def loss_curves(tmp: Path, states: list[str], steps: int, extra: list[str]) -> None:
    """One eager run (same init, data and schedule) per entry of ``states``, an
    ``optimizer.state_dtype``; prints the curves and each one's largest gap to the first's, relative
    to the first's loss at that step. Name fp32 twice to see the run-to-run spread of bf16 steps."""
    from kdtrain.config import load_config
    from kdtrain.trainer import Trainer

    seq, B = 2048, BATCH[2048]
    data = tmp / "curve.jsonl"
    if not data.exists():
        synthetic_dataset(data, 2 * B, seq, seed=1)
    curves = []
    for i, state in enumerate(states):
        cfg, _ = load_config([], [f"arch.{k}={v}" for k, v in ARCH.items()] + [
            f"io.tokenizer_path={tmp / 'tok'}", f"io.train_shards=[{data}]", "io.val_shards=[]",
            f"io.output_dir={tmp / f'curve{i}'}", f"train.seq_lengths=[{seq}]", f"train.micro_batch_size={B}",
            "train.precision=bf16", "train.device=cuda", f"train.steps={steps}", "train.loss_chunk_size=8192",
            "distillation.ce_ground_truth_weight=0", "optimizer.warmup_steps=5", f"optimizer.state_dtype={state}",
            *extra])
        reset()
        trainer = Trainer(cfg, log=False)
        curves.append([trainer.train_step(trainer.micro_batches(seq))["total"] for _ in range(steps)])
        del trainer
    marks = sorted({0, *range(4, steps, 5), steps - 1})
    say("loss curves, 1.1B, seq 2048 x 8, eager: step " + " ".join(f"{m + 1:7d}" for m in marks))
    for state, c in zip(states, curves):
        gap = max(abs(x - r) / r for x, r in zip(c, curves[0]))
        say(f"  {state:5s} " + " ".join(f"{c[m]:7.4f}" for m in marks)
            + f"   max gap to {states[0]}: {100 * gap:.2f}%", flush=True)


def print_gpu_gaps(prof, top: int = 25) -> None:
    """Where the GPU sat idle during the profiled step: total idle time and the longest gaps,
    each with the kernels around it and the innermost CPU ops running at the time."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    cpu = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
           if e.get("cat") in ("cpu_op", "python_function", "user_annotation") and "dur" in e]
    gaps, end, prev = [], gpu[0][1], gpu[0][2]
    for t0, t1, name in gpu[1:]:
        if t0 > end:
            gaps.append((t0 - end, end, prev, name))
        if t1 > end:
            end, prev = t1, name
    span = (end - gpu[0][0]) / 1e3
    idle = sum(g[0] for g in gaps) / 1e3
    print(f"GPU span {span:.1f} ms, idle {idle:.1f} ms in {len(gaps)} gaps "
          f"({sum(g[0] for g in gaps if g[0] > 50) / 1e3:.1f} ms in gaps > 50 us)")
    for dur, at, before, after in sorted(gaps, reverse=True)[:top]:
        mid = at + dur / 2
        inner = sorted((c for c in cpu if c[0] <= mid <= c[1]), key=lambda c: c[1] - c[0])[:5]
        print(f"  {dur / 1e3:6.2f} ms after {before[:40]!r} before {after[:40]!r}; cpu: "
              + " < ".join(c[2][:50] for c in inner))


def teacher_params() -> int:
    """The benchmark's teacher has the student's 1.1B shape."""
    from kdtrain.config import ArchConfig
    from kdtrain.model import param_counts

    return param_counts(ArchConfig(**ARCH))["total"]


def bench_naive(seq: int, steps: int, compiled: bool, online: bool, teacher=None) -> dict:
    """DESIGN.md's naive step: HF forward, full logits, fp32 log-softmax, gather (or full KL)."""
    from transformers import LlamaForCausalLM

    from kdtrain.config import ArchConfig
    from kdtrain.model import llama_config

    B = BATCH[seq]
    reset()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_config(ArchConfig(**ARCH)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, 32000, (B, seq), device="cuda", generator=g)
    top_ids = torch.randint(3, 32000, (B, seq, K), device="cuda", generator=g)
    top_lp = torch.log_softmax(torch.randn(B, seq, K, device="cuda", generator=g), -1)
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ACCUM):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(input_ids=ids).logits
                logp = torch.log_softmax(logits.float(), -1)
                if online:
                    with torch.no_grad():
                        t_logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
                    kl = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
                else:
                    kl = (top_lp.exp() * (top_lp - logp.gather(-1, top_ids))).sum(-1).mean()
                ce = torch.nn.functional.nll_loss(logp[:, :-1].reshape(-1, logp.shape[-1]), ids[:, 1:].reshape(-1))
                loss = (kl + 0.5 * ce) / ACCUM
            loss.backward()
            del logits, logp, loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    name = f"naive {'online' if online else 'top-64'}{' compiled' if compiled else ''} seq {seq} x{B}" + (
        f" x{ACCUM} accum" if ACCUM > 1 else "")
    r = report(name, ACCUM * B * seq, times, f_tok(ARCH, seq), torch.cuda.max_memory_allocated())
    del model, opt, fwd
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="*", default=[2048, 4096], help="none: only --online")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--online", action="store_true", help="also the online-teacher mode (seq 2048)")
    p.add_argument("--naive", action="store_true", help="also the naive baselines")
    p.add_argument("--set", nargs="*", default=[], help="extra kdtrain overrides, e.g. train.loss_chunk_size=2048")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--curves", nargs="*", default=[], help="optimizer.state_dtype values to train loss curves for")
    p.add_argument("--curve-steps", type=int, default=30)
    p.add_argument("--tokenizer", help="a tokenizer directory to copy instead of building the toy one")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels and the GPU idle gaps of one kdtrain step")
    p.add_argument("--sdpa", default="default", choices=["default", "flash", "efficient", "cudnn"],
                   help="attention kernels for the kdtrain step (default: PyTorch's choice)")
    a = p.parse_args()
    global PROFILE, SDPA, ACCUM
    PROFILE, ACCUM = a.profile, a.grad_accum
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel

    SDPA = {"default": contextlib.nullcontext,
            "flash": lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
            "efficient": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
            "cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])}[a.sdpa]
    if a.naive and WORLD > 1:
        p.error("--naive runs on one GPU: launch without torchrun")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    say(f"device: {torch.cuda.get_device_name()} x {WORLD}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from kdtrain.tokenizer import build_toy_tokenizer

        if a.tokenizer:
            shutil.copytree(a.tokenizer, tmp / "tok")
        else:
            build_toy_tokenizer(tmp / "tok")
        if a.curves:
            loss_curves(tmp, a.curves, a.curve_steps, a.set)
        for seq in a.seqs:
            bench_kdtrain(tmp, seq, a.steps, None, a.set)
            if a.naive:
                bench_naive(seq, a.steps, False, False)
                bench_naive(seq, a.steps, True, False)
        if a.online:
            from transformers import LlamaForCausalLM

            from kdtrain.config import ArchConfig
            from kdtrain.model import llama_config

            torch.manual_seed(1)
            teacher = LlamaForCausalLM(llama_config(ArchConfig(**ARCH))).to(torch.bfloat16)
            teacher.save_pretrained(tmp / "teacher")
            bench_kdtrain(tmp, 2048, a.steps, tmp / "teacher", a.set)
            if a.naive:
                teacher = teacher.cuda().eval()
                bench_naive(2048, a.steps, False, True, teacher)
                bench_naive(2048, a.steps, True, True, teacher)


if __name__ == "__main__":
    main()
