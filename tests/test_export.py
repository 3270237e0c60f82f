"""Export: ONNX (onnxruntime against PyTorch, prefill, cached decode, greedy generation), Core ML
(conversion and spec on Linux, prediction on macOS), probes, bad input, the conversion toys.

The PyTorch reference is always Hugging Face's own forward with its own cache (``DynamicCache``),
never ``ExportDecoder``, which is what the exported graphs are built from."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from kdtrain.cli import main
from kdtrain.export import (META, TOLERANCE, ExportDecoder, StatefulDecoder, ToyTorch, causal_mask, export,
                            export_coreml, load_hf, make_conversion_toys, onnx_greedy, onnx_prefill_feed, onnx_session,
                            probe_onnx)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def ct():
    """coremltools, imported by the tests that use it (about 3 s: not when collecting the module)."""
    return pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def ckpt(toy, tmp_path_factory):
    """A checkpoint of the toy student after two training steps."""
    from kdtrain.checkpoint import latest_checkpoint
    from kdtrain.config import load_config
    from kdtrain.trainer import Trainer

    run = tmp_path_factory.mktemp("run")
    cfg, _ = load_config([toy["config"]], [f"io.output_dir={run}", "train.steps=2", "io.val_shards=[]"])
    trainer = Trainer(cfg, log=False)
    trainer.fit()
    return latest_checkpoint(trainer.ckpt_dir)


@pytest.fixture(scope="module")
def student(ckpt, tmp_path_factory):
    """The trained student as plain Hugging Face loads it (the PyTorch reference)."""
    from kdtrain.checkpoint import export_hf

    return load_hf(export_hf(ckpt, tmp_path_factory.mktemp("hf") / "hf"))[0]


@pytest.fixture(scope="module")
def onnx_export(ckpt, tmp_path_factory):
    """``kdtrain export CKPT OUT --format onnx``: the export directory and what the command printed."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("exports") / "onnx", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(ckpt), str(out), "--format", "onnx"]) == 0
    return out, printed.getvalue()


def hf_decode(model, ids: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of a prefill of ``ids`` and of each chunk in ``steps``, through Hugging Face's cache."""
    from transformers import DynamicCache

    cache, out = DynamicCache(config=model.config), []
    with torch.no_grad():
        for chunk in [ids, *steps]:
            out.append(model(input_ids=chunk, past_key_values=cache, use_cache=True).logits)
    return out


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[list[int]]:
    from transformers import DynamicCache

    cache, new, x = DynamicCache(config=model.config), [], ids
    with torch.no_grad():
        for _ in range(n):
            x = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            new.append(x)
    return torch.cat(new, dim=1).tolist()


# ---- ONNX ----

def test_onnx_prefill_and_16_cached_decode_steps_match_pytorch(onnx_export, student):
    """Batch 2 (a dynamic batch axis), a 9-token prefill, then 16 one-token steps fed back through
    the graph's own present_* outputs: logits within 1e-4 of PyTorch fp32 at every step."""
    session = onnx_session(onnx_export[0] / "model.onnx")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 9), generator=g)
    steps = [torch.randint(3, 32000, (2, 1), generator=g) for _ in range(16)]
    reference = hf_decode(student, ids, steps)
    feed = onnx_prefill_feed(session, ids)
    past = [i.name for i in session.get_inputs()[1:]]
    for k, (chunk, ref) in enumerate(zip([ids, *steps], reference)):
        feed["input_ids"] = chunk.numpy()
        logits, *present = session.run(["logits", *[n.replace("past_", "present_") for n in past]], feed)
        assert present[0].shape[2] == 9 + k  # the cache grew by what was fed
        np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-4, err_msg=f"step {k}")
        feed = dict(zip(past, present))
    assert np.abs(reference[-1].numpy()).max() > 0.05  # a real signal, not near-zero logits


