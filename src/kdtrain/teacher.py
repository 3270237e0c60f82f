"""The teacher signal: sparse top-k stored with the data (``kd.teacher: topk``), a local Hugging
Face causal LM run online (``online``), or none (CE only).

Vocabularies. The student's vocabulary equals its tokenizer's size. An online teacher that
shares the student's tokenizer must have at least as many output rows; rows beyond the
student's vocabulary are treated as padding (e.g. a 32,064-row head over a 32,000-token
tokenizer) and dropped before the softmax. A teacher with fewer rows than the student is an
error: the two would not share token ids.

Another tokenizer. A teacher directory that holds a tokenizer whose vocabulary differs from the
student's is a ``CrossTeacher``: it runs on its own tokenization of each row's prompt and
response, its distribution is mapped onto student ids at the aligned positions (``align.py``)
and the top ``ONLINE_TOPK`` become the batch's sparse rows, exactly as ``kdtrain annotate``
would store them. ``kl_div`` then covers the aligned positions only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import align
from .config import ConfigError

ONLINE_TOPK = 64  # row width of an online teacher with another tokenizer


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device
    this machine lacks is a ConfigError naming ``--device``, not torch's failure at the first ``.to``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r} is not a device kdtrain runs on; use auto, cpu, cuda, cuda:N or mps.")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= n:
        raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s); use auto or cpu"
                          + (f", or cuda:0 to cuda:{n - 1}." if n else "."))
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: this machine has no MPS device; use auto or cpu.")
    return dev


def load_teacher_model(path: str | Path, device, dtype=None, key: str = "kd.teacher_path"):
    """A frozen local HF causal LM; anything else is a clear error naming ``key`` (the config key or option)."""
    from .model import load_hf_causal_lm

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key} {path} is not a Hugging Face checkpoint directory (no config.json).")
    model = load_hf_causal_lm(path, key, dtype=dtype or torch.float32)
    if model.get_output_embeddings() is None or not hasattr(model, "model"):
        raise ConfigError(f"{key} {path}: {type(model).__name__} has no output head; "
                          "the teacher must be a decoder-only causal LM.")
    model.requires_grad_(False).eval()
    return model.to(device)


class OnlineTeacher:
    """Runs a frozen teacher on the student's batch; the chunked loss projects its hidden states."""

    def __init__(self, model, student_vocab: int):
        self.model = model
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < student_vocab:
            raise ConfigError(f"the teacher's vocabulary ({rows}) is smaller than the student's ({student_vocab}); "
                              "teacher and student must share a tokenizer (the teacher may be padded, not shorter).")
        self.vocab = student_vocab

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, valid: torch.Tensor):
        """(hidden states at the valid positions [N, d_t], output weight [V_student, d_t])."""
        h = self.model.model(input_ids=input_ids).last_hidden_state[valid]
        return h, self.model.get_output_embeddings().weight[: self.vocab]


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def online_teacher(path, device, dtype, student_tokenizer):
    """``kd.teacher=online``: an ``OnlineTeacher``, or a ``CrossTeacher`` when ``path`` holds a tokenizer
    with a vocabulary other than the student's."""
    from .tokenizer import load_tokenizer

    model = load_teacher_model(path, device, dtype)
    if _has_tokenizer(Path(path)):
        tok = load_tokenizer(path)
        if align.vocab_bytes(tok).names != align.vocab_bytes(student_tokenizer).names:
            return CrossTeacher(model, tok, student_tokenizer)
    return OnlineTeacher(model, len(student_tokenizer))


