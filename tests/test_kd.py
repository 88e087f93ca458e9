"""KD training: the objective against a dense reference, cache streaming, collect-then-train, chunked mode."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import run_cli
from distill.commands import main
from distill.objectives.kd import Distillation
from distill.targets import BatchTargets, concat_targets
from distill.teacher.batches import estimated_bytes
from distill.teacher.sparse import sparse_distribution
from tests.helpers import kd_config, logged_values, token_inputs

V, H = 40, 16


def dense_reference(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, T: float
):
    """Naive forward KL on full distributions, T**2-scaled, mixed with CE: a per-token sum."""
    p = torch.softmax(teacher / T, -1)
    kl = (p * (torch.log_softmax(teacher / T, -1) - torch.log_softmax(student / T, -1))).sum(-1)
    ce = torch.nn.functional.cross_entropy(student, labels, reduction="none")
    return (alpha * T**2 * kl + (1 - alpha) * ce).sum()


@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 2.0)])
def test_distillation_with_full_vocabulary_head_equals_dense_reference(alpha, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(13, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    teacher_logits = torch.randn(13, V) * 2
    labels = torch.randint(0, V, (13,))
    ids, logits, lse, _, _ = sparse_distribution(teacher_logits, k=V)
    targets = [concat_targets([SparseTargetsOf(ids, logits, lse)])]
    out = Distillation(alpha=alpha, temperature=temperature, chunk_size=4)(
        token_inputs(hidden, head, labels, BatchTargets(targets, V))
    )
    expected = dense_reference(head(hidden), teacher_logits, labels, alpha, temperature)
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    assert out.num_tokens == 13 and set(out.sums) == {"ce", "kd", "agree"}
    assert int(out.sums["agree"]) == int((head(hidden).argmax(-1) == teacher_logits.argmax(-1)).sum())

    # chunked gradients equal the unchunked ones
    (grad_chunked,) = torch.autograd.grad(out.loss_sum, hidden)
    (grad_dense,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad_chunked, grad_dense, rtol=1e-4, atol=1e-6)


def operations(objective, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, targets) -> int:
    """Tensor operations dispatched by ``objective``'s forward and backward on these positions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        objective(token_inputs(hidden, head, labels, targets)).loss_sum.backward()
    return Count.count


def head_problem(positions: int) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor, BatchTargets]:
    """Seeded hidden states, an lm head, labels and top-8 teacher targets for ``positions`` positions."""
    torch.manual_seed(0)
    hidden = torch.randn(positions, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    labels = torch.randint(0, V, (positions,))
    ids, logits, lse, _, _ = sparse_distribution(torch.randn(positions, V), k=8)
    return hidden, head, labels, BatchTargets([SparseTargetsOf(ids, logits, lse)], V)


def test_kd_chunks_run_only_the_pass_over_the_vocabulary():
    """Chunks run only the pass over the vocabulary (and recompute it in backward): KD's per-position
    terms, tail and buckets run once per batch, so a chunk adds about as many operations to KD as to CE
    (184 against CE's 35 when each chunk ran them: the small ops cost KD up to a fifth of its speed
    next to SFT on a CPU)."""
    from distill.objectives.ce import CrossEntropy

    hidden, head, labels, targets = head_problem(32)
    per_chunk = {}
    for name, make in (("kd", lambda c: Distillation(alpha=0.9, chunk_size=c)), ("ce", CrossEntropy)):
        one, eight = (operations(make(c), hidden, head, labels, targets) for c in (32, 4))
        per_chunk[name] = (eight - one) / 7
    assert per_chunk["kd"] < 1.5 * per_chunk["ce"], per_chunk


def vocabulary_buffers(objective, hidden: torch.Tensor, head: torch.nn.Module, labels, targets) -> int:
    """(positions, V) tensors made by ``objective``'s backward (forward and recompute not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape[-1:] == (V,) and func.__name__ != "mm.default":
                Count.count += 1
            return out

    loss = objective(token_inputs(hidden, head, labels, targets)).loss_sum
    with Count():
        loss.backward()
    return Count.count


def test_kd_backward_makes_no_more_vocabulary_wide_buffers_than_cross_entropy():
    """On a CPU each (chunk, V) buffer tends to come as fresh pages from the OS: autograd's gather
    backward made one more than cross-entropy's (an out-of-place scatter), and KD's step page-faulted
    7x more and ran ~10% slower than SFT's."""
    from distill.objectives.ce import CrossEntropy

    hidden, head, labels, targets = head_problem(8)
    kd = vocabulary_buffers(Distillation(alpha=0.9, chunk_size=8), hidden, head, labels, targets)
    ce = vocabulary_buffers(CrossEntropy(chunk_size=8), hidden, head, labels, targets)
    assert kd <= ce, (kd, ce)


def test_distillation_without_positions_is_zero_and_backpropagates():
    """A micro-batch without trainable positions still runs backward (every DDP rank must)."""
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(0, H, requires_grad=True)
    empty = SparseTargetsOf(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8), torch.zeros(0))
    out = Distillation(alpha=0.9, chunk_size=4)(
        token_inputs(hidden, head, torch.zeros(0, dtype=torch.long), BatchTargets([empty], V))
    )
    out.loss_sum.backward()
    assert float(out.loss_sum) == 0.0 and int(out.correct) == 0 and out.num_tokens == 0
    assert hidden.grad is not None and hidden.grad.shape == (0, H)


