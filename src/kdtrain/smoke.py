"""``kdtrain smoke``: the toy pipeline end to end, as a report in which every step checks what it
claims against something computed independently here.

1. toy setup: ``make_toy``; the toy config with ``train.grad_accum=2`` (accumulation shows),
   ``optimizer.warmup_steps=3`` and ``train.steps=4`` (the learning rate moves every step).
2. training rows: step 1's micro-batches against the JSONL records themselves (read with
   ``json``, prompts encoded with the tokenizer): prompt and padding masked, labels the next
   token, each response labelled whole with EOS last, top-k rows at their labels, reference rows
   built from the reference.
3. model: forward shape, parameter count, causality.
4. training step 1: the loss components and the gradients against a reference written here from
   the definitions (float64, probability space, from the student's full logits on the batch's own
   rows; not through ``kdtrain.losses``), the total against the weighted sum, the KL at T = 2
   against the reference with T², and the weights against AdamW's first-step rule.
5. training step 2: it starts from clean gradients, and its gradients and learning rates match
   the references.
6. checkpoint save/load/resume: identical logits and optimizer state; the step, the data
   position (the next batch) and the learning rate restored.

Every number printed is measured in this run. Exit code 0 when every step passed, else 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .config import load_config
from .data import IGNORE

OK, FAIL = "\N{WHITE HEAVY CHECK MARK}", "\N{CROSS MARK}"
REL = 1e-4  # the fp32 chunked loss against the float64 reference
SMOKE_OVERRIDES = ["train.steps=4", "train.grad_accum=2", "optimizer.warmup_steps=3", "kd.temperature=1.0",
                   "kd.divergence=forward_kl", "io.val_shards=[]", "train.checkpoint_every=0"]


class Broke(AssertionError):
    """A check failed; the message says what broke."""


def expect(ok: bool, what_broke: str) -> None:
    if not ok:
        raise Broke(what_broke)


def close(got: float, want: float, rel: float = REL) -> bool:
    return abs(got - want) <= rel * abs(want) + 1e-7


# ---- references, written from the definitions (DESIGN.md, "Loss components") ----

def _xlogy_ratio(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum p * log(p / q) over the last dim, 0 where p = 0."""
    return torch.special.xlogy(p, p / q).sum(-1)


def kl_sums(logits: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, T: float, Tc: float) -> dict:
    """Summed KL terms over positions: teacher and student at temperature T over the k listed tokens
    plus one tail bucket, in probability space, times T². Beside the definition (``forward``), the
    usual ways to get it wrong, to name a mismatch: reverse KL, no tail bucket, no T², an
    untempered student."""
    V, k = logits.shape[-1], ids.shape[-1]
    p_k = lps.double().exp()
    tail = (1 - p_k.sum(-1, keepdim=True)).clamp(min=0)
    r = Tc / T  # teacher at T: each listed p^(Tc/T); its tail spread evenly over V - k tokens, each re-tempered
    p = torch.cat([p_k ** r, (V - k) * (tail / (V - k)) ** r], -1)
    p = p / p.sum(-1, keepdim=True)

    def student(t):
        q_k = torch.softmax(logits.double() / t, -1).gather(-1, ids)
        return torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)

    q = student(T)
    forward = _xlogy_ratio(p, q).sum() * T * T
    top_p, top_q = p[:, :k] / p[:, :k].sum(-1, keepdim=True), q[:, :k] / q[:, :k].sum(-1, keepdim=True)
    return {"forward": forward, "reverse KL": _xlogy_ratio(q, p).sum() * T * T,
            "no tail bucket": _xlogy_ratio(top_p, top_q).sum() * T * T, "no T\N{SUPERSCRIPT TWO}": forward / (T * T),
            "an untempered student": _xlogy_ratio(p, student(1.0)).sum() * T * T}


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed -log q(label) over the labelled positions, q the student's probabilities."""
    valid = labels != IGNORE
    q = torch.softmax(logits[valid].double(), -1)
    return -q.gather(-1, labels[valid, None]).log().sum()


