"""Alignment of teacher and student tokens on the bytes of a response, worked by hand, and the
same-tokenizer property: every position aligned, rows equal to the plain top-k."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdtrain import align


def _entries(pieces, alts):
    """An endpoint's teacher_api_logprobs: tokens ``pieces`` with alternatives [(bytes, logprob)] each."""
    tok = lambda b: b.decode("utf-8", "replace")
    return [{"token": tok(p), "bytes": list(p), "logprob": row[0][1],
             "top_logprobs": [{"token": tok(b), "bytes": list(b), "logprob": v} for b, v in row]}
            for p, row in zip(pieces, alts)]


def _api(pieces, alts, text, student, vocab, k):
    """align_api on alternatives written as [(bytes, logprob)] per token, through both stored forms
    (the endpoint's list, and packed and written as JSON): the same rows."""
    entries = _entries(pieces, alts)
    rows = align.align_api(align.parse_api_logprobs(entries), text, student, vocab, k)
    packed = json.loads(json.dumps(align.pack_api_logprobs(entries)))
    assert align.align_api(align.parse_api_logprobs(packed), text, student, vocab, k) == rows
    return rows


# The hand-worked cases are in the smoke suite; the property tests, the byte-level toy pair and
# the large tables run in the full suite.

EMOJI = "😀".encode()  # 4 bytes: f0 9f 98 80


@pytest.mark.smoke
def test_one_to_many_splits_in_both_directions_are_not_aligned():
    text = "unbelievable 😀!".encode()
    teacher = [b"un", b"believable", b" ", EMOJI, b"!"]
    student = [b"un", b"be", b"lievable", b" " + EMOJI, b"!"]
    t = align.spans(teacher, text)
    s = align.spans(student, text)
    assert t[:2] == ([0, 2, 12, 13, 17], [2, 12, 13, 17, 18])
    # one teacher token -> two student tokens ("believable"), two teacher tokens -> one student token (" 😀")
    assert align.match(s[0], s[1], t[0], t[1]) == [0, None, None, None, 4]
    # and the other way round: the student's pieces as the teacher's
    assert align.match(t[0], t[1], s[0], s[1]) == [0, None, None, None, 4]


@pytest.mark.smoke
def test_runs_of_spaces_newlines_digits_and_partial_utf8():
    text = "a  b\n\n12 é".encode()  # é = c3 a9
    teacher = [b"a", b"  ", b"b", b"\n\n", b"12", b" ", b"\xc3", b"\xa9"]
    student = [b"a", b"  ", b"b", b"\n", b"\n", b"1", b"2", b" \xc3\xa9"]
    t, s = align.spans(teacher, text), align.spans(student, text)
    assert align.match(s[0], s[1], t[0], t[1]) == [0, 1, 2, None, None, None, None, None]
    student = [b"a", b" ", b" b", b"\n\n", b"12", b" ", b"\xc3", b"\xa9"]
    s = align.spans(student, text)
    assert align.match(s[0], s[1], t[0], t[1]) == [0, None, None, 3, 4, 5, 6, 7]


@pytest.mark.smoke
def test_virtual_space_of_a_dummy_prefix():
    """SentencePiece spells "Hello world" as "▁Hello▁world": the first span starts at byte 0;
    a token of the virtual space alone ("▁" before "12") spans [-1, 0) and matches only its twin."""
    assert align.spans([b" Hello", b" world"], b"Hello world") == ([0, 5], [5, 11], b" ")
    assert align.spans([b" ", b"1", b"2"], b"12") == ([-1, 0, 1], [0, 1, 2], b" ")
    s = align.spans([b" ", b"1", b"2"], b"12")
    t = align.spans([b"12"], b"12")
    assert align.match(s[0], s[1], t[0], t[1]) == [None, None, None]
    assert align.match(s[0], s[1], s[0], s[1]) == [0, 1, 2]


