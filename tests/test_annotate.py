"""`kdtrain annotate`: the stored rows are the teacher's (same tokenizer, another tokenizer, an
endpoint's log-probs), a killed run resumes exactly, a rerun of another command is refused, bad
log-probs name file, line and position, and rows that are null load and train as documented."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch

from kdtrain import align
from kdtrain.annotate import annotate
from kdtrain.data import DataError, collate, load_dataset


@pytest.fixture(scope="module")
def annotated(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "out.jsonl"
    report = annotate(toy["dataset"], out, toy["teacher"], toy["tokenizer"], k=8, batch_size=3)
    return out, report


@pytest.fixture(scope="module")
def cross(toy, toy_pair, tmp_path_factory):
    """The toy records annotated by the teacher with the byte-level BPE tokenizer."""
    out = tmp_path_factory.mktemp("cross") / "out.jsonl"
    report = annotate(toy["dataset"], out, toy_pair["teacher"], toy["tokenizer"], k=8, batch_size=4)
    return out, report


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def test_annotated_rows_are_the_teachers_top_k(toy, annotated, tokenizer):
    from kdtrain.teacher import load_teacher_model

    out, report = annotated
    teacher = load_teacher_model(toy["teacher"], "cpu")
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["__header__"]["k"] == 8
    rec = json.loads(lines[2])
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(rec["prompt"], add_special_tokens=False)
    ids = torch.tensor([prompt + rec["response_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), dim=-1)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(rec["response_ids"])].topk(8)
    assert rec["teacher_topk"]["ids"] == rows.indices.tolist()
    torch.testing.assert_close(torch.tensor(rec["teacher_topk"]["logprobs"]), rows.values, rtol=0, atol=1e-6)
    # The toy dataset was written by the same teacher: annotate reproduces its rows.
    toy_rec = json.loads(toy["dataset"].read_text().splitlines()[2])
    assert toy_rec["teacher_topk"]["ids"] == rec["teacher_topk"]["ids"]
    data = load_dataset([out], tokenizer, 32000)
    assert len(data) == 10 and data.k == 8
    # Same tokenizer on both sides: every position aligned, all of the teacher's mass on student ids.
    n = sum(len(r["response_ids"]) for r in _records(out))
    assert (report.written, report.positions, report.aligned) == (10, n, n)
    assert report.mapped_mass == pytest.approx(report.teacher_mass, rel=1e-5)


@pytest.mark.parametrize("kept", [0, 4, 9])
def test_resume_after_a_kill_has_no_duplicate_or_missing_record(toy, annotated, tmp_path, kept):
    full = annotated[0].read_bytes()
    lines = full.split(b"\n")
    torn = b"\n".join(lines[: 1 + kept]) + b"\n" + lines[1 + kept][:25]  # a kill mid-line
    out = tmp_path / "out.jsonl"
    out.write_bytes(torn)
    report = annotate(toy["dataset"], out, toy["teacher"], toy["tokenizer"], k=8, batch_size=3)
    assert report.written == 10 - kept
    assert out.read_bytes() == full


def _changed_input(toy, tmp_path):
    lines = toy["dataset"].read_text().splitlines()
    rec = json.loads(lines[5])
    rec["teacher_text"] = rec["teacher_text"].replace("is", "was", 1)
    path = tmp_path / "other.jsonl"
    path.write_text("\n".join(lines[:5] + [json.dumps(rec)] + lines[6:]) + "\n")
    return {"input_path": path}


def _changed_teacher(toy, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "teacher"  # the same folder name, other weights
    shutil.copytree(toy["teacher"], path)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"][0, 0] += 1.0
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return {"teacher_path": path}


@pytest.mark.parametrize("change, names", [
    (_changed_input, "input file"),
    (lambda toy, tmp: {"tokenizer_path": shutil.copytree(toy["tokenizer"], tmp / "tok", dirs_exist_ok=True)
                       and _edit_tokenizer(tmp / "tok")}, "student tokenizer"),
    (_changed_teacher, "teacher weights"),
    (lambda toy, tmp: {"k": 4}, r"--k \(8 there, 4 now\)"),
    (lambda toy, tmp: {"temperature": 2.0}, r"--temperature \(1.0 there, 2.0 now\)"),
    (lambda toy, tmp: {"max_len": 32}, r"--max-len \(4096 there, 32 now\)"),
])
def test_resume_into_output_of_another_command_is_refused(toy, annotated, tmp_path, change, names):
    out = tmp_path / "out.jsonl"
    out.write_bytes(annotated[0].read_bytes()[:-40])  # a torn run: resuming would append
    before = out.read_bytes()
    args = {"input_path": toy["dataset"], "teacher_path": toy["teacher"], "tokenizer_path": toy["tokenizer"], "k": 8,
            "batch_size": 3, **change(toy, tmp_path)}
    with pytest.raises(DataError, match=rf"{out} was written by another annotate command; it differs in .*{names}"):
        annotate(output_path=out, **args)
    assert out.read_bytes() == before  # nothing appended, nothing cut


def _edit_tokenizer(path):
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 123
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_the_teacher_is_identified_by_its_weights_not_its_folder(toy, annotated, tmp_path):
    moved = shutil.copytree(toy["teacher"], tmp_path / "renamed_teacher")
    out = tmp_path / "out.jsonl"
    full = annotated[0].read_bytes()
    out.write_bytes(full[: full.index(b"\n", full.index(b"\n") + 1) + 1])  # header + one record
    assert annotate(toy["dataset"], out, moved, toy["tokenizer"], k=8, batch_size=3).written == 9
    assert out.read_bytes() == full


# ---- a teacher with another tokenizer ----

def _pair_logprobs(toy_pair, rec: dict):
    """The pair teacher's tokens of prompt + response and its log-probs at the response positions."""
    from kdtrain.teacher import load_teacher_model
    from kdtrain.tokenizer import load_tokenizer

    tok = load_tokenizer(toy_pair["tokenizer"])
    model = load_teacher_model(toy_pair["teacher"], "cpu")
    prompt = [tok.bos_token_id] + tok.encode(rec["prompt"], add_special_tokens=False)
    resp = tok.encode(rec["teacher_text"], add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + resp + [tok.eos_token_id]])).logits[0].double()
    return tok, resp, torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) + len(resp)]


