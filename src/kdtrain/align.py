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

Pure functions: no file or model access; callers (``annotate``, ``teacher``) name the file and
line in their errors.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from array import array
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

import torch

TAIL_FLOOR = 1e-7  # the smallest tail mass a filled row keeps (the loss floors its tail the same way)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_LOGPROB = itemgetter("logprob")


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

    def __len__(self) -> int:
        return len(self.pieces)


def _tensor(buf: array) -> torch.Tensor:
    """A 1-d tensor on an ``array`` of int64 or float64 (``torch.tensor`` on a list costs several times more)."""
    dtype = torch.float64 if buf.typecode == "d" else torch.int64
    return torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.zeros(0, dtype=dtype)


def _ints(values) -> torch.Tensor:
    return _tensor(array("q", list(values)))


def _floats(values) -> torch.Tensor:
    return _tensor(array("d", list(values)))


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


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
    out = Vocab(pieces, by_bytes, tokenizer.eos_token_id, b" " if probe == b" a" else b"", names)
    _CACHE[tokenizer] = out
    return out


def spans(pieces: list[bytes], text: bytes) -> tuple[list[int], list[int], bytes]:
    """(starts, ends, prefix) of ``pieces`` over ``text``; ``prefix`` is a prepended virtual space.

    Raises AlignError (position = first token that leaves the text) when the pieces do not spell it.
    """
    starts, ends, prefix = _spans(pieces, text)
    return starts.tolist(), ends.tolist(), prefix


def _spans(pieces: list[bytes], text: bytes) -> tuple[torch.Tensor, torch.Tensor, bytes]:
    joined = b"".join(pieces)
    prefix = b""
    if joined != text:
        if joined == b" " + text:
            prefix = b" "
        else:
            pos, at = _first_mismatch(pieces, text)
            raise AlignError(f"the tokens do not spell the response text: token {pos} ({pieces[pos]!r}) "
                             f"at byte {at} where the text has {text[at:at + len(pieces[pos])]!r}", pos)
    lens = _ints(map(len, pieces))
    ends = lens.cumsum(0)
    starts = ends - lens
    if prefix:  # a token of the virtual space alone keeps the span [-1, 0); it matches only its twin
        ends = ends - 1
        starts = torch.where(ends == 0, starts - 1, (starts - 1).clamp(min=0))
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
    which = _match(*map(_ints, (s_starts, s_ends, t_starts, t_ends)))
    return [None if i < 0 else i for i in which.tolist()]


def _match(s_starts: torch.Tensor, s_ends: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor) -> torch.Tensor:
    """``match`` on spans as ``_spans`` gives them, -1 for None."""
    keep = (t_ends > t_starts).nonzero().flatten()  # the non-empty teacher spans: their starts increase
    if not len(keep):
        return torch.full_like(s_starts, -1)
    i = keep[torch.searchsorted(t_starts[keep], s_starts).clamp(max=len(keep) - 1)]
    return torch.where((t_starts[i] == s_starts) & (t_ends[i] == s_ends), i, -1)


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


