"""The loss alone (output projection + KD divergence + CE, forward + backward): peak memory above
the inputs and median time, plain (materialised fp32 logits) vs chunked, and Liger Kernel's
`LigerFusedLinearJSD` as a peer on CUDA when it is installed (benchmark-only dependency).

    python bench/loss_memory.py                  # CUDA: N 8192, d 4096, V 32000 and 128000
    python bench/loss_memory.py --device cpu     # CPU: N 4096, d 256, V 32000 (see --n/--d/--vocabs)

Inputs are bf16 (CPU: fp32): student hidden [N, d] and weight [V, d], teacher hidden and
weight (online) or top-64 ids/log-probs (sparse), labels. JSD with beta 0.5 (Liger's default)
plus CE (weight 0.5) for kdtrain; Liger computes the JSD only. On CPU each variant runs in its
own process and memory is the peak RSS growth; on CUDA, max_memory_allocated growth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def make_inputs(n, d, v, device, dtype, k=64, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(n, d, device=device, generator=g) / d**0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    th = (torch.randn(n, d, device=device, generator=g) / d**0.5).to(dtype)
    tw = (torch.randn(v, d, device=device, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    ids = torch.stack([torch.randperm(v, device=device, generator=g)[:k] for _ in range(1)]).expand(n, k).contiguous()
    lps = torch.log_softmax(torch.randn(n, k, device=device, generator=g), -1) - 0.1
    return h, w, th, tw, labels, ids, lps


def run_variant(name, n, d, v, device, dtype, chunk, iters):
    from kdtrain.losses import SparseTeacher, Targets, kd_loss

    h, w, th, tw, labels, ids, lps = make_inputs(n, d, v, device, dtype)
    weights = {"kl_div": 1.0, "ce_teacher": 0.5, "ce_ground_truth": 0.0}
    is_ref = torch.zeros(n, dtype=torch.bool, device=device)
    sparse = SparseTeacher(ids, lps, 1.0) if "topk" in name else None
    tgt = Targets(labels, is_ref, ~is_ref, n, n, 0, sparse)
    online = "online" in name

    if name.startswith("liger"):
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

        def step():
            loss = liger(h, w, th, tw, labels)
            loss.backward()
    else:
        chunk_size = None if name.startswith("plain") else chunk

        def step():
            out = kd_loss(h, w, tgt, weights, 1.0, "jsd", 0.5, th if online else None, tw if online else None,
                          chunk_size=chunk_size, compile=device == "cuda")
            out["total"].backward()

    cuda = device == "cuda"
    step()  # warm-up (and compilation)
    h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        h.grad = w.grad = None
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base
    return {"name": name, "V": v, "peak_gib": peak / 2**30, "ms": 1000 * statistics.median(times)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--vocabs", type=int, nargs="+")
    p.add_argument("--chunk", type=int, help="tokens per chunk (default: 256 on CPU, 1024 on CUDA)")
    p.add_argument("--only", nargs="*", help="run only these variants")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant (CPU, own process)
    a = p.parse_args()
    cuda = a.device == "cuda"
    n, d = a.n or (8192 if cuda else 4096), a.d or (4096 if cuda else 256)
    a.chunk = a.chunk or (1024 if cuda else 256)
    vocabs = a.vocabs or ([32000, 128000] if cuda else [32000])
    dtype = torch.bfloat16 if cuda else torch.float32
    if a.one:
        name, v = a.one.split(":")
        print(json.dumps(run_variant(name, n, d, int(v), a.device, dtype, a.chunk, a.iters)))
        return
    names = ["plain-online", "chunked-online", "plain-topk", "chunked-topk"]
    if a.only:
        names = [x for x in names if x in a.only]
    if cuda and (not a.only or "liger-online" in a.only):
        try:
            import liger_kernel  # noqa: F401

            names.append("liger-online")
        except ImportError:
            print("liger-kernel not installed: no peer figures")
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; N {n}, d {d}, dtype {dtype}, chunk {a.chunk}")
    for v in vocabs:
        for name in names:
            if cuda:
                r = run_variant(name, n, d, v, a.device, dtype, a.chunk, a.iters)
                torch.cuda.empty_cache()
            else:
                out = subprocess.run([sys.executable, __file__, "--device", "cpu", "--n", str(n), "--d", str(d),
                                      "--chunk", str(a.chunk), "--iters", str(a.iters), "--one", f"{name}:{v}"],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"V {v:7d}  {name:15s} peak {r['peak_gib']:7.3f} GiB  median {r['ms']:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
