"""Process groups, FSDP2 sharding and sharded checkpoints; one process = world size 1, no group.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each rank drives one GPU (``LOCAL_RANK``, NCCL),
or with ``train.device=cpu`` one CPU process (gloo): the same sharded path, which the CPU test
suite runs on 2 processes. The student is sharded per decoder layer with ``fully_shard`` and a
bf16-compute / fp32-reduce policy (fp32 when ``train.precision`` is fp32); the ``Distiller`` is the root, so the input
embedding, final norm and output head are gathered for the forward that runs the chunked loss.
An online teacher's decoder is sharded the same way (its head stays whole: it is read inside
the loss). Checkpoints at world size > 1 use ``torch.distributed.checkpoint`` (DCP), which
reshards on load, so a run saved on 2 GPUs resumes on 1 or 2; a world-size-1 checkpoint stores
``model.safetensors`` and loads into any world size too.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, ConfigError


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_counts(self, counts: dict) -> dict:
        if not self.enabled:
            return counts
        keys = sorted(counts)
        t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t


def setup(cfg: Config) -> DistState:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.train.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if world == 1 and cfg.train.cpu_offload:
        raise ConfigError("train.cpu_offload is an FSDP2 option: launch with torchrun on 2 or more GPUs, "
                          "or set train.cpu_offload=false.")
    if world == 1:
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=cpu or auto.")
        return DistState(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
    if use_cuda:
        n_gpu = torch.cuda.device_count()
        if local_world > n_gpu:  # every rank of the node sees the same numbers and stops the same way
            raise ConfigError(f"rank {rank}: {local_world} processes on this node but it has {n_gpu} GPU(s); "
                              f"launch with --nproc-per-node {n_gpu} or fewer.")
        if not dist.is_nccl_available():
            raise ConfigError(f"rank {rank}: NCCL is not available in this torch build; install a CUDA build of "
                              "torch, or use train.device=cpu (gloo).")
    elif cfg.train.cpu_offload:
        raise ConfigError("train.cpu_offload moves GPU shards to CPU memory; with train.device=cpu they are there "
                          "already: set train.cpu_offload=false.")
    if torch.get_num_threads() == 1:
        # torchrun sets OMP_NUM_THREADS=1 for every rank; the CPU builds the student and, with
        # cpu_offload, runs the optimizer step and the grad norm: give each rank its share of the cores.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        # Offloaded shards live in CPU memory: their collectives (e.g. the grad-norm) need gloo too.
        backend = "cuda:nccl,cpu:gloo" if cfg.train.cpu_offload else "nccl"
    else:  # CPU processes (gloo): the same sharded code path, e.g. to test it without GPUs
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    return DistState(rank, world, device)


def cpu_fsdp_supported() -> bool:
    """gloo has no pre-multiplied sum; FSDP2 must be told to reduce with a plain SUM."""
    from torch.distributed.fsdp import FSDPModule

    return hasattr(FSDPModule, "set_force_sum_reduction_for_comms")


def shard(model, teacher, state: DistState, cfg: Config):
    """Wrap the Distiller (and an online teacher) with FSDP2 when running on several processes."""
    if not state.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    gloo = state.device.type == "cpu"
    if gloo and not cpu_fsdp_supported():
        raise ConfigError(f"torch {torch.__version__}: FSDP2 on CPU processes (gloo) needs "
                          "set_force_sum_reduction_for_comms (newer torch); train on GPUs or upgrade torch.")
    mesh = init_device_mesh(state.device.type, (state.world_size,))
    compute = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    root_mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    offload = CPUOffloadPolicy() if cfg.train.cpu_offload else OffloadPolicy()
    layers = model.student.model.layers
    for i, layer in enumerate(layers):
        # The last layer's gather is reused right away by backward: keep it. With
        # train.reshard_after_forward=false every layer keeps its gather until its backward (auto:
        # the trainer decides per sequence length, ``Trainer._plan``).
        last = i == len(layers) - 1
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=cfg.train.reshard_after_forward is not False and not last)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, offload_policy=offload, reshard_after_forward=False)
    # Each rank's loss is already divided by the global token count: gradients must be summed
    # across ranks, not averaged (FSDP's default divides by the world size).
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            if gloo:  # gloo has no pre-multiplied sum: plain SUM (the factor is 1, nothing to divide)
                module.set_force_sum_reduction_for_comms(True)
        elif hasattr(module, "set_reduce_scatter_divide_factor"):  # torch < 2.8
            module.set_reduce_scatter_divide_factor(1.0)
    if teacher is not None:
        t_dtype = next(teacher.model.parameters()).dtype  # bf16 on GPUs, fp32 on the CPU
        tmp = MixedPrecisionPolicy(param_dtype=t_dtype, reduce_dtype=torch.float32)
        for layer in teacher.model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=tmp)
        fully_shard(teacher.model.model, mesh=mesh, mp_policy=tmp)
    return model


def grad_norm(grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global 2-norm of ``grads`` and the tensors to clip in place with it.

    FSDP2 shards every gradient as ``Shard(0)`` on one 1-D mesh: each rank takes the norm of its
    local shards, and the squares are summed across ranks (one all-reduce of one number). The
    same norm through DTensor dispatches each foreach op over hundreds of DTensors, CPU time
    during which the GPUs wait (like the AdamW step: ``optim.local_shards``). Anything else (one
    process, CPU-offloaded shards) takes the DTensor-aware path of torch.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh = grads[0].device_mesh if grads and isinstance(grads[0], DTensor) else None
    if mesh is not None and mesh.ndim == 1 and all(
            isinstance(g, DTensor) and g.device_mesh == mesh and g.placements == (Shard(0),) for g in grads):
        local = [g._local_tensor for g in grads]
        if all(t.device.type == mesh.device_type for t in local):
            squares = torch.nn.utils.get_total_norm(local).float().square()
            dist.all_reduce(squares, group=mesh.get_group())
            return squares.sqrt(), local
    return torch.nn.utils.get_total_norm(grads), grads


def _local_tensors(state):
    """The plain tensors of a state tree: a DTensor's local shard; a tensor subclass's inner
    tensors (torchao's low-bit optimizer state: codes, scales, map), which are what is stored."""
    if isinstance(state, torch.Tensor):
        t = state.to_local() if hasattr(state, "to_local") else state
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            yield from _local_tensors([getattr(t, name) for name in t.__tensor_flatten__()[0]])
        else:
            yield t
    elif isinstance(state, dict):
        for v in state.values():
            yield from _local_tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _local_tensors(v)


def _local_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in _local_tensors(state))


