"""``kdtrain annotate``: run a local teacher over KD JSONL and store its top-k next-token rows.

Each output record is the input record plus ``response_ids`` (``teacher_text`` + EOS in the
student's tokenizer, cut to fit ``max_len``) and ``teacher_topk`` ({ids, logprobs, temperature}
with ``logprobs = log_softmax(logits / temperature)``). A first line ``{"__header__": ...}``
records k, the temperature and the teacher.

Resumable: output line ``i`` belongs to input record ``i``. After a kill, rerunning the same
command keeps every complete output line, drops a torn last line and continues with the next
record — no record is duplicated or missing. Records are written batch by batch and flushed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data import DataError, _truncate, parse_record, read_jsonl
from .teacher import OnlineTeacher, load_teacher_model
from .tokenizer import load_tokenizer


def _completed(path: Path, header: dict) -> int:
    """Keep the complete records already in ``path`` (dropping a torn tail); return their count."""
    if not path.exists():
        path.write_text(json.dumps({"__header__": header}) + "\n", encoding="utf-8")
        return 0
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]  # everything up to the last newline is whole
    lines = keep.decode("utf-8").splitlines()
    if not lines or json.loads(lines[0]).get("__header__") != header:
        raise DataError(f"{path} exists but was not written by this annotate command (header differs); "
                        "remove it or choose another output path.")
    if len(keep) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return len(lines) - 1


@torch.no_grad()
def annotate(input_path, output_path, teacher_path, tokenizer_path, k: int = 64, temperature: float = 1.0,
             batch_size: int = 8, max_len: int = 4096, device: str = "auto") -> int:
    """Annotate ``input_path`` into ``output_path``; returns the number of records written now."""
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if k < 1 or temperature <= 0 or batch_size < 1 or max_len < 2:
        raise DataError("annotate: --k and --batch-size must be >= 1, --temperature > 0, --max-len >= 2.")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    tok = load_tokenizer(tokenizer_path)
    vocab = len(tok)
    if k > vocab:
        raise DataError(f"annotate: --k {k} exceeds the vocabulary size {vocab}.")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    teacher = OnlineTeacher(load_teacher_model(teacher_path, dev, dtype), vocab)
    records = read_jsonl(input_path)
    header = {"format": "kd-jsonl-v1", "k": k, "temperature": temperature, "teacher": str(Path(teacher_path).name)}
    done = _completed(output_path, header)
    todo = records[done:]
    with open(output_path, "a", encoding="utf-8") as out, tqdm(total=len(records), initial=done, unit="rec") as bar:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s: s + batch_size]
            rows = []
            for line_no, rec in chunk:
                plain = {key: v for key, v in rec.items() if key not in ("response_ids", "teacher_topk")}
                sample, _, _ = parse_record(plain, tok, vocab, input_path, line_no)
                prompt, n = _truncate(sample.prompt_ids, sample.response_ids, max_len)  # the training policy
                rows.append((prompt, sample.response_ids[:n]))
            S = max(len(p) + len(r) for p, r in rows)
            ids = torch.full((len(rows), S), tok.pad_token_id, dtype=torch.long)
            for i, (p, r) in enumerate(rows):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            hidden = teacher.model.model(input_ids=ids.to(dev)).last_hidden_state
            weight = teacher.model.get_output_embeddings().weight[:vocab]
            lines = []
            for i, ((_, rec), (p, r)) in enumerate(zip(chunk, rows)):
                h = hidden[i, len(p) - 1: len(p) - 1 + len(r)]
                logprobs = torch.log_softmax((h @ weight.t()).float() / temperature, dim=-1)
                top = logprobs.topk(k, dim=-1)
                out_rec = {**rec, "response_ids": r, "teacher_topk": {
                    "ids": top.indices.tolist(),
                    "logprobs": [[min(v, 0.0) for v in row] for row in top.values.tolist()],
                    "temperature": temperature}}
                lines.append(json.dumps(out_rec) + "\n")
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    return len(todo)
