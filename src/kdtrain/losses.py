"""Loss components as pure tensor functions (DESIGN.md, "Loss components").

Shapes: ``N`` positions (already flattened), ``V`` vocabulary, ``k`` top-k width. Every
log-softmax runs in fp32. Each component is a sum over valid positions divided by a
normaliser: by default the number of valid positions in the call, but the trainer passes the
count over the whole optimizer step so that accumulation 8 x 1 equals 1 x 8. Nothing valid
gives 0, never NaN.

Teacher signals:

* dense: teacher logits ``[N, V]`` (an online teacher).
* sparse top-k: ids and log-probs ``[N, k]`` captured at temperature ``T_c``, plus a tail
  bucket holding the mass the k tokens do not cover, on both the teacher and the student side,
  so the KL is exact for that coarse ``k + 1`` bucket distribution and zero when the two agree.
  Used at another temperature ``T``, the k listed log-probs are re-tempered exactly up to the
  normaliser (``l_i * T_c / T``) and the tail mass is treated as spread evenly over the ``V - k``
  unlisted tokens; then the ``k + 1`` buckets are renormalised. At ``T == T_c`` nothing changes.

Divergences (``t`` teacher, ``s`` student, both at temperature ``T``, scaled by ``T**2``):
``forward_kl`` = KL(t || s); ``reverse_kl`` = KL(s || t); ``jsd`` with ``beta``:
``beta * KL(t || m) + (1 - beta) * KL(s || m)``, ``m = beta * t + (1 - beta) * s``. At ``beta = 0``
and ``1`` that mixture vanishes; there the JSD is defined as its limits ``JSD/beta -> KL(t||s)``
and ``JSD/(1-beta) -> KL(s||t)``, so the endpoints equal the forward and reverse KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
COMPONENTS = ("kl_div", "ce_teacher", "ce_ground_truth", "total")


@dataclass
class SparseTeacher:
    ids: torch.Tensor  # [N, k] long
    logprobs: torch.Tensor  # [N, k] at the capture temperature
    temperature: float = 1.0  # capture temperature

    def __getitem__(self, sl) -> "SparseTeacher":
        return SparseTeacher(self.ids[sl], self.logprobs[sl], self.temperature)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail(listed: torch.Tensor) -> torch.Tensor:
    """[N, k] log-probs -> [N, k+1] with the tail bucket log(1 - sum p), floored at 1e-7 mass."""
    covered = torch.logsumexp(listed, dim=-1, keepdim=True).clamp(max=math.log1p(-1e-7))
    return torch.cat([listed, _log1mexp(covered)], dim=-1)


def sparse_teacher_buckets(teacher: SparseTeacher, temperature: float, vocab_size: int) -> torch.Tensor:
    """Teacher log-probs over the k listed tokens + tail, at ``temperature`` ([N, k+1], fp32)."""
    lp = teacher.logprobs.float()
    buckets = _with_tail(lp)
    r = teacher.temperature / temperature
    if r == 1.0:
        return buckets
    n_rest = vocab_size - lp.shape[-1]
    listed = lp * r
    tail = math.log(n_rest) + r * (buckets[..., -1:] - math.log(n_rest)) if n_rest > 0 else buckets[..., -1:] * 0 - math.inf
    raw = torch.cat([listed, tail], dim=-1)
    return raw - torch.logsumexp(raw, dim=-1, keepdim=True)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; 0 * log 0 terms are 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def divergence(t_log: torch.Tensor, s_log: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher and student log-probs over the same buckets."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t_log, s_log)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s_log, t_log)
    if kind != "jsd":
        raise ValueError(f"unknown divergence '{kind}': use forward_kl, reverse_kl or jsd.")
    m_log = torch.logsumexp(torch.stack([t_log + math.log(beta), s_log + math.log1p(-beta)]), dim=0)
    return beta * _kl(t_log, m_log) + (1 - beta) * _kl(s_log, m_log)


def kl_per_position(student_logits: torch.Tensor, teacher, temperature: float = 1.0,
                    kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """[N] divergence * T**2; ``teacher`` is dense logits [N, V] or a SparseTeacher."""
    T = temperature
    s_log = torch.log_softmax(student_logits.float() / T, dim=-1)
    if isinstance(teacher, SparseTeacher):
        t_log = sparse_teacher_buckets(teacher, T, student_logits.shape[-1])
        s_log = _with_tail(s_log.gather(-1, teacher.ids))
    else:
        t_log = torch.log_softmax(teacher.float() / T, dim=-1)
    return divergence(t_log, s_log, kind, beta) * T * T


def ce_per_position(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] next-token cross-entropy in fp32; positions with target -100 give 0."""
    return F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none") * (targets != IGNORE)


def _normalise(total: torch.Tensor, mask: torch.Tensor, normalizer) -> torch.Tensor:
    n = mask.sum() if normalizer is None else torch.as_tensor(normalizer, device=total.device)
    return total / n.clamp(min=1)


def kl_div(student_logits, teacher, mask, temperature=1.0, kind="forward_kl", beta=0.5, normalizer=None):
    """Mean over ``mask`` of the divergence between teacher and student at temperature T, times T**2."""
    mask = mask.reshape(-1)
    s = student_logits.reshape(mask.numel(), -1)
    t = teacher[mask] if isinstance(teacher, SparseTeacher) else teacher.reshape(mask.numel(), -1)[mask]
    per = kl_per_position(s[mask], t, temperature, kind, beta)
    return _normalise(per.sum(), mask, normalizer)


