"""KD JSONL v1: parse and validate, tokenize (prompt masked, EOS appended), pad into batches.

Tokenization. A row is ``[BOS] + prompt + response`` where ``response`` is ``teacher_text`` + EOS
(or the record's ``response_ids`` when it has them: the top-k rows align to those). Prompt and
response are tokenized separately, so their boundary is a token boundary. ``messages`` are
rendered with the tokenizer's chat template when it has one, else as ``role: content`` lines.

Labels are stored shifted: ``labels[t]`` is the token position ``t`` must predict, -100 where
nothing is learnt (BOS, prompt, padding). Top-k row ``j`` of a record is the teacher's
distribution for response token ``j`` and lands at the same position as its label.

Truncation to the sequence length ``L``: the prompt keeps BOS and its last tokens (at least
``L // 2`` of it, or all of it when shorter); the response is then cut at the end to fit,
with its top-k rows. A truncated response loses its EOS.

Padding is on the right with the tokenizer's pad id; padded positions carry label -100.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch

IGNORE = -100


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@dataclass
class Sample:
    prompt_ids: list[int]  # BOS + prompt
    response_ids: list[int]  # teacher_text + EOS
    topk_ids: torch.Tensor | None = None  # [len(response_ids), k] int32; a row of -1 where the record has none
    topk_logprobs: torch.Tensor | None = None  # [len(response_ids), k] float32
    reference_ids: list[int] | None = None  # reference + EOS


@dataclass
class Dataset:
    samples: list[Sample]
    fingerprint: str  # sha256 over the shard contents, for refusing a resume on other data
    k: int = 0  # top-k width; 0 when no record carries teacher_topk
    topk_temperature: float | None = None  # capture temperature of the stored log-probs

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_topk(self) -> int:
        return sum(s.topk_ids is not None for s in self.samples)

    @property
    def n_reference(self) -> int:
        return sum(s.reference_ids is not None for s in self.samples)


def _where(path, line: int) -> str:
    return f"(file {path}, line {line})"


def _unicode(v: str, key: str, path, line: int) -> str:
    """JSON may spell an unpaired surrogate (an escaped ud800): not text, and no tokenizer takes it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"field '{key}' holds an unpaired surrogate {v[e.start]!r} at character {e.start} "
                        f"{_where(path, line)}: it is not text; fix the writer's escaping.") from None
    return v


def _nonempty_str(rec: dict, key: str, path, line: int, required: bool) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"missing field '{key}' {_where(path, line)}: every record needs a non-empty '{key}'.")
        return None
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"field '{key}' must be a non-empty string, got {v!r:.80} {_where(path, line)}.")
    return _unicode(v, key, path, line)


# Texts longer than CHARS_PER_TOKEN characters per needed token are tokenized in growing pieces, so
# a 50 MB teacher_text costs what its kept tokens cost (an ordinary token spans far fewer
# characters; a text whose tokens are longer only makes the next, 4x larger piece run).
CHARS_PER_TOKEN = 16
BOUNDARY = 16  # tokens next to a cut that may differ from the whole text's tokenization


def _encode(tokenizer, text: str, limit: int | None, keep: str = "head") -> tuple[list[int], bool]:
    """(ids, cut): the text's token ids, or, when it has more than ``limit``, ``limit`` of them
    from the ``head`` or the ``tail`` (then ``cut`` is True). Ids away from the cut equal those of
    the whole text: tokenizers split on whitespace first, so a cut changes only the pieces next to it."""
    n = CHARS_PER_TOKEN * (limit or 0)
    while limit is not None and n < len(text):
        ids = tokenizer.encode(text[:n] if keep == "head" else text[-n:], add_special_tokens=False)
        if len(ids) >= limit + BOUNDARY:
            return (ids[:limit] if keep == "head" else ids[-limit:]), True
        n *= 4
    return tokenizer.encode(text, add_special_tokens=False), False


def _render_prompt(rec: dict, tokenizer, path, line: int, limit: int | None = None) -> list[int]:
    if "messages" in rec and rec["messages"] is not None and "prompt" not in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise DataError(f"field 'messages' must be a non-empty list of {{role, content}} strings {_where(path, line)}.")
        for i, m in enumerate(msgs):
            _unicode(m["role"], f"messages[{i}].role", path, line)
            _unicode(m["content"], f"messages[{i}].content", path, line)
        if getattr(tokenizer, "chat_template", None):
            try:
                ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # jinja2's TemplateError, or what a template raises for a role it rejects
                raise DataError(f"field 'messages': the tokenizer's chat template rejected them ({type(e).__name__}: "
                                f"{e}) {_where(path, line)}; use the roles it supports.") from None
            if isinstance(ids, dict):  # some tokenizer versions return a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
    else:
        text = _nonempty_str(rec, "prompt", path, line, required=True)
    return [tokenizer.bos_token_id] + _encode(tokenizer, text, limit, keep="tail")[0]  # truncation keeps the end


