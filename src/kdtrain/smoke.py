"""``kdtrain smoke``: the toy pipeline end to end, as a human-readable report.

Every number printed is measured in this run. Exit code 0 when every step passed, else 1.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from .config import load_config

OK, FAIL = "\N{WHITE HEAVY CHECK MARK}", "\N{CROSS MARK}"


def run_smoke(out_dir: str | Path | None = None, echo=print) -> bool:
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .losses import COMPONENTS
    from .model import build_student
    from .tokenizer import load_tokenizer
    from .toy import make_toy
    from .trainer import Trainer

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kdtrain-smoke-")
        out_dir = tmp.name
    state: dict = {}

    def step_1():
        t0 = time.perf_counter()
        paths = make_toy(Path(out_dir) / "toy")
        shutil.rmtree(Path(out_dir) / "run", ignore_errors=True)  # each report trains afresh
        state["cfg"], _ = load_config([paths["config"]], [f"io.output_dir={Path(out_dir) / 'run'}", "train.steps=1"])
        return f"toy setup created in {paths['dir']} ({time.perf_counter() - t0:.2f} s)"

    def step_2():
        cfg = state["cfg"]
        tok = load_tokenizer(cfg.io.tokenizer_path, cfg.arch.vocab_size)
        data = load_dataset(cfg.io.train_shards, tok, cfg.arch.vocab_size)
        n_resp = sum(len(s.response_ids) for s in data.samples)
        return (f"dataset loaded with {len(data)} samples ({n_resp} response tokens, top-{data.k} teacher rows on "
                f"{data.n_topk}, references on {data.n_reference}; tokenizer {len(tok)} pieces)")

    def step_3():
        cfg = state["cfg"]
        model = build_student(cfg).eval()
        ids = torch.randint(0, cfg.arch.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            changed = ids.clone()
            changed[0, -1] = (changed[0, -1] + 1) % cfg.arch.vocab_size
            causal = torch.equal(model(input_ids=changed).logits[:, :-1], logits[:, :-1])
        if not causal:
            raise AssertionError("changing the last token changed earlier logits: the model is not causal")
        n = sum(p.numel() for p in model.parameters())
        return f"model created: forward {list(logits.shape)}, {n:,} parameters, causal"

    def step_4():
        trainer = Trainer(state["cfg"], log=False)
        state["trainer"] = trainer
        before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
        batches = trainer.micro_batches(state["cfg"].seq_len_at(0))
        sums = trainer.forward_backward(batches)
        params = [(n, p) for n, p in trainer.student.named_parameters() if p.requires_grad]
        bad = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
        if bad:
            raise AssertionError(f"no finite gradient for {len(bad)} parameters, e.g. {bad[0]}")
        row = trainer.optimizer_step(sums)
        moved = sum(not torch.equal(before[n], p.detach()) for n, p in params)
        if moved != len(params):
            raise AssertionError(f"the optimizer step changed {moved} of {len(params)} parameters")
        comps = ", ".join(f"{k}={row[k]:.4f}" for k in COMPONENTS if k != "total")
        return (f"training step: loss {row['total']:.4f} ({comps}); components {list(COMPONENTS)}; backward gave "
                f"finite gradients to all {len(params)} parameters (norm {row['grad_norm']:.3f}); step changed {moved}")

    def step_5():
        trainer = state["trainer"]
        path = trainer.save()
        ckpt = load_checkpoint(path)
        clone = build_student(state["cfg"])
        clone.load_state_dict(ckpt["model"], strict=True)
        batch = trainer.micro_batches(state["cfg"].seq_len_at(0))[0]
        with torch.no_grad():
            a = trainer.student.eval()(input_ids=batch["input_ids"]).logits
            b = clone.eval()(input_ids=batch["input_ids"]).logits
        if not torch.equal(a, b):
            raise AssertionError(f"reloaded logits differ by {(a - b).abs().max().item():.3g}")
        resumed = Trainer(state["cfg"], resume=True, log=False)
        s1, s2 = trainer.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
        same = len(s1) == len(s2) and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
        if not same:
            raise AssertionError("the resumed optimizer state differs from the saved one")
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        return (f"checkpoint save/load: {path.name} ({size:.1f} MiB), logits identical after reload, optimizer state "
                f"identical ({len(s1)} parameter states), resumed at step {resumed.step}")

    steps = [("create toy setup", step_1), ("load dataset", step_2), ("create model", step_3),
             ("training step", step_4), ("checkpoint save/load", step_5)]
    passed = True
    for i, (name, fn) in enumerate(steps, start=1):
        if not passed:
            echo(f"{FAIL} {i}. {name}: skipped after an earlier failure")
            continue
        try:
            echo(f"{OK} {i}. {fn()}")
        except Exception as e:  # the report must name every failure, whatever its type
            passed = False
            echo(f"{FAIL} {i}. {name}: {type(e).__name__}: {e}")
    echo("PASSED" if passed else "FAILED")
    if tmp is not None:
        tmp.cleanup()
    return passed
