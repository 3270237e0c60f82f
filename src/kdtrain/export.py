"""Export: a checkpoint leaves the trainer as a Hugging Face directory, an ONNX decoder with a KV
cache, or a Core ML ML Program, with probes that say where a conversion diverges.

The ONNX and Core ML graphs come from ``ExportDecoder``, a Llama decoder written for export over
the Hugging Face model's own modules (embedding, norms, projections, MLP, head: the same weights,
no copy): an explicit causal mask, grouped-query attention as broadcast matmuls with the softmax
in fp32 (Core ML's fp16 programs compute it in fp16), and the KV cache as explicit tensors (ONNX)
or Core ML state. Hugging Face's own forward does not convert: coremltools fails on an op of its
mask code. Every graph also returns each decoder layer's output (``hidden_<i>``), which the probes
compare with PyTorch.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError
from .config import ConfigError, file_in_the_way

FORMATS = ("hf", "onnx", "coreml")
PRECISIONS = ("fp16", "fp32")  # Core ML compute precision; ONNX is always fp32
META = "kdtrain_export.json"
PROBE_TEXT = "The capital of France is Paris. The opposite of hot is cold. 12 plus 30 equals 42."
# Probe tolerance per (format, precision) on max|exported - PyTorch| / max(1, max|PyTorch|), at every
# decoder layer's output and at the logits. ONNX fp32 agrees to ~1e-6 (float reassociation only);
# Core ML fp16 carries an 11-bit mantissa through every layer.
TOLERANCE = {("onnx", "fp32"): 1e-4, ("coreml", "fp32"): 1e-3, ("coreml", "fp16"): 5e-2}


def causal_mask(start, S: int) -> torch.Tensor:
    """``[S, start + S]``: 0 where query ``start + s`` may attend to key ``t`` (t <= start + s), else -inf."""
    q_pos = torch.arange(S) + start
    return torch.where(torch.arange(S + start)[None, :] > q_pos[:, None], float("-inf"), 0.0)


class ExportDecoder(nn.Module):
    """A Llama causal LM (``LlamaForCausalLM``) written for export, over the model's own modules.

    ``forward(input_ids, *past)`` takes ``past_key_<i>, past_value_<i>`` per layer, each
    ``[B, n_kv_heads, P, d_head]`` (P = 0 for a prefill), and returns ``logits [B, S, V]``,
    ``present_key_<i>, present_value_<i>`` (``[B, n_kv_heads, P + S, d_head]``) and
    ``hidden_<i> [B, S, d_model]``, the output of decoder layer ``i``. Rows of a batch share one
    length: there is no padding mask.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model
        c = model.config
        self.n_layers, self.n_heads, self.n_kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
        self.d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.rope = model.model.rotary_emb  # its inv_freq and attention_scaling follow the config's RoPE type

    def rope_tables(self, start, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(S, dtype=torch.float32) + start
        freqs = pos[:, None] * self.rope.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope.attention_scaling, emb.sin() * self.rope.attention_scaling

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def attend(self, attn: nn.Module, q, k, v, mask) -> torch.Tensor:
        """``q [B, H, S, D]``, ``k, v [B, Hkv, T, D]``, ``mask [S, T]`` or ``[B, 1, S, T]`` (0 or -inf)."""
        B, _, S, D = q.shape
        q = q.reshape(B, self.n_kv, self.n_heads // self.n_kv, S, D)  # heads of one KV group together
        scores = (q @ k.unsqueeze(2).transpose(-1, -2)).float() * attn.scaling + mask
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return (probs @ v.unsqueeze(2)).reshape(B, self.n_heads, S, D)

    def decode(self, input_ids: torch.Tensor, start, mask: torch.Tensor, cache) -> tuple[torch.Tensor, list]:
        """Logits and per-layer outputs for ``input_ids`` at positions ``start .. start + S - 1``;
        ``mask [S, T]`` (or ``[B, 1, S, T]``) is 0 where a query may see a key, else -inf;
        ``cache(i, k, v)`` stores layer ``i``'s new keys and values and returns all ``T`` of them."""
        B, S = input_ids.shape
        cos, sin = self.rope_tables(start, S)
        x = self.lm.model.embed_tokens(input_ids)
        hidden = []
        for i, layer in enumerate(self.lm.model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(B, S, self.n_heads, self.d_head).transpose(1, 2)
            k = a.k_proj(h).view(B, S, self.n_kv, self.d_head).transpose(1, 2)
            v = a.v_proj(h).view(B, S, self.n_kv, self.d_head).transpose(1, 2)
            k, v = cache(i, self.rotate(k, cos, sin), v)
            o = self.attend(a, self.rotate(q, cos, sin), k, v, mask)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.d_head))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            hidden.append(x)
        return self.lm.lm_head(self.lm.model.norm(x)), hidden

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        P = past[0].shape[2]
        present = []

        def cache(i, k, v):
            present.extend((torch.cat((past[2 * i], k), dim=2), torch.cat((past[2 * i + 1], v), dim=2)))
            return present[-2], present[-1]

        logits, hidden = self.decode(input_ids, P, causal_mask(P, input_ids.shape[1]), cache)
        return (logits, *present, *hidden)

    def io_names(self) -> tuple[list[str], list[str]]:
        kv = [f"{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]
        return (["input_ids", *[f"past_{n}" for n in kv]],
                ["logits", *[f"present_{n}" for n in kv], *[f"hidden_{i}" for i in range(self.n_layers)]])

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.n_kv, 0, self.d_head) for _ in range(2 * self.n_layers)]


