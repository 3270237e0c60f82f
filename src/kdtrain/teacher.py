"""The teacher signal: sparse top-k stored with the data (``kd.teacher: topk``), a local Hugging
Face causal LM run online (``online``), or none (CE only).

Vocabularies. The student's vocabulary equals its tokenizer's size. An online teacher must
have at least as many output rows; rows beyond the student's vocabulary are treated as padding
(e.g. a 32,064-row head over a 32,000-token tokenizer) and dropped before the softmax. A
teacher with fewer rows than the student is an error: the two would not share token ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError


def load_teacher_model(path: str | Path, device, dtype=None):
    """A frozen local HF causal LM; anything else is a clear error."""
    from .model import load_hf_causal_lm

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"kd.teacher_path {path} is not a Hugging Face checkpoint directory (no config.json).")
    model = load_hf_causal_lm(path, "kd.teacher_path", dtype=dtype or torch.float32)
    if model.get_output_embeddings() is None or not hasattr(model, "model"):
        raise ConfigError(f"kd.teacher_path {path}: {type(model).__name__} has no output head; "
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