def test_onnx_greedy_generation_equals_pytorch_for_32_tokens(onnx_export, student):
    from kdtrain.tokenizer import load_tokenizer

    tok = load_tokenizer(onnx_export[0] / "tokenizer", 32000)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("What is the capital of France?", add_special_tokens=False)]])
    got = onnx_greedy(onnx_session(onnx_export[0] / "model.onnx"), ids, 32)
    assert got == hf_greedy(student, ids, 32)
    assert len(set(got[0])) > 1  # not one token repeated: the cache carries the context


def test_onnx_export_from_a_sharded_checkpoint(ckpt, student, tmp_path):
    """A ``dcp/`` checkpoint (the layout of world size > 1, written here by one process) exports
    to the same function as the single-file one."""
    import torch.distributed.checkpoint as dcp

    from kdtrain.checkpoint import MANIFEST, file_entries, write_manifest

    sharded = tmp_path / ckpt.name
    shutil.copytree(ckpt, sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "optimizer.pt").unlink()
    dcp.save({"model": student.state_dict()}, checkpoint_id=str(sharded / "dcp"))
    files = [f for f in sharded.rglob("*") if f.is_file() and f.name != MANIFEST]
    write_manifest(sharded, file_entries(sharded, files))
    out, probe = export(sharded, tmp_path / "onnx", "onnx")
    assert probe.first_divergence is None
    session, ids = onnx_session(out / "model.onnx"), torch.arange(3, 40)[None]
    logits = session.run(["logits"], onnx_prefill_feed(session, ids))[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, student(input_ids=ids).logits.numpy(), rtol=0, atol=1e-4)


def test_onnx_graph_has_dynamic_axes_and_a_cache_per_layer(onnx_export):
    graph = onnx.load(str(onnx_export[0] / "model.onnx"), load_external_data=False).graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs, outputs = {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}
    assert list(inputs) == ["input_ids", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert list(outputs) == ["logits", "present_key_0", "present_value_0", "present_key_1", "present_value_1",
                             "hidden_0", "hidden_1"]
    batch, seq = inputs["input_ids"]
    assert isinstance(batch, str) and isinstance(seq, str)
    assert inputs["past_key_0"][0] == batch and isinstance(inputs["past_key_0"][2], str)
    assert inputs["past_key_0"][1:4:2] == [2, 16]  # n_kv_heads, d_head
    assert outputs["logits"] == [batch, seq, 32000] and outputs["hidden_1"] == [batch, seq, 64]


def test_onnx_export_metadata_tokenizer_and_probe(onnx_export, ckpt):
    from kdtrain import __version__
    from kdtrain.tokenizer import load_tokenizer

    out, printed = onnx_export
    meta = json.loads((out / META).read_text())
    assert meta["format"] == "onnx" and meta["precision"] == "fp32"
    assert (meta["vocab_size"], meta["max_seq_len"], meta["n_layers"]) == (32000, 128, 2)
    assert meta["kdtrain_version"] == __version__ and meta["source_checkpoint"] == str(ckpt.resolve())
    assert len(load_tokenizer(out / meta["tokenizer"], 32000)) == 32000
    errors = meta["probe"]["errors"]
    assert list(errors) == ["hidden_0", "hidden_1", "logits"] and meta["probe"]["first_divergence"] is None
    assert max(errors.values()) <= TOLERANCE[("onnx", "fp32")]
    assert "every output within tolerance" in printed and f"hidden_1   {errors['hidden_1']:.2e} ok" in printed
    assert not list(out.parent.glob(".tmp-*"))


@pytest.mark.parametrize("weight, layer", [("lm.model.layers.0.self_attn.v_proj.weight", "hidden_0"),
                                           ("lm.model.layers.1.mlp.down_proj.weight", "hidden_1"),
                                           ("lm.lm_head.weight", "logits")])
def test_probe_names_the_layer_whose_weight_was_perturbed(onnx_export, student, tmp_path, weight, layer):
    from onnx import numpy_helper

    model = onnx.load(str(onnx_export[0] / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name == weight)
    w = numpy_helper.to_array(init).copy()
    w.flat[::7] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, weight))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    ids = torch.arange(3, 19)[None]
    probe = probe_onnx(tmp_path / "broken.onnx", student, ids)
    assert probe.first_divergence == layer
    names = list(probe.errors)
    assert all(probe.errors[n] <= probe.tolerance for n in names[:names.index(layer)])  # clean before it
    assert f"diverges first at {layer}" in probe.report()


