"""The cache's promises: a sync never loses samples, writers take turns, readers keep what they index,
corruption is a named error with a repair, segments do not pile up, teacher NLLs are stored."""

from __future__ import annotations

import logging
import math
import os
import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from distill.cache import (
    CacheCorruptError,
    CacheLockedError,
    CacheReader,
    CacheSpec,
    WriterLock,
    cache_stats,
    open_cache,
)
from distill.cache import reader as cache_reader
from distill.cache.compaction import compact_segments
from distill.cache.segment import scan_segments
from distill.commands import main
from distill.data.formats import read_records
from distill.targets import SparseTargets
from distill.teacher.collect import sync_cache
from tests.helpers import collect_config, conversation, kd_config, write_jsonl

V, K = 1000, 8
BIG = {"name": "big", "path": "org/big", "revision": "abc"}


def spec() -> CacheSpec:
    return CacheSpec(scheme="topk", k=K, teachers=[BIG], tokenizer_hash="t", vocab_size=V, max_seq_length=64)


def targets(seed: int, positions: int = 5) -> SparseTargets:
    x = torch.randn(positions, V, generator=torch.Generator().manual_seed(seed)) * 3
    values, ids = x.topk(K, dim=1)
    return SparseTargets(ids, values, torch.logsumexp(x, 1))


def fill(cache, shas: list[str], commit_every: int = 0, nll: bool = True) -> None:
    """One segment, or one per ``commit_every`` samples; sample i's NLL is i + 0.5."""
    with cache.writer("big") as writer:
        for i, s in enumerate(shas):
            writer.append(s, 6, targets(i), i + 0.5 if nll else float("nan"))
            if commit_every and (i + 1) % commit_every == 0:
                writer.commit()


def samples(shas: list[str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(sha=s) for s in shas]


def keys(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.h5"))


def assert_same_contents(reader: CacheReader, shas: list[str]) -> None:
    for i, s in enumerate(shas):
        stored, want = reader.get(s), targets(i)
        assert torch.equal(stored.ids, want.ids.sort(1).values) and torch.allclose(stored.lse, want.lse)
    assert np.array_equal(reader.nll(shas), np.arange(len(shas)) + 0.5)


# ---- 1: a sync never drops what this run's data lacks; pruning is explicit and reports what it frees


def test_a_subset_sync_keeps_every_sample_and_prune_is_explicit(tmp_path, caplog, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(10)])
    shas = [r.sha for r in read_records([data], "auto")]
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas)
    with caplog.at_level(logging.INFO), WriterLock(cache.path):
        plan = sync_cache(cache.path, spec(), samples(shas[:4]))  # max_train_samples 4
    assert sorted(CacheReader(cache.path).shas()) == sorted(shas)  # nothing dropped
    assert plan.keep == 4 and sorted(plan.absent) == sorted(shas[4:])
    assert "6 cached samples not in this data (kept" in caplog.text and "cache prune" in caplog.text

    subset = write_jsonl(tmp_path / "subset.jsonl", [conversation(i) for i in range(3)])
    capsys.readouterr()
    main(["cache", "prune", str(cache.path), "--keep-data", str(subset), "--dry-run"])
    out = capsys.readouterr().out
    assert "would free 7 samples" in out and len(CacheReader(cache.path).shas()) == 10
    main(["cache", "prune", str(cache.path), "--keep-data", str(subset)])
    freed = capsys.readouterr().out
    assert (
        "freed 7 samples, " in freed
        and int(freed.split("samples, ")[1].split(" bytes")[0].replace(",", "")) > 0
    )
    assert sorted(CacheReader(cache.path).shas()) == sorted(shas[:3])

    with WriterLock(cache.path):  # the data-module flag: prune_cache true
        sync_cache(cache.path, spec(), samples(shas[:2]), prune=True)
    assert sorted(CacheReader(cache.path).shas()) == sorted(shas[:2])


def test_a_fit_on_a_subset_keeps_the_full_runs_targets(tmp_path, kd_teacher_dir, caplog):
    config = kd_config(tmp_path, kd_teacher_dir, n=12)
    quick = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    main(["fit", "--config", str(config), *quick])
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(config), *quick, "--data.init_args.max_train_samples", "4"])
    assert "keep 4, collect {t1: 0}, 8 cached samples not in this data (kept" in caplog.text
    assert len(CacheReader(tmp_path / "cache" / "train")) == 12