def test_cross_tokenizer_rows_by_hand(toy, toy_pair, cross, tokenizer):
    """"46 plus 40 equals 86.": the student splits numbers into "▁", digits; the byte-level teacher
    has "46" and "Ġplus": words and "." align, digits do not. At an aligned position the row is the
    teacher's distribution summed onto student pieces, written here from the token strings."""
    out, report = cross
    recs = _records(out)
    rec = next(r for r in recs if " plus " in r["teacher_text"])
    pieces = tokenizer.convert_ids_to_tokens(rec["response_ids"])
    aligned = [row is not None for row in rec["teacher_topk"]["ids"]]
    words = {"▁plus", "▁equals", "."}
    assert aligned == [p in words or p == "</s>" for p in pieces], pieces  # EOS after the whole text aligns too
    assert 0 < report.aligned < report.positions and report.mapped_mass < report.teacher_mass

    tok, resp, lp = _pair_logprobs(toy_pair, rec)
    t_pieces = tok.convert_ids_to_tokens(resp)
    j, i = pieces.index("▁plus"), t_pieces.index("Ġplus")
    vocab = tokenizer.get_vocab()
    mass = {}
    for t_id, t_piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if t_id == tok.eos_token_id:
            s_piece = "</s>"
        elif t_id in tok.all_special_ids or not all(32 < ord(c) < 127 or c == "Ġ" for c in t_piece):
            continue  # special, or bytes outside printable ASCII: none are student pieces here
        else:
            s_piece = t_piece.replace("Ġ", "▁")
        if s_piece in vocab:
            mass[vocab[s_piece]] = mass.get(vocab[s_piece], 0.0) + math.exp(lp[i, t_id])
    top = sorted(mass.items(), key=lambda kv: -kv[1])[:8]
    assert rec["teacher_topk"]["ids"][j] == [sid for sid, _ in top]
    assert rec["teacher_topk"]["logprobs"][j] == pytest.approx([math.log(p) for _, p in top], abs=1e-5)