def _check_ids(ids, vocab: int, field: str, path, line: int) -> list[int]:
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"field '{field}' must be a non-empty list of integers {_where(path, line)}.")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise DataError(f"field '{field}' has id {bad[0]} outside the vocabulary [0, {vocab}) {_where(path, line)}.")
    return ids


def _parse_topk(rec: dict, n: int, vocab: int, path, line: int):
    tk = rec["teacher_topk"]
    if not isinstance(tk, dict) or "ids" not in tk or "logprobs" not in tk:
        raise DataError(f"field 'teacher_topk' must be {{ids, logprobs, temperature}} {_where(path, line)}.")
    ids, lps = tk["ids"], tk["logprobs"]
    temp = tk.get("temperature", 1.0)
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not 0 < temp < math.inf:
        raise DataError(f"field 'teacher_topk.temperature' must be a positive finite number, got {temp!r} "
                        f"{_where(path, line)}.")
    if not isinstance(ids, list) or not isinstance(lps, list):
        raise DataError(f"fields 'teacher_topk.ids' and '.logprobs' must be lists of rows {_where(path, line)}.")
    for name, rows in (("ids", ids), ("logprobs", lps)):
        if len(rows) != n:
            raise DataError(f"field 'teacher_topk.{name}' has {len(rows)} rows but 'response_ids' has {n} tokens "
                            f"{_where(path, line)}: give one row per response token.")
    # A null row (in both lists) marks a position without a teacher row: kl_div skips it.
    present = [j for j, (r_i, r_l) in enumerate(zip(ids, lps)) if r_i is not None or r_l is not None]
    for j in present:
        if ids[j] is None or lps[j] is None:
            raise DataError(f"teacher_topk row {j} is null in '{'ids' if ids[j] is None else 'logprobs'}' only "
                            f"{_where(path, line)}: a position without a row is null in both 'ids' and 'logprobs'.")
    if not present:
        return None, None, float(temp), 0
    k = len(ids[present[0]]) if isinstance(ids[present[0]], list) else 0
    if k == 0:
        raise DataError(f"field 'teacher_topk.ids' rows must be non-empty lists or null {_where(path, line)}.")
    ids_t, lps_t = _topk_tensors([ids[j] for j in present], [lps[j] for j in present], len(present), k, vocab)
    if ids_t is None:  # something is off: the row-by-row check names the first problem
        _check_topk_rows(ids, lps, k, vocab, path, line)
        raise DataError(f"field 'teacher_topk' holds values of the wrong type {_where(path, line)}.")
    if len(present) < n:
        rows = torch.tensor(present)
        ids_t = torch.full((n, k), -1, dtype=torch.int32).index_copy_(0, rows, ids_t)
        lps_t = torch.zeros(n, k).index_copy_(0, rows, lps_t)
    return ids_t, lps_t.clamp(max=0.0), float(temp), k