@pytest.mark.smoke
def test_tokens_that_do_not_spell_the_text_name_the_token():
    with pytest.raises(align.AlignError, match=r"token 1 \(b'x'\) at byte 2 where the text has b'c'") as e:
        align.spans([b"ab", b"x"], b"abc")
    assert e.value.position == 1


def _cut(text: bytes, sizes: list[int]) -> list[bytes]:
    """``text`` in pieces of ``sizes`` bytes (0: an empty piece, as a special token spells), the rest last."""
    out, at = [], 0
    for n in sizes:
        out.append(text[at:at + n])
        at += n
    return out + [text[at:]]


@settings(max_examples=200, deadline=None)
@given(text=st.binary(max_size=16), t=st.lists(st.integers(0, 3), max_size=10),
       s=st.lists(st.integers(0, 3), max_size=10), prefix=st.booleans())
def test_match_is_its_definition(text, t, s, prefix):
    """Brute force: a student token with a non-empty span gets the teacher token with the same span.
    Empty pieces on both sides; the student's side may carry a virtual space in front."""
    ts, te, _ = align.spans(_cut(text, t), text)
    ss, se, _ = align.spans(_cut(b" " + text if prefix else text, s), text)
    want = [next((i for i in range(len(ts)) if (ts[i], te[i]) == (a, b)), None) if b > a else None
            for a, b in zip(ss, se)]
    assert align.match(ss, se, ts, te) == want
    assert align.spans([], b"") == ([], [], b"")


@pytest.mark.smoke
def test_parsed_logprobs_keep_every_value_bit_for_bit():
    rows = [[math.log(0.5), math.log(0.25)], [-2, -800.0], [-0.1234567890123, -2.5]]  # an int, an underflow
    entries = [{"bytes": [97 + j], "logprob": row[0], "top_logprobs": [{"bytes": [97], "logprob": v} for v in row]}
               for j, row in enumerate(rows)]
    api = align.parse_api_logprobs(entries)
    assert [api.vocab[i] for i in api.token] == [[None, [97]], [None, [98]], [None, [99]]]  # no token strings
    assert api.lp.dtype == np.float64 and api.lp.tolist() == rows
    packed = json.loads(json.dumps(align.pack_api_logprobs(entries)))
    assert align.parse_api_logprobs(packed).lp.tolist() == rows


PARTIAL = [{"token": "\\xf0\\x9f", "bytes": [240, 159], "logprob": -0.5,  # OpenAI's rendering of part of 😀
            "top_logprobs": [{"token": "\\xf0\\x9f", "bytes": [240, 159], "logprob": -0.5},
                             {"token": "\ufffd", "bytes": [240], "logprob": -1.5},  # others render "�"
                             {"token": "\ufffd", "bytes": [159], "logprob": -2.0}]},
           {"token": "\ufffd", "bytes": [152, 128], "logprob": -0.25,
            "top_logprobs": [{"token": "\ufffd", "bytes": [152, 128], "logprob": -0.25},
                             {"token": " the", "bytes": [32, 116, 104, 101], "logprob": -3},
                             {"token": "<|end|>", "bytes": [], "logprob": -9999.0}]},
           {"token": " the", "bytes": [32, 116, 104, 101], "logprob": -1e-07,
            "top_logprobs": [{"token": " the", "bytes": [32, 116, 104, 101], "logprob": -1e-07},
                             {"token": "\u00e9", "bytes": [195, 169], "logprob": -17.25},
                             {"token": "\ud800", "bytes": [63], "logprob": -20.0}]}]  # a lone surrogate