def _api_record(toy_pair, rec: dict, K: int) -> dict:
    """``rec`` with the pair teacher's tokens and top-K as an OpenAI-compatible endpoint returns them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    tok, resp, lp = _pair_logprobs(toy_pair, rec)
    entry = lambda t_id, v: {"token": tok.decode([t_id]), "logprob": float(v),  # noqa: E731
                             "bytes": [byte_of[c] for c in tok.convert_ids_to_tokens(t_id)]}
    api = []
    for i, t_id in enumerate(resp):
        top = lp[i].topk(K)
        api.append({**entry(t_id, lp[i, t_id]), "top_logprobs": [entry(a, v) for a, v in
                                                                 zip(top.indices.tolist(), top.values.tolist())
                                                                 if a not in tok.all_special_ids]})
        api[-1]["top_logprobs"] = (api[-1]["top_logprobs"] + [entry(int(lp[i].topk(K + 3).indices[-1]), -30.0)])[:K]
    plain = {k: v for k, v in rec.items() if k not in ("response_ids", "teacher_topk")}
    return {**plain, "teacher_api_logprobs": api}


@pytest.fixture(scope="module")
def api_input(toy, toy_pair, tmp_path_factory):
    recs = [json.loads(line) for line in toy["dataset"].read_text().splitlines()[1:]]
    path = tmp_path_factory.mktemp("api") / "api.jsonl"
    path.write_text("".join(json.dumps(_api_record(toy_pair, r, 4)) + "\n" for r in recs))
    return path


def test_endpoint_logprobs_agree_with_the_local_teacher(toy, api_input, cross, tokenizer, tmp_path):
    """Same teacher, two routes: the endpoint's top-4 and the local full distribution align the same
    positions (but EOS, which an endpoint does not list), and each mapped endpoint alternative is in
    the local row with its probability."""
    out = tmp_path / "api_out.jsonl"
    report = annotate(api_input, out, tokenizer_path=toy["tokenizer"])
    local = _records(cross[0])
    api = _records(out)
    assert json.loads(out.read_text().splitlines()[0])["__header__"]["source"] == "teacher_api_logprobs"
    for a, b in zip(api, local):
        assert a["response_ids"] == b["response_ids"]
        assert [r is not None for r in a["teacher_topk"]["ids"][:-1]] == \
            [r is not None for r in b["teacher_topk"]["ids"][:-1]]
        assert a["teacher_topk"]["ids"][-1] is None and b["teacher_topk"]["ids"][-1] is not None
        for ids_a, lps_a, ids_b, lps_b in zip(a["teacher_topk"]["ids"], a["teacher_topk"]["logprobs"],
                                              b["teacher_topk"]["ids"], b["teacher_topk"]["logprobs"]):
            if ids_a is None:
                continue
            assert len(ids_a) == 4
            local_row = dict(zip(ids_b, lps_b))
            for sid, v in zip(ids_a, lps_a):
                if sid in local_row:
                    assert local_row[sid] == pytest.approx(v, abs=1e-4)
                else:  # a fill (the highest ids, equal shares) or the -30 alternative of _api_record
                    assert (sid >= 32000 - 4 and v == lps_a[-1]) or v == -30.0, (sid, v)
    assert report.aligned == sum(r is not None for rec in api for r in rec["teacher_topk"]["ids"])
    assert 0 < report.mapped_mass < report.teacher_mass
    data = load_dataset([out], tokenizer, 32000)
    assert data.k == 4


def _mutate(records: list[dict], what: str) -> list[dict]:
    api = records[0]["teacher_api_logprobs"]
    if what == "spelling":
        api[2]["bytes"] = [ord("X")] + api[2]["bytes"][1:]
    elif what == "missing bytes":
        del api[3]["bytes"]
    elif what == "K varies":
        api[2]["top_logprobs"].pop()
    elif what == "K varies across records":
        for entry in records[1]["teacher_api_logprobs"]:
            entry["top_logprobs"].pop()
    elif what == "positive":
        api[1]["top_logprobs"][0]["logprob"] = 0.5
    return records


@pytest.mark.parametrize("what, line, expect", [
    ("spelling", 1, r"do not spell the response text: token 2 .* line 1, teacher_api_logprobs position 2\)"),
    ("missing bytes", 1, r"token 3 has no 'bytes' .* line 1, teacher_api_logprobs position 3\)"),
    ("K varies", 1, r"token 2 has 3 top_logprobs but token 0 has 4: K must not vary .* line 1, "
                    r"teacher_api_logprobs position 2\)"),
    ("K varies across records", 2, r"has 3 top_logprobs per token \(file .*api.jsonl, line 2\) but 4 at line 1"),
    ("positive", 1, r"token 1 has positive 'top_logprobs\[\].logprob' 0.5.* line 1, teacher_api_logprobs position 1\)"),
])
def test_bad_endpoint_logprobs_name_file_line_and_position(toy, api_input, tmp_path, what, line, expect):
    records = _mutate([json.loads(x) for x in api_input.read_text().splitlines()], what)
    bad = tmp_path / "api.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=expect):
        annotate(bad, tmp_path / "out.jsonl", tokenizer_path=toy["tokenizer"])


@pytest.fixture(scope="module")
def api_packed(api_input, tmp_path_factory):
    """The records of ``api_input`` with their log-probs packed, as gen-data writes them."""
    path = tmp_path_factory.mktemp("packed") / "api.jsonl"
    recs = [json.loads(line) for line in api_input.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "teacher_api_logprobs": align.pack_api_logprobs(r["teacher_api_logprobs"])})
                            + "\n" for r in recs))
    return path


def test_packed_and_endpoint_forms_give_the_same_rows(toy, api_input, api_packed, tmp_path):
    rows, reports = [], []
    for name, path in (("list", api_input), ("packed", api_packed)):
        out = tmp_path / f"{name}.jsonl"
        reports.append(annotate(path, out, tokenizer_path=toy["tokenizer"]))
        rows.append([(r["response_ids"], r["teacher_topk"]) for r in _records(out)])
    assert len(rows[0]) == 10 and rows[0] == rows[1]
    assert reports[0] == reports[1] and reports[0].aligned > 0
    assert api_packed.stat().st_size < api_input.stat().st_size / 2


@pytest.mark.parametrize("metadata, by_json", [
    ('{"x": 1.5, "n": 18446744073709551615, "s": "\\u2028\u00e9"}', False),  # orjson reads and writes these
    ('{"x": NaN, "big": 100000000000000000000000000000, "s": "\\u2028\u00e9"}', True),
    ('{"big": 100000000000000000000000000000}', True),  # orjson would read it as the float 1e+30
    ('{"s": "\\ud800"}', True),  # a lone surrogate
])
def test_an_output_line_keeps_the_record_and_the_rows_exactly(tmp_path, metadata, by_json):
    """A record read from KD JSONL and written back by annotate with its rows: json reads the line
    to the same values as the input, whichever decoder read it (orjson, or json for what orjson
    refuses or would change), bit for bit in the rows; a record's old teacher_topk is replaced."""
    from kdtrain.annotate import _line
    from kdtrain.data import JsonRecord, iter_jsonl

    text = '{"prompt": "p", "teacher_topk": {"stale": 1}, "metadata": ' + metadata + ', "teacher_text": "t"}'
    (tmp_path / "in.jsonl").write_text(text + "\n")
    [(_, rec)] = list(iter_jsonl(tmp_path / "in.jsonl"))
    assert isinstance(rec, JsonRecord) == by_json
    lps = [[-0.1, math.log(1 / 3)], None, [-1e-300, -123456.789]]
    line = _line(rec, [5, 6, 7], [[1, 2], None, np.array([3, 4])], [lps[0], None, np.array(lps[2])], 0.7)
    assert line.endswith("}\n") and line.count("\n") == 1
    got, want = json.loads(line), json.loads(text)
    assert set(got) == {"prompt", "metadata", "teacher_text", "response_ids", "teacher_topk"}
    assert repr(got["metadata"]) == repr(want["metadata"])  # NaN included
    assert got["response_ids"] == [5, 6, 7]
    assert got["teacher_topk"] == {"ids": [[1, 2], None, [3, 4]], "logprobs": lps, "temperature": 0.7}
    assert [struct.pack("<d", v) for v in got["teacher_topk"]["logprobs"][2]] == [struct.pack("<d", v) for v in lps[2]]


