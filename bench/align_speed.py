"""Cross-tokenizer alignment: speed on one CPU core, and coverage on real tokenizers.

Student: the toy's 32,000-piece SentencePiece model (mistral-common ``tokenizer.model.v1``).
Teachers: Tekken (``tekken_240911.json``, a 131,072-token byte-level BPE that mistral-common also
ships), the toy pair's byte-level BPE (``make_toy_pair``) and the student's own tokenizer.

Text: 1,000-student-token slices of the Markdown, reStructuredText and text files installed in
this environment's site-packages (English prose, code, tables; seeded choice).

Speed: ``--records`` endpoint records of about ``--tokens`` student tokens, each with Tekken's
tokens and ``--k`` alternatives per token as ``teacher_api_logprobs``, in the packed form that
gen-data writes (``--form list``: the endpoint's own list of objects, as older files hold), one
thread. Timed, in CPU seconds, as ``kdtrain annotate`` does the work: decoding each record's JSON
line (orjson, as annotate's reader; and freeing the record after), the student's tokenization
(``Vocab.encode``, the ids of ``tokenizer.encode``), ``parse_api_logprobs`` and ``align_api``;
encoding the output line (annotate's ``_line``: the record, its response ids and rows) is timed
apart. The log-probs are float32 numbers (packed as float32), or with ``--float64`` numbers that
are not (packed as float64). ``--distinct`` records are kept as JSON lines and cycled, each decoded
afresh just before it is aligned, as a reader streaming the file does. The student tokenizer's
BPE cache is emptied before each record (outside the timing), so lines of the cycled texts do not
hit it from earlier records; the cache of teacher token strings -> student ids (``Vocab.by_text``)
is kept, as in a run, where it fills once per distinct teacher token (at most the teacher's
vocabulary: well under a second in all). The alternatives are the chosen token and then distinct
Tekken tokens drawn by their frequency in the texts, as a model's top alternatives are mostly
common tokens (uniform draws from Tekken's 131,072 would make most of them long rare tokens that
no student piece spells).

Coverage: the fraction of the student's text positions whose token spans exactly one teacher
token. Mapped mass needs a teacher's distribution: for the toy pair it is measured with its
fitted teacher (``annotate``); for Tekken, whose model is not available offline, the proxy is
the share of Tekken tokens in the text (the teacher's own choices) that are exactly one student
piece, and the share of Tekken's vocabulary that is.

    python bench/align_speed.py [--records 10000 --tokens 1000 --k 20 --distinct 50 --form packed|list
                                 --float64]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizers library: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import orjson  # noqa: E402
import torch  # noqa: E402

from kdtrain import align  # noqa: E402
from kdtrain.annotate import _line  # noqa: E402


def corpus_texts(student, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` slices of installed documentation, each about ``tokens`` student tokens long."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for ext in ("*.md", "*.rst", "*.txt") for p in root.rglob(ext) if p.stat().st_size > 2000)
    text = "\n\n".join(p.read_text("utf-8", errors="ignore") for p in files)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        start, L = rng.randrange(0, len(text) - 40 * tokens), 4 * tokens
        for _ in range(3):  # resize the slice to the wanted number of student tokens
            L = max(1, int(L * tokens / max(1, len(student.encode(text[start: start + L], add_special_tokens=False)))))
        if text[start: start + L].strip():
            out.append(text[start: start + L])
    return out


def tekken():
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tk = Tekkenizer.from_file(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    pieces = [tk.id_to_byte_piece(i) if not tk.is_special(i) else None for i in range(tk.n_words)]
    return tk, pieces


def api_entries(ids: list[int], pieces: list, K: int, pool: list[int], rng: random.Random,
                float64: bool = False) -> list[dict]:
    """An endpoint's teacher_api_logprobs for the tokens ``ids``: each token first, then K - 1 other
    distinct tokens drawn from ``pool``. The log-probs are float32 values, as servers that compute
    in float32 return them (vLLM, SGLang), unless ``float64``."""
    lps = [math.log(0.45 * 0.5 ** j) for j in range(K)]  # normalised: sums below 0.9
    if not float64:
        lps = [float(struct.unpack("<f", struct.pack("<f", v))[0]) for v in lps]
    out = []
    for t in ids:
        alts = [t]
        while len(alts) < K:
            if (a := rng.choice(pool)) not in alts:
                alts.append(a)
        out.append({"token": pieces[t].decode("utf-8", "replace"), "bytes": list(pieces[t]), "logprob": lps[0],
                    "top_logprobs": [{"token": pieces[a].decode("utf-8", "replace"), "bytes": list(pieces[a]),
                                      "logprob": v} for a, v in zip(alts, lps)]})
    return out


def coverage(texts: list[str], student, s_vocab, teacher_pieces_of) -> tuple[float, int]:
    aligned = total = 0
    for text in texts:
        raw = text.encode()
        s_ids = student.encode(text, add_special_tokens=False)
        s = align.spans([s_vocab.pieces[i] or b"" for i in s_ids], raw)
        t = align.spans(teacher_pieces_of(text), raw)
        which = align.match(s[0], s[1], t[0], t[1])
        aligned += sum(w is not None for w in which)
        total += len(which)
    return aligned / total, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--distinct", type=int, default=50)
    ap.add_argument("--form", choices=("packed", "list"), default="packed")
    ap.add_argument("--float64", action="store_true", help="log-probs that are no float32 values (packed as float64)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from kdtrain.tokenizer import build_toy_tokenizer, load_tokenizer
    from kdtrain.toy import make_toy_pair

    tmp = Path(tempfile.mkdtemp())
    build_toy_tokenizer(tmp / "tokenizer")
    student = load_tokenizer(tmp / "tokenizer")
    s_vocab = align.vocab_bytes(student)
    tk, t_pieces = tekken()
    pair = load_tokenizer(make_toy_pair(tmp)["tokenizer"])
    p_vocab = align.vocab_bytes(pair)
    texts = corpus_texts(student, a.distinct, a.tokens)
    mean = sum(len(student.encode(t, add_special_tokens=False)) for t in texts) / len(texts)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, 1 thread; {a.distinct} distinct texts, "
          f"mean {mean:.0f} student tokens")

    # ---- coverage on real text ----
    tek = lambda text: [t_pieces[i] for i in tk.encode(text, bos=False, eos=False)]  # noqa: E731
    for name, fn in (("Tekken 131k (byte-level BPE)", tek),
                     ("toy pair BPE (%d tokens)" % len(p_vocab),
                      lambda text: [p_vocab.pieces[i] for i in pair.encode(text, add_special_tokens=False)]),
                     ("the student's own SentencePiece",
                      lambda text: [s_vocab.pieces[i] for i in student.encode(text, add_special_tokens=False)])):
        cov, n = coverage(texts, student, s_vocab, fn)
        print(f"coverage vs {name:34s} {cov:6.1%} of {n:,} student positions")
    occ = [i for text in texts for i in tk.encode(text, bos=False, eos=False)]
    one = sum(t_pieces[i] in s_vocab.by_bytes for i in occ) / len(occ)
    vocab_share = sum(p is not None and p in s_vocab.by_bytes for p in t_pieces) / sum(p is not None for p in t_pieces)
    print(f"Tekken tokens in the text that are one student piece: {one:.1%}; of Tekken's vocabulary: {vocab_share:.1%}")

    # ---- speed: records x tokens with K alternatives, one core ----
    rng = random.Random(0)
    lines = []
    for text in texts:
        api = api_entries(tk.encode(text, bos=False, eos=False), t_pieces, a.k, occ, rng, a.float64)
        lines.append(json.dumps({"teacher_text": text, "teacher_api_logprobs":
                                 align.pack_api_logprobs(api) if a.form == "packed" else api}))
    bpe = student.backend_tokenizer.model
    eos = student.eos_token_id
    encode = s_vocab.encode or (lambda text: student.encode(text, add_special_tokens=False))  # noqa: E731
    cpu = [0.0] * 5  # CPU seconds (steadier than wall time on a shared machine): JSON, tokenize, parse, align, output
    gc.freeze()  # the bench's own data (tokenizers, corpus) out of the collector's walks, which cost more than aligning
    positions = aligned = 0
    listed = mapped = 0.0
    wall = time.perf_counter()
    for r in range(a.records):
        bpe._clear_cache()
        t0 = time.process_time()
        rec = orjson.loads(lines[r % len(lines)])
        t1 = time.process_time()
        text = rec["teacher_text"]
        ids = encode(text) + [eos]
        t2 = time.process_time()
        api = align.parse_api_logprobs(rec["teacher_api_logprobs"])
        t3 = time.process_time()
        rows = align.align_api(api, text, ids, s_vocab, a.k)
        t4 = time.process_time()
        _line(rec, ids, *rows.per_position(), 1.0)
        t5 = time.process_time()
        positions, aligned = positions + len(ids), aligned + rows.aligned
        listed, mapped = listed + rows.listed_mass, mapped + rows.mapped_mass
        t6 = time.process_time()
        del rec, api, rows  # freeing the decoded record goes with its decoding, not the next parse
        for i, dt in enumerate((t1 - t0 + time.process_time() - t6, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            cpu[i] += dt
    wall = time.perf_counter() - wall
    per_k = [t / a.records * 1e3 for t in cpu]  # seconds per 1,000 records
    total = sum(per_k[:4])
    width = "float64" if a.float64 else "float32"
    print(f"{a.records:,} records ({a.form} form, {width} log-probs, {sum(map(len, lines)) / len(lines) / 1e3:.0f} "
          f"kB a line), "
          f"{positions:,} student tokens, K={a.k}; {aligned / positions:.1%} of positions aligned, "
          f"{mapped / listed:.1%} of the listed mass mapped")
    print(f"on one core, CPU s per 1,000 records: {total:.1f} (JSON decoding {per_k[0]:.1f}, student tokenization "
          f"{per_k[1]:.1f}, parse {per_k[2]:.1f}, align {per_k[3]:.1f}); {total * 10:.0f} s for 10,000; "
          f"{positions / sum(cpu[:4]) / 1e3:.1f}k tokens/s")
    print(f"apart: annotate's output line {per_k[4]:.1f} s CPU per 1,000; {wall:.1f} s wall in all; "
          f"load average {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