@pytest.mark.smoke
def test_packed_form_is_the_documented_columns_and_unpacks_to_the_endpoints_list():
    """Each distinct (token, bytes) once in 'vocab' (the string alone where its UTF-8 is the bytes),
    indices as little-endian uint16 and log-probs as little-endian float64, in hex; read back with
    struct, not with the module's own decoding."""
    packed = align.pack_api_logprobs(PARTIAL)
    assert packed["k"] == 3
    assert packed["vocab"] == [["\\xf0\\x9f", [240, 159]], ["\ufffd", [240]], ["\ufffd", [159]],
                               ["\ufffd", [152, 128]], " the", ["<|end|>", []], "\u00e9", ["\ud800", [63]]]
    hexed = lambda name, fmt: list(struct.unpack(f"<{len(packed[name]) // (2 * struct.calcsize(fmt))}{fmt}",
                                                 bytes.fromhex(packed[name])))
    assert hexed("token", "H") == [0, 3, 4]
    assert hexed("top_token", "H") == [0, 1, 2, 3, 4, 5, 4, 6, 7]
    assert packed["float"] == "f8"  # -1e-07 is no float32
    assert hexed("logprob", "d") == [-0.5, -0.25, -1e-07]
    assert hexed("top_logprob", "d") == [-0.5, -1.5, -2.0, -0.25, -3.0, -9999.0, -1e-07, -17.25, -20.0]
    again = json.loads(json.dumps(packed))
    assert align.unpack_api_logprobs(again) == PARTIAL  # -3 comes back as -3.0, equal
    assert align.pack_api_logprobs(align.unpack_api_logprobs(again)) == packed


@pytest.mark.smoke
def test_float32_log_probs_are_packed_as_float32_and_come_back_bit_for_bit():
    """Log-probs that are all float32 values (a server computing in float32, as vLLM does) are
    stored as 4-byte floats; one value that is not makes the record float64. Read back with struct."""
    g = torch.Generator().manual_seed(0)
    values = torch.log_softmax(torch.randn(3, 5, generator=g), -1).tolist()  # float32, widened
    content = [{"token": t, "bytes": list(t.encode()), "logprob": v[0],
                "top_logprobs": [{"token": a, "bytes": list(a.encode()), "logprob": x} for a, x in zip("abcde", v)]}
               for t, v in zip("abc", values)]
    packed = json.loads(json.dumps(align.pack_api_logprobs(content)))
    assert packed["float"] == "f4"
    assert list(struct.unpack("<15f", bytes.fromhex(packed["top_logprob"]))) == sum(values, [])
    assert align.unpack_api_logprobs(packed) == content
    assert align.parse_api_logprobs(packed).lp.tolist() == values
    content[2]["top_logprobs"][4]["logprob"] = -0.1  # no float32
    assert align.pack_api_logprobs(content)["float"] == "f8"
    for bad in ("f2", 4, None):
        with pytest.raises(align.AlignError, match="packed field 'float' must be \"f4\" or \"f8\""):
            align.parse_api_logprobs({**packed, "float": bad})


@pytest.mark.parametrize("edit, expect, position", [
    (lambda p: p.update(k=0), r"packed field 'k' must be the number of alternatives", None),
    (lambda p: p.update(k=True), r"packed field 'k'", None),
    (lambda p: p.update(vocab={}), r"packed field 'vocab' must be a non-empty list", None),
    (lambda p: p.update(top_logprob="zz"), r"packed field 'top_logprob' must be a string of hex digits", None),
    (lambda p: p.update(token=None), r"packed field 'token' must be a string of hex digits", None),
    (lambda p: p.update(logprob=p["logprob"][:-2]), r"'logprob' holds 23 bytes, not a whole number of 8-byte", None),
    (lambda p: p.update(top_token=p["top_token"][:-4]), r"'token' and 'top_token' hold 3 and 8 2-byte indices \(8 tokens "
                                                        r"in 'vocab'\) for 3 tokens of K = 3", None),
    (lambda p: p.update(top_logprob=p["top_logprob"][:-16]), r"hold 3 and 8 values: K = 3 .*K must not vary", None),
    (lambda p: _set_column(p, "token", 1, 8), r"token 1 refers to a token beyond the 8 of 'vocab'", 1),
    (lambda p: _set_column(p, "top_token", 7, 99), r"token 2 refers to a token beyond", 2),
    (lambda p: _set_column(p, "top_logprob", 3, 0.5), r"token 1 has positive 'top_logprobs\[\]\.logprob' 0.5", 1),
    (lambda p: _set_column(p, "logprob", 2, math.nan), r"token 2 has 'logprob' nan, not a finite number", 2),
    (lambda p: _set_column(p, "top_logprob", 1, -math.inf), r"token 0 has 'top_logprobs\[\]\.logprob' -inf", 0),
    (lambda p: _set_column(p, "top_logprob", 0, -0.01), r"token 0's top_logprobs sum above probability 1", 0),
    (lambda p: p["vocab"].__setitem__(5, ["<|end|>", "no bytes"]), r"token 1 has a token that is neither", 1),
    (lambda p: p["vocab"].__setitem__(4, 7), r"token 1 has a token that is neither a string nor", 1),
])
@pytest.mark.smoke
def test_packed_form_errors_name_the_token(edit, expect, position):
    packed = align.pack_api_logprobs(PARTIAL)
    edit(packed)
    with pytest.raises(align.AlignError, match=expect) as e:
        align.parse_api_logprobs(json.loads(json.dumps(packed)))
    assert e.value.position == position


