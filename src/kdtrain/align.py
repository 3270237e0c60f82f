"""A teacher signal across tokenizers: teacher and student tokens laid on the same bytes.

Both tokenizations of a response text are turned into byte spans over the text's UTF-8 bytes.
A student position is *aligned* when its token covers exactly the byte span of one teacher
token (same start, same end). At an aligned position each teacher alternative whose bytes are
exactly one student token becomes that student id with the teacher's log-probability; the rest
of the teacher's mass is the loss's tail bucket. Unaligned positions carry no row (``None``).

Byte view of a vocabulary (``vocab_bytes``, cached per tokenizer): SentencePiece pieces read
``▁`` as a space and ``<0xNN>`` as the byte NN; byte-level BPE pieces (GPT-2's ``Ġ`` convention)
go through the ByteLevel byte<->character table; special tokens have no bytes. Where several
ids spell the same bytes (a piece and its byte-fallback twin), a lookup by bytes gives the
ordinary piece. A tokenizer that prepends a space to a text that lacks one (SentencePiece's
dummy prefix: ``Hello`` -> ``▁Hello``) spells ``b" " + text``; that virtual space is dropped from
the first token's span, and an alternative at the first byte gets it before the lookup (unless
the alternative starts with a space itself: `` the`` is ``▁the`` there too).

Rows are ``k`` wide, most likely first. When fewer than ``k`` alternatives map, the row is
filled with student ids that the teacher did not list (free slot ``s`` takes id ``V - 1 - s``, or
the next lower one the row does not hold), each with an equal share of the unmapped mass spread
over the unlisted vocabulary: the uniform-tail assumption the loss makes when it re-tempers a
tail, so a filled row describes nearly the same coarse distribution (the fills move a sliver of
the tail, ``(k - m) / (V - m)`` of it, into listed slots).

An endpoint's log-probs are stored packed (``pack_api_logprobs``): per record a table of the
distinct tokens and four columns of numbers, each a hex string of little-endian values. Python's
``json`` takes about 600 ns to read one 17-digit float and 80 ns for an int (measured on the test
machine), so the endpoint's own form, an object per alternative, costs some 65 ms to decode for
1,000 tokens at K = 20, longer than aligning them; a hex string decodes at about 1 ns per
character and ``bytes.fromhex`` is the fastest of the text codecs at hand (3x base64). The
log-probs are float32 where every value is one (a server computing in float32), else float64: bit
for bit either way. The token table holds each distinct (token, bytes) once,
and its lookup in the student's vocabulary is kept across records (``TokenTable``), so a record
costs one dict lookup per distinct token and array work for the rest.

Pure functions but for two caches per student tokenizer (its byte view, the endpoint tokens met):
no file or model access; callers (``annotate``, ``teacher``) name the file and line in their errors.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat

import numpy as np
import torch

TAIL_FLOOR = 1e-7  # the smallest tail mass a filled row keeps (the loss floors its tail the same way)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_FLOATS = {"f4": np.dtype("<f4"), "f8": np.dtype("<f8")}  # the packed log-probs: "float" names one


class AlignError(ValueError):
    """Input that cannot be aligned; ``position`` is the teacher token index (or None)."""

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


@dataclass
class Vocab:
    """The byte view of a tokenizer."""

    pieces: list[bytes | None]  # id -> bytes; None for special tokens
    by_bytes: dict[bytes, int]  # bytes -> id
    eos_id: int
    prefix: bytes = b""  # b" " for a tokenizer that prepends a space to a text that lacks one
    names: list[str] = field(repr=False, default_factory=list)  # id -> piece string
    encode: Callable[[str], list[int]] | None = field(repr=False, default=None)  # see ``line_encoder``

    def __post_init__(self):
        self.spelled = [p or b"" for p in self.pieces]  # id -> bytes, b"" for special tokens
        self.lens = np.array([-1 if p is None else len(p) for p in self.pieces], dtype=np.int64)  # -1: special
        self.met = TokenTable(self.by_bytes)  # an endpoint's tokens, for this student

    def __len__(self) -> int:
        return len(self.pieces)


class TokenTable:
    """The endpoint tokens met so far, each numbered once: its bytes, their length and the student
    id they spell (-1: none). Keyed by the token string, or by the bytes for a token whose string
    is not its bytes' text; a record's distinct tokens are looked up in one pass
    (``numbers``), and the rest is array indexing. Grows to the teacher's vocabulary at most."""

    def __init__(self, by_bytes: dict[bytes, int]):
        self.by_bytes, self.index = by_bytes, {}
        self.pieces: list[bytes] = []
        self.sid, self.lens = np.empty(0, np.int64), np.empty(0, np.int64)

    def numbers(self, keys: list) -> np.ndarray:
        """The numbers of ``keys`` (str or bytes), adding the new ones; -2 for a string that is no
        UTF-8 text (a lone surrogate)."""
        out = np.fromiter(map(self.index.get, keys, repeat(-1)), np.int64, len(keys))
        new = np.flatnonzero(out == -1)
        if len(new):
            if len(self.pieces) + len(new) > len(self.sid):  # room by doubling
                size = 2 * (len(self.pieces) + len(new))
                self.sid, self.lens = (np.resize(a, size) for a in (self.sid, self.lens))
            for i in new.tolist():
                b = keys[i] if keys[i].__class__ is bytes else _utf8(keys[i])
                if b is None:
                    out[i] = -2
                    continue
                out[i] = n = self.index[keys[i]] = len(self.pieces)
                self.pieces.append(b)
                self.sid[n], self.lens[n] = self.by_bytes.get(b, -1), len(b)
        return out


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, as the tokenizers ByteLevel pre-tokenizer uses."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def _convention(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        if '"ByteLevel"' in text:
            return "byte_level"
        if "\u2581" in text or spec.get("model", {}).get("byte_fallback"):
            return "sentencepiece"
        return "literal"
    return "sentencepiece" if any("\u2581" in p for p in tokenizer.get_vocab()) else "literal"


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_bytes(tokenizer) -> Vocab:
    """The byte view of ``tokenizer``, built once per tokenizer object."""
    if tokenizer in _CACHE:
        return _CACHE[tokenizer]
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    names, pieces = [""] * size, [None] * size
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    conv = _convention(tokenizer)
    table = _byte_level_table() if conv == "byte_level" else None
    fallback = set()
    for piece, i in vocab.items():
        names[i] = piece
        if i in special:
            continue
        if conv == "byte_level":
            try:
                pieces[i] = bytes(table[ch] for ch in piece)
            except KeyError:  # an added token written in plain text
                pieces[i] = piece.encode("utf-8")
        elif conv == "sentencepiece" and (m := _BYTE_PIECE.match(piece)):
            pieces[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        else:
            pieces[i] = piece.replace("\u2581", " ").encode("utf-8") if conv == "sentencepiece" else piece.encode()
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(pieces):  # ordinary pieces win over their byte-fallback twins
        if b and (b not in by_bytes or (by_bytes[b] in fallback and i not in fallback)):
            by_bytes[b] = i
    probe = b"".join(pieces[i] or b"" for i in tokenizer.encode("a", add_special_tokens=False))
    out = Vocab(pieces, by_bytes, tokenizer.eos_token_id, b" " if probe == b" a" else b"", names,
                encode=line_encoder(tokenizer))
    _CACHE[tokenizer] = out
    return out


def line_encoder(tokenizer) -> Callable[[str], list[int]] | None:
    """A function giving ``tokenizer.encode(text, add_special_tokens=False)``, line by line, for a
    SentencePiece-style BPE (None for any other tokenizer).

    The tokenizer must be the plain Metaspace + BPE pipeline (no normalizer, a space prepended to
    the text only, no split on spaces, no dropout, word prefix/suffix or ignore_merges) with no
    piece that holds a newline. Then no merge crosses a newline: each line is BPE'd on its own
    (the first one with the prepended space) and a newline is its own token, so the ids are the
    same, at 1.7x less CPU on 1,000-token texts (the model's work grows faster than the text's
    length, and short lines hit its cache). A text holding an added token's string is encoded
    whole, as the tokenizer splits those out first. ``tests/test_align.py`` checks the ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (spec.get("normalizer") is not None or spec.get("truncation") or spec.get("padding")
            or pre != {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
            or model.get("type") != "BPE" or model.get("dropout") or model.get("ignore_merges")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or any("\n" in piece for piece in model.get("vocab", {}))):
        return None
    bpe = backend.model
    newline = [t.id for t in bpe.tokenize("\n")]
    if model.get("unk_token") is not None and bpe.token_to_id(model["unk_token"]) in newline:
        return None  # an unknown newline could fuse with its neighbours
    added = [t.content for t in backend.get_added_tokens_decoder().values()]

    def encode(text: str) -> list[int]:
        if not text or any(a in text for a in added):
            return backend.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        for j, line in enumerate(text.split("\n")):
            if j:
                out += newline
            line = line.replace(" ", "\u2581")
            if not j and not line.startswith("\u2581"):
                line = "\u2581" + line
            if line:
                out += [t.id for t in bpe.tokenize(line)]
        return out

    return encode


def spans(pieces: list[bytes], text: bytes) -> tuple[list[int], list[int], bytes]:
    """(starts, ends, prefix) of ``pieces`` over ``text``; ``prefix`` is a prepended virtual space.

    Raises AlignError (position = first token that leaves the text) when the pieces do not spell it.
    """
    starts, ends, prefix = _spans(pieces, text)
    return starts.tolist(), ends.tolist(), prefix


def _spans(pieces: list[bytes], text: bytes) -> tuple[np.ndarray, np.ndarray, bytes]:
    return _layout(b"".join(pieces), np.fromiter(map(len, pieces), np.int64, len(pieces)), text, lambda: pieces)


def _layout(joined: bytes, lens: np.ndarray, text: bytes, pieces: Callable[[], list[bytes]]):
    """``_spans`` of tokens given as their joined bytes and their lengths (``pieces()`` lists them
    to name the token where they leave the text)."""
    prefix = b""
    if joined != text:
        if joined == b" " + text:
            prefix = b" "
        else:
            pieces = pieces()
            pos, at = _first_mismatch(pieces, text)
            raise AlignError(f"the tokens do not spell the response text: token {pos} ({pieces[pos]!r}) "
                             f"at byte {at} where the text has {text[at:at + len(pieces[pos])]!r}", pos)
    ends = lens.cumsum()
    starts = ends - lens
    if prefix:  # a token of the virtual space alone keeps the span [-1, 0); it matches only its twin
        ends = ends - 1
        starts = np.where(ends == 0, starts - 1, np.maximum(starts - 1, 0))
    return starts, ends, prefix


def _first_mismatch(pieces: list[bytes], text: bytes) -> tuple[int, int]:
    at = 0
    for j, p in enumerate(pieces):
        if text[at:at + len(p)] != p:
            return j, at
        at += len(p)
    return max(len(pieces) - 1, 0), at


def match(s_starts: list[int], s_ends: list[int], t_starts: list[int], t_ends: list[int]) -> list[int | None]:
    """For each student token, the teacher token with exactly its byte span, or None."""
    which = _match(*(np.asarray(x, dtype=np.int64) for x in (s_starts, s_ends, t_starts, t_ends)))
    return [None if i < 0 else i for i in which.tolist()]


def _match(s_starts: np.ndarray, s_ends: np.ndarray, t_starts: np.ndarray, t_ends: np.ndarray) -> np.ndarray:
    """``match`` on spans as ``_spans`` gives them, -1 for None."""
    keep = np.flatnonzero(t_ends > t_starts)  # the non-empty teacher spans: their starts increase
    if not len(keep):
        return np.full(len(s_starts), -1, dtype=np.int64)
    i = keep[np.minimum(np.searchsorted(t_starts[keep], s_starts), len(keep) - 1)]
    return np.where((t_starts[i] == s_starts) & (t_ends[i] == s_ends), i, -1)


def _key(b: bytes, t_strip: bytes, s_add: bytes) -> bytes:
    """The student's bytes for a teacher alternative. At a side's first token the virtual space
    counts: the teacher's (``t_strip``) is dropped, the student's (``s_add``) added unless the
    alternative starts with a space of its own."""
    b = b[len(t_strip):] if t_strip and b.startswith(t_strip) and len(b) > len(t_strip) else b
    return b if not s_add or b.startswith(b" ") else s_add + b


def fill_row(ids: list[int], lps: list[float], k: int, vocab_size: int) -> tuple[list[int], list[float]]:
    """Pad a row of ``m <= k`` mapped alternatives to ``k``: free slot ``s`` takes the highest id from
    ``V - 1 - s`` down that the row does not hold, with an equal share of the unmapped mass."""
    m = len(ids)
    if m >= k:
        return ids[:k], lps[:k]
    tail = max(1.0 - sum(math.exp(v) for v in lps), TAIL_FLOOR)
    share = math.log(tail / (vocab_size - m))
    taken, extra = set(ids), []
    for slot in range(m, k):
        cand = vocab_size - 1 - slot
        while cand in taken:
            cand -= 1
        taken.add(cand)
        extra.append(cand)
    return ids + extra, lps + [share] * (k - m)


def build_rows(sid, lp, k: int, vocab_size: int, p: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ([A, k] ids, [A, k] float64 log-probs) from [A, K] student ids (-1: unmapped) and their
    log-probs (arrays or CPU tensors): the mapped ones, most likely first (ties in listed order),
    cut to ``k``, then filled (``fill_row``).
    Vectorised: each mapped alternative goes to the slot its rank among the mapped ones gives
    (alternatives listed most likely first, as endpoints and ``topk`` give them, need no sort);
    rows where two alternatives share a student id, or where a mapped id is one a fill would
    take, go through ``fill_row`` one by one. ``p``: ``exp(lp)`` where the caller has it."""
    sid, lp = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in (sid, lp))
    sid, lp = np.asarray(sid, dtype=np.int64), np.minimum(np.asarray(lp, dtype=np.float64), 0.0)
    p = np.exp(lp) if p is None else np.minimum(p, 1.0)  # = exp(lp) of the clamped lp
    A, K = sid.shape
    mapped = sid >= 0
    if K > 1 and not (lp[:, 1:] <= lp[:, :-1]).all():
        order = np.argsort(-np.where(mapped, lp, -math.inf), axis=1, kind="stable")
        sid, lp, p = (np.take_along_axis(x, order, 1) for x in (sid, lp, p))
        mapped = sid >= 0
    rank = mapped.cumsum(1) - 1
    kept = mapped & (rank < k)
    src = np.flatnonzero(kept)  # flat indices: one gather and one scatter per array
    dst = src // K * k + rank.ravel()[src]
    ids = np.broadcast_to(vocab_size - 1 - np.arange(k), (A, k)).copy()  # free slot s takes id V - 1 - s
    ids.ravel()[dst] = sid.ravel()[src]
    tail = np.maximum(1.0 - (p * kept).sum(1), TAIL_FLOOR)
    lps = np.repeat(np.log(tail / (vocab_size - kept.sum(1)))[:, None], k, 1)
    lps.ravel()[dst] = lp.ravel()[src]
    srt = np.sort(np.where(mapped, sid, -1 - np.arange(K)), axis=1)
    clash = (srt[:, 1:] == srt[:, :-1]).any(1)  # a student id twice: merged below
    clash |= (kept & (sid >= vocab_size - k)).any(1)  # where a fill would go
    for r in np.flatnonzero(clash).tolist():  # rare: merge duplicates in probability, fill around
        row: dict[int, float] = {}
        for i, v in zip(sid[r][mapped[r]].tolist(), lp[r][mapped[r]].tolist()):
            row[i] = math.log(math.exp(row[i]) + math.exp(v)) if i in row else v
        ids[r], lps[r] = fill_row(list(row), list(row.values()), k, vocab_size)
    return ids, lps


