"""Teacher collection: sparse outputs against a dense reference, sync, stale caches, vocabulary, crashes."""

import gc
import json
import logging
import weakref

import pytest
import torch

from distill.cache import CacheReader, StaleCacheError, cache_stats
from distill.cli import main
from distill.teacher.identity import VocabularyMismatchError
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.sparse import sparse_distribution, top_k
from tests.helpers import (
    TINY_LLAMA,
    TOKENIZER_DIR,
    clean_env,
    collect_config,
    conversation,
    dataset_samples,
    run,
    write_jsonl,
)


def test_sparse_distribution_matches_dense():
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 3
    ids, head, lse, sample_ids, counts = sparse_distribution(logits, k=5)
    dense_top = logits.topk(5).indices.sort().values
    assert torch.equal(ids, dense_top) and sample_ids is None and counts is None
    torch.testing.assert_close(head, logits.gather(-1, dense_top))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    tail = torch.log1p(-torch.exp(torch.logsumexp(head, -1) - lse)).exp()
    torch.testing.assert_close(tail, 1 - torch.softmax(logits, -1).gather(-1, dense_top).sum(-1))

    _, _, _, sample_ids, counts = sparse_distribution(logits, k=0, scheme="sampled", num_draws=12)
    assert torch.equal(counts.sum(-1), torch.full((7,), 12, dtype=counts.dtype))
    ids, _, _, sample_ids, counts = sparse_distribution(logits, k=5, scheme="hybrid", num_draws=12)
    drawn = [set(s[c > 0].tolist()) for s, c in zip(sample_ids, counts, strict=True)]
    assert all(not (d & set(i.tolist())) for d, i in zip(drawn, ids, strict=True))  # tail draws only


@pytest.mark.parametrize("vocab", [32000, 64 * 300 + 17])  # whole blocks; a partial last block
def test_blocked_top_k_equals_torch_topk(vocab):
    torch.manual_seed(0)
    wide = torch.randn(40, vocab + 29) * 3
    wide[0, 640:704] += 50  # row 0: the whole top-64 in one block
    wide[1, -29 - 10 : -29] += 50  # row 1: the top-10 in the partial last block (or the last block)
    for logits in (wide[:, :vocab].contiguous(), wide[:, :vocab]):  # a head sliced to the vocabulary
        for k in (1, 10, 64):
            values, ids = top_k(logits, k)
            expected_values, expected_ids = logits.topk(k, dim=-1)
            assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)
    # bfloat16 makes ties: the same values, and ids that hold them
    low = wide[:, :vocab].bfloat16()
    values, ids = top_k(low, 64)
    assert torch.equal(values, low.topk(64, dim=-1).values) and torch.equal(low.gather(1, ids), values)


def test_log_sum_exp_within_a_float32_ulp_at_a_real_vocabulary():
    torch.manual_seed(0)
    logits = torch.randn(64, 32000) * 4  # |lse| ~ 20: one float32 ulp is 1.9e-6
    ids, head, lse, _, _ = sparse_distribution(logits.clone(), k=64, scratch=True)
    assert (lse.double() - torch.logsumexp(logits.double(), -1)).abs().max() < 2.5e-6
    assert torch.equal(ids, logits.topk(64).indices.sort().values)
    assert torch.equal(head, logits.gather(-1, ids))


def test_release_frees_the_teacher_collecting_garbage_only_for_a_cycle():
    module = TeacherModule([Teacher(model_config=TINY_LLAMA, name="t")], tokenizer=str(TOKENIZER_DIR))
    full_collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full_collections.append(1)

    gc.callbacks.append(count)
    try:
        for cycle in (False, True):
            model = module.teacher_model(0)
            if cycle:
                model.cycle = [model]  # only the garbage collector can free it
            alive = weakref.ref(model)
            del model
            full_collections.clear()
            module.release()
            assert alive() is None and len(full_collections) == int(cycle)
    finally:
        gc.callbacks.remove(count)


def test_collected_cache_equals_the_teachers_dense_output(tmp_path, teacher_dir):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i, turns=1 + i % 2) for i in range(12)])
    config = collect_config(tmp_path, data, teacher_dir)
    main(["collect", "--config", str(config)])
    dm = dataset_samples(config)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    reader = CacheReader(tmp_path / "cache" / "train")
    assert sorted(reader.shas()) == sorted(s.sha for s in dm.train) and len(dm.train) == 9
    assert len(CacheReader(tmp_path / "cache" / "val").shas()) == 3
    for sample in dm.train[:3]:
        with torch.no_grad():
            logits = model(torch.tensor([sample.input_ids])).logits[0, :-1]
        labels = torch.tensor(sample.labels[1:])
        dense = logits[labels != -100]
        stored = reader.get(sample.sha)
        assert stored.ids.shape == (sample.num_trainable, 8)
        assert torch.equal(stored.ids, dense.topk(8).indices.sort().values)
        torch.testing.assert_close(stored.lse, torch.logsumexp(dense, -1), rtol=1e-5, atol=1e-5)
        # values are quantised (6 bits): close to the dense log-probs of the head
        exact = (dense.gather(-1, stored.ids) - stored.lse[:, None]).exp()
        got = (stored.logits - stored.lse[:, None]).exp()
        assert (got - exact).abs().max() < 0.02