def _topk_tensors(ids, lps, n: int, k: int, vocab: int):
    """All rows checked at once: ([n, k] int32 ids, [n, k] float32 log-probs), or (None, None)."""
    try:
        ids_t, lps_t = torch.tensor(ids), torch.tensor(lps, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None, None
    if ids_t.dtype != torch.int64 or ids_t.shape != (n, k) or lps_t.shape != (n, k):
        return None, None
    if any(isinstance(i, bool) for row in ids for i in row) or any(isinstance(v, bool) for row in lps for v in row):
        return None, None
    sorted_ids = ids_t.sort(dim=-1).values
    bad = ((ids_t < 0) | (ids_t >= vocab)).any() or not torch.isfinite(lps_t).all() or (lps_t > 1e-6).any() \
        or (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any() or (lps_t.exp().sum(-1) > 1 + 1e-3).any()
    return (None, None) if bad else (ids_t.to(torch.int32), lps_t.to(torch.float32))


def _check_topk_rows(ids, lps, k: int, vocab: int, path, line: int) -> None:
    for j, (row_i, row_l) in enumerate(zip(ids, lps)):
        if row_i is None and row_l is None:
            continue
        if not isinstance(row_i, list) or not isinstance(row_l, list) or len(row_i) != k or len(row_l) != k:
            got = len(row_i) if isinstance(row_i, list) else row_i
            raise DataError(f"teacher_topk row {j} has {got} ids / "
                            f"{len(row_l) if isinstance(row_l, list) else row_l} logprobs, expected {k} "
                            f"{_where(path, line)}.")
        for i in row_i:
            if isinstance(i, bool) or not isinstance(i, int):
                raise DataError(f"field 'teacher_topk.ids' row {j} has {i!r}, not an integer token id "
                                f"{_where(path, line)}: write ids as integers (5, not 5.0).")
            if not 0 <= i < vocab:
                raise DataError(f"field 'teacher_topk.ids' row {j} has id {i!r} outside the vocabulary [0, {vocab}) "
                                f"{_where(path, line)}.")
        for v in row_l:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"field 'teacher_topk.logprobs' row {j} has non-finite value {v!r} {_where(path, line)}.")
            if v > 1e-6:
                raise DataError(f"field 'teacher_topk.logprobs' row {j} has positive log-probability {v} "
                                f"{_where(path, line)}: store log-probabilities (<= 0), not logits.")
        if len(set(row_i)) != k:
            raise DataError(f"field 'teacher_topk.ids' row {j} repeats a token id {_where(path, line)}.")
        if sum(math.exp(v) for v in row_l) > 1 + 1e-3:
            raise DataError(f"field 'teacher_topk.logprobs' row {j} has probabilities summing above 1 "
                            f"{_where(path, line)}: store normalised log-probabilities.")


def _with_eos(tokenizer, text: str, limit: int | None) -> list[int]:
    ids, cut = _encode(tokenizer, text, limit)
    return ids if cut else ids + [tokenizer.eos_token_id]  # a cut text has no end (as truncation drops EOS)


def parse_record(rec, tokenizer, vocab: int, path, line: int, max_len: int | None = None):
    """One JSON object -> (Sample, k, capture temperature); raises DataError naming file/line/field.

    ``max_len`` (the longest sequence that will be trained on): texts are tokenized only as far as
    that many tokens reach, so a huge record costs no more than a long one.
    """
    if not isinstance(rec, dict):
        raise DataError(f"line is not a JSON object {_where(path, line)}.")
    if "__header__" in rec:
        raise DataError(f"a '__header__' line is allowed only as the first line of a file {_where(path, line)}.")
    prompt_ids = _render_prompt(rec, tokenizer, path, line, max_len)
    teacher_text = _nonempty_str(rec, "teacher_text", path, line, required=True)
    if rec.get("response_ids") is not None:
        response_ids = _check_ids(rec["response_ids"], vocab, "response_ids", path, line)
    else:
        response_ids = _with_eos(tokenizer, teacher_text, max_len)
    topk_ids = topk_lps = temp = None
    k = 0
    if rec.get("teacher_topk") is not None:
        if rec.get("response_ids") is None:
            raise DataError(f"field 'teacher_topk' needs 'response_ids', the token ids its rows align to "
                            f"{_where(path, line)}.")
        topk_ids, topk_lps, temp, k = _parse_topk(rec, len(response_ids), vocab, path, line)
    reference = _nonempty_str(rec, "reference", path, line, required=False)
    ref_ids = None
    if reference is not None:
        ref_ids = _with_eos(tokenizer, reference, max_len)
    return Sample(prompt_ids, response_ids, topk_ids, topk_lps, ref_ids), k, temp


LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_jsonl(path: Path, digest=None) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a KD JSONL file, header skipped; see
    ``iter_jsonl``."""
    return list(iter_jsonl(path, digest))


def iter_jsonl(path: Path, digest=None):
    """(line number, record) for every non-blank line of a KD JSONL file, header skipped, each
    record decoded only when it is reached (a file's records may take far more memory decoded).

    Lines end at "\\n", "\\r\\n" or a lone "\\r" (JSON strings hold neither raw), not at what
    str.splitlines() also breaks on, U+2028/U+2029/U+0085, which JSON allows raw inside strings
    (any writer with ensure_ascii=False emits them). ``digest`` (a hashlib object) is fed the
    file's bytes.
    """
    if not path.is_file():
        raise DataError(f"data shard {path} does not exist (io.train_shards / io.val_shards).")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"data shard {path} cannot be read ({e.strerror}).") from None
    if digest is not None:
        digest.update(raw)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark some editors write is not data
    except UnicodeDecodeError as e:
        before = LINE_BREAK.split(raw[: e.start].decode("utf-8", "replace"))
        raise DataError(f"invalid UTF-8 {_where(path, len(before))}: byte {raw[e.start]:#04x} at column "
                        f"{len(before[-1]) + 1}; save the file as UTF-8.") from None
    return JsonlRecords(path, LINE_BREAK.split(text))


class JsonlRecords:
    """A KD JSONL file's records, each decoded when the iteration reaches it; ``len`` counts them
    without decoding (non-blank lines, less a header on line 1)."""

    def __init__(self, path: Path, lines: list[str]):
        self.path, self.lines = path, lines
        self.header = bool(lines) and bool(lines[0].strip()) and self._decode(1, lines[0]) is HEADER
        self.n = sum(1 for line in lines if line.strip()) - self.header

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start = 1 + self.header  # the header is skipped, not decoded again
        for line_no, line in enumerate(self.lines[start - 1:], start=start):
            if line.strip():
                yield line_no, self._decode(line_no, line)

    def _decode(self, line_no: int, line: str):
        """The record on a line (any JSON value: the caller checks it), or HEADER. orjson decodes
        (several times faster on the numbers of top-k rows); json decodes what orjson refuses (NaN,
        Infinity, lone surrogates, deep nesting) or would change (an integer beyond 64 bits, which
        orjson reads as a float), into a ``JsonRecord``, or names the error."""
        try:
            rec = orjson.loads(line)
            exact = not (rec.__class__ is dict and _wide_int(rec))
        except orjson.JSONDecodeError:
            exact = False
        if not exact:
            rec = self._decode_json(line_no, line)
            rec = JsonRecord(rec) if isinstance(rec, dict) else rec
        return HEADER if line_no == 1 and isinstance(rec, dict) and "__header__" in rec else rec

    def _decode_json(self, line_no: int, line: str):
        """What orjson refuses (NaN literals, lone surrogates, deep nesting, malformed JSON, named
        here with json's message) or reads otherwise (integers beyond 64 bits)."""
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            hint = " The line holds NUL characters: the file looks like UTF-16; save it as UTF-8." if "\0" in line else ""
            raise DataError(f"malformed JSON {_where(self.path, line_no)}: {e.msg} at column {e.colno}.{hint}") from None
        except RecursionError:
            raise DataError(f"malformed record {_where(self.path, line_no)}: nested too deeply to be KD "
                            "JSONL.") from None
        except ValueError:  # an integer literal past Python's 4300-digit conversion limit
            raise DataError(f"malformed record {_where(self.path, line_no)}: a number with more digits than "
                            "Python converts (4300); no KD JSONL field holds one.") from None


HEADER = object()  # what JsonlRecords._decode returns for a header line


class JsonRecord(dict):
    """A record that json decoded where orjson would not (see ``JsonlRecords._decode``): one to write
    back with json, which keeps its NaN, huge integers and lone surrogates as they were."""


def _wide_int(rec: dict) -> bool:
    """Whether the record holds a float as large as an integer beyond 64 bits, as orjson reads one
    (a float literal that large sends the record to json too, which reads it the same). Not looked
    at, for their size: ``teacher_topk`` (its checks refuse a float where an id belongs, and a
    log-prob that large) and the packed form's ``vocab`` (a float is no byte value)."""
    def wide(v) -> bool:
        if v.__class__ is float:
            return abs(v) >= 2.0**63
        if v.__class__ is list:
            return any(map(wide, v))
        return v.__class__ is dict and any(map(wide, v.values()))

    api = rec.get("teacher_api_logprobs")
    if api.__class__ is dict and "vocab" in api:
        api = {key: v for key, v in api.items() if key != "vocab"}
    return wide(api) or any(wide(v) for key, v in rec.items() if key not in ("teacher_topk", "teacher_api_logprobs"))


def load_dataset(paths: list[str | Path], tokenizer, vocab_size: int, max_len: int | None = None) -> Dataset:
    """Read and validate every record of every shard before anything trains on them; texts are
    tokenized as far as ``max_len`` tokens (the longest training sequence) reach."""
    if not paths:
        raise DataError("no data shards given: set io.train_shards to one or more KD JSONL files.")
    samples: list[Sample] = []
    h = hashlib.sha256()
    k_seen: tuple[int, str] | None = None
    temp_seen: tuple[float, str] | None = None
    for path in paths:
        path = Path(path)
        for line_no, rec in read_jsonl(path, h):
            sample, k, temp = parse_record(rec, tokenizer, vocab_size, path, line_no, max_len)
            if k:
                if k_seen and k != k_seen[0]:
                    raise DataError(f"teacher_topk has k={k} {_where(path, line_no)} but k={k_seen[0]} at "
                                    f"{k_seen[1]}: k must not vary inside a dataset.")
                if temp_seen and temp != temp_seen[0]:
                    raise DataError(f"teacher_topk.temperature is {temp} {_where(path, line_no)} but {temp_seen[0]} "
                                    f"at {temp_seen[1]}: the capture temperature must not vary inside a dataset.")
                k_seen, temp_seen = (k, f"{path}:{line_no}"), (temp, f"{path}:{line_no}")
            samples.append(sample)
    if not samples:
        raise DataError(f"the dataset {', '.join(map(str, paths))} has no records: add KD JSONL lines.")
    return Dataset(samples, h.hexdigest(), k_seen[0] if k_seen else 0, temp_seen[0] if temp_seen else None)


def _truncate(prompt: list[int], target: list[int], L: int) -> tuple[list[int], int]:
    """Apply the documented truncation policy; returns (prompt, number of target tokens kept)."""
    if len(prompt) + len(target) <= L:
        return prompt, len(target)
    keep_p = min(len(prompt), max(L // 2, L - len(target)))
    if keep_p < len(prompt):
        prompt = prompt[:1] + prompt[len(prompt) - keep_p + 1:]
    return prompt, L - len(prompt)


def collate(samples: list[Sample], seq_len: int, pad_id: int, k: int, with_reference: bool) -> dict:
    """Pad a micro-batch into tensors; rows are padded to the longest row, at most ``seq_len``."""
    rows, labels, spans = [], [], []
    for s in samples:
        prompt, n = _truncate(s.prompt_ids, s.response_ids, seq_len)
        seq = prompt + s.response_ids[:n]
        lab = [IGNORE] * len(seq)
        P = len(prompt)
        lab[P - 1:P - 1 + n] = s.response_ids[:n]
        rows.append(seq)
        labels.append(lab)
        spans.append((P - 1, n))
    batch = _pad(rows, labels, pad_id)
    if k:
        B, S = batch["input_ids"].shape
        ids = torch.zeros(B, S, k, dtype=torch.long)
        lps = torch.zeros(B, S, k, dtype=torch.float32)
        mask = torch.zeros(B, S, dtype=torch.bool)
        for i, (s, (start, n)) in enumerate(zip(samples, spans)):
            if s.topk_ids is not None:
                rows = torch.as_tensor(s.topk_ids[:n])
                ids[i, start:start + n] = rows.clamp(min=0)
                lps[i, start:start + n] = torch.as_tensor(s.topk_logprobs[:n])
                mask[i, start:start + n] = rows[:, 0] >= 0  # False at null rows
        batch.update(topk_ids=ids, topk_logprobs=lps, topk_mask=mask)
    if with_reference:
        ref_rows, ref_labels = [], []
        for s in samples:
            if s.reference_ids is None:
                continue
            prompt, n = _truncate(s.prompt_ids, s.reference_ids, seq_len)
            seq = prompt + s.reference_ids[:n]
            lab = [IGNORE] * len(seq)
            lab[len(prompt) - 1:len(prompt) - 1 + n] = s.reference_ids[:n]
            ref_rows.append(seq)
            ref_labels.append(lab)
        if ref_rows:
            ref = _pad(ref_rows, ref_labels, pad_id)
            batch["ref_input_ids"], batch["ref_labels"] = ref["input_ids"], ref["labels"]
    return batch


def _pad(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), S), IGNORE, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
    return {"input_ids": ids, "labels": lab}


class Sampler:
    """An endless, seeded stream of sample indices: epoch ``e`` is a fresh permutation.

    Its whole state is the stream position, so resuming needs one integer, and each index
    costs O(1) regardless of the dataset size (one permutation is kept per epoch).
    """

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position = n, seed, position
        self._epoch, self._perm = -1, None

    def _index(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[pos]

    def take(self, count: int) -> list[int]:
        out = [self._index(self.position + i) for i in range(count)]
        self.position += count
        return out
