"""The training loop on the toy: steps, accumulation invariance, resume, curriculum, metrics, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from kdtrain.config import ConfigError
from kdtrain.data import Sampler, collate
from kdtrain.trainer import Trainer, TrainingError, lr_at, param_groups


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.student.named_parameters()}


@pytest.mark.smoke
def test_train_step_gives_finite_gradients_and_moves_every_weight(toy_cfg, tokenizer):
    trainer = Trainer(toy_cfg, log=False, tokenizer=tokenizer)
    before = _weights(trainer)
    trainer.forward_backward(trainer.micro_batches(64))
    params = [(n, p) for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                          for _, p in params)
    trainer.optimizer_step()
    assert all(not torch.equal(before[n], p) for n, p in params)
    assert trainer.step == 1


@pytest.mark.smoke
def test_first_losses_are_pinned(make_cfg, tokenizer):
    """Any diff that moves these numbers is changing the objective (fixed seed, fp32, CPU).

    The toy artifacts are the same bytes on any CPU (float64 fit and init, see kdtrain.toy), so
    these hold on any instruction set: the fp32 step itself differs across CPUs by ~2e-6 (AVX2
    against ATEN_CPU_CAPABILITY=default), well inside 1e-5. Independent anchor: the first row's
    ce_teacher equals a plain Hugging Face forward's cross-entropy on the same batch.
    """
    trainer = Trainer(make_cfg("train.steps=3", "io.val_shards=[]"), log=False, tokenizer=tokenizer)
    batch = trainer.micro_batches(64)[0]
    trainer.sampler.position = 0  # fit() draws the same first batch again
    with torch.no_grad():
        logits = trainer.student(input_ids=batch["input_ids"]).logits
    valid = batch["labels"] != -100
    reference = torch.nn.functional.cross_entropy(logits[valid], batch["labels"][valid]).item()
    rows = trainer.fit(until=2)  # the first 2 steps of the 3-step schedule
    assert rows[0]["ce_teacher"] == pytest.approx(reference, abs=1e-5)
    got = [(r["total"], r["kl_div"], r["ce_teacher"], r["ce_ground_truth"]) for r in rows]
    for g, p in zip(got, PINNED_FIRST_LOSSES, strict=True):
        assert g == pytest.approx(p, abs=1e-5)


PINNED_FIRST_LOSSES = [
    (17.228443145751953, 6.849761962890625, 10.334553718566895, 10.422802925109863),
    (17.37706756591797, 7.242749214172363, 10.084464073181152, 10.184168815612793),
]


@pytest.mark.slow
def test_fifty_toy_steps_halve_the_loss(make_cfg):
    rows = Trainer(make_cfg("train.steps=50", "train.eval_every=0", "train.checkpoint_every=0"), log=False).fit()
    assert rows[-1]["total"] <= 0.5 * rows[0]["total"]


def test_accumulation_invariance_4x1_equals_1x4(make_cfg, tmp_path):
    """Losses are normalised by the valid tokens of the whole step, so the split does not matter.

    Gradients are compared before the optimizer (Adam's g / sqrt(v) magnifies 1e-7 differences
    on near-zero gradients into the weights); losses and grad norms over two steps."""
    a = Trainer(make_cfg("train.micro_batch_size=4", "train.grad_accum=1", "train.steps=2"), log=False)
    b = Trainer(make_cfg("train.micro_batch_size=1", "train.grad_accum=4", "train.steps=2",
                         f"io.output_dir={tmp_path / 'b'}"), log=False)
    for t in (a, b):
        t.forward_backward(t.micro_batches(64))
    for (n, pa), pb in zip(a.student.named_parameters(), b.student.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5, msg=n)
    for t in (a, b):
        t.optimizer_step()
    ra, rb = a.fit(), b.fit()
    assert len(ra) == len(rb) == 1
    for key in ("total", "kl_div", "ce_teacher", "ce_ground_truth", "grad_norm"):
        assert ra[0][key] == pytest.approx(rb[0][key], rel=1e-5, abs=1e-5), key


def test_resume_is_bit_exact(make_cfg, tmp_path):
    straight = Trainer(make_cfg("train.steps=10", f"io.output_dir={tmp_path / 's'}"), log=False)
    rows_s = straight.fit()
    first = Trainer(make_cfg("train.steps=10", f"io.output_dir={tmp_path / 'r'}"), log=False)
    first.fit(until=5)  # stop after 5 of the 10 planned steps: the schedule still spans 10
    resumed = Trainer(make_cfg("train.steps=10", f"io.output_dir={tmp_path / 'r'}"), resume=True, log=False)
    assert resumed.step == 5
    rows_r = resumed.fit()
    assert [r["total"] for r in rows_r] == [r["total"] for r in rows_s[5:]]
    assert [r["grad_norm"] for r in rows_r] == [r["grad_norm"] for r in rows_s[5:]]
    ws, wr = _weights(straight), _weights(resumed)
    assert all(torch.equal(ws[n], wr[n]) for n in ws)


# ---- fast versions of the step and resume tests above, each named after what it guards ----

def _grads(trainer) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.student.parameters()]


def test_a_given_tokenizer_must_match_the_vocabulary(make_cfg, tokenizer):
    with pytest.raises(ConfigError, match="32000 tokens but arch.vocab_size is 32064"):
        Trainer(make_cfg("arch.vocab_size=32064"), log=False, tokenizer=tokenizer)


@pytest.mark.smoke
def test_gradients_are_zeroed_between_optimizer_steps(toy_cfg, tokenizer):
    """Step 2's gradients are its own: none are left after step 1, and its backward gives the
    same gradients as the same backward from an explicitly cleared state."""
    trainer = Trainer(toy_cfg, log=False, tokenizer=tokenizer)
    trainer.train_step(trainer.micro_batches(64))
    assert all(p.grad is None or not p.grad.any() for p in trainer.student.parameters())
    batches = trainer.micro_batches(64)
    trainer.forward_backward(batches)
    second = _grads(trainer)
    for p in trainer.student.parameters():
        p.grad = None
    trainer.forward_backward(batches)
    assert all(torch.equal(a, b) for a, b in zip(second, _grads(trainer)))


@pytest.mark.smoke
def test_learning_rate_advances_per_optimizer_step_not_per_micro_batch(make_cfg, tokenizer):
    """With 3 warmup steps the optimizer steps run at lr/3 and 2lr/3 (linear warmup), whatever
    the number of micro-batches per step (here 2)."""
    trainer = Trainer(make_cfg("train.micro_batch_size=1", "train.grad_accum=2", "optimizer.warmup_steps=3",
                               "train.steps=4"), log=False, tokenizer=tokenizer)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(float(opt.param_groups[0]["lr"])))
    for _ in range(2):
        trainer.train_step(trainer.micro_batches(64))
    lr = trainer.cfg.optimizer.lr
    assert seen == pytest.approx([lr / 3, 2 * lr / 3], rel=1e-12)


@pytest.mark.smoke
def test_accumulation_normalises_by_the_step_token_count_not_per_micro_batch(make_cfg, tokenizer):
    """Two rows of different lengths as 2 micro-batches of 1 give the losses and gradients of the
    same rows as 1 micro-batch of 2 (a mean of per-micro-batch means would weight them apart)."""
    trainer = Trainer(make_cfg("train.micro_batch_size=1", "train.grad_accum=2"), log=False, tokenizer=tokenizer)
    two = trainer.micro_batches(64)
    assert int((two[0]["labels"] != -100).sum()) != int((two[1]["labels"] != -100).sum())  # else no test
    idx = Sampler(len(trainer.train_data), trainer.cfg.train.seed).take(2)
    one = collate([trainer.train_data.samples[i] for i in idx], 64, trainer.tokenizer.pad_token_id,
                  trainer.train_data.k, with_reference=True)
    assert torch.equal(one["input_ids"][1, : two[1]["input_ids"].shape[1]], two[1]["input_ids"][0])  # same rows
    sums_two = trainer.forward_backward(two)
    grads_two = _grads(trainer)
    for p in trainer.student.parameters():
        p.grad = None
    sums_one = trainer.forward_backward([one])
    torch.testing.assert_close(sums_two, sums_one, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_two, _grads(trainer)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.smoke
def test_resume_restores_the_data_position(make_cfg, tokenizer):
    """After one step of 2 samples (micro_batch_size 2, no accumulation) the resumed run reads
    from position 2: the same next batch as the run that never stopped."""
    first = Trainer(make_cfg("train.steps=2"), log=False, tokenizer=tokenizer)
    first.train_step(first.micro_batches(64))
    first.save()
    resumed = Trainer(make_cfg("train.steps=2"), resume=True, log=False, tokenizer=tokenizer)
    assert resumed.sampler.position == 2
    assert torch.equal(resumed.micro_batches(64)[0]["input_ids"], first.micro_batches(64)[0]["input_ids"])


KILL_SCRIPT = """
import os, sys
import kdtrain.checkpoint as ck
from kdtrain.config import load_config
from kdtrain.trainer import Trainer
real = ck.save_file
calls = []
def dying_save_file(tensors, path):
    calls.append(path)
    if len(calls) == 2:  # second checkpoint: write half the file, then die
        with open(path, "wb") as f:
            f.write(b"partial")
        os._exit(9)
    real(tensors, path)
