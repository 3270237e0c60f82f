"""Checkpoint files: atomic directory rename, retention, safe formats."""

from __future__ import annotations

import json

import pytest
import torch

from kdtrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from kdtrain.trainer import Trainer


@pytest.mark.smoke
def test_round_trip_gives_identical_logits_and_optimizer_state(toy_cfg, tokenizer):
    trainer = Trainer(toy_cfg, log=False, tokenizer=tokenizer)
    trainer.train_step(trainer.micro_batches(64))
    path = trainer.save()
    resumed = Trainer(toy_cfg, resume=True, log=False, tokenizer=tokenizer)
    ids = trainer.micro_batches(64)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(trainer.student(input_ids=ids).logits, resumed.student(input_ids=ids).logits)
    a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    # Safe formats only: safetensors and weights-only torch files.
    assert (path / "model.safetensors").is_file()
    load_checkpoint(path)  # uses weights_only=True throughout


def test_keeps_the_last_k_and_ignores_half_written(make_cfg):
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.eval_every=0")
    Trainer(cfg, log=False).fit()
    root = cfg.io.output_dir + "/checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    from pathlib import Path

    (Path(root) / ".tmp-step_00000005").mkdir()
    (Path(root) / ".tmp-step_00000005" / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(root).name == "step_00000004"


@pytest.mark.parametrize("layout", ["safetensors", "dcp"])
def test_export_gives_a_plain_hf_model_with_identical_logits(make_cfg, tmp_path, layout):
    """Both checkpoint layouts (world size 1 and sharded DCP, written here by a single process)
    export to a directory that plain transformers loads, with the trained logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdtrain.checkpoint import export_hf

    trainer = Trainer(make_cfg("train.steps=2", "io.val_shards=[]"), log=False)
    trainer.fit()
    path = latest_checkpoint(trainer.ckpt_dir)
    if layout == "dcp":
        import torch.distributed.checkpoint as dcp

        from kdtrain.checkpoint import MANIFEST, file_entries, write_manifest

        (path / "model.safetensors").unlink()
        (path / "optimizer.pt").unlink()
        dcp.save({"model": trainer.student.state_dict()}, checkpoint_id=str(path / "dcp"))
        write_manifest(path, file_entries(path, [f for f in path.rglob("*") if f.is_file() and f.name != MANIFEST]))
    out = export_hf(path, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert len(AutoTokenizer.from_pretrained(out, local_files_only=True)) == 32000
    ids = trainer.micro_batches(64)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.student(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# ---- trust: tampered, torn and non-finite checkpoints ----

class _RunsCode:
    """A pickle payload: unpickling it with plain pickle runs a shell command (creates ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _reseal(path):
    """Rewrite a checkpoint's manifest after editing it (as an attacker could), so that only the
    loaders stand between a tampered file and the process."""
    from kdtrain.checkpoint import MANIFEST, file_entries, write_manifest

    write_manifest(path, file_entries(path, [f for f in path.rglob("*") if f.is_file() and f.name != MANIFEST]))


def _to_dcp(trainer, path):
    """Turn a world-size-1 checkpoint into the sharded layout (DCP), as a multi-GPU run writes it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    (path / "model.safetensors").unlink()
    (path / "optimizer.pt").unlink()
    model_sd, optim_sd = get_state_dict(trainer.student, trainer.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / "dcp"))
    _reseal(path)


@pytest.fixture
def one_step(make_cfg):
    cfg = make_cfg("train.steps=1", "io.val_shards=[]")
    trainer = Trainer(cfg, log=False)
    trainer.fit()
    return cfg, trainer, latest_checkpoint(trainer.ckpt_dir)


def test_sharded_checkpoint_resumes_through_the_safe_reader(one_step):
    """The DCP layout loads through the allow-list unpickler and weights-only planner (optimizer
    hyper-parameters are DCP's non-tensor items), with the same weights and optimizer state."""
    cfg, trainer, path = one_step
    _to_dcp(trainer, path)
    resumed = Trainer(cfg, resume=True, log=False)
    assert resumed.step == 1
    for a, b in zip(trainer.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    sa, sb = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]


@pytest.mark.parametrize("target", ["dcp/.metadata", "optimizer.pt", "trainer_state.pt"])
def test_a_tampered_checkpoint_runs_no_code_on_resume_or_export(one_step, tmp_path, capsys, target):
    from kdtrain.checkpoint import CheckpointError, export_hf
    from kdtrain.cli import main

    cfg, trainer, path = one_step
    if target.startswith("dcp"):
        _to_dcp(trainer, path)
    marker = tmp_path / "ran"
    with open(path / target, "wb") as f:
        if target.endswith(".pt"):
            torch.save({"state": _RunsCode(marker)}, f)
        else:
            import pickle

            pickle.dump(_RunsCode(marker), f)
    _reseal(path)
    with pytest.raises(CheckpointError, match="refused"):
        Trainer(cfg, resume=True, log=False)
    if target.startswith("dcp"):  # export reads the weights (and DCP's metadata), not the training state
        with pytest.raises(CheckpointError, match="refused"):
            export_hf(path, tmp_path / "hf")
    config = tmp_path / "resume.yaml"
    from kdtrain.config import save_config

    save_config(cfg, config)
    assert main(["train", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated model.safetensors", "missing trainer_state.pt", "garbage meta.json",
                                    "empty optimizer.pt", "no manifest"])
def test_resume_falls_back_to_the_newest_valid_checkpoint(make_cfg, tmp_path, capsys, damage):
    from kdtrain.checkpoint import CheckpointError, export_hf

    cfg = make_cfg("train.steps=2", "train.checkpoint_every=1", "io.val_shards=[]")
    trainer = Trainer(cfg, log=False)
    trainer.fit()
    newest = latest_checkpoint(trainer.ckpt_dir)
    name = damage.split()[-1]
    if damage.startswith("truncated"):
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    elif damage.startswith("missing"):
        (newest / name).unlink()
    elif damage.startswith("garbage"):
        (newest / name).write_text("{not json")
    elif damage.startswith("empty"):
        (newest / name).write_bytes(b"")
    else:
        (newest / "manifest.json").unlink()
    resumed = Trainer(cfg, resume=True, log=False)
    assert resumed.step == 1  # the older checkpoint
    err = capsys.readouterr().err
    assert "step_00000002" in err and "step_00000001" in err
    if damage != "no manifest":
        assert name in err  # the warning names what was wrong
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        export_hf(newest, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_no_valid_checkpoint_is_a_clear_error(one_step):
    from kdtrain.checkpoint import CheckpointError

    cfg, _, path = one_step
    (path / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        Trainer(cfg, resume=True, log=False)


@pytest.mark.parametrize("where", ["weights", "optimizer state"])
def test_a_non_finite_step_is_never_saved(make_cfg, where):
    from kdtrain.trainer import TrainingError

    trainer = Trainer(make_cfg("train.steps=2", "io.val_shards=[]"), log=False)
    trainer.fit(until=1)
    before = list_checkpoints(trainer.ckpt_dir)
    trainer.train_step(trainer.micro_batches(64))
    p = next(trainer.student.parameters())
    with torch.no_grad():
        if where == "weights":
            p.view(-1)[3] = float("inf")
        else:
            trainer.optimizer.state[p]["exp_avg"].view(-1)[3] = float("nan")
    with pytest.raises(TrainingError, match="not finite"):
        trainer.save()
    assert list_checkpoints(trainer.ckpt_dir) == before


def test_free_disk_space_is_checked_before_training(make_cfg, monkeypatch):
    import shutil
    from collections import namedtuple

    from kdtrain.checkpoint import CheckpointError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    trained = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, b: trained.append(1))
    with pytest.raises(CheckpointError, match=r"needs 0\.1 GB but .* has 0\.0 GB free"):
        Trainer(make_cfg("train.steps=2"), log=False).fit()
    assert not trained


@pytest.mark.parametrize("change", ["arch.n_heads=8 arch.n_kv_heads=4 arch.d_head=8", "arch.rope_theta=500000.0",
                                    "arch.norm_eps=1e-6", "arch.max_seq_len=256"])
def test_resume_refuses_any_arch_change(one_step, make_cfg, change):
    """n_heads 8 x d_head 8 keeps every parameter shape of 4 x 16 (and 4 KV heads x 8 of 2 x 16):
    only the arch record can tell, and the model would compute something else."""
    from kdtrain.trainer import TrainingError

    key = change.split("=")[0]
    with pytest.raises(TrainingError, match=f"{key} changed"):
        Trainer(make_cfg("train.steps=1", "io.val_shards=[]", *change.split()), resume=True, log=False)


def test_resume_with_another_schedule_warns_naming_the_keys(one_step, make_cfg, capsys):
    Trainer(make_cfg("train.steps=4", "optimizer.warmup_steps=2", "io.val_shards=[]"), resume=True, log=False)
    err = capsys.readouterr().err
    assert "train.steps 1 -> 4" in err and "optimizer.warmup_steps 1 -> 2" in err and "learning-rate" in err


def test_exported_tokenizer_adds_bos_like_the_training_rows(one_step, tmp_path):
    """A plain transformers user gets ``[BOS] + text``, as every training row starts."""
    from transformers import AutoTokenizer

    from kdtrain.checkpoint import export_hf
    from kdtrain.tokenizer import load_tokenizer

    cfg, _, path = one_step
    plain = AutoTokenizer.from_pretrained(export_hf(path, tmp_path / "hf"), local_files_only=True)
    train_tok = load_tokenizer(cfg.io.tokenizer_path)
    text = "What is the capital of Peru?"
    assert plain(text).input_ids == [train_tok.bos_token_id] + train_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("key", ["init.weights", "init.base_checkpoint", "kd.teacher_path"])
def test_a_weights_file_holding_an_object_runs_nothing(make_cfg, toy, tmp_path, key):
    """``init.weights`` (.pt), and a Hugging Face directory whose only weights are a pytorch_model.bin
    (student base or online teacher): a pickled object in them is refused with a config error."""
    import shutil

    from kdtrain.config import ConfigError

    marker = tmp_path / "ran"
    if key == "init.weights":
        target = tmp_path / "init.pt"
        torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, target)
        overrides = [f"init.weights={target}"]
    else:
        target = tmp_path / "hf"
        shutil.copytree(toy["teacher"], target)
        (target / "model.safetensors").unlink()
        torch.save({"lm_head.weight": _RunsCode(marker)}, target / "pytorch_model.bin")
        overrides = ([f"init.base_checkpoint={target}"] if key == "init.base_checkpoint"
                     else ["kd.teacher=online", f"kd.teacher_path={target}"])
    with pytest.raises(ConfigError, match=rf"{key}.*(refused|objects other than tensors)"):
        Trainer(make_cfg(*overrides), log=False)
    assert not marker.exists()


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_reproduces_the_uninterrupted_run(toy, tmp_path):
    """SIGKILL (no handler runs) at three moments of a run that checkpoints every step, often in
    the middle of a write: each --resume picks the newest intact checkpoint, and the final
    metrics equal an uninterrupted run's, row for row."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    args = [str(toy["config"]), "train.steps=12", "train.checkpoint_every=1", "train.eval_every=0",
            "io.val_shards=[]", "tracing.console_log=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out, resume=False, kill_after=None):
        cmd = [sys.executable, "-m", "kdtrain", "train", *args, f"io.output_dir={out}"] + (["--resume"] if resume else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kill_after is not None:
            metrics = out / "metrics.jsonl"
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not (
                    metrics.is_file() and metrics.read_text().count("\n") >= kill_after):
                time.sleep(0.005)
            time.sleep(random.Random(kill_after).uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        return proc.returncode, err

    rc, err = train(tmp_path / "straight")
    assert rc == 0, err
    run = tmp_path / "run"
    rc, err = train(run, kill_after=2)
    for n in (4, 7):
        rc, err = train(run, resume=True, kill_after=n)
        assert "Traceback" not in err
    rc, err = train(run, resume=True)
    assert rc == 0, err

    def rows(path):
        return [(r["step"], r["total"], r["kl_div"], r["ce_teacher"]) for r in
                (json.loads(line) for line in path.read_text().splitlines())]

    assert rows(run / "metrics.jsonl") == rows(tmp_path / "straight" / "metrics.jsonl")
