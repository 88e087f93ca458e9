"""Sparse KD losses against naive dense references written out with full softmaxes and explicit sums."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from distill.losses.kd import (
    LOSSES,
    cross_entropy,
    kd_loss,
    log_tail_mass,
    mix_teachers,
    teacher_bucket_logits,
    teacher_buckets,
)
from distill.objectives.kd import Distillation
from distill.targets import BatchTargets, SparseTargets
from tests.helpers import token_inputs

P, V = 7, 50
# Non-symmetric parameters, so that a swapped mixture (TRL #3043) shows up.
KINDS = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.3},
    "skew_kl": {"skew": 0.1},
    "skew_reverse_kl": {"skew": 0.2},
}


def divergence(kind: str, s: Tensor, targets: SparseTargets, temperature: float = 1.0, **params) -> Tensor:
    """(P,) the KD term of ``kd_loss``, the function the KD objective runs on each chunk of positions."""
    labels = torch.zeros(s.shape[0], dtype=torch.long)
    teacher = teacher_buckets(targets, V, temperature)
    return kd_loss(s, teacher, labels, kind=kind, temperature=temperature, alpha=1.0, **params).kd


def mask_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """A padded lm_head's logits (e.g. Qwen's 152064 rows over 151936 tokens) as the objective sees them.

    -inf, not 0: a 0 logit would give every padding row real probability mass. Out of place, so autograd
    gives those rows zero gradient.
    """
    if logits.shape[-1] <= vocab_size:
        return logits
    padded = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    return logits.masked_fill(padded, float("-inf"))


def slice_targets(targets: SparseTargets, index: slice) -> SparseTargets:
    """The positions ``index`` of every per-position field."""
    return SparseTargets(
        ids=targets.ids[index],
        logits=targets.logits[index],
        lse=targets.lse[index],
        sample_ids=None if targets.sample_ids is None else targets.sample_ids[index],
        sample_counts=None if targets.sample_counts is None else targets.sample_counts[index],
    )


def logits(seed: int, rows: int = P, vocab: int = V, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale


def top_k(z: torch.Tensor, k: int) -> SparseTargets:
    ids = z.topk(k, -1).indices.sort(-1).values
    return SparseTargets(ids=ids, logits=z.gather(1, ids), lse=z.logsumexp(-1))


def bucket(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Dense (P, V) probabilities -> (P, K + 1): the head probabilities and 1 - their sum."""
    head = probs.gather(1, ids)
    return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def dense_reference(kind: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, skew: float = 0.1):
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    return kl(q, (1 - skew) * p + skew * q)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_full_vocab_head_matches_dense(kind, temperature):
    z, s = logits(0), logits(1)
    p, q = (z / temperature).softmax(-1), (s / temperature).softmax(-1)
    loss = divergence(kind, s, top_k(z, V), temperature, **KINDS[kind])
    assert loss.shape == (P,)
    assert_close(loss, dense_reference(kind, p, q, **KINDS[kind]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_matches_bucketed_dense(kind):
    z, s = logits(2), logits(3)
    targets = top_k(z, 8)
    p, q = bucket(z.softmax(-1), targets.ids), bucket(s.softmax(-1), targets.ids)
    loss = divergence(kind, s, targets, **KINDS[kind])
    assert_close(loss, dense_reference(kind, p, q, **KINDS[kind]), atol=1e-10, rtol=0)
    assert (loss > 1e-3).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("k", "temperature"), [(8, 1.0), (V, 2.0)])
def test_zero_when_student_equals_teacher(kind, k, temperature):
    z = logits(4)
    loss = divergence(kind, z + 3.0, top_k(z, k), temperature, **KINDS[kind])  # shift: same softmax
    assert_close(loss, torch.zeros(P, dtype=z.dtype), atol=1e-12, rtol=0)


def test_jsd_endpoints_are_the_two_kls():
    z, s = logits(5), logits(6)
    targets = top_k(z, 8)
    fwd, rev = divergence("forward_kl", s, targets), divergence("reverse_kl", s, targets)
    assert torch.equal(divergence("jsd", s, targets, beta=0.0), fwd)
    assert torch.equal(divergence("jsd", s, targets, beta=1.0), rev)
    # The endpoints are the limits of JSD / beta and JSD / (1 - beta): the mixture is not swapped.
    eps = 1e-8
    assert_close(divergence("jsd", s, targets, beta=eps) / eps, fwd, rtol=1e-5, atol=0)
    assert_close(divergence("jsd", s, targets, beta=1 - eps) / eps, rev, rtol=1e-5, atol=0)
    assert not torch.allclose(fwd, rev, rtol=0.1)


def test_tail_mass_matches_dense_one_minus_head():
    z = logits(7)
    targets = top_k(z, 8)
    expected = 1 - z.softmax(-1).gather(1, targets.ids).sum(-1)
    assert_close(log_tail_mass(targets).exp(), expected, atol=1e-12, rtol=0)


def test_tiny_tail_stays_accurate_in_log_space():
    k, tail = 5, 1e-9
    a = math.log(tail * k / ((V - k) * (1 - tail)))  # logit of each of the V - k tail tokens
    z = torch.zeros(P, V, dtype=torch.float64)
    z[:, k:] = a
    targets = top_k(z, k)
    expected = (V - k) * math.exp(a) / (k + (V - k) * math.exp(a))  # summed directly, no cancellation
    expected = torch.full((P,), math.log(expected), dtype=z.dtype)
    assert_close(log_tail_mass(targets), expected, atol=1e-6, rtol=0)  # relative error 1e-6 on a 1e-9 tail
    s = logits(8).requires_grad_()
    for kind, kw in KINDS.items():
        loss = divergence(kind, s, targets, **kw)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_head_holding_all_mass_gives_no_nan(kind):
    # float32 rounding can leave lse a hair below logsumexp(head): the tail must become 0, not NaN.
    z = logits(9).float()
    targets = top_k(z, 8)
    targets.lse = targets.logits.logsumexp(-1) - 1e-6
    assert torch.isneginf(log_tail_mass(targets)).all()
    s = logits(10).float().requires_grad_()
    loss = divergence(kind, s, targets, 2.0, **KINDS[kind])
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    assert (loss > 0).all()


def test_temperature_one_keeps_the_stored_lse():
    targets = top_k(logits(11), 8)
    assert_close(teacher_bucket_logits(targets, V, 1.0).logsumexp(-1), targets.lse, atol=1e-12, rtol=0)


def test_full_head_retempers_exactly():
    z, t = logits(12), 2.0
    targets = top_k(z, V)
    log_p = teacher_bucket_logits(targets, V, t).log_softmax(-1)
    assert_close(log_p[:, :-1], (z / t).log_softmax(-1).gather(1, targets.ids), atol=1e-12, rtol=0)
    assert torch.isneginf(log_p[:, -1]).all()


def test_retempering_treats_the_tail_as_equal_logits():
    z, k, t = logits(13), 8, 2.0
    targets = top_k(z, k)
    tail = 1 - z.softmax(-1).gather(1, targets.ids).sum(-1, keepdim=True)
    flat = torch.empty_like(z).copy_(z.logsumexp(-1, keepdim=True) + tail.log() - math.log(V - k))
    flat.scatter_(1, targets.ids, targets.logits)  # head exact, the V - k tail tokens share one logit
    expected = bucket((flat / t).softmax(-1), targets.ids)
    assert_close(teacher_bucket_logits(targets, V, t).softmax(-1), expected, atol=1e-12, rtol=0)


def sample_targets(p: torch.Tensor, draws: int, head: SparseTargets | None, seed: int) -> SparseTargets:
    """Draw from p (from p's tail only when a head is given), packed as unique ids padded with id 0."""
    if head is not None:
        p = p.scatter(1, head.ids, 0.0)
    idx = torch.multinomial(p, draws, replacement=True, generator=torch.Generator().manual_seed(seed))
    ones = torch.ones_like(idx, dtype=torch.int32)
    counts = torch.zeros(p.shape, dtype=torch.int32).scatter_add_(1, idx, ones)
    ids = torch.sort((counts == 0).to(torch.int8), dim=-1, stable=True).indices  # drawn ids first, ascending
    ids = ids[:, : int((counts > 0).sum(-1).max())]
    c = counts.gather(1, ids)
    empty = torch.empty(p.shape[0], 0)
    head = head or SparseTargets(ids=empty.long(), logits=empty.double(), lse=torch.zeros(p.shape[0]))
    return SparseTargets(head.ids, head.logits, head.lse, ids.masked_fill(c == 0, 0), c)


def rows(targets: SparseTargets, repeat: int) -> SparseTargets:
    fields = (targets.ids, targets.logits, targets.lse)
    return SparseTargets(*(x.repeat_interleave(repeat, 0) for x in fields))


@pytest.mark.parametrize("hybrid", [False, True])
def test_sampled_ce_estimates_dense_cross_entropy(hybrid):
    z, s = logits(14), logits(15, scale=1.0)  # a milder student keeps the estimator's spread ~2e-3
    p = z.softmax(-1)
    head = top_k(z, 5) if hybrid else None
    targets = sample_targets(p, 200_000, head, seed=0)
    dense_ce = -(p * s.log_softmax(-1)).sum(-1)
    assert_close(divergence("sampled_ce", s, targets), dense_ce, atol=1e-2, rtol=0)


@pytest.mark.parametrize("hybrid", [False, True])
def test_sampled_ce_gradient_is_unbiased(hybrid):
    z, draws = logits(16), 8000
    p = z.softmax(-1)
    s = logits(17).requires_grad_()
    dense = -(p * s.log_softmax(-1)).sum()
    (dense_grad,) = torch.autograd.grad(dense, s)
    # 8000 independent caches of 12 draws each, one row per draw.
    head = rows(top_k(z, 5), draws) if hybrid else None
    targets = sample_targets(p.repeat_interleave(draws, 0), 12, head, seed=1)
    assert (targets.sample_counts == 0).any()  # padded draws are exercised
    sampled = divergence("sampled_ce", s.repeat_interleave(draws, 0), targets).sum() / draws
    (grad,) = torch.autograd.grad(sampled, s)
    assert_close(grad, dense_grad, atol=1e-2, rtol=0)
    assert_close(sampled, dense, atol=5e-2, rtol=0)


def sparse(ids: list[list[int]], probs: list[list[float]]) -> SparseTargets:
    logp = torch.tensor(probs, dtype=torch.float64).log()
    return SparseTargets(ids=torch.tensor(ids), logits=logp, lse=torch.zeros(len(ids), dtype=torch.float64))


def test_mix_teachers_by_hand():
    # V = 6, K = 2. Teacher A leaves 0.2 for its 4 tail tokens (0.05 each), so does B.
    a = sparse([[0, 1], [3, 4]], [[0.5, 0.3], [0.7, 0.1]])
    b = sparse([[1, 2], [3, 4]], [[0.6, 0.2], [0.4, 0.4]])
    mix = mix_teachers([a, b], [1.0, 1.0], vocab_size=6)  # weights normalised to 0.5 / 0.5
    # Row 0: m(0) = (0.5 + 0.05) / 2, m(1) = (0.3 + 0.6) / 2, m(2) = (0.05 + 0.2) / 2; ids 3-5 hold 0.15.
    # Row 1: union {3, 4}, padded to width 3 with id 4 repeated and logit -inf.
    assert mix.ids.tolist() == [[0, 1, 2], [3, 4, 4]]
    expected = torch.tensor([[0.275, 0.45, 0.125], [0.55, 0.25, 0.0]], dtype=torch.float64)
    assert_close(mix.logits.exp(), expected, atol=1e-12, rtol=0)
    assert torch.isneginf(mix.logits[1, 2])
    assert_close(log_tail_mass(mix).exp(), torch.tensor([0.15, 0.2], dtype=torch.float64), atol=1e-12, rtol=0)


def dense_tempered_approximation(targets: SparseTargets, t: float) -> torch.Tensor:
    """(P, V) the full distribution the tail model implies: exact head, tail tokens sharing one logit."""
    n = V - targets.ids.shape[-1]
    tail = 1 - (targets.logits - targets.lse[:, None]).exp().sum(-1, keepdim=True)
    full = (targets.lse[:, None] + tail.log() - math.log(n)).expand(-1, V).clone()
    return (full.scatter(1, targets.ids, targets.logits) / t).softmax(-1)


def test_mix_teachers_matches_dense_mixture():
    a, b = top_k(logits(18), 3), top_k(logits(19), 4)
    t, wa, wb = 1.5, 0.7, 0.3
    mix = mix_teachers([a, b], [wa, wb], vocab_size=V, temperature=t)
    dense = wa * dense_tempered_approximation(a, t) + wb * dense_tempered_approximation(b, t)
    real = torch.isfinite(mix.logits)
    for row in range(P):
        union = torch.cat([a.ids[row], b.ids[row]]).unique()
        assert mix.ids[row, real[row]].tolist() == union.tolist()
    assert (mix.ids[:, 1:] >= mix.ids[:, :-1]).all()
    assert_close(mix.logits.exp(), dense.gather(1, mix.ids) * real, atol=1e-12, rtol=0)
    expected_tail = 1 - (dense.gather(1, mix.ids) * real).sum(-1)
    assert_close(log_tail_mass(mix).exp(), expected_tail, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", [*KINDS, "sampled_ce"])
def test_padded_head_slots_contribute_nothing(kind):
    mix = mix_teachers([top_k(logits(20, scale=4.0), 3), top_k(logits(21, scale=4.0), 3)], [0.5, 0.5], V)
    real = torch.isfinite(mix.logits)
    assert not real.all()  # some rows are padded
    if kind == "sampled_ce":  # hybrid: tail draws padded as well
        mix = sample_targets(mix.logits.new_full((P, V), 1.0 / V), 30, mix, seed=2)
    s = logits(22).requires_grad_()
    kw = KINDS.get(kind, {})
    loss = divergence(kind, s, mix, 2.0, **kw)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    for row in range(P):  # the same row with its padding stripped
        one = slice_targets(mix, slice(row, row + 1))
        one.ids, one.logits = one.ids[:, real[row]], one.logits[:, real[row]]
        assert_close(divergence(kind, s[row : row + 1], one, 2.0, **kw), loss[row : row + 1])


@pytest.mark.parametrize("kind", KINDS)
def test_padded_slot_with_a_foreign_id_hides_no_tail_token(kind):
    z, s = logits(31), logits(32)
    targets = top_k(z, 8)
    in_head = torch.zeros(P, V, dtype=torch.bool).scatter(1, targets.ids, True)
    outside = (~in_head).int().argmax(-1, keepdim=True)  # a tail token, used as the pad id
    pad_logit = torch.full((P, 1), -math.inf, dtype=z.dtype)
    padded = SparseTargets(
        torch.cat([targets.ids, outside], -1), torch.cat([targets.logits, pad_logit], -1), targets.lse
    )
    loss = divergence(kind, s, padded, 2.0, **KINDS[kind])
    assert_close(loss, divergence(kind, s, targets, 2.0, **KINDS[kind]))


def test_mask_padded_vocab_uses_minus_inf():
    s = logits(23, vocab=56)
    masked = mask_padded_vocab(s, V)
    assert torch.isneginf(masked[:, V:]).all()
    assert torch.equal(masked[:, :V], s[:, :V])
    assert torch.equal(mask_padded_vocab(s[:, :V], V), s[:, :V])


@pytest.mark.parametrize("k", [8, V])  # K == V: the student's tail is only -inf padding
@pytest.mark.parametrize("kind", KINDS)
def test_losses_on_padded_vocab_equal_unpadded(kind, k):
    z = logits(24)
    targets = top_k(z, k)
    raw = logits(25, vocab=56).requires_grad_()
    padded = mask_padded_vocab(raw, V)
    loss = divergence(kind, padded, targets, 2.0, **KINDS[kind])
    expected = divergence(kind, raw[:, :V], targets, 2.0, **KINDS[kind])
    assert_close(loss, expected)
    loss.sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad[:, V:] == 0).all()
    # Padding with 0 instead (Liger's bug) would hand mass to the six fake rows.
    zero_padded = torch.cat([raw[:, :V], torch.zeros(P, 6, dtype=raw.dtype)], -1)
    assert not torch.allclose(divergence(kind, zero_padded, targets, 2.0, **KINDS[kind]), expected)


def test_cross_entropy_and_kd_loss_mixing():
    z, s = logits(26), logits(27).requires_grad_()
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(0))
    ignored = labels.clone()
    ignored[0] = -100
    ce = cross_entropy(s, ignored)
    expected_ce = -s.log_softmax(-1).gather(1, labels[:, None])[:, 0]
    assert_close(ce[1:], expected_ce[1:])
    assert ce[0] == 0
    targets = top_k(z, 8)
    for t in (1.0, 2.0):  # at T = 1 the CE comes from the KD term's log-softmax, else from its own
        kd = divergence("reverse_kl", s, targets, t)
        teacher = teacher_buckets(targets, V, t)
        pure = kd_loss(s, teacher, labels, kind="reverse_kl", temperature=t, alpha=1.0)
        assert_close(pure.total, t**2 * kd)
        assert_close(pure.ce, expected_ce)
        assert not pure.ce.requires_grad  # alpha == 1: logged, not trained on
        sft = kd_loss(s, teacher, labels, kind="reverse_kl", temperature=t, alpha=0.0)
        assert_close(sft.total, expected_ce)
        mixed = kd_loss(s, teacher, labels, kind="reverse_kl", temperature=t, alpha=0.3)
        assert_close(mixed.total, 0.3 * t**2 * kd + 0.7 * expected_ce)
        assert mixed.ce.requires_grad
    with pytest.raises(ValueError, match="unknown loss"):
        kd_loss(s, teacher, labels, kind="kl")


