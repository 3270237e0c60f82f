"""A battery of bad inputs: data, config, command line, checkpoints whose files were replaced with
the manifest rewritten to match, and malformed requests to the teacher server. Each one must end in
the error class of its stage with a message that names where (file and line, config key, option),
never in another exception, a traceback or a silent wrong reading. Other checkpoint damage (torn,
tampered, non-finite, full disks, signals) is in test_checkpoint.py, test_cli.py and
test_trainer.py; annotate's records in test_annotate.py; gen-data's in test_gendata.py."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdtrain.cli import main
from kdtrain.config import Config, ConfigError, load_config
from kdtrain.data import DataError, load_dataset

V = 32000
GOOD = {"prompt": "What is 2 + 2?", "teacher_text": "It is 4.", "reference": "4"}
# Response ids [5, 2] with two top-k rows of k = 2.
TOPK = {"prompt": "p", "teacher_text": "t", "response_ids": [5, 2],
        "teacher_topk": {"ids": [[5, 6], [2, 3]], "logprobs": [[-0.1, -3.0], [-0.2, -2.5]], "temperature": 1.0}}

NOT_TEXT = [0, 1.5, True, [], {}, ["a"], {"a": "b"}, "", "   \n\t"]


def _set(base: dict, path: str, value) -> dict:
    """A deep copy of ``base`` with ``path`` (dotted, list indices as numbers) set or deleted."""
    rec = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = rec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return rec


_DELETE = object()


def _data_cases():
    cases = []
    for field in ("prompt", "teacher_text"):
        cases.append((f"{field}-missing", _set(GOOD, field, _DELETE), field))
        cases.append((f"{field}-null", _set(GOOD, field, None), field))
        cases += [(f"{field}-{json.dumps(v)}", _set(GOOD, field, v), field) for v in NOT_TEXT]
    cases += [(f"reference-{json.dumps(v)}", _set(GOOD, "reference", v), "reference") for v in NOT_TEXT]
    for msgs in ([], "hello", [1], [{"role": 1, "content": "x"}], [{"role": "user"}], [{"content": "x"}],
                 [{"role": "user", "content": None}], [{"role": "user", "content": ["x"]}], {"role": "user"}):
        rec = {"messages": msgs, "teacher_text": "t"}
        cases.append((f"messages-{json.dumps(msgs)}", rec, "messages"))
    for ids in ([], "5", [1.5], [True], [-1], [V], [2**70], [[1]], {"a": 1}, [None]):
        cases.append((f"response_ids-{json.dumps(ids)}", _set(TOPK, "response_ids", ids), "response_ids"))
    topk_bad = {
        "topk-not-object": ("teacher_topk", [1, 2]),
        "topk-no-ids": ("teacher_topk.ids", _DELETE),
        "topk-no-logprobs": ("teacher_topk.logprobs", _DELETE),
        "topk-ids-not-list": ("teacher_topk.ids", "5,6"),
        "topk-one-row-short": ("teacher_topk.ids", [[5, 6]]),
        "topk-row-width": ("teacher_topk.ids.1", [2, 3, 4]),
        "topk-row-empty": ("teacher_topk.ids.0", []),
        "topk-negative-id": ("teacher_topk.ids.0.1", -6),
        "topk-id-at-vocab": ("teacher_topk.ids.0.1", V),
        "topk-float-id": ("teacher_topk.ids.0.1", 6.0),
        "topk-bool-id": ("teacher_topk.ids.0.1", True),
        "topk-string-id": ("teacher_topk.ids.0.1", "6"),
        "topk-duplicate-id": ("teacher_topk.ids.0.1", 5),
        "topk-positive-logprob": ("teacher_topk.logprobs.0.1", 0.5),
        "topk-string-logprob": ("teacher_topk.logprobs.0.1", "-1"),
        "topk-bool-logprob": ("teacher_topk.logprobs.0.1", False),
        "topk-null-logprob": ("teacher_topk.logprobs.0.1", None),
        "topk-sum-above-one": ("teacher_topk.logprobs.0", [-0.1, -0.2]),
        "topk-null-row-one-side": ("teacher_topk.ids.1", None),
        "topk-temperature-zero": ("teacher_topk.temperature", 0),
        "topk-temperature-negative": ("teacher_topk.temperature", -1.0),
        "topk-temperature-string": ("teacher_topk.temperature", "1.0"),
        "topk-temperature-bool": ("teacher_topk.temperature", True),
        "topk-without-response-ids": ("response_ids", _DELETE),
    }
    cases += [(name, _set(TOPK, path, value), "teacher_topk" if "response" not in name else "response_ids")
              for name, (path, value) in topk_bad.items()]
    return cases


DATA_CASES = _data_cases()


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name, rec, field", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_bad_record_is_a_data_error_naming_file_line_and_field(tmp_path, tokenizer, name, rec, field):
    path = _write(tmp_path, [json.dumps(GOOD), json.dumps(rec)])  # the bad one on line 2
    with pytest.raises(DataError) as e:
        load_dataset([path], tokenizer, V)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg, msg
    assert field.split(".")[0] in msg or "prompt" in msg, msg


@pytest.mark.parametrize("raw, says", [
    ('{"prompt": "p", "teacher_text": "t"', "malformed JSON"),
    ('{"prompt": "p", "teacher_text": "t",}', "malformed JSON"),
    ("{'prompt': 'p', 'teacher_text': 't'}", "malformed JSON"),
    ('{prompt: "p"}', "malformed JSON"),
    ('[1, 2]', "not a JSON object"),
    ('"just text"', "not a JSON object"),
    ('null', "not a JSON object"),
    ('42', "not a JSON object"),
    ('{"prompt": "p", "teacher_text": "t"} {"prompt": "q"}', "malformed JSON"),
    ('{"prompt": "p\x01", "teacher_text": "t"}', "malformed JSON"),
    ('{"prompt": "p", "teacher_text": "t", "teacher_topk": {"ids": [[1]], "logprobs": [[NaN]]}, '
     '"response_ids": [1]}', "non-finite"),
    ('{"prompt": "p", "teacher_text": "t", "teacher_topk": {"ids": [[1]], "logprobs": [[-Infinity]]}, '
     '"response_ids": [1]}', "non-finite"),
    ('{"prompt": "p", "teacher_text": "t", "teacher_topk": {"ids": [[1]], "logprobs": [[-0.1]], '
     '"temperature": 1e400}, "response_ids": [1]}', "positive finite"),
    ('{"prompt": "p", "teacher_text": "t", "n": ' + "9" * 5000 + "}", "more digits"),
    ('\0'.join('{"prompt": "p", "teacher_text": "t"}'), "looks like UTF-16"),
], ids=["unclosed", "trailing-comma", "single-quotes", "bare-keys", "array", "string", "null", "number",
        "two-objects", "control-char", "nan-logprob", "infinite-logprob", "infinite-temperature", "5000-digit-int",
        "utf-16-without-bom"])
def test_a_bad_line_is_a_data_error_naming_file_and_line(tmp_path, tokenizer, raw, says):
    path = _write(tmp_path, [json.dumps(GOOD), raw])
    with pytest.raises(DataError, match=says) as e:
        load_dataset([path], tokenizer, V)
    assert f"file {path}, line 2)" in str(e.value)


@pytest.mark.parametrize("text", ["", "\n\n  \n", json.dumps({"__header__": {"k": 2}}) + "\n"],
                         ids=["empty", "blank-lines", "header-only"])
def test_a_file_without_records_is_a_data_error(tmp_path, tokenizer, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match="has no records"):
        load_dataset([path], tokenizer, V)


def test_a_byte_order_mark_is_not_data(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(load_dataset([path], tokenizer, V)) == 1


def test_k_and_capture_temperature_must_not_vary(tmp_path, tokenizer):
    other_k = _set(TOPK, "teacher_topk.ids", [[5, 6, 7], [2, 3, 4]])
    other_k["teacher_topk"]["logprobs"] = [[-0.1, -3.0, -4.0], [-0.2, -2.5, -4.0]]
    path = _write(tmp_path, [json.dumps(TOPK), json.dumps(other_k)])
    with pytest.raises(DataError, match=r"k=3 \(file .*line 2\) but k=2"):
        load_dataset([path], tokenizer, V)
    path = _write(tmp_path, [json.dumps(TOPK), json.dumps(_set(TOPK, "teacher_topk.temperature", 2.0))])
    with pytest.raises(DataError, match="capture temperature must not vary"):
        load_dataset([path], tokenizer, V)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["prompt", "teacher_text", "reference", "messages", "response_ids", "teacher_topk",
                              "teacher_topk.ids", "teacher_topk.logprobs", "teacher_topk.temperature"]),
       value=JSON_VALUES)
def test_any_json_in_any_field_loads_or_is_a_data_error(tmp_path, tokenizer, field, value):
    rec = _set(TOPK, field, value)
    path = _write(tmp_path, [json.dumps(rec)])
    try:
        load_dataset([path], tokenizer, V)
    except DataError as e:
        assert f"file {path}, line 1" in str(e) or "has no records" in str(e)


# ---- an endpoint's packed log-probs (kdtrain annotate; its file/line wrapping is tested in test_annotate.py) ----

PACKED_TEXT = "It is 4."
PACKED_CONTENT = [{"token": t, "bytes": list(t.encode()), "logprob": -0.1,
                   "top_logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": -0.1},
                                    {"token": "\u00e9", "bytes": [195, 169], "logprob": -3.0}]}
                  for t in ("It", " is", " 4", ".")]


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["k", "vocab", "token", "logprob", "top_token", "top_logprob", "vocab.0", "vocab.1"]),
       value=JSON_VALUES | st.text("0123456789abcdefABCDEF ", max_size=40))
def test_any_json_in_a_packed_field_aligns_or_is_an_align_error(tokenizer, field, value):
    """Any value in any field of the packed form (hex-looking text included): rows, or AlignError, which
    annotate names with file, line and position; never another exception."""
    from kdtrain import align

    rec = _set({"p": align.pack_api_logprobs(PACKED_CONTENT)}, "p." + field, value)["p"]
    ids = tokenizer.encode(PACKED_TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
    try:
        rows = align.align_api(align.parse_api_logprobs(rec), PACKED_TEXT, ids, align.vocab_bytes(tokenizer), 2)
    except align.AlignError as e:
        assert e.position is None or 0 <= e.position < 4
    else:
        assert len(rows.ids) == len(ids)


# ---- config ----

def _float_or_int_keys():
    out = []
    hints = typing.get_type_hints(Config)
    for section, cls in hints.items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            out.append((f"{section}.{f.name}", tp))
    return out


CONFIG_KEYS = _float_or_int_keys()
WRONG = {int: ["three", "1.5", "true", "[1]", "{a: 1}"], float: ["fast", "true", "[1.0]", "{a: 1}"],
         bool: ["yes please", "1", "[true]"], str: ["[a]", "{a: 1}", "1.5"], list: ["5", "{a: 1}", "text"]}


def _wrong_values():
    cases = []
    for key, tp in CONFIG_KEYS:
        base = typing.get_origin(tp) or tp
        if base is typing.Union or base.__class__.__name__ == "UnionType":
            base = [a for a in typing.get_args(tp) if a is not type(None)][0]
            base = typing.get_origin(base) or base
        for v in WRONG.get(base, []):
            if base is str and key.split(".")[0] in ("io", "init", "kd", "tracing") and v == "1.5":
                continue  # a path or name may read as a number; it stays text
            cases.append((key, v))
    return cases


CONFIG_CASES = _wrong_values()


@pytest.mark.parametrize("key, value", CONFIG_CASES, ids=[f"{k}={v}" for k, v in CONFIG_CASES])
def test_a_wrong_type_for_any_config_key_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [f"{key}={value}"])


@pytest.mark.parametrize("text", ["train: [1, 2]\n", "- a\n- b\n", "train: {steps: 3\n", "train:\n\tsteps: 3\n",
                                  "42\n", "train: {steps: 3}\ntrain: {steps: 4}\n", "&a [*a]\n",
                                  "train: {steps: " + "9" * 5000 + "}\n"],
                         ids=["section-list", "top-list", "unclosed", "tab-indent", "scalar", "duplicate-section",
                              "recursive-alias", "5000-digit-int"])
def test_a_malformed_config_file_is_a_config_error_naming_it(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    try:
        cfg, _ = load_config([path])
    except ConfigError as e:
        assert str(path) in str(e)
    else:  # YAML allows a repeated key (the last wins); nothing else may load
        assert text.startswith("train: {steps: 3}") and cfg.train.steps == 4


@pytest.mark.parametrize("override", ["init.std=-1", "init.std=2", "arch.norm_eps=0", "arch.norm_eps=-1e-5",
                                      "arch.rope_theta=0", "arch.rope_theta=-5", f"train.seed={2**63}",
                                      f"train.seed={-2**63 - 1}", "train.steps=" + "9" * 5000])
def test_a_value_that_would_fail_later_is_a_config_error_naming_the_key(override):
    """Each of these passed validation and then failed in training: a traceback from transformers
    (init.std), NaN losses blamed on the learning rate (norm_eps, rope_theta), an overflow at the
    first step (train.seed) or int()'s digit limit inside the YAML parser."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_a_config_file_that_is_not_text_is_a_config_error(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=str(path)):
        load_config([path])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path])  # a directory


