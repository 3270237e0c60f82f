"""Checkpoints: written to a temporary directory, then renamed into place, so a crash mid-write
leaves the previous checkpoint intact. Only safe formats: model weights in safetensors,
optimizer and trainer state as tensors/plain containers loadable with ``weights_only=True``.

Layout: ``<output_dir>/checkpoints/step_00000010/`` with ``model.safetensors``,
``optimizer.pt``, ``trainer_state.pt`` (step, data position, RNG states, grad-scaler state),
``config.yaml`` (the resolved config) and ``meta.json`` (step, dataset fingerprint, model shape).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Config, save_config

PREFIX, TMP = "step_", ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says why and what to change."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_shape(state: dict) -> dict:
    """Parameter name -> full shape (a DTensor's .shape is its global shape)."""
    return {k: list(v.shape) for k, v in state.items()}


def save_checkpoint(root: str | Path, step: int, model_state: dict, optim_state: dict, trainer_state: dict,
                    cfg: Config, meta: dict, keep: int) -> Path:
    """Atomically write checkpoint ``step`` under ``root`` and keep only the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP}{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    save_config(cfg, tmp / "config.yaml")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "model_shape": model_shape(model_state)}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ``.tmp-`` directories are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    path = Path(path)
    return {
        "model": load_file(str(path / "model.safetensors"), device=str(device)),
        "optimizer": torch.load(path / "optimizer.pt", map_location=device, weights_only=True),
        "trainer": torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True),
        "meta": json.loads((path / "meta.json").read_text()),
    }


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write a consolidated Hugging Face model directory (safetensors + config + tokenizer) from a
    checkpoint: a world-size-1 ``model.safetensors`` or a sharded ``dcp/`` from any world size."""
    from .config import ConfigError, load_config
    from .model import build_student
    from .tokenizer import load_tokenizer

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not (ckpt / "meta.json").is_file():
        raise ConfigError(f"{ckpt} is not a kdtrain checkpoint directory (no meta.json); pass checkpoints/step_…")
    cfg, _ = load_config([ckpt / "config.yaml"])
    cfg.init.weights = None  # the checkpoint's weights replace any initial ones
    model = build_student(cfg)
    if (ckpt / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        state = model.state_dict()  # loaded in place: these tensors are the parameters
        dcp.load({"model": state}, checkpoint_id=str(ckpt / "dcp"))
    else:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    model.set_attn_implementation("sdpa")  # loadable by plain transformers
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(cfg.io.tokenizer_path).save_pretrained(out_dir)
    return out_dir
