"""The data stage (``kdtrain/data.py``): KD JSONL v1 parsing and validation, tokenization, label
shifting, truncation, padding, the sampler and the dataset fingerprint.

Expected rows are built by hand from the tokenizer's own ``encode``, never through ``data.py``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdtrain.data import IGNORE, DataError, Sample, Sampler, collate, load_dataset

V = 32000
BOS, EOS, PAD = 1, 2, 0
HEADER = {"__header__": {"format": "kd-jsonl-v1", "tokenizer": "toy", "k": 2}}


def write_jsonl(path: Path, lines) -> Path:
    """Lines may be dicts (dumped as JSON) or raw strings (written verbatim)."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def topk_for(response_ids: list[int], k: int = 2, temperature: float = 1.0) -> dict:
    """Top-k rows whose first id is the true token and whose log-probs encode the row index,
    so a row that lands at the wrong position is visible."""
    ids = [[t] + [(t + 1 + i) % V for i in range(k - 1)] for t in response_ids]
    lps = [[-(0.1 + 0.01 * j)] + [-3.0 - i for i in range(k - 1)] for j in range(len(response_ids))]
    return {"ids": ids, "logprobs": lps, "temperature": temperature}


def expected_row(prompt: list[int], response: list[int], S: int):
    """input_ids and shifted labels of one padded row, written out position by position."""
    seq = prompt + response
    ids = seq + [PAD] * (S - len(seq))
    labels = []
    for t in range(S):
        is_response_next = len(prompt) - 1 <= t < len(seq) - 1
        labels.append(seq[t + 1] if is_response_next else IGNORE)
    return ids, labels


# --------------------------------------------------------------------------------------------
# Loading KD JSONL v1


@pytest.mark.smoke
def test_toy_dataset_rows_match_the_records(toy, dataset, tokenizer):
    """The shipped toy dataset: prompt masked, response_ids as labels, top-k rows at the label
    positions, mask True exactly there."""
    records = [json.loads(line) for line in toy["dataset"].read_text().splitlines()[1:]]
    assert (len(dataset), dataset.k, dataset.n_topk, dataset.n_reference, dataset.topk_temperature) == (
        10, 8, 10, 10, 1.0)
    rec, rec2 = records[0], records[1]
    b = collate(dataset.samples[:2], 64, tokenizer.pad_token_id, dataset.k, with_reference=False)
    p = [BOS] + enc(tokenizer, rec["prompt"])
    p2 = [BOS] + enc(tokenizer, rec2["prompt"])
    S = max(len(p) + len(rec["response_ids"]), len(p2) + len(rec2["response_ids"]))
    ids, labels = expected_row(p, rec["response_ids"], S)
    assert b["input_ids"].shape == (2, S)
    assert b["input_ids"][0].tolist() == ids
    assert b["labels"][0].tolist() == labels
    assert b["topk_ids"].shape == (2, S, 8)
    pos = [len(p) - 1 + j for j in range(len(rec["response_ids"]))]
    assert b["topk_mask"][0].nonzero().flatten().tolist() == pos
    assert b["topk_ids"][0, pos].tolist() == rec["teacher_topk"]["ids"]
    assert torch.allclose(b["topk_logprobs"][0, pos], torch.tensor(rec["teacher_topk"]["logprobs"]))