def test_low_precision_logits_are_computed_in_float32():
    targets = top_k(logits(28).float(), 8)
    labels = torch.zeros(P, dtype=torch.long)
    terms = kd_loss(logits(29).bfloat16(), teacher_buckets(targets, V), labels, kind="jsd", alpha=1.0)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in terms)


def hybrid_targets(z: Tensor, k: int, seed: int) -> SparseTargets:
    """Top-k of z plus 30 draws from its tail: a cache collected with ``scheme: hybrid``."""
    return sample_targets(z.softmax(-1), 30, top_k(z, k), seed)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.9), (2.0, 0.7), (1.0, 1.0)])
def test_distillation_in_chunks_matches_the_unchunked_loss_and_gradients(kind, temperature, alpha):
    """The KD objective over a padded lm_head with a bias, in chunks of 3 positions recomputed in the
    backward, equals ``kd_loss`` on the whole (P, V) logits: values, reported sums and gradients."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(P, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 56).double()  # 56 rows over a vocabulary of V: a padded lm_head
    targets = hybrid_targets(logits(30), 8, seed=4) if kind == "sampled_ce" else top_k(logits(30), 8)
    labels = torch.randint(0, V, (P,), generator=gen)
    params = {"beta": 0.3, "skew": 0.2}
    objective = Distillation(loss=kind, temperature=temperature, alpha=alpha, chunk_size=3, **params)
    chunked = objective(token_inputs(hidden, head, labels, BatchTargets([targets], V)))
    weights = (hidden, head.weight, head.bias)
    grads = torch.autograd.grad(chunked.loss_sum, weights)
    full = kd_loss(
        mask_padded_vocab(head(hidden), V),
        teacher_buckets(targets, V, temperature),
        labels,
        kind=kind,
        temperature=temperature,
        alpha=alpha,
        **params,
    )
    expected = torch.autograd.grad(full.total.sum(), weights)
    assert_close(chunked.loss_sum, full.total.sum())
    assert_close(chunked.sums["kd"], full.kd.sum())
    assert_close(chunked.sums["ce"], full.ce.sum())
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want)
