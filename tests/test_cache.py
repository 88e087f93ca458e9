"""Tests for the HDF5 teacher cache: encoding accuracy and size, sync, staleness, crash safety, DDP."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import pickle
import re
import resource
import shutil
import signal
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill.cache import CacheReader, CacheSpec, StaleCacheError, cache_stats, codec, open_cache
from distill.cache import segment as cache_segment
from distill.cache.compaction import compact_segments
from distill.cache.reader import sha_keys
from distill.targets import SparseTargets
from distill.teacher.collect import BackgroundWriter

V, K = 1000, 8
BIG = {"name": "big", "path": "org/big", "revision": "abc"}
SMALL = {"name": "small", "path": "org/small", "revision": "def"}


def sha(i: int | str) -> str:
    return hashlib.sha256(f"sample {i}".encode()).hexdigest()


def spec(**kw) -> CacheSpec:
    base = dict(
        scheme="topk",
        k=K,
        teachers=[BIG],
        tokenizer_hash="tok1",
        vocab_size=V,
        template="chatml",
        max_seq_length=128,
    )
    return CacheSpec(**{**base, **kw})


def peaked_logits(positions: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """LM-like next-token logits: a Gaussian bulk plus 1-5 spiked tokens (top-1 p ~0.8 on average).
    Random-init model logits would be far flatter than a trained teacher's."""
    x = torch.randn(positions, vocab, generator=gen) * 2.0
    spikes = 1 + torch.poisson(torch.full((positions,), 2.0), generator=gen).long()
    rows = torch.repeat_interleave(torch.arange(positions), spikes)
    cols = torch.randint(0, vocab, (len(rows),), generator=gen)
    x[rows, cols] += torch.empty(len(rows)).uniform_(6, 22, generator=gen)
    return x


def head(x: torch.Tensor, k: int) -> SparseTargets:
    values, ids = x.topk(k, dim=1)  # by value: the writer must sort
    return SparseTargets(ids, values, torch.logsumexp(x, 1))


def draws(x: torch.Tensor, n: int, gen: torch.Generator, exclude: torch.Tensor | None = None):
    """(P, S) unique sampled ids and counts from softmax(x) (optionally from the tail only), padded."""
    if exclude is not None:
        x = x.scatter(1, exclude, float("-inf"))
    d = torch.multinomial(torch.softmax(x, 1), n, replacement=True, generator=gen)
    ids = torch.zeros_like(d)
    counts = torch.zeros(d.shape, dtype=torch.int32)
    for i, row in enumerate(d):
        u, c = row.unique(return_counts=True)
        ids[i, : len(u)], counts[i, : len(u)] = u, c.int()
    return ids, counts


def write(cache, samples: dict[str, SparseTargets], teacher: str = "big", rank: int = 0) -> None:
    with cache.writer(teacher, rank=rank) as w:
        for s, t in samples.items():
            w.append(s, t.num_positions + 1, t)


def make_samples(n: int, seed: int = 0, start: int = 0) -> dict[str, SparseTargets]:
    gen = torch.Generator().manual_seed(seed)
    return {sha(start + i): head(peaked_logits(5 + i % 4, V, gen), K) for i in range(n)}


def test_rice_round_trip():
    rng = np.random.default_rng(0)
    for values in [
        np.zeros(5),
        rng.integers(0, 3, 100),
        rng.geometric(0.002, 500) - 1,
        np.array([7]),
        np.array([], dtype=np.int64),
        np.array([0, 2**31, 5]),
    ]:
        blob = codec.rice_encode(values)
        out, end = codec.rice_decode(np.frombuffer(b"xy" + blob, np.uint8), 2)
        assert np.array_equal(out, values.astype(np.int64)) and end == len(blob) + 2


def rice_reference(values: np.ndarray) -> bytes:
    """``rice_encode`` one bit at a time: the L of the fewest bits, unary high parts, then each value's
    L low bits least significant first; bit strings packed most significant bit first."""
    v = [int(x) for x in values]
    if not v:
        return struct.pack("<BII", 0, 0, 0)
    sizes = [len(v) * (L + 1) + sum(x >> L for x in v) for L in range(max(v).bit_length() + 1)]
    L = sizes.index(min(sizes))

    def pack(bits: str) -> bytes:
        bits += "0" * (-len(bits) % 8)
        return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))

    unary = pack("".join("0" * (x >> L) + "1" for x in v))
    low = pack("".join(format(x & ((1 << L) - 1), f"0{L}b")[::-1] if L else "" for x in v))
    return struct.pack("<BII", L, len(v), len(unary)) + unary + low