@pytest.mark.smoke
def test_load_v1_with_header_blank_lines_topk_messages_and_reference(tmp_path, tokenizer):
    a_resp = enc(tokenizer, "2 plus 3 equals 5.") + [EOS]
    lines = [
        HEADER,
        "",
        {"id": "a", "prompt": "What is 2 + 3?", "teacher_text": "2 plus 3 equals 5.", "response_ids": a_resp,
         "teacher_topk": topk_for(a_resp), "reference": "5", "metadata": {"src": "x"}},
        "   ",
        {"prompt": "Name the capital of France, please, in one word.", "teacher_text": "Paris."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opposite of hot?"}],
         "teacher_text": "Cold.", "reference": "cold"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    ds = load_dataset([path], tokenizer, V)
    assert (len(ds), ds.k, ds.n_topk, ds.n_reference, ds.topk_temperature) == (3, 2, 1, 2, 1.0)

    prompts = [
        [BOS] + enc(tokenizer, "What is 2 + 3?"),
        [BOS] + enc(tokenizer, "Name the capital of France, please, in one word."),
        # no chat template on the toy tokenizer: "role: content" lines
        [BOS] + enc(tokenizer, "system: Be brief.\nuser: Opposite of hot?"),
    ]
    responses = [a_resp, enc(tokenizer, "Paris.") + [EOS], enc(tokenizer, "Cold.") + [EOS]]
    assert tokenizer.chat_template is None
    assert [s.prompt_ids for s in ds.samples] == prompts
    assert [s.response_ids for s in ds.samples] == responses

    b = collate(ds.samples, 64, tokenizer.pad_token_id, ds.k, with_reference=True)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    S = max(lengths)
    assert S < 64 and len(set(lengths)) == 3  # padded to the longest row, not to seq_len
    assert b["input_ids"].shape == b["labels"].shape == b["topk_mask"].shape == (3, S)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids, labels = expected_row(p, r, S)
        assert b["input_ids"][i].tolist() == ids, i
        assert b["labels"][i].tolist() == labels, i
        # shift: every learnt label is the next input token; padding is pad id with label -100
        for t in range(S - 1):
            if labels[t] != IGNORE:
                assert b["input_ids"][i, t + 1] == labels[t]
        assert (b["input_ids"][i, lengths[i]:] == PAD).all()
        assert (b["labels"][i, lengths[i] - 1:] == IGNORE).all()
        assert (b["labels"][i, : len(p) - 1] == IGNORE).all()  # BOS + prompt masked

    # top-k: row j at position len(prompt) - 1 + j, i.e. where label j is; False elsewhere
    P = len(prompts[0])
    pos = list(range(P - 1, P - 1 + len(a_resp)))
    tk = topk_for(a_resp)
    assert b["topk_mask"][0].nonzero().flatten().tolist() == pos
    assert not b["topk_mask"][1:].any()
    assert b["topk_ids"][0, pos].tolist() == tk["ids"]
    assert torch.equal(b["topk_ids"][0, pos, 0], b["labels"][0, pos])
    assert torch.allclose(b["topk_logprobs"][0, pos], torch.tensor(tk["logprobs"]))
    assert b["topk_logprobs"].dtype == torch.float32 and b["topk_ids"].dtype == torch.long

    # reference rows: prompt -> reference + EOS, for the records that have one, in order
    refs = [(prompts[0], enc(tokenizer, "5") + [EOS]), (prompts[2], enc(tokenizer, "cold") + [EOS])]
    RS = max(len(p) + len(r) for p, r in refs)
    assert b["ref_input_ids"].shape == b["ref_labels"].shape == (2, RS)
    for i, (p, r) in enumerate(refs):
        ids, labels = expected_row(p, r, RS)
        assert b["ref_input_ids"][i].tolist() == ids
        assert b["ref_labels"][i].tolist() == labels

    plain = collate(ds.samples, 64, tokenizer.pad_token_id, ds.k, with_reference=False)
    assert "ref_input_ids" not in plain and "ref_labels" not in plain


def test_response_ids_take_precedence_over_teacher_text(tmp_path, tokenizer):
    """The top-k rows align to the record's response_ids, so those are the labels (verbatim)."""
    resp = enc(tokenizer, "Five, I think.") + [EOS]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2 + 3?", "teacher_text": "5",
                                                "response_ids": resp, "teacher_topk": topk_for(resp, k=3)}])
    ds = load_dataset([path], tokenizer, V)
    assert ds.samples[0].response_ids == resp
    assert ds.k == 3


def test_old_pipeline_records_load_unchanged(tmp_path, tokenizer):
    lines = [{"prompt": "What is the capital of Peru?", "teacher_text": "The capital of Peru is Lima.",
              "metadata": {"teacher": "big-model", "temperature": 0.7}, "teacher_logits": None},
             {"prompt": "Opposite of up?", "teacher_text": "Down.", "metadata": {}, "teacher_logits": None}]
    ds = load_dataset([write_jsonl(tmp_path / "old.jsonl", lines)], tokenizer, V)
    assert (len(ds), ds.k, ds.n_topk, ds.n_reference, ds.topk_temperature) == (2, 0, 0, 0, None)
    for s, rec in zip(ds.samples, lines):
        assert s.prompt_ids == [BOS] + enc(tokenizer, rec["prompt"])
        assert s.response_ids == enc(tokenizer, rec["teacher_text"]) + [EOS]
        assert s.topk_ids is None and s.reference_ids is None
    b = collate(ds.samples, 64, tokenizer.pad_token_id, ds.k, with_reference=True)
    assert set(b) == {"input_ids", "labels"}
    S = b["input_ids"].shape[1]
    ids, labels = expected_row(ds.samples[0].prompt_ids, ds.samples[0].response_ids, S)
    assert (b["input_ids"][0].tolist(), b["labels"][0].tolist()) == (ids, labels)