# ---- 2: one writer at a time; readers never see the cache shrink; duplicates are counted and removed


def test_a_second_writer_waits_naming_the_holder_or_gives_up_after_its_timeout(tmp_path, capfd):
    first = WriterLock(tmp_path / "c")
    first.acquire()
    with pytest.raises(CacheLockedError, match=r"another run writes this cache \(pid \d+ on .*\); gave up"):
        WriterLock(tmp_path / "c", timeout=0.3, poll_seconds=0.05).acquire()
    assert "is being written by pid" in capfd.readouterr().err
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(WriterLock(tmp_path / "c", poll_seconds=0.05).acquire())
    )
    waiter.start()
    time.sleep(0.3)
    assert not got  # still waiting
    first.release()
    waiter.join(timeout=10)
    assert got == [None]


def test_a_run_that_waited_for_the_lock_plans_again_and_collects_nothing_twice(tmp_path):
    shas = keys(6)
    open_cache(tmp_path / "c", spec())
    plans = []

    def second_run() -> None:
        with WriterLock(tmp_path / "c", poll_seconds=0.05):
            plans.append(sync_cache(tmp_path / "c", spec(), samples(shas)))

    with WriterLock(tmp_path / "c"):  # the first run: sync, collect, commit while holding the lock
        other = threading.Thread(target=second_run)
        other.start()
        time.sleep(0.3)
        fill(open_cache(tmp_path / "c", spec()), shas)
    other.join(timeout=30)
    assert plans[0].to_collect == {"big": []} and plans[0].keep == 6
    assert cache_stats(tmp_path / "c")["duplicate_rows"] == 0


def test_fit_and_collect_hold_the_writer_lock_from_sync_to_the_end_of_collection(tmp_path, kd_teacher_dir):
    config = kd_config(tmp_path, kd_teacher_dir, n=4, cache_lock_timeout=0.3)
    with (
        WriterLock(tmp_path / "cache" / "train"),
        pytest.raises(CacheLockedError, match=rf"pid {os.getpid()} "),
    ):
        main(["fit", "--config", str(config)])
    (tmp_path / "c").mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(4)])
    collect = collect_config(tmp_path / "c", data, kd_teacher_dir, writer={"lock_timeout": 0.3})
    with WriterLock(tmp_path / "c" / "cache" / "val"), pytest.raises(CacheLockedError, match="gave up"):
        main(["collect", "--config", str(collect)])
    main(["collect", "--config", str(collect)])  # a failed run left no lock behind
    assert not (tmp_path / "c" / "cache" / "train" / ".writer.lock").read_text()


def test_a_live_reader_keeps_its_segments_through_compaction_and_prune(tmp_path):
    shas = keys(8)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas, commit_every=2)
    reader = cache.reader()
    assert len(reader) == 8
    with WriterLock(cache.path):  # another run prunes to a subset, then merges what is left
        assert cache.prune(shas[:3]).samples == 5
        compact_segments(cache.path, scan_segments(cache.path)[0], cache_reader.sha_keys([]))
    worker = pickle.loads(pickle.dumps(reader))  # a DataLoader worker started after the prune
    assert_same_contents(worker, shas)  # every sample it indexed is still readable
    assert len(CacheReader(cache.path)) == 3  # new readers see the pruned cache
    with pytest.raises(CacheLockedError, match="another run reads this cache"):
        open_cache(cache.path, spec(), rebuild=True)
    worker.close(), reader.close()
    with WriterLock(cache.path):
        sync_cache(cache.path, spec(), samples(shas[:3]))
    assert len(segments(cache.path)) == 1  # superseded segments deleted once nobody reads them


def test_duplicate_rows_are_reported_and_compacted_by_the_next_sync(tmp_path, capsys):
    shas = keys(5)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas)
    fill(cache, shas[:3])  # a second run collected the same samples
    stats = cache_stats(cache.path)
    assert (
        stats["samples"] == 5
        and stats["duplicate_rows"] == 3
        and stats["teachers"]["big"]["duplicate_rows"] == 3
    )
    main(["cache", "stats", str(cache.path)])
    assert "duplicate rows     3" in capsys.readouterr().out
    with WriterLock(cache.path):
        sync_cache(cache.path, spec(), samples(shas))
    assert cache_stats(cache.path)["duplicate_rows"] == 0 and len(segments(cache.path)) == 1
    assert_same_contents(CacheReader(cache.path), shas)