@dataclass(eq=False)
class Rows:
    """Top-k rows for the student's response tokens: the aligned positions (increasing) and their
    rows, kept as arrays; every other position has no row. ``per_position`` lays them out as the KD
    JSONL field holds them."""

    positions: np.ndarray  # [A] the aligned student positions
    row_ids: np.ndarray  # [A, k]
    row_logprobs: np.ndarray  # [A, k] float64
    n: int  # student positions in all
    listed_mass: float  # teacher probability of the listed alternatives, summed over aligned positions
    mapped_mass: float  # the part of it that maps to student ids

    @property
    def aligned(self) -> int:
        return len(self.positions)

    def per_position(self, n: int | None = None) -> tuple[list, list]:
        """(ids, logprobs) for the first ``n`` positions (default all): each a row (an array view,
        which orjson writes as a list) or None where the position is not aligned."""
        n = self.n if n is None else n
        ids: list = [None] * n
        lps: list = [None] * n
        for q, ri, rl in zip(self.positions.tolist(), self.row_ids, self.row_logprobs):
            if q >= n:
                break
            ids[q], lps[q] = ri, rl
        return ids, lps

    @cached_property
    def ids(self) -> list[list[int] | None]:
        return [None if r is None else r.tolist() for r in self.per_position()[0]]

    @cached_property
    def logprobs(self) -> list[list[float] | None]:
        return [None if r is None else r.tolist() for r in self.per_position()[1]]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Rows):
            return NotImplemented
        return ((self.n, self.listed_mass, self.mapped_mass) == (other.n, other.listed_mass, other.mapped_mass)
                and all(np.array_equal(getattr(self, a), getattr(other, a))
                        for a in ("positions", "row_ids", "row_logprobs")))