def _set_column(packed: dict, name: str, i: int, value) -> None:
    dtype = "<u2" if name.endswith("token") else "<f8"
    column = np.frombuffer(bytes.fromhex(packed[name]), dtype).copy()
    column[i] = value
    packed[name] = column.tobytes().hex()


@pytest.mark.smoke
def test_a_token_string_that_is_no_text_is_named_where_it_is_used(tokenizer):
    """A packed lone surrogate (written by hand: pack keeps one with its bytes), as the chosen token
    and as an alternative."""
    vocab = align.vocab_bytes(tokenizer)
    student = tokenizer.encode(" the", add_special_tokens=False)
    for i in (0, 1):
        packed = align.pack_api_logprobs(PARTIAL[2:])
        packed["vocab"][i] = "\ud800"
        with pytest.raises(align.AlignError, match=r"token 0 has a token string that is not text") as e:
            align.align_api(align.parse_api_logprobs(packed), " the", student, vocab, 3)
        assert e.value.position == 0


@pytest.mark.parametrize("bad, expect", [("ab", r"token 1 has no 'top_logprobs\[\].bytes'"),
                                         ([300], r"token 1 has 'top_logprobs\[\].bytes' that are not byte values"),
                                         (None, r"token 1 has no 'top_logprobs\[\].bytes'")])
@pytest.mark.smoke
def test_bad_alternative_bytes_name_the_token(bad, expect):
    entries = _entries([b"a", b" b", b"c"], [[(b"a", -1.0), (b"b", -2.0)], [(b" b", -1.0), (b"c", -2.0)],
                                             [(b"c", -1.0), (b"d", -2.0)]])
    entries[1]["top_logprobs"][1]["bytes"] = bad
    for read in (align.parse_api_logprobs, align.pack_api_logprobs):
        with pytest.raises(align.AlignError, match=expect) as e:
            read(entries)
        assert e.value.position == 1


@pytest.mark.smoke
def test_sentencepiece_byte_view(tokenizer):
    v = align.vocab_bytes(tokenizer)
    assert align.vocab_bytes(tokenizer) is v  # built once per tokenizer
    ids = tokenizer.convert_tokens_to_ids
    assert v.pieces[ids("▁Hello")] == b" Hello" and v.pieces[ids("▁▁")] == b"  "
    assert v.pieces[ids("<0x0A>")] == b"\n" and v.pieces[ids("<0xE2>")] == b"\xe2"
    assert v.pieces[ids("😀")] == EMOJI and v.pieces[ids("é")] == "é".encode()
    assert v.pieces[tokenizer.eos_token_id] is None and v.pieces[tokenizer.bos_token_id] is None
    # "A" and its byte-fallback twin "<0x41>" spell the same byte: a lookup gives the ordinary piece
    assert v.pieces[ids("<0x41>")] == v.pieces[ids("A")] == b"A" and v.by_bytes[b"A"] == ids("A")
    assert v.by_bytes[b"\n"] == ids("<0x0A>")  # no ordinary piece for a newline
    assert v.prefix == b" " and len(v) == 32000


