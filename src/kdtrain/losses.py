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


TAIL_FLOOR = 1e-7  # the least mass a tail bucket holds (keeps the reverse KL finite)


def _with_tail(listed: torch.Tensor) -> torch.Tensor:
    """[N, k] log-probs -> [N, k+1] with the tail bucket log(1 - sum p), floored at TAIL_FLOOR mass."""
    covered = torch.logsumexp(listed, dim=-1, keepdim=True).clamp(max=math.log1p(-TAIL_FLOOR))
    return torch.cat([listed, _log1mexp(covered)], dim=-1)


def sparse_teacher_buckets(teacher: SparseTeacher, temperature: float, vocab_size: int) -> torch.Tensor:
    """Teacher log-probs over the k listed tokens + tail, at ``temperature`` ([N, k+1], fp32).

    Re-tempering (``T != T_c``) starts from the true tail, ``1 - sum(p_listed)`` in float64 (a
    confident teacher's fp32 log-probs carry it to ~1e-17; fp32 arithmetic would lose it below
    ~1e-7), spread evenly over the ``V - k`` unlisted tokens; the 1e-7 floor is applied after, as on
    the student's side. With ``k == V`` there is no tail to re-temper: the listed tokens are the
    whole distribution, re-tempered exactly.
    """
    lp = teacher.logprobs.float()
    r = teacher.temperature / temperature
    if r == 1.0:
        return _with_tail(lp)
    n_rest = vocab_size - lp.shape[-1]
    lp64 = lp.double()
    tail = _log1mexp(torch.logsumexp(lp64, dim=-1, keepdim=True).clamp(max=0.0))  # -inf when nothing is left
    tail = math.log(n_rest) + r * (tail - math.log(n_rest)) if n_rest > 0 else torch.full_like(tail, -math.inf)
    raw = torch.cat([lp64 * r, tail], dim=-1)
    out = (raw - torch.logsumexp(raw, dim=-1, keepdim=True)).float()
    return torch.cat([out[..., :-1], out[..., -1:].clamp(min=math.log(TAIL_FLOOR))], dim=-1)


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
    """Mean over ``mask`` of the divergence between teacher and student at temperature T, times T**2.

    ``mask`` is boolean; a 0/1 integer mask is read as one (indexing with it would pick rows 0 and 1)."""
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"kl_div: mask must be boolean (or 0/1 integers), got {mask.dtype}")
        mask = mask.bool()
    mask = mask.reshape(-1)
    s = student_logits.reshape(mask.numel(), -1)
    if isinstance(teacher, SparseTeacher):  # [..., k] rows, flattened like the student
        k = teacher.ids.shape[-1]
        t = SparseTeacher(teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k), teacher.temperature)[mask]
    else:
        t = teacher.reshape(mask.numel(), -1)[mask]
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


def _objective(logits, labels, is_ref, kl_mask, kl_coef, ce_coef, t_logits, t_ids, t_lps, temperature: float,
               capture_t: float, kind: str, beta: float, with_kl: bool):
    """One chunk: (weighted total, [3] raw sums of kl, ce on teacher rows, ce on reference rows).

    Tensors in, tensors out, no data-dependent Python: the same function runs eagerly on the CPU
    and under ``torch.compile`` on CUDA, where its elementwise work fuses into a few kernels.
    """
    ce = ce_per_position(logits, labels)
    if with_kl:
        teacher = SparseTeacher(t_ids, t_lps, capture_t) if t_ids is not None else t_logits
        kl = kl_per_position(logits, teacher, temperature, kind, beta) * kl_mask
    else:
        kl = torch.zeros_like(ce)
    total_ = (kl * kl_coef).sum() + (ce * ce_coef).sum()
    sums = torch.stack([kl.sum(), (ce * ~is_ref).sum(), (ce * is_ref).sum()])
    return total_, sums


_COMPILED = {}


def _compiled_objective():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_objective, dynamic=False)
    return _COMPILED["fn"]


def _chunk_args(tgt: Targets, coefs, sl, teacher_logits, pad: int = 0) -> tuple:
    """The per-position tensors of one chunk; ``pad`` extra rows that contribute nothing (static
    shapes for the compiled objective: labels -100, masks False, coefficients 0, a uniform top-k)."""
    kl_coef, ce_coef = coefs
    args = [tgt.labels[sl], tgt.is_ref[sl], tgt.kl_mask[sl], kl_coef[sl], ce_coef[sl], teacher_logits,
            tgt.sparse.ids[sl] if tgt.sparse is not None else None,
            tgt.sparse.logprobs[sl] if tgt.sparse is not None else None]
    if pad:
        fills = [IGNORE, False, False, 0.0, 0.0, 0.0, 0, -math.log(args[6].shape[-1]) if args[6] is not None else 0]
        args = [None if a is None else torch.cat([a, a.new_full((pad, *a.shape[1:]), f)]) for a, f in zip(args, fills)]
    return tuple(args)


