"""Loss components against naive references written straight from the definitions.

The references below work in probability space, in fp64, with plain formulas (exp, divide,
sum, log of a ratio) and deliberately use none of the helpers in ``kdtrain.losses``: no
log-softmax, no log1mexp, no logsumexp. The module computes in fp32 (its log-softmax always
runs in fp32), so value comparisons use rtol/atol around 1e-5.

Shapes follow the module: ``N`` positions, ``V`` vocabulary, ``k`` top-k width, ``d`` hidden.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdtrain.losses import (
    IGNORE,
    SparseTeacher,
    Targets,
    ce_ground_truth,
    ce_teacher,
    divergence,
    kd_loss,
    kl_div,
    kl_per_position,
    sparse_teacher_buckets,
    total,
)

F64 = torch.float64
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 module vs fp64 reference
# The first three are the everyday set; beta = 0.3 is asymmetric, so swapping t and s shows.
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]
KIND_IDS = ["forward_kl", "reverse_kl", "jsd0.3", "jsd0.5", "jsd0.1", "jsd0.9"]
WEIGHTS = {"kl_div": 1.0, "ce_teacher": 0.5, "ce_ground_truth": 0.3}
# Few, deadline-free examples keep the suite fast; no database so the tree stays clean.
HYP = settings(max_examples=25, deadline=None, database=None)


# ---------------------------------------------------------------- naive references (fp64)

def ref_probs(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) written out: exp, then divide by the sum."""
    z = logits.to(F64) / T
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v log(p_v / q_v). Test inputs keep every probability > 0."""
    return (p * torch.log(p / q)).sum(-1)


def ref_div(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """p teacher, q student. JSD only for 0 < beta < 1 (the endpoints are tested separately)."""
    if kind == "forward_kl":
        return ref_kl(p, q)
    if kind == "reverse_kl":
        return ref_kl(q, p)
    assert 0 < beta < 1
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_teacher_buckets(ids, logprobs, Tc: float, T: float, V: int) -> torch.Tensor:
    """The documented sparse rule, built on the full vocabulary instead of in log space.

    Listed tokens get exp(l_i); the tail 1 - sum exp(l_i) is spread evenly over the V - k
    unlisted tokens. Re-tempering a distribution captured at Tc to T means p_v ** (Tc / T),
    renormalised. Then regroup into the k listed tokens + the summed unlisted tail.
    """
    p = logprobs.to(F64).exp()
    N, k = p.shape
    tail = 1 - p.sum(-1, keepdim=True)
    full = (tail / (V - k)).expand(N, V).clone()
    full.scatter_(-1, ids, p)
    powered = full ** (Tc / T)
    powered = powered / powered.sum(-1, keepdim=True)
    unlisted = torch.ones(N, V, dtype=torch.bool).scatter(-1, ids, False)
    return torch.cat([powered.gather(-1, ids), (powered * unlisted).sum(-1, keepdim=True)], -1)


def ref_student_buckets(student_logits, ids, T: float) -> torch.Tensor:
    """The student's probabilities at the teacher's k ids, plus tail = 1 - their sum."""
    q = ref_probs(student_logits, T).gather(-1, ids)
    return torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)


def ref_kl_per_position(student_logits, teacher, T=1.0, kind="forward_kl", beta=0.5):
    """[N] divergence * T**2, teacher dense logits [N, V] or a SparseTeacher."""
    V = student_logits.shape[-1]
    if isinstance(teacher, SparseTeacher):
        p = ref_teacher_buckets(teacher.ids, teacher.logprobs, teacher.temperature, T, V)
        q = ref_student_buckets(student_logits, teacher.ids, T)
    else:
        p, q = ref_probs(teacher, T), ref_probs(student_logits, T)
    return ref_div(p, q, kind, beta) * T**2


def ref_ce_per_position(logits, labels) -> torch.Tensor:
    """[N] -log softmax(logits)[label], 0 where the label is IGNORE."""
    out = torch.zeros(labels.shape[0], dtype=F64)
    for i, y in enumerate(labels.tolist()):
        if y != IGNORE:
            out[i] = -torch.log(ref_probs(logits[i])[y])
    return out


def ref_mean(per: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    n = int(mask.sum()) if normalizer is None else normalizer
    return (per * mask).sum() / n if n > 0 else torch.zeros((), dtype=F64)


def ref_components(logits, tgt: Targets, teacher, T, kind, beta) -> dict:
    """What kd_loss must return, from per-position references and the step normalisers."""
    valid, m = tgt.labels != IGNORE, tgt.kl_mask
    # only rows with a teacher signal: the zero-filled sparse rows elsewhere are not distributions
    kl = ref_kl_per_position(logits[m], teacher[m], T, kind, beta).sum() / max(tgt.n_kl, 1)
    ce = ref_ce_per_position(logits, tgt.labels)
    comps = {
        "kl_div": kl,
        "ce_teacher": ref_mean(ce, valid & ~tgt.is_ref, tgt.n_ce_teacher),
        "ce_ground_truth": ref_mean(ce, valid & tgt.is_ref, tgt.n_ce_ground_truth),
    }
    comps["total"] = sum(WEIGHTS[c] * v for c, v in comps.items())
    return comps


# ---------------------------------------------------------------- problem builders

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_logits(N, V, seed, scale=2.0):
    g = _gen(seed)
    return torch.randn(N, V, generator=g) * scale, torch.randn(N, V, generator=g) * scale


def make_sparse(teacher_logits, k, Tc=1.0) -> SparseTeacher:
    """A top-k capture of a real teacher at temperature Tc (log-probs at Tc)."""
    top = torch.log_softmax(teacher_logits.float() / Tc, -1).topk(k, -1)
    return SparseTeacher(top.indices, top.values, Tc)


def make_kd_problem(N=11, d=8, V=17, k=4, seed=0, teacher="sparse", Tc=1.0):
    """hidden [N, d] and weight [V, d], Targets mixing teacher rows and reference rows (the last
    3), some labels IGNORE and some kl_mask False; teacher sparse (top-k) or dense (online)."""
    g = _gen(seed)
    hidden = torch.randn(N, d, generator=g)
    weight = torch.randn(V, d, generator=g) / math.sqrt(d) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 6]] = IGNORE
    is_ref = torch.arange(N) >= N - 3
    kl_mask = ~is_ref & (labels != IGNORE)
    kl_mask[[2]] = False  # a teacher row without a top-k row
    extra = {}
    if teacher == "sparse":
        sp = make_sparse(torch.randn(N, V, generator=g) * 2, k, Tc)
        # the trainer fills rows without a teacher signal with zeros
        sp = SparseTeacher(sp.ids * kl_mask[:, None], sp.logprobs * kl_mask[:, None], Tc)
    else:
        sp = None
        extra = {"teacher_hidden": torch.randn(N, 6, generator=g), "teacher_weight": torch.randn(V, 6, generator=g) / 2}
    valid = labels != IGNORE
    tgt = Targets(labels, is_ref, kl_mask, int(kl_mask.sum()), int((valid & ~is_ref).sum()),
                  int((valid & is_ref).sum()), sp)
    return hidden, weight, tgt, extra


def dense_teacher_logits(extra):
    return extra["teacher_hidden"].to(F64) @ extra["teacher_weight"].to(F64).t()


def run_kd(hidden, weight, tgt, extra, chunk, dtype=torch.float32, T=1.5, kind="jsd", beta=0.3):
    """kd_loss forward + backward of total; returns (components, grad hidden, grad weight)."""
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    ex = {k: v.to(dtype) for k, v in extra.items()}
    out = kd_loss(h, w, tgt, WEIGHTS, T, kind, beta, chunk_size=chunk, **ex)
    out["total"].backward()
    return out, h.grad, w.grad


def close(a, b, **tol):
    torch.testing.assert_close(torch.as_tensor(a).to(F64), torch.as_tensor(b).to(F64), **(tol or TOL))


# ---------------------------------------------------------------- 1. against the references

@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind, beta", KINDS, ids=KIND_IDS)
def test_kl_per_position_dense_equals_reference(kind, beta, T):
    s, t = make_logits(7, 11, seed=1)
    close(kl_per_position(s, t, T, kind, beta), ref_kl_per_position(s, t, T, kind, beta))


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind, beta", KINDS, ids=KIND_IDS)
def test_kl_per_position_sparse_equals_reference(kind, beta, T):
    s, t = make_logits(7, 11, seed=2)
    sp = make_sparse(t, k=3, Tc=T)  # captured at the temperature it is used at
    close(kl_per_position(s, sp, T, kind, beta), ref_kl_per_position(s, sp, T, kind, beta))


@pytest.mark.parametrize("kind, beta", KINDS, ids=KIND_IDS)
def test_divergence_equals_reference_on_given_distributions(kind, beta):
    g = _gen(3)
    p = torch.rand(5, 6, generator=g, dtype=F64) + 0.05
    q = torch.rand(5, 6, generator=g, dtype=F64) + 0.05
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    close(divergence(p.log(), q.log(), kind, beta), ref_div(p, q, kind, beta), rtol=1e-10, atol=1e-12)


def test_divergence_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "kl")


@pytest.mark.smoke
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("kind, beta", KINDS[:3], ids=KIND_IDS[:3])
def test_kl_div_is_the_masked_mean_of_the_reference(teacher, kind, beta):
    s, t = make_logits(9, 13, seed=4)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    tt = t if teacher == "dense" else make_sparse(t, k=4, Tc=1.0)  # re-tempered to T = 2
    ref = ref_kl_per_position(s, tt, 2.0, kind, beta)
    close(kl_div(s, tt, mask, 2.0, kind, beta), ref_mean(ref, mask))
    # the step-level normaliser replaces the local count
    close(kl_div(s, tt, mask, 2.0, kind, beta, normalizer=20), ref_mean(ref, mask, 20))


def test_kl_div_accepts_batch_by_position_shapes():
    """[B, S, V] student, [B, S, ...] teacher and [B, S] mask mean the same as flattened."""
    s, t = make_logits(8, 7, seed=5)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    for tt in (t, make_sparse(t, k=3)):
        ref = ref_mean(ref_kl_per_position(s, tt), mask)
        t3 = tt.reshape(2, 4, -1) if isinstance(tt, torch.Tensor) else SparseTeacher(
            tt.ids.reshape(2, 4, -1), tt.logprobs.reshape(2, 4, -1), tt.temperature)
        close(kl_div(s.reshape(2, 4, -1), t3, mask.reshape(2, 4)), ref)


@pytest.mark.smoke
@pytest.mark.parametrize("fn", [ce_teacher, ce_ground_truth])
def test_ce_equals_reference(fn):
    logits, _ = make_logits(2 * 5, 9, seed=6)
    labels = torch.tensor([3, IGNORE, 0, 8, 8, IGNORE, IGNORE, 1, 2, 5])
    ref = ref_ce_per_position(logits, labels)
    valid = labels != IGNORE
    close(fn(logits.reshape(2, 5, 9), labels.reshape(2, 5)), ref_mean(ref, valid))
    close(fn(logits, labels, normalizer=50), ref_mean(ref, valid, 50))


def test_total_is_the_weighted_sum_ignoring_total_and_missing_weights():
    comps = {"kl_div": torch.tensor(2.0), "ce_teacher": torch.tensor(3.0),
             "ce_ground_truth": torch.tensor(5.0), "total": torch.tensor(1000.0)}
    assert float(total(comps, {"kl_div": 0.5, "ce_teacher": 0.25})) == pytest.approx(0.5 * 2 + 0.25 * 3)
    assert float(total(comps, WEIGHTS)) == pytest.approx(2 + 0.5 * 3 + 0.3 * 5)


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
@pytest.mark.parametrize("kind, beta", KINDS[:3], ids=KIND_IDS[:3])
def test_kd_loss_components_and_gradients_equal_reference(teacher, kind, beta, chunk):
    """Values of all four components, and the gradient of total, against an fp64 autograd
    reference built from the probability-space formulas (plain and chunked paths)."""
    T = 1.5
    hidden, weight, tgt, extra = make_kd_problem(teacher=teacher, Tc=0.8)
    out, gh, gw = run_kd(hidden, weight, tgt, extra, chunk, T=T, kind=kind, beta=beta)

    h64, w64 = hidden.to(F64).requires_grad_(), weight.to(F64).requires_grad_()
    t = tgt.sparse if teacher == "sparse" else dense_teacher_logits(extra)
    ref = ref_components(h64 @ w64.t(), tgt, t, T, kind, beta)
    ref["total"].backward()
    for c in ref:
        close(out[c], ref[c].detach())
    # Looser for gradients: one teacher tail here holds 7e-4 of the mass, and the module forms
    # log(1 - covered) in fp32, which costs ~1e-4 relative on the terms that use it.
    close(gh, h64.grad, rtol=1e-4, atol=5e-6)
    close(gw, w64.grad, rtol=1e-4, atol=5e-6)


# ---------------------------------------------------------------- 2. by hand

@pytest.mark.smoke
def test_sparse_topk_kl_by_hand_on_a_2x4x5_batch():
    """B=2, S=4, V=5, k=2. Student logits are log-probabilities, so softmax returns them."""
    ln = math.log
    rows = [  # (student probs over 5 tokens, teacher top-2 ids, teacher top-2 probs)
        ([0.4, 0.1, 0.2, 0.2, 0.1], [0, 2], [0.5, 0.3]),
        ([0.1, 0.6, 0.1, 0.1, 0.1], [1, 0], [0.7, 0.2]),
        ([0.9, 0.025, 0.025, 0.025, 0.025], [3, 1], [0.9, 0.05]),  # masked
        ([0.2, 0.2, 0.2, 0.2, 0.2], [4, 3], [0.25, 0.25]),
        ([0.01, 0.01, 0.01, 0.01, 0.96], [0, 1], [0.6, 0.3]),  # masked
        ([0.05, 0.05, 0.5, 0.3, 0.1], [2, 3], [0.6, 0.3]),
        ([0.4, 0.1, 0.2, 0.2, 0.1], [0, 2], [0.4, 0.2]),  # teacher = student on the buckets
        ([0.3, 0.3, 0.2, 0.1, 0.1], [4, 2], [0.5, 0.1]),  # masked
    ]
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    student = torch.tensor([[ln(p) for p in r[0]] for r in rows]).reshape(2, 4, 5)
    teacher = SparseTeacher(torch.tensor([r[1] for r in rows]).reshape(2, 4, 2),
                            torch.tensor([[ln(p) for p in r[2]] for r in rows]).reshape(2, 4, 2))
    # teacher buckets (p1, p2, tail) vs student buckets (q1, q2, tail), worked out by hand:
    by_hand = [
        0.5 * ln(0.5 / 0.4) + 0.3 * ln(0.3 / 0.2) + 0.2 * ln(0.2 / 0.4),  # tails 0.2 | 0.4
        0.7 * ln(0.7 / 0.6) + 0.2 * ln(0.2 / 0.1) + 0.1 * ln(0.1 / 0.3),  # tails 0.1 | 0.3
        0.25 * ln(0.25 / 0.2) * 2 + 0.5 * ln(0.5 / 0.6),  # tails 0.5 | 0.6
        0.6 * ln(0.6 / 0.5) + 0.3 * ln(0.3 / 0.3) + 0.1 * ln(0.1 / 0.2),  # tails 0.1 | 0.2
        0.0,
    ]
    assert kl_div(student, teacher, mask).item() == pytest.approx(sum(by_hand) / 5, rel=1e-5)
    assert kl_div(student, teacher, mask, normalizer=8).item() == pytest.approx(sum(by_hand) / 8, rel=1e-5)
    # the same numbers flattened to [N, ...], as the trainer passes them
    flat = SparseTeacher(teacher.ids.reshape(8, 2), teacher.logprobs.reshape(8, 2))
    assert kl_div(student.reshape(8, 5), flat, mask.reshape(8)).item() == pytest.approx(sum(by_hand) / 5, rel=1e-5)


# ---------------------------------------------------------------- 3. temperature

@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_T_squared_scaling(T):
    """kl_div(T) = T**2 * KL(softmax(t/T) || softmax(s/T)), written out from the definition."""
    s, t = make_logits(4, 6, seed=7)
    by_def = T**2 * ref_kl(ref_probs(t, T), ref_probs(s, T)).mean()
    close(kl_div(s, t, torch.ones(4, dtype=torch.bool), T), by_def)
    if T != 1.0:  # and the scale factor is really there: the bare divergence differs
        assert not torch.isclose(kl_div(s, t, torch.ones(4, dtype=torch.bool), T).double(), by_def / T**2)


@pytest.mark.parametrize("Tc, T", [(1.0, 2.0), (2.0, 1.0), (0.7, 1.3), (1.5, 0.5)])
def test_retempering_matches_the_documented_rule(Tc, T):
    V, k = 12, 4
    s, t = make_logits(6, V, seed=8)
    sp = make_sparse(t, k, Tc)
    close(sparse_teacher_buckets(sp, T, V).exp(), ref_teacher_buckets(sp.ids, sp.logprobs, Tc, T, V))
    for kind, beta in KINDS:
        close(kl_per_position(s, sp, T, kind, beta), ref_kl_per_position(s, sp, T, kind, beta))


@pytest.mark.parametrize("Tc, T", [(1.0, 2.0), (2.0, 0.5)])
def test_retempered_listed_tokens_are_exact_up_to_the_normaliser(Tc, T):
    """Ratios among the k listed tokens at T equal those of the real teacher at T."""
    V, k = 10, 3
    _, t = make_logits(5, V, seed=9)
    sp = make_sparse(t, k, Tc)
    listed = sparse_teacher_buckets(sp, T, V).exp()[:, :k].double()
    true = ref_probs(t, T).gather(-1, sp.ids)
    close(listed / listed[:, :1], true / true[:, :1])


@pytest.mark.parametrize("T", [0.5, 1.0, 2.5])
def test_retempering_changes_nothing_at_the_capture_temperature(T):
    V, k = 9, 3
    s, t = make_logits(5, V, seed=10)
    sp = make_sparse(t, k, T)
    exact = torch.cat([sp.logprobs.double().exp(), 1 - sp.logprobs.double().exp().sum(-1, keepdim=True)], -1)
    close(sparse_teacher_buckets(sp, T, V).exp(), exact)
    # and the loss uses the captured numbers untouched: the KL of the exact buckets
    close(kl_per_position(s, sp, T), T**2 * ref_kl(exact, ref_student_buckets(s, sp.ids, T)))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_retempering_with_every_token_listed_stays_finite(kind):
    """k == V leaves no unlisted token to carry a tail; the loss must not turn into inf/NaN."""
    V = 6
    s, t = make_logits(4, V, seed=11)
    sp = make_sparse(t, V, Tc=1.0)
    s = s.clone().requires_grad_()
    per = kl_per_position(s, sp, 2.0, kind, 0.5)
    per.sum().backward()
    assert torch.isfinite(per).all() and torch.isfinite(s.grad).all()
    # all of the distribution is listed, so it is the dense KL (up to the 1e-7 tail floor)
    close(per, ref_kl_per_position(s.detach(), t, 2.0, kind, 0.5), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 4. JSD endpoints

@pytest.mark.smoke
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_jsd_endpoints_are_the_two_kls(teacher):
    s, t = make_logits(6, 8, seed=12)
    tt = t if teacher == "dense" else make_sparse(t, 3, Tc=1.5)
    fwd = ref_kl_per_position(s, tt, 1.5, "forward_kl")
    rev = ref_kl_per_position(s, tt, 1.5, "reverse_kl")
    assert not torch.allclose(fwd, rev, rtol=1e-2)  # so the two checks below are distinct
    close(kl_per_position(s, tt, 1.5, "jsd", beta=0.0), fwd)
    close(kl_per_position(s, tt, 1.5, "jsd", beta=1.0), rev)


@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_jsd_endpoints_are_the_limits(teacher):
    """JSD/beta -> KL(t||s) as beta -> 0 and JSD/(1-beta) -> KL(s||t) as beta -> 1: the gap
    shrinks roughly linearly in beta, and at 1e-4 it is within 1% (fp32 cancellation in
    KL(s||m) = O(beta**2) limits how close it can get)."""
    s, t = make_logits(6, 8, seed=13)
    tt = t if teacher == "dense" else make_sparse(t, 3)
    fwd, rev = ref_kl_per_position(s, tt, kind="forward_kl"), ref_kl_per_position(s, tt, kind="reverse_kl")
    gaps = []
    for b in (0.3, 0.03, 0.003):
        gaps.append((kl_per_position(s, tt, kind="jsd", beta=b).double() / b - fwd).abs().max())
    assert gaps[0] > gaps[1] > gaps[2]
    close(kl_per_position(s, tt, kind="jsd", beta=1e-4).double() / 1e-4, fwd, rtol=1e-2, atol=1e-3)
    b = 1 - 1e-4
    close(kl_per_position(s, tt, kind="jsd", beta=b).double() / (1 - b), rev, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- 5. properties (hypothesis)

@st.composite
def problems(draw, sparse=None):
    """Small random student/teacher problems built from a seed."""
    seed = draw(st.integers(0, 2**31 - 1))
    N, V = draw(st.integers(1, 6)), draw(st.integers(2, 12))
    k = draw(st.integers(1, V))  # k == V included: every token listed
    T = draw(st.sampled_from([0.5, 1.0, 2.0]))
    Tc = draw(st.sampled_from([T, 1.0, 3.0]))
    kind, beta = draw(st.sampled_from(KINDS + [("jsd", 0.0), ("jsd", 1.0)]))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    is_sparse = draw(st.booleans()) if sparse is None else sparse
    s, t = make_logits(N, V, seed, scale)
    teacher = make_sparse(t, k, Tc) if is_sparse else t
    return dict(s=s, t=t, teacher=teacher, T=T, kind=kind, beta=beta, seed=seed, k=k)


def _cat_teacher(a, b):
    if isinstance(a, SparseTeacher):
        return SparseTeacher(torch.cat([a.ids, b.ids]), torch.cat([a.logprobs, b.logprobs]), a.temperature)
    return torch.cat([a, b])


@pytest.mark.smoke
@HYP
@given(problems())
def test_divergence_is_non_negative(pr):
    per = kl_per_position(pr["s"], pr["teacher"], pr["T"], pr["kind"], pr["beta"])
    assert torch.isfinite(per).all()
    assert (per >= -1e-6).all(), per


@HYP
@given(problems(sparse=False), st.floats(-50, 50))
def test_divergence_is_zero_when_student_equals_dense_teacher(pr, shift):
    s = pr["s"]  # a constant shift of the logits is the same distribution
    per = kl_per_position(s, s + shift, pr["T"], pr["kind"], pr["beta"])
    torch.testing.assert_close(per, torch.zeros_like(per), rtol=0, atol=2e-5)


@HYP
@given(problems(sparse=True))
def test_divergence_is_zero_when_sparse_teacher_is_the_students_own_topk(pr):
    T = pr["T"]
    own = make_sparse(pr["s"], pr["k"], Tc=T)  # teacher = student, captured at the temperature used
    per = kl_per_position(pr["s"], own, T, pr["kind"], pr["beta"])
    torch.testing.assert_close(per, torch.zeros_like(per), rtol=0, atol=1e-6)


@HYP
@given(problems(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_masked_positions_change_nothing(pr, n_pad, seed):
    """Extra positions with garbage logits (huge, unrelated) and garbage teacher rows, masked
    out, leave every component exactly where it was."""
    s, teacher, N = pr["s"], pr["teacher"], pr["s"].shape[0]
    V = s.shape[1]
    g = _gen(seed)
    junk_s = torch.randn(n_pad, V, generator=g) * 1e4
    junk_t = make_sparse(torch.randn(n_pad, V, generator=g) * 1e4, pr["k"], teacher.temperature) \
        if isinstance(teacher, SparseTeacher) else torch.randn(n_pad, V, generator=g) * 1e4
    mask = torch.ones(N, dtype=torch.bool)
    args = (pr["T"], pr["kind"], pr["beta"])
    a = kl_div(s, teacher, mask, *args)
    b = kl_div(torch.cat([s, junk_s]), _cat_teacher(teacher, junk_t),
               torch.cat([mask, torch.zeros(n_pad, dtype=torch.bool)]), *args)
    assert torch.equal(a, b)
    labels = torch.randint(0, V, (N,), generator=g)
    ca = ce_teacher(s, labels)
    cb = ce_teacher(torch.cat([s, junk_s]), torch.cat([labels, torch.full((n_pad,), IGNORE)]))
    torch.testing.assert_close(ca, cb, rtol=1e-6, atol=0)


@HYP
@given(problems(), st.integers(1, 5), st.integers(0, 2**31 - 1), st.sampled_from([None, 1, 2, 7]))
def test_masked_positions_change_nothing_in_kd_loss(pr, n_pad, seed, chunk):
    hidden, weight, tgt, extra = make_kd_problem(N=7, seed=pr["seed"] % 1000, teacher="sparse")
    g = _gen(seed)
    pad = Targets(torch.cat([tgt.labels, torch.full((n_pad,), IGNORE)]),
                  torch.cat([tgt.is_ref, torch.rand(n_pad, generator=g) > 0.5]),
                  torch.cat([tgt.kl_mask, torch.zeros(n_pad, dtype=torch.bool)]),
                  tgt.n_kl, tgt.n_ce_teacher, tgt.n_ce_ground_truth,
                  _cat_teacher(tgt.sparse, make_sparse(torch.randn(n_pad, 17, generator=g) * 1e3, 4)))
    junk = torch.randn(n_pad, hidden.shape[1], generator=g) * 100
    a, gha, gwa = run_kd(hidden, weight, tgt, extra, chunk, T=pr["T"], kind=pr["kind"], beta=pr["beta"])
    b, ghb, gwb = run_kd(torch.cat([hidden, junk]), weight, pad, extra, chunk, T=pr["T"], kind=pr["kind"],
                         beta=pr["beta"])
    for c in a:
        torch.testing.assert_close(a[c], b[c], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ghb[: hidden.shape[0]], gha, rtol=1e-6, atol=1e-7)
    assert torch.equal(ghb[hidden.shape[0]:], torch.zeros_like(junk))
    torch.testing.assert_close(gwb, gwa, rtol=1e-5, atol=1e-7)


@pytest.mark.smoke
@HYP
@given(problems())
def test_all_masked_gives_exactly_zero(pr):
    s, N = pr["s"], pr["s"].shape[0]
    none = torch.zeros(N, dtype=torch.bool)
    for norm in (None, 0):  # a step with no valid tokens at all passes a zero count
        kl = kl_div(s, pr["teacher"], none, pr["T"], pr["kind"], pr["beta"], normalizer=norm)
        ce = ce_teacher(s, torch.full((N,), IGNORE), normalizer=norm)
        cg = ce_ground_truth(s, torch.full((N,), IGNORE), normalizer=norm)
        for v in (kl, ce, cg):
            assert v.item() == 0.0 and not v.isnan()


@pytest.mark.smoke
@pytest.mark.parametrize("N", [0, 5])  # 0: a micro-batch whose rows are all padding
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
def test_kd_loss_all_masked_gives_exactly_zero(N, chunk, teacher):
    hidden, weight, tgt, extra = make_kd_problem(N=7, teacher=teacher)
    sp = tgt.sparse[:N] if tgt.sparse is not None else None
    empty = Targets(torch.full((N,), IGNORE), tgt.is_ref[:N], torch.zeros(N, dtype=torch.bool), 0, 0, 0, sp)
    extra = {k: v[:N] if k == "teacher_hidden" else v for k, v in extra.items()}
    out, gh, gw = run_kd(hidden[:N], weight, empty, extra, chunk)
    for c in ("kl_div", "ce_teacher", "ce_ground_truth", "total"):
        assert out[c].item() == 0.0, c
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@HYP
@given(problems(), st.integers(1, 9), st.booleans())
def test_chunked_equals_unchunked(pr, chunk, sparse):
    """Random chunk sizes, most of which do not divide N = 7."""
    hidden, weight, tgt, extra = make_kd_problem(N=7, seed=pr["seed"] % 1000,
                                                 teacher="sparse" if sparse else "dense", Tc=1.0)
    args = dict(T=pr["T"], kind=pr["kind"], beta=pr["beta"])
    a, gha, gwa = run_kd(hidden, weight, tgt, extra, None, **args)
    b, ghb, gwb = run_kd(hidden, weight, tgt, extra, chunk, **args)
    for c in a:
        torch.testing.assert_close(b[c], a[c], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghb, gha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gwb, gwa, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 6. chunked vs plain kd_loss

N_KD = 11


@pytest.mark.parametrize("chunk", [1, 3, N_KD, N_KD + 5])
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
@pytest.mark.parametrize("kind, beta", KINDS[:3], ids=KIND_IDS[:3])
def test_chunked_kd_loss_equals_plain_fp32(teacher, kind, beta, chunk):
    hidden, weight, tgt, extra = make_kd_problem(N=N_KD, teacher=teacher, Tc=2.0)
    a, gha, gwa = run_kd(hidden, weight, tgt, extra, None, kind=kind, beta=beta)
    b, ghb, gwb = run_kd(hidden, weight, tgt, extra, chunk, kind=kind, beta=beta)
    assert set(a) == set(b) == {"kl_div", "ce_teacher", "ce_ground_truth", "total"}
    for c in a:
        assert a[c] > 0, c  # every component has signal here, so agreement means something
        torch.testing.assert_close(b[c], a[c], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghb, gha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gwb, gwa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 4, N_KD + 5])
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
def test_static_shape_padding_equals_plain(teacher, chunk, monkeypatch):
    """The path that CUDA compiles (compile=True) pads a short last chunk to the static chunk
    size; run it eagerly here: the pad rows must change nothing, for a stored or online teacher."""
    import kdtrain.losses as losses

    monkeypatch.setitem(losses._COMPILED, "fn", losses._objective)
    hidden, weight, tgt, extra = make_kd_problem(N=N_KD, teacher=teacher, Tc=2.0)
    a, gha, gwa = run_kd(hidden, weight, tgt, extra, None)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = kd_loss(h, w, tgt, WEIGHTS, 1.5, "jsd", 0.3, chunk_size=chunk, compile=True, **extra)
    b["total"].backward()
    for c in a:
        torch.testing.assert_close(b[c], a[c], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((h.grad, w.grad), (gha, gwa), rtol=1e-5, atol=1e-5)


@pytest.mark.smoke
def test_chunked_kd_loss_equals_plain_smoke():
    hidden, weight, tgt, extra = make_kd_problem(N=N_KD, teacher="sparse", Tc=2.0)
    a, gha, gwa = run_kd(hidden, weight, tgt, extra, None)
    b, ghb, gwb = run_kd(hidden, weight, tgt, extra, 3)
    for c in a:
        torch.testing.assert_close(b[c], a[c], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((ghb, gwb), (gha, gwa), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, N_KD + 5])
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
def test_chunked_kd_loss_bf16(teacher, chunk):
    """bf16 hidden/weight (and online teacher): chunked vs plain, both bf16, agree within
    rtol = atol = 2e-2 for values and gradients (bf16 keeps 8 bits of mantissa, ~4e-3 per
    rounding; the chunked path sums the weight gradient in fp32 and the plain one rounds the
    whole matmul to bf16). Both stay within 5e-2 of the fp32 plain path; outputs keep dtypes."""
    hidden, weight, tgt, extra = make_kd_problem(N=N_KD, teacher=teacher, Tc=2.0)
    a, gha, gwa = run_kd(hidden, weight, tgt, extra, None, dtype=torch.bfloat16)
    b, ghb, gwb = run_kd(hidden, weight, tgt, extra, chunk, dtype=torch.bfloat16)
    f, ghf, gwf = run_kd(hidden, weight, tgt, extra, None)
    assert b["total"].dtype == torch.float32 and ghb.dtype == gwb.dtype == torch.bfloat16
    for c in a:
        torch.testing.assert_close(b[c], a[c], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(b[c], f[c], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(ghb, gha, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gwb, gwa, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ghb.float(), ghf, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gwb.float(), gwf, rtol=5e-2, atol=5e-2)


@pytest.mark.smoke
@pytest.mark.parametrize("chunk", [None, 3])
def test_only_total_carries_gradient(chunk):
    hidden, weight, tgt, extra = make_kd_problem()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = kd_loss(h, w, tgt, WEIGHTS, chunk_size=chunk)
    assert out["total"].requires_grad
    for c in ("kl_div", "ce_teacher", "ce_ground_truth"):
        assert not out[c].requires_grad, c
    # the upstream gradient scales the gradient (a fresh forward each time: the chunked path
    # hands its precomputed gradients over once)
    (gh1,) = torch.autograd.grad(out["total"], h)
    out3 = kd_loss(h, w, tgt, WEIGHTS, chunk_size=chunk)
    (gh3,) = torch.autograd.grad(3 * out3["total"], h)
    torch.testing.assert_close(gh3, 3 * gh1)
    if chunk is not None:
        again = kd_loss(h, w, tgt, WEIGHTS, chunk_size=chunk)
        torch.autograd.grad(again["total"], h, retain_graph=True)
        with pytest.raises(RuntimeError, match="ran twice"):
            torch.autograd.grad(again["total"], h)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("teacher", ["sparse", "dense"])
@pytest.mark.parametrize("split", [[5], [3, 9]])
def test_step_normalisers_make_accumulation_invariant(teacher, chunk, split):
    """Micro-batches carrying the global counts sum to the one-batch losses and gradients."""
    hidden, weight, tgt, extra = make_kd_problem(N=N_KD, teacher=teacher)
    one, gh1, gw1 = run_kd(hidden, weight, tgt, extra, chunk)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    acc = dict.fromkeys(one, 0.0)
    bounds = [0, *split, N_KD]
    for lo, hi in zip(bounds, bounds[1:]):
        sl = slice(lo, hi)
        micro = Targets(tgt.labels[sl], tgt.is_ref[sl], tgt.kl_mask[sl], tgt.n_kl, tgt.n_ce_teacher,
                        tgt.n_ce_ground_truth, tgt.sparse[sl] if tgt.sparse is not None else None)
        ex = {k: v[sl] if k == "teacher_hidden" else v for k, v in extra.items()}
        out = kd_loss(h[sl], w, micro, WEIGHTS, 1.5, "jsd", 0.3, chunk_size=chunk, **ex)
        out["total"].backward()  # gradients accumulate as in the trainer
        for c in acc:
            acc[c] = acc[c] + out[c].detach()
    for c in one:
        torch.testing.assert_close(acc[c], one[c].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, gh1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, gw1, rtol=1e-6, atol=1e-6)


# ---- re-tempering the sparse teacher; masks ----

@pytest.mark.smoke
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_covering_the_whole_vocabulary_retempers_exactly(kind):
    """k = V at a training temperature below the capture one: teacher = student (both uniform)
    must give 0 (it gave 15.9 when the floored tail was re-tempered as if it were mass)."""
    V = 1000
    ids = torch.arange(V).repeat(3, 1)
    lp = torch.full((3, V), -math.log(V))
    got = kl_div(torch.zeros(3, V), SparseTeacher(ids, lp, 4.0), torch.ones(3, dtype=torch.bool), 1.0, kind=kind)
    assert got.item() == pytest.approx(0.0, abs=1e-5)
    # and a non-uniform one: k = V re-tempered equals the dense teacher at T
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    lp = torch.log_softmax(logits * 0.25, -1).float()  # captured at T_c = 4
    s = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    sparse = kl_div(s, SparseTeacher(ids, lp, 4.0), torch.ones(3, dtype=torch.bool), 1.0, kind=kind)
    dense = kl_div(s, logits.float(), torch.ones(3, dtype=torch.bool), 1.0, kind=kind)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-4)


def test_retempering_starts_from_the_true_tail_not_the_floor():
    """A confident teacher (tail 1e-10 beyond its top 64, V = 32,000) captured at T = 1, used at
    T = 2. Reference: the full distribution re-tempered in float64, softmax(log p / 2): its tail
    is 0.165%. The floored tail (1e-7) re-tempered gave 5.3%; fp32 log-probs carry the true tail
    to about +-50% (the rounding of 63 log-probs near -13), which the square root halves."""
    V = 32000
    p = torch.zeros(V, dtype=torch.float64)
    p[0], p[1:64], p[64:] = 0.9999, (1e-4 - 1e-10) / 63, 1e-10 / (V - 64)
    exact = torch.softmax(p.log() / 2, -1)[64:].sum().item()
    buckets = sparse_teacher_buckets(SparseTeacher(torch.arange(64)[None], p.log().float()[None, :64], 1.0), 2.0, V)
    assert exact == pytest.approx(0.00165, rel=0.01)
    assert buckets[0, -1].exp().item() == pytest.approx(exact, rel=0.3)
    assert buckets[0, :-1].exp().sum().item() == pytest.approx(1 - exact, rel=1e-3)


@pytest.mark.smoke
def test_kl_div_reads_an_integer_mask_as_boolean():
    """A 0/1 integer mask used to index rows 0 and 1 (advanced indexing) and return a wrong value."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    as_bool = torch.tensor([True, False, True, True])
    want = kl_div(s, t, as_bool).item()
    assert kl_div(s, t, as_bool.long()).item() == pytest.approx(want, rel=1e-6)
    reference = ref_kl(ref_probs(t[as_bool]), ref_probs(s[as_bool])).mean().item()
    assert want == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ValueError, match="boolean"):
        kl_div(s, t, torch.tensor([0, 2, 1, 1]))
