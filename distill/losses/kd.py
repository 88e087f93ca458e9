"""Sparse knowledge-distillation losses over cached teacher targets (pure torch, no Lightning).

``kd_loss`` is the KD objective's loss on P trainable positions: student logits (P, V), their labels and
the teacher's ``teacher_buckets`` -> alpha * T**2 * KD + (1 - alpha) * CE per position (P,). It is two
steps: ``student_log_probs`` makes the one pass over the vocabulary (a log-softmax at T) and picks what
the divergence reads of it, the (P, M) log-probs at the teacher's head ids (and draws, for
``sampled_ce``); ``kd_terms`` computes everything else from those (P, M) values. The KD objective runs
the first chunk by chunk (each chunk's (chunk, V) logits recomputed in backward) and the second once
over the batch, so its per-position work costs no extra small ops per chunk. The teacher side has no
gradient and depends on no student: the caller computes ``teacher_buckets`` once per batch.
The caller sums and divides by the number of trainable tokens in the whole gradient-accumulation
step (TRL #6006 normalised per micro-batch); nothing is averaged here.

Buckets: the teacher is known on K exact head tokens; the rest of its mass goes into one tail bucket,
computed in log space. The student is bucketed the same way (its mass on the head ids and on all other
ids), so each divergence is exact between two (K + 1)-point distributions; with K == V it is the dense one.
The student's tail is log(1 - head mass) from its K head log-probs (no second pass over the vocabulary).

Temperature: the teacher's full log-sum-exp at T is not recoverable from top-K + lse. The tail is modelled
as V - K tokens sharing one logit ``z_tail = lse + log_tail - log(V - K)`` (exact at T = 1), so
``lse_T = logsumexp([head / T, z_tail / T + log(V - K)])``. The divergences are returned at temperature T;
``kd_loss`` multiplies them by T**2, which keeps gradient magnitudes comparable across T (Hinton et al.).

Padding: a head slot whose teacher logit is -inf carries no mass on either side. ``mix_teachers`` pads
that way, repeating the row's last id so that ``ids`` stays non-decreasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.targets import SparseTargets

# Floor on the teacher's tail log-mass: a float32 lse resolves the tail only to ~1e-7 of the total, and a
# tail rounded to exactly 0 would make the reverse KL infinite wherever the student keeps any tail mass.
TAIL_LOG_FLOOR = -30.0


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least (bf16 logits are upcast per chunk); float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _log(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf (Mächler 2012); x >= 0 gives -inf."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_tail_mass(targets: SparseTargets) -> Tensor:
    """(P,) log of the teacher's mass outside its head at T = 1: log1p(-exp(logsumexp(head) - lse))."""
    dtype = _compute_dtype(targets.logits, targets.lse)
    log_head = torch.logsumexp(targets.logits.to(dtype), -1) - targets.lse.to(dtype)
    return _log1mexp(log_head)  # rounding can put log_head above 0: clamped, so the tail is -inf, not NaN


def teacher_bucket_logits(targets: SparseTargets, vocab_size: int, temperature: float = 1.0) -> Tensor:
    """(P, K + 1) teacher logits at temperature T of the K head tokens and the tail bucket.

    Their logsumexp is the approximate ``lse_T`` of the module docstring (equal to ``targets.lse`` at T = 1).
    """
    dtype = _compute_dtype(targets.logits, targets.lse)
    head = targets.logits.to(dtype)
    n_tail = vocab_size - torch.isfinite(head).sum(-1)  # (P,) tokens outside the head
    log_n = torch.log(n_tail.clamp(min=1).to(dtype))
    log_tail = log_tail_mass(targets).clamp(min=TAIL_LOG_FLOOR)
    tail = (targets.lse.to(dtype) + log_tail - log_n) / temperature + log_n
    tail = tail.masked_fill(n_tail <= 0, float("-inf"))  # K == V: no tail
    return torch.cat([head / temperature, tail[:, None]], -1)


@dataclass
class TeacherBuckets:
    """The teacher as the losses read it, at temperature T (no gradient: computed once per batch)."""

    ids: Tensor  # (P, K) the head token ids
    log_probs: Tensor  # (P, K + 1) log-probs of the head tokens and the tail (last); -inf where empty
    sample_ids: Tensor | None = None  # (P, S) draws of a sampled or hybrid cache, padded with 0
    sample_counts: Tensor | None = None  # (P, S) their counts, 0 on padding


def teacher_buckets(targets: SparseTargets, vocab_size: int, temperature: float = 1.0) -> TeacherBuckets:
    """The (K + 1)-bucket teacher distribution at temperature T of ``targets`` (see the module docstring)."""
    log_probs = teacher_bucket_logits(targets, vocab_size, temperature).log_softmax(-1)
    return TeacherBuckets(targets.ids, log_probs, targets.sample_ids, targets.sample_counts)