def SparseTargetsOf(ids, logits, lse):
    from distill.targets import SparseTargets

    return SparseTargets(ids, logits, lse)


def test_positions_that_do_not_match_the_data_are_an_error():
    head = torch.nn.Linear(H, V, bias=False)
    ids, logits, lse, _, _ = sparse_distribution(torch.randn(5, V), k=4)
    targets = [SparseTargetsOf(ids, logits, lse)]
    with pytest.raises(ValueError, match="5 teacher positions for 6 trainable tokens"):
        Distillation()(
            token_inputs(torch.randn(6, H), head, torch.zeros(6, dtype=torch.long), BatchTargets(targets, V))
        )


def test_kd_says_once_that_it_is_losing_when_val_ce_stalls_while_the_kd_term_falls(caplog):
    objective = Distillation(alpha=0.9)
    # (val/ce, val/kd): CE improves, then stays above its best (5.95) for two validations as KD falls
    validations = [(6.6, 2.0), (6.0, 1.5), (5.95, 1.2), (5.97, 1.0), (5.99, 0.9), (6.01, 0.8), (6.02, 0.7)]
    told = []
    with caplog.at_level(logging.INFO):
        for ce, kd in validations:
            objective.validated({"ce": torch.tensor(ce), "kd": torch.tensor(kd), "agree": torch.tensor(0.5)})
            told.append(caplog.text.count("KD is losing"))
    assert told == [0, 0, 0, 0, 1, 1, 1]  # at the second validation without a better val/ce, and once
    assert "best 5.9500, now 5.9900" in caplog.text and "(1.2000 -> 0.9000)" in caplog.text
    assert "objective.alpha 0.9 -> 0.5" in caplog.text and "val/teacher_ce" in caplog.text


@pytest.mark.parametrize(
    "validations",
    [
        [(6.6, 2.0), (6.0, 1.5), (5.9, 1.2), (5.8, 1.0), (5.7, 0.9)],  # CE still improving
        [(6.6, 2.0), (6.0, 1.5), (6.1, 1.6), (6.2, 1.4)],  # CE stalls, but so does the KD term
    ],
)
def test_kd_is_not_said_to_be_losing_while_val_ce_improves_or_the_kd_term_stalls_too(validations, caplog):
    objective = Distillation()
    with caplog.at_level(logging.INFO):
        for ce, kd in validations:
            objective.validated({"ce": torch.tensor(ce), "kd": torch.tensor(kd)})
    assert "KD is losing" not in caplog.text


def second_teacher(tmp_path: Path, teacher_dir: Path) -> Path:
    """``teacher_dir``'s model with its head perturbed (another teacher of the same vocabulary)."""
    from transformers import AutoModelForCausalLM

    second = tmp_path / "second"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.05)
    model.save_pretrained(second)
    for file in teacher_dir.glob("tokenizer*"):
        (second / file.name).write_bytes(file.read_bytes())
    return second