# ---- command line ----

@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["train"], ["info"], ["export"], ["annotate"], ["train", "--bogus", "configs/toy.yaml"],
    ["info", "configs/toy.yaml", "--world-size", "two"], ["make-toy", "--samples", "many"],
    ["train", "nonexistent.yaml"], ["train", "configs/toy.yaml", "train.steps"], ["train", "configs/toy.yaml", "=5"],
    ["train", "configs/toy.yaml", "train.steps=[1"], ["train", "configs/toy.yaml", "train=5"],
    ["train", "configs/toy.yaml", "nosection.steps=5"], ["info", "train.steps=5"],
    ["info", "configs/toy.yaml", "--world-size", "-3"], ["make-toy", "--samples", "0", "--out-dir", "{tmp}"],
    ["make-toy", "--vocab", "100", "--out-dir", "{tmp}"], ["make-toy", "--steps", "0", "--out-dir", "{tmp}"],
    ["export", "{tmp}", "{tmp}/out"], ["export", "nonexistent", "{tmp}/out"],
    ["train", "configs/toy.yaml", "io.train_shards=[{tmp}/none.jsonl]", "io.output_dir={tmp}/run"],
    ["train", "configs/toy.yaml", "io.tokenizer_path={tmp}", "io.output_dir={tmp}/run"],
    ["train", "configs/toy.yaml", "--resume", "io.output_dir={tmp}/run"],
])
def test_a_bad_command_line_exits_2_with_a_message_and_no_traceback(tmp_path, capsys, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["annotate", "{data}", "{tmp}/o.jsonl", "--tokenizer", "{tok}", "--teacher", "{teacher}", "--device", "tpu"],
     "--device 'tpu'"),
    (["annotate", "{data}", "{tmp}/o.jsonl", "--tokenizer", "{tok}", "--teacher", "{teacher}", "--device", "cuda:99"],
     "--device cuda:99"),
    (["annotate", "{data}", "{tmp}/o.jsonl", "--tokenizer", "{tok}", "--teacher", "{teacher}", "--temperature", "nan"],
     "--temperature"),
    (["annotate", "{data}", "{tmp}/o.jsonl", "--tokenizer", "{tok}", "--teacher", "{tmp}"], "--teacher"),
    (["annotate", "{data}", "{tmp}/o.jsonl", "--tokenizer", "{tmp}", "--teacher", "{teacher}"], "--tokenizer"),
    (["serve-teacher", "{teacher}", "--tokenizer", "{tok}", "--device", "tpu", "--port", "0"], "--device 'tpu'"),
    (["serve-teacher", "{tmp}", "--tokenizer", "{tok}", "--port", "0"], "MODEL_DIR"),
    (["serve-teacher", "{teacher}", "--tokenizer", "{tok}", "--port", "70000"], "--port"),
    (["serve-teacher", "{teacher}", "--tokenizer", "{tok}", "--port", "{busy}"], "cannot listen on --host 127.0.0.1"),
    (["make-toy", "--out-dir", "{tmp}/file/toy"], "{tmp}/file is a file"),
    (["smoke", "--out-dir", "{tmp}/file"], "{tmp}/file is a file"),
    (["export", "{tmp}/run/checkpoints/step_00000001", "{tmp}/file/hf"], "{tmp}/file is a file"),
], ids=["annotate-device-tpu", "annotate-device-cuda99", "annotate-temperature-nan", "annotate-teacher-not-a-model",
        "annotate-tokenizer-empty", "serve-device-tpu", "serve-dir-not-a-model", "serve-port-70000", "serve-port-in-use",
        "make-toy-under-a-file", "smoke-into-a-file", "export-under-a-file"])