# ---- an endpoint's log-probs: the stored (packed) form, checked, aligned ----

def pack_api_logprobs(content) -> dict:
    """An endpoint's per-token list (``[{token, bytes, logprob, top_logprobs: [{token, bytes,
    logprob}]}]``, as OpenAI-compatible endpoints return ``logprobs.content``) -> its packed form::

        {"k": K,
         "vocab": ["Hello", " world", ["\\\\xe2\\\\x80", [226, 128]], ...],
         "token": hex, "logprob": hex, "top_token": hex, "top_logprob": hex, "float": "f4"}

    ``vocab`` lists each distinct (token, bytes) once, in order of first use: the token string
    where its UTF-8 is the bytes, else ``[token, bytes]`` (a token that is part of a character,
    which endpoints render in their own ways). ``token`` ([n]) and ``top_token`` ([n, K], row by
    row) are indices into it, little-endian uint16 (uint32 when it has more than 65,536 entries);
    ``logprob`` ([n]) and ``top_logprob`` ([n, K]) are little-endian floats: float32 (``"float":
    "f4"``) when every value is one, as a server that computes them in float32 (vLLM, SGLang,
    serve-teacher) returns them, else float64 (``"f8"``, also what a form without ``float`` holds).
    All hex. Lossless for those four fields (``unpack_api_logprobs`` gives them back, bit for bit);
    other keys an endpoint may add are not kept. Values are not judged here
    (``parse_api_logprobs`` does); raises AlignError (position = token index) for what the form
    cannot hold: no list of per-token objects, bytes that are not a list of 0..255, a log-prob that
    is not a number, no top_logprobs or K varying.
    """
    if not isinstance(content, list) or not content:
        raise AlignError("'teacher_api_logprobs' must be a non-empty list of per-token objects")
    vocab: list = []
    index: dict = {}  # str, or (token, bytes) for the others -> vocab index
    seen: dict = {}  # token string -> (index, its bytes as given): the common case in one lookup
    K = None
    token, logprob, top_token, top_logprob = [], [], [], []

    def intern(e: dict, j: int, name: str) -> int:
        tok, b = e.get("token"), e.get("bytes")
        hit = seen.get(tok) if tok.__class__ is str else None
        if hit is not None and hit[1] == b:
            return hit[0]
        raw = _bytes_of(e, j, name + "bytes")
        plain = tok.__class__ is str and _utf8(tok) == raw
        key = tok if plain else (tok, raw)
        try:
            i = index.get(key)
        except TypeError:  # a list or an object
            raise AlignError(f"token {j} has a '{name}token' that is not a string: {tok!r:.40}", j) from None
        if i is None:
            i = index[key] = len(vocab)
            vocab.append(tok if plain else [tok, list(raw)])
        if plain:
            seen[tok] = (i, b)
        return i

    for j, e in enumerate(content):
        if e.__class__ is not dict:
            raise AlignError(f"token {j} is not an object", j)
        alts = e.get("top_logprobs")
        if alts.__class__ is not list or not alts:
            raise AlignError(f"token {j} has no 'top_logprobs' list (generate with --logprobs K, K >= 1)", j)
        K = K or len(alts)
        if len(alts) != K:
            raise AlignError(f"token {j} has {len(alts)} top_logprobs but token 0 has {K}: K must not vary", j)
        token.append(intern(e, j, ""))
        logprob.append(_number(e, j, "logprob"))
        for a in alts:
            try:  # the common case inline: a token string met before with the same bytes, a float
                i, b = seen[a["token"]]
                v = a["logprob"]
                if b != a["bytes"] or v.__class__ is not float:
                    raise KeyError
            except (KeyError, TypeError):  # anything else goes through the checks
                if a.__class__ is not dict:
                    raise AlignError(f"token {j} has a top_logprobs entry that is not an object", j) from None
                i, v = intern(a, j, "top_logprobs[]."), _number(a, j, "top_logprobs[].logprob")
            top_token.append(i)
            top_logprob.append(v)
    width = _index_type(len(vocab))
    logprob, top_logprob = np.asarray(logprob, np.float64), np.asarray(top_logprob, np.float64)
    with np.errstate(over="ignore"):  # a log-prob below float32's range: inf, not equal
        exact = all(np.array_equal(x.astype(np.float32), x) for x in (logprob, top_logprob))  # NaN: not equal
    name = "f4" if exact else "f8"
    return {"k": K, "vocab": vocab, "token": _hex(token, width), "logprob": _hex(logprob, _FLOATS[name]),
            "top_token": _hex(top_token, width), "top_logprob": _hex(top_logprob, _FLOATS[name]), "float": name}