def reference_step(student, batches: list[dict], weights: dict, T: float, Tc: float) -> dict:
    """The step's components from the batches' own rows, normalised by the step's counts of
    labelled positions (with a top-k row for the KL); ``kl_alt`` holds the KL's wrong variants,
    a mean over every position of the rows (prompt and padding counted) among them."""
    kl: dict = {}
    ce = gt = torch.zeros((), dtype=torch.float64)
    n_kl = n_ce = n_gt = n_all = 0
    for b in batches:
        logits = student(input_ids=b["input_ids"]).logits
        ce = ce + ce_sum(logits, b["labels"])
        pos = (b["labels"] != IGNORE) & b["topk_mask"]
        for name, v in kl_sums(logits[pos], b["topk_ids"][pos], b["topk_logprobs"][pos], T, Tc).items():
            kl[name] = kl.get(name, 0) + v
        n_kl, n_ce, n_all = n_kl + int(pos.sum()), n_ce + int((b["labels"] != IGNORE).sum()), n_all + pos.numel()
        if "ref_input_ids" in b:
            gt = gt + ce_sum(student(input_ids=b["ref_input_ids"]).logits, b["ref_labels"])
            n_gt += int((b["ref_labels"] != IGNORE).sum())
    out = {"kl_div": kl.pop("forward") / n_kl, "ce_teacher": ce / n_ce, "ce_ground_truth": gt / max(n_gt, 1)}
    out["total"] = sum(weights[c] * out[c] for c in ("kl_div", "ce_teacher", "ce_ground_truth"))
    out["kl_alt"] = {name: float(v.detach() / n_kl) for name, v in kl.items()}
    out["kl_alt"]["prompt and padding counted in the mean"] = float(out["kl_div"].detach() * n_kl / n_all)
    out["counts"] = (n_kl, n_ce, n_gt)
    return out