class CrossTeacher:
    """A local teacher with another tokenizer: its rows mapped onto the student's tokens."""

    def __init__(self, model, tokenizer, student_tokenizer, temperature: float = 1.0):
        self.model, self.tok, self.student_tok = model, tokenizer, student_tokenizer
        self.t_vocab, self.s_vocab = align.vocab_bytes(tokenizer), align.vocab_bytes(student_tokenizer)
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(self.t_vocab):
            raise ConfigError(f"the teacher has {rows} output rows but its tokenizer has {len(self.t_vocab)} tokens: "
                              "give the teacher's own tokenizer.")
        self.temperature = temperature
        self.maps: dict = {}

    def _map(self, first_t: bool, first_s: bool) -> torch.Tensor:
        if (first_t, first_s) not in self.maps:
            dev = self.model.get_output_embeddings().weight.device
            self.maps[first_t, first_s] = align.id_map(self.t_vocab, self.s_vocab, first_t, first_s).to(dev)
        return self.maps[first_t, first_s]

    @torch.no_grad()
    def logprobs(self, rows: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """[len(response), V_t] log-probs at the response positions of each (prompt, response) row."""
        weight = self.model.get_output_embeddings().weight
        S = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), S), self.tok.pad_token_id, dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        hidden = self.model.model(input_ids=ids.to(weight.device)).last_hidden_state
        weight = weight[: len(self.t_vocab)]
        return [torch.log_softmax((hidden[i, len(p) - 1: len(p) - 1 + len(r)] @ weight.t()).float() / self.temperature,
                                  dim=-1) for i, (p, r) in enumerate(rows)]

    def rows(self, text: str, t_resp: list[int], nt: int, t_lp: torch.Tensor, s_resp: list[int], ns: int, k: int):
        """(ids, logprobs, aligned, teacher mass, mapped mass): student rows (None where not aligned) for
        ``s_resp[:ns]`` from the teacher's rows ``t_lp`` over ``t_resp[:nt]``; both responses are the
        text's tokens + EOS. Raises AlignError when a tokenizer does not spell the text."""
        raw = text.encode("utf-8")
        t_starts, t_ends, _ = align.spans([self.t_vocab.pieces[i] or b"" for i in t_resp[:-1]], raw)
        s_starts, s_ends, _ = align.spans([self.s_vocab.pieces[i] or b"" for i in s_resp[:-1]], raw)
        which = align.match(s_starts, s_ends, t_starts, t_ends)
        pairs = [(j, i) for j, i in enumerate(which) if i is not None and j < ns and i < nt]
        if ns == len(s_resp) and nt == len(t_resp):
            pairs.append((ns - 1, nt - 1))  # EOS after the whole text on both sides
        ids: list = [None] * ns
        lps: list = [None] * ns
        mapped = 0.0
        for first in ((False, False), (True, True), (True, False), (False, True)):
            sel = [(j, i) for j, i in pairs if (i == 0, j == 0) == first]
            if sel:
                student = align.to_student(t_lp[[i for _, i in sel]], self._map(*first), len(self.s_vocab))
                row_ids, row_lps, m = align.topk_rows(student, k)
                for (j, _), ri, rl in zip(sel, row_ids, row_lps):
                    ids[j], lps[j] = ri, rl
                mapped += m
        # the teacher's own mass: 1 per row up to the float32 rounding of its log-softmax
        total = float(torch.logsumexp(t_lp[[i for _, i in pairs]].double(), -1).exp().sum()) if pairs else 0.0
        return ids, lps, len(pairs), total, mapped

    def _texts(self, prompt: list[int], response: list[int]) -> tuple[str, str]:
        """The prompt and response texts of a student row (the response from its tokens' bytes)."""
        tok, v = self.student_tok, self.s_vocab
        body = prompt[1:] if prompt and prompt[0] == tok.bos_token_id else prompt
        raw = b"".join(v.pieces[i] or b"" for i in response if i != tok.eos_token_id)
        text = raw.decode("utf-8", errors="replace")
        if v.prefix and raw.startswith(v.prefix):  # the virtual space, unless the text has one of its own
            bare = raw[len(v.prefix):].decode("utf-8", errors="replace")
            if tok.encode(bare, add_special_tokens=False) == [i for i in response if i != tok.eos_token_id]:
                text = bare
        return tok.decode(body), text

    @torch.no_grad()
    def topk_batch(self, batch: dict, k: int = ONLINE_TOPK) -> dict:
        """Sparse rows for a collated student batch: ``topk_ids``, ``topk_logprobs``, ``topk_mask``."""
        from .data import IGNORE

        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        B, S = ids.shape
        out_ids = torch.zeros(B, S, k, dtype=torch.long)
        out_lps = torch.zeros(B, S, k)
        mask = torch.zeros(B, S, dtype=torch.bool)
        todo = []
        for b in range(B):
            valid = (labels[b] != IGNORE).nonzero().flatten()
            if len(valid) == 0:
                continue
            start, response = int(valid[0]), labels[b, valid].tolist()
            prompt_text, text = self._texts(ids[b, : start + 1].tolist(), response)
            ended = response[-1] == self.student_tok.eos_token_id
            s_resp = response if ended else response + [self.student_tok.eos_token_id]
            t_prompt = [self.tok.bos_token_id] + self.tok.encode(prompt_text, add_special_tokens=False)
            t_resp = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
            todo.append((b, start, text, t_prompt, t_resp if ended else t_resp[:-1], t_resp, s_resp, len(response)))
        if not todo:
            return {"topk_ids": out_ids, "topk_logprobs": out_lps, "topk_mask": mask}
        t_lps = self.logprobs([(tp, tr) for _, _, _, tp, tr, _, _, _ in todo])
        for (b, start, text, _, t_kept, t_resp, s_resp, ns), t_lp in zip(todo, t_lps):
            try:
                rows_i, rows_l, *_ = self.rows(text, t_resp, len(t_kept), t_lp, s_resp, ns, k)
            except align.AlignError:  # a cut inside a character: no row for this sample
                continue
            for j, (ri, rl) in enumerate(zip(rows_i, rows_l)):
                if ri is not None:
                    out_ids[b, start + j], out_lps[b, start + j], mask[b, start + j] = torch.tensor(ri), \
                        torch.tensor(rl), True
        dev = batch["input_ids"].device
        return {"topk_ids": out_ids.to(dev), "topk_logprobs": out_lps.to(dev), "topk_mask": mask.to(dev)}