def test_resume_counts_lines_that_hold_raw_line_separators(tmp_path):
    """orjson writes U+2028, U+2029 and U+0085 raw; a resume counts records by newline alone."""
    from kdtrain.annotate import _completed, _line

    header = {"format": "kd-jsonl-v1", "k": 2}
    out = tmp_path / "out.jsonl"
    assert _completed(out, header) == 0
    text = "a\u2028b\u2029c\x85d\re"
    lines = [_line({"prompt": "p", "teacher_text": text}, [1], [[1, 2]], [[-0.5, -1.0]], 1.0) for _ in range(2)]
    assert "\u2028" in lines[0] and "\x85" in lines[0]  # raw, as orjson writes them
    with open(out, "a", encoding="utf-8") as f:
        f.write("".join(lines) + lines[0][:20])  # two records and a torn third
    assert _completed(out, header) == 2
    assert out.read_text(encoding="utf-8").split("\n")[1:] == [lines[0][:-1], lines[1][:-1], ""]


def test_a_record_nested_deeper_than_orjson_writes_is_written_by_json(tmp_path):
    """orjson reads nesting it cannot write (about 255 levels and more): json writes that line."""
    from kdtrain.annotate import _line
    from kdtrain.data import JsonRecord, iter_jsonl

    text = '{"prompt": "p", "teacher_text": "t", "metadata": ' + "[" * 300 + "1" + "]" * 300 + "}"
    (tmp_path / "in.jsonl").write_text(text + "\n")
    [(_, rec)] = list(iter_jsonl(tmp_path / "in.jsonl"))
    assert not isinstance(rec, JsonRecord)  # orjson read it
    got = json.loads(_line(rec, [1], [[1, 2]], [[-0.5, -1.0]], 1.0))
    assert got["metadata"] == json.loads(text)["metadata"] and got["teacher_topk"]["ids"] == [[1, 2]]


