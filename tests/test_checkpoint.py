"""Checkpoint files: atomic directory rename, retention, safe formats."""

from __future__ import annotations

import pytest
import torch

from kdtrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from kdtrain.trainer import Trainer


@pytest.mark.smoke
def test_round_trip_gives_identical_logits_and_optimizer_state(toy_cfg):
    trainer = Trainer(toy_cfg, log=False)
    trainer.train_step(trainer.micro_batches(64))
    path = trainer.save()
    resumed = Trainer(toy_cfg, resume=True, log=False)
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