def test_byte_level_byte_view(toy_pair):
    from kdtrain.tokenizer import load_tokenizer

    tok = load_tokenizer(toy_pair["tokenizer"])
    v = align.vocab_bytes(tok)
    ids = tok.convert_tokens_to_ids
    assert v.pieces[ids("Ġcapital")] == b" capital" and v.pieces[ids("Ċ")] == b"\n"
    assert v.pieces[ids("ð")] == b"\xf0" and v.pieces[ids("Ł")] == b"\x9f"  # GPT-2's table: 0xf0 -> ð, 0x9f -> Ł
    assert v.prefix == b"" and v.pieces[tok.eos_token_id] is None


@pytest.mark.smoke
def test_endpoint_rows_by_hand(tokenizer):
    """Student "▁Hi ▁ 😀 <0x0A> 1 2" against an endpoint's "Hi| |😀|\\n|12"."""
    text = "Hi 😀\n12"
    ids = tokenizer.convert_tokens_to_ids
    student = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert student[:-1] == ids(["▁Hi", "▁", "😀", "<0x0A>", "1", "2"])
    pieces = [b"Hi", b" ", EMOJI, b"\n", b"12"]
    alts = [[(b"Hi", -0.2), (b"Hello", -2.5), (b"H", -3.0)],  # first token: the student's "▁" prefix is added
            [(b" ", -0.2), (b" \xf0\x9f", -2.0), (b"\t", -4.0)],  # a partial UTF-8 sequence is no student token
            [(EMOJI, -0.3), ("🙂".encode(), -1.6), (b"\xff\xfe", -3.0)],
            [(b"\n", -0.1), (b"\n\n", -3.0), (b"  ", -5.0)],
            [(b"12", -0.6), (b"1", -1.4), (b"2", -2.5)]]
    rows = _api(pieces, alts, text, student, align.vocab_bytes(tokenizer), k=3)
    V = 32000
    fill = lambda lps, m: math.log((1 - sum(math.exp(v) for v in lps)) / (V - m))
    assert rows.ids[0] == ids(["▁Hi", "▁Hello", "▁H"]) and rows.logprobs[0] == [-0.2, -2.5, -3.0]
    assert rows.ids[1] == ids(["▁", "<0x09>"]) + [V - 3]  # free slot s takes id V - 1 - s
    assert rows.logprobs[1][:2] == [-0.2, -4.0] and rows.logprobs[1][2] == pytest.approx(fill([-0.2, -4.0], 2))
    assert rows.ids[2] == ids(["😀", "🙂"]) + [V - 3]
    assert rows.ids[3][:2] == ids(["<0x0A>", "▁▁"])  # "\n\n" is no single piece; "  " is "▁▁"
    assert rows.logprobs[3][:2] == [-0.1, -5.0]
    assert rows.ids[4:] == [None, None, None]  # "1" and "2" split the teacher's "12"; EOS has no bytes
    assert rows.aligned == 4
    listed = sum(math.exp(v) for row in alts[:4] for _, v in row)
    unmapped = math.exp(-2.0) + math.exp(-3.0) + math.exp(-3.0)  # " \xf0\x9f", "\xff\xfe" and "\n\n"
    assert rows.listed_mass == pytest.approx(listed) and rows.mapped_mass == pytest.approx(listed - unmapped)


@pytest.mark.smoke
def test_alternatives_with_the_same_student_id_add_up(tokenizer):
    v = align.vocab_bytes(tokenizer)
    rows = _api([b"A"], [[(b"A", -1.0), (b"A", -2.0)]], "A", tokenizer.encode("A", add_special_tokens=False), v, k=1)
    assert rows.ids[0] == [tokenizer.convert_tokens_to_ids("▁A")]
    assert rows.logprobs[0][0] == pytest.approx(math.log(math.exp(-1.0) + math.exp(-2.0)))