def test_header_is_skipped_in_every_shard_and_shards_concatenate(tmp_path, tokenizer):
    one = write_jsonl(tmp_path / "1.jsonl", [HEADER, {"prompt": "a", "teacher_text": "b"}])
    two = write_jsonl(tmp_path / "2.jsonl", [HEADER, {"prompt": "c", "teacher_text": "d"},
                                             {"prompt": "e", "teacher_text": "f"}])
    ds = load_dataset([one, two], tokenizer, V)
    assert [s.prompt_ids[1:] for s in ds.samples] == [enc(tokenizer, t) for t in "ace"]


def test_json_line_separators_inside_strings_and_crlf(tmp_path, tokenizer):
    """U+2028 / U+2029 / U+0085 are legal raw inside JSON strings (ensure_ascii=False writers);
    only "\\n" ends a record. CRLF line ends load too. (Regression: str.splitlines() split them.)"""
    prompt, text = "first\u2028second\u2029third", "one\x85two"
    body = json.dumps({"prompt": prompt, "teacher_text": text}, ensure_ascii=False)
    path = tmp_path / "u.jsonl"
    path.write_bytes((json.dumps(HEADER) + "\r\n" + body + "\r\n\r\n" + '{"prompt": "x"}\r\n').encode("utf-8"))
    with pytest.raises(DataError, match=r"'teacher_text'.*line 4\)"):  # line numbers stay right
        load_dataset([path], tokenizer, V)
    path.write_bytes((body + "\r\n").encode("utf-8"))
    (s,) = load_dataset([path], tokenizer, V).samples
    assert s.prompt_ids == [BOS] + enc(tokenizer, prompt)
    assert s.response_ids == enc(tokenizer, text) + [EOS]


def test_mixed_batch_rows_without_topk_have_a_false_mask(tokenizer):
    tk = topk_for([20, 21, EOS])
    with_tk = Sample([BOS, 10, 11], [20, 21, EOS], tk["ids"], tk["logprobs"])
    without = Sample([BOS, 12], [22, EOS])
    b = collate([without, with_tk], 32, PAD, 2, with_reference=False)
    assert b["topk_mask"].tolist() == [[False] * 6, [False, False, True, True, True, False]]
    assert b["topk_ids"][0].eq(0).all() and b["topk_logprobs"][0].eq(0).all()


# --------------------------------------------------------------------------------------------
# Truncation: the prompt keeps BOS and its last tokens (at least L // 2 of it, or all of it when
# shorter); the response is then cut at the end, with its top-k rows; a cut response loses EOS.

PROMPT10 = [BOS] + list(range(101, 110))  # BOS + p1..p9
RESP6 = [201, 202, 203, 204, 205, EOS]


@pytest.mark.parametrize("L, kept_prompt, kept_resp", [
    (20, PROMPT10, RESP6),                               # fits
    (16, PROMPT10, RESP6),                               # fits exactly
    (15, [BOS, *range(102, 110)], RESP6),                # prompt gives up one token, EOS kept
    (12, [BOS, 105, 106, 107, 108, 109], RESP6),         # L // 2 == L - R == 6
    (11, [BOS, 106, 107, 108, 109], RESP6),              # prompt at its floor L // 2 = 5
    (10, [BOS, 106, 107, 108, 109], [201, 202, 203, 204, 205]),  # floor 5; response cut, EOS lost
    (7, [BOS, 108, 109], [201, 202, 203, 204]),          # floor 3
    (2, [BOS], [201]),                                   # floor 1: BOS alone
])
def test_truncation_policy(L, kept_prompt, kept_resp):
    tk = topk_for(RESP6, k=3)
    s = Sample(PROMPT10, RESP6, tk["ids"], tk["logprobs"], reference_ids=None)
    b = collate([s], L, PAD, 3, with_reference=False)
    seq = kept_prompt + kept_resp
    assert len(seq) == min(L, 16)
    assert b["input_ids"][0].tolist() == seq
    assert b["labels"][0].tolist() == [IGNORE] * (len(kept_prompt) - 1) + kept_resp + [IGNORE]
    pos = list(range(len(kept_prompt) - 1, len(seq) - 1))
    assert b["topk_mask"][0].nonzero().flatten().tolist() == pos
    assert b["topk_ids"][0, pos].tolist() == tk["ids"][: len(kept_resp)]