def unpack_api_logprobs(packed: dict) -> list[dict]:
    """The endpoint's per-token list back from ``pack_api_logprobs``'s form (to read a record)."""
    _, vocab, token, logprob, top, top_lp = _columns(packed)
    entry = [{"token": e, "bytes": list(e.encode("utf-8"))} if e.__class__ is str else
             {"token": e[0], "bytes": list(e[1])} for e in vocab]
    return [{**entry[t], "logprob": v, "top_logprobs": [{**entry[a], "logprob": x} for a, x in zip(ta, tl)]}
            for t, v, ta, tl in zip(token.tolist(), logprob.tolist(), top.tolist(), top_lp.tolist())]


def _utf8(s: str) -> bytes | None:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None


def _index_type(tokens: int) -> np.dtype:
    return np.dtype("<u2" if tokens <= 1 << 16 else "<u4")


def _hex(values: list, dtype: np.dtype) -> str:
    return np.asarray(values, dtype=dtype).tobytes().hex()


def _number(e: dict, j: int, name: str) -> float:
    v = e.get(name.rsplit(".", 1)[-1])
    if v.__class__ is float:
        return v
    if v.__class__ is not int:  # bool too: JSON's true is no log-probability
        raise AlignError(f"token {j} has '{name}' {v!r}, not a finite number", j)
    return float(v)