def build_rows(sid: torch.Tensor, lp: torch.Tensor, k: int, vocab_size: int) -> tuple[list[list[int]], list[list]]:
    """Rows from [A, K] student ids (-1: unmapped) and their log-probs: the mapped ones, most likely
    first, cut to ``k``, then filled (``fill_row``). Vectorised; rows where two alternatives share a
    student id, or where a mapped id is one a fill would take, go through ``fill_row`` one by one."""
    if k > sid.shape[1]:  # room for fills beyond the listed alternatives
        sid = torch.cat([sid, sid.new_full((sid.shape[0], k - sid.shape[1]), -1)], 1)
        lp = torch.cat([lp, lp.new_zeros(lp.shape[0], k - lp.shape[1])], 1)
    K = sid.shape[1]
    lp = lp.double().clamp(max=0.0)
    key = torch.where(sid >= 0, lp, torch.full_like(lp, -math.inf))
    order = key.argsort(dim=-1, descending=True, stable=True)
    sid, lp = sid.gather(1, order), lp.gather(1, order)
    srt = torch.where(sid >= 0, sid, -1 - torch.arange(K)).sort(dim=-1).values
    clash = (srt[:, 1:] == srt[:, :-1]).any(-1)  # a student id twice: merged below
    kept, kept_lp = sid[:, :k], lp[:, :k]
    mapped = kept >= 0
    clash |= (mapped & (kept >= vocab_size - kept.shape[1])).any(-1)  # where a fill would go
    m = mapped.sum(-1, keepdim=True)
    tail = (1.0 - (kept_lp.exp() * mapped).sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)
    share = (tail / (vocab_size - m)).log().expand_as(kept_lp)
    ids_list = torch.where(mapped, kept, vocab_size - 1 - torch.arange(kept.shape[1])).tolist()
    lps_list = torch.where(mapped, kept_lp, share).tolist()
    for r in clash.nonzero().flatten().tolist():  # rare: merge duplicates in probability, fill around
        row: dict[int, float] = {}
        for i, v in zip(sid[r].tolist(), lp[r].tolist()):
            if i >= 0:
                row[i] = math.log(math.exp(row[i]) + math.exp(v)) if i in row else v
        ids_list[r], lps_list[r] = fill_row(list(row), list(row.values()), k, vocab_size)
    return ids_list, lps_list


@dataclass
class Rows:
    """Top-k rows for the student's response tokens, None where a position is not aligned."""

    ids: list[list[int] | None]
    logprobs: list[list[float] | None]
    aligned: int  # positions with a row
    listed_mass: float  # teacher probability of the listed alternatives, summed over aligned positions
    mapped_mass: float  # the part of it that maps to student ids


def parse_api_logprobs(entries) -> tuple[list[bytes], list[list[dict]], torch.Tensor]:
    """``teacher_api_logprobs`` -> (token bytes, each token's top_logprobs entries, [n, K] their log-probs).

    Checks the tokens' bytes, every log-probability and K; raises AlignError naming the token
    position. All entries are checked at once, and only bad input is walked entry by entry to name
    the first problem. The alternatives' bytes are read by ``align_api`` where a position aligns.
    """
    try:
        if not isinstance(entries, list) or not entries:
            raise ValueError
        tops = [e["top_logprobs"] for e in entries]
        K = len(tops[0])
        if not K or any(t.__class__ is not list or len(t) != K for t in tops):
            raise ValueError
        pieces = [bytes(b) if (b := e["bytes"]).__class__ is list else None for e in entries]
        lp = _floats(map(_LOGPROB, chain.from_iterable(tops))).view(len(entries), K)
        chosen = _floats(map(_LOGPROB, entries))
        ok = None not in pieces and bool(torch.isfinite(lp).all() and torch.isfinite(chosen).all()
                                         and lp.max() <= 1e-6 and chosen.max() <= 1e-6
                                         and (lp.exp().sum(-1) <= 1 + 1e-3).all())
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError):
        ok = False
    if not ok:
        _check_entries(entries)
        raise AlignError("'teacher_api_logprobs' holds values of the wrong type")
    return pieces, tops, lp


def _check_entries(entries) -> None:
    """Walk the entries and raise AlignError for the first problem."""
    if not isinstance(entries, list) or not entries:
        raise AlignError("'teacher_api_logprobs' must be a non-empty list of per-token objects")
    K = None
    for j, e in enumerate(entries):
        if not isinstance(e, dict):
            raise AlignError(f"token {j} is not an object", j)
        _bytes_of(e, j, "bytes")
        _logprob(e, j, "logprob")
        top = e.get("top_logprobs")
        if not isinstance(top, list) or not top:
            raise AlignError(f"token {j} has no 'top_logprobs' list (generate with --logprobs K, K >= 1)", j)
        if K is None:
            K = len(top)
        elif len(top) != K:
            raise AlignError(f"token {j} has {len(top)} top_logprobs but token 0 has {K}: K must not vary", j)
        for a in top:
            if not isinstance(a, dict):
                raise AlignError(f"token {j} has a top_logprobs entry that is not an object", j)
            _bytes_of(a, j, "top_logprobs[].bytes")
        if sum(math.exp(_logprob(a, j, "top_logprobs[].logprob")) for a in top) > 1 + 1e-3:
            raise AlignError(f"token {j}'s top_logprobs sum above probability 1: they must be normalised "
                             "log-probabilities", j)