class StatefulDecoder(nn.Module):
    """The decoder with its KV cache as buffers updated in place, which coremltools turns into
    Core ML state: ``forward(input_ids [B, S], causal_mask [B, 1, S, T])`` writes positions
    ``T - S .. T - 1`` of the cache and returns ``logits`` and ``hidden_<i>``."""

    def __init__(self, decoder: ExportDecoder, max_len: int, batch: int = 1):
        super().__init__()
        self.decoder = decoder
        shape = (decoder.n_layers, batch, decoder.n_kv, max_len, decoder.d_head)
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor):
        T = causal_mask.shape[-1]
        start = T - input_ids.shape[1]

        def cache(i, k, v):
            self.key_cache[i, :, :, start:T] = k
            self.value_cache[i, :, :, start:T] = v
            return self.key_cache[i, :, :, :T], self.value_cache[i, :, :, :T]

        logits, hidden = self.decoder.decode(input_ids, start, causal_mask, cache)
        return (logits, *hidden)


# ---- writing an export ----

def export(ckpt: str | Path, out: str | Path, fmt: str = "hf", precision: str = "fp16") -> tuple[Path, Probe | None]:
    """Export checkpoint ``ckpt`` to the new directory ``out`` as ``fmt`` (see ``FORMATS``); returns
    ``out`` and the probe of the exported model against PyTorch (None for ``hf``, and for
    ``coreml`` off macOS, where Core ML cannot predict).

    ``hf``: the Hugging Face directory of ``checkpoint.export_hf``. ``onnx``: ``model.onnx`` (see
    ``export_onnx``). ``coreml``: ``model.mlpackage`` (see ``export_coreml``) at ``precision``.
    Each export holds ``kdtrain_export.json`` (format, precision, vocab size, max sequence length,
    kdtrain version, source checkpoint, probe errors) and the tokenizer (``tokenizer/``; ``hf``
    keeps its files at the top). Written to a temporary sibling and renamed: an error leaves nothing.
    """
    import sys

    from .checkpoint import export_hf, latest_checkpoint

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / "meta.json").is_file() or not (ckpt / "config.yaml").is_file():
        latest = latest_checkpoint(ckpt) or latest_checkpoint(ckpt / "checkpoints")
        hint = f" The latest checkpoint under it is {latest}." if latest else ""
        raise CheckpointError(f"{ckpt} holds no kdtrain checkpoint (no meta.json and config.yaml); pass a checkpoint "
                              f"directory such as runs/toy/checkpoints/step_00000050.{hint}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export output {out} already exists and is not empty; remove it or choose a new path.")
    blocking = file_in_the_way(out.parent)
    if blocking is not None:
        raise ConfigError(f"export output {out}: {blocking} is a file, not a directory; choose another path.")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t0, model, probe = time.perf_counter(), None, None
    try:
        if fmt == "hf":
            export_hf(ckpt, tmp)
        else:
            model, tokenizer = load_hf(export_hf(ckpt, tmp / "hf"))
            if model.config.model_type != "llama":
                raise ConfigError(f"--format {fmt} exports Llama-architecture students; {ckpt} holds a "
                                  f"{model.config.model_type!r} model: export it with --format hf.")
            tokenizer.save_pretrained(tmp / "tokenizer")
            shutil.rmtree(tmp / "hf")
            ids = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"]])
            if fmt == "onnx":
                probe = probe_onnx(export_onnx(model, tmp / "model.onnx"), model, ids)
            else:
                export_coreml(model, tmp / "model.mlpackage", precision)
                if sys.platform == "darwin":
                    probe = probe_coreml(tmp / "model.mlpackage", model, ids, precision)
        write_metadata(tmp, fmt, precision if fmt == "coreml" else "fp32", ckpt, model, probe,
                       time.perf_counter() - t0)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, probe