def reference_lr(o, steps: int, s: int) -> float:
    """Optimizer step ``s`` (0-based): linear warmup over ``warmup_steps``, then cosine to the floor
    (written as cos², the half-angle form of (1 + cos) / 2)."""
    if s < o.warmup_steps:
        return o.lr * (s + 1) / o.warmup_steps
    x = min(1.0, (s - o.warmup_steps) / max(1, steps - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * math.cos(math.pi * x / 2) ** 2


def matches(got: float, want: float, alternatives: dict) -> str:
    """Names the wrong variant that ``got`` matches (one that differs from the reference ``want``)."""
    hit = [name for name, v in alternatives.items() if close(got, v, 1e-3) and not close(v, want, 1e-3)]
    return f"; it matches the reference with {hit[0]}" if hit else ""


# ---- the checks ----

def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a KD JSONL file, read with ``json`` alone."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    recs = [(n, json.loads(line)) for n, line in enumerate(lines, start=1) if line.strip()]
    return [(n, r) for n, r in recs if "__header__" not in r]


def check_rows(batches: list[dict], idx: list[int], records: list[tuple[int, dict]], tok, mbs: int) -> dict:
    """Each row against its record; returns counts for the report."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    n = dict.fromkeys(("prompt", "padding", "labels", "topk", "ref_rows", "ref_labels"), 0)
    for m, b in enumerate(batches):
        ref_row = 0
        for i in range(b["input_ids"].shape[0]):
            line, rec = records[idx[m * mbs + i]]
            where = f"micro-batch {m + 1} row {i + 1} (dataset line {line})"
            prompt = [bos] + tok.encode(rec["prompt"], add_special_tokens=False)
            resp = rec["response_ids"]
            ids, lab = b["input_ids"][i].tolist(), b["labels"][i].tolist()
            P, R = len(prompt), len(resp)
            labelled = [t for t, v in enumerate(lab) if v != IGNORE]
            expect(ids[:P] == prompt, f"{where} does not start with BOS + its prompt")
            in_prompt = [t for t in labelled if t < P - 1]
            expect(not in_prompt, f"{where}: {len(in_prompt)} prompt positions carry labels: the prompt is not masked")
            expect(all(t + 1 < len(ids) and lab[t] == ids[t + 1] for t in labelled),
                   f"{where}: labels are not the next token (" + ("each equals the token at its own position: "
                   "shifted by one" if all(lab[t] == ids[t] for t in labelled) else "they match neither") + ")")
            expect(all(t < P + R - 1 for t in labelled), f"{where}: positions after the response carry labels: "
                                                         "padding is not masked")
            expect(bool(labelled) and lab[labelled[-1]] == eos, f"{where}: the response does not end with EOS")
            expect([lab[t] for t in labelled] == resp, f"{where}: the labelled tokens are not the record's "
                                                       f"response_ids ({len(labelled)} labels, {R} response_ids)")
            mask = b["topk_mask"][i].nonzero().flatten().tolist()
            expect(mask == labelled, f"{where}: top-k rows sit at positions {mask[:3]}… but the labels at "
                                     f"{labelled[:3]}…: the rows are not aligned to the labels")
            rows = b["topk_ids"][i, labelled].tolist()
            want_lps = torch.tensor(rec["teacher_topk"]["logprobs"]).clamp(max=0)
            bad = [j for j, row in enumerate(rows) if row != rec["teacher_topk"]["ids"][j]]
            expect(not bad and torch.allclose(b["topk_logprobs"][i, labelled], want_lps),
                   f"{where}: the top-k row at the label of response token {bad[0] if bad else '?'} is not the "
                   "record's row for that token")
            n["prompt"] += P - 1
            n["padding"] += len(ids) - (P + R)
            n["labels"] += len(labelled)
            n["topk"] += len(mask)
            if "reference" in rec:
                ref = tok.encode(rec["reference"], add_special_tokens=False) + [eos]
                r_ids = b["ref_input_ids"][ref_row].tolist()
                r_lab = [v for v in b["ref_labels"][ref_row].tolist() if v != IGNORE]
                ref_row += 1
                expect(r_lab[-1:] == [eos], f"{where}: the reference row does not end with EOS")
                expect(r_lab == ref and r_ids[:P + len(ref)] == prompt + ref,
                       f"{where}: the ground-truth row is not prompt -> reference + EOS"
                       + (" (it holds the teacher's text)" if r_lab == resp else ""))
                n["ref_rows"] += 1
                n["ref_labels"] += len(r_lab)
    return n


def grads(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def check_step(trainer, batches: list[dict], step: int, say) -> dict:
    """Forward + backward of one optimizer step against the reference; returns what it measured."""
    student, cfg = trainer.student, trainer.cfg
    weights = trainer.model.weights
    params = [p for p in student.parameters() if p.requires_grad]
    sums = trainer.forward_backward(batches)
    got = dict(zip(("kl_div", "ce_teacher", "ce_ground_truth", "total"), sums.tolist()))
    g = grads(params)
    bad = [n for (n, p), x in zip(student.named_parameters(), g) if not torch.isfinite(x).all()]
    expect(not bad, f"gradient of {bad[0] if bad else ''} is not finite")
    ref = reference_step(student, batches, weights, cfg.kd.temperature, trainer.train_data.topk_temperature or 1.0)
    n_kl, n_ce, n_gt = ref["counts"]
    say(f"reference over {n_kl} positions with top-k rows, {n_ce} teacher and {n_gt} reference labels")
    for c in ("kl_div", "ce_teacher", "ce_ground_truth"):
        want = ref[c].item()
        say(f"{c} {got[c]:.6f}, reference {want:.6f}")
        expect(close(got[c], want), f"{c} is {got[c]:.6f} but the reference gives {want:.6f}"
               + (matches(got[c], want, ref["kl_alt"]) if c == "kl_div" else ""))
    w_sum = sum(weights[c] * got[c] for c in ("kl_div", "ce_teacher", "ce_ground_truth"))
    terms = " + ".join(f"{weights[c]:g}\N{MIDDLE DOT}{got[c]:.4f}" for c in ("kl_div", "ce_teacher", "ce_ground_truth"))
    say(f"total {got['total']:.6f} = {terms} = {w_sum:.6f}; reference {ref['total'].item():.6f}")
    expect(close(got["total"], w_sum), f"the total {got['total']:.6f} is not the weighted sum {w_sum:.6f} "
                                       "of its components: the loss weights are not applied")
    expect(close(got["total"], ref["total"].item()), f"the total differs from the reference {ref['total'].item():.6f}")
    g_ref = torch.autograd.grad(ref["total"], params)
    diff = math.sqrt(sum(float((a - b.float()).pow(2).sum()) for a, b in zip(g, g_ref)))
    norm = math.sqrt(sum(float(b.pow(2).sum()) for b in g_ref))
    say(f"gradients of all {len(params)} parameters finite; against the reference's: relative difference "
        f"{diff / norm:.2e} (norm {norm:.4f})")
    expect(diff <= 1e-3 * norm, f"the gradients of step {step} differ from the reference's by {diff / norm:.2e} "
                                "of its norm" + (" (they hold earlier steps' gradients too?)" if step > 1 else ""))
    return {"sums": sums, "grads": g, "lr": float(trainer.optimizer.param_groups[0]["lr"])}


def check_adamw_first_step(trainer, before: dict, g: list[torch.Tensor], lr: float, say) -> None:
    """AdamW's first step: w <- w (1 - lr wd) - lr g / (|g| + eps), g after clipping to the norm limit."""
    o = trainer.cfg.optimizer
    norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in g))
    scale = o.grad_clip / norm if 0 < o.grad_clip < norm else 1.0
    worst, moved, total = 0.0, 0, 0
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    grad_of = dict(zip((id(p) for p in trainer.student.parameters() if p.requires_grad), g))
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            w0, gc = before[names[id(p)]], grad_of[id(p)] * scale
            want = w0 * (1 - lr * group["weight_decay"]) - lr * gc / (gc.abs() + o.eps)
            worst = max(worst, float((p.detach() - want).abs().max()))
            moved += not torch.equal(p.detach(), w0)
            total += 1
    say(f"optimizer step 1 at lr {lr:.3g} changed {moved} of {total} parameters; largest deviation from AdamW's "
        f"first-step rule {worst:.2e} (grad norm {norm:.3f}, clipped to {o.grad_clip:g})")
    expect(moved == total and worst <= 1e-3 * lr,
           f"the optimizer step changed {moved} of {total} parameters and deviates from AdamW's first step by "
           f"{worst:.2e} (step size {lr:.3g})")