# ---- 6: corruption is detected, named, and repaired by recollecting exactly the bad samples


def corrupt_chunk(path: Path, dataset: str, teacher: str = "big") -> None:
    """Flip bytes inside the first stored chunk of ``teachers/<teacher>/<dataset>``."""
    with h5py.File(path, "r", locking=False) as f:
        info = f[f"teachers/{teacher}/{dataset}"].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes(b ^ 0xFF for b in raw.read(8)))


def test_corrupt_and_truncated_segments_are_named_errors_and_verify_repairs_them(tmp_path, capsys):
    shas = keys(9)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas, commit_every=3)
    first, second, third = segments(cache.path)
    corrupt_chunk(first, "lse")
    with pytest.raises(CacheCorruptError) as error:
        CacheReader(cache.path).read(shas[:2], "big")
    message = str(error.value)
    assert str(first) in message and "teacher 'big'" in message and shas[0] in message and shas[1] in message
    assert f"python -m distill cache verify {cache.path} --repair" in message

    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    with pytest.raises(CacheCorruptError, match=rf"corrupt teacher cache segment {second}.*--repair"):
        CacheReader(cache.path).load_index()

    with pytest.raises(SystemExit):
        main(["cache", "verify", str(cache.path)])
    report = capsys.readouterr().out
    assert f"bad segment {first}" in report and f"bad segment {second}" in report and str(third) not in report
    # the truncated file's index is gone with its bytes: what it held comes from its name
    assert report.count("(3 samples)") == 2, report
    main(["cache", "verify", str(cache.path), "--repair"])
    out = capsys.readouterr().out
    assert "removed 2 segment(s) (6 samples)" in out and segments(cache.path) == [third]
    plan = open_cache(cache.path, spec()).plan_sync(shas)
    assert plan.to_collect == {"big": shas[:6]} and plan.keep == 3  # exactly the lost samples
    main(["cache", "verify", str(cache.path)])
    assert ": ok" in capsys.readouterr().out


def test_verify_counts_the_samples_of_a_truncated_segment_it_cannot_open(tmp_path, capsys):
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, keys(40))
    (lost,) = segments(cache.path)
    lost.write_bytes(lost.read_bytes()[:4096])
    main(["cache", "verify", str(cache.path), "--repair"])
    out = capsys.readouterr().out
    assert f"bad segment {lost}: " in out and "(40 samples)" in out, out
    assert "removed 1 segment(s) (40 samples)" in out and not segments(cache.path)


def test_cache_commands_refuse_a_directory_that_is_not_a_cache(tmp_path, capsys):
    caches = tmp_path / "cache" / "kd"
    open_cache(caches / "train", spec())
    for command in (["stats"], ["verify"], ["prune", "--keep-data", str(tmp_path)]):
        with pytest.raises(SystemExit) as stop:
            main(["cache", command[0], str(caches), *command[1:]])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and f"{caches} is not a teacher cache (it holds no cache.json)" in error
        assert f"the caches in it: {caches / 'train'}" in error
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["cache", "stats", str(tmp_path / "empty")])
    assert stop.value.code == 2 and "give a cache directory" in capsys.readouterr().err


def test_prune_refuses_keep_data_that_holds_no_records(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(4)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, [r.sha for r in read_records([data], "auto")])
    with pytest.raises(SystemExit) as stop:
        main(["cache", "prune", str(cache.path), "--keep-data", str(data), str(empty)])
    message = str(stop.value.code)
    assert f"--keep-data {empty} holds no records" in message and f"rm -r {cache.path}" in message
    assert len(CacheReader(cache.path).shas()) == 4  # nothing freed


def test_values_no_teacher_produces_are_corruption(tmp_path):
    cache = open_cache(tmp_path / "c", spec())
    bad = targets(0)
    bad.lse = torch.full_like(bad.lse, 1e35)  # what flipped exponent bits gave: passes a checksum
    with cache.writer("big") as writer:
        writer.append(keys(1)[0], 6, bad)
    with pytest.raises(CacheCorruptError, match="log-sum-exp values out of range"):
        CacheReader(cache.path).get(keys(1)[0])