def _bytes_of(e: dict, j: int, name: str) -> bytes:
    b = e.get("bytes")
    if not isinstance(b, list):  # empty is allowed: a special token (EOS) spells no text and never aligns
        raise AlignError(f"token {j} has no '{name}' (a list of byte values); the endpoint must "
                         "return token bytes (OpenAI-compatible logprobs do)", j)
    try:
        return bytes(b)
    except (TypeError, ValueError):
        raise AlignError(f"token {j} has '{name}' that are not byte values 0..255: {b[:8]!r}", j) from None


def _unhex(packed: dict, name: str, dtype: np.dtype) -> np.ndarray:
    try:
        raw = bytes.fromhex(packed.get(name))
    except (TypeError, ValueError):
        raise AlignError(f"packed field '{name}' must be a string of hex digits") from None
    if len(raw) % dtype.itemsize:
        raise AlignError(f"packed field '{name}' holds {len(raw)} bytes, not a whole number of "
                         f"{dtype.itemsize}-byte values")
    return np.frombuffer(raw, dtype)


def _columns(packed: dict):
    """(K, vocab, token [n], logprob [n], top_token [n, K], top_logprob [n, K]) of the packed form,
    its shapes and indices checked."""
    K, vocab = packed.get("k"), packed.get("vocab")
    if K.__class__ is not int or K < 1:
        raise AlignError(f"packed field 'k' must be the number of alternatives per token (>= 1), got {K!r:.40}")
    if vocab.__class__ is not list or not vocab:
        raise AlignError("packed field 'vocab' must be a non-empty list of tokens")
    name = packed.get("float", "f8")
    floats = _FLOATS.get(name) if name.__class__ is str else None
    if floats is None:
        raise AlignError(f"packed field 'float' must be \"f4\" or \"f8\" (the log-probs' width), got "
                         f"{packed.get('float')!r:.40}")
    logprob, top_lp = (_unhex(packed, column, floats).astype(np.float64) for column in ("logprob", "top_logprob"))
    n = len(logprob)
    if not n or len(top_lp) != n * K:
        raise AlignError(f"packed fields 'logprob' and 'top_logprob' hold {n} and {len(top_lp)} values: "
                         f"K = {K} alternatives per token (K must not vary), at least one token")
    width = _index_type(len(vocab))
    token, top = _unhex(packed, "token", width), _unhex(packed, "top_token", width)
    if len(token) != n or len(top) != n * K:
        raise AlignError(f"packed fields 'token' and 'top_token' hold {len(token)} and {len(top)} {width.itemsize}-byte "
                         f"indices ({len(vocab)} tokens in 'vocab') for {n} tokens of K = {K}")
    top, top_lp = top.reshape(n, K), top_lp.reshape(n, K)
    bad = (token >= len(vocab)) | (top >= len(vocab)).any(1)
    if bad.any():
        j = int(bad.argmax())
        raise AlignError(f"token {j} refers to a token beyond the {len(vocab)} of 'vocab'", j)
    return K, vocab, token, logprob, top, top_lp


