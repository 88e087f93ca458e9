"""What the teacher is: its identity covers every byte of its weights wherever it lies, its embedding
has a row for every token, vocabulary errors name both tokenizers, and what it is worth on the data
(its NLL of the labels) is stored, logged at fit start and beside the student's CE."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import distill.teacher.identity as identity
from distill.cache import CacheReader, StaleCacheError, open_cache
from distill.cli import main
from distill.data.batching import Collator
from distill.data.encoding import IGNORE_INDEX, encode_all
from distill.data.facts import DataFacts
from distill.data.formats import to_record
from distill.data.templates import resolve_template
from distill.objectives.context import Origin, Step
from distill.objectives.kd import Distillation
from distill.targets import BatchTargets, SparseTargets
from distill.teacher.alignment import target_positions, targets
from distill.teacher.collect import cache_spec, check_vocabularies, collect, plan_jobs
from distill.teacher.identity import VocabularyMismatchError, check_same_vocabulary, model_identity
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.sparse import Sparsity
from distill.train.model import load_causal_lm
from tests.helpers import (
    TINY_LLAMA,
    TOKENIZER_DIR,
    conversation,
    kd_config,
    logged_values,
    objective_context,
    save_tiny_teacher,
    token_inputs,
)


def samples(tokenizer, n: int = 3, template: str = "mistral"):
    records = [to_record(conversation(i, turns=1 + i % 2), f"chat.jsonl:{i + 1}", "auto") for i in range(n)]
    encoded, _ = encode_all(records, tokenizer, resolve_template(tokenizer, template), max_length=96)
    return encoded


def collator(tokenizer) -> Collator:
    return Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def naive_nll(model, sample, rows=None, merge: tuple[int, int] | None = None, labels=None) -> float:
    """The teacher's -log softmax(full logits)[next token], summed over the trainable positions."""
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids])).logits[0].double()
    positions = target_positions(sample)
    logits = logits[positions] if rows is None else logits[positions][rows]
    if merge is not None:  # the teacher's end-of-turn mass moved onto the student's
        source, target = merge
        logits[:, target] = torch.logaddexp(logits[:, target], logits[:, source])
        logits[:, source] = float("-inf")
    labels = torch.tensor(labels if labels is not None else [sample.labels[t + 1] for t in positions])
    return float(-torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum())


def spec_for(teacher: Path, tokenizer):
    teachers = [Teacher(model=str(teacher), name="t1")]
    module = TeacherModule(teachers, Sparsity(k=4), tokenizer=str(TOKENIZER_DIR))
    return cache_spec(module, tokenizer, None, 96, 6)


def fill(cache_dir: Path, teacher: Path, tokenizer) -> list[str]:
    """A cache holding two samples collected by ``teacher``."""
    cache = open_cache(cache_dir, spec_for(teacher, tokenizer))
    data = samples(tokenizer, 2)
    teachers = [Teacher(model=str(teacher), name="t1")]
    module = TeacherModule(teachers, Sparsity(k=4), tokenizer=str(TOKENIZER_DIR))
    jobs = plan_jobs(module, [(cache, data)])
    assert collect(module, jobs, collator(tokenizer), 2, torch.device("cpu")) == 2
    return [s.sha for s in data]


# ---- 5: identity ----------------------------------------------------------------------------------


def test_a_teacher_changed_late_in_its_weights_makes_the_cache_stale(tmp_path, tokenizer):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    fill(tmp_path / "cache", teacher, tokenizer)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    assert size > 2 << 20  # the change lies past the first MiB, which alone was hashed before
    with weights.open("r+b") as handle:  # a fine-tune saved in place: same size, other late bytes
        handle.seek(size - 4096)
        tail = handle.read(4096)
        handle.seek(size - 4096)
        handle.write(bytes(b ^ 0x5A for b in tail))
    assert weights.stat().st_size == size
    with pytest.raises(StaleCacheError, match=r"teachers\[t1\]: cache has .*weights_sha"):
        open_cache(tmp_path / "cache", spec_for(teacher, tokenizer))


def test_a_moved_or_copied_teacher_keeps_its_cache(tmp_path, tokenizer):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    shas = fill(tmp_path / "cache", teacher, tokenizer)
    copied = Path(shutil.copytree(teacher, tmp_path / "elsewhere" / "copy"))
    moved = Path(shutil.move(teacher, tmp_path / "moved"))
    for place in (moved, copied):
        cache = open_cache(tmp_path / "cache", spec_for(place, tokenizer))  # not stale
        assert cache.plan_sync(shas).to_collect == {"t1": []}  # nothing recollected
    assert model_identity(str(moved)) == model_identity(str(copied))
    assert str(moved) not in json.dumps(model_identity(str(moved)))