def test_a_fit_on_a_corrupt_cache_fails(tmp_path, kd_teacher_dir):
    config = kd_config(tmp_path, kd_teacher_dir, n=8)
    main(["fit", "--config", str(config), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    (segment,) = segments(tmp_path / "cache" / "train")
    corrupt_chunk(segment, "stream", "t1")
    with pytest.raises(CacheCorruptError, match=r"teacher 't1'.*cache verify"):
        main(["fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])


# ---- 13: segments are merged on sync past a threshold; a reader opens a bounded number of files


def test_many_small_commits_are_merged_by_sync_with_identical_contents(tmp_path, caplog):
    shas = keys(40)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas, commit_every=1)  # a commit every 30 s per rank adds up
    assert len(segments(cache.path)) == 40
    with caplog.at_level(logging.INFO), WriterLock(cache.path):
        sync_cache(cache.path, spec(), samples(shas))
    assert "merged 40 segments" in caplog.text and len(segments(cache.path)) == 1
    assert_same_contents(CacheReader(cache.path), shas)


def test_a_merge_past_the_threshold_writes_bounded_segments_and_leaves_merged_ones_alone(tmp_path):
    shas = keys(40)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas, commit_every=1)
    size = max(p.stat().st_size for p in segments(cache.path))
    limit = 8 * size  # about 8 small segments per merged one: the spare disk a merge needs stays small
    assert cache.tidy(max_segments=32, merged_bytes=limit) == 40
    merged = segments(cache.path)
    assert 4 <= len(merged) <= 6 and all(p.stat().st_size <= 1.5 * limit for p in merged), merged
    assert_same_contents(CacheReader(cache.path), shas)
    assert cache.tidy(max_segments=len(merged) - 1, merged_bytes=limit) == 0  # none is small any more
    assert segments(cache.path) == merged


def test_a_reader_keeps_at_most_max_open_files_open(tmp_path, monkeypatch):
    shas = keys(12)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas, commit_every=1)
    opened: list[h5py.File] = []
    most = []

    def counting_open(path):
        opened.append(h5py.File(path, "r", locking=False))
        most.append(sum(bool(f.id.valid) for f in opened))
        return opened[-1]

    monkeypatch.setattr(cache_reader, "open_segment", counting_open)
    reader = CacheReader(cache.path, max_open=4)
    assert_same_contents(reader, shas)
    assert len(opened) > 12 and max(most) <= 4


# ---- 18 (storage): per-sample teacher NLL, copied by compaction, NaN for older segments, perplexity


def test_teacher_nll_is_stored_compacted_and_reported_as_perplexity(tmp_path, capsys):
    shas = keys(4)
    cache = open_cache(tmp_path / "c", spec())
    fill(cache, shas[:2])
    fill(cache, shas[2:], nll=False)
    with h5py.File(segments(cache.path)[1], "r+") as f:
        del f["teachers/big/nll"]  # a segment written before the field existed
    reader = CacheReader(cache.path)
    assert reader.nll(shas[:2]).tolist() == [0.5, 1.5] and np.isnan(reader.nll(shas[2:])).all()
    reader.close()
    compact_segments(cache.path, scan_segments(cache.path)[0], cache_reader.sha_keys([]))
    nll = CacheReader(cache.path).nll(shas)
    assert nll[:2].tolist() == [0.5, 1.5] and np.isnan(nll[2:]).all()
    teacher = cache_stats(cache.path)["teachers"]["big"]
    assert teacher["teacher_nll_per_position"] == pytest.approx(2.0 / 10)  # 5 positions a sample
    assert teacher["teacher_ppl"] == pytest.approx(math.exp(0.2))
    main(["cache", "stats", str(cache.path)])
    assert f"perplexity {math.exp(0.2):.2f}" in capsys.readouterr().out
    unknown = open_cache(tmp_path / "old", spec())
    fill(unknown, shas, nll=False)
    assert cache_stats(unknown.path)["teachers"]["big"]["teacher_ppl"] is None