def test_a_teacher_with_non_finite_log_probs_is_named_not_written(toy, toy_pair, tmp_path):
    """A teacher whose logits overflow (here: a NaN output weight) gives a clear error naming the
    file and line, and no output, where orjson would have written its NaN log-probs as null."""
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(toy_pair["teacher"], teacher)
    [weights] = teacher.glob("*.safetensors")
    state = load_file(weights)
    name = next((n for n in state if "lm_head" in n), None) or next(n for n in state if "embed_tokens" in n)  # tied
    state[name][5] = math.nan
    save_file(state, weights)
    out = tmp_path / "out.jsonl"
    expect = r"log-probabilities at response position \d+ are not finite \(file .*line 2\)"  # line 1: the header
    with pytest.raises(DataError, match=expect):
        annotate(toy["dataset"], out, teacher, toy["tokenizer"], k=4)
    assert not out.exists()


def _mutate_packed(records: list[dict], what: str) -> list[dict]:
    packed = records[0]["teacher_api_logprobs"]
    if what == "positive":
        column = bytearray(bytes.fromhex(packed["top_logprob"]))
        column[4 * 8: 5 * 8] = struct.pack("<d", 0.5)  # token 1's first alternative (K = 4)
        packed["top_logprob"] = column.hex()
    elif what == "not hex":
        packed["token"] = packed["token"].upper() + "g"
    elif what == "K varies across records":
        second = {**records[1], "teacher_api_logprobs": align.unpack_api_logprobs(records[1]["teacher_api_logprobs"])}
        _mutate([records[0], second], what)
        records[1]["teacher_api_logprobs"] = align.pack_api_logprobs(second["teacher_api_logprobs"])
    return records


@pytest.mark.parametrize("what, expect", [
    ("positive", r"token 1 has positive 'top_logprobs\[\].logprob' 0.5.* line 1, teacher_api_logprobs position 1\)"),
    ("not hex", r"packed field 'token' must be a string of hex digits \(file .*api.jsonl, line 1\)"),
    ("K varies across records", r"has 3 top_logprobs per token \(file .*api.jsonl, line 2\) but 4 at line 1"),
])
def test_bad_packed_logprobs_name_file_line_and_position(toy, api_packed, tmp_path, what, expect):
    records = _mutate_packed([json.loads(x) for x in api_packed.read_text().splitlines()], what)
    bad = tmp_path / "api.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=expect):
        annotate(bad, tmp_path / "out.jsonl", tokenizer_path=toy["tokenizer"])


# ---- null rows: loaded, collated, masked out of kl_div only ----

def _null_rows_load_and_collate(out, tokenizer):
    from kdtrain.model import step_counts

    recs = _records(out)
    data = load_dataset([out], tokenizer, 32000)
    batch = collate(data.samples[:4], 64, tokenizer.pad_token_id, data.k, False)
    for i, rec in enumerate(recs[:4]):
        start = len(data.samples[i].prompt_ids) - 1
        mask = batch["topk_mask"][i, start: start + len(rec["response_ids"])]
        assert mask.tolist() == [r is not None for r in rec["teacher_topk"]["ids"]]
        first = next(j for j, r in enumerate(rec["teacher_topk"]["ids"]) if r is not None)
        assert batch["topk_ids"][i, start + first].tolist() == rec["teacher_topk"]["ids"][first]
    counts = step_counts([batch])
    n_rows = sum(r is not None for rec in recs[:4] for r in rec["teacher_topk"]["ids"])
    assert counts["n_kl"] == n_rows < counts["n_ce_teacher"]  # every response token stays in ce_teacher


