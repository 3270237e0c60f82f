"""Config: every shipped file loads, deep merge + overrides, and clear errors for bad keys/values."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from kdtrain.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.smoke
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg, _ = load_config([path])
    assert cfg.train.steps > 0
    for p in cfg.io.train_shards:  # paths are resolved against the file's directory
        assert Path(p).is_absolute()


def test_shipped_configs_are_all_tested():
    assert {p.name for p in CONFIGS} >= {"toy.yaml", "worker_9b.yaml"}


@pytest.mark.smoke
def test_deep_merge_later_wins_and_overrides_on_top(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "sub" / "b.yaml"
    b.parent.mkdir()
    a.write_text("train: {steps: 3, micro_batch_size: 4}\nio: {tokenizer_path: tok}\n")
    b.write_text("train: {steps: 7}\nio: {train_shards: [d.jsonl]}\n")
    cfg, sources = load_config([a, b], ["train.grad_accum=2", "optimizer.betas=[0.8, 0.9]"])
    assert (cfg.train.steps, cfg.train.micro_batch_size, cfg.train.grad_accum) == (7, 4, 2)
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.io.tokenizer_path == str(tmp_path / "tok")
    assert cfg.io.train_shards == [str(tmp_path / "sub" / "d.jsonl")]
    assert sources["train.steps"] == f"{b}, line 1"  # the file and line a message names


@pytest.mark.smoke
@pytest.mark.parametrize("text, override, expect", [
    ("train: {stpes: 3}\n", None, r"unknown key 'train.stpes'.*Did you mean 'steps'"),
    ("trian: {steps: 3}\n", None, r"unknown section 'trian'.*Did you mean 'train'"),
    ("train: {steps: three}\n", None, r"'train.steps'.*must be an integer"),
    ("optimizer: {lr: -0.1}\n", None, r"'optimizer.lr'.*must be positive"),
    ("train: {seq_lengths: [4096]}\narch: {max_seq_len: 2048}\n", None, r"exceeds the model's positions"),
    ("train: {seq_lengths: [16, 32]}\n", None, r"curriculum.schedule"),
    ("train: {seq_lengths: [16, 32]}\ncurriculum: {schedule: [0]}\n", None, r"has 1 boundaries"),
    ("train: {precision: fp8}\n", None, r"fp32, bf16 or fp16"),
    ("kd: {teacher: none}\n", None, r"kl_weight.*no teacher signal"),
    ("kd: {teacher: online}\n", None, r"teacher_path"),
    ("arch: {n_heads: 4, n_kv_heads: 3}\n", None, r"must divide"),
    ("train: {grad_checkpointing: 1}\n", None, r"true or false"),
    ("{}\n", "train.nope=1", r"command line 'train.nope=1'.*unknown key"),
    ("{}\n", "steps=1", r"section.key=value"),
])
def test_bad_config_names_key_and_origin(tmp_path, text, override, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expect) as e:
        load_config([path], [override] if override else [])
    if override is None:
        assert str(path) in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])


def test_curriculum_picks_the_length_for_each_step(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {seq_lengths: [16, 32, 64]}\ncurriculum: {schedule: [0, 3, 5]}\narch: {max_seq_len: 64}\n")
    cfg, _ = load_config([path])
    assert [cfg.seq_len_at(s) for s in range(7)] == [16, 16, 16, 32, 32, 64, 64]


@pytest.mark.smoke
def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; every user writes it."""
    path = tmp_path / "lr.yaml"
    path.write_text("optimizer: {lr: 1e-3, eps: 1E-8}\n")
    cfg, _ = load_config([path], ["optimizer.weight_decay=5e-2", "kd.temperature=2e0"])
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.optimizer.weight_decay, cfg.kd.temperature) == (1e-3, 1e-8, 0.05, 2.0)
    assert load_config([], ["io.output_dir=1e3"])[0].io.output_dir.endswith("1e3")  # a path stays a path


FLOAT_KEYS = [f"{s}.{f.name}" for s in ("arch", "init", "optimizer", "train", "distillation", "kd")
              for f in dataclasses.fields(typing.get_type_hints(Config)[s]) if typing.get_type_hints(
                  typing.get_type_hints(Config)[s])[f.name] is float]


@pytest.mark.smoke
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_nan_and_infinity(key, value):
    """``grad_clip=.nan`` used to turn clipping off silently, ``lr=.inf`` to save NaN weights."""
    with pytest.raises(ConfigError, match=f"'{key}'.*must be a finite number"):
        load_config([], [f"{key}={value}"])


def test_float_keys_are_all_covered():
    assert {"optimizer.lr", "optimizer.grad_clip", "kd.temperature", "arch.rope_theta"} <= set(FLOAT_KEYS)


@pytest.mark.smoke
def test_a_typo_inside_a_yaml_file_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 3\n\n  micro_bach_size: 2\noptimizer:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}, line 4: unknown key 'train.micro_bach_size'"):
        load_config([path])
    path.write_text("train:\n  steps: 3\noptimizr:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"line 3: unknown section 'optimizr'"):
        load_config([path])
    path.write_text("optimizer:\n  betas: [0.9, 0.95]\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=rf"'optimizer.lr' \(from {re.escape(str(path))}, line 3\)"):
        load_config([path])
