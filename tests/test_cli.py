"""The console entry points: make-toy, train, info, and error exits (the smoke report: test_smoke.py)."""

from __future__ import annotations

from kdtrain.cli import main


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