def _normalised(sums: torch.Tensor, tgt: Targets) -> torch.Tensor:
    n = torch.tensor([tgt.n_kl, tgt.n_ce_teacher, tgt.n_ce_ground_truth], dtype=sums.dtype, device=sums.device)
    return sums / n.clamp(min=1)


class _ChunkedKD(torch.autograd.Function):
    """Output projection + all components per chunk; the gradients w.r.t. the hidden states and
    the output weight are formed chunk by chunk during the forward pass (so nothing is left to
    recompute in backward), and neither the ``[N, V]`` logits nor their gradient ever exist for
    more than one chunk. The weight gradient accumulates in the weight's dtype (bf16 weights:
    one rounding per chunk, as fused-linear losses do)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, tgt, cfg, chunk):
        N = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total_ = hidden.new_zeros((), dtype=torch.float32)
        sums = hidden.new_zeros(3, dtype=torch.float32)
        coefs = tgt.coefficients(cfg["weights"])
        fn = _compiled_objective() if cfg["compile"] else _objective
        autocast = torch.is_autocast_enabled(hidden.device.type)
        consts = (cfg["temperature"], tgt.sparse.temperature if tgt.sparse is not None else 1.0, cfg["kind"],
                  cfg["beta"], cfg["with_kl"])
        for s in range(0, N, chunk):
            sl = slice(s, min(s + chunk, N))
            n = sl.stop - s
            pad = chunk - n if cfg["compile"] else 0
            h = hidden[sl]
            logits = h @ weight.t()
            t_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    t_logits = teacher_hidden[sl] @ teacher_weight.t()  # padded in _chunk_args
            if pad:
                logits = torch.cat([logits, logits.new_zeros(pad, logits.shape[1])])
            logits = logits.detach().requires_grad_(need_h or need_w)
            with torch.enable_grad():
                t, c = fn(logits, *_chunk_args(tgt, coefs, sl, t_logits, pad), *consts)
            total_ += t.detach()
            sums += c.detach()
            if need_h or need_w:
                (g,) = torch.autograd.grad(t, logits)
                g = g[:n] if autocast else g[:n].to(h.dtype)  # under autocast the matmuls run in bf16
                if need_h:
                    grad_h[sl] = g @ weight
                if need_w:
                    if not autocast and grad_w.dtype == g.dtype:
                        grad_w.addmm_(g.t(), h)  # in place: no [V, d] temporary
                    else:
                        grad_w += (g.t() @ h).to(grad_w.dtype)
        ctx.grads = (grad_h, grad_w)
        comps = _normalised(sums, tgt)
        ctx.mark_non_differentiable(comps)
        return total_, comps

    @staticmethod
    def backward(ctx, g_total, g_comps):
        # The buffers are handed over, scaled in place, and no longer held here, so autograd can
        # adopt them as .grad without a second [V, d] copy. Hence one backward per forward.
        if ctx.grads is None:
            raise RuntimeError("backward through the chunked KD loss ran twice; its gradients were formed in the "
                               "forward pass and handed over once (recompute the loss instead of retain_graph).")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        gh = grad_h.mul_(g_total.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(g_total.to(grad_w.dtype)) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def kd_loss(hidden, weight, tgt: Targets, weights: dict, temperature=1.0, kind="forward_kl", beta=0.5,
            teacher_hidden=None, teacher_weight=None, chunk_size: int | None = 1024, compile: bool = False) -> dict:
    """All components from final hidden states ``[N, d]`` and the output weight ``[V, d]``.

    ``chunk_size=None`` is the plain path (full ``[N, V]`` logits through autograd); otherwise the
    chunked path (``compile=True``: its per-chunk objective runs under ``torch.compile`` with
    static chunk shapes). Both return ``{kl_div, ce_teacher, ce_ground_truth, total}`` with equal
    values and gradients; only ``total`` carries gradient.
    """
    with_kl = tgt.sparse is not None or teacher_hidden is not None
    if chunk_size is None:
        t_logits = None if teacher_hidden is None else (teacher_hidden @ teacher_weight.t()).detach()
        coefs = tgt.coefficients(weights)
        consts = (temperature, tgt.sparse.temperature if tgt.sparse is not None else 1.0, kind, beta, with_kl)
        total_, sums = _objective(hidden @ weight.t(), *_chunk_args(tgt, coefs, slice(None), t_logits), *consts)
        comps = _normalised(sums.detach(), tgt)
    else:
        cfg = {"weights": weights, "temperature": temperature, "kind": kind, "beta": beta, "with_kl": with_kl,
               "compile": compile}
        total_, comps = _ChunkedKD.apply(hidden, weight, teacher_hidden, teacher_weight, tgt, cfg, chunk_size)
    return {"kl_div": comps[0], "ce_teacher": comps[1], "ce_ground_truth": comps[2], "total": total_}
