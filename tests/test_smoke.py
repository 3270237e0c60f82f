"""``kdtrain smoke`` (``kdtrain/smoke.py``): the report passes on the pipeline as it is, and each
defect of the pipeline it replaced, monkeypatched into kdtrain one at a time, makes it print
FAILED, exit 1 and name what broke at the step that checks it."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

import kdtrain.data as data_mod
import kdtrain.losses as losses
import kdtrain.model as model_mod
import kdtrain.toy as toy_mod
import kdtrain.trainer as trainer_mod
from kdtrain.cli import main

OK, FAIL = "\u2705", "\u274c"
STEPS = ["create toy setup", "training rows", "model", "training step 1", "training step 2",
         "checkpoint save/load/resume"]


@pytest.fixture
def prebuilt_toy(toy, monkeypatch):
    """The report on the session's toy artifacts (built by the same make_toy), to save a rebuild."""
    monkeypatch.setattr(toy_mod, "make_toy", lambda out_dir: toy)
    return toy


def report(capsys, *args: str) -> tuple[int, str]:
    code = main(["smoke", *args])
    return code, capsys.readouterr().out


def test_smoke_report_passes_with_measured_numbers(toy, capsys):
    """The real command, toy build included. Its numbers are checked here against what they must
    be: each measured value equals the reference printed beside it, the total is the weighted sum
    with the toy config's weights, and ce_teacher starts near ln(32000) (a student at std-0.02 init
    is close to uniform over the vocabulary)."""
    code, out = report(capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[-1] == "PASSED"
    headers = [l for l in lines if l[:1] in (OK, FAIL)]
    assert [h[:1] for h in headers] == [OK] * len(STEPS)
    assert [re.sub(r"^\S+ \d\. | \([0-9.]+ s\)$", "", h) for h in headers] == STEPS
    pairs = re.findall(r"(kl_div|ce_teacher|ce_ground_truth) ([0-9.]+), reference ([0-9.]+)", out)
    assert len(pairs) == 6  # three components in each of two steps
    for _, got, ref in pairs:
        assert float(got) == pytest.approx(float(ref), rel=1e-4)
    weights = yaml.safe_load(toy["config"].read_text())["distillation"]
    first = {name: float(got) for name, got, _ in pairs[:3]}
    total = float(re.search(r"total ([0-9.]+) =", out).group(1))
    assert total == pytest.approx(weights["kl_weight"] * first["kl_div"] + weights["ce_teacher_weight"]
                                  * first["ce_teacher"] + weights["ce_ground_truth_weight"]
                                  * first["ce_ground_truth"], rel=1e-5)
    assert abs(first["ce_teacher"] - math.log(32000)) < 0.05
    assert "forward [1, 10, 32000], 4,219,200 parameters" in out
    t2, t2_ref, t2_without = map(float, re.search(
        r"kl_div at T=2 ([0-9.]+), reference with T\u00b2 ([0-9.]+) \(without it ([0-9.]+)\)", out).groups())
    assert t2 == pytest.approx(t2_ref, rel=1e-4) and t2_ref == pytest.approx(4 * t2_without, rel=1e-9)
    assert "resumed at step 2, data position 8" in out


def test_smoke_report_runs_twice_in_one_out_dir(prebuilt_toy, tmp_path, capsys):
    assert report(capsys, "--out-dir", str(tmp_path))[0] == 0
    code, out = report(capsys, "--out-dir", str(tmp_path))
    assert code == 0 and out.strip().endswith("PASSED")


# ---- defects of the pipeline kdtrain replaced, each patched in the way that pipeline had it ----

def _edit_batches(mp, edit):
    real = data_mod.collate
    mp.setattr(trainer_mod, "collate", lambda *a, **k: edit(real(*a, **k)))


def _edit_samples(mp, edit):
    real = data_mod.parse_record

    def parse(*a, **k):
        sample, k_, temp = real(*a, **k)
        edit(sample)
        return sample, k_, temp

    mp.setattr(data_mod, "parse_record", parse)


def kl_over_padding_and_prompt(mp):
    real = model_mod.step_counts

    def counts(batches):
        return {**real(batches), "n_kl": sum(b["labels"].numel() for b in batches)}

    mp.setattr(trainer_mod, "step_counts", counts)


def no_t_squared(mp):
    real = losses.kl_per_position
    mp.setattr(losses, "kl_per_position", lambda s, t, temperature=1.0, *a, **k:
               real(s, t, temperature, *a, **k) / temperature ** 2)


def prompt_in_labels(mp):
    def edit(b):
        for i in range(b["labels"].shape[0]):
            last = int((b["labels"][i] != -100).nonzero().max())
            b["labels"][i, :last] = b["input_ids"][i, 1:last + 1]
        return b

    _edit_batches(mp, edit)


def labels_shifted_by_one(mp):
    _edit_batches(mp, lambda b: {**b, "labels": b["labels"].roll(1, dims=1)})


def topk_rows_misaligned(mp):
    _edit_batches(mp, lambda b: {**b, **{k: b[k].roll(1, dims=1) for k in ("topk_ids", "topk_logprobs", "topk_mask")}})


def tail_bucket_dropped(mp):
    mp.setattr(losses, "_with_tail", lambda listed: listed - torch.logsumexp(listed, -1, keepdim=True))


def student_not_tempered(mp):
    real = losses.kl_per_position
    mp.setattr(losses, "kl_per_position", lambda s, t, temperature=1.0, *a, **k:
               real(s * temperature, t, temperature, *a, **k))


def kl_direction_swapped(mp):
    real = losses.divergence
    swap = {"forward_kl": "reverse_kl", "reverse_kl": "forward_kl"}
    mp.setattr(losses, "divergence", lambda t, s, kind="forward_kl", beta=0.5: real(t, s, swap.get(kind, kind), beta))


def no_eos(mp):
    def edit(s):
        s.response_ids, s.reference_ids = s.response_ids[:-1], s.reference_ids[:-1]
        s.topk_ids, s.topk_logprobs = s.topk_ids[:-1], s.topk_logprobs[:-1]

    _edit_samples(mp, edit)


def ground_truth_from_teacher_text(mp):
    _edit_samples(mp, lambda s: setattr(s, "reference_ids", list(s.response_ids)))


def loss_weights_ignored(mp):
    real = losses.Targets.coefficients
    mp.setattr(losses.Targets, "coefficients", lambda self, weights: real(self, dict.fromkeys(weights, 1.0)))


def zero_grad_missing(mp):
    mp.setattr(torch.optim.AdamW, "zero_grad", lambda self, set_to_none=True: None)


def data_position_lost_on_resume(mp):
    real = trainer_mod.Trainer._resume

    def resume(self, *args):
        real(self, *args)
        self.sampler.position = 0

    mp.setattr(trainer_mod.Trainer, "_resume", resume)


def non_causal_model(mp):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def full_attention(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=False, **kwargs)

    def register():
        AttentionInterface.register("smoke_test_full", full_attention)
        AttentionMaskInterface.register("smoke_test_full", lambda *args, **kwargs: None)
        return "smoke_test_full"

    mp.setattr(model_mod, "register_causal_attention", register)


def optimizer_never_steps(mp):
    mp.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)