def ce_teacher(student_logits, labels, normalizer=None):
    """Mean next-token cross-entropy on the teacher_text tokens (labels -100 elsewhere)."""
    labels = labels.reshape(-1)
    per = ce_per_position(student_logits.reshape(labels.numel(), -1), labels)
    return _normalise(per.sum(), labels != IGNORE, normalizer)


def ce_ground_truth(reference_logits, reference_labels, normalizer=None):
    """Mean next-token cross-entropy of prompt -> reference (rows without a reference are absent)."""
    return ce_teacher(reference_logits, reference_labels, normalizer)


def total(components: dict, weights: dict):
    """Weighted sum; ``weights`` maps component name -> weight (missing = 0)."""
    return sum(weights.get(name, 0.0) * value for name, value in components.items() if name != "total")


@dataclass
class Targets:
    """Everything the loss needs per valid position, flattened across the micro-batch.

    Teacher rows (prompt -> teacher_text) and reference rows (prompt -> reference) are
    concatenated; ``is_ref`` tells them apart. ``kl_mask`` marks positions with a teacher signal.
    Normalisers are counts over the whole optimizer step.
    """

    labels: torch.Tensor  # [N] long
    is_ref: torch.Tensor  # [N] bool
    kl_mask: torch.Tensor  # [N] bool
    n_kl: float
    n_ce_teacher: float
    n_ce_ground_truth: float
    sparse: SparseTeacher | None = None  # rows for every N (zeros where kl_mask is False)

    def coefficients(self, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position weights turning per-position losses into the step's ``total``."""
        ref = self.is_ref.float()
        kl = self.kl_mask.float() * (weights["kl_div"] / max(self.n_kl, 1))
        ce = (1 - ref) * (weights["ce_teacher"] / max(self.n_ce_teacher, 1)) \
            + ref * (weights["ce_ground_truth"] / max(self.n_ce_ground_truth, 1))
        return kl, ce


def _chunk_losses(logits, tgt: Targets, sl, teacher_logits, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted total, [3] component sums already divided by their normalisers) for one chunk."""
    labels, is_ref, kl_mask = tgt.labels[sl], tgt.is_ref[sl], tgt.kl_mask[sl]
    kl_coef, ce_coef = (c[sl] for c in tgt.coefficients(cfg["weights"]))
    ce = ce_per_position(logits, labels)
    if cfg["weights"]["kl_div"] > 0 or cfg["report_kl"]:
        teacher = tgt.sparse[sl] if tgt.sparse is not None else teacher_logits
        kl = kl_per_position(logits, teacher, cfg["temperature"], cfg["kind"], cfg["beta"]) * kl_mask
    else:
        kl = torch.zeros_like(ce)
    total_ = (kl * kl_coef).sum() + (ce * ce_coef).sum()
    comps = torch.stack([
        kl.sum() / max(tgt.n_kl, 1),
        (ce * ~is_ref).sum() / max(tgt.n_ce_teacher, 1),
        (ce * is_ref).sum() / max(tgt.n_ce_ground_truth, 1),
    ])
    return total_, comps.detach()


class _ChunkedKD(torch.autograd.Function):
    """Output projection + all components per chunk; gradients are formed chunk by chunk during
    the forward pass (there is nothing left to recompute in backward), so neither the
    ``[N, V]`` logits nor their gradient ever exist for more than one chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, tgt, cfg, chunk):
        N = hidden.shape[0]
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total_ = hidden.new_zeros((), dtype=torch.float32)
        comps = hidden.new_zeros(3, dtype=torch.float32)
        for s in range(0, N, chunk):
            sl = slice(s, min(s + chunk, N))
            h = hidden[sl]
            t_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    t_logits = teacher_hidden[sl] @ teacher_weight.t()
            with torch.enable_grad():
                logits = (h @ weight.t()).detach().requires_grad_(need)
                t, c = _chunk_losses(logits, tgt, sl, t_logits, cfg)
            total_ += t.detach()
            comps += c
            if need:
                (g,) = torch.autograd.grad(t, logits)
                g = g.to(h.dtype)
                if grad_h is not None:
                    grad_h[sl] = g @ weight
                if grad_w is not None:
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(comps)
        return total_, comps

    @staticmethod
    def backward(ctx, g_total, g_comps):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g_total.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * g_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def kd_loss(hidden, weight, tgt: Targets, weights: dict, temperature=1.0, kind="forward_kl", beta=0.5,
            teacher_hidden=None, teacher_weight=None, chunk_size: int | None = 1024) -> dict:
    """All components from final hidden states ``[N, d]`` and the output weight ``[V, d]``.

    ``chunk_size=None`` is the plain path (full ``[N, V]`` logits through autograd); otherwise the
    chunked path. Both return ``{kl_div, ce_teacher, ce_ground_truth, total}`` with equal values
    and gradients; only ``total`` carries gradient.
    """
    cfg = {"weights": weights, "temperature": temperature, "kind": kind, "beta": beta,
           "report_kl": tgt.sparse is not None or teacher_hidden is not None}
    if chunk_size is None:
        t_logits = None if teacher_hidden is None else (teacher_hidden @ teacher_weight.t()).detach()
        total_, comps = _chunk_losses(hidden @ weight.t(), tgt, slice(None), t_logits, cfg)
    else:
        total_, comps = _ChunkedKD.apply(hidden, weight, teacher_hidden, teacher_weight, tgt, cfg, chunk_size)
    return {"kl_div": comps[0], "ce_teacher": comps[1], "ce_ground_truth": comps[2], "total": total_}