def _student_bucket_log_probs(head_log_probs: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(P, K + 1) student log-probs at temperature T of the head ids and of every other id (the tail).

    The tail is log(1 - head mass) from the K head log-probs, in log space (accurate while the tail is
    above ~1e-6 of the mass, where float32 log-probs resolve it; below, it is floored at TAIL_LOG_FLOOR,
    which keeps every term and gradient finite). Padded slots (``valid`` False) carry no mass.
    """
    head = head_log_probs.to(dtype)
    head_mass = torch.logsumexp(head.masked_fill(~valid, float("-inf")), -1, keepdim=True)
    tail = _log1mexp_differentiable(head_mass).clamp(min=TAIL_LOG_FLOOR)
    return torch.cat([head, tail], -1)


def _log1mexp_differentiable(x: Tensor) -> Tensor:
    """``_log1mexp`` with finite gradients everywhere: each branch sees only inputs it is finite on
    (torch.where sends 0 * inf = NaN through the branch it does not take), and x stays below 0."""
    x = x.clamp(max=-1e-20)
    near = x > -math.log(2)
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )


def _buckets(head_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student bucket log-probs (P, K + 1), both 0 at empty buckets (padding, empty tail).

    Zeroing both sides makes every divergence term exactly 0 there, with finite gradients (a masked
    inf - inf would still send NaN through the backward of torch.where).
    """
    if teacher_log_probs.shape[-1] == 1:
        raise ValueError("top-K losses need an exact head (K > 0); use sampled_ce for sampled caches")
    dtype = _compute_dtype(head_log_probs, teacher_log_probs)
    log_p = teacher_log_probs.to(dtype)
    valid = torch.isfinite(log_p)
    log_q = _student_bucket_log_probs(head_log_probs, valid[:, :-1], dtype)
    zero = log_p.new_zeros(())
    return log_p.where(valid, zero), log_q.where(valid, zero)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """(P,) KL(a || b) over buckets."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b)."""
    return torch.logsumexp(torch.stack([log_a + _log(weight_a), log_b + _log(1.0 - weight_a)]), 0)


def forward_kl(head_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """(P,) KL(teacher || student) over the head tokens plus the tail bucket (mode-covering)."""
    log_p, log_q = _buckets(head_log_probs, teacher_log_probs)
    return _kl(log_p, log_q)


def reverse_kl(head_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """(P,) KL(student || teacher) over the same buckets (MiniLLM; mode-seeking).

    Student mass outside the teacher's head is compared with the teacher's tail mass as one bucket, so
    the student is not rewarded for putting mass there nor infinitely punished (see TAIL_LOG_FLOOR).
    """
    log_p, log_q = _buckets(head_log_probs, teacher_log_probs)
    return _kl(log_q, log_p)


def jsd(head_log_probs: Tensor, teacher_log_probs: Tensor, beta: float = 0.5) -> Tensor:
    """(P,) generalised Jensen-Shannon divergence, TRL's (GKD) convention.

    m = beta * p_teacher + (1 - beta) * q_student; JSD = beta * KL(p || m) + (1 - beta) * KL(q || m).
    That expression vanishes at both ends; its limits JSD/beta (beta -> 0) and JSD/(1 - beta) (beta -> 1)
    are the forward and the reverse KL, so beta = 0 returns ``forward_kl`` and beta = 1 ``reverse_kl``
    exactly (as TRL does). Swapping the mixture weights (TRL #3043) would swap these limits.
    """
    if beta == 0.0:
        return forward_kl(head_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl(head_log_probs, teacher_log_probs)
    log_p, log_q = _buckets(head_log_probs, teacher_log_probs)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_kl(head_log_probs: Tensor, teacher_log_probs: Tensor, alpha: float = 0.1) -> Tensor:
    """(P,) DistiLLM's skew KL: KL(p || alpha * p + (1 - alpha) * q); alpha = 0 is the forward KL."""
    log_p, log_q = _buckets(head_log_probs, teacher_log_probs)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(head_log_probs: Tensor, teacher_log_probs: Tensor, alpha: float = 0.1) -> Tensor:
    """(P,) DistiLLM's skew reverse KL: KL(q || (1 - alpha) * p + alpha * q); alpha = 0 is the reverse KL."""
    log_p, log_q = _buckets(head_log_probs, teacher_log_probs)
    return _kl(log_q, _log_mix(log_p, log_q, 1.0 - alpha))


def sampled_ce(head_log_probs: Tensor, sample_log_probs: Tensor, teacher: TeacherBuckets) -> Tensor:
    """(P,) cross-entropy against a sampled (Anshumann et al. 2025) or hybrid cache, from the student's
    log-probs at temperature T at the teacher's head ids (P, K) and at its draws (P, S).

    Sampled (K = 0): -sum_i (c_i / N) log q(id_i), an unbiased estimate of H(teacher, student), whose
    gradient is the forward KL's. The value is the cross-entropy, not the KL: the teacher entropy would need
    teacher log-probs at the draws, which the cache does not keep, so values exceed ``forward_kl``'s.
    Hybrid (K > 0, draws from the tail only): -sum_head p_i log q_i - tail_mass * sum_j (c_j / N) log q_j.
    The draws were made at the cache's temperature, so T only tempers the student and the hybrid head.
    """
    dtype = _compute_dtype(sample_log_probs, teacher.log_probs)
    counts = teacher.sample_counts.to(dtype)
    freq = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)  # padding has count 0
    zero = sample_log_probs.new_zeros((), dtype=dtype)
    sampled = -(freq * sample_log_probs.to(dtype).where(counts > 0, zero)).sum(-1)
    if teacher.ids.shape[-1] == 0:
        return sampled
    p = teacher.log_probs.to(dtype).exp()  # 0 at padded slots
    head = -(p[:, :-1] * head_log_probs.to(dtype).where(p[:, :-1] > 0, zero)).sum(-1)
    return head + p[:, -1] * sampled


def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """(P,) next-token cross-entropy at T = 1 (0 at torch's ignore_index, -100)."""
    logits = student_logits.to(_compute_dtype(student_logits))
    return F.cross_entropy(logits, labels, reduction="none")


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}
"""The top-K losses by config name; each is ``fn(head_log_probs, teacher_log_probs, **params)``."""
LOSSES = (*DIVERGENCES, "sampled_ce")
"""Every KD loss name ``kd_loss`` takes (``loss: reverse_kl`` in a config)."""


class KDTerms(NamedTuple):
    """``kd_loss`` per position, each (P,)."""

    total: Tensor  # alpha * T**2 * kd + (1 - alpha) * ce: what is trained on
    kd: Tensor  # the divergence at temperature T
    ce: Tensor  # the labels' cross-entropy at T = 1; detached when alpha == 1 (then only logged)


def loss_ids(teacher: TeacherBuckets, kind: str) -> Tensor:
    """(P, M) the ids whose student log-probs the loss ``kind`` reads: the head's, then (``sampled_ce``)
    the draws'."""
    if kind != "sampled_ce":
        return teacher.ids
    if teacher.sample_ids is None or teacher.sample_counts is None:
        raise ValueError("sampled_ce needs sample_ids and sample_counts")
    return torch.cat([teacher.ids, teacher.sample_ids], 1)


def student_log_probs(
    student_logits: Tensor, ids: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The one pass over the vocabulary: (P, M) student log-probs at temperature T at ``ids``
    (``loss_ids``) and (P,) the labels' cross-entropy at T = 1.

    ``student_logits`` (P, V) over the true vocabulary (a padded head's extra rows cut off). One
    log-softmax serves both at T = 1, and one gather picks the ids' and the labels' log-probs (its
    backward is a dense (P, V) tensor, as cross-entropy's is). All that follows reads (P, M) only.
    """
    logits = student_logits.to(_compute_dtype(student_logits))  # bf16 -> float32, float64 stays
    if temperature != 1.0:
        return _LogSoftmaxGather.apply(logits / temperature, ids), cross_entropy(logits, labels)
    picked = _LogSoftmaxGather.apply(logits, torch.cat([ids, labels[:, None]], 1))
    return picked[:, :-1], -picked[:, -1]


class _LogSoftmaxGather(torch.autograd.Function):
    """``x.log_softmax(-1).gather(-1, index)`` with autograd's very gradient, made in one zeroed (P, V)
    buffer: autograd's gather backward scatters out of place into a second one, and on a CPU each extra
    (chunk, V) buffer tends to come as fresh pages from the OS (measured: KD's step then page-faulted
    7x more than cross-entropy's and ran ~10% slower)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        log_q = x.log_softmax(-1)
        ctx.save_for_backward(log_q, index)
        return log_q.gather(-1, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        log_q, index = ctx.saved_tensors
        dense = torch.zeros_like(log_q).scatter_add_(-1, index, grad)
        return torch._log_softmax_backward_data(dense, log_q, -1, log_q.dtype), None


def kd_terms(
    picked: Tensor,
    ce: Tensor,
    teacher: TeacherBuckets,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
) -> KDTerms:
    """``kd_loss`` from what ``student_log_probs`` picked of the vocabulary: per position, no (P, V).

    alpha is the weight on the KD term: 1 is pure distillation (the CE is still reported), 0 plain
    fine-tuning. beta goes to ``jsd``, skew to the ``alpha`` of ``skew_kl``/``skew_reverse_kl``.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {sorted(LOSSES)}")
    k = teacher.ids.shape[-1]
    if kind == "sampled_ce":
        kd = sampled_ce(picked[:, :k], picked[:, k:], teacher)
    else:
        params = {"jsd": {"beta": beta}, "skew_kl": {"alpha": skew}, "skew_reverse_kl": {"alpha": skew}}
        kd = DIVERGENCES[kind](picked, teacher.log_probs, **params.get(kind, {}))
    if alpha == 1.0:
        ce = ce.detach()  # logged, not trained on
    return KDTerms(alpha * temperature**2 * kd + (1.0 - alpha) * ce, kd, ce)


def kd_loss(
    student_logits: Tensor,
    teacher: TeacherBuckets,
    labels: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    **options: float,
) -> KDTerms:
    """alpha * T**2 * KD_T + (1 - alpha) * CE per position, with both terms, from whole (P, V) logits.

    ``student_logits`` (P, V) over the true vocabulary, ``teacher`` the ``teacher_buckets`` at the same
    temperature, ``labels`` (P,) the token each position predicts; ``options``: ``kd_terms``'s alpha,
    beta, skew. It is ``student_log_probs`` then ``kd_terms``: the KD objective runs the first chunk by
    chunk and the second once over the batch's positions.
    """
    picked, ce = student_log_probs(student_logits, loss_ids(teacher, kind), labels, temperature)
    return kd_terms(picked, ce, teacher, kind=kind, temperature=temperature, **options)


def mix_teachers(
    targets: list[SparseTargets], weights: list[float], vocab_size: int, temperature: float = 1.0
) -> SparseTargets:
    """Weighted mixture of teachers over the union of their head ids, as a new SparseTargets.

    A teacher's probability at a union id outside its own head is its tail spread uniformly,
    tail / (V - K), as in the tail model above. ``logits`` are the mixture's log-probs and ``lse`` is 0, so
    the tail 1 - sum stays recoverable by ``log_tail_mass``. Rows are padded to the widest union with
    logit -inf and the row's last id repeated. The mixture is taken at ``temperature``; the result is a
    plain distribution, so if T != 1 here, call the losses with temperature 1 to avoid tempering twice.
    """
    if any(t.ids.shape[-1] == 0 for t in targets):
        raise ValueError("mix_teachers needs an exact head (K > 0) from every teacher")
    total = sum(weights)
    # Union: sort all valid ids (invalid ones become the sentinel V), keep the first of each run.
    ids = torch.cat([t.ids.masked_fill(~torch.isfinite(t.logits), vocab_size) for t in targets], -1)
    ids = ids.sort(-1)[0]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first &= ids < vocab_size
    count = first.sum(-1)  # (P,) union size per row
    union = ids.masked_fill(~first, 2 * vocab_size).sort(-1)[0][:, : int(count.max())]  # (P, U) left-packed
    pad = torch.arange(union.shape[-1], device=ids.device) >= count[:, None]
    union = torch.where(pad, union.gather(1, (count - 1).clamp(min=0)[:, None]), union)

    parts = []
    for t, w in zip(targets, weights, strict=True):
        log_p = teacher_bucket_logits(t, vocab_size, temperature).log_softmax(-1)  # (P, K + 1)
        valid = torch.isfinite(t.logits)
        head_ids, order = t.ids.masked_fill(~valid, vocab_size).sort(-1)
        head_lp = log_p[:, :-1].gather(1, order)
        slot = torch.searchsorted(head_ids, union).clamp(max=head_ids.shape[-1] - 1)
        hit = head_ids.gather(1, slot) == union
        n_tail = (vocab_size - valid.sum(-1)).clamp(min=1).to(log_p.dtype)
        uniform = log_p[:, -1] - torch.log(n_tail)  # (P,) each tail token's share
        parts.append(torch.where(hit, head_lp.gather(1, slot), uniform[:, None]) + _log(w / total))
    logits = torch.logsumexp(torch.stack(parts), 0).masked_fill(pad, float("-inf"))
    return SparseTargets(ids=union, logits=logits, lse=logits.new_zeros(logits.shape[0]))


def reverse_kl_policy_gradient(student_logps: Tensor, teacher_logps: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) a loss per sampled token whose gradient, in expectation over tokens drawn from the student,
    is the gradient of the reverse KL(student || teacher) at that position, and (N,) the single-sample
    estimate of that KL, ``log q(y) - log p(y)``.

    The advantage of the sampled token y is ``log p_teacher(y) - log q_student(y)`` (detached) and the
    loss ``-advantage * log q(y)``: E_{y~q}[grad log q(y) (log q(y) - log p(y))] = grad KL(q || p), since
    E_{y~q}[grad log q(y)] = 0. Only the log-probs of the sampled tokens are needed (no distribution), so
    it is the cheapest form, and the one for a teacher that returns log-probs only.
    """
    estimate = (student_logps - teacher_logps).detach()
    return estimate * student_logps, estimate