def checkpoint_without_optimizer_state(mp):
    real = trainer_mod.save_checkpoint
    mp.setattr(trainer_mod, "save_checkpoint", lambda root, step, model_state, optim_state, *a, **k: real(
        root, step, model_state, {"state": {}, "param_groups": optim_state["param_groups"]}, *a, **k))


def lr_advanced_per_micro_batch(mp):
    real = trainer_mod.lr_at
    mp.setattr(trainer_mod, "lr_at", lambda cfg, step: real(cfg, step * cfg.train.grad_accum))


def accumulation_as_mean_of_micro_batch_means(mp):
    real = trainer_mod.Trainer.forward_backward

    def forward_backward(self, batches):
        own = self._counts
        self._counts = lambda bs: {k: v * len(batches) for k, v in own(bs).items()}  # each micro-batch its own mean
        try:
            return sum(real(self, [b]) for b in batches)
        finally:
            del self._counts

    mp.setattr(trainer_mod.Trainer, "forward_backward", forward_backward)


def checkpoint_does_not_round_trip(mp):
    real = trainer_mod.load_checkpoint

    def corrupt(path, *a, **k):
        state = real(path, *a, **k)
        state["model"]["lm_head.weight"] = state["model"]["lm_head.weight"] + 1e-3
        return state

    mp.setattr(trainer_mod, "load_checkpoint", corrupt)


DEFECTS = [  # (defect, the report step that must fail, what its last line must say)
    (kl_over_padding_and_prompt, "training step 1", "kl_div is .* prompt and padding counted in the mean"),
    (no_t_squared, "training step 1", "kl_div at T=2 is .* no T\u00b2"),
    (prompt_in_labels, "training rows", "the prompt is not masked"),
    (labels_shifted_by_one, "training rows", "labels are not the next token .*shifted by one"),
    (topk_rows_misaligned, "training rows", "not aligned to the labels"),
    (tail_bucket_dropped, "training step 1", "kl_div is .* no tail bucket"),
    (student_not_tempered, "training step 1", "kl_div at T=2 is .* an untempered student"),
    (kl_direction_swapped, "training step 1", "kl_div is .* reverse KL"),
    (no_eos, "training rows", "does not end with EOS"),
    (ground_truth_from_teacher_text, "training rows", "not prompt -> reference \\+ EOS \\(it holds the teacher's text"),
    (loss_weights_ignored, "training step 1", "the loss weights are not applied"),
    (zero_grad_missing, "training step 2", "not zeroed between optimizer steps"),
    (data_position_lost_on_resume, "checkpoint save/load/resume", "data position 0, saved at 8"),
    (non_causal_model, "model", "the model is not causal"),
    (optimizer_never_steps, "training step 1", "changed 0 of 21 parameters"),
    (checkpoint_without_optimizer_state, "checkpoint save/load/resume", "optimizer"),
    (lr_advanced_per_micro_batch, "training step 2", "learning rates .* do not follow the schedule"),
    (accumulation_as_mean_of_micro_batch_means, "training step 1", "is .* but the reference gives"),
    (checkpoint_does_not_round_trip, "checkpoint save/load/resume", "resumed model's logits differ"),
]


@pytest.mark.parametrize("defect, step, says", DEFECTS, ids=[d[0].__name__ for d in DEFECTS])
def test_smoke_report_fails_on_a_seeded_defect(defect, step, says, prebuilt_toy, tmp_path, capsys, monkeypatch):
    defect(monkeypatch)
    code, out = report(capsys, "--out-dir", str(tmp_path))
    lines = out.strip().splitlines()
    assert code == 1 and lines[-1] == "FAILED", out
    failed = [l for l in lines if l.startswith(FAIL)]
    n = STEPS.index(step) + 1
    assert failed[0] == f"{FAIL} {n}. {step}", out
    assert all(l.startswith(OK) for l in lines if l[:1] in (OK, FAIL) and int(l.split()[1][:-1]) < n), out
    broke = next(l for l in lines if l.strip().startswith("broke:"))
    assert re.search(says, broke), out