@dataclass
class ApiLogprobs:
    """A record's endpoint log-probs, checked: n teacher tokens with K alternatives each."""

    vocab: list  # the distinct tokens, as in the packed form
    token: np.ndarray  # [n] the chosen tokens (indices into vocab)
    top: np.ndarray  # [n, K] the alternatives (indices into vocab)
    lp: np.ndarray  # [n, K] their log-probs, float64
    p: np.ndarray  # [n, K] their probabilities
    odd: dict[int, bytes] = field(default_factory=dict)  # the vocab entries that are [token, bytes]: their bytes

    def first_use(self, i: int) -> int | None:
        """The first token position that names vocab entry ``i``."""
        at = np.flatnonzero((self.token == i) | (self.top == i).any(1))
        return int(at[0]) if len(at) else None


def parse_api_logprobs(value) -> ApiLogprobs:
    """``teacher_api_logprobs`` in either form (packed, or the endpoint's list, which is packed
    first) -> ApiLogprobs. Checks K, the bytes, every log-probability (finite, <= 0, each token's
    alternatives summing to at most 1); raises AlignError naming the token position. The values
    are checked as arrays, and only bad ones are walked token by token to name the first."""
    if isinstance(value, list):
        value = pack_api_logprobs(value)
    elif not isinstance(value, dict):
        raise AlignError("'teacher_api_logprobs' must be a list of per-token objects or the packed form "
                         "(an object; see pack_api_logprobs)")
    _, vocab, token, logprob, top, top_lp = _columns(value)
    api = ApiLogprobs(vocab, token, top, top_lp, _check_logprobs(logprob, top_lp))
    if set(map(type, vocab)) != {str}:  # [token, bytes] entries (a pass in C where there are none)
        for i, e in enumerate(vocab):
            if e.__class__ is not str:
                api.odd[i] = _entry_bytes(e)
                if api.odd[i] is None:
                    j = api.first_use(i)
                    raise AlignError(f"token {j} has a token that is neither a string nor [token, bytes 0..255]: "
                                     f"{e!r:.40}", j)
    return api