def test_the_second_identity_reads_no_weights(tmp_path, monkeypatch):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    monkeypatch.setattr(identity, "_RACY_NS", 0)  # files just written count as settled
    hashed: list[str] = []
    real = identity._file_digest
    monkeypatch.setattr(identity, "_file_digest", lambda path: hashed.append(path.name) or real(path))
    first = model_identity(str(teacher))
    assert "model.safetensors" in hashed and "config.json" in hashed
    memo = json.loads((teacher / ".distill_hash.json").read_text())
    full = hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest()
    assert memo["model.safetensors"]["sha256"] == full  # the whole file, not a peek
    hashed.clear()
    assert model_identity(str(teacher)) == first and hashed == []


def test_a_file_changed_in_the_clock_tick_of_its_hash_is_hashed_again(tmp_path, monkeypatch):
    teacher = save_tiny_teacher(tmp_path / "teacher")  # just written: its mtime may not move on a rewrite
    hashed: list[str] = []
    real = identity._file_digest
    monkeypatch.setattr(identity, "_file_digest", lambda path: hashed.append(path.name) or real(path))
    model_identity(str(teacher))
    hashed.clear()
    model_identity(str(teacher))
    assert "model.safetensors" in hashed


def test_a_read_only_teacher_keeps_its_memo_in_the_user_cache(tmp_path, monkeypatch):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(identity.os, "access", lambda path, mode: Path(path) != teacher)
    model_identity(str(teacher))
    assert not (teacher / ".distill_hash.json").exists()
    (memo,) = (tmp_path / "xdg" / "distill" / "weights").glob("*.json")
    assert "model.safetensors" in json.loads(memo.read_text())


# ---- 7: embedding rows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_teacher(tmp_path_factory) -> Path:
    """The bundled 32,000-token tokenizer over a model of 1,000 embedding rows."""
    path = tmp_path_factory.mktemp("small_vocab")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, vocab_size=1000)).save_pretrained(
        path
    )
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def rows_error(path: Path) -> str:
    return rf"(?s){re.escape(str(path))}.*1,000 rows.*{re.escape(str(TOKENIZER_DIR))} \(32,000 tokens\)"


def test_a_teacher_with_fewer_rows_than_the_tokenizer_fails_before_any_work(
    tmp_path, tokenizer, small_vocab_teacher
):
    module = TeacherModule([Teacher(model=str(small_vocab_teacher), name="small")])
    with pytest.raises(ValueError, match=rows_error(small_vocab_teacher)):
        check_vocabularies(module, tokenizer)
    with pytest.raises(ValueError, match=rows_error(small_vocab_teacher)):  # an online teacher, at load
        load_causal_lm(str(small_vocab_teacher), None, tokenizer, role="teacher small")
    config = kd_config(tmp_path, small_vocab_teacher, n=4)
    with pytest.raises(ValueError, match=rows_error(small_vocab_teacher)):
        main(["fit", "--config", str(config)])
    assert not (tmp_path / "cache").exists()


def test_a_student_with_fewer_rows_is_resized_and_says_so(tokenizer, small_vocab_teacher, caplog):
    with caplog.at_level(logging.INFO):
        model = load_causal_lm(str(small_vocab_teacher), None, tokenizer)
    assert model.get_input_embeddings().num_embeddings == 32000
    assert f"student {small_vocab_teacher}: 31,000 embedding rows added" in caplog.text


# ---- 8: vocabulary mismatch -----------------------------------------------------------------------


def test_the_vocabulary_error_names_both_tokenizers_and_their_sizes(tokenizer, chat_tokenizer_dir):
    other = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    with pytest.raises(VocabularyMismatchError) as error:
        check_same_vocabulary(tokenizer, other, "t1")
    message = str(error.value)
    assert f"t1's tokenizer {chat_tokenizer_dir} (32,005 tokens)" in message
    assert f"the student's tokenizer {TOKENIZER_DIR} (32,000 tokens)" in message


# ---- 18: what the teacher is worth ----------------------------------------------------------------


def test_the_stored_teacher_nll_equals_a_naive_reference(tmp_path, tokenizer, teacher_dir):
    data = samples(tokenizer, 3)
    module = TeacherModule(
        [Teacher(model=str(teacher_dir), name="t1", dtype="float32")],
        sparsity=Sparsity(k=4),
        chunk_size=7,  # several chunks per batch
        tokenizer=str(TOKENIZER_DIR),
    )
    spec = cache_spec(module, tokenizer, None, 96, 6)
    cache = open_cache(tmp_path / "cache", spec)
    collect(module, plan_jobs(module, [(cache, data)]), collator(tokenizer), 2, torch.device("cpu"))
    model = module.teacher_model(0)
    expected = [naive_nll(model, s) for s in data]
    stored = CacheReader(tmp_path / "cache").nll([s.sha for s in data], "t1")
    assert stored.tolist() == pytest.approx(expected, rel=1e-5)
    assert all(e > 0 for e in expected)