def check_disk_space(trainer, need_local: float, what: str) -> None:
    """Refuse ``what`` (a checkpoint of ``need_local`` bytes per rank) when the disk cannot hold
    it, on every rank, before a byte is written."""
    from .checkpoint import TMP, CheckpointError

    need = torch.tensor([float(need_local)], dtype=torch.float64, device=trainer.device)
    trainer.dist.all_reduce_sum(need)
    root = trainer.ckpt_dir
    if trainer.dist.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP}*"):  # left by a write that died: never a valid checkpoint
            shutil.rmtree(stale, ignore_errors=True)
    free = torch.tensor([float(shutil.disk_usage(root).free if trainer.dist.rank == 0 else 0)],
                        dtype=torch.float64, device=trainer.device)
    if trainer.dist.enabled:
        dist.broadcast(free, 0)
    need, free = need.item(), free.item()
    if need * 1.01 + 2**26 > free:
        raise CheckpointError(f"{what} needs {need / 1e9:.1f} GB but {root} has {free / 1e9:.1f} GB free; nothing "
                              f"was written. Free disk space (older checkpoints under {root} can go), or point "
                              "io.output_dir at a larger disk and resume there.")


def check_finite(trainer, states: list) -> None:
    """A step whose weights or optimizer state are not finite is never saved (it would become the
    resume point); every rank stops with the same message."""
    from .trainer import TrainingError

    tensors = [t for t in _local_tensors(states) if t.is_floating_point() and t.numel()]
    bad = torch.zeros(1, device=trainer.device)
    if tensors:
        norms = torch._foreach_norm(tensors)  # an inf or NaN anywhere in a tensor makes its norm non-finite
        bad += (~torch.isfinite(torch.stack([n.float().to(trainer.device) for n in norms]))).sum()
    trainer.dist.all_reduce_sum(bad)
    if bad.item():
        raise TrainingError(f"the weights or optimizer state after step {trainer.step} are not finite; this step was "
                            "not saved, so the previous checkpoint stays the resume point. Lower optimizer.lr or "
                            "check the data.")