# ---- Core ML (conversion and spec on any OS; prediction on macOS) ----

def coreml_spec_io(path):
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    arr = ct.proto.FeatureTypes_pb2.ArrayFeatureType

    def desc(f, kind):
        t = getattr(f.type, kind) if kind == "multiArrayType" else f.type.stateType.arrayType
        ranges = [(r.lowerBound, r.upperBound) for r in t.shapeRange.sizeRanges] if kind == "multiArrayType" else []
        return {"dtype": arr.ArrayDataType.Name(t.dataType), "shape": list(t.shape), "ranges": ranges}

    return spec, ({f.name: desc(f, "multiArrayType") for f in spec.description.input},
                  {f.name: desc(f, "multiArrayType") for f in spec.description.output},
                  {f.name: desc(f, "state") for f in spec.description.state})


@pytest.mark.slow
@pytest.mark.parametrize("precision, io_dtype", [("fp16", "FLOAT16"), ("fp32", "FLOAT32")])
def test_coreml_export_is_a_stateful_ml_program_with_the_expected_spec(ckpt, tmp_path, precision, io_dtype, ct):
    out, probe = export(ckpt, tmp_path / "coreml", "coreml", precision)
    spec, (inputs, outputs, states) = coreml_spec_io(out / "model.mlpackage")
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 9  # iOS 18 / macOS 15
    assert inputs == {
        "input_ids": {"dtype": "INT32", "shape": [1, 1], "ranges": [(1, 1), (1, 128)]},
        "causal_mask": {"dtype": io_dtype, "shape": [1, 1, 1, 1], "ranges": [(1, 1), (1, 1), (1, 128), (1, 128)]}}
    assert list(outputs) == ["logits", "hidden_0", "hidden_1"]
    assert {o["dtype"] for o in outputs.values()} == {io_dtype}
    # The KV cache is Core ML state: [layers, batch, kv heads, max_seq_len, d_head], fp16 (the only state type).
    assert states == {n: {"dtype": "FLOAT16", "shape": [2, 1, 2, 128, 16], "ranges": []}
                      for n in ("key_cache", "value_cache")}
    ops = {op.type for block in spec.mlProgram.functions["main"].block_specializations.values()
           for op in block.operations}
    assert {"read_state", "slice_update", "write_state"} <= ops  # the cache is read and written in place
    meta = json.loads((out / META).read_text())
    assert meta["precision"] == precision and meta["vocab_size"] == 32000 and (out / "tokenizer").is_dir()
    assert probe is None and meta["probe"] is None  # no Core ML runtime off macOS


@pytest.mark.macos
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_coreml_prediction_matches_pytorch_with_the_stateful_cache(student, tmp_path, precision, ct):
    """macOS only: a prefill probe within the documented tolerance, then 8 decode steps through the
    model's state against Hugging Face's cache."""
    from kdtrain.export import probe_coreml

    path = export_coreml(student, tmp_path / "m.mlpackage", precision)
    ids = torch.arange(3, 12)[None]
    probe = probe_coreml(path, student, ids, precision)
    assert probe.first_divergence is None, probe.report()
    mlmodel, dtype = ct.models.MLModel(str(path)), np.float16 if precision == "fp16" else np.float32
    steps = [torch.tensor([[5 + 11 * k]]) for k in range(8)]
    reference = hf_decode(student, ids, steps)
    state, pos = mlmodel.make_state(), 0
    for chunk, ref in zip([ids, *steps], reference):
        S = chunk.shape[1]
        got = mlmodel.predict({"input_ids": chunk.numpy().astype(np.int32),
                               "causal_mask": causal_mask(pos, S)[None, None].numpy().astype(dtype)}, state=state)
        pos += S
        scale = max(1.0, float(ref.abs().max()))
        assert np.abs(got["logits"] - ref.numpy()).max() / scale <= TOLERANCE[("coreml", precision)]