def test_an_aligned_teacher_scores_the_students_tokens(chat_tokenizer_dir, chat_tokenizer):
    tok = chat_tokenizer
    chatml = resolve_template(tok, "chatml")
    config = {**TINY_LLAMA, "vocab_size": len(tok)}
    module = TeacherModule(
        [Teacher(model_config=config, name="inst", template="llama3", dtype="float32")],
        sparsity=Sparsity(k=8),
        tokenizer=str(chat_tokenizer_dir),
    )
    records = [to_record(conversation(i, turns=2), f"chat.jsonl:{i + 1}", "auto") for i in range(2)]
    data, _ = encode_all(records, tok, chatml, max_length=200)
    module.prepare_jobs([(0, data)], chatml)
    torch.manual_seed(0)
    model = module.teacher_model(0)
    outputs = module.predict_step(collator(tok)(data), 0, 0)
    s_eot, t_eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    for sample, out in zip(data, outputs, strict=True):
        view = module.aligned[0][sample.sha]
        expected = naive_nll(model, view.teacher, view.rows, (t_eot, s_eot), targets(sample))
        assert out.nll == pytest.approx(expected, rel=1e-5)


def test_the_objective_reports_the_teachers_ce_beside_the_students(tokenizer, teacher_dir):
    batch = collator(tokenizer)(samples(tokenizer, 2))
    trainable = batch.labels[:, 1:] != IGNORE_INDEX
    labels = batch.labels[:, 1:][trainable]
    online = Distillation(online=[Teacher(model=str(teacher_dir), name="t1", dtype="float32")], online_k=4)
    online.setup(objective_context(tokenizer, None, origin=Origin(tokenizer=str(TOKENIZER_DIR))))
    assert online.metric_names == ("ce", "kd", "agree", "teacher_ce")
    head = torch.nn.Linear(32, 32000, bias=False)
    attached = online.prepare(batch, Step()).targets
    out = online(token_inputs(torch.randn(labels.shape[0], 32), head, labels, attached))
    (model,) = online.teachers.models(torch.device("cpu"))
    rows = [batch.input_ids[i][batch.attention_mask[i].bool()] for i in range(2)]
    expected = 0.0
    for ids, row_labels in zip(rows, batch.labels, strict=True):
        sample = SimpleNamespace(input_ids=ids.tolist(), labels=row_labels[: len(ids)].tolist())
        expected += naive_nll(model, sample)
    assert float(out.sums["teacher_ce"]) == pytest.approx(expected, rel=1e-5)
    two = Distillation(online=[Teacher(model="a", name="a"), Teacher(model="b", name="b")])
    assert two.metric_names[-2:] == ("teacher_ce/a", "teacher_ce/b")


def test_fit_logs_the_teachers_perplexity_and_its_ce_beside_the_students(tmp_path, kd_teacher_dir, caplog):
    config = kd_config(tmp_path, kd_teacher_dir, n=8)
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(config), "--trainer.max_steps", "3"])
    found = re.search(r"teacher t1 perplexity on assistant tokens: train ([\d.]+), val ([\d.]+)", caplog.text)
    assert found, caplog.text
    train_ppl, val_ppl = map(float, found.groups())
    # the cache's per-sample NLL sums over this run's positions
    reader = CacheReader(tmp_path / "cache" / "val")
    positions = sum(int(n) for n in reader.load_index()["t1"].npos)
    assert val_ppl == pytest.approx(math.exp(reader.nll(reader.shas("t1"), "t1").sum() / positions), abs=0.06)
    # logged beside the student's CE: the same value, as a per-token mean
    (val_teacher_ce,) = logged_values(tmp_path, "val/teacher_ce")
    assert math.exp(val_teacher_ce) == pytest.approx(val_ppl, rel=1e-4, abs=0.06)
    assert logged_values(tmp_path, "val/ce") and len(logged_values(tmp_path, "train/teacher_ce")) == 3
    assert train_ppl > 1 and os.path.isdir(tmp_path / "cache" / "train")


def test_cached_teachers_each_get_their_ce_under_their_name():
    objective = Distillation()
    cached = DataFacts("KDDataModule", "samples", pad_id=0, teacher_names=("a", "b"))
    objective.setup(objective_context(None, None, cached))
    assert objective.metric_names == ("ce", "kd", "agree", "teacher_ce/a", "teacher_ce/b")
    V = 6
    one = SparseTargets(torch.arange(V).repeat(3, 1), torch.zeros(3, V), torch.full((3,), math.log(V)))
    nll = {"a": torch.tensor(4.0, dtype=torch.float64), "b": torch.tensor(7.0, dtype=torch.float64)}
    attached = BatchTargets([one, one], V, nll)
    out = objective(token_inputs(torch.randn(3, 4), torch.nn.Linear(4, V), torch.tensor([0, 1, 2]), attached))
    assert {k: float(v) for k, v in out.sums.items() if k.startswith("teacher")} == {
        "teacher_ce/a": 4.0,
        "teacher_ce/b": 7.0,
    }
