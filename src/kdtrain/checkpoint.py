"""Checkpoints: written to a temporary directory, verified by a manifest, then renamed into place.

Layout: ``<output_dir>/checkpoints/step_00000010/`` with ``model.safetensors``, ``optimizer.pt``,
``trainer_state.pt`` (step, data position, RNG states, grad-scaler state), ``config.yaml`` (the
resolved config), ``meta.json`` (step, dataset fingerprint, model shape, arch, schedule) and, written
last, ``manifest.json``: the size and SHA-256 of every other file. A sharded run writes ``dcp/``
(``torch.distributed.checkpoint``) instead of the model and optimizer files.

Trust. A checkpoint is used only after its manifest checks out (``verify``), so a torn, truncated or
edited file is found before any of it is loaded. Nothing is unpickled but tensors and plain
containers: safetensors for weights, ``torch.load(weights_only=True)`` for the ``.pt`` files, and for
DCP an allow-list unpickler for ``dcp/.metadata`` (``SafeReader``) and ``weights_only`` for its
non-tensor items (``SafePlanner``); torch's own reader unpickles both with plain ``pickle``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Config, save_config

PREFIX, TMP, MANIFEST = "step_", ".tmp-", "manifest.json"


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


# ---- safe loading ----

def _refused(path, e: Exception) -> CheckpointError:
    why = (str(e).splitlines() or [""])[0]  # torch's weights-only message runs to a page
    return CheckpointError(f"{path} was refused: it is not a file of tensors and plain containers that loads "
                           f"without running code, or it is damaged ({type(e).__name__}: {why}). "
                           "Nothing in it was run. Use a file written by kdtrain or torch.save of a state dict.")


def torch_load(path: str | Path, map_location="cpu"):
    """``torch.load(weights_only=True)``; a file holding anything else (a pickled object whose
    ``__reduce__`` would run code) or a damaged one is a ``CheckpointError``, never a traceback."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError, IndexError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise _refused(path, e) from None


def safetensors_load(path: str | Path, device="cpu") -> dict:
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a bad header
        if isinstance(e, OSError) and not Path(path).is_file():
            raise CheckpointError(f"{path} does not exist.") from None
        raise _refused(path, e) from None


# torch.distributed.checkpoint's metadata: its own dataclasses, torch sizes, dtypes and layouts.
_DCP_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def _dcp_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader, reading ``.metadata`` through the allow-list unpickler."""

        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # anything but the allowed classes, or a damaged file
                raise _refused(path, e) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        """DCP's planner, loading non-tensor items (optimizer hyper-parameters) ``weights_only``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise _refused(f"an item of {read_item.dest_index.fqn}", e) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader, SafePlanner


def dcp_load(state: dict, path: str | Path) -> None:
    """``torch.distributed.checkpoint.load`` in place, through the safe reader and planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _dcp_classes()
    try:
        dcp.load(state, storage_reader=reader(str(path)), planner=planner())
    except CheckpointException as e:  # failures gathered from the ranks: report the first
        first = next(iter(e.failures.values()), e)
        raise first if isinstance(first, CheckpointError) else CheckpointError(f"{path}: {first}") from None


# ---- the manifest ----

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_entries(root: Path, files) -> dict:
    """relative path -> {size, sha256} for ``files`` under ``root``."""
    return {str(Path(f).relative_to(root)): {"size": Path(f).stat().st_size, "sha256": sha256(Path(f))}
            for f in sorted(files)}


def write_manifest(root: Path, entries: dict) -> None:
    """The manifest is written last (and fsynced): a checkpoint without one is incomplete."""
    tmp = root / f"{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": "kdtrain-checkpoint-v1", "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def manifest_files(path: Path) -> dict:
    """The manifest's entries; raises CheckpointError when it is missing or not a manifest."""
    m = path / MANIFEST
    if not m.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST} (its write did not finish, or an older kdtrain wrote it)")
    try:
        files = json.loads(m.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                for v in files.values()):
            raise ValueError("entries are not {size, sha256}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{m} is not a valid manifest ({e})") from None
    return files