def _entry_bytes(e) -> bytes | None:
    """A vocab entry's bytes, None where it is malformed."""
    if e.__class__ is str:
        return _utf8(e)
    if e.__class__ is list and len(e) == 2 and e[1].__class__ is list:
        try:
            return bytes(e[1])
        except (TypeError, ValueError):
            return None
    return None


def _check_logprobs(logprob: np.ndarray, top_lp: np.ndarray) -> np.ndarray:
    """Raises AlignError at the first bad value; returns ``exp(top_lp)``."""
    with np.errstate(over="ignore", invalid="ignore"):  # max is NaN where a NaN is: not <= 1e-6
        p = np.exp(top_lp)
        ok = (logprob.max() <= 1e-6 and logprob.min() > -math.inf and top_lp.max() <= 1e-6
              and top_lp.min() > -math.inf and (p.sum(1) <= 1 + 1e-3).all())
    if ok:
        return p
    for j in range(len(logprob)):
        _value(logprob[j], j, "logprob")
        for v in top_lp[j]:
            _value(v, j, "top_logprobs[].logprob")
        if p[j].sum() > 1 + 1e-3:
            raise AlignError(f"token {j}'s top_logprobs sum above probability 1: they must be normalised "
                             "log-probabilities", j)
    return p


def _value(v: np.float64, j: int, name: str) -> None:
    v = float(v)
    if not math.isfinite(v):
        raise AlignError(f"token {j} has '{name}' {v!r}, not a finite number", j)
    if v > 1e-6:
        raise AlignError(f"token {j} has positive '{name}' {v}: log-probabilities are <= 0", j)


def _lookup(api: ApiLogprobs, table: TokenTable) -> np.ndarray:
    """[D] ``table``'s numbers of ``api``'s tokens."""
    keys = api.vocab
    if api.odd:  # [token, bytes] entries are keyed by their bytes
        keys = list(keys)
        for i, b in api.odd.items():
            keys[i] = b
    out = table.numbers(keys)
    if (out == -2).any():
        i = int((out == -2).argmax())
        j = api.first_use(i)
        raise AlignError(f"token {j} has a token string that is not text: {keys[i]!r:.40}", j)
    return out