@pytest.mark.smoke
def test_filled_row_keeps_the_uniform_tail():
    """Filled ids carry tail / (V - m) each: listed + (V - k) unlisted shares sum to 1. Free slot s
    takes id V - 1 - s, or the next lower one the row does not hold."""
    V = 50
    ids, lps = align.fill_row([7, 47], [-0.5, -1.5], 5, V)
    assert ids == [7, 47, 46, 45, 44]
    assert align.fill_row([7, 3], [-0.5, -1.5], 5, V)[0] == [7, 3, 47, 46, 45]
    total = sum(math.exp(v) for v in lps) + (V - 5) * math.exp(lps[-1])
    assert total == pytest.approx(1.0, abs=1e-12)
    assert align.fill_row([3, 4, 5], [-1.0, -2.0, -3.0], 2, V) == ([3, 4], [-1.0, -2.0])


@pytest.mark.smoke
def test_to_student_sums_teacher_ids_that_share_a_student_id():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=-1)
    mapping = torch.tensor([2, 0, 2, -1, 1, 2])
    out = align.to_student(lp, mapping, 4)
    p = lp.exp()
    ref = torch.stack([p[:, 1], p[:, 4], p[:, 0] + p[:, 2] + p[:, 5], torch.zeros(3, dtype=torch.float64)], -1)
    torch.testing.assert_close(out.exp(), ref)
    assert torch.isneginf(out[:, 3]).all()
    assert torch.equal(align.to_student(lp, torch.arange(6), 6), lp)  # a lone id keeps its bits


CHARS = st.one_of(st.sampled_from(list("ab cé漢😀\n\t 0123456789.,'-")),
                  st.characters(blacklist_categories=("Cs",)))  # no lone surrogates: not encodable text
TEXT = st.text(CHARS, min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, seed=st.integers(0, 2**31 - 1))
def test_same_tokenizer_aligns_every_position_and_keeps_the_rows(tokenizer, text, seed):
    """Teacher = student tokenizer: coverage 100%, and the rows are the teacher's top-k unchanged,
    through both paths (an endpoint's listed alternatives; a local teacher's full distribution)."""
    v = align.vocab_bytes(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if b"".join(v.pieces[i] or b"?" for i in ids) not in (text.encode(), b" " + text.encode()):
        return  # the tokenizer normalises this text (e.g. unusual whitespace): nothing to align against
    s = align.spans([v.pieces[i] for i in ids], text.encode())
    assert align.match(s[0], s[1], s[0], s[1]) == list(range(len(ids)))

    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(len(ids), len(v), generator=g) * 3, dim=-1)
    student = align.to_student(lp, align.id_map(v, v), len(v))
    got_ids, got_lps, mapped = align.topk_rows(student, 8)
    top = lp.topk(8, dim=-1)
    assert got_ids.tolist() == top.indices.tolist()
    assert got_lps.tolist() == [[min(x, 0.0) for x in r] for r in top.values.tolist()]
    # Every row's whole mass maps. The float32 sum of 32,000 probabilities drifts from 1 by about
    # 1e-5 (2.1e-5 seen), so 1e-4.
    assert mapped == pytest.approx(len(ids), rel=1e-4)

    # Endpoint path: alternatives are pieces that are the only ones with their bytes (at the first
    # position, ones that start with a space, as the first token of a dummy-prefix tokenizer does).
    unique = [i for i in top.indices.flatten().tolist() if v.pieces[i] and v.by_bytes.get(v.pieces[i]) == i]
    alts, want = [], []
    for j, tid in enumerate(ids):
        row = [tid] + [i for i in unique if i != tid and (j or v.pieces[i].startswith(b" "))][:3]
        alts.append([(v.pieces[i], float(lp[j, i])) for i in row])
        want.append(row)
    if any(v.by_bytes[v.pieces[i]] != i for i in ids):
        return  # a byte-fallback piece with an ordinary twin: its bytes look up the ordinary piece
    width = max(map(len, want))
    alts = [a + [(b"\xff", -40.0)] * (width - len(a)) for a in alts]  # K must not vary: pad with no piece
    rows = _api([v.pieces[i] for i in ids], alts, text, ids, v, k=width)
    assert rows.aligned == len(ids)
    for j, row in enumerate(want):  # the listed alternatives, most likely first, then fills
        listed = sorted(zip(row, [x for _, x in alts[j]]), key=lambda t: -t[1])
        assert list(zip(rows.ids[j], rows.logprobs[j]))[: len(row)] == listed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 6), k=st.integers(1, 6), listed=st.booleans())
