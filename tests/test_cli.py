"""The console entry points: make-toy, train, info, and error exits (the smoke report: test_smoke.py)."""

from __future__ import annotations

import pytest

from kdtrain.cli import main
from kdtrain.config import ConfigError
from kdtrain.trainer import Trainer


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


def test_options_and_overrides_in_any_order(tmp_path, toy, capsys):
    cfg = str(toy["config"])
    run = f"io.output_dir={tmp_path / 'run'}"
    assert main(["train", cfg, run, "train.steps=1", "tracing.console_log=false"]) == 0
    assert main(["train", cfg, "--resume", run, "train.steps=2", "tracing.console_log=false"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    capsys.readouterr()
    assert main(["info", "configs/worker_9b.yaml", "--world-size", "2", "train.cpu_offload=true"]) == 0
    out = capsys.readouterr().out
    assert "cpu_offload: true" in out and "at world size 2" in out


def test_info_refuses_world_size_zero(capsys):
    assert main(["info", "configs/toy.yaml", "--world-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--world-size must be at least 1" in err and "Traceback" not in err


@pytest.mark.parametrize("key, package", [("use_tensorboard", "tensorboard"), ("use_wandb", "wandb")])
def test_tracing_without_its_package_names_the_extra_before_training(make_cfg, monkeypatch, capsys, key, package):
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: find_spec gives None
    with pytest.raises(ConfigError, match=rf"pip install 'kdtrain\[{package}\]'"):
        Trainer(make_cfg(f"tracing.{key}=true"), log=False)


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss_curve.png"])
def test_a_full_disk_under_metrics_is_one_line(toy, tmp_path, capsys, name):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    import os

    run = tmp_path / "run"
    run.mkdir()
    os.symlink("/dev/full", run / name)
    rc = main(["train", str(toy["config"]), f"io.output_dir={run}", "train.steps=1", "tracing.console_log=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and name in lines[0] and "No space left on device" in lines[0]