@pytest.mark.smoke
def test_truncated_response_keeps_the_topk_rows_of_its_first_tokens():
    """A response cut at the end keeps rows 0..n-1. Each row of ``topk_for`` lists its own token
    first and encodes its index in its log-prob, so a row from the wrong end shows twice."""
    tk = topk_for(RESP6, k=3)
    b = collate([Sample(PROMPT10, RESP6, tk["ids"], tk["logprobs"])], 10, PAD, 3, with_reference=False)
    pos = b["topk_mask"][0].nonzero().flatten().tolist()
    assert len(pos) == 5  # L = 10: the prompt at its floor of 5, the response cut from 6 to 5 tokens
    assert b["topk_ids"][0, pos, 0].tolist() == b["labels"][0, pos].tolist() == RESP6[:5]
    assert b["topk_logprobs"][0, pos, 0].tolist() == pytest.approx([-(0.1 + 0.01 * j) for j in range(5)])


def test_truncation_keeps_a_short_prompt_whole():
    s = Sample([BOS, 101, 102], RESP6)
    b = collate([s], 6, PAD, 0, with_reference=False)
    assert b["input_ids"][0].tolist() == [BOS, 101, 102, 201, 202, 203]
    assert b["labels"][0].tolist() == [IGNORE, IGNORE, 201, 202, 203, IGNORE]


def test_reference_rows_truncate_by_the_same_policy():
    s = Sample(PROMPT10, RESP6, reference_ids=[301, 302, 303, 304, EOS])
    b = collate([s], 8, PAD, 0, with_reference=True)
    # floor L // 2 = 4 -> BOS + p7..p9, then 4 reference tokens (EOS lost)
    assert b["ref_input_ids"][0].tolist() == [BOS, 107, 108, 109, 301, 302, 303, 304]
    assert b["ref_labels"][0].tolist() == [IGNORE] * 3 + [301, 302, 303, 304, IGNORE]
    assert b["input_ids"][0].tolist() == [BOS, 107, 108, 109, 201, 202, 203, 204]