def test_vectorised_rows_equal_the_row_by_row_definition(seed, K, k, listed):
    """build_rows against fill_row applied to each row's mapped alternatives sorted by probability
    (duplicates merged in probability); small V so that mapped ids often sit where fills go.
    ``listed``: the alternatives most likely first, as an endpoint lists them (with ties)."""
    V = 12
    g = torch.Generator().manual_seed(seed)
    sid = torch.randint(-1, V, (20, K), generator=g)
    lp = torch.log_softmax(torch.randn(20, K + 1, generator=g, dtype=torch.float64), -1)[:, :K]
    if listed:
        lp = lp.sort(-1, descending=True).values
        lp[::3, -1] = lp[::3, 0]  # a tie...
        lp[::3] = lp[::3].sort(-1, descending=True).values  # ...kept in order
    got_ids, got_lps = align.build_rows(sid, lp, k, V)
    for r in range(20):
        merged: dict[int, float] = {}
        for i, v in sorted(zip(sid[r].tolist(), lp[r].tolist()), key=lambda t: -t[1]):
            if i >= 0:
                merged[i] = merged.get(i, 0.0) + math.exp(v)
        want_ids, want_lps = align.fill_row(list(merged), [math.log(p) for p in merged.values()], k, V)
        assert got_ids[r].tolist() == want_ids
        assert got_lps[r].tolist() == pytest.approx(want_lps, abs=1e-12)


ENCODER_TEXT = st.lists(st.one_of(st.sampled_from(["\n", " ", "  ", "\t", "\u2581", "</s>", "<s>", "<unk>", "a", "é",
                                                   "😀", "def f(x):\n    return x\n", "\r\n", "12"]),
                                  st.characters(blacklist_categories=("Cs",))), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ENCODER_TEXT)
def test_line_encoder_gives_the_tokenizers_ids(tokenizer, text):
    """The student's SentencePiece BPE encoded line by line: the same ids as the tokenizer, on texts of
    newlines, runs of spaces, leading spaces and newlines, "▁" itself and the special tokens' strings."""
    encode = align.vocab_bytes(tokenizer).encode
    assert encode is not None
    assert encode(text) == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", ["", "\n", "\n\nHello", " Hello\n world", "a\n\n\n  b  \n", "x</s>\ny",
                                  "```python\nfor i in range(3):\n\tprint(i)\n```\n", "▁a\n▁b"])
def test_line_encoder_on_chosen_texts(tokenizer, text):
    assert align.vocab_bytes(tokenizer).encode(text) == tokenizer.encode(text, add_special_tokens=False)


def test_line_encoder_only_for_sentencepiece_style_bpe(toy_pair):
    from kdtrain.tokenizer import load_tokenizer

    assert align.line_encoder(load_tokenizer(toy_pair["tokenizer"])) is None  # byte-level BPE: encoded whole


def test_indices_widen_past_65536_tokens():
    """uint16 indices hold 65,536 distinct tokens; one more and they are uint32."""
    for n, width in ((1 << 16, 2), ((1 << 16) + 1, 4)):
        content = [{"token": f"t{i}", "bytes": list(f"t{i}".encode()), "logprob": -0.5,
                    "top_logprobs": [{"token": f"t{i}", "bytes": list(f"t{i}".encode()), "logprob": -0.5}]}
                   for i in range(n)]
        packed = align.pack_api_logprobs(content)
        assert len(packed["vocab"]) == n and len(packed["top_token"]) == 2 * width * n
        api = align.parse_api_logprobs(packed)
        assert api.token[-1] == api.top[-1, 0] == n - 1