def _bytes_of(e: dict, j: int, name: str) -> bytes:
    b = e.get("bytes")
    if not isinstance(b, list):  # empty is allowed: a special token (EOS) spells no text and never aligns
        raise AlignError(f"token {j} has no '{name}' (a list of byte values); the endpoint must "
                         "return token bytes (OpenAI-compatible logprobs do)", j)
    try:
        return bytes(b)
    except (TypeError, ValueError):
        raise AlignError(f"token {j} has '{name}' that are not byte values 0..255: {b[:8]!r}", j) from None


def _logprob(e: dict, j: int, name: str) -> float:
    v = e.get("logprob")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AlignError(f"token {j} has '{name}' {v!r}, not a finite number", j)
    if v > 1e-6:
        raise AlignError(f"token {j} has positive '{name}' {v}: log-probabilities are <= 0", j)
    return float(v)


def align_api(pieces: list[bytes], tops: list[list[dict]], lp: torch.Tensor, text: str,
              student_ids: list[int], vocab: Vocab, k: int) -> Rows:
    """Rows for ``student_ids`` (the student's tokens of ``text``, any trailing EOS) from an endpoint's
    tokens and top alternatives (``parse_api_logprobs``)."""
    raw = text.encode("utf-8")
    t_starts, t_ends, _ = _spans(pieces, raw)
    pos = [p for p, i in enumerate(student_ids) if vocab.pieces[i] is not None]  # EOS carries no bytes
    s_starts, s_ends, _ = _spans([vocab.pieces[student_ids[p]] for p in pos], raw)
    which = _match(s_starts, s_ends, t_starts, t_ends)
    at = (which >= 0).nonzero().flatten()  # aligned, as indices into pos
    ids: list[list[int] | None] = [None] * len(student_ids)
    lps: list[list[float] | None] = [None] * len(student_ids)
    if not len(at):
        return Rows(ids, lps, 0, 0.0, 0.0)
    rows_t = which[at]
    rows = rows_t.tolist()
    get, prefix = vocab.by_bytes.get, vocab.prefix
    try:  # one pass: -2 marks an alternative without a list of bytes
        flat = array("q", [get(bytes(b), -1) if (b := a["bytes"]).__class__ is list else -2
                           for i in rows for a in tops[i]])
    except (KeyError, TypeError, ValueError):
        flat = array("q", [-2])
    if -2 in flat:
        for i in rows:
            for a in tops[i]:
                _bytes_of(a if isinstance(a, dict) else {}, i, "top_logprobs[].bytes")
        raise AlignError("a top_logprobs entry has no list of bytes")
    sid = _tensor(flat).view(len(rows), -1)
    if at[0] == 0:  # the student's first token: its virtual space goes in front
        sid[0] = torch.tensor([get(_key(bytes(a["bytes"]), b"", prefix), -1) if a["bytes"] else -1
                               for a in tops[rows[0]]])
    rows_lp = lp[rows_t]
    p = rows_lp.exp()
    row_ids, row_lps = build_rows(sid, rows_lp, k, len(vocab))
    for q, ri, rl in zip(map(pos.__getitem__, at.tolist()), row_ids, row_lps):
        ids[q], lps[q] = ri, rl
    return Rows(ids, lps, len(rows), float(p.sum()), float((p * (sid >= 0)).sum()))


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


def topk_rows(student_lps: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]], float]:
    """Top-k of each [n, V_s] row, filled where fewer than k ids have mass; also the mapped mass."""
    top = student_lps.topk(k, dim=-1)
    mapped = float(torch.logsumexp(student_lps.double(), dim=-1).exp().sum())
    sid = torch.where(torch.isneginf(top.values), -1, top.indices)
    ids, lps = build_rows(sid.cpu(), top.values.cpu(), k, student_lps.shape[-1])
    return ids, lps, mapped
