"""Export time and size per format, and CPU decode speed: onnxruntime against PyTorch eager.

    python bench/export_speed.py                       # the toy student
    python bench/export_speed.py --shape 100m          # a ~100M-parameter student
    python bench/export_speed.py --shape 1.1b --formats hf onnx --no-decode

The checkpoint holds seeded weights (export time, size and decode speed do not depend on training).
Decode: batch 1, a 16-token prompt, then ``--new`` greedy tokens one at a time with the KV cache,
on every core the process may use; tokens/s is the median of ``--repeats`` runs of the decode
loop (the prefill excluded). PyTorch runs Hugging Face's forward with its ``DynamicCache``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # d_model, n_layers, n_heads, n_kv_heads, d_head, d_ff (vocab 32,000)
    "toy": (64, 2, 4, 2, 16, 256),
    "100m": (768, 8, 12, 4, 64, 2048),
    "1.1b": (2048, 22, 32, 4, 64, 5632),
}


def make_checkpoint(root: Path, shape: str) -> Path:
    """A checkpoint of the seeded student of ``shape`` beside the toy tokenizer."""
    from kdtrain.checkpoint import save_checkpoint
    from kdtrain.config import build_config
    from kdtrain.model import build_student
    from kdtrain.tokenizer import build_toy_tokenizer

    build_toy_tokenizer(root / "tokenizer", 32000)
    d, L, H, Hkv, Dh, F = SHAPES[shape]
    cfg = build_config({"arch": {"d_model": d, "n_layers": L, "n_heads": H, "n_kv_heads": Hkv, "d_head": Dh,
                                 "d_ff": F, "vocab_size": 32000, "max_seq_len": 2048},
                        "io": {"tokenizer_path": str(root / "tokenizer")}})
    model = build_student(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"student {shape}: {n / 1e6:.1f} M parameters")
    return save_checkpoint(root / "checkpoints", 1, model.state_dict(), {}, {}, cfg, {}, keep=1)


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def decode_tps(step, prompt: torch.Tensor, new: int, repeats: int) -> float:
    """``step(ids, state) -> (next_ids, state)``; tokens/s of the decode loop after the prefill."""
    rates = []
    for _ in range(repeats):
        nxt, state = step(prompt, None)
        t0 = time.perf_counter()
        for _ in range(new):
            nxt, state = step(nxt, state)
        rates.append(new / (time.perf_counter() - t0))
    return statistics.median(rates)


def torch_step(model):
    from transformers import DynamicCache

    def step(ids, cache):
        cache = cache if cache is not None else DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1), cache

    return step


def onnx_step(path: Path):
    from kdtrain.export import onnx_prefill_feed, onnx_session

    session = onnx_session(path)
    past = [i.name for i in session.get_inputs()[1:]]
    outputs = ["logits", *[n.replace("past_", "present_") for n in past]]

    def step(ids, feed):
        feed = onnx_prefill_feed(session, ids.numpy()) if feed is None else feed
        feed["input_ids"] = ids.numpy()
        logits, *present = session.run(outputs, feed)
        return torch.from_numpy(logits[:, -1:].argmax(-1)), dict(zip(past, present))

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="toy")
    p.add_argument("--formats", nargs="+", default=["hf", "onnx", "coreml"])
    p.add_argument("--new", type=int, default=64, help="decode steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-decode", action="store_true")
    a = p.parse_args()

    from kdtrain.export import export, load_hf

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {sys.platform}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = make_checkpoint(root, a.shape)
        outs = {}
        for fmt in a.formats:
            precisions = ["fp16", "fp32"] if fmt == "coreml" else ["fp32"]
            for prec in precisions:
                t0 = time.perf_counter()
                out, _ = export(ckpt, root / f"{fmt}-{prec}", fmt, prec)
                seconds = time.perf_counter() - t0
                outs[fmt] = out
                print(f"export {fmt:6s} {prec}: {seconds:7.1f} s, {size_mb(out):9.1f} MB (incl. tokenizer)")
        if a.no_decode or "onnx" not in outs:
            return 0
        model = load_hf(outs["hf"])[0] if "hf" in outs else None
        if model is None:
            from kdtrain.checkpoint import export_hf

            model = load_hf(export_hf(ckpt, root / "hf-for-decode"))[0]
        prompt = torch.arange(3, 19)[None]
        ref = decode_tps(torch_step(model), prompt, a.new, a.repeats)
        got = decode_tps(onnx_step(outs["onnx"] / "model.onnx"), prompt, a.new, a.repeats)
        print(f"decode {a.shape}, batch 1, {a.new} tokens after a 16-token prompt: PyTorch eager {ref:8.1f} tok/s, "
              f"onnxruntime {got:8.1f} tok/s ({got / ref:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