def test_rice_encode_equals_a_bit_by_bit_reference():
    rng = np.random.default_rng(0)
    for width in range(0, 41, 3):  # low parts of 0 to 40 bits, i.e. 1 to 8 bytes per value
        for n in (1, 9, 300):
            values = rng.integers(0, 2**width + 1, n)
            assert codec.rice_encode(values) == rice_reference(values), (width, n)
    gaps = np.diff(np.sort(rng.choice(V, (20, K), replace=False), axis=1), axis=1, prepend=0)
    assert codec.rice_encode(gaps) == rice_reference(gaps.ravel())


def test_encoding_is_the_same_whether_ids_arrive_sorted_or_by_value():
    gen = torch.Generator().manual_seed(0)
    by_value = head(peaked_logits(30, V, gen), K)
    ids, order = by_value.ids.sort(dim=1)  # as collection hands them over
    by_id = SparseTargets(ids, by_value.logits.gather(1, order), by_value.lse)
    a, b = (codec.encode_targets(t, "topk", K, V, 6) for t in (by_value, by_id))
    assert np.array_equal(a.stream, b.stream) and np.array_equal(a.tail, b.tail) and a.kl == b.kl


def test_topk_round_trip_ids_exact_values_within_tolerance(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    samples = make_samples(6)
    write(cache, samples)
    reader = cache.reader()
    n = 2**cache.spec.value_bits - 1
    for s, t in samples.items():
        got = reader.get(s)
        order = t.ids.argsort(1)
        ids, logits = t.ids.gather(1, order), t.logits.gather(1, order)
        assert torch.equal(got.ids, ids) and torch.equal(got.lse, t.lse)
        # documented tolerance: |d log p| <= 3 / (n * r - 0.5) with r = (p / p_max) ** (1/3)
        r = torch.exp((logits - logits.max(1, keepdim=True).values) / 3)
        err = (got.logits - logits).abs()
        assert (err <= 3 / (n * r - 0.5) + 1e-4)[r > 0.1].all()
        # tail bucket recoverable from the stored head and lse, in log space; float32 logits at
        # |lse| ~ 20 resolve masses to ~2e-6, in the teacher's own logits as much as in the stored ones
        tail = torch.log1p(-torch.exp(torch.logsumexp(got.logits, 1) - got.lse)).double()
        exact = torch.log1p(-torch.exp(torch.logsumexp(logits.double(), 1) - t.lse.double()))
        assert torch.allclose(tail.exp(), exact.exp(), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("scheme", ["sampled", "hybrid"])
def test_sampled_and_hybrid_round_trip(tmp_path, scheme):
    gen = torch.Generator().manual_seed(1)
    cache = open_cache(tmp_path / "c", spec(scheme=scheme, k=K if scheme == "hybrid" else 0, n_draws=16))
    samples = {}
    for i in range(4):
        x = peaked_logits(6, V, gen)
        t = (
            head(x, K)
            if scheme == "hybrid"
            else SparseTargets(torch.zeros(6, 0), torch.zeros(6, 0), torch.logsumexp(x, 1))
        )
        t.sample_ids, t.sample_counts = draws(x, 16, gen, t.ids if scheme == "hybrid" else None)
        samples[sha(i)] = t
    write(cache, samples)
    reader = cache.reader()
    for s, t in samples.items():
        got = reader.get(s)
        assert got.ids.shape == (6, K if scheme == "hybrid" else 0)
        assert torch.equal(got.ids, t.ids.sort(1).values) and (got.sample_counts.sum(1) == 16).all()
        for p in range(6):  # same multiset of draws; the reader returns ids ascending
            want = {(int(i), int(c)) for i, c in zip(t.sample_ids[p], t.sample_counts[p], strict=True) if c}
            have = {
                (int(i), int(c)) for i, c in zip(got.sample_ids[p], got.sample_counts[p], strict=True) if c
            }
            assert want == have
    stats = cache_stats(tmp_path / "c")
    assert stats["scheme"] == scheme and (stats["kl_stored_vs_exact"] is None) == (scheme == "sampled")


def test_random_access_and_chunk_order_across_segments(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    samples = make_samples(20)
    items = list(samples.items())
    write(cache, dict(items[:12]))
    write(cache, dict(items[12:]))  # a second segment
    reader = cache.reader()
    assert len(reader) == 20 and reader.shas() == list(samples)
    order = [items[i][0] for i in np.random.default_rng(0).permutation(20)]
    chunks = list(reader.iter_chunks(order, 7))
    assert [len(c) for c in chunks] == [7, 7, 6]
    assert [s for c in chunks for s, _ in c] == order
    for c in chunks:
        for s, t in c:
            assert torch.equal(t.ids, reader.get(s).ids) and torch.equal(t.logits, reader.get(s).logits)
    with pytest.raises(KeyError):
        reader.get(sha("missing"))


def test_sync_counts_after_add_remove_edit_reorder(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    samples = make_samples(10)
    write(cache, samples)
    old = list(samples)
    edited = sha("edited 3")  # editing sample 3 changes its content hash
    new = [*old[4:], old[0], old[2], edited, sha("a"), sha("b"), sha("c")]  # reordered; 1 and 3 gone
    plan = cache.plan_sync(new)
    assert plan.keep == 8 and plan.to_collect == {"big": [edited, sha("a"), sha("b"), sha("c")]}
    assert sorted(plan.absent) == sorted([old[1], old[3]])
    assert cache.drop(plan.absent) == 2
    reader = cache.reader()
    assert len(reader) == 8 and old[1] not in reader and old[0] in reader
    assert torch.equal(reader.get(old[5]).ids, samples[old[5]].ids.sort(1).values)
    again = cache.plan_sync(new)
    assert again.keep == 8 and again.absent == [] and len(list((tmp_path / "c").glob("*.h5"))) == 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("k", 16),
        ("temperature", 0.7),
        ("template", "llama3"),
        ("max_seq_length", 256),
        ("tokenizer_hash", "tok2"),
    ],
)
def test_stale_cache_names_the_field_and_rebuild_works(tmp_path, field, value):
    write(open_cache(tmp_path / "c", spec()), make_samples(2))
    with pytest.raises(StaleCacheError) as e:
        open_cache(tmp_path / "c", spec(**{field: value}))
    assert f"{field}: cache has {getattr(spec(), field)!r}, config asks for {value!r}" in str(e.value)
    assert "rebuild_cache true" in str(e.value) and "callbacks.init_args.rebuild true" in str(e.value)
    fresh = open_cache(tmp_path / "c", spec(**{field: value}), rebuild=True)
    assert len(fresh.reader().shas()) == 0
    open_cache(tmp_path / "c", spec(**{field: value}))  # now compatible


def test_changed_teacher_weights_are_stale_added_teacher_is_work(tmp_path):
    write(open_cache(tmp_path / "c", spec()), make_samples(3))
    with pytest.raises(StaleCacheError, match=r"teachers\[big\]: cache has .*'revision': 'abc'.*'zzz'"):
        open_cache(tmp_path / "c", spec(teachers=[{**BIG, "revision": "zzz"}]))
    cache = open_cache(tmp_path / "c", spec(teachers=[BIG, SMALL]))
    plan = cache.plan_sync(list(make_samples(3)))
    assert plan.keep == 0 and plan.to_collect["big"] == [] and len(plan.to_collect["small"]) == 3


def test_open_refuses_a_directory_that_is_not_a_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a teacher cache"):
        open_cache(tmp_path, spec(), rebuild=True)
    assert (tmp_path / "notes.txt").exists()


def test_multi_teacher_completeness(tmp_path):
    cache = open_cache(tmp_path / "c", spec(teachers=[BIG, SMALL]))
    samples = make_samples(6)
    write(cache, samples, "big")
    write(cache, dict(list(samples.items())[:4]), "small")  # "crashed" after 4 samples of teacher 2
    plan = cache.plan_sync(list(samples))
    assert plan.keep == 4 and plan.to_collect == {"big": [], "small": list(samples)[4:]}
    reader = cache.reader()
    assert reader.teachers() == ["big", "small"] and len(reader) == 4  # complete for every teacher
    assert len(reader.shas("big")) == 6
    with pytest.raises(ValueError, match="say which one"):
        reader.get(sha(0))
    assert torch.equal(reader.get(sha(0), "small").ids, reader.get(sha(0), "big").ids)
    assert torch.equal(cache.reader("small").get(sha(1)).ids, samples[sha(1)].ids.sort(1).values)


def crashing_writer(path: Path) -> None:
    """Commit s0-s2, buffer s3-s4, then die by SIGKILL while the next segment file is half written."""
    cache = open_cache(path, spec())
    gen = torch.Generator().manual_seed(0)
    w = cache.writer("big", commit_bytes=1 << 30)
    for i in range(5):
        w.append(f"s{i}", 4, head(torch.randn(4, V, generator=gen), K))
        if i == 2:
            w.commit()
    seg = cache_segment.Segment(cache.path, "r000", cache.spec, 2)
    seg.group(cache.spec.teacher("big"), 2, 8, 10_000)
    seg.file.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def test_kill_9_keeps_committed_samples_and_recollects_the_rest(tmp_path):
    # spawn, not fork: a forked child of a process with torch's thread pools can deadlock
    process = multiprocessing.get_context("spawn").Process(target=crashing_writer, args=(tmp_path / "c",))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    assert len(list((tmp_path / "c").glob(".*.partial"))) == 1
    cache = open_cache(tmp_path / "c", spec())
    reader = cache.reader()
    assert reader.shas() == ["s0", "s1", "s2"] and reader.get("s2").ids.shape == (4, K)
    plan = cache.plan_sync([f"s{i}" for i in range(5)])
    assert plan.keep == 3 and plan.to_collect["big"] == ["s3", "s4"]
    assert cache.remove_partials() == 1
    write(cache, {"s3": head(torch.randn(4, V), K), "s4": head(torch.randn(4, V), K)})
    assert cache.plan_sync([f"s{i}" for i in range(5)]).keep == 5


def writer_on_a_small_disk(path: Path) -> None:
    """Commit three samples, then write more with every file limited to 20 KB (RLIMIT_FSIZE): HDF5's
    writes fail as on a full disk (EFBIG rather than ENOSPC, and no mount needed)."""
    cache = open_cache(path / "c", spec())
    write(cache, make_samples(3))
    gen = torch.Generator().manual_seed(1)
    more = {sha(f"big {i}"): head(peaked_logits(400, V, gen), K) for i in range(20)}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    try:
        write(cache, more)
    except OSError as error:
        (path / "error.txt").write_text(f"{error.errno} {error}")


def test_a_failed_segment_write_is_an_error_not_a_crash_and_leaves_no_partial_file(tmp_path):
    """HDF5 cannot close a file whose writes failed: on a full disk the writer died of a segmentation
    fault at exit (rc 139) and left its ``.partial`` file on the full disk."""
    process = multiprocessing.get_context("spawn").Process(target=writer_on_a_small_disk, args=(tmp_path,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 0
    number, message = (tmp_path / "error.txt").read_text().split(" ", 1)
    assert int(number) == errno.EFBIG and ".partial" in message
    assert not list((tmp_path / "c").glob(".*.partial"))
    assert sorted(open_cache(tmp_path / "c", spec()).reader().shas()) == sorted(make_samples(3))


@pytest.mark.timeout(120)  # the writer thread hung when the final commit failed
def test_a_full_disk_is_one_clear_error_naming_the_directory_and_the_space_needed(tmp_path, monkeypatch):
    """ENOSPC (here where a network file system reports it: at fsync) ends the collection with a message
    that says where and how much space it needs, last in the traceback; the cache stays as it was."""
    cache = open_cache(tmp_path / "c", spec())
    write(cache, make_samples(3))
    files = sorted((tmp_path / "c").iterdir())

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    writer = BackgroundWriter(lambda job: cache.writer("big"))
    writer.put(
        0, [SimpleNamespace(sha=s, num_tokens=9, targets=t) for s, t in make_samples(4, start=3).items()]
    )
    with pytest.raises(RuntimeError) as failed:
        writer.close()
    monkeypatch.undo()
    message = str(failed.value)
    assert f"{tmp_path / 'c'}: no space left on its disk" in message, message
    assert re.search(r"a segment of about [\d.]+ MiB could not be written and [\d.,]+ MiB are free", message)
    assert sorted((tmp_path / "c").iterdir()) == files  # no .partial left behind
    assert sorted(cache.reader().shas()) == sorted(make_samples(3))


def test_compaction_interrupted_after_rename_is_consistent(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    samples = make_samples(8)
    write(cache, dict(list(samples.items())[:4]))
    write(cache, dict(list(samples.items())[4:]))
    old = {p.name: p.read_bytes() for p in (tmp_path / "c").glob("*.h5")}
    cache.drop([sha(1), sha(6)])
    for name, data in old.items():  # as if killed before deleting the segments it replaced
        (tmp_path / "c" / name).write_bytes(data)
    (tmp_path / "c" / ".c-half-written.h5.partial").write_bytes(b"\x89HDF garbage")  # killed mid-write
    reader = cache.reader()
    assert len(reader) == 6 and sha(1) not in reader and sha(6) not in reader
    reader.close()  # an open reader keeps every segment it indexed on disk
    cache.drop([sha(2)])  # a later compaction still keeps the leftovers superseded, then deletes them
    assert len(cache.reader()) == 5 and len(list((tmp_path / "c").glob("*.h5"))) == 1


def test_rank_shards_read_as_one_cache(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    samples = make_samples(9)
    items = list(samples.items())
    write(cache, dict(items[0::2]), rank=0)
    write(cache, dict(items[1::2] + items[:1]), rank=1)  # DistributedSampler pads with a repeat
    assert sorted(p.name[:4] for p in (tmp_path / "c").glob("*.h5")) == ["r000", "r001"]
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 9 and set(reader.shas()) == set(samples)
    assert cache_stats(tmp_path / "c")["samples"] == 9
    reader.close()  # an open reader keeps every segment it indexed on disk
    compact_segments(cache.path, cache_segment.scan_segments(cache.path)[0], sha_keys([]))  # into one
    assert len(list((tmp_path / "c").glob("*.h5"))) == 1 and len(cache.reader()) == 9
    one = next((tmp_path / "c").glob("*.h5"))
    assert len(CacheReader(one)) == 9  # a single segment file is a cache too


def test_reader_pickles_and_reopens_after_fork(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    samples = make_samples(3)
    write(cache, samples)
    reader = cache.reader()
    want = reader.get(sha(2)).logits
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.get(sha(2)).logits, want)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker: must not use the parent's HDF5 handles
        ok = reader._pid != os.getpid() and torch.equal(reader.get(sha(2)).logits, want)
        os.write(w, b"1" if ok and reader._pid == os.getpid() else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_size_and_kl_at_k64_on_peaked_distributions(tmp_path):
    """The budget: <= 128 B per stored position on disk at K=64, V=32000 (naive int32+fp16: 384 B),
    with KL(exact top-K + tail || stored) < 1e-3 nats; sampled with ~12 unique draws <= 40 B."""
    gen = torch.Generator().manual_seed(0)
    vocab, k, positions = 32000, 64, 256
    topk = open_cache(tmp_path / "topk", spec(k=k, vocab_size=vocab))
    sampled = open_cache(tmp_path / "sampled", spec(scheme="sampled", k=0, n_draws=80, vocab_size=vocab))
    unique = []
    with topk.writer("big") as wt, sampled.writer("big") as ws:
        for i in range(12):
            x = peaked_logits(positions, vocab, gen)
            wt.append(sha(i), positions, head(x, k))
            s = SparseTargets(torch.zeros(positions, 0), torch.zeros(positions, 0), torch.logsumexp(x, 1))
            s.sample_ids, s.sample_counts = draws(x, 80, gen)
            ws.append(sha(i), positions, s)
            unique.append((s.sample_counts > 0).sum(1).float().mean())
    stats = cache_stats(tmp_path / "topk")
    assert stats["positions"] == 12 * positions
    assert stats["bytes_per_position"] <= 128, stats
    assert stats["kl_stored_vs_exact"] < 1e-3, stats
    assert 10 <= np.mean(unique) <= 14 and cache_stats(tmp_path / "sampled")["bytes_per_position"] <= 40


def test_corrupt_files_never_appear_as_segments(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    write(cache, make_samples(2))
    shutil.copy(next((tmp_path / "c").glob("*.h5")), tmp_path / "c" / ".r000-x.h5.partial")
    (tmp_path / "c" / ".r000-y.h5.partial").write_bytes(b"")
    assert len(cache.reader()) == 2 and cache_stats(tmp_path / "c")["segments"] == 1


def test_merging_teachers_at_collection_equals_the_training_time_mixture(tmp_path):
    from distill.cache.mixture import merge_teachers
    from distill.losses.kd import log_tail_mass, mix_teachers

    cache = open_cache(tmp_path / "c", spec(teachers=[BIG, SMALL]))
    big, small = make_samples(5, seed=1), make_samples(5, seed=2)
    write(cache, big, "big")
    write(cache, small, "small")
    assert merge_teachers(tmp_path / "c", tmp_path / "m", weights=[0.75, 0.25]) == 5
    merged = CacheReader(tmp_path / "m")
    assert merged.teachers() == ["mixture"] and sorted(merged.shas()) == sorted(big)
    reader = cache.reader()
    for s in big:
        want = mix_teachers([reader.get(s, "big"), reader.get(s, "small")], [0.75, 0.25], V)
        got = merged.get(s)
        top = want.logits.topk(K, dim=-1)
        assert torch.equal(got.ids, want.ids.gather(-1, top.indices).sort(-1).values)
        p_got = torch.softmax(torch.cat([got.logits, log_tail_mass(got)[:, None]], -1), -1)
        assert torch.allclose(p_got[:, :-1].sum(-1), top.values.exp().sum(-1), atol=2e-3)
    assert merged.num_tokens([next(iter(big))]) == [big[next(iter(big))].num_positions + 1]