def test_sync_after_adding_removing_editing_and_reordering(tmp_path, teacher_dir, caplog):
    rows = [conversation(i) for i in range(10)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = collect_config(tmp_path, data, teacher_dir, writer={"val_path": None})
    config.write_text(config.read_text().replace("val_fraction: 0.25", "val_fraction: 0.0"))
    main(["collect", "--config", str(config)])
    first = set(CacheReader(tmp_path / "cache" / "train").shas())

    edited = dict(rows[0], messages=[*rows[0]["messages"][:-1], {"role": "assistant", "content": "Changed."}])
    new_rows = [*reversed(rows[3:]), edited, conversation(100), conversation(101)]  # drop 1, 2; edit 0; add 2
    write_jsonl(data, new_rows)
    dm = dataset_samples(config)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # samples gone from the data are dropped only when asked
        main(["collect", "--config", str(config), "--trainer.callbacks.init_args.prune", "true"])
    assert "keep 7, collect {t1: 3}, 3 cached samples not in this data: pruned 3 samples" in caplog.text
    after = set(CacheReader(tmp_path / "cache" / "train").shas())
    assert after == {s.sha for s in dm.train}
    assert len(after & first) == 7  # the reordered ones were kept, not recollected


def test_stale_cache_is_an_error_and_rebuild_is_explicit(tmp_path, teacher_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(6)])
    main(["collect", "--config", str(collect_config(tmp_path, data, teacher_dir))])
    config = collect_config(tmp_path, data, teacher_dir, model={"sparsity": {"k": 4}})
    with pytest.raises(StaleCacheError, match=r"(?s)k: cache has 8, config asks for 4.*rebuild"):
        main(["collect", "--config", str(config)])
    main(["collect", "--config", str(config), "--trainer.callbacks.init_args.rebuild", "true"])
    assert (
        CacheReader(tmp_path / "cache" / "train").get(dataset_samples(config).train[0].sha).ids.shape[1] == 4
    )


def test_vocabulary_mismatch_fails_before_any_work(tmp_path, chat_tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = tmp_path / "other"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, vocab_size=32005)).save_pretrained(
        teacher
    )
    for file in chat_tokenizer_dir.iterdir():
        (teacher / file.name).write_bytes(file.read_bytes())
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(4)])
    with pytest.raises(VocabularyMismatchError, match="first: '<\\|im_start\\|>': student None vs t1 32000"):
        main(["collect", "--config", str(collect_config(tmp_path, data, teacher))])
    assert not (tmp_path / "cache").exists()


def test_kill_9_mid_collection_then_rerun_equals_an_uninterrupted_run(tmp_path, teacher_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i, turns=3) for i in range(40)])
    reference_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    writer = {"val_path": None, "commit_seconds": 0.0}  # commit after every batch
    # batches of one: a sample's numbers then do not depend on which samples share its batch
    one = ["--data.init_args.batch_size", "1"]
    ref_config = collect_config(reference_dir, data, teacher_dir, writer=dict(writer))
    main(["collect", "--config", str(ref_config), *one])
    config = collect_config(killed_dir, data, teacher_dir, writer=dict(writer))
    kill = json.dumps({"class_path": "tests.probes.KillAtPredictBatch", "init_args": {"batch": 10}})
    killed = run(
        ["collect", "--config", str(config), *one, "--trainer.callbacks+", kill], clean_env(), check=False
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    segments = killed_dir / "cache" / "train"
    partial = CacheReader(segments).shas()  # a killed cache is still readable
    assert 0 < len(partial) < 30, "the kill must land mid-collection"
    main(["collect", "--config", str(config), *one])
    reference, resumed = CacheReader(reference_dir / "cache" / "train"), CacheReader(segments)
    assert sorted(resumed.shas()) == sorted(reference.shas())
    for sha in reference.shas():
        a, b = reference.get(sha), resumed.get(sha)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logits, b.logits) and torch.equal(a.lse, b.lse)


def test_ddp_two_processes_collect_disjoint_shards_that_read_as_one(tmp_path, teacher_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(21)])
    config = collect_config(tmp_path, data, teacher_dir)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    run(["collect", "--config", str(config), *ddp], clean_env())
    train = tmp_path / "cache" / "train"
    ranks = {p.name[:4] for p in train.glob("*.h5")}
    assert ranks == {"r000", "r001"}
    dm = dataset_samples(config)
    assert sorted(CacheReader(train).shas()) == sorted(s.sha for s in dm.train)
    # disjoint shards: every sample stored exactly once over both ranks' files
    stats = cache_stats(train)
    assert stats["teachers"]["t1"]["samples"] == len(dm.train) == stats["samples"]
    reader = CacheReader(train)
    reader.shas()
    assert reader.stored_positions == stats["positions"]  # no row stored twice (counts duplicates too)