def verify(path: str | Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with the checkpoint at ``path`` (None: nothing). ``share = (rank, world)``
    checks every ``world``-th file from ``rank`` on, so ranks split the hashing of a large one."""
    path = Path(path)
    try:
        files = manifest_files(path)
    except CheckpointError as e:
        return str(e)
    needed = {"meta.json", "config.yaml", "trainer_state.pt"}
    if not needed <= set(files) or not ({"model.safetensors", "optimizer.pt"} <= set(files)
                                        or "dcp/.metadata" in files):
        return f"{path / MANIFEST} does not list the files of a checkpoint"
    rank, world = share
    for rel in sorted(files)[rank::world]:
        f, want = path / rel, files[rel]
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes but the manifest says {want['size']} (truncated or overwritten)"
        if sha256(f) != want["sha256"]:
            return f"{f} does not match its SHA-256 in the manifest (its content changed)"
    return None


def read_meta(path: str | Path) -> dict:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not {"step", "model_shape", "dataset_fingerprint"} <= set(meta):
            raise ValueError("missing step, model_shape or dataset_fingerprint")
        if not isinstance(meta["model_shape"], dict) or not isinstance(meta["dataset_fingerprint"], str):
            raise ValueError("model_shape must be an object and dataset_fingerprint a string")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{Path(path) / 'meta.json'} is not a kdtrain checkpoint's meta.json ({e})") from None
    return meta


# ---- writing and finding ----

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
    files = [f for f in tmp.iterdir()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    write_manifest(tmp, file_entries(tmp, files))
    publish(tmp, final, keep)
    return final


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete checkpoint into place and drop the oldest beyond ``keep``."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories, oldest first; half-written ``.tmp-`` directories are not checkpoints
    (whether each is intact is ``verify``'s business)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    path = Path(path)
    return {
        "model": safetensors_load(path / "model.safetensors", device),
        "optimizer": torch_load(path / "optimizer.pt", device),
        "trainer": torch_load(path / "trainer_state.pt"),
        "meta": read_meta(path),
    }


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write a consolidated Hugging Face model directory (safetensors + config + tokenizer) from a
    checkpoint: a world-size-1 ``model.safetensors`` or a sharded ``dcp/`` from any world size.
    The checkpoint is verified first; the tokenizer is saved to add BOS as training rows do."""
    from .config import load_config
    from .model import build_student, state_dict_mismatch
    from .tokenizer import load_tokenizer, save_for_inference

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not ckpt.is_dir() or not (ckpt / "meta.json").is_file():
        raise CheckpointError(f"{ckpt} is not a kdtrain checkpoint directory (no meta.json); pass "
                              "<output_dir>/checkpoints/step_….")
    problem = verify(ckpt)
    if problem:
        raise CheckpointError(f"{ckpt} is not a valid checkpoint: {problem}. Export another checkpoint.")
    cfg, _ = load_config([ckpt / "config.yaml"])
    cfg.init.weights = None  # the checkpoint's weights replace any initial ones
    model = build_student(cfg)
    if (ckpt / "dcp").is_dir():
        state = model.state_dict()  # loaded in place: these tensors are the parameters
        dcp_load({"model": state}, ckpt / "dcp")
    else:
        try:
            model.load_state_dict(safetensors_load(ckpt / "model.safetensors"), strict=True)
        except RuntimeError as e:  # names or shapes unlike its config.yaml's arch (files replaced, manifest rewritten)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{ckpt}/model.safetensors does not fit the model its config.yaml describes "
                                  f"({state_dict_mismatch(e)}). Export another checkpoint.") from None
    model.set_attn_implementation("sdpa")  # loadable by plain transformers
    model.save_pretrained(out_dir, safe_serialization=True)
    save_for_inference(load_tokenizer(cfg.io.tokenizer_path), out_dir)
    return out_dir
