"""The console entry points: smoke report, make-toy, train, info, and error exits."""

from __future__ import annotations

import re

import pytest

from kdtrain.cli import main


def test_smoke_report_passes_with_measured_numbers(capsys):
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1] == "PASSED"
    assert [l[:1] for l in lines[:5]] == ["\u2705"] * 5
    assert "dataset loaded with 10 samples" in out
    assert "forward [1, 10, 32000], 4,219,200 parameters" in out
    assert "['kl_div', 'ce_teacher', 'ce_ground_truth', 'total']" in out
    loss = float(re.search(r"training step: loss ([0-9.]+)", out).group(1))
    # The first toy loss (see test_trainer's pinned values): measured, not a literal in the report.
    assert loss == pytest.approx(17.2284, abs=1e-3)


def test_smoke_report_runs_twice_in_one_out_dir(tmp_path, capsys):
    assert main(["smoke", "--out-dir", str(tmp_path)]) == 0
    assert main(["smoke", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("PASSED")


def test_smoke_report_fails_when_a_checkpoint_does_not_round_trip(capsys, monkeypatch):
    import torch

    import kdtrain.checkpoint as ck

    real = ck.load_checkpoint

    def corrupt(path, device="cpu"):
        state = real(path, device)
        state["model"]["lm_head.weight"] = state["model"]["lm_head.weight"] + 1e-3 * torch.ones(1)
        return state

    monkeypatch.setattr(ck, "load_checkpoint", corrupt)
    assert main(["smoke"]) == 1
    out = capsys.readouterr().out
    assert "\u274c 5. checkpoint save/load" in out and out.strip().endswith("FAILED")


def test_make_toy_then_train_then_info(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["make-toy", "--out-dir", str(out), "--samples", "6", "--steps", "3"]) == 0
    assert main(["train", str(out / "toy_config.yaml"), f"io.output_dir={tmp_path / 'run'}",
                 "tracing.console_log=false"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
    capsys.readouterr()
    assert main(["info", str(out / "toy_config.yaml")]) == 0
    info = capsys.readouterr().out
    assert "4,219,200" in info and "FLOPs per token" in info and "memory per GPU" in info


def test_errors_exit_nonzero_with_one_paragraph(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stpes: 1}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.stpes'" in err and "Did you mean 'steps'" in err
    assert "Traceback" not in err