def test_fit_collects_two_teachers_in_turn_then_trains_and_a_second_fit_reuses_the_cache(
    tmp_path, kd_teacher_dir, caplog, capsys
):
    config = yaml.safe_load(kd_config(tmp_path, kd_teacher_dir).read_text())
    config["data"]["init_args"]["teachers"].append(
        {"model": str(second_teacher(tmp_path, kd_teacher_dir)), "name": "t2"}
    )
    config["model"]["init_args"]["objective"]["init_args"]["teacher_weights"] = [0.75, 0.25]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(path)])
    assert "collect {t1: 24, t2: 24}" in caplog.text and "collect {t1: 6, t2: 6}" in caplog.text
    for name in ("train/loss", "train/ce", "val/kd", "val/agree", "val/ppl"):
        assert logged_values(tmp_path, name), name
    assert len(logged_values(tmp_path, "train/kd")) == 6 and min(logged_values(tmp_path, "train/kd")) > 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(path), "--trainer.max_steps", "2"])
    assert (
        "keep 24, collect {t1: 0, t2: 0}" in caplog.text and "keep 6, collect {t1: 0, t2: 0}" in caplog.text
    )

    capsys.readouterr()
    main(["cache", "stats", str(tmp_path / "cache" / "train")])
    table = capsys.readouterr().out
    assert (
        "samples            24" in table
        and "scheme, K          topk, 8" in table
        and "teacher t1: 24" in table
    )
    main(["cache", "stats", str(tmp_path / "cache" / "train"), "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["settings"]["vocab_size"] == 32000 and 0 < stats["kl_stored_vs_exact"] < 1e-2
    assert set(stats["teachers"]) == {"t1", "t2"}
    assert all(t["samples"] == 24 for t in stats["teachers"].values())
    assert set(stats["teachers"]["t1"]["identity"]) == {"name", "weights_sha"}  # no path: a teacher may move


def test_a_collected_kd_data_module_plans_streams_resumes_and_aligns(tmp_path, kd_teacher_dir):
    """One collection read by the checks of the collected data: the epoch plans, a resumed stream, the
    online teacher's loss, and (packed rows over the same cache) the targets' alignment."""
    from distill.teacher.module import Teacher

    cli = run_cli(["--config", str(kd_config(tmp_path, kd_teacher_dir))], run=False)
    data, student = cli.datamodule, cli.model
    data.setup("fit")

    # epoch plans are shuffled deterministically and cover every sample
    first, again, second = data.collector.plan(0), data.collector.plan(0), data.collector.plan(1)
    assert first == again and first != second
    assert sorted(i for c in first for i in c) == list(range(24)) == sorted(i for c in second for i in c)
    assert all(len(c) <= 8 for c in first)

    # a resumed stream continues at the same batch
    loader = data.train_dataloader()
    loader.progress = lambda: (0, 0)
    full = [b.input_ids for b in loader]
    loader.load_state_dict({"epoch": 0, "batches": 4})
    resumed = [b.input_ids for b in loader]
    assert len(full) == len(loader) and len(resumed) == len(full) - 4
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed, strict=True))

    # online KD gives the cached loss
    student.configure_model()
    batch = next(iter(data.train_dataloader()))
    cached, _ = student.compute_loss(batch)
    online = Distillation(alpha=0.5, online=[Teacher(model=str(kd_teacher_dir), name="t1")], online_k=8)
    online.setup(student.objective_context())
    student.objective = online
    live, _ = student.compute_loss(replace(batch, targets=None))
    torch.testing.assert_close(live.loss_sum, cached.loss_sum, rtol=2e-3, atol=1e-3)

    # alignment: targets from the cache (collected unpacked) equal the teacher run on the packed batch
    cli = run_cli(["--config", str(kd_config(tmp_path, kd_teacher_dir, packing=True))], run=False)
    data = cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.attention_mask is None  # packed rows
    teacher = data.teacher
    online, _ = teacher.batch_targets(teacher.teacher_model(0), batch)
    cached = batch.targets.per_teacher[0]
    assert torch.equal(cached.ids, online.ids)
    torch.testing.assert_close(cached.lse, online.lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.logits, online.logits, atol=0.05, rtol=0.02)  # quantised values


