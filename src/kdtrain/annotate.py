"""``kdtrain annotate``: turn KD JSONL into ``response_ids`` + ``teacher_topk`` for a student tokenizer.

Two teachers:

* a local Hugging Face causal LM (``--teacher DIR``). Its tokenizer is ``--teacher-tokenizer``,
  else the one saved in DIR, else the student's. It runs on its own tokenization of prompt and
  response (``teacher_text`` + its EOS, cut to ``max_len`` by the training policy); its full
  distribution ``log_softmax(logits / temperature)`` is mapped onto student ids and the top k
  are kept at aligned positions (``align.py``). A teacher with the student's vocabulary aligns
  every position id for id: its rows are the plain same-vocabulary top-k.
* an endpoint's log-probs (no ``--teacher``): each record's ``teacher_api_logprobs`` (written by
  ``kdtrain gen-data --logprobs K``) is aligned to the student's tokens. Either form is read: the
  packed one gen-data writes (``align.pack_api_logprobs``) or the endpoint's own list of
  per-token objects (older files), with the same rows from both. Rows are K wide (or ``--k``
  when smaller). The endpoint's log-probs are stored as given; ``--temperature`` records the
  temperature they were captured at.

Rows of positions that are not aligned are ``null``: no ``kl_div`` there, ``ce_teacher`` as usual.
Coverage is printed: the fraction of response positions aligned and the fraction of the
teacher's probability at those positions that maps to student ids (of the listed top-K mass
for an endpoint, of the whole distribution for a local teacher).

Resumable: output line ``i`` belongs to input record ``i``. After a kill, rerunning the same
command keeps every complete output line, drops a torn last line and continues with the next
record. The header line records what the rows depend on — the input file, the student
tokenizer and the teacher (content hashes), the teacher's tokenizer, k, the temperature and
``max_len`` — and a rerun that differs in any of them is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch

from . import align
from .data import DataError, JsonRecord, _truncate, iter_jsonl, parse_record
from .teacher import CrossTeacher, _has_tokenizer, load_teacher_model, resolve_device
from .tokenizer import load_tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEADER_NAMES = {"source": "teacher source", "input": "input file", "tokenizer": "student tokenizer",
                "teacher": "teacher weights", "teacher_tokenizer": "teacher tokenizer", "k": "--k",
                "temperature": "--temperature", "max_len": "--max-len", "format": "format"}


@dataclass
class Report:
    written: int  # records annotated by this call
    positions: int = 0  # response positions of those records
    aligned: int = 0  # positions with a top-k row
    teacher_mass: float = 0.0  # teacher probability at aligned positions (listed or whole)
    mapped_mass: float = 0.0  # the part of it on student ids

    def __str__(self) -> str:
        cov = self.aligned / max(self.positions, 1)
        mass = self.mapped_mass / self.teacher_mass if self.teacher_mass else 0.0
        return (f"annotated {self.written} records: {self.aligned}/{self.positions} response positions aligned "
                f"({cov:.1%}), {mass:.1%} of the teacher's probability there mapped to student tokens")


def _hash_files(files) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_hash(path) -> str:
    """Content hash of a tokenizer directory's files."""
    return _hash_files([f for f in Path(path).iterdir() if f.is_file()])


def weights_hash(path) -> str:
    """Content hash of a checkpoint's config and weight files (not its folder name)."""
    path = Path(path)
    files = [f for f in path.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json")]
    return _hash_files(files)


def _completed(path: Path, header: dict) -> int:
    """Keep the complete records already in ``path`` (dropping a torn tail); return their count."""
    if not path.exists():
        path.write_text(json.dumps({"__header__": header}) + "\n", encoding="utf-8")
        return 0
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]  # everything up to the last newline is whole
    try:
        lines = keep.decode("utf-8").split("\n")[:-1]  # not splitlines: orjson writes U+2028, U+0085 raw
        old = json.loads(lines[0]).get("__header__") if lines else None
    except (ValueError, RecursionError, AttributeError):  # not UTF-8, not JSON (or too deep, too long a number), not an object
        old = None
    if not isinstance(old, dict):
        raise DataError(f"{path} exists but has no annotate header line; remove it or choose another output path.")
    if old != header:
        diff = [f"{HEADER_NAMES.get(key, key)} ({_short(old.get(key))} there, {_short(header.get(key))} now)"
                for key in sorted(set(old) | set(header)) if old.get(key) != header.get(key)]
        raise DataError(f"{path} was written by another annotate command; it differs in " + ", ".join(diff) +
                        ". Resume with the same input, tokenizers, teacher and options, or write to another path.")
    if len(keep) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return len(lines) - 1