def save(trainer, save_fn, trainer_state: dict, meta: dict) -> Path:
    """Checkpoint the trainer: one process writes ``save_fn``'s files; a sharded run writes DCP
    shards, in the background when ``train.async_checkpoint`` (``wait_for_save`` finishes it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    cfg = trainer.cfg
    wait_for_save(trainer)  # one save in flight at most: the previous one is published first
    model_sd, optim_sd = get_state_dict(trainer.student, trainer.optimizer)
    check_finite(trainer, [model_sd, optim_sd])
    check_disk_space(trainer, _local_bytes([model_sd, optim_sd]), f"the checkpoint of step {trainer.step}")
    if not trainer.dist.enabled:
        return save_fn(trainer.ckpt_dir, trainer.step, model_sd, optim_sd, trainer_state, cfg, meta,
                       cfg.train.keep_checkpoints)
    return _save_dcp(trainer, model_sd, optim_sd, trainer_state, meta)


def _save_dcp(trainer, model_sd: dict, optim_sd: dict, trainer_state: dict, meta: dict) -> Path:
    """Every rank writes its shards (``dcp/__<rank>_*.distcp``) and hashes them; rank 0 writes the
    rest, gathers the hashes into the manifest (written last) and renames the directory.

    Asynchronous (``train.async_checkpoint``): the shards are copied to host memory (pinned and
    reused from one save to the next on CUDA; the copy runs on a side stream, and the next
    optimizer step waits for it, see ``wait_for_staging``), then written, hashed and published by
    a background thread whose collectives use a gloo group of their own. Until the rename the
    directory is a ``.tmp-`` one, which resume never uses, so a crash mid-write loses only this
    checkpoint."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import PREFIX, TMP, model_shape
    from .config import save_config

    root, step, rank = trainer.ckpt_dir, trainer.step, trainer.dist.rank
    final, tmp = root / f"{PREFIX}{step:08d}", root / f"{TMP}{PREFIX}{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        save_config(trainer.cfg, tmp / "config.yaml")
        shapes = model_shape(trainer.student.state_dict())  # DTensor shapes are global
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "model_shape": shapes}))
    dist.barrier()
    state = {"model": model_sd, "optimizer": optim_sd}
    keep, world = trainer.cfg.train.keep_checkpoints, trainer.dist.world_size
    if not trainer.cfg.train.async_checkpoint:
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        _publish_dcp(tmp, final, rank, world, keep, group=None)
        return final
    prepare_saves(trainer)
    trainer.saver.start(state, tmp, final, rank, world, keep)
    return final


def _publish_dcp(tmp: Path, final: Path, rank: int, world: int, keep: int, group) -> None:
    """After the DCP write: each rank hashes its own shards; rank 0 writes the manifest (last) and
    renames ``tmp`` to ``final``; every rank returns once it is published."""
    from .checkpoint import file_entries, publish, write_manifest

    mine = file_entries(tmp, (tmp / "dcp").glob(f"__{rank}_*.distcp"))
    if rank == 0:
        mine.update(file_entries(tmp, [tmp / "dcp" / ".metadata", tmp / "trainer_state.pt", tmp / "config.yaml",
                                       tmp / "meta.json"]))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine, group=group)  # in-memory dicts of names and hashes
    if rank == 0:
        write_manifest(tmp, {k: v for part in gathered for k, v in part.items()})
        publish(tmp, final, keep)
    dist.barrier(group=group)