def test_a_bad_option_names_the_option(tmp_path, capsys, toy, run_two_steps, argv, says):
    """The option the user gave, not a config key they never wrote (kd.teacher_path), torch's
    traceback or the OS's bare "File exists"."""
    pytest.importorskip("uvicorn") if argv[0] == "serve-teacher" else None
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "run").symlink_to(run_two_steps)
    import socket

    busy = socket.create_server(("127.0.0.1", 0))  # a port in use
    paths = {"{data}": str(toy["dataset"]), "{tok}": str(toy["tokenizer"]), "{teacher}": str(toy["teacher"]),
             "{tmp}": str(tmp_path), "{busy}": str(busy.getsockname()[1])}
    argv = [paths.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    with busy:
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert says.replace("{tmp}", str(tmp_path)) in err and "kd.teacher_path" not in err and "io.tokenizer_path" not in err, err


@pytest.mark.parametrize("existing", [b"\x8f\xff garbage\n", b"[" * 100000 + b"]" * 100000 + b"\n",
                                      b'{"__header__": ' + b"9" * 5000 + b"}\n"],
                         ids=["not-utf-8", "deep-nesting", "5000-digit-int"])
def test_annotate_into_an_existing_file_that_is_not_its_output_names_it(tmp_path, capsys, toy, existing):
    out = tmp_path / "out.jsonl"
    out.write_bytes(existing)
    rc = main(["annotate", str(toy["dataset"]), str(out), "--tokenizer", str(toy["tokenizer"])])
    err = capsys.readouterr().err
    assert rc == 2 and f"{out} exists but has no annotate header line" in err, err
    assert out.read_bytes() == existing  # left as it was


# ---- checkpoints whose files were replaced and the manifest rewritten to match ----

@pytest.fixture(scope="module")
def run_two_steps(toy, tmp_path_factory):
    """A toy run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(toy["config"]), f"io.output_dir={run}", "train.steps=2", "train.checkpoint_every=1",
                 "train.device=cpu", "io.val_shards=[]", "tracing.console_log=false"]) == 0
    return run


def _tamper(ckpt, name: str) -> None:
    """Replace one file of ``ckpt`` and rewrite the manifest to match, as another tool could."""
    import torch
    from safetensors.torch import load_file, save_file

    from kdtrain.checkpoint import MANIFEST, file_entries

    if name == "meta-model-shape":
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps({**meta, "model_shape": 5}))
    elif name == "trainer-state-list":
        torch.save([1, 2, 3], ckpt / "trainer_state.pt")
    elif name == "trainer-state-types":
        torch.save({"step": "x", "data_position": 0, "rng_cpu": torch.get_rng_state()}, ckpt / "trainer_state.pt")
    elif name == "optimizer-empty":
        torch.save({}, ckpt / "optimizer.pt")
    elif name == "optimizer-types":
        torch.save({"state": 5, "param_groups": "x"}, ckpt / "optimizer.pt")
    else:
        state = load_file(ckpt / "model.safetensors")
        key = sorted(state)[0]
        if name == "weights-shape":
            state[key] = torch.zeros(3, 3)
        else:  # weights-missing
            del state[key]
        save_file(state, ckpt / "model.safetensors")
    files = [f for f in ckpt.iterdir() if f.name != MANIFEST]
    (ckpt / MANIFEST).write_text(json.dumps({"format": "kdtrain-checkpoint-v1", "files": file_entries(ckpt, files)}))


TAMPERED = ["meta-model-shape", "trainer-state-list", "trainer-state-types", "optimizer-empty", "optimizer-types",
            "weights-shape", "weights-missing"]


@pytest.mark.parametrize("name", TAMPERED)
def test_resuming_a_checkpoint_with_replaced_files_is_a_checkpoint_error(tmp_path, capsys, toy, run_two_steps, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_two_steps, run)
    for ckpt in (run / "checkpoints").iterdir():
        _tamper(ckpt, name)
    capsys.readouterr()
    rc = main(["train", str(toy["config"]), f"io.output_dir={run}", "train.steps=3", "train.device=cpu",
               "io.val_shards=[]", "tracing.console_log=false", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert str(run / "checkpoints" / "step_00000002") in err, err
    if name.startswith("weights"):  # export reads the same file
        assert main(["export", str(run / "checkpoints" / "step_00000002"), str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert "model.safetensors does not fit" in err, err


def test_resuming_with_another_arch_names_the_key_before_building_the_model(tmp_path, capsys, toy, run_two_steps):
    """init.weights (the toy's initial weights) do not fit arch.d_ff=128; the resume check comes first."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_two_steps, run)
    rc = main(["train", str(toy["config"]), f"io.output_dir={run}", "train.steps=3", "train.device=cpu",
               "io.val_shards=[]", "arch.d_ff=128", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "arch.d_ff changed (checkpoint 256, config 128)" in err, err


@pytest.mark.parametrize("override", ["arch.d_head=8", "arch.n_layers=3"], ids=["another-shape", "more-layers"])
def test_init_weights_that_do_not_fit_arch_are_a_config_error(tmp_path, capsys, toy, override):
    """A fresh run whose init.weights (the toy's initial weights) were made for another arch: a
    size mismatch (torch raises it) and missing layers both name init.weights and arch."""
    rc = main(["train", str(toy["config"]), f"io.output_dir={tmp_path / 'run'}", "train.steps=1", "train.device=cpu",
               "io.val_shards=[]", override])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "init.weights" in err and "does not fit the model built from arch" in err, err


def test_a_model_too_large_for_this_machine_is_refused_before_it_is_built(tmp_path, capsys, toy, monkeypatch):
    """On the CPU the kernel kills a process that outgrows memory without a word: a run that kdtrain
    info's estimate puts past the machine's memory (here about 3.6 TiB) is a config error naming the
    keys, raised before the model is built or the data read."""
    import kdtrain.trainer as trainer

    monkeypatch.setattr(trainer, "build_student", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("the data was read"))
    rc = main(["train", str(toy["config"]), f"io.output_dir={tmp_path / 'run'}", "train.device=cpu", "init.weights=null",
               "arch.d_model=16384", "arch.n_layers=64", "arch.d_ff=65536", "arch.n_heads=128", "arch.n_kv_heads=8",
               "arch.d_head=128"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "GiB of memory" in err and "arch.d_model" in err and "train.micro_batch_size" in err, err


@pytest.mark.parametrize("per_host", [1, 3])
def test_the_host_memory_check_refuses_just_past_the_estimate(per_host):
    """The boundary is kdtrain info's estimate for one rank times the processes on the machine."""
    from kdtrain.model import check_host_memory, memory_estimate

    cfg, _ = load_config([], ["train.micro_batch_size=64", "train.seq_lengths=[1024]"])
    need = int(memory_estimate(cfg, 4)["total"]) * per_host
    check_host_memory(cfg, 4, per_host, have=need + per_host)
    with pytest.raises(ConfigError, match="GiB of memory"):
        check_host_memory(cfg, 4, per_host, have=need - per_host)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_memory_limit_is_the_lowest_on_the_way_from_this_cgroup_to_the_root(tmp_path, version):
    from kdtrain.model import _cgroup_limits

    mount = tmp_path / "cgroup"
    if version == "v2":
        proc, base, name = "0::/slice/job\n", mount, "memory.max"
    else:
        proc, base, name = "5:cpu:/\n4:memory:/slice/job\n", mount / "memory", "memory.limit_in_bytes"
    (base / "slice" / "job").mkdir(parents=True)
    (base / name).write_text("max\n")  # the root: no limit
    (base / "slice" / name).write_text("8589934592\n")  # the parent's limit binds
    (base / "slice" / "job" / name).write_text("17179869184\n")
    (tmp_path / "cgroup.txt").write_text(proc)
    assert min(_cgroup_limits(str(tmp_path / "cgroup.txt"), str(mount))) == 8589934592
    assert _cgroup_limits(str(tmp_path / "missing"), str(mount)) == []


def test_running_out_of_memory_while_resuming_is_not_called_a_damaged_checkpoint(tmp_path, capsys, toy, run_two_steps,
                                                                                  monkeypatch):
    import shutil

    import kdtrain.trainer as trainer_mod

    def load(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(trainer_mod, "load_checkpoint", load)
    run = tmp_path / "run"
    shutil.copytree(run_two_steps, run)
    rc = main(["train", str(toy["config"]), f"io.output_dir={run}", "train.steps=3", "train.device=cpu",
               "io.val_shards=[]", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "out of memory" in err and "were changed" not in err and "Traceback" not in err, err


def _oom_cases():
    import torch

    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return [cuda_oom("CUDA out of memory. Tried to allocate 20.00 GiB"),
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 1099511627776 bytes."),
            MemoryError(), RuntimeError("mmap failed: Cannot allocate memory")]


@pytest.mark.parametrize("exc", _oom_cases(), ids=["cuda", "cpu-allocator", "python", "errno-12"])
def test_running_out_of_memory_mid_run_is_a_message_naming_the_keys(tmp_path, capsys, toy, monkeypatch, exc):
    from kdtrain.trainer import Trainer

    def fit(self, until=None):
        raise exc

    monkeypatch.setattr(Trainer, "fit", fit)
    rc = main(["train", str(toy["config"]), f"io.output_dir={tmp_path / 'run'}", "train.steps=1", "train.device=cpu",
               "io.val_shards=[]"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "out of memory" in err and "train.micro_batch_size" in err and "kdtrain info" in err, err


def test_another_runtime_error_is_not_taken_for_memory(tmp_path, toy, monkeypatch):
    """A bug must keep its traceback: only allocation failures become the memory message."""
    from kdtrain.trainer import Trainer

    def fit(self, until=None):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)")

    monkeypatch.setattr(Trainer, "fit", fit)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["train", str(toy["config"]), f"io.output_dir={tmp_path / 'run'}", "train.steps=1", "train.device=cpu",
              "io.val_shards=[]"])


# ---- the teacher server: bad requests get a 4xx with a JSON error, and it keeps serving ----

@pytest.fixture(scope="module")
def teacher_url(toy):
    pytest.importorskip("uvicorn")
    from loopback import serve

    from kdtrain.serve import load_app

    with serve(load_app(toy["teacher"], toy["tokenizer"], "cpu", model_name="toy")) as url:
        yield url


def _post(url: str, body: bytes):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body", [
    {"seed": 2**64}, {"seed": -2**63 - 1}, {"seed": 10**30}, b'{"model": "toy", "messages": [', b"[1, 2]",
    b'{"model": "toy", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",
], ids=["seed-2**64", "seed-below-int64", "seed-1e30", "unclosed-json", "array", "deep-nesting"])
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(teacher_url, body):
    """A seed torch cannot take failed the whole batch with a 500 (and a traceback in the log); a body
    that does not parse got FastAPI's ``detail`` instead of an OpenAI error. Field types and ranges
    are in test_serve.py."""
    good = {"model": "toy", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 2}
    raw = body if isinstance(body, bytes) else json.dumps({**good, **body}).encode()
    status, answer = _post(teacher_url, raw)
    assert 400 <= status < 500 and isinstance(answer.get("error", {}).get("message"), str), (status, answer)
    status, answer = _post(teacher_url, json.dumps(good).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