def align_api(api: ApiLogprobs, text: str, student_ids: list[int], vocab: Vocab, k: int) -> Rows:
    """Rows for ``student_ids`` (the student's tokens of ``text``, any trailing EOS) from an endpoint's
    tokens and top alternatives (``parse_api_logprobs``)."""
    raw = text.encode("utf-8")
    met = vocab.met
    number = _lookup(api, met)
    chosen = number[api.token]
    t_starts, t_ends, _ = _layout(b"".join(map(met.pieces.__getitem__, chosen.tolist())), met.lens[chosen], raw,
                                  lambda: [met.pieces[i] for i in chosen.tolist()])
    s_ids = np.array(student_ids, dtype=np.int64)
    pos = np.flatnonzero(vocab.lens[s_ids] >= 0)  # EOS carries no bytes
    s_starts, s_ends, _ = _layout(b"".join(map(vocab.spelled.__getitem__, student_ids)), vocab.lens[s_ids[pos]],
                                  raw, lambda: [vocab.pieces[i] for i in s_ids[pos].tolist()])
    which = _match(s_starts, s_ends, t_starts, t_ends)
    at = np.flatnonzero(which >= 0)  # aligned, as indices into pos
    if not len(at):
        return Rows(at, np.empty((0, k), np.int64), np.empty((0, k)), len(student_ids), 0.0, 0.0)
    rows = which[at]
    sid = met.sid[number[api.top[rows]]]
    if at[0] == 0 and vocab.prefix:  # the student's first token: its virtual space goes in front
        first = [met.pieces[i] for i in number[api.top[rows[0]]].tolist()]
        sid[0] = [vocab.by_bytes.get(_key(b, b"", vocab.prefix), -1) if b else -1 for b in first]
    rows_lp, p = api.lp[rows], api.p[rows]
    row_ids, row_lps = build_rows(sid, rows_lp, k, len(vocab), p)
    return Rows(pos[at], row_ids, row_lps, len(student_ids), float(p.sum()), float((p * (sid >= 0)).sum()))


# ---- a local teacher with another tokenizer: its full distribution, mapped to student ids ----

def id_map(teacher: Vocab, student: Vocab, first_t: bool = False, first_s: bool = False) -> torch.Tensor:
    """[V_teacher] student id for each teacher id, -1 where it is not exactly one student token.

    A teacher with the student's vocabulary maps id to id. Otherwise the bytes decide, with the
    virtual spaces of the teacher's first token (``first_t``) and the student's (``first_s``)
    exchanged (see ``_key``); the teacher's EOS maps to the student's EOS.
    """
    if teacher.names == student.names:
        return torch.arange(len(teacher))
    out = torch.full((len(teacher),), -1, dtype=torch.long)
    for i, b in enumerate(teacher.pieces):
        if b is not None:
            out[i] = student.by_bytes.get(_key(b, teacher.prefix if first_t else b"",
                                               student.prefix if first_s else b""), -1)
    if teacher.eos_id is not None and student.eos_id is not None:
        out[teacher.eos_id] = student.eos_id
    return out


def to_student(logprobs: torch.Tensor, mapping: torch.Tensor, student_size: int) -> torch.Tensor:
    """[n, V_t] teacher log-probs -> [n, V_s] student log-probs (-inf where nothing maps).

    Teacher ids that share a student id are summed in probability; a lone one keeps its value
    bit for bit (max + log(1)), so a same-vocabulary map returns the input unchanged.
    """
    keep = mapping >= 0
    src, idx = logprobs[:, keep], mapping[keep].expand(logprobs.shape[0], -1)
    peak = logprobs.new_full((logprobs.shape[0], student_size), -math.inf).scatter_reduce(1, idx, src, "amax")
    at = peak.gather(1, idx)
    lone = torch.where(at == -math.inf, torch.zeros_like(src), (src - at).exp())  # -inf - -inf is NaN
    mass = logprobs.new_zeros(peak.shape).scatter_add(1, idx, lone)
    return peak + mass.log()


def topk_rows(student_lps: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k of each [n, V_s] row ([n, k] ids and log-probs), filled where fewer than k ids have
    mass; also the mapped mass."""
    top = student_lps.topk(k, dim=-1)
    mapped = float(torch.logsumexp(student_lps.double(), dim=-1).exp().sum())
    sid = torch.where(torch.isneginf(top.values), -1, top.indices)
    ids, lps = build_rows(sid.cpu(), top.values.cpu(), k, student_lps.shape[-1])
    return ids, lps, mapped