ck.save_file = dying_save_file
cfg, _ = load_config([sys.argv[1]], sys.argv[2:])
Trainer(cfg).fit()
"""


def test_killed_during_checkpoint_write_resumes_from_previous(toy, tmp_path, make_cfg):
    out = tmp_path / "killed"
    args = [f"io.output_dir={out}", "train.steps=6", "train.checkpoint_every=3", "train.eval_every=0",
            "tracing.console_log=false"]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(toy["config"]), *args], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    ckdir = out / "checkpoints"
    assert (ckdir / "step_00000003" / "meta.json").is_file()
    assert (ckdir / ".tmp-step_00000006").is_dir() and not (ckdir / "step_00000006").exists()
    logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 6 was logged, then its checkpoint write died
    resumed = Trainer(make_cfg(*args), resume=True)
    assert resumed.step == 3
    rows = resumed.fit()
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert (ckdir / "step_00000006" / "model.safetensors").is_file()
    # The rows of the steps trained again replace the old ones: one row per step.
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["total"] for r in logged[3:]] == [r["total"] for r in rows]


def test_checkpoint_larger_than_free_disk_is_refused_before_writing(make_cfg, tmp_path, monkeypatch):
    import shutil

    from kdtrain import distributed
    from kdtrain.checkpoint import CheckpointError

    trainer = Trainer(make_cfg("train.steps=1", f"io.output_dir={tmp_path / 'full'}"), log=False)
    real = shutil.disk_usage
    monkeypatch.setattr(distributed.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(CheckpointError, match=r"checkpoint of step 1 needs .* GB but .* has 0\.0 GB free"):
        trainer.fit()
    assert list((tmp_path / "full" / "checkpoints").iterdir()) == []  # nothing half-written


def test_stale_partial_checkpoints_are_cleared_before_the_free_space_is_measured(make_cfg, tmp_path):
    out = tmp_path / "stale"
    stale = out / "checkpoints" / ".tmp-step_00000007"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    Trainer(make_cfg("train.steps=1", f"io.output_dir={out}"), log=False).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


def test_metrics_jsonl_tensorboard_and_plot(make_cfg):
    cfg = make_cfg("train.steps=4", "train.eval_every=2", "tracing.use_tensorboard=true", "tracing.console_log=false")
    Trainer(cfg).fit()
    run = cfg.io.output_dir
    from pathlib import Path

    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(l) for l in lines]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "total", "kl_div", "ce_teacher", "ce_ground_truth", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    assert "val_total" in rows[1] and "val_total" not in rows[0]
    assert rows[1]["val_ppl"] == pytest.approx(math.exp(rows[1]["val_ce_teacher"]))
    assert (Path(run) / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run) / "logs" / "tensorboard"))
    acc.Reload()
    totals = [e.value for e in acc.Scalars("train/total")]
    assert totals == pytest.approx([r["total"] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/total")] == [2, 4]


def test_curriculum_applies_sequence_lengths(make_cfg):
    cfg = make_cfg("train.seq_lengths=[12,24]", "curriculum.schedule=[0,2]", "train.steps=4")
    trainer = Trainer(cfg, log=False)
    widths = []
    real = trainer.train_step
    trainer.train_step = lambda batches: (widths.append(max(b["input_ids"].shape[1] for b in batches)), real(batches))[1]
    rows = trainer.fit()
    assert [r["seq_len"] for r in rows] == [12, 12, 24, 24]
    assert max(widths[:2]) <= 12 and max(widths[2:]) > 12


def test_all_train_shards_are_read(toy, tmp_path, make_cfg):
    lines = toy["dataset"].read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[1:4]) + "\n")
    b.write_text("\n".join(lines[4:]) + "\n")
    trainer = Trainer(make_cfg(f"io.train_shards=[{a},{b}]"), log=False)
    assert len(trainer.train_data) == len(lines) - 1


def test_non_finite_loss_stops_before_the_optimizer(toy_cfg):
    trainer = Trainer(toy_cfg, log=False)
    with torch.no_grad():
        trainer.student.lm_head.weight[5, 0] = float("nan")
    before = _weights(trainer)
    with pytest.raises(TrainingError, match="step 1"):
        trainer.train_step(trainer.micro_batches(64))
    after = _weights(trainer)
    assert all(torch.equal(before[n], after[n]) or torch.isnan(before[n]).any() for n in before)
    assert trainer.step == 0


def test_non_finite_gradient_stops_before_the_optimizer(toy_cfg):
    """A finite loss with a NaN gradient (bf16/fp32 have no scaler to skip the step)."""
    trainer = Trainer(toy_cfg, log=False)
    trainer.student.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = _weights(trainer)
    with pytest.raises(TrainingError, match="non-finite gradient norm .* step 1; the optimizer did not step"):
        trainer.train_step(trainer.micro_batches(64))
    assert all(torch.equal(before[n], p) for n, p in trainer.student.named_parameters())
    assert trainer.step == 0


@pytest.mark.parametrize("clip", [1e-3, 1e6, 0.0], ids=["clipping", "under-the-limit", "off"])
def test_clipping_matches_torch_clip_grad_norm(make_cfg, clip):
    """The gradients the optimizer sees, and the reported norm, against torch's own
    ``clip_grad_norm_`` on copies (which multiplies even when the norm is under the limit)."""
    trainer = Trainer(make_cfg(f"optimizer.grad_clip={clip}"), log=False)
    sums = trainer.forward_backward(trainer.micro_batches(64))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in trainer.student.parameters()]
    for r, p in zip(ref, trainer.student.parameters()):
        r.grad = p.grad.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip > 0 else float("inf"))
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.extend(p.grad.clone() for p in trainer.student.parameters()))
    row = trainer.optimizer_step(sums)
    assert row["grad_norm"] == pytest.approx(float(ref_norm), rel=1e-6)
    assert (row["grad_norm"] > clip > 0) == (clip == 1e-3)  # the cases are what they say
    for g, r in zip(seen, ref, strict=True):
        torch.testing.assert_close(g, r.grad, rtol=1e-6, atol=0)


def test_lr_schedule_warmup_then_cosine(make_cfg):
    cfg = make_cfg("optimizer.lr=1.0", "optimizer.warmup_steps=4", "optimizer.min_lr_ratio=0.1", "train.steps=14")
    assert [lr_at(cfg, s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # half-way through the decay: floor + (1 - floor) * (1 + cos(pi/2)) / 2
    assert lr_at(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 14) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_embeddings(toy_cfg):
    trainer = Trainer(toy_cfg, log=False)
    decay, no_decay = param_groups(trainer.student, 0.1)
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert any("lm_head" in names[id(p)] for p in decay["params"])


# ---- bad input: each stops before training with a message that says what to change ----

def _no_topk_dataset(toy, tmp_path):
    path = tmp_path / "old.jsonl"
    rows = []
    for l in toy["dataset"].read_text().splitlines()[1:]:
        r = json.loads(l)
        rows.append(json.dumps({"prompt": r["prompt"], "teacher_text": r["teacher_text"], "metadata": {},
                                "teacher_logits": None}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("case", ["kl_without_teacher", "gt_without_reference", "tokenizer_size", "missing_shard",
                                  "unwritable_output", "resume_without_checkpoint", "fp16_on_cpu"])
def test_bad_setup_is_refused_before_training(case, toy, tmp_path, make_cfg):
    old = _no_topk_dataset(toy, tmp_path)
    overrides, kwargs, expect = {
        "kl_without_teacher": ([f"io.train_shards=[{old}]", "io.val_shards=[]", "distillation.ce_ground_truth_weight=0"],
                               {}, "no teacher signal"),
        "gt_without_reference": ([f"io.train_shards=[{old}]", "io.val_shards=[]", "distillation.kl_weight=0"],
                                 {}, "has a 'reference'"),
        "tokenizer_size": (["arch.vocab_size=32064"], {}, "arch.vocab_size=32000"),
        "missing_shard": ([f"io.train_shards=[{tmp_path / 'nope.jsonl'}]"], {}, "nope.jsonl does not exist"),
        "unwritable_output": ([f"io.output_dir={old}/sub"], {}, "not writable"),
        "resume_without_checkpoint": ([], {"resume": True}, "no checkpoint"),
        "fp16_on_cpu": (["train.precision=fp16", "train.device=cpu"], {}, "fp16 needs CUDA"),
    }[case]
    with pytest.raises(ConfigError, match=expect):
        Trainer(make_cfg(*overrides), log=False, **kwargs)


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(make_cfg):
    Trainer(make_cfg("train.steps=1"), log=False).fit()
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(latest step_00000001\); pass --resume"):
        Trainer(make_cfg("train.steps=2"), log=False)
    assert Trainer(make_cfg("train.steps=2"), resume=True, log=False).step == 1


def test_old_format_trains_with_ce_only(toy, tmp_path, make_cfg):
    old = _no_topk_dataset(toy, tmp_path)
    rows = Trainer(make_cfg(f"io.train_shards=[{old}]", "io.val_shards=[]", "distillation.kl_weight=0",
                            "distillation.ce_ground_truth_weight=0", "kd.teacher=none", "train.steps=2"),
                   log=False).fit()
    assert rows[0]["kl_div"] == 0 and rows[0]["ce_teacher"] > 0


@pytest.mark.parametrize("change", ["dataset", "shape"])
def test_resume_with_changed_dataset_or_shape_is_refused(change, toy, tmp_path, make_cfg):
    Trainer(make_cfg("train.steps=1"), log=False).fit()
    if change == "dataset":
        data = tmp_path / "other.jsonl"
        data.write_text("\n".join(toy["dataset"].read_text().splitlines()[1:6]) + "\n")
        overrides, expect = [f"io.train_shards=[{data}]"], "other data"
    else:
        overrides, expect = ["arch.d_ff=128", "init.weights=null"], r"arch.d_ff changed \(checkpoint 256, config 128\)"
    with pytest.raises(TrainingError, match=expect):
        Trainer(make_cfg("train.steps=2", *overrides), resume=True, log=False)


SIGNAL_ARGS = ["train.steps=20", "train.eval_every=0", "io.val_shards=[]", "tracing.console_log=false"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(path):
    return [(r["step"], r["total"], r["kl_div"], r["ce_teacher"], r["ce_ground_truth"])
            for r in map(json.loads, path.read_text().splitlines())]


@pytest.fixture(scope="module")
def straight_run(toy, tmp_path_factory):
    """The uninterrupted reference, in its own process like the interrupted one."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, "-m", "kdtrain", "train", str(toy["config"]), *SIGNAL_ARGS,
                    f"io.output_dir={out}"], env=ONE_THREAD, check=True, capture_output=True, timeout=600)
    return _losses(out / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_checkpoints_and_resume_continues_exactly(toy, tmp_path, straight_run, signum):
    """What a scheduler does before preempting a job (SIGTERM), or a user's Ctrl-C: the current step
    finishes, a checkpoint is written, one line says so, and --resume gives the losses of an
    uninterrupted run, bit for bit (CPU, fp32, the same thread count in every process)."""
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdtrain", "train", str(toy["config"]), *SIGNAL_ARGS, f"io.output_dir={run}"]
    proc = subprocess.Popen(cmd, env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and f"stopped by {signal.Signals(signum).name} after step" in lines[0], err
    stopped = int(lines[0].split("after step ")[1].split(";")[0])
    assert 2 <= stopped < 20
    assert (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    done = subprocess.run(cmd + ["--resume"], env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _losses(metrics) == straight_run