def _short(v) -> str:
    return f"sha256 {v[:12]}…" if isinstance(v, str) and len(v) == 64 else repr(v)


def _student_rows(rec: dict, tok, vocab: int, path, line_no: int, max_len: int, encode=None):
    """(prompt ids cut to ``max_len``, response ids + EOS, response tokens kept). ``encode``
    (``align.line_encoder``) gives the tokenizer's ids of ``teacher_text`` at less CPU."""
    plain = {key: v for key, v in rec.items() if key not in ("response_ids", "teacher_topk")}
    text = plain.get("teacher_text")
    if encode is not None and isinstance(text, str) and text.strip() and align._utf8(text) is not None:
        plain["response_ids"] = encode(text) + [tok.eos_token_id]  # as parse_record would tokenize it
    sample, _, _ = parse_record(plain, tok, vocab, path, line_no)
    prompt, n = _truncate(sample.prompt_ids, sample.response_ids, max_len)  # the training policy
    return prompt, sample.response_ids, n


def _api_rows(rec: dict, tok, vocab, path, line_no: int, max_len: int, k: int | None, rep: Report):
    where = f"(file {path}, line {line_no}"
    if rec.get("teacher_api_logprobs") is None:
        raise DataError(f"record has no 'teacher_api_logprobs' {where}): generate with `kdtrain gen-data "
                        "--logprobs K`, or pass --teacher DIR to annotate with a local teacher.")
    _, response, n = _student_rows(rec, tok, len(vocab), path, line_no, max_len, vocab.encode)
    try:
        api = align.parse_api_logprobs(rec["teacher_api_logprobs"])
        K = api.top.shape[1]
        rows = align.align_api(api, rec["teacher_text"], response, vocab, min(k or K, K))
    except align.AlignError as e:
        at = f", teacher_api_logprobs position {e.position}" if e.position is not None else ""
        raise DataError(f"field 'teacher_api_logprobs': {e} {where}{at}).") from None
    rep.positions += n
    rep.aligned += int((rows.positions < n).sum())
    rep.teacher_mass += rows.listed_mass
    rep.mapped_mass += rows.mapped_mass
    return response[:n], *rows.per_position(n), K


def _write(out, lines: list[str]) -> None:
    out.write("".join(lines))
    out.flush()
    os.fsync(out.fileno())


@torch.no_grad()
def annotate(input_path, output_path, teacher_path=None, tokenizer_path=None, k: int | None = None,
             temperature: float = 1.0, batch_size: int = 8, max_len: int = 4096, device: str = "auto",
             teacher_tokenizer=None) -> Report:
    """Annotate ``input_path`` into ``output_path`` (see the module docstring); returns what was done now."""
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if (k is not None and k < 1) or not 0 < temperature < math.inf or batch_size < 1 or max_len < 2:
        raise DataError("annotate: --k and --batch-size must be >= 1, --temperature a finite number > 0, "
                        "--max-len >= 2.")
    if tokenizer_path is None:
        raise DataError("annotate: --tokenizer (the student's tokenizer directory) is required.")
    if not input_path.is_file():
        raise DataError(f"annotate: input file {input_path} does not exist.")
    dev = resolve_device(device)
    tok = load_tokenizer(tokenizer_path, key="--tokenizer")
    s_vocab = align.vocab_bytes(tok)
    records = iter_jsonl(input_path)  # decoded one batch at a time: decoded log-probs take ~100x their text
    header = {"format": "kd-jsonl-v1", "input": _hash_files([input_path]), "tokenizer": tokenizer_hash(tokenizer_path),
              "temperature": temperature, "max_len": max_len}
    teacher = None
    if teacher_path is not None:
        teacher_path = Path(teacher_path)
        if teacher_tokenizer is None:
            teacher_tokenizer = teacher_path if _has_tokenizer(teacher_path) else tokenizer_path
        k = k or 64
        if k > len(s_vocab):
            raise DataError(f"annotate: --k {k} exceeds the student's vocabulary size {len(s_vocab)}.")
        header.update(source="local teacher", teacher=weights_hash(teacher_path) if teacher_path.is_dir() else None,
                      teacher_tokenizer=tokenizer_hash(teacher_tokenizer), k=k)
        done = _completed(output_path, header)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        teacher = CrossTeacher(load_teacher_model(teacher_path, dev, dtype, key="--teacher"),
                               load_tokenizer(teacher_tokenizer, key="--teacher-tokenizer"), tok,
                               temperature)
    else:
        header.update(source="teacher_api_logprobs", k=k)
        done = _completed(output_path, header)
    rep, todo = Report(len(records) - done), itertools.islice(records, done, None)
    K_seen: list = []  # (K, line) of the first endpoint record
    try:
        with open(output_path, "a", encoding="utf-8") as out, \
                tqdm(total=len(records), initial=done, unit="rec", file=sys.stderr) as bar:
            while chunk := list(itertools.islice(todo, batch_size)):
                if teacher is None:
                    lines = [_api_line(rec, tok, s_vocab, input_path, line_no, max_len, k, temperature, rep, K_seen)
                             for line_no, rec in chunk]
                else:
                    lines = _local_lines(chunk, teacher, tok, input_path, max_len, k, temperature, rep)
                _write(out, lines)
                bar.update(len(chunk))
    except DataError:
        if done == 0 and output_path.read_bytes().count(b"\n") == 1:  # only the header: leave no file behind
            output_path.unlink()
        raise
    print(rep, file=sys.stderr)
    return rep