# ---- bad input: clear errors, exit 2, nothing written ----

def test_unknown_format_is_refused(ckpt, tmp_path, capsys):
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert "unknown export format 'tflite'" in err and "hf, onnx, coreml" in err
    assert not (tmp_path / "out").exists()


def test_a_path_without_a_checkpoint_is_refused_with_a_hint(ckpt, tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out"), "--format", "onnx"]) == 2
    assert "holds no kdtrain checkpoint" in capsys.readouterr().err
    run = ckpt.parent.parent  # the run directory: its latest checkpoint is named
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "onnx"]) == 2
    assert f"The latest checkpoint under it is {ckpt}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_that_exists_and_is_not_empty_is_left_alone(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(ckpt), str(out), "--format", "onnx"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failure_mid_export_leaves_nothing(ckpt, tmp_path, monkeypatch, ct):
    import kdtrain.export as ex

    def fail(model, path, precision="fp16"):
        path.mkdir()  # something written, then the converter fails
        raise RuntimeError("converter failed")

    monkeypatch.setattr(ex, "export_coreml", fail)
    with pytest.raises(RuntimeError, match="converter failed"):
        export(ckpt, tmp_path / "out", "coreml")
    assert list(tmp_path.iterdir()) == []


def test_a_student_that_is_not_llama_is_refused_for_onnx_and_coreml(ckpt, tmp_path, monkeypatch, capsys):
    """ExportDecoder is Llama's forward; another architecture (an init.base_checkpoint model) would
    convert to the wrong function, so it is refused and pointed at --format hf."""
    import kdtrain.export as ex

    real = ex.load_hf

    def as_qwen(path):
        model, tok = real(path)
        model.config.model_type = "qwen3"  # Qwen3 adds q/k norms that ExportDecoder does not apply
        return model, tok

    monkeypatch.setattr(ex, "load_hf", as_qwen)
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--format", "onnx"]) == 2
    assert "holds a 'qwen3' model: export it with --format hf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_hf_stays_the_default_format(ckpt, student, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    out.mkdir()  # an empty directory is fine
    assert main(["export", str(ckpt), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, student(input_ids=ids).logits)
    assert json.loads((out / META).read_text())["format"] == "hf"


# ---- the conversion toys (smoke, but for the toy block's ONNX export) ----

@pytest.fixture(scope="module")
def conversion_toys(tmp_path_factory) -> dict:
    """The toy block and the tiny torch model, as ``kdtrain make-toy`` writes them; the toy block's
    ONNX export (seconds) is ``toy_onnx``'s, built only for the test that reads it."""
    return make_conversion_toys(tmp_path_factory.mktemp("conversion_toys"), onnx=False)


@pytest.fixture(scope="module")
def toy_block(conversion_toys):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(conversion_toys["toy_block"], local_files_only=True).eval()


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    """``toy_onnx.onnx`` as ``kdtrain make-toy`` writes it (the other toys again with it: a fraction of a second)."""
    return make_conversion_toys(tmp_path_factory.mktemp("conversion_toys_onnx"))["toy_onnx"]


@pytest.mark.smoke
def test_toy_block_export_decoder_equals_hugging_face(toy_block):
    """The export wrapper over the block's own weights against Hugging Face's forward and cache,
    for a prefill and a 3-token chunk, batch 3."""
    dec = ExportDecoder(toy_block).eval()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_decode(toy_block, ids[:, :9], [ids[:, 9:]])
    with torch.no_grad():
        first = dec(ids[:, :9], *dec.empty_cache(3))
        second = dec(ids[:, 9:], *first[1:3])
    torch.testing.assert_close(first[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(second[0], ref[1], rtol=0, atol=1e-5)
    stateful = StatefulDecoder(dec, 128, batch=3).eval()
    with torch.no_grad():
        stateful(ids[:, :9], causal_mask(0, 9)[None, None])
        logits = stateful(ids[:, 9:], causal_mask(9, 3)[None, None])[0]
    torch.testing.assert_close(logits, ref[1], rtol=0, atol=1e-5)


def test_toy_onnx_probe_and_cached_decode_match_pytorch(toy_onnx, toy_block):
    """Not smoke: the export takes seconds. The smoke suite checks its parts, ``ExportDecoder``
    against Hugging Face (above) and the ONNX path on the tiny torch model (below)."""
    ids = torch.arange(10)[None] * 37 % 256
    probe = probe_onnx(toy_onnx, toy_block, ids)
    assert probe.first_divergence is None, probe.report()
    assert onnx_greedy(onnx_session(toy_onnx), ids, 16) == hf_greedy(toy_block, ids, 16)


def test_toy_block_converts_to_a_stateful_coreml_program(toy_block, tmp_path, ct):
    _, (inputs, outputs, states) = coreml_spec_io(export_coreml(toy_block, tmp_path / "block.mlpackage"))
    assert list(inputs) == ["input_ids", "causal_mask"] and list(outputs) == ["logits", "hidden_0"]
    assert states["key_cache"]["shape"] == [1, 1, 2, 128, 16]


def _toy_torch(conversion_toys):
    model = ToyTorch().eval()
    model.load_state_dict(torch.load(conversion_toys["toy_torch"], weights_only=True))
    return model, torch.randn(5, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.smoke
def test_toy_torch_converts_to_onnx(conversion_toys, tmp_path):
    model, x = _toy_torch(conversion_toys)
    with torch.no_grad():
        ref = model(x).numpy()
        torch.onnx.export(model, (x,), dynamo=True, verbose=False, optimize=False, input_names=["x"],  # as export_onnx
                          output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(tmp_path / "t.onnx"))
    got = onnx_session(tmp_path / "t.onnx").run(None, {"x": x[:3].numpy()})[0]
    np.testing.assert_allclose(got, ref[:3], rtol=1e-5, atol=1e-6)


def test_toy_torch_converts_to_coreml(conversion_toys, tmp_path, ct):
    """Not in -m smoke (coremltools' import alone is 3 s); `make smoke_torch` runs it with the ONNX one."""
    model, x = _toy_torch(conversion_toys)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType("x", shape=(ct.RangeDim(1, 64, default=1), 16))],
                         outputs=[ct.TensorType("y")], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    mlmodel.save(str(tmp_path / "t.mlpackage"))
    _, (inputs, outputs, _) = coreml_spec_io(tmp_path / "t.mlpackage")
    assert inputs["x"]["ranges"] == [(1, 64), (16, 16)] and list(outputs) == ["y"]


@pytest.mark.smoke
def test_conversion_toys_are_the_same_bytes_on_any_cpu(conversion_toys, tmp_path):
    """Weights drawn in float64 and rounded: the digests below hold for every CPU instruction set
    (checked with ATEN_CPU_CAPABILITY=default as well); a change to them changes the toys."""
    from safetensors.torch import load_file

    def digest(state):
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode() + state[k].numpy().tobytes())
        return h.hexdigest()[:16]

    block = load_file(str(conversion_toys["toy_block"] / "model.safetensors"))
    tiny = torch.load(conversion_toys["toy_torch"], weights_only=True)
    assert (digest(block), digest(tiny)) == (BLOCK_DIGEST, TORCH_DIGEST)
    assert sum(v.numel() for v in block.values()) == 2 * 256 * 64 + 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 256 + 3 * 64


BLOCK_DIGEST, TORCH_DIGEST = "0826ffe3e8221479", "8fa9eef52fc2b19e"