def load_hf(path: str | Path) -> tuple[nn.Module, object]:
    """A Hugging Face model directory (as ``export_hf`` writes it) and its tokenizer, fp32, eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def write_metadata(out: Path, fmt: str, precision: str, ckpt: Path, model: nn.Module | None, probe: Probe | None,
                   seconds: float) -> None:
    from . import __version__

    meta = {"format": fmt, "precision": precision, "kdtrain_version": __version__,
            "source_checkpoint": str(ckpt.resolve()), "export_seconds": round(seconds, 3),
            "probe": probe and {"text": PROBE_TEXT, "tolerance": probe.tolerance, "errors": probe.errors,
                                "first_divergence": probe.first_divergence}}
    if model is not None:
        c = model.config
        meta.update(tokenizer="tokenizer", vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings,
                    n_layers=c.num_hidden_layers, n_kv_heads=c.num_key_value_heads,
                    d_head=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    else:
        c = json.loads((out / "config.json").read_text())
        meta.update(tokenizer=".", vocab_size=c["vocab_size"], max_seq_len=c["max_position_embeddings"])
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")


def export_onnx(model: nn.Module, path: Path) -> Path:
    """One graph for prefill and decode (``ExportDecoder``'s inputs and outputs): dynamic batch,
    sequence and past-length axes; a prefill passes past tensors of length 0. Exported with
    torch.export (``torch.onnx.export(dynamo=True)``), opset 18, fp32."""
    decoder = ExportDecoder(model).eval()
    ins, outs = decoder.io_names()
    B, S, P = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past", min=0)
    past = [torch.zeros(2, decoder.n_kv, 5, decoder.d_head) for _ in range(2 * decoder.n_layers)]
    ids = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        program = torch.onnx.export(decoder, (ids, *past), dynamo=True, verbose=False, opset_version=18, optimize=False,
                                    input_names=ins, output_names=outs,
                                    dynamic_shapes=({0: B, 1: S}, tuple({0: B, 2: P} for _ in past)))
    program.save(str(path))
    return path


def export_coreml(model: nn.Module, path: Path, precision: str = "fp16") -> Path:
    """An ML Program (iOS 18 / macOS 15) from ``StatefulDecoder``: batch 1, any sequence length
    from 1 to the model's ``max_position_embeddings``, the KV cache as state. Inputs ``input_ids
    [1, S]`` (int32) and ``causal_mask [1, 1, S, T]`` (0 / -inf; T - S tokens are in the cache);
    outputs ``logits`` and ``hidden_<i>``. Converted from a TorchScript trace. Core ML state is
    fp16 only, so at fp32 the cache is stored in fp16 and the rest computes in fp32."""
    import coremltools as ct
    import numpy as np

    decoder = ExportDecoder(model).eval()
    max_len = model.config.max_position_embeddings
    stateful = StatefulDecoder(decoder, max_len).eval()
    dtype = np.float16 if precision == "fp16" else np.float32
    with torch.no_grad():
        traced = torch.jit.trace(stateful, (torch.zeros(1, 3, dtype=torch.long), causal_mask(2, 3)[None, None]))
    S, T = ct.RangeDim(1, max_len, default=1), ct.RangeDim(1, max_len, default=1)
    mlmodel = ct.convert(
        traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        inputs=[ct.TensorType("input_ids", shape=(1, S), dtype=np.int32),
                ct.TensorType("causal_mask", shape=(1, 1, S, T), dtype=dtype)],
        outputs=[ct.TensorType(n, dtype=dtype) for n in ["logits"] + [f"hidden_{i}" for i in range(decoder.n_layers)]],
        states=[ct.StateType(ct.TensorType(shape=tuple(stateful.key_cache.shape), dtype=np.float16), name=n)
                for n in ("key_cache", "value_cache")],
        skip_model_load=True)  # the Core ML runtime exists only on macOS
    mlmodel.save(str(path))
    return path


# ---- probes: where does an export diverge from PyTorch? ----

def reference_outputs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """PyTorch's own forward (Hugging Face attention, not ``ExportDecoder``): each decoder layer's
    output, caught by forward hooks, and the logits."""
    caught = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: caught.__setitem__(
        f"hidden_{i}", out[0] if isinstance(out, tuple) else out)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            caught["logits"] = model(input_ids=input_ids).logits
    finally:
        for h in hooks:
            h.remove()
    return caught


class Probe:
    """Per-output error against PyTorch, in graph order (``hidden_0 .. hidden_{L-1}``, ``logits``):
    ``max|exported - reference| / max(1, max|reference|)``."""

    def __init__(self, reference: dict, exported: dict, tolerance: float):
        self.tolerance = tolerance
        self.errors = {}
        for name, ref in reference.items():
            ref = ref.detach().double()
            got = torch.as_tensor(exported[name]).double().reshape(ref.shape)
            self.errors[name] = ((got - ref).abs().max() / max(1.0, ref.abs().max().item())).item()

    @property
    def first_divergence(self) -> str | None:
        """The first output (layers in order, then logits) over tolerance, or None."""
        return next((n for n, e in self.errors.items() if not e <= self.tolerance), None)

    def report(self) -> str:
        rows = [f"  {n:10s} {e:.2e} {'ok' if e <= self.tolerance else 'OVER'}" for n, e in self.errors.items()]
        verdict = (f"diverges first at {self.first_divergence}" if self.first_divergence
                   else "every output within tolerance")
        return "\n".join([f"probe (tolerance {self.tolerance:.0e}): {verdict}", *rows])


def onnx_session(path: str | Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_prefill_feed(session, input_ids) -> dict:
    """The feed of a prefill: ``input_ids`` and past tensors of length 0."""
    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64)
    feed = {"input_ids": ids}
    for i in session.get_inputs()[1:]:
        feed[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), dtype=np.float32)
    return feed


def probe_onnx(path: str | Path, model: nn.Module, input_ids: torch.Tensor) -> Probe:
    """Prefill ``input_ids`` through the exported ONNX graph and through PyTorch."""
    reference = reference_outputs(model, input_ids)
    session = onnx_session(path)
    names = list(reference)
    got = dict(zip(names, session.run(names, onnx_prefill_feed(session, input_ids))))
    return Probe(reference, got, TOLERANCE[("onnx", "fp32")])


def probe_coreml(path: str | Path, model: nn.Module, input_ids: torch.Tensor, precision: str) -> Probe:
    """Prefill ``input_ids`` (batch 1) through the Core ML model and through PyTorch (macOS only)."""
    import coremltools as ct
    import numpy as np

    reference = reference_outputs(model, input_ids)
    mlmodel = ct.models.MLModel(str(path))
    dtype = np.float16 if precision == "fp16" else np.float32
    S = input_ids.shape[1]
    got = mlmodel.predict({"input_ids": input_ids.numpy().astype(np.int32),
                           "causal_mask": causal_mask(0, S)[None, None].numpy().astype(dtype)},
                          state=mlmodel.make_state())
    return Probe(reference, got, TOLERANCE[("coreml", precision)])


def onnx_greedy(session, prompt_ids, n: int) -> list[list[int]]:
    """``n`` greedy tokens per row after ``prompt_ids [B, S]`` through the ONNX graph and its cache."""
    import numpy as np

    feed = onnx_prefill_feed(session, prompt_ids)
    past_names = [i.name for i in session.get_inputs()[1:]]
    present_names = [n.replace("past_", "present_") for n in past_names]
    out = []
    for _ in range(n):
        logits, *present = session.run(["logits", *present_names], feed)
        nxt = logits[:, -1].argmax(-1)[:, None]
        out.append(nxt)
        feed = {"input_ids": nxt.astype(np.int64), **dict(zip(past_names, present))}
    return np.concatenate(out, axis=1).tolist()


# ---- the conversion toys: seconds-long proof that a student converts and computes the same ----

TOY_BLOCK_ARCH = {"d_model": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_head": 16, "d_ff": 256,
                  "vocab_size": 256, "max_seq_len": 128}


class ToyTorch(nn.Module):
    """The tiny torch model: LayerNorm -> Linear -> GELU -> Linear, ``[B, 16] -> [B, 8]``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_conversion_toys(out_dir: str | Path, seed: int = 0, onnx: bool = True) -> dict:
    """Write the conversion toys into ``out_dir``: ``toy_block/`` (a one-block Llama causal LM at
    the toy student's width, a Hugging Face directory), ``toy_torch.pt`` (``ToyTorch``'s weights-only
    state dict) and ``toy_onnx.onnx`` (the toy block exported by ``export_onnx``; seconds, where the
    rest takes a fraction of one: ``onnx=False`` leaves it out). Weights are drawn in float64 and
    rounded, so every CPU gives the same bytes."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    from .config import build_config
    from .model import llama_config, seeded_init

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with no_init_weights():
        block = LlamaForCausalLM(llama_config(build_config({"arch": TOY_BLOCK_ARCH}).arch))
    seeded_init(block, seed, 0.1)  # std 0.1: activations large enough that a broken op shows
    block.eval().save_pretrained(out / "toy_block", safe_serialization=True)
    toy = ToyTorch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in toy.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=g) * 0.5)
    torch.save(toy.state_dict(), out / "toy_torch.pt")
    toys = {"toy_block": out / "toy_block", "toy_torch": out / "toy_torch.pt"}
    if onnx:
        toys["toy_onnx"] = export_onnx(block, out / "toy_onnx.onnx")
    return toys