def _api_line(rec, tok, vocab, path, line_no: int, max_len: int, k, temperature: float, rep: Report,
              K_seen: list) -> str:
    resp, ids, lps, K = _api_rows(rec, tok, vocab, path, line_no, max_len, k, rep)
    if K_seen and K != K_seen[0]:
        raise DataError(f"field 'teacher_api_logprobs' has {K} top_logprobs per token (file {path}, line {line_no}) "
                        f"but {K_seen[0]} at line {K_seen[1]}: K must not vary.")
    K_seen[:] = K_seen or [K, line_no]
    return _line(rec, resp, ids, lps, temperature)


def _local_lines(chunk, teacher: CrossTeacher, tok, path, max_len: int, k: int, temperature: float,
                 rep: Report) -> list[str]:
    t_rows = [_student_rows(rec, teacher.tok, len(teacher.t_vocab), path, n, max_len) for n, rec in chunk]
    s_rows = [_student_rows(rec, tok, len(teacher.s_vocab), path, n, max_len) for n, rec in chunk]
    t_lps = teacher.logprobs([(p, r[:n]) for p, r, n in t_rows])
    lines = []
    for (line_no, rec), (_, t_resp, nt), (_, s_resp, ns), t_lp in zip(chunk, t_rows, s_rows, t_lps):
        try:
            ids, lps, aligned, total, mapped = teacher.rows(rec["teacher_text"], t_resp, nt, t_lp, s_resp, ns, k)
        except align.AlignError as e:
            raise DataError(f"field 'teacher_text': {e} (file {path}, line {line_no}); a tokenizer that cannot "
                            "spell the text byte for byte cannot be aligned.") from None
        bad = next((j for j, row in enumerate(lps) if row is not None and not np.isfinite(row).all()), None)
        if bad is not None:
            raise DataError(f"the teacher's log-probabilities at response position {bad} are not finite (file {path}, "
                            f"line {line_no}): its logits overflowed; annotate on the CPU (--device cpu, float32) "
                            "or check the teacher's weights.")
        rep.positions, rep.aligned = rep.positions + ns, rep.aligned + aligned
        rep.teacher_mass, rep.mapped_mass = rep.teacher_mass + total, rep.mapped_mass + mapped
        lines.append(_line(rec, s_resp[:ns], ids, lps, temperature))
    return lines


def _line(rec: dict, response: list[int], ids, lps, temperature: float) -> str:
    """The output line: the record with ``response_ids`` and ``teacher_topk``. orjson writes it
    (some 20x faster than json on the rows' float digits, 5x on long strings), except the fields of
    a record that only json could read (``data.JsonRecord``: NaN, huge integers, lone surrogates)
    or nested deeper than orjson writes, which json writes back as they were (``teacher_topk`` then
    goes last). The rows: lists or arrays of ints and finite floats (orjson would write NaN as
    null; ``_local_lines`` checks), or None."""
    rows = {"ids": ids, "logprobs": lps, "temperature": temperature}
    if not isinstance(rec, JsonRecord):
        try:
            return orjson.dumps({**rec, "response_ids": response, "teacher_topk": rows},
                                option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE).decode()
        except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
            pass
    head = json.dumps({**{key: v for key, v in rec.items() if key != "teacher_topk"}, "response_ids": response})
    return f'{head[:-1]}, "teacher_topk": {orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY).decode()}}}\n'