def test_chunked_mode_alternates_collection_and_training_within_the_disk_budget(tmp_path, kd_teacher_dir):
    from distill.teacher.targets import TeacherTargets

    budget_gb = 6e-5  # 60 kB, below the ~104 kB all targets need: 4 chunks of the 48-sample set
    config = kd_config(tmp_path, kd_teacher_dir, n=48, cache_size_gb=budget_gb)
    sizes: list[int] = []
    original = TeacherTargets.finish_chunk

    def finish_and_measure(self, reader):  # disk use at its peak: a chunk collected, not yet purged
        sizes.append(sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file()))
        original(self, reader)

    TeacherTargets.finish_chunk = finish_and_measure
    try:
        main(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.max_steps",
                "16",
                "--trainer.val_check_interval",
                "8",
            ]
        )
    finally:
        TeacherTargets.finish_chunk = original
    assert (tmp_path / "cache" / "train-chunks" / "rank000").is_dir()  # chunked mode really ran
    assert not (tmp_path / "cache" / "train").exists()
    assert len(sizes) >= 3, sizes
    assert max(sizes) <= budget_gb * 1e9, sizes
    assert not list((tmp_path / "cache" / "train-chunks").rglob("*.h5"))  # purged
    assert len(logged_values(tmp_path, "train/kd")) == 16


def test_a_budget_below_one_row_is_refused_before_any_teacher_runs(tmp_path, kd_teacher_dir, monkeypatch):
    """The check needs only the estimates: it used to come after the validation targets were collected."""
    import distill.teacher.targets as teacher_targets

    collected, collect = [], teacher_targets.collect
    monkeypatch.setattr(teacher_targets, "collect", lambda *a, **k: collected.append(a) or collect(*a, **k))
    config = kd_config(tmp_path, kd_teacher_dir, cache_size_gb=1e-6)  # 1 kB: below one sample's targets
    data = run_cli(["--config", str(config)], run=False).datamodule
    with pytest.raises(ValueError) as refused:
        data.setup("fit")
    assert not collected and not list((tmp_path / "cache").rglob("*.h5"))  # no teacher ran
    found = re.fullmatch(
        r"data\.cache_size_gb=1e-06 leaves -[\d.e-]+ GB for training targets beside the validation set's, "
        r"less than one training sample \(or packed row\) may take \([\d.e-]+ GB\): raise "
        r"data\.cache_size_gb to at least ([\d.e-]+), or lower data\.max_seq_length",
        str(refused.value),
    )
    assert found, str(refused.value)
    collector = data.collector
    largest = max(estimated_bytes(row, collector.spec) for row in collector.rows)
    collector.cache_size_gb = float(found[1])  # the budget the error proposes holds the largest row
    collector.check_fits(largest, "one training sample (or packed row)", "data.max_seq_length")
    collector.cache_size_gb = float(found[1]) * 0.99
    with pytest.raises(ValueError, match="at least"):
        collector.check_fits(largest, "one training sample (or packed row)", "data.max_seq_length")


def test_sampled_cache_needs_the_sampled_loss():
    head = torch.nn.Linear(H, V, bias=False)
    ids, logits, lse, sample_ids, counts = sparse_distribution(
        torch.randn(4, V), k=0, scheme="sampled", num_draws=6
    )
    targets = [SparseTargetsOf(ids, logits, lse)]
    targets[0].sample_ids, targets[0].sample_counts = sample_ids, counts
    with pytest.raises(ValueError, match="use loss sampled_ce"):
        Distillation()(
            token_inputs(torch.randn(4, H), head, torch.zeros(4, dtype=torch.long), BatchTargets(targets, V))
        )
    inputs = token_inputs(torch.randn(4, H), head, torch.zeros(4, dtype=torch.long), BatchTargets(targets, V))
    out = Distillation(loss="sampled_ce")(inputs)
    assert out.loss_sum.isfinite() and out.num_tokens == 4


def test_sampled_targets_of_unequal_width_concatenate_with_zero_counts():
    from distill.targets import SparseTargets

    empty = torch.empty(2, 0)
    a = SparseTargets(
        empty.long(), empty, torch.zeros(2), torch.tensor([[3, 5, 7]] * 2), torch.tensor([[2, 1, 1]] * 2)
    )
    b = SparseTargets(
        empty.long(), empty, torch.zeros(2), torch.tensor([[4, 9]] * 2), torch.tensor([[3, 1]] * 2)
    )
    both = concat_targets([a, b])
    assert both.sample_ids.shape == (4, 3) and both.sample_counts.sum(-1).tolist() == [4, 4, 4, 4]
    assert both.sample_counts[2:, 2].tolist() == [0, 0]