@pytest.mark.smoke
def test_null_rows_load_and_collate_without_a_teacher_row(toy, tokenizer, tmp_path):
    """The toy records with every third row null (as a cross-tokenizer annotation leaves them)."""
    lines = toy["dataset"].read_text().splitlines()
    out = tmp_path / "nulls.jsonl"
    recs = [json.loads(line) for line in lines[1:]]
    for rec in recs:
        top = rec["teacher_topk"]
        for j in range(1, len(top["ids"]), 3):
            top["ids"][j] = top["logprobs"][j] = None
    out.write_text("\n".join([lines[0], *map(json.dumps, recs)]) + "\n")
    _null_rows_load_and_collate(out, tokenizer)


def test_null_rows_of_a_cross_tokenizer_annotation(cross, tokenizer):
    _null_rows_load_and_collate(cross[0], tokenizer)


@pytest.mark.parametrize("ids_row, lps_row, expect", [
    (None, [-0.1], r"teacher_topk row 1 is null in 'ids' only"),
    ([5], None, r"teacher_topk row 1 is null in 'logprobs' only"),
])
def test_a_row_null_on_one_side_only_is_an_error(tokenizer, tmp_path, ids_row, lps_row, expect):
    rec = {"prompt": "p", "teacher_text": "a b", "response_ids": [7, 8, 2],
           "teacher_topk": {"ids": [[4], ids_row, None], "logprobs": [[-0.5], lps_row, None]}}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=expect + rf" \(file {path}, line 1\)"):
        load_dataset([path], tokenizer, 32000)
    rec["teacher_topk"] = {"ids": [None, None, None], "logprobs": [None, None, None]}
    path.write_text(json.dumps(rec) + "\n")
    data = load_dataset([path], tokenizer, 32000)
    assert data.k == 0 and data.samples[0].topk_ids is None  # no row anywhere: no teacher signal


@pytest.mark.slow
def test_aligned_signal_brings_the_student_closer_to_the_teacher(cross, make_cfg, tokenizer):
    """Cross-tokenizer toy: with the same steps and seed, training with the aligned top-k rows ends at a
    lower KL to the teacher (at aligned positions of the annotated records, which are also the toy's
    validation set) than CE-only training: 3.22 vs 3.75 after 30 steps."""
    from kdtrain.losses import SparseTeacher, kl_div
    from kdtrain.trainer import Trainer

    out, _ = cross
    data = load_dataset([out], tokenizer, 32000)
    batch = collate(data.samples, 64, tokenizer.pad_token_id, data.k, False)
    mask = batch["topk_mask"] & (batch["labels"] != -100)

    def kl_after(kl_weight: float) -> float:
        cfg = make_cfg(f"io.train_shards=[{out}]", "io.val_shards=[]", "train.steps=30",
                       f"distillation.kl_weight={kl_weight}", "distillation.ce_ground_truth_weight=0",
                       f"io.output_dir={out.parent / f'run_{kl_weight}'}")
        trainer = Trainer(cfg, log=False)
        trainer.fit()
        with torch.no_grad():
            logits = trainer.student(input_ids=batch["input_ids"]).logits
        return float(kl_div(logits, SparseTeacher(batch["topk_ids"], batch["topk_logprobs"]), mask))

    with_kl, ce_only = kl_after(1.0), kl_after(0.0)
    assert with_kl < 0.92 * ce_only, (with_kl, ce_only)  # 3.22 vs 3.75 measured


def test_cli_bad_endpoint_logprobs_exit_2_with_the_message(toy, api_input, tmp_path, capsys):
    from kdtrain.cli import main

    records = _mutate([json.loads(x) for x in api_input.read_text().splitlines()], "positive")
    bad = tmp_path / "api.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["annotate", str(bad), str(tmp_path / "out.jsonl"), "--tokenizer", str(toy["tokenizer"])]) == 2
    assert "line 1, teacher_api_logprobs position 1" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written
