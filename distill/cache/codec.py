"""Byte encoding of one sample's sparse teacher targets: what ``distill.cache`` stores per sample.

The float32 log-sum-exp is kept exactly per position; everything else goes into one byte string per
sample of Rice-coded integer arrays (``rice_encode``): head ids as gaps, head values as cube-root codes
(the quantiser that minimises KL for a number of levels) renormalised to the stored float16 tail
log-mass, draws losslessly. docs/cache.md ("Encoding of stream") has the layout and the error bounds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.targets import SparseTargets

_HEADER = struct.Struct("<BII")  # low-bit width L, number of values, bytes of the unary part
_MIN_TAIL = -(2.0**-24)  # smallest-magnitude float16: keeps a nearly-empty head from decoding to -inf


def rice_encode(values: np.ndarray) -> bytes:
    """Rice-code non-negative integers: ``v >> L`` in unary (one bit stream), ``v & (2**L - 1)`` in
    L-bit fields (a second stream), with the L that gives the fewest bytes. Both halves decode with
    whole-array numpy operations (no per-value loop), which is why this is not a Huffman/rANS code."""
    v = np.ascontiguousarray(values, dtype=np.int64).ravel()
    if v.size and v.min() < 0:
        raise ValueError("rice_encode needs non-negative integers")
    n = v.size
    if n == 0:
        return _HEADER.pack(0, 0, 0)
    top = int(v.max()).bit_length()
    sizes = [n * (L + 1) + int((v >> L).sum()) for L in range(top + 1)]
    L = int(np.argmin(sizes))
    high = v >> L
    bits = np.zeros(n + int(high.sum()), dtype=bool)
    ends = np.cumsum(high)
    ends += np.arange(n)
    bits[ends] = True  # value j ends with a 1 after its high_j zeros
    unary = np.packbits(bits)
    return _HEADER.pack(L, n, unary.size) + unary.tobytes() + _low_bits(v, L).tobytes()


def _low_bits(v: np.ndarray, L: int) -> np.ndarray:
    """The L low bits of each value, least significant first, one after another, packed into bytes:
    each value's bytes (little-endian, as few as hold L bits) unpacked in place of an (n, L) int64
    array of shifted copies."""
    width = next(w for w in (1, 2, 4, 8) if 8 * w >= L)
    low = (v & ((1 << L) - 1)).astype(f"<u{width}").view(np.uint8).reshape(v.size, width)
    return np.packbits(np.unpackbits(low, axis=1, count=L, bitorder="little"))


def rice_decode(buf: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
    """Decode one ``rice_encode`` blob from uint8 ``buf`` at ``offset``; returns (int64 values, end)."""
    L, n, unary_bytes = _HEADER.unpack_from(buf, offset)
    start = offset + _HEADER.size
    ones = np.flatnonzero(np.unpackbits(buf[start : start + unary_bytes]))[:n]
    high = np.diff(ones, prepend=-1) - 1
    start += unary_bytes
    low_bytes = (n * L + 7) // 8
    low_bits = np.unpackbits(buf[start : start + low_bytes], count=n * L).reshape(n, L)
    low = (low_bits.astype(np.int64) << np.arange(L)).sum(1) if L else np.zeros(n, dtype=np.int64)
    return (high << L) | low, start + low_bytes


def _log_sum_exp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def tail_log_mass(logits: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """log(1 - sum(head probs)) per position, in float64 and in log space (``1 - sum`` cancels)."""
    head = _log_sum_exp(logits.astype(np.float64)) - lse.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(-np.expm1(np.minimum(head, 0.0)))  # -inf when the head holds all the mass


def quantize_head(logits: np.ndarray, bits: int) -> np.ndarray:
    """(P, K) raw logits -> (P, K) integer codes in [0, 2**bits - 1] of the cube root of p / p_max."""
    n = 2**bits - 1
    rel = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return np.rint(n * np.exp(rel / 3.0)).astype(np.int64)


def dequantize_head(q: np.ndarray, lse: np.ndarray, tail: np.ndarray, bits: int) -> np.ndarray:
    """Codes + exact lse + stored tail log-mass -> float32 logits whose head mass matches the tail."""
    n = 2**bits - 1
    # a code of 0 means p / p_max < (0.5 / n) ** 3; a quarter step stands for "negligible, not zero"
    rel = 3.0 * np.log(np.maximum(q, 0.25) / n)
    head_mass = np.log(-np.expm1(np.minimum(tail.astype(np.float64), _MIN_TAIL)))
    logp = rel - _log_sum_exp(rel)[:, None] + head_mass[:, None]
    return (logp + lse.astype(np.float64)[:, None]).astype(np.float32)


def head_kl(logits: np.ndarray, lse: np.ndarray, decoded: np.ndarray, tail16: np.ndarray) -> np.ndarray:
    """Per-position KL(exact || decoded) over the K head tokens plus the tail bucket, in nats."""
    lp = logits.astype(np.float64) - lse[:, None]
    lq = decoded.astype(np.float64) - lse[:, None]
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    t_exact = tail_log_mass(logits, lse)
    t_stored = np.minimum(tail16.astype(np.float64), _MIN_TAIL)
    with np.errstate(invalid="ignore"):
        tail_term = np.where(np.isneginf(t_exact), 0.0, np.exp(t_exact) * (t_exact - t_stored))
    return kl + tail_term


def encode_head(ids: np.ndarray, logits: np.ndarray, bits: int) -> tuple[bytes, np.ndarray]:
    """Sorted (P, K) ids + logits -> (ids blob + values blob, (P, K) codes for measuring the error)."""
    gaps = np.diff(ids, axis=1, prepend=0)  # first id absolute: it is the minimum, ~V/(K+1) on average
    q = quantize_head(logits, bits)
    return rice_encode(gaps) + rice_encode(q), q


def decode_head(buf: np.ndarray, offset: int, num_positions: int, k: int) -> tuple[np.ndarray, ...]:
    """-> ((P, K) int64 ids, (P, K) int64 value codes, end offset)."""
    gaps, offset = rice_decode(buf, offset)
    q, offset = rice_decode(buf, offset)
    shape = (num_positions, k)
    return np.cumsum(gaps.reshape(shape), axis=1), q.reshape(shape), offset


def encode_samples(sample_ids: np.ndarray, counts: np.ndarray) -> bytes:
    """(P, S) padded draws (count 0 = padding) -> unique-count, id-gap and count blobs (lossless)."""
    order = np.argsort(np.where(counts > 0, sample_ids, np.iinfo(np.int64).max), axis=1, kind="stable")
    ids = np.take_along_axis(sample_ids, order, 1)
    cnt = np.take_along_axis(counts, order, 1)
    valid = cnt > 0
    n = valid.sum(1)
    flat_ids = ids[valid]  # row-major: each position's ids, ascending
    starts = np.cumsum(n) - n
    gaps = np.diff(flat_ids, prepend=0)
    gaps[starts[n > 0]] = flat_ids[starts[n > 0]]  # each position's first id is absolute
    return rice_encode(n) + rice_encode(gaps) + rice_encode(cnt[valid] - 1)


def decode_samples(buf: np.ndarray, offset: int, num_positions: int) -> tuple[np.ndarray, ...]:
    """-> ((P, S) int64 ids padded with 0, (P, S) int32 counts padded with 0, end offset)."""
    n, offset = rice_decode(buf, offset)
    gaps, offset = rice_decode(buf, offset)
    counts, offset = rice_decode(buf, offset)
    starts = np.cumsum(n) - n
    csum = np.cumsum(gaps)
    row = np.repeat(np.arange(num_positions), n)
    before = np.where(starts > 0, csum[np.maximum(starts - 1, 0)] if csum.size else 0, 0)
    flat_ids = csum - np.repeat(before, n)  # restart the running sum at each position
    col = np.arange(flat_ids.size) - np.repeat(starts, n)
    width = int(n.max()) if n.size else 0
    out_ids = np.zeros((num_positions, width), dtype=np.int64)
    out_counts = np.zeros((num_positions, width), dtype=np.int32)
    out_ids[row, col] = flat_ids
    out_counts[row, col] = counts + 1
    return out_ids, out_counts, offset


@dataclass
class EncodedSample:
    """One sample as stored: per-position float arrays plus one byte stream."""

    lse: np.ndarray  # (P,) float32, exact
    tail: np.ndarray | None  # (P,) float16 log tail mass; None for the sampled scheme
    stream: np.ndarray  # (B,) uint8: head blobs then sample blobs
    kl: float  # sum over positions of KL(exact || decoded); nan when not measured, 0 for sampled


def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def encode_targets(
    t: SparseTargets, scheme: str, k: int, vocab_size: int, bits: int, measure_kl: bool = True
) -> EncodedSample:
    """Validate and encode one sample's targets (tensors or numpy arrays in a SparseTargets)."""
    lse = _np(t.lse).astype(np.float32).reshape(-1)
    num_pos = lse.shape[0]
    blob, tail, kl = b"", None, 0.0
    if scheme != "sampled":
        ids = _np(t.ids).astype(np.int64, copy=False)
        logits = _np(t.logits).astype(np.float32, copy=False)
        if ids.shape != (num_pos, k) or logits.shape != ids.shape:
            raise ValueError(f"ids and logits must have shape {(num_pos, k)}, got {ids.shape} {logits.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        if not (ids[:, 1:] > ids[:, :-1]).all():  # collection hands them over sorted already
            order = np.argsort(ids, axis=1, kind="stable")
            ids, logits = np.take_along_axis(ids, order, 1), np.take_along_axis(logits, order, 1)
        blob, q = encode_head(ids, logits, bits)
        tail = tail_log_mass(logits, lse).astype(np.float16)
        kl = float("nan")
        if measure_kl:  # decode what was just encoded: the KL reported is the stored data's own
            kl = float(head_kl(logits, lse, dequantize_head(q, lse, tail, bits), tail).sum())
    if scheme != "topk":
        sids, counts = _np(t.sample_ids), _np(t.sample_counts)
        if sids is None or counts is None or sids.shape != counts.shape or sids.shape[0] != num_pos:
            raise ValueError(f"scheme {scheme!r} needs sample_ids and sample_counts of shape (P, S)")
        sids, counts = sids.astype(np.int64), counts.astype(np.int64)
        if (counts < 0).any() or ((counts > 0) & ((sids < 0) | (sids >= vocab_size))).any():
            raise ValueError("sample counts must be >= 0 and sampled ids in the vocabulary")
        blob += encode_samples(sids, counts)
    return EncodedSample(lse, tail, np.frombuffer(blob, dtype=np.uint8), kl)


def decode_targets(
    stream: np.ndarray, lse: np.ndarray, tail: np.ndarray | None, scheme: str, k: int, bits: int
) -> SparseTargets:
    """Inverse of ``encode_targets``: ids exact, logits within the value quantisation, draws exact."""
    num_pos = lse.shape[0]
    ids = np.zeros((num_pos, 0), dtype=np.int64)
    logits = np.zeros((num_pos, 0), dtype=np.float32)
    offset = 0
    if scheme != "sampled":
        ids, q, offset = decode_head(stream, 0, num_pos, k)
        logits = dequantize_head(q, lse, tail, bits)
    out = SparseTargets(
        torch.from_numpy(ids), torch.from_numpy(logits), torch.from_numpy(lse.astype(np.float32))
    )
    if scheme != "topk":
        sids, counts, offset = decode_samples(stream, offset, num_pos)
        out.sample_ids, out.sample_counts = torch.from_numpy(sids), torch.from_numpy(counts)
    return out
