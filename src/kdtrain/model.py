"""The student: a Llama-architecture Hugging Face causal LM built from ``arch`` (or any local HF
checkpoint), its size and FLOP accounting, and ``Distiller``, the module whose forward runs the
student on a batch and returns every loss component.

Rows are padded on the right, so the causal mask alone keeps padding out of every valid
position: attention runs as SDPA with ``is_causal=True`` and no mask (``register_causal_attention``),
which keeps the fused flash kernels, eager or compiled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .config import ArchConfig, Config, ConfigError
from .data import IGNORE
from .losses import SparseTeacher, Targets, kd_loss
from .optim import STATE_BYTES


CAUSAL_ATTENTION = "kdtrain_causal"


def register_causal_attention() -> str:
    """Register SDPA attention that is always causal and never builds a mask.

    kdtrain pads on the right and never packs rows, so the causal mask is all a row needs.
    Hugging Face's "sdpa" path materialises a ``[B, 1, S, S]`` mask whenever it runs under
    ``torch.compile``, which rules out the fused flash kernels; this one passes ``is_causal=True``
    and no mask, eager or compiled.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register(CAUSAL_ATTENTION, causal_sdpa)
    AttentionMaskInterface.register(CAUSAL_ATTENTION, lambda *args, **kwargs: None)
    return CAUSAL_ATTENTION


def llama_config(arch: ArchConfig, std: float = 0.02, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=arch.d_model, intermediate_size=arch.d_ff, num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_kv_heads, head_dim=arch.d_head,
        vocab_size=arch.vocab_size, max_position_embeddings=arch.max_seq_len, rope_theta=arch.rope_theta,
        rms_norm_eps=arch.norm_eps, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        initializer_range=std, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
        attn_implementation=register_causal_attention(),
    )