def run_smoke(out_dir: str | Path | None = None, echo=print) -> bool:
    from .data import Sampler
    from .model import Distiller, step_counts
    from .toy import make_toy
    from .trainer import Trainer

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kdtrain-smoke-")
        out_dir = tmp.name
    state: dict = {}

    def step_1(say):
        t0 = time.perf_counter()
        paths = make_toy(Path(out_dir) / "toy")
        shutil.rmtree(Path(out_dir) / "run", ignore_errors=True)  # each report trains afresh
        state["cfg"], _ = load_config([paths["config"]], [f"io.output_dir={Path(out_dir) / 'run'}", *SMOKE_OVERRIDES])
        state["dataset"] = paths["dataset"]
        say(f"toy setup created in {paths['dir']} ({time.perf_counter() - t0:.2f} s)")

    def step_2(say):
        cfg = state["cfg"]
        trainer = state["trainer"] = Trainer(cfg, log=False)
        data, t = trainer.train_data, cfg.train
        records = read_records(state["dataset"])
        expect(len(records) == len(data), f"{len(records)} records in the file but {len(data)} samples loaded")
        say(f"dataset: {len(data)} samples, top-{data.k} teacher rows on {data.n_topk}, references on "
            f"{data.n_reference}; tokenizer {len(trainer.tokenizer)} pieces")
        count = t.micro_batch_size * t.grad_accum
        idx = Sampler(len(data), t.seed, trainer.sampler.position).take(count)
        state["batches"] = batches = trainer.micro_batches(cfg.seq_len_at(0))
        n = check_rows(batches, idx, records, trainer.tokenizer, t.micro_batch_size)
        say(f"step 1's {len(batches)} micro-batches (dataset lines {[records[i][0] for i in idx]}) against the "
            f"records: {n['prompt']} prompt and {n['padding']} padding positions masked; {n['labels']} labels, "
            f"each the next token, each row's response_ids whole with EOS last; {n['topk']} top-k rows at their "
            f"labels, equal to the records'; {n['ref_rows']} reference rows = prompt -> reference + EOS "
            f"({n['ref_labels']} labels)")

    def step_3(say):
        cfg, model = state["cfg"], state["trainer"].student
        ids = torch.randint(0, cfg.arch.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            changed = ids.clone()
            changed[0, -1] = (changed[0, -1] + 1) % cfg.arch.vocab_size
            moved = float((model(input_ids=changed).logits[:, :-1] - logits[:, :-1]).abs().max())
        n = sum(p.numel() for p in model.parameters())
        say(f"forward {list(logits.shape)}, {n:,} parameters; changing the last token moved earlier logits by "
            f"{moved:.1e}")
        expect(moved == 0, "changing the last token changed earlier logits: the model is not causal")

    def step_4(say):
        trainer, cfg = state["trainer"], state["cfg"]
        before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
        m = check_step(trainer, state["batches"], 1, say)
        trainer.optimizer_step(m["sums"])
        check_adamw_first_step(trainer, before, m["grads"], m["lr"], say)
        state["lrs"] = [m["lr"]]
        # The KL at T = 2 through the trainer's own loss, against the reference with T².
        hot = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, temperature=2.0))
        Tc = trainer.train_data.topk_temperature or 1.0
        batches, counts = state["batches"], step_counts(state["batches"])
        with torch.no_grad():
            got = sum(float(Distiller(trainer.student, hot, Tc)(b, counts)["kl_div"]) for b in batches)
            ref = reference_step(trainer.student, batches, trainer.model.weights, 2.0, Tc)
        want = float(ref["kl_div"])
        say(f"kl_div at T=2 {got:.6f}, reference with T\N{SUPERSCRIPT TWO} {want:.6f} "
            f"(without it {ref['kl_alt']['no T' + chr(178)]:.6f})")
        expect(close(got, want), f"kl_div at T=2 is {got:.6f} but the reference gives {want:.6f}"
               + matches(got, want, ref["kl_alt"]))

    def step_5(say):
        trainer, cfg = state["trainer"], state["cfg"]
        held = [n for n, p in trainer.student.named_parameters() if p.grad is not None and bool(p.grad.any())]
        say(f"after optimizer step 1, {len(held)} parameters hold a gradient")
        expect(not held, f"after optimizer step 1, {len(held)} parameters still hold gradients (e.g. {held[:1]}): "
                         "they are not zeroed between optimizer steps")
        m = check_step(trainer, trainer.micro_batches(cfg.seq_len_at(1)), 2, say)
        trainer.optimizer_step(m["sums"])
        state["lrs"].append(m["lr"])
        want = [reference_lr(cfg.optimizer, cfg.train.steps, s) for s in range(2)]
        say(f"learning rates of steps 1, 2: {', '.join(f'{x:.4g}' for x in state['lrs'])}; schedule "
            f"{', '.join(f'{x:.4g}' for x in want)}")
        expect(all(close(a, b, 1e-9) for a, b in zip(state["lrs"], want)),
               f"the learning rates {', '.join(f'{x:.4g}' for x in state['lrs'])} do not follow the schedule "
               "counted in optimizer steps")

    def step_6(say):
        trainer, cfg = state["trainer"], state["cfg"]
        path = trainer.save()
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        resumed = Trainer(cfg, resume=True, log=False)
        batch = state["batches"][0]
        with torch.no_grad():
            a = trainer.student.eval()(input_ids=batch["input_ids"]).logits
            b = resumed.student.eval()(input_ids=batch["input_ids"]).logits
        say(f"{path.name} ({size:.1f} MiB) saved and resumed: logits differ by {float((a - b).abs().max()):.1e}")
        expect(torch.equal(a, b), f"the resumed model's logits differ by {(a - b).abs().max().item():.3g}")
        s1, s2 = trainer.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
        same = len(s1) == len(s2) and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
        say(f"optimizer state: {len(s1)} parameter states saved, {len(s2)} resumed")
        expect(same, "the resumed optimizer state differs from the saved one")
        t = cfg.train
        pos = 2 * t.micro_batch_size * t.grad_accum
        lr_next = reference_lr(cfg.optimizer, t.steps, 2)
        lr = float(resumed.optimizer.param_groups[0]["lr"])
        say(f"resumed at step {resumed.step}, data position {resumed.sampler.position} (2 steps x {pos // 2} "
            f"samples = {pos}), lr {lr:.4g} (schedule for step 3: {lr_next:.4g})")
        expect(resumed.step == 2, f"resumed at step {resumed.step}, saved at step 2")
        expect(resumed.sampler.position == pos, f"resumed at data position {resumed.sampler.position}, saved at {pos}: "
                                                        "the data position is not restored")
        expect(close(lr, lr_next, 1e-9), f"resumed with lr {lr:.4g}, the schedule gives {lr_next:.4g} for step 3")
        nxt = [b["input_ids"] for b in trainer.micro_batches(cfg.seq_len_at(2))]
        got = [b["input_ids"] for b in resumed.micro_batches(cfg.seq_len_at(2))]
        same = all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(nxt, got))
        say(f"step 3's micro-batches: {'identical' if same else 'different'} in the resumed and the original trainer")
        expect(same, "the resumed trainer's next batch differs from the original's: the data position is lost")

    steps = [("create toy setup", step_1), ("training rows", step_2), ("model", step_3),
             ("training step 1", step_4), ("training step 2", step_5), ("checkpoint save/load/resume", step_6)]
    passed = True
    for i, (name, fn) in enumerate(steps, start=1):
        if not passed:
            echo(f"{FAIL} {i}. {name}: skipped after an earlier failure")
            continue
        lines: list[str] = []
        t0 = time.perf_counter()
        try:
            fn(lines.append)
            echo(f"{OK} {i}. {name} ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # the report must name every failure, whatever its type
            passed = False
            lines.append(f"broke: {e}" if isinstance(e, Broke) else f"broke: {type(e).__name__}: {e}")
            echo(f"{FAIL} {i}. {name}")
        for line in lines:
            echo(f"   {line}")
    echo("PASSED" if passed else "FAILED")
    if tmp is not None:
        tmp.cleanup()
    return passed
