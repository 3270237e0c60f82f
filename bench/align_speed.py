"""Cross-tokenizer alignment: speed on one CPU core, and coverage on real tokenizers.

Student: the toy's 32,000-piece SentencePiece model (mistral-common ``tokenizer.model.v1``).
Teachers: Tekken (``tekken_240911.json``, a 131,072-token byte-level BPE that mistral-common also
ships), the toy pair's byte-level BPE (``make_toy_pair``) and the student's own tokenizer.

Text: 1,000-student-token slices of the Markdown, reStructuredText and text files installed in
this environment's site-packages (English prose, code, tables; seeded choice).

Speed: ``--records`` endpoint records of about ``--tokens`` student tokens, each with Tekken's
tokens and ``--k`` alternatives per token as ``teacher_api_logprobs`` (already JSON-decoded):
the student's tokenization, ``parse_api_logprobs`` and ``align_api``, one thread. The
alternatives are the chosen token plus other Tekken tokens; their identity does not change the
work. ``--distinct`` records are built and cycled (building 10,000 x 1,000 x K dicts would not fit
in memory), each aligned afresh.

Coverage: the fraction of the student's text positions whose token spans exactly one teacher
token. Mapped mass needs a teacher's distribution: for the toy pair it is measured with its
fitted teacher (``annotate``); for Tekken, whose model is not available offline, the proxy is
the share of Tekken tokens in the text (the teacher's own choices) that are exactly one student
piece, and the share of Tekken's vocabulary that is.

    python bench/align_speed.py [--records 10000 --tokens 1000 --k 20 --distinct 50]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizers library: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kdtrain import align  # noqa: E402


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


def api_entries(ids: list[int], pieces: list, K: int, rng: random.Random) -> list[dict]:
    """An endpoint's teacher_api_logprobs for the tokens ``ids``: each token first, then K - 1 others."""
    pool = [i for i in range(len(pieces)) if pieces[i]]
    lps = [math.log(0.45 * 0.5 ** j) for j in range(K)]  # normalised: sums below 0.9
    out = []
    for t in ids:
        alts = [t] + [rng.choice(pool) for _ in range(K - 1)]
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
    records = [(text, api_entries(tk.encode(text, bos=False, eos=False), t_pieces, a.k, rng)) for text in texts]
    t_tok = t_parse = t_align = 0.0
    positions = aligned = 0
    cpu0 = time.process_time()
    for r in range(a.records):
        text, entries = records[r % len(records)]
        t0 = time.perf_counter()
        ids = student.encode(text, add_special_tokens=False) + [student.eos_token_id]
        t1 = time.perf_counter()
        pieces, tops, lp = align.parse_api_logprobs(entries)
        t2 = time.perf_counter()
        rows = align.align_api(pieces, tops, lp, text, ids, s_vocab, a.k)
        t3 = time.perf_counter()
        t_tok, t_parse, t_align = t_tok + t1 - t0, t_parse + t2 - t1, t_align + t3 - t2
        positions += len(ids)
        aligned += rows.aligned
    total, cpu = t_tok + t_parse + t_align, time.process_time() - cpu0
    print(f"{a.records:,} records, {positions:,} student tokens, K={a.k}: {total:.1f} s wall on one core "
          f"(student tokenization {t_tok:.1f} s, parse {t_parse:.1f} s, align {t_align:.1f} s), {cpu:.1f} s CPU; "
          f"{positions / total / 1e3:.1f}k tokens/s; {aligned / positions:.1%} of positions aligned")


if __name__ == "__main__":
    main()