class HostStager:
    """Copies a state tree's tensors into host buffers kept from one save to the next (pinned on
    CUDA, where the copies are queued on a side stream and ``wait`` waits for them). A tensor
    subclass (a DTensor, torchao's low-bit optimizer state, or both) is copied through its inner
    tensors and rebuilt around the copies, so a DTensor keeps its mesh and placements."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.done = None  # a CUDA event after the last queued copy

    def stage(self, tree):
        if not self.cuda:
            return self._copy(tree, ())
        self.stream.wait_stream(torch.cuda.current_stream())  # the step that wrote the state is done
        with torch.cuda.stream(self.stream):
            out = self._copy(tree, ())
            self.done = torch.cuda.Event()
            self.done.record(self.stream)
        return out

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    def allocate(self, tree) -> None:
        """The buffers ``stage`` will fill, allocated ahead of it (pinning tens of GB takes seconds)."""
        self._copy(tree, (), copy=False)

    def _copy(self, x, path: tuple, copy: bool = True):
        if isinstance(x, dict):
            return {k: self._copy(v, (*path, k), copy) for k, v in x.items()}
        if isinstance(x, list):
            return [self._copy(v, (*path, i), copy) for i, v in enumerate(x)]
        if not isinstance(x, torch.Tensor):
            return x
        if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
            # A DTensor is rebuilt around its local copy this way too (``DTensor.from_local`` would
            # move the copy back to the mesh's device).
            names, ctx = x.__tensor_flatten__()
            inner = {n: self._copy(getattr(x, n), (*path, n), copy) for n in names}
            return type(x).__tensor_unflatten__(inner, ctx, x.size(), x.stride()) if copy else None
        buf = self.buffers.get(path)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self.buffers[path] = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.cuda and x.is_cuda)
        if copy:
            buf.copy_(x, non_blocking=self.cuda)
        return buf


class AsyncSaver:
    """The sharded checkpoint being written in the background, one at a time.

    ``start`` returns once the state's copy to host memory is done, or on CUDA queued on a side
    stream (``HostStager``); ``stager.wait`` must then run before the weights or optimizer state
    change (the trainer's ``wait_for_staging`` before each optimizer step). A thread then writes
    the copy with ``dcp.save`` over a gloo group of its own, hashes and publishes it. ``wait`` blocks until
    the checkpoint is published and raises ``CheckpointError`` if writing it failed."""

    def __init__(self, device: torch.device):
        from concurrent.futures import ThreadPoolExecutor

        self.group = dist.new_group(backend="gloo")  # the writer's collectives, apart from training's
        self.device = device
        self.stager = HostStager(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdtrain-checkpoint")
        self.pending = None  # (Future, final path) until published
        self.allocating = None  # the Future of ``prepare``

    def _in_thread(self) -> None:
        if self.device.type == "cuda":  # a thread starts on GPU 0: a context there would cost rank 0 memory
            torch.cuda.set_device(self.device)

    def prepare(self, state: dict) -> None:
        """Allocate (and pin) the host buffers in the background, long before the first save."""

        def allocate():
            self._in_thread()
            self.stager.allocate(state)

        self.allocating = self.pool.submit(allocate)

    def start(self, state: dict, tmp: Path, final: Path, rank: int, world: int, keep: int) -> None:
        import torch.distributed.checkpoint as dcp

        if self.allocating is not None:
            self.allocating.result()
            self.allocating = None
        staged = self.stager.stage(state)

        def write():
            self._in_thread()
            self.stager.wait()
            dcp.save(staged, checkpoint_id=str(tmp / "dcp"), process_group=self.group)
            _publish_dcp(tmp, final, rank, world, keep, self.group)

        self.pending = (self.pool.submit(write), final)

    def wait(self) -> None:
        self.stager.wait()
        if self.pending is None:
            return
        (future, final), self.pending = self.pending, None
        try:
            future.result()
        except Exception as e:  # the write failed on some rank: the checkpoint was never published
            from .checkpoint import CheckpointError

            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise CheckpointError(f"writing checkpoint {final.name} in the background failed ({type(e).__name__}: "
                                  f"{first}); it was not published, so the previous checkpoint stays the resume "
                                  f"point. Check the disk under {final.parent}, or set train.async_checkpoint=false "
                                  "to write in the foreground.") from None


def prepare_saves(trainer) -> None:
    """A sharded run with ``train.async_checkpoint``: the background saver, with its host buffers
    allocated in the background as soon as the optimizer state exists (after the first step)."""
    if trainer.saver is not None or not (trainer.dist.enabled and trainer.cfg.train.async_checkpoint):
        return
    from torch.distributed.checkpoint.state_dict import get_state_dict

    trainer.saver = AsyncSaver(trainer.device)
    model_sd, optim_sd = get_state_dict(trainer.student, trainer.optimizer)
    trainer.saver.prepare({"model": model_sd, "optimizer": optim_sd})


def wait_for_staging(trainer) -> None:
    if trainer.saver is not None:
        trainer.saver.stager.wait()


def wait_for_save(trainer) -> None:
    """Block until the checkpoint being written in the background (if any) is published."""
    if trainer.saver is not None:
        trainer.saver.wait()


def verify(trainer, path: Path) -> str | None:
    """``checkpoint.verify`` with the hashing split across ranks; every rank gets the same answer."""
    from .checkpoint import verify as verify_files

    problem = verify_files(path, (trainer.dist.rank, trainer.dist.world_size))
    if not trainer.dist.enabled:
        return problem
    gathered = [None] * trainer.dist.world_size
    dist.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)


def load(trainer, path: Path, load_fn) -> dict:
    """Restore model + optimizer into the (possibly sharded) trainer; returns the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from .checkpoint import dcp_load, torch_load

    path = Path(path)
    if (path / "dcp").is_dir():
        model_sd, optim_sd = get_state_dict(trainer.student, trainer.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp_load(state, path / "dcp")
        set_state_dict(trainer.student, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        return torch_load(path / "trainer_state.pt")
    ckpt = load_fn(path, trainer.device)
    opts = StateDictOptions(full_state_dict=True, strict=True) if trainer.dist.enabled else StateDictOptions(strict=True)
    set_state_dict(trainer.student, trainer.optimizer, model_state_dict=ckpt["model"],
                   optim_state_dict=ckpt["optimizer"], options=opts)
    return ckpt["trainer"]
