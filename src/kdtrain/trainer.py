"""One trainer for the CPU toy and the sharded 9B student; every difference lives in config.

Step anatomy (``train_step``): take ``grad_accum`` micro-batches for this rank, count the valid
tokens of the whole step (summed over ranks), run forward + backward per micro-batch with the
losses normalised by those counts (so 8 x 1 equals 1 x 8), unscale (fp16), read the loss sums and
the gradient norm in one host sync, stop before the optimizer if either is not finite, clip, step,
and set the learning rate for the next step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import distributed as dist_utils
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, model_shape, read_meta, \
    save_checkpoint
from .config import Config, ConfigError, out_of_memory, save_config
from .data import Dataset, Sampler, collate, load_dataset
from .losses import COMPONENTS
from .metrics import Metrics, check_tracing
from .model import Distiller, build_student, check_host_memory, checkpointed_layers, materialise, memory_warning, \
    reshards_after_forward, step_counts, usable_gpu_bytes
from .optim import build_optimizer, current_lr, set_lr
from .teacher import online_teacher
from .tokenizer import load_tokenizer


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, refused resume); the message says why."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: the current step finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path} written. "
                         "Continue with the same command and --resume.")


# Keys that shape the learning-rate schedule or the data stream: changing them on resume is allowed
# but the run is then not the one the checkpoint was part of.
SCHEDULE_KEYS = ("train.steps", "optimizer.lr", "optimizer.min_lr_ratio", "optimizer.warmup_steps",
                 "curriculum.schedule", "train.seq_lengths", "train.micro_batch_size", "train.grad_accum", "train.seed")


def _schedule(cfg: Config) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in SCHEDULE_KEYS}


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup over ``warmup_steps`` optimizer steps, then cosine to ``lr * min_lr_ratio``."""
    o, total = cfg.optimizer, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms (1-D) nor on the input embedding."""
    embed = {id(p) for p in model.get_input_embeddings().parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_paths(cfg: Config) -> None:
    """Missing inputs and an unwritable output directory are errors before any compute."""
    for key in ("train_shards", "val_shards"):
        for p in getattr(cfg.io, key):
            if not Path(p).is_file():
                raise ConfigError(f"io.{key}: data shard {p} does not exist; fix the path or create the file.")
    if not cfg.io.train_shards:
        raise ConfigError("io.train_shards is empty: list at least one KD JSONL file to train on.")
    out = Path(cfg.io.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"io.output_dir {out} is not writable ({e.strerror}); choose another directory.") from None


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, log: bool = True, tokenizer=None):
        """``tokenizer``: one already loaded from ``io.tokenizer_path`` (a notebook's, a test session's),
        used instead of loading that directory again; its size is checked all the same."""
        self.cfg = cfg
        self.dist = dist_utils.setup(cfg)
        self.device = self.dist.device
        self.saver = None  # dist_utils.AsyncSaver once a sharded checkpoint is written in the background
        t = cfg.train
        if t.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs CUDA (a grad scaler on GPU); use fp32 or bf16 on CPU.")
        check_paths(cfg)
        check_tracing(cfg)
        self.run_dir = Path(cfg.io.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        latest = latest_checkpoint(self.ckpt_dir)
        if resume and latest is None:
            raise ConfigError(f"--resume: no checkpoint under {self.ckpt_dir}; run without --resume to start fresh.")
        if not resume and latest is not None:  # a fresh run would interleave its checkpoints with these
            raise ConfigError(f"io.output_dir {self.run_dir} already holds checkpoints (latest {latest.name}); pass "
                              "--resume to continue that run, or choose a new io.output_dir to start another.")
        # The checkpoint to resume is found and its arch compared before the data is read and the
        # model built: a model built from another arch (or its init.weights) would not load it.
        resume_from = resume_meta = None
        if resume:
            resume_from = self._valid_checkpoint()
            resume_meta = read_meta(resume_from)
            self._check_resume_config(resume_from, resume_meta)

        if self.device.type == "cpu" and not cfg.init.base_checkpoint:  # (a base checkpoint brings its own arch)
            check_host_memory(cfg, self.dist.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        vocab = cfg.arch.vocab_size if not cfg.init.base_checkpoint else None
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.io.tokenizer_path, vocab)
        elif vocab is not None and len(tokenizer) != vocab:
            raise ConfigError(f"the tokenizer given has {len(tokenizer)} tokens but arch.vocab_size is {vocab}.")
        self.tokenizer = tokenizer
        vocab = len(self.tokenizer)
        L = max(t.seq_lengths)
        self.train_data = load_dataset(cfg.io.train_shards, self.tokenizer, vocab, L)
        self.val_data = load_dataset(cfg.io.val_shards, self.tokenizer, vocab, L) if cfg.io.val_shards else None
        self._check_signals(self.train_data)

        # Sharded runs build on the meta device and each rank fills only its own shards from the
        # seeded init (``materialise``): no process ever holds the whole model. Weights from a file
        # are built on the CPU; FSDP2 then moves one layer at a time to the GPU as it shards it.
        meta = self.dist.enabled and not (cfg.init.weights or cfg.init.base_checkpoint)
        self.student = build_student(cfg, "meta" if meta else "cpu" if self.dist.enabled else self.device)
        if self.student.get_output_embeddings().weight.shape[0] != vocab:
            raise ConfigError(f"the student's vocabulary ({self.student.get_output_embeddings().weight.shape[0]}) "
                              f"differs from the tokenizer's size ({vocab}) at {cfg.io.tokenizer_path}.")
        if t.grad_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointed_layers = self.cfg.arch.n_layers if t.grad_checkpointing else 0  # auto: set per length
        self.reshard_after_forward = t.reshard_after_forward is not False  # auto: set per length (sharded runs)
        self._planned_seq = None
        self.teacher = None
        if cfg.kd.teacher == "online":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.teacher = online_teacher(cfg.kd.teacher_path, self.device, dtype, self.tokenizer)
        self.model = Distiller(self.student, cfg, self.train_data.topk_temperature)
        self.model = dist_utils.shard(self.model, self.teacher, self.dist, cfg)
        if meta:
            materialise(self.student, cfg, "cpu" if t.cpu_offload else self.device)
        if self.device.type == "cuda" and self.dist.rank == 0:
            warning = memory_warning(cfg, self.dist.world_size, usable_gpu_bytes(self.device))
            if warning:
                print(warning, file=sys.stderr, flush=True)
        if t.compile:
            self.student.model.compile()
        self.optimizer = build_optimizer(param_groups(self.student, cfg.optimizer.weight_decay), cfg.optimizer,
                                         lr_at(cfg, 0))
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.sampler = Sampler(len(self.train_data), t.seed)
        self.step = 0
        if resume:
            self._resume(resume_from, resume_meta)
        # Weights + two AdamW moments: a checkpoint must fit before hours of training, not after.
        p_bytes = dist_utils._local_bytes(list(self.student.parameters()))
        dist_utils.check_disk_space(self, 3 * p_bytes, "a checkpoint of this model and its optimizer state")
        self.metrics = Metrics(cfg, self.run_dir, t.steps, self.step, enabled=log and self.dist.rank == 0)

    # ---- setup checks ----
    def _check_signals(self, data: Dataset) -> None:
        d, k = self.cfg.distillation, self.cfg.kd
        if d.kl_weight > 0 and k.teacher == "topk" and data.n_topk == 0:
            raise ConfigError(f"distillation.kl_weight is {d.kl_weight} but no record in {self.cfg.io.train_shards} "
                              "has teacher_topk: there is no teacher signal. Annotate the data (`kdtrain annotate`), "
                              "use kd.teacher=online with kd.teacher_path, or set distillation.kl_weight=0.")
        if d.ce_ground_truth_weight > 0 and data.n_reference == 0:
            raise ConfigError(f"distillation.ce_ground_truth_weight is {d.ce_ground_truth_weight} but no record in "
                              f"{self.cfg.io.train_shards} has a 'reference'; add references or set the weight to 0.")

    # ---- data ----
    def _with_reference(self) -> bool:
        return self.cfg.distillation.ce_ground_truth_weight > 0

    def micro_batches(self, seq_len: int) -> list[dict]:
        """This rank's micro-batches of the next optimizer step (the global batch is split by rank)."""
        t, r, w = self.cfg.train, self.dist.rank, self.dist.world_size
        if "auto" in (t.grad_checkpointing, t.reshard_after_forward) and seq_len != self._planned_seq:
            self._plan(seq_len)
        idx = self.sampler.take(t.micro_batch_size * t.grad_accum * w)
        k = self.train_data.k if self.cfg.kd.teacher == "topk" else 0
        out = []
        for m in range(t.grad_accum):
            lo = (m * w + r) * t.micro_batch_size
            samples = [self.train_data.samples[i] for i in idx[lo: lo + t.micro_batch_size]]
            b = collate(samples, seq_len, self.tokenizer.pad_token_id, k, self._with_reference())
            out.append(self._teacher_rows({key: v.to(self.device, non_blocking=True) for key, v in b.items()}))
        return out

    def _plan(self, seq_len: int, gpu_bytes: int | None = None) -> None:
        """The ``auto`` settings, at each new sequence length, from ``kdtrain info``'s estimate for
        ``gpu_bytes`` (default: the memory this process may use on its GPU; on the CPU nothing is
        checkpointed and layers reshard).

        - ``train.grad_checkpointing: auto``: checkpoint the first ``checkpointed_layers`` decoder
          layers, the fewest for which the estimate fits. The lowest layers are the ones
          checkpointed: by the time the backward reaches them, the later layers' activations are
          freed, and the recompute reuses that memory.
        - ``train.reshard_after_forward: auto`` (sharded runs): keep every layer's gathered weights
          for its backward (one all-gather per layer and micro-batch fewer) when that fits too, with
          the same layers checkpointed (``reshards_after_forward``).
        """
        self._planned_seq = seq_len
        cfg, L = self.cfg, self.cfg.arch.n_layers
        if gpu_bytes is None and self.device.type == "cuda":
            gpu_bytes = usable_gpu_bytes(self.device)
        notes = []
        if cfg.train.grad_checkpointing == "auto":
            k = checkpointed_layers(cfg, self.dist.world_size, seq_len, gpu_bytes)
            for i, layer in enumerate(self.student.model.layers):
                layer.gradient_checkpointing = i < k
            self.checkpointed_layers = k
            notes.append(f"{k} of {L} decoder layers checkpointed")
        if cfg.train.reshard_after_forward == "auto" and self.dist.enabled:
            reshard = reshards_after_forward(cfg, self.dist.world_size, seq_len, self.checkpointed_layers, gpu_bytes)
            layers = self.student.model.layers
            if hasattr(layers[0], "set_reshard_after_forward"):  # (a torch without it keeps resharding)
                for layer in layers[:-1]:  # the last layer's gather always stays for the backward
                    layer.set_reshard_after_forward(reshard, recurse=False)
                self.reshard_after_forward = reshard
            notes.append("layers reshard after forward" if self.reshard_after_forward else
                         "gathered weights kept for the backward")
        if notes and self.dist.rank == 0 and cfg.tracing.console_log:
            print(f"auto plan at seq {seq_len}: " + "; ".join(notes), flush=True)

    def _teacher_rows(self, batch: dict) -> dict:
        """A teacher with another tokenizer gives sparse rows before the step is counted (kl_div is
        normalised by the aligned positions of the whole step)."""
        if hasattr(self.teacher, "topk_batch"):
            batch.update(self.teacher.topk_batch(batch))
        return batch

    def _counts(self, batches: list[dict]) -> dict:
        c = step_counts(batches)
        if self.teacher is not None and not hasattr(self.teacher, "topk_batch"):
            c["n_kl"] = c["n_ce_teacher"]
        return self.dist.all_reduce_counts(c)

    def _autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    # ---- the step ----
    def forward_backward(self, batches: list[dict]) -> torch.Tensor:
        """Forward + backward over this step's micro-batches; returns the component sums [4],
        summed over ranks, on the device (``optimizer_step`` checks them)."""
        self.model.train()
        counts = self._counts(batches)
        sums = torch.zeros(4, device=self.device)
        for b in batches:
            with self._autocast():
                out = self.model(b, counts, self.teacher)
            loss = out["total"]
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            sums += torch.stack([out[c].detach().float() for c in COMPONENTS])
        return self.dist.all_reduce_sum(sums)

    def optimizer_step(self, sums: torch.Tensor | None = None) -> dict:
        """Check, clip and step; returns ``{"grad_norm": ...}`` plus the components of ``sums``.

        The step reads the GPU once: the loss sums and the global gradient norm together. Every
        rank reads the same all-reduced values, so on a NaN all ranks stop at the same step. A
        non-finite loss, or (bf16/fp32) a non-finite gradient norm, raises before the optimizer
        steps; under fp16 the grad scaler skips such steps itself. The gradients are multiplied
        by ``grad_clip / norm`` only when the norm exceeds ``optimizer.grad_clip`` (the multiply
        by 1 that ``clip_grad_norm_`` does otherwise is a full pass over the gradients).
        """
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm, grads = dist_utils.grad_norm([p.grad for p in self.student.parameters() if p.grad is not None])
        full = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).reshape(1).float()
        read = full if sums is None else torch.cat([sums.float(), full.to(sums.device)])  # CPU offload: norm on CPU
        *values, grad_norm = read.tolist()  # the step's one host sync
        if not all(map(math.isfinite, values)):
            bad = "loss (" + ", ".join(f"{c} {v}" for c, v in zip(COMPONENTS, values)) + ")"
        elif not self.scaler and not math.isfinite(grad_norm):
            bad = f"gradient norm ({grad_norm})"
        else:
            bad = None
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite {bad} at step {self.step + 1}; the optimizer did not step. "
                                "Lower optimizer.lr, use bf16 instead of fp16, or check the data.")
        clip = self.cfg.optimizer.grad_clip
        if 0 < clip < grad_norm:
            torch._foreach_mul_(grads, clip / (grad_norm + 1e-6))  # clip_grads_with_norm_'s factor; DTensors or local shards
        dist_utils.wait_for_staging(self)  # a background checkpoint's host copy is complete before the step
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        set_lr(self.optimizer, lr_at(self.cfg, self.step))
        dist_utils.prepare_saves(self)  # once: host buffers for background checkpoints, allocated meanwhile
        return {**dict(zip(COMPONENTS, values)), "grad_norm": grad_norm}

    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step over the micro-batches; returns the loss components and grad norm."""
        return self.optimizer_step(self.forward_backward(batches))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Each component over the whole validation set (exact means) and perplexity of ce_teacher."""
        self.model.eval()
        data, t = self.val_data, self.cfg.train
        k = data.k if self.cfg.kd.teacher == "topk" else 0
        L = self.cfg.seq_len_at(self.step)
        # Every rank runs the same number of forwards (FSDP collectives): short ranks add rows
        # whose labels are all masked, which contribute nothing.
        per_rank = -(-len(data) // self.dist.world_size)
        mine = [i if i < len(data) else -1 for i in range(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)]
        batches = []
        for s in range(0, len(mine), t.micro_batch_size):
            idx = mine[s: s + t.micro_batch_size]
            b = collate([data.samples[max(i, 0)] for i in idx], L, self.tokenizer.pad_token_id, k,
                        self._with_reference())
            dummy = torch.tensor([i < 0 for i in idx])
            b["labels"][dummy] = -100
            if "topk_mask" in b:
                b["topk_mask"][dummy] = False
            if "ref_labels" in b:
                b["ref_labels"][dummy[[data.samples[max(i, 0)].reference_ids is not None for i in idx]]] = -100
            batches.append(self._teacher_rows({key: v.to(self.device) for key, v in b.items()}))
        counts = self._counts(batches)
        sums = torch.zeros(4, device=self.device)
        for b in batches:
            with self._autocast():
                out = self.model(b, counts, self.teacher)
            sums += torch.stack([out[c].detach().float() for c in COMPONENTS])
        sums = self.dist.all_reduce_sum(sums)
        if self.dist.enabled:  # layers that keep their gathers for a backward hold them after no-grad forwards
            for layer in self.student.model.layers:
                layer.reshard()
        row = {f"val_{c}": v for c, v in zip(COMPONENTS, sums.tolist())}
        row["val_ppl"] = math.exp(min(row["val_ce_teacher"], 50.0))
        return row

    # ---- checkpoints ----
    def _trainer_state(self) -> dict:
        state = {"step": self.step, "data_position": self.sampler.position, "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _meta(self) -> dict:
        return {"dataset_fingerprint": self.train_data.fingerprint, "world_size": self.dist.world_size,
                "arch": dataclasses.asdict(self.cfg.arch), "base_checkpoint": self.cfg.init.base_checkpoint,
                "schedule": _schedule(self.cfg)}

    def save(self) -> Path:
        """Write a checkpoint of this step; a sharded run with ``train.async_checkpoint`` writes it in
        the background and returns its final path at once (``wait_for_checkpoint`` publishes it)."""
        return dist_utils.save(self, save_checkpoint, self._trainer_state(), self._meta())

    def wait_for_checkpoint(self) -> None:
        """Block until a checkpoint written in the background is published (raises if it failed)."""
        dist_utils.wait_for_save(self)

    def _valid_checkpoint(self) -> Path:
        """The newest checkpoint whose manifest checks out; each newer broken one is named in a warning."""
        problems = []
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            problem = dist_utils.verify(self, path)
            if problem is None:
                if problems and self.dist.rank == 0:
                    print(f"warning: resuming from {path.name}, the newest valid checkpoint: "
                          + "; ".join(problems), file=sys.stderr, flush=True)
                return path
            problems.append(f"{path.name} is not usable ({problem})")
        raise CheckpointError(f"--resume: no valid checkpoint under {self.ckpt_dir}: " + "; ".join(problems)
                              + ". Start afresh in a new io.output_dir.")

    def _check_resume_config(self, path: Path, meta: dict) -> None:
        """Refuse what a resume cannot honour (another arch); warn about a changed schedule."""
        arch = dataclasses.asdict(self.cfg.arch)
        if not self.cfg.init.base_checkpoint and isinstance(meta.get("arch"), dict):
            changed = [k for k in arch if meta["arch"].get(k) != arch[k]]
            if changed:
                k = changed[0]
                raise TrainingError(f"cannot resume from {path}: arch.{k} changed (checkpoint {meta['arch'].get(k)}, "
                                    f"config {arch[k]}). Restore the original arch or start a new io.output_dir.")
        old, new = meta.get("schedule") or {}, _schedule(self.cfg)
        changed = [f"{k} {old[k]} -> {new[k]}" for k in SCHEDULE_KEYS if k in old and old[k] != new[k]]
        if changed and self.dist.rank == 0:
            print(f"warning: resuming {path.name} with {', '.join(changed)}: the learning-rate schedule and data "
                  "stream now follow the new values, so this is not the run the checkpoint came from (the LR "
                  "already decayed under the old ones).", file=sys.stderr, flush=True)

    def _resume(self, path: Path, meta: dict) -> None:
        if meta["dataset_fingerprint"] != self.train_data.fingerprint:
            raise TrainingError(f"cannot resume from {path}: it was trained on other data (dataset fingerprint "
                                "differs). Restore the original io.train_shards or start a new io.output_dir.")
        shape = model_shape(self.student.state_dict())  # unsharded shapes, also for DTensors
        if meta["model_shape"] != shape:
            diff = next(k for k in sorted(set(shape) | set(meta["model_shape"]))
                        if shape.get(k) != meta["model_shape"].get(k))
            raise TrainingError(f"cannot resume from {path}: the model shape changed ({diff}: checkpoint "
                                f"{meta['model_shape'].get(diff)}, config {shape.get(diff)}). Restore the original "
                                "arch or start a new io.output_dir.")
        try:  # files that pass the manifest but were replaced after kdtrain wrote them (the manifest rewritten)
            state = dist_utils.load(self, path, load_checkpoint)
            if not (isinstance(state, dict) and all(isinstance(state.get(k), int) and not isinstance(state[k], bool)
                                                    for k in ("step", "data_position"))
                    and isinstance(state.get("rng_cpu"), torch.Tensor)):
                raise ValueError("trainer_state.pt does not hold an integer step and data_position and rng_cpu")
            self.step = state["step"]
            self.sampler.position = state["data_position"]
            torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            if self.scaler and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            if out_of_memory(e):  # not the checkpoint's fault: the command line's message says what helps
                raise
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"cannot resume from {path}: its files do not fit this model, optimizer or trainer "
                                  f"({why}); they were changed after kdtrain wrote them. Resume from another "
                                  "checkpoint (remove this one) or start a new io.output_dir.") from None
        set_lr(self.optimizer, lr_at(self.cfg, self.step))

    # ---- the loop ----
    def fit(self, until: int | None = None) -> list[dict]:
        """Train to ``train.steps`` (or stop early after step ``until``, checkpointing there)."""
        cfg, t = self.cfg, self.cfg.train
        stop = min(t.steps, until) if until else t.steps
        if self.dist.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        rows = []
        self._signal, previous = None, self._catch_signals()
        try:
            while self.step < stop:
                seq_len = cfg.seq_len_at(self.step)
                t0 = time.perf_counter()
                batches = self.micro_batches(seq_len)
                n_tok = sum(int((b[key] != self.tokenizer.pad_token_id).sum())
                            for b in batches for key in ("input_ids", "ref_input_ids") if key in b)
                row = {"step": self.step + 1, "seq_len": seq_len, "lr": current_lr(self.optimizer)}
                row.update(self.train_step(batches))
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                # A SIGTERM seen by any rank stops every rank after this same step (one all-reduce).
                counts = self.dist.all_reduce_counts({"tokens": n_tok, "stop": float(self._signal is not None)})
                n_tok, stopping = int(counts["tokens"]), counts["stop"] > 0
                row["tokens"] = n_tok  # all ranks, non-padding (teacher and reference rows)
                row["tokens_per_s"] = n_tok / dt
                row["tokens_per_s_per_gpu"] = n_tok / dt / self.dist.world_size
                if self.device.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                last = self.step == stop
                if self.val_data is not None and ((t.eval_every and self.step % t.eval_every == 0) or last):
                    row.update(self.evaluate())
                self.metrics.log(row)
                rows.append(row)
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or last or stopping:
                    path = self.save()
                if stopping:
                    self.wait_for_checkpoint()
                    raise Interrupted(self._signal or signal.SIGTERM, self.step, path)
            self.wait_for_checkpoint()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.metrics.close()
        return rows

    def _catch_signals(self) -> dict:
        """SIGTERM (a scheduler's notice before preemption) and Ctrl-C finish the current step, which
        then checkpoints and stops; a second one acts at once. Returns the previous handlers."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def note(signum, frame):
            self._signal = signum
            signal.signal(signum, previous[signum])

        for signum in previous:
            signal.signal(signum, note)
        return previous
