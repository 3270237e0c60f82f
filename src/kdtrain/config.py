"""Typed run configuration: YAML files merged deeply, then ``section.key=value`` overrides.

Every key below is read by code; an unknown key is an error that names the key, the file it
came from and the nearest valid key. Relative paths in a YAML file are resolved against that
file's directory; relative paths given as command-line overrides against the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration the user must fix; the message says what to change."""


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: Python's, CUDA's caching allocator's, the CPU
    allocator's or the OS's (errno 12)."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or any(
        s in str(e) for s in ("can't allocate memory", "Cannot allocate memory", "out of memory", "not enough memory"))


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-3`` and ``1E5`` as numbers: YAML 1.1 (PyYAML)
    needs a dot in a float (``1.0e-3``) and would hand ``1e-3`` over as the string '1e-3'."""


class _Float(float):
    """A YAML float that remembers its text, so ``io.output_dir=1e3`` stays the path '1e3'."""

    text: str


def _construct_float(loader, node):
    value = _Float(yaml.SafeLoader.construct_yaml_float(loader, node))
    value.text = node.value
    return value


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _key_lines(text: str) -> dict:
    """``section`` and ``section.key`` -> 1-based line in a YAML text (for messages)."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return {}
    lines = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            lines[str(k.value)] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for kk, _ in v.value:
                    lines[f"{k.value}.{kk.value}"] = kk.start_mark.line + 1
    return lines


@dataclass
class ArchConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_head: int = 16
    d_ff: int = 256
    vocab_size: int = 32000
    max_seq_len: int = 2048  # RoPE positions the model is built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class InitConfig:
    seed: int = 0
    std: float = 0.02  # normal init std of the arch-built model
    weights: str | None = None  # state dict (.safetensors or weights-only .pt) for the arch-built model
    base_checkpoint: str | None = None  # a local Hugging Face checkpoint directory instead of `arch`


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms or embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    state_dtype: str = "fp32"  # AdamW moments: fp32 (exact, fused) | 8bit | 4bit (torchao, kdtrain[lowbit])


@dataclass
class TrainConfig:
    steps: int = 5  # optimizer steps
    seq_lengths: list[int] = field(default_factory=lambda: [128])
    micro_batch_size: int = 2
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (bf16/fp16 autocast on CUDA)
    grad_checkpointing: bool | str = False  # true | false | auto (per sequence length, the fewest layers that fit the GPU)
    cpu_offload: bool = False  # FSDP2: sharded params, grads and AdamW state in CPU memory (step on CPU)
    reshard_after_forward: bool | str = "auto"  # FSDP2: free each layer's gathered weights after its forward | false: keep them for the backward | auto: false where it fits the GPU
    compile: bool = False
    loss_chunk_size: int = 1024  # tokens per chunk of the fused output-projection + loss
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # data order
    eval_every: int = 0  # optimizer steps; 0 = only at the end when val_shards are set
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    async_checkpoint: bool = True  # sharded runs: copy to host memory, write in the background (published when complete)


@dataclass
class IOConfig:
    tokenizer_path: str = "tokenizer"
    train_shards: list[str] = field(default_factory=list)
    val_shards: list[str] = field(default_factory=list)
    output_dir: str = "runs/toy"


@dataclass
class DistillationConfig:
    kl_weight: float = 1.0
    ce_teacher_weight: float = 0.5
    ce_ground_truth_weight: float = 0.0


@dataclass
class KDConfig:
    teacher: str = "topk"  # topk (stored with the data) | online (local HF model) | none
    teacher_path: str | None = None  # online teacher checkpoint directory
    temperature: float = 1.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5


@dataclass
class CurriculumConfig:
    # Step boundaries at which train.seq_lengths[i] starts; empty = seq_lengths[0] throughout.
    schedule: list[int] = field(default_factory=list)


@dataclass
class TracingConfig:
    log_dir: str | None = None  # default: <output_dir>/logs
    json_log: bool = True
    console_log: bool = True
    use_tensorboard: bool = False
    use_wandb: bool = False
    wandb_project: str = "kdtrain"