def load_state_dict(path: str | Path) -> dict:
    """A state dict from .safetensors or a weights-only torch file; never unpickles objects."""
    from .checkpoint import CheckpointError, safetensors_load, torch_load

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"init.weights file {path} does not exist.")
    try:
        state = safetensors_load(path) if path.suffix == ".safetensors" else torch_load(path)
    except CheckpointError as e:
        raise ConfigError(f"init.weights: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"init.weights file {path} is not a state dict (a mapping of names to tensors).")
    return state


def load_hf_causal_lm(path: Path, key: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` offline; a file that is not weights (a pickled
    object in a ``.bin``, which transformers loads ``weights_only``) or a broken one is a ConfigError
    naming ``key``, not a traceback."""
    import pickle

    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except pickle.UnpicklingError:
        raise ConfigError(f"{key} {path}: a weights file holds objects other than tensors (refused; nothing in it "
                          "was run). Use safetensors or a .bin written by torch.save of a state dict.") from None
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{key} {path} is not a loadable causal language model checkpoint: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


INIT_BLOCK = 1 << 22  # elements drawn from one generator


def _local_rows(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A weight's values held here, 2-D (rows x the rest), and the index of their first row in the
    full weight: all of it, or an FSDP2 shard (a DTensor sharded on dim 0)."""
    if hasattr(w, "to_local"):
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(pl != Shard(0) and not pl.is_replicate() for pl in w.placements):
            raise ValueError(f"seeded_init fills row shards only, got placements {w.placements}")
        _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        local, row0 = w.to_local(), offset[0]
    else:
        local, row0 = w.detach(), 0
    cols = math.prod(w.shape[1:])
    return local.view(local.shape[0] if w.ndim else 1, cols), row0


def seeded_init(model: nn.Module, seed: int, std: float) -> None:
    """Hugging Face's Llama init, drawn in parallel and reproducibly: every Linear and Embedding
    weight ~ N(0, std), zero biases and embedding padding row, norms at 1.

    Each block of ``INIT_BLOCK`` elements of a weight (flattened) has its own CPU generator,
    seeded from (seed, parameter name, block): the same weights for any thread count, device,
    world size or CPU, and a 9B init uses every core (torch draws one tensor serially: 90 s for
    9B on one core). On a sharded model (FSDP2 DTensors, ``materialise``) each rank draws only
    the blocks that overlap its own shards and keeps the overlap.
    """
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def fill(name: str, flat: torch.Tensor, lo: int, n_full: int, block: int) -> None:
        key = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        b0, b1 = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, n_full)
        # Drawn in float64 (the whole block: normal_'s values depend on the length drawn), then
        # rounded: torch's float32 normal_ has a vectorised kernel per CPU instruction set (AVX2,
        # AVX-512, none) whose last bits differ; the float64 one is scalar.
        values = torch.empty(b1 - b0, dtype=torch.float64).normal_(0.0, std, generator=g)
        a, b = max(b0, lo), min(b1, lo + flat.numel())
        flat[a - lo: b - lo].copy_(values[a - b0: b - b0].to(flat.dtype))

    jobs, names = [], {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = module.weight
                rows, row0 = _local_rows(w)
                flat, lo = rows.reshape(-1), row0 * rows.shape[1]
                first, last = lo // INIT_BLOCK, -(-(lo + flat.numel()) // INIT_BLOCK)
                jobs += [(names[id(w)], flat, lo, w.numel(), b) for b in range(first, last) if flat.numel()]
                if getattr(module, "bias", None) is not None:
                    _local_rows(module.bias)[0].zero_()
            elif "norm" in type(module).__name__.lower() and hasattr(module, "weight"):
                _local_rows(module.weight)[0].fill_(1.0)
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(lambda job: fill(*job), jobs))  # normal_ releases the GIL
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                rows, row0 = _local_rows(module.weight)
                if row0 <= module.padding_idx < row0 + rows.shape[0]:
                    rows[module.padding_idx - row0].zero_()


def state_dict_mismatch(e: RuntimeError) -> str:
    """The first lines of ``load_state_dict``'s error (shapes, missing or unexpected keys), on one line."""
    lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e).strip()]
    return "; ".join(lines[:2])[:300]


def build_student(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The student: from ``init.base_checkpoint`` (local HF dir) or from ``arch`` with a seeded init.

    ``device="meta"`` (arch-built, no ``init.weights``): the model's structure without storage,
    to be sharded and then filled by ``materialise``; no process ever holds the whole model.
    """
    from transformers import LlamaForCausalLM

    if cfg.init.base_checkpoint:
        path = Path(cfg.init.base_checkpoint)
        if not (path / "config.json").is_file():
            raise ConfigError(f"init.base_checkpoint {path} is not a Hugging Face checkpoint directory (no config.json).")
        model = load_hf_causal_lm(path, "init.base_checkpoint", dtype=torch.float32,
                                  attn_implementation=register_causal_attention())
        return model.to(device)
    from transformers.initialization import no_init_weights

    if str(device) == "meta":
        if cfg.init.weights:
            raise ValueError("a meta-device build is filled from init.seed; build init.weights on the CPU")
        with torch.device("meta"), no_init_weights():
            return LlamaForCausalLM(llama_config(cfg.arch, cfg.init.std))
    with no_init_weights():  # uninitialised storage: filled below, or by init.weights
        model = LlamaForCausalLM(llama_config(cfg.arch, cfg.init.std))
    if not cfg.init.weights:
        seeded_init(model, cfg.init.seed, cfg.init.std)
    else:
        state = load_state_dict(cfg.init.weights)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ConfigError(f"init.weights {cfg.init.weights} does not fit the model built from arch: "
                              f"{state_dict_mismatch(e)}; check that arch matches the checkpoint.") from None
        if missing or unexpected:
            raise ConfigError(f"init.weights {cfg.init.weights} does not fit the model built from arch: "
                              f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}; "
                              "check that arch matches the checkpoint.")
    return model.to(device)


def materialise(model: nn.Module, cfg: Config, device: str | torch.device) -> None:
    """Give a meta-built student (usually sharded by FSDP2 by now) storage on ``device`` and fill
    it with ``seeded_init``: each rank allocates and draws its own shards only, so the weights
    equal the plain build's for any world size while host memory stays at a few init blocks."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.to_empty(device=device)
    seeded_init(model, cfg.init.seed, cfg.init.std)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRotaryEmbedding):  # its buffers are computed, not drawn
                fresh = LlamaRotaryEmbedding(module.config)
                for name, buf in fresh.named_buffers():
                    getattr(module, name).copy_(buf)


# ---- size and cost accounting (DESIGN.md, "Throughput accounting") ----

def param_counts(arch: ArchConfig) -> dict:
    d, L, V, f = arch.d_model, arch.n_layers, arch.vocab_size, arch.d_ff
    attn = d * arch.n_heads * arch.d_head * 2 + d * arch.n_kv_heads * arch.d_head * 2
    layer = attn + 3 * d * f + 2 * d
    embed = V * d
    total = embed + L * layer + d + V * d
    return {"total": total, "embedding": embed, "matmul": total - embed, "per_layer": layer}


def flops_per_token(arch: ArchConfig, seq_len: int) -> float:
    """F_tok = 6 * N_matmul + 12 * L * d_model * S (training: forward + backward)."""
    return 6 * param_counts(arch)["matmul"] + 12 * arch.n_layers * arch.d_model * seq_len


LOSS_BYTES_PER_LOGIT = 16  # live bytes per chunk logit in the chunked loss: 15-17 measured eager bf16
# (CPU, bf16 logits, their gradient and fp32 intermediates); 10 compiled on an H100 (bench/loss_memory.py).
COMPILED_LOSS_BYTES_PER_LOGIT = 10
# bf16 values a decoder layer keeps per token for its backward, in units of d_model, d_ff and
# n_heads * d_head. Eager: the norms' fp32 inputs and outputs, q/k/v/o, the attention output and
# its log-sum-exp, and four d_ff-wide tensors (gate, up, SiLU(gate), their product). Compiled,
# inductor's partitioner keeps the matmul inputs and recomputes the elementwise SwiGLU and the
# norms' scaling in the backward: two d_ff-wide tensors and one d_model-wide one fewer. The
# compiled figure is the 9B worker's measured peak on two H100s (58.8 GiB, 11 of 32 layers
# checkpointed, 8-bit state; tests/test_model.py), where the eager one predicts 66.6.
LAYER_ACTIVATIONS = {False: (10, 4, 2), True: (9, 2, 2)}


def memory_estimate(cfg: Config, world_size: int = 1, seq: int | None = None, checkpointed: int | None = None,
                    reshard: bool | None = None) -> dict:
    """Peak bytes per GPU: the largest of three moments of a step.

    - ``build``: one GPU receives the whole fp32 student (4 B/param). Sharded, the student is
      built on the meta device and each rank allocates its fp32 shards at once (4 B/param over
      ``world_size``; none on the GPU with ``train.cpu_offload``); from ``init.weights`` or
      ``init.base_checkpoint`` it is built on the CPU and FSDP2 moves one decoder layer at a time
      to the GPU, then the root (embedding + head).
    - ``forward_end``: the chunked loss runs on top of everything the backward will need.
    - ``backward``: one decoder layer's backward, recomputing its forward under checkpointing.

    Resident during the step: the training state, fp32 weights and grads (8 B/param) and the two
    AdamW moments (8 B/param in fp32, 2.03 with ``optimizer.state_dtype: 8bit``, 1.06 with 4bit;
    ``optim.STATE_BYTES``), sharded over ``world_size`` (in CPU memory with ``train.cpu_offload``); the kept
    activations (with checkpointing each layer's bf16 input, else every layer's working set,
    smaller with ``train.compile``: ``LAYER_ACTIVATIONS``);
    sharded, also the root (embedding + head) gathered in the compute dtype (bf16, or fp32 with
    ``precision: fp32``) and the head's gradient, both held until the end of the backward. On
    one GPU with bf16/fp16 autocast, the cached low-precision copies of the weights (2 B/param)
    live through the forward. The loss adds its chunk
    (``LOSS_BYTES_PER_LOGIT`` per logit) and the hidden-state gradient; the backward adds one
    layer's working set (when recomputed), two gathered layers (current + prefetched) and one
    layer's unsharded gradient with its fp32 copy for the reduce-scatter (2 + 4 B/param in bf16).
    Checked against two H200s (bench/worker_9b.py): see tests/test_model.py.

    ``seq``: one sequence length (default the longest of ``train.seq_lengths``). ``checkpointed``:
    how many decoder layers recompute their forward (default: all of them when
    ``train.grad_checkpointing`` is true or ``auto`` — the least ``auto`` can need — and none when
    false); a layer that is not checkpointed keeps its whole working set. ``reshard``: whether the
    sharded layers free their gathered weights after the forward (default: true unless
    ``train.reshard_after_forward`` is false); when they don't, every layer's gathered weights stay
    from its forward to its backward (the 9B at seq 4,096 on 2 H200s: 62.2 GiB per GPU measured
    against 47.4 resharding; estimated 62.2 and 47.0).
    """
    a, t = cfg.arch, cfg.train
    n = param_counts(a)
    S = seq or max(t.seq_lengths)
    k = checkpointed if checkpointed is not None else a.n_layers if t.grad_checkpointing else 0
    tokens = t.micro_batch_size * S
    sharded = world_size > 1
    Vd = a.vocab_size * a.d_model
    c = 4 if t.precision == "fp32" else 2  # bytes of a gathered (compute-dtype) weight or gradient
    state = 0 if t.cpu_offload else (8 + STATE_BYTES[cfg.optimizer.state_dtype]) * n["total"] / world_size
    wd, wf, wh = LAYER_ACTIVATIONS[t.compile]
    per_layer_act = tokens * (wd * a.d_model + wf * a.d_ff + wh * a.n_heads * a.d_head) * 2
    kept = k * tokens * a.d_model * 2 + (a.n_layers - k) * per_layer_act
    if sharded:
        root = c * 2 * Vd + c * Vd  # gathered embedding + head, the head's gradient
    else:
        root = 2 * n["matmul"] if t.precision != "fp32" else 0  # autocast's weight cache
    per_logit = COMPILED_LOSS_BYTES_PER_LOGIT if t.compile else LOSS_BYTES_PER_LOGIT
    loss = t.loss_chunk_size * a.vocab_size * per_logit + tokens * a.d_model * 4
    recompute = per_layer_act if k else 0
    last_layer = c * n["per_layer"] if sharded else 0  # kept gathered for the backward
    layer_bwd = (2 * c + c + 4) * n["per_layer"] if sharded else 0
    keep = sharded and not (reshard if reshard is not None else t.reshard_after_forward is not False)
    held = c * n["per_layer"] * (a.n_layers - 1) if keep else 0  # the last layer's gather is held anyway
    # In the backward every layer not yet done holds its gather: the top one's backward sees them
    # all, two of which (current + prefetched) layer_bwd already counts.
    forward_end = state + kept + root + last_layer + loss + held
    backward = state + kept + (root if sharded else 0) + recompute + layer_bwd + max(held - c * n["per_layer"], 0)
    if not sharded:
        build = 4 * n["total"]
    elif cfg.init.weights or cfg.init.base_checkpoint:
        build = 4 * (n["per_layer"] + 2 * Vd)
    else:
        build = 0 if t.cpu_offload else 4 * n["total"] / world_size
    return {"build": build, "state": state, "activations": kept, "root": root, "loss": loss,
            "forward_end": forward_end, "backward": backward, "train": max(forward_end, backward),
            "total": max(build, forward_end, backward)}


AUTO_MEMORY_FRACTION = 0.85  # grad_checkpointing: auto plans for this much of the GPU (the rest: allocator, NCCL)


def checkpointed_layers(cfg: Config, world_size: int, seq: int, gpu_bytes: int | None) -> int:
    """How many decoder layers recompute their forward at ``seq``: all or none for a fixed
    ``train.grad_checkpointing``; for ``auto``, the fewest for ``memory_estimate`` to stay within
    ``AUTO_MEMORY_FRACTION`` of ``gpu_bytes`` (all of them when even that does not fit; none without
    a GPU size, on the CPU). Each layer left out of checkpointing saves its forward's recompute,
    about a quarter of its step time."""
    if cfg.train.grad_checkpointing != "auto":
        return cfg.arch.n_layers if cfg.train.grad_checkpointing else 0
    if not gpu_bytes:
        return 0
    for k in range(cfg.arch.n_layers + 1):
        if memory_estimate(cfg, world_size, seq, k)["total"] <= AUTO_MEMORY_FRACTION * gpu_bytes:
            return k
    return cfg.arch.n_layers


def reshards_after_forward(cfg: Config, world_size: int, seq: int, checkpointed: int, gpu_bytes: int | None) -> bool:
    """``train.reshard_after_forward``, with ``auto`` decided for ``seq``: keep every layer's gathered
    weights for its backward (False) when ``memory_estimate`` with them and the same ``checkpointed``
    layers stays within ``AUTO_MEMORY_FRACTION`` of ``gpu_bytes``, so it never costs a recompute.
    One process has nothing to reshard; without a GPU size (the CPU) layers reshard."""
    r = cfg.train.reshard_after_forward
    if r != "auto":
        return bool(r)
    if world_size == 1 or not gpu_bytes:
        return True
    return memory_estimate(cfg, world_size, seq, checkpointed, reshard=False)["total"] > AUTO_MEMORY_FRACTION * gpu_bytes


def memory_warning(cfg: Config, world_size: int, gpu_bytes: int) -> str | None:
    """A warning when ``memory_estimate`` exceeds the GPU's memory, naming the keys that help."""
    need = memory_estimate(cfg, world_size)
    if need["total"] <= gpu_bytes:
        return None
    hints = []
    if not cfg.train.cpu_offload and need["state"] > 0.25 * gpu_bytes:
        if cfg.optimizer.state_dtype != "4bit":
            hints.append("optimizer.state_dtype=8bit or 4bit (low-bit AdamW moments)")
        where = "" if world_size > 1 else "torchrun on 2 or more GPUs with "
        hints.append(f"{where}train.cpu_offload=true (the training state is {need['state'] / 2**30:.1f} GiB per GPU)")
    if not cfg.train.grad_checkpointing:
        hints.append("train.grad_checkpointing=true")
    if cfg.train.micro_batch_size > 1:
        hints.append("a smaller train.micro_batch_size with a larger train.grad_accum")
    hints.append("more GPUs")
    return (f"kdtrain info predicts {need['total'] / 2**30:.1f} GiB per GPU at world size {world_size}, more than "
            f"the {gpu_bytes / 2**30:.1f} GiB this process may use of its GPU; if it runs out of memory, try "
            + ", or ".join(hints) + ".")


def usable_gpu_bytes(device: torch.device) -> int:
    """The memory this process may use on ``device``: the card's, times the share that
    ``torch.cuda.set_per_process_memory_fraction`` allows (1 unless set), so a process given part of
    a card plans for that part."""
    index = device.index if device.index is not None else torch.cuda.current_device()  # (the fraction wants one)
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # (a torch before 2.6 lacks it)
    return int(total * (fraction(index) if fraction else 1.0))


def host_memory() -> int | None:
    """This machine's memory in bytes, or the lowest limit of this process's memory cgroup and its
    ancestors where lower (cgroup v2; v1's memory controller); None where the system does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    for limit in _cgroup_limits():
        total = min(total, limit)
    return total if total > 0 else None


def _cgroup_limits(proc: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> list[int]:
    """The numeric memory limits on the way from this process's cgroup up to the root."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: 0::/path
            root, name = Path(mount), "memory.max"
        elif "memory" in controllers.split(","):
            root, name = Path(mount) / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = root / path.strip("/")
        files += [d / name for d in (here, *here.parents) if d == root or root in d.parents]
    limits = []
    for f in files:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return limits


def check_host_memory(cfg: Config, world_size: int, per_host: int = 1, have: int | None = None) -> None:
    """Refuse a CPU run that cannot fit this machine's memory before anything is built or read:
    otherwise the kernel kills the process, without a word, once the model outgrows it.

    The need is ``memory_estimate`` for each of the ``per_host`` processes on this machine, with the
    layers a CPU run checkpoints (``auto``: none). It counts activations in bf16, half of what an
    fp32 CPU run keeps, so the run it refuses would need at least that much.
    """
    have = have or host_memory()
    if not have:
        return
    k = checkpointed_layers(cfg, world_size, max(cfg.train.seq_lengths), None)
    need = memory_estimate(cfg, world_size, checkpointed=k)["total"] * per_host
    if need <= have:
        return
    hints = ["a smaller arch (arch.d_model, arch.n_layers, arch.d_ff, arch.vocab_size)",
             "a smaller train.micro_batch_size or max of train.seq_lengths"]
    if cfg.optimizer.state_dtype == "fp32":
        hints.append("optimizer.state_dtype=8bit")
    if cfg.train.grad_checkpointing is not True:
        hints.append("train.grad_checkpointing=true")
    hints.append("GPUs (train.device=cuda)")
    procs = f" for the {per_host} processes on this machine" if per_host > 1 else ""
    raise ConfigError(f"this run needs at least {need / 2**30:.1f} GiB{procs} (kdtrain info's estimate for arch and "
                      f"train), more than this machine's {have / 2**30:.1f} GiB of memory; try " + ", or ".join(hints)
                      + ".")


# ---- the forward that produces the losses ----

def step_counts(batches: list[dict]) -> dict:
    """Valid-token counts over a whole optimizer step (all micro-batches), the loss normalisers."""
    n_kl = n_ct = n_cg = 0
    for b in batches:
        n_ct += int((b["labels"] != IGNORE).sum())
        if "topk_mask" in b:
            n_kl += int((b["topk_mask"] & (b["labels"] != IGNORE)).sum())
        if "ref_labels" in b:
            n_cg += int((b["ref_labels"] != IGNORE).sum())
    return {"n_kl": n_kl, "n_ce_teacher": n_ct, "n_ce_ground_truth": n_cg}


class Distiller(nn.Module):
    """Runs the student on a batch and returns ``{kl_div, ce_teacher, ce_ground_truth, total}``.

    Everything that touches the student's weights (the decoder and the output projection inside
    the chunked loss) runs in this module's forward, so FSDP2 can shard it as a root module.
    """

    def __init__(self, student: nn.Module, cfg: Config, topk_temperature: float | None = None):
        super().__init__()
        self.student = student
        d, k = cfg.distillation, cfg.kd
        self.weights = {"kl_div": d.kl_weight, "ce_teacher": d.ce_teacher_weight,
                        "ce_ground_truth": d.ce_ground_truth_weight}
        self.temperature, self.kind, self.beta = k.temperature, k.divergence, k.jsd_beta
        self.topk_temperature = topk_temperature or 1.0
        self.chunk_size = cfg.train.loss_chunk_size
        self.compile_loss = cfg.train.compile

    def forward(self, batch: dict, counts: dict, teacher=None, chunked: bool = True) -> dict:
        if hasattr(teacher, "topk_batch"):  # a teacher with another tokenizer: its aligned rows, as sparse top-k
            batch, teacher = (batch if "topk_ids" in batch else {**batch, **teacher.topk_batch(batch)}), None
        ids, labels = batch["input_ids"], batch["labels"]
        if "ref_input_ids" in batch:  # reference rows ride in the same forward
            S = max(ids.shape[1], batch["ref_input_ids"].shape[1])
            pad = lambda x, v: nn.functional.pad(x, (0, S - x.shape[1]), value=v)  # noqa: E731
            ids = torch.cat([pad(ids, 0), pad(batch["ref_input_ids"], 0)])
            labels_all = torch.cat([pad(labels, IGNORE), pad(batch["ref_labels"], IGNORE)])
            is_ref_rows = torch.arange(ids.shape[0], device=ids.device) >= batch["input_ids"].shape[0]
        else:
            S, labels_all = ids.shape[1], labels
            is_ref_rows = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        # No KV cache: training never reuses it, and under torch.compile with FSDP2's per-layer graph
        # breaks its per-layer state made every layer recompile (past the limit, eager).
        hidden = self.student.model(input_ids=ids, use_cache=False).last_hidden_state
        valid = labels_all != IGNORE
        h = hidden[valid]
        is_ref = is_ref_rows[:, None].expand_as(valid)[valid]
        n_teacher_rows = batch["input_ids"].shape[0]
        sparse, kl_mask = None, torch.zeros_like(is_ref)
        if "topk_ids" in batch:
            tv = valid[:n_teacher_rows, : batch["input_ids"].shape[1]]
            k = batch["topk_ids"].shape[-1]
            ids_k = torch.zeros(h.shape[0], k, dtype=torch.long, device=h.device)
            lps_k = torch.zeros(h.shape[0], k, dtype=torch.float32, device=h.device)
            n_t = int(tv.sum())
            ids_k[:n_t] = batch["topk_ids"][tv]
            lps_k[:n_t] = batch["topk_logprobs"][tv]
            kl_mask = torch.zeros_like(is_ref)
            kl_mask[:n_t] = batch["topk_mask"][tv]
            sparse = SparseTeacher(ids_k, lps_k, self.topk_temperature)
        t_hidden = t_weight = None
        if teacher is not None:
            t_hidden, t_weight = teacher.hidden(batch["input_ids"], valid[:n_teacher_rows, : batch["input_ids"].shape[1]])
            kl_mask = ~is_ref
            if t_hidden.shape[0] < h.shape[0]:  # reference rows have no teacher: pad with zeros (masked)
                t_hidden = torch.cat([t_hidden, t_hidden.new_zeros(h.shape[0] - t_hidden.shape[0], t_hidden.shape[1])])
        tgt = Targets(labels_all[valid], is_ref, kl_mask, counts["n_kl"], counts["n_ce_teacher"],
                      counts["n_ce_ground_truth"], sparse)
        return kd_loss(h, self.student.lm_head.weight, tgt, self.weights, self.temperature, self.kind, self.beta,
                       t_hidden, t_weight, self.chunk_size if chunked else None, compile=self.compile_loss)