def test_truncation_of_a_real_record(tmp_path, tokenizer):
    prompt = "Please answer carefully and show no working at all: what is the capital city of Norway?"
    text = "The capital city of Norway is Oslo, which lies at the head of the Oslofjord."
    ds = load_dataset([write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "teacher_text": text}])], tokenizer, V)
    p, r = [BOS] + enc(tokenizer, prompt), enc(tokenizer, text) + [EOS]
    L = 16
    assert len(p) > L // 2 and len(r) > L // 2  # both sides get cut
    b = collate(ds.samples, L, tokenizer.pad_token_id, 0, with_reference=False)
    assert b["input_ids"][0].tolist() == [BOS] + p[-(L // 2 - 1):] + r[: L - L // 2]
    assert EOS not in b["input_ids"][0].tolist()


def _reference_truncation(P: int, R: int, L: int) -> tuple[int, int]:
    """(kept prompt length incl. BOS, kept response length), from the docstring's words."""
    if P + R <= L:
        return P, R
    floor = min(P, L // 2)  # the prompt never shrinks below this
    kp = max(floor, min(P, L - R))  # ...and only as far as a whole response needs
    return kp, L - kp


@settings(max_examples=300, deadline=None)
@given(P=st.integers(1, 14), R=st.integers(1, 14), L=st.integers(2, 32), pad=st.sampled_from([0, 7]))
def test_truncation_properties(P, R, L, pad):
    prompt = [BOS] + [100 + i for i in range(P - 1)]
    resp = [200 + j for j in range(R)]
    tk_ids = [[500 + j, 600 + j] for j in range(R)]
    tk_lps = [[-0.5, -1.0 - j] for j in range(R)]
    b = collate([Sample(prompt, resp, tk_ids, tk_lps), Sample([BOS], [9])], L, pad, 2, with_reference=False)
    kp, n = _reference_truncation(P, R, L)
    row = b["input_ids"][0].tolist()
    assert row[: kp + n] == [BOS] + prompt[P - kp + 1:] + resp[:n]
    assert all(t == pad for t in row[kp + n:])
    assert b["input_ids"].shape[1] == max(kp + n, 2) <= L
    # the documented guarantees, independently of the reference above
    assert kp + n == min(L, P + R)
    assert kp >= min(P, L // 2)
    assert n == R or kp == min(P, L // 2)  # the response is cut only with the prompt at its floor
    labels = b["labels"][0].tolist()
    assert labels == [IGNORE] * (kp - 1) + resp[:n] + [IGNORE] * (len(labels) - kp + 1 - n)
    mask = b["topk_mask"][0].tolist()
    assert [i for i, m in enumerate(mask) if m] == list(range(kp - 1, kp - 1 + n))
    assert b["topk_ids"][0, kp - 1: kp - 1 + n].tolist() == tk_ids[:n]


# --------------------------------------------------------------------------------------------
# Bad input: a DataError naming the file, the line and the field.

GOOD = {"prompt": "Hi?", "teacher_text": "Hello."}
R3 = [300, 301, EOS]


def _tk(ids, lps, temperature=1.0):
    return {"prompt": "Hi?", "teacher_text": "Hello.", "response_ids": R3,
            "teacher_topk": {"ids": ids, "logprobs": lps, "temperature": temperature}}


OK_IDS = [[300, 5], [301, 6], [EOS, 7]]
OK_LPS = [[-0.1, -3.0]] * 3

# (lines after "header, good record, blank line"; the bad line is line 4 unless given; needles)
BAD = [
    pytest.param(['{"prompt": "a", "teacher_text": '], None, ["malformed JSON"], id="malformed-json"),
    pytest.param(['[1, 2]'], None, ["not a JSON object"], id="non-object"),
    pytest.param(['"just a string"'], None, ["not a JSON object"], id="non-object-string"),
    pytest.param([{"teacher_text": "x"}], None, ["'prompt'"], id="missing-prompt"),
    pytest.param([{"prompt": "", "teacher_text": "x"}], None, ["'prompt'"], id="empty-prompt"),
    pytest.param([{"prompt": 3, "teacher_text": "x"}], None, ["'prompt'"], id="prompt-not-str"),
    pytest.param([{"messages": [], "teacher_text": "x"}], None, ["'messages'"], id="empty-messages"),
    pytest.param([{"messages": [{"role": "user"}], "teacher_text": "x"}], None, ["'messages'"],
                 id="message-without-content"),
    pytest.param([{"prompt": "a"}], None, ["'teacher_text'"], id="missing-teacher_text"),
    pytest.param([{"prompt": "a", "teacher_text": " \n\t "}], None, ["'teacher_text'"], id="blank-teacher_text"),
    pytest.param([{"prompt": "a", "teacher_text": "b", "reference": ""}], None, ["'reference'"],
                 id="empty-reference"),
    pytest.param([{**GOOD, "teacher_topk": {"ids": OK_IDS, "logprobs": OK_LPS}}], None,
                 ["'teacher_topk'", "'response_ids'"], id="topk-without-response_ids"),
    pytest.param([_tk(OK_IDS[:2], OK_LPS[:2])], None, ["'teacher_topk.ids'", "2 rows", "3 tokens"],
                 id="topk-rows-vs-response_ids"),
    pytest.param([_tk(OK_IDS, OK_LPS[:2])], None, ["'teacher_topk.logprobs'", "2 rows"], id="logprob-rows"),
    pytest.param([_tk([[300, 5], [301], [EOS, 7]], [[-0.1, -3.0], [-0.1], [-0.1, -3.0]])], None,
                 ["teacher_topk row 1", "expected 2"], id="row-shorter-than-k"),
    pytest.param([_tk(OK_IDS, [[-0.1, -3.0], [-0.1, -3.0], [-0.1]])], None,
                 ["teacher_topk row 2", "expected 2"], id="logprob-row-shorter-than-k"),
    pytest.param([_tk([[300, 5], [301, 32000], [EOS, 7]], OK_LPS)], None, ["'teacher_topk.ids'", "32000"],
                 id="topk-id-out-of-vocab"),
    pytest.param([_tk([[300, -1], [301, 6], [EOS, 7]], OK_LPS)], None, ["'teacher_topk.ids'", "-1"],
                 id="topk-id-negative"),
    pytest.param([_tk(OK_IDS, [[-0.1, float("nan")], [-0.1, -3.0], [-0.1, -3.0]])], None,
                 ["'teacher_topk.logprobs'", "row 0", "nan"], id="nan-logprob"),
    pytest.param([_tk(OK_IDS, [[-0.1, -3.0], [-0.1, float("-inf")], [-0.1, -3.0]])], None,
                 ["'teacher_topk.logprobs'", "row 1"], id="inf-logprob"),
    pytest.param([_tk(OK_IDS, [[-0.1, -3.0], [-0.1, -3.0], [0.5, -3.0]])], None,
                 ["'teacher_topk.logprobs'", "row 2", "positive"], id="positive-logprob"),
    pytest.param([_tk([[300, 5], [301, 301], [EOS, 7]], OK_LPS)], None, ["'teacher_topk.ids'", "row 1", "repeats"],
                 id="duplicate-ids"),
    pytest.param([_tk(OK_IDS, [[math.log(0.6), math.log(0.6)]] * 3)], None,
                 ["'teacher_topk.logprobs'", "row 0", "above 1"], id="probabilities-above-1"),
    pytest.param([_tk(OK_IDS, OK_LPS, temperature=0)], None, ["'teacher_topk.temperature'"], id="temperature-zero"),
    pytest.param([{**GOOD, "response_ids": R3, "teacher_topk": [1, 2]}], None, ["'teacher_topk'"],
                 id="topk-not-object"),
    pytest.param([_tk(OK_IDS, OK_LPS), _tk([r + [9] for r in OK_IDS], [r + [-4.0] for r in OK_LPS])], 5,
                 ["teacher_topk", "k=3", "k=2", "bad_shard.jsonl:4"], id="k-varies"),
    pytest.param([_tk(OK_IDS, OK_LPS), _tk(OK_IDS, OK_LPS, temperature=2.0)], 5,
                 ["teacher_topk.temperature", "2.0", "1.0", "bad_shard.jsonl:4"], id="temperature-varies"),
    pytest.param([{**GOOD, "response_ids": [300, 32000, EOS]}], None, ["'response_ids'", "32000"],
                 id="response_ids-out-of-vocab"),
    pytest.param([{**GOOD, "response_ids": [-5, EOS]}], None, ["'response_ids'", "-5"], id="response_ids-negative"),
    pytest.param([{**GOOD, "response_ids": []}], None, ["'response_ids'"], id="response_ids-empty"),
    pytest.param([{**GOOD, "response_ids": [300, 1.5]}], None, ["'response_ids'"], id="response_ids-not-int"),
]


def _bad_shard(tmp_path, lines) -> Path:
    return write_jsonl(tmp_path / "bad_shard.jsonl", [HEADER, GOOD, "", *lines])


@pytest.mark.parametrize("lines, line_no, needles", BAD)
def test_bad_record_names_file_line_and_field(tmp_path, tokenizer, lines, line_no, needles):
    path = _bad_shard(tmp_path, lines)
    good = write_jsonl(tmp_path / "good_shard.jsonl", [GOOD])
    with pytest.raises(DataError) as e:
        load_dataset([good, path], tokenizer, V)  # the error names the shard it is in
    msg = str(e.value)
    assert str(path) in msg and str(good) not in msg, msg
    assert re.search(rf"\bline {line_no or 4}\b", msg), msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("case", ["empty-dataset", "only-header-and-blanks", "missing-shard", "no-shards",
                                  "not-utf8"])
def test_bad_dataset_raises_a_clear_error(tmp_path, tokenizer, case):
    path = tmp_path / "shard.jsonl"
    needles = [str(path)]
    if case == "empty-dataset":
        path.write_text("\n\n  \n", encoding="utf-8")
        paths, needles = [path], needles + ["no records"]
    elif case == "only-header-and-blanks":
        write_jsonl(path, [HEADER, "", ""])
        paths, needles = [path], needles + ["no records"]
    elif case == "missing-shard":
        paths, needles = [write_jsonl(tmp_path / "ok.jsonl", [GOOD]), path], needles + ["does not exist"]
    elif case == "no-shards":
        paths, needles = [], ["no data shards", "io.train_shards"]
    else:
        path.write_bytes(b'{"prompt": "caf\xe9", "teacher_text": "x"}\n')
        paths, needles = [path], needles + ["UTF-8"]
    with pytest.raises(DataError) as e:
        load_dataset(paths, tokenizer, V)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.smoke
def test_sampler_epochs_are_seeded_permutations():
    n = 7
    stream = Sampler(n, seed=3).take(5 * n)
    assert stream == Sampler(n, seed=3).take(5 * n)  # deterministic for a seed
    assert stream != Sampler(n, seed=4).take(5 * n)
    epochs = [stream[e * n:(e + 1) * n] for e in range(5)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) > 1  # a fresh one per epoch


@pytest.mark.smoke
@pytest.mark.parametrize("position", [0, 1, 6, 7, 13, 30])
def test_sampler_state_is_the_position(position):
    n = 7
    full = Sampler(n, seed=11).take(60)
    s = Sampler(n, seed=11)
    got = s.take(position)
    assert s.position == position
    assert got + s.take(17) == full[: position + 17]  # taking in pieces == taking at once
    assert Sampler(n, seed=11, position=position).take(17) == full[position:position + 17]  # resume


def test_sampler_builds_one_permutation_per_epoch_touched(monkeypatch):
    """O(1) per index: a sampler resumed far into the stream builds only the epochs it reads,
    once each, not one per index nor the epochs before it."""
    calls = []
    randperm = torch.randperm

    def counting(n, *args, **kwargs):
        calls.append(n)
        return randperm(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting)
    n = 50
    s = Sampler(n, seed=0, position=1000 * n + 45)
    out = s.take(10)  # 5 indices of epoch 1000, 5 of epoch 1001
    assert calls == [n, n]
    s.take(40)  # the rest of epoch 1001
    assert calls == [n, n]
    assert sorted(Sampler(n, seed=0, position=1000 * n).take(45) + out[:5]) == list(range(n))


# --------------------------------------------------------------------------------------------
# Fingerprint


@pytest.mark.smoke
def test_fingerprint_follows_the_shard_bytes(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [HEADER, GOOD, {"prompt": "x", "teacher_text": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "teacher_text": "q"}])
    fp = load_dataset([a, b], tokenizer, V).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert load_dataset([a, b], tokenizer, V).fingerprint == fp  # stable
    copy = tmp_path / "elsewhere" / "a.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    assert load_dataset([copy, b], tokenizer, V).fingerprint == fp  # the bytes, not the path

    b.write_text(b.read_text().replace('"q"', '"r"'))  # one byte of the second shard
    fp2 = load_dataset([a, b], tokenizer, V).fingerprint
    assert fp2 != fp
    a.write_text(a.read_text() + "\n")  # even a byte that changes no record
    assert load_dataset([a, b], tokenizer, V).fingerprint not in (fp, fp2)


# --------------------------------------------------------------------------------------------
# Inputs that used to end in a traceback or a wrong reading

def _load_error(tmp_path, tokenizer, raw: bytes | str, **kw) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    with pytest.raises(DataError) as e:
        load_dataset([path], tokenizer, V, **kw)
    assert str(path) in str(e.value)
    return str(e.value)


@pytest.mark.smoke
@pytest.mark.parametrize("raw, line, says", [
    ('{"prompt": "a", "teacher_text": "b", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n", 1, "nested too deeply"),
    ('{"prompt": "a\\ud800", "teacher_text": "b"}\n', 1, "unpaired surrogate"),
    ('{"prompt": "a", "teacher_text": "b"}\n{"prompt": "a", "teacher_text": "b", "reference": "\\udfff"}\n', 2,
     "'reference' holds an unpaired surrogate"),
    ('{"messages": [{"role": "user", "content": "\\ud83d"}], "teacher_text": "b"}\n', 1, "messages[0].content"),
    ('{"prompt": "a", "teacher_text": "b"}\n{"__header__": {"k": 2}}\n', 2, "only as the first line"),
    (b'{"prompt": "a", "teacher_text": "b"}\n{"prompt": "\xff", "teacher_text": "b"}\n', 2, "invalid UTF-8"),
], ids=["deep-nesting", "lone-surrogate", "surrogate-in-reference", "surrogate-in-messages", "late-header",
        "invalid-utf8"])
def test_bad_records_are_data_errors_naming_the_line(tmp_path, tokenizer, raw, line, says):
    msg = _load_error(tmp_path, tokenizer, raw)
    assert says in msg and f"line {line})" in msg


@pytest.mark.smoke
def test_cr_only_line_endings_are_lines(tmp_path, tokenizer):
    """Old Mac line endings: two records, not one malformed line."""
    path = tmp_path / "cr.jsonl"
    path.write_bytes(b'{"prompt": "a", "teacher_text": "b"}\r{"prompt": "c", "teacher_text": "d"}\r')
    data = load_dataset([path], tokenizer, V)
    assert [s.response_ids for s in data.samples] == [enc(tokenizer, "b") + [EOS], enc(tokenizer, "d") + [EOS]]


@pytest.mark.smoke
def test_a_float_top_k_id_is_named_as_such(tmp_path, tokenizer):
    rec = {"prompt": "a", "teacher_text": "b", "response_ids": [5, EOS], "teacher_topk": topk_for([5, EOS])}
    rec["teacher_topk"]["ids"][1][0] = 5.0
    msg = _load_error(tmp_path, tokenizer, json.dumps(rec) + "\n")
    assert "5.0, not an integer token id" in msg and "row 1" in msg


def test_messages_a_chat_template_rejects_are_a_data_error(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                         "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}], "teacher_text": "b"},
        {"messages": [{"role": "tool", "content": "hi"}], "teacher_text": "b"}])
    with pytest.raises(DataError, match=r"chat template rejected them .*unknown role tool.*line 2\)"):
        load_dataset([path], tok, V)


def test_a_huge_text_is_cut_before_it_is_tokenized_whole(tmp_path, tokenizer, monkeypatch):
    """A 2 MB teacher_text and prompt with max_len 64: the tokenizer never sees more than a few
    thousand characters, and the kept tokens equal the whole text's (its first 64 tokens of the
    response, without EOS as truncation drops it; the prompt's last 64)."""
    words = [f"word{i % 97} " for i in range(400_000)]
    prompt, text = "".join(reversed(words)), "".join(words)
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": prompt, "teacher_text": text, "reference": text}])
    seen = []
    real = type(tokenizer).encode

    def spy(self, t, *a, **k):
        seen.append(len(t))
        return real(self, t, *a, **k)

    monkeypatch.setattr(type(tokenizer), "encode", spy)
    sample = load_dataset([path], tokenizer, V, max_len=64).samples[0]
    assert max(seen) <= 64 * 16 * 4
    monkeypatch.undo()
    assert sample.response_ids == enc(tokenizer, text)[:64] == sample.reference_ids
    assert sample.prompt_ids == [BOS] + enc(tokenizer, prompt)[-64:]
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": "a", "teacher_text": "two words"}])
    assert load_dataset([short], tokenizer, V, max_len=64).samples[0].response_ids == enc(tokenizer, "two words") + [EOS]


def test_records_are_decoded_one_at_a_time(tmp_path):
    """annotate streams its input: the count needs no decoding, and the first record comes out
    before a bad line further on is decoded (whose error still names its line)."""
    from kdtrain.data import iter_jsonl

    path = tmp_path / "lazy.jsonl"
    path.write_text(json.dumps({"__header__": {}}) + "\n" + json.dumps({"prompt": "a"}) + "\n\n{oops\n")
    records = iter_jsonl(path)
    assert len(records) == 2
    it = iter(records)
    assert next(it) == (2, {"prompt": "a"})
    with pytest.raises(DataError, match=r"line 4"):
        next(it)


BIG = "1" + "0" * 30  # an integer beyond 64 bits: orjson reads it as the float 1e+30


@pytest.mark.parametrize("line, by_json", [
    ('{"prompt": "p", "metadata": {"n": ' + BIG + '}}', True),
    ('{"prompt": "p", "teacher_api_logprobs": {"k": 1, "vocab": ["a"], "extra": [' + BIG + ']}}', True),
    ('{"prompt": "p", "teacher_api_logprobs": [{"token": "a", "logprob": -' + BIG + '}]}', True),
    ('{"prompt": "p", "response_ids": [' + BIG + ']}', True),
    ('{"prompt": "p", "teacher_topk": {"ids": [[' + BIG + ']]}}', False),  # its checks refuse the float
    ('{"prompt": "p", "metadata": {"n": 18446744073709551615, "x": -1.5e18}}', False),
    ('{"prompt": "p", "metadata": {"x": NaN}}', True),
])
def test_records_orjson_would_change_are_read_by_json(tmp_path, line, by_json):
    """Every record reads to what json reads (an integer stays an integer), through orjson where
    that is so and through json (a JsonRecord) where orjson refuses it or would read a float."""
    from kdtrain.data import JsonRecord, iter_jsonl

    (tmp_path / "d.jsonl").write_text(line + "\n")
    [(_, rec)] = list(iter_jsonl(tmp_path / "d.jsonl"))
    assert isinstance(rec, JsonRecord) == by_json
    if "teacher_topk" not in line:
        assert repr(rec) == repr(json.loads(line))