@dataclass
class Config:
    arch: ArchConfig = field(default_factory=ArchConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    io: IOConfig = field(default_factory=IOConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def seq_len_at(self, step: int) -> int:
        """Sequence length the curriculum prescribes for optimizer step ``step`` (0-based)."""
        lengths, bounds = self.train.seq_lengths, self.curriculum.schedule
        if not bounds:
            return lengths[0]
        i = max(j for j, b in enumerate(bounds) if b <= step)
        return lengths[i]


PATH_KEYS = {
    ("io", "tokenizer_path"), ("io", "train_shards"), ("io", "val_shards"), ("io", "output_dir"),
    ("init", "weights"), ("init", "base_checkpoint"), ("kd", "teacher_path"), ("tracing", "log_dir"),
}
SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _section_cls(name: str):
    return typing.get_type_hints(Config)[name]


def _resolve_paths(section: str, key: str, value: Any, base: Path | None) -> Any:
    if base is None or (section, key) not in PATH_KEYS or value is None:
        return value
    def resolve(v):
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            return v  # not a path: the type check names the key
        v = os.path.expanduser(getattr(v, "text", str(v)))
        return v if os.path.isabs(v) else os.path.normpath(base / v)

    return [resolve(v) for v in value] if isinstance(value, list) else resolve(value)


def _merge_layer(merged: dict, sources: dict, layer: dict, origin: str, base: Path | None,
                 lines: dict | None = None) -> None:
    lines = lines or {}

    def at(name: str) -> str:  # "file, line N" when the layer is a file
        return f"{origin}, line {lines[name]}" if name in lines else origin

    if not isinstance(layer, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(layer).__name__}.")
    for section, body in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"{at(str(section))}: unknown section '{section}'.{_did_you_mean(str(section), SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{at(section)}: section '{section}' must be a mapping of keys, got {body!r}.")
        valid = {f.name for f in dataclasses.fields(_section_cls(section))}
        for key, value in body.items():
            where = at(f"{section}.{key}")
            if key not in valid:
                raise ConfigError(f"{where}: unknown key '{section}.{key}'.{_did_you_mean(str(key), valid)}")
            merged.setdefault(section, {})[key] = _resolve_paths(section, key, value, base)
            sources[f"{section}.{key}"] = where


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; int -> float widening is the only coercion."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        for tp_ in inner:  # bool | str: the first type the value is
            try:
                return _coerce(value, tp_, where)
            except ConfigError:
                pass
        kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"{where} must be {' or '.join(kinds.get(a, str(a)) for a in inner)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if isinstance(value, _Float):  # a name that reads as a number (wandb_project: 1e3)
            return value.text
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a bug in this module, not user input


def file_in_the_way(path: str | Path) -> Path | None:
    """``path`` or the first directory above it that exists as a file (nothing can be made under it)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


TOO_MANY_DIGITS = "a number has more digits than Python converts (4300); no config key takes one."


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.steps=10).")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({e.problem or e}).") from None
    except ValueError:  # an integer past Python's 4300-digit conversion limit
        raise ConfigError(f"override '{text}': {TOO_MANY_DIGITS}") from None
    return section, key, value


def load_config(paths: list[str | Path] = (), overrides: list[str] = ()) -> tuple[Config, dict]:
    """Merge YAML files (later wins, deep) and ``section.key=value`` overrides into a validated Config.

    Returns the config and a map ``section.key -> origin`` (file or ``command line``) for messages.
    """
    merged: dict = {}
    sources: dict = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist.")
        try:
            text = p.read_text(encoding="utf-8")
            layer = yaml.load(text, Loader=_Loader) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} cannot be read ({e}).") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{p}: nested too deeply to be a kdtrain config.") from None
        except ValueError:
            raise ConfigError(f"{p}: {TOO_MANY_DIGITS}") from None
        _merge_layer(merged, sources, layer, str(p), p.resolve().parent, _key_lines(text))
    for text in overrides:
        section, key, value = _parse_override(text)
        _merge_layer(merged, sources, {section: {key: value}}, f"command line '{text}'", Path.cwd())
    return build_config(merged, sources), sources


def build_config(merged: dict, sources: dict | None = None) -> Config:
    sources = sources or {}
    kwargs = {}
    for section, body in merged.items():
        cls = _section_cls(section)
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in body.items():
            where = f"'{section}.{key}' (from {sources.get(f'{section}.{key}', 'defaults')})"
            values[key] = _coerce(value, hints[key], where)
        kwargs[section] = cls(**values)
    cfg = Config(**kwargs)
    validate(cfg, sources)
    return cfg


def validate(cfg: Config, sources: dict | None = None) -> None:
    """Impossible values are errors before any compute; each message names the key and its origin."""
    sources = sources or {}

    def fail(key: str, msg: str, related: str | None = None):
        origin = sources.get(key) or sources.get(related) or "defaults"
        raise ConfigError(f"'{key}' (from {origin}): {msg}")

    a, t, o, d, k = cfg.arch, cfg.train, cfg.optimizer, cfg.distillation, cfg.kd
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "vocab_size", "max_seq_len",
                "rope_theta", "norm_eps"):  # RoPE's base and RMSNorm's epsilon at 0 or below give NaN
        if getattr(a, key) <= 0:
            fail(f"arch.{key}", f"must be positive, got {getattr(a, key)}.")
    if not 0 <= cfg.init.std <= 1:  # the range transformers' LlamaConfig accepts for initializer_range
        fail("init.std", f"must be within [0, 1] (the normal init's standard deviation), got {cfg.init.std}.")
    if a.n_heads % a.n_kv_heads:
        fail("arch.n_kv_heads", f"must divide arch.n_heads ({a.n_heads}), got {a.n_kv_heads}.")
    if o.lr <= 0:
        fail("optimizer.lr", f"must be positive, got {o.lr}.")
    if not 0 <= o.min_lr_ratio <= 1:
        fail("optimizer.min_lr_ratio", f"must be within [0, 1], got {o.min_lr_ratio}.")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        fail("optimizer.betas", f"must be two numbers in [0, 1), got {o.betas}.")
    for key in ("eps", "weight_decay", "grad_clip"):
        if getattr(o, key) < 0:
            fail(f"optimizer.{key}", f"must be >= 0, got {getattr(o, key)}.")
    if o.state_dtype not in ("fp32", "8bit", "4bit"):
        fail("optimizer.state_dtype", f"must be fp32, 8bit or 4bit, got '{o.state_dtype}'.")
    if o.warmup_steps < 0:
        fail("optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}.")
    for key in ("steps", "micro_batch_size", "grad_accum", "loss_chunk_size", "keep_checkpoints"):
        if getattr(t, key) <= 0:
            fail(f"train.{key}", f"must be positive, got {getattr(t, key)}.")
    if not -2**63 <= t.seed < 2**63:  # torch's generators take 64-bit seeds (the data order adds the epoch)
        fail("train.seed", f"must be within [-2**63, 2**63), got {t.seed}.")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"must be >= 0, got {getattr(t, key)}.")
    if not t.seq_lengths:
        fail("train.seq_lengths", "must list at least one sequence length.")
    for s in t.seq_lengths:
        if s < 2:
            fail("train.seq_lengths", f"lengths must be at least 2, got {s}.")
        if s > a.max_seq_len:
            fail("train.seq_lengths", f"{s} exceeds the model's positions (arch.max_seq_len = {a.max_seq_len}); "
                 "shorten it or raise arch.max_seq_len.")
    if t.grad_checkpointing not in (True, False, "auto"):
        fail("train.grad_checkpointing", f"must be true, false or auto, got {t.grad_checkpointing!r}.")
    if t.reshard_after_forward not in (True, False, "auto"):
        fail("train.reshard_after_forward", f"must be true, false or auto, got {t.reshard_after_forward!r}.")
    if t.precision not in ("fp32", "bf16", "fp16"):
        fail("train.precision", f"must be fp32, bf16 or fp16, got '{t.precision}'.")
    if t.device not in ("auto", "cpu", "cuda"):
        fail("train.device", f"must be auto, cpu or cuda, got '{t.device}'.")
    sched = cfg.curriculum.schedule
    if sched:
        if len(sched) != len(t.seq_lengths):
            fail("curriculum.schedule", f"has {len(sched)} boundaries but train.seq_lengths has "
                 f"{len(t.seq_lengths)} lengths; give one start step per length.", "train.seq_lengths")
        if sched[0] != 0 or any(b2 <= b1 for b1, b2 in zip(sched, sched[1:])):
            fail("curriculum.schedule", f"must start at 0 and increase strictly, got {sched}.")
    elif len(t.seq_lengths) > 1:
        fail("curriculum.schedule", f"train.seq_lengths lists {len(t.seq_lengths)} lengths; "
             "give curriculum.schedule the step at which each starts.", "train.seq_lengths")
    for key in ("kl_weight", "ce_teacher_weight", "ce_ground_truth_weight"):
        if getattr(d, key) < 0:
            fail(f"distillation.{key}", f"must be >= 0, got {getattr(d, key)}.")
    if d.kl_weight + d.ce_teacher_weight + d.ce_ground_truth_weight == 0:
        fail("distillation.kl_weight", "all loss weights are 0: nothing would be trained.",
             "distillation.ce_teacher_weight")
    if k.teacher not in ("topk", "online", "none"):
        fail("kd.teacher", f"must be topk, online or none, got '{k.teacher}'.")
    if k.teacher == "none" and d.kl_weight > 0:
        fail("distillation.kl_weight", "is > 0 but kd.teacher is 'none': there is no teacher signal. "
             "Set distillation.kl_weight=0 or choose kd.teacher=topk/online.", "kd.teacher")
    if k.teacher == "online" and not k.teacher_path:
        fail("kd.teacher_path", "kd.teacher is 'online' but no teacher checkpoint directory is given.", "kd.teacher")
    if k.temperature <= 0:
        fail("kd.temperature", f"must be positive, got {k.temperature}.")
    if k.divergence not in ("forward_kl", "reverse_kl", "jsd"):
        fail("kd.divergence", f"must be forward_kl, reverse_kl or jsd, got '{k.divergence}'.")
    if not 0 <= k.jsd_beta <= 1:
        fail("kd.jsd_beta", f"must be within [0, 1], got {k.jsd_beta}.")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
