"""On-policy rounds through the cache: each round's completions written and collected (exactly those),
trained on inside one fit, a killed fit resumed at its round and batch, sharded ranks sampling in step
after a kill, and the refusals."""

from __future__ import annotations

import json
import logging
import socket
import time
from datetime import timedelta
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import distill.rollout.rounds as rounds_module
import distill.teacher.targets as teacher_targets
from distill import StudentModule
from distill.cache.spec import CacheSpec
from distill.cli import main
from distill.data.encoding import encode_record, truncate
from distill.data.formats import Record
from distill.data.templates import resolve_template
from distill.rollout import Sampling
from distill.rollout.rounds import Rounds
from distill.teacher.datamodule import KDDataModule
from distill.teacher.module import Teacher
from tests.helpers import (
    TINY_LLAMA,
    TOKENIZER_DIR,
    check_killed_fit_resumes,
    kd_config,
    logged_values,
    with_last_checkpoint,
    write_jsonl,
)

ROUNDS = {"num_rounds": 3, "prompts_per_round": 4, "num_generations": 2}
ROUNDS.update(sampling={"max_new_tokens": 5}, max_prompt_length=64)


def prompt_file(tmp_path, n: int = 10):
    rows = [{"question": f"Name the number after {i}.", "answer": str(i + 1)} for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def rounds_config(tmp_path, teacher_dir, **rounds) -> dict:
    path = kd_config(
        tmp_path,
        teacher_dir,
        train_files=str(prompt_file(tmp_path)),
        rounds={**ROUNDS, **rounds},
        max_seq_length=160,
    )
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["objective"]["init_args"] = {"loss": "jsd", "alpha": 1.0}
    config["trainer"]["max_steps"] = 6  # 3 rounds x 8 completions, batches of 4
    return config


def round_lines(cache, index: int) -> list[dict]:
    """Round ``index``'s lines of the one fit whose rounds ``cache`` holds."""
    (run,) = (cache / "rounds").glob("run-*")
    path = run / f"round-{index:05d}" / "rank000.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_round_collects_exactly_its_completions_and_trains_on_them(
    tmp_path, kd_teacher_dir, tokenizer, monkeypatch
):
    collected = []
    original = teacher_targets.collect

    def spy(teacher, jobs, *args, **kwargs):
        collected.append(sorted(s.sha for job in jobs for s in job.samples))
        return original(teacher, jobs, *args, **kwargs)

    monkeypatch.setattr(teacher_targets, "collect", spy)
    # where each round is sampled: in the training step, which Lightning runs inside the strategy's
    # forward (the root FSDP unit's weights are gathered only there), not in the DataLoader
    stepping, sampled_in_step = [], []
    training_step, write = StudentModule.training_step, rounds_module.write_completions

    def in_step(self, *args):
        stepping.append(True)
        try:
            return training_step(self, *args)
        finally:
            stepping.pop()

    def sample(*args, **kwargs):
        sampled_in_step.append(bool(stepping))
        return write(*args, **kwargs)

    monkeypatch.setattr(StudentModule, "training_step", in_step)
    monkeypatch.setattr(rounds_module, "write_completions", sample)
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump(rounds_config(tmp_path, kd_teacher_dir)))
    main(["fit", "--config", str(path)])

    template = resolve_template(tokenizer, "mistral")
    seen_prompts = []
    assert len(collected) == 4  # the validation set, then one collection per round
    assert sampled_in_step == [True, True, True]
    for index in range(3):
        lines = round_lines(tmp_path / "cache", index)
        assert len(lines) == 8 and sorted((ln["sample"]) for ln in lines) == [0, 0, 0, 0, 1, 1, 1, 1]
        prompts = {ln["prompt_sha"] for ln in lines}
        assert len(prompts) == 4  # four prompts a round, two completions each
        seen_prompts.append(prompts)
        for line in lines:
            assert [m["role"] for m in line["messages"]] == ["user", "assistant"]
        # what was collected for the round: exactly its samples, as SFT encodes its conversations
        records = [Record(source="x", messages=tuple(ln["messages"])) for ln in lines]
        shas = {truncate(encode_record(r, tokenizer, template), 160, "right").sha for r in records}
        assert collected[index + 1] == sorted(shas)
    assert not seen_prompts[0] & seen_prompts[1]  # 10 prompts: two rounds a pass, disjoint
    assert not list((tmp_path / "cache" / "train-chunks").rglob("*.h5"))  # each round purged
    assert len(logged_values(tmp_path, "train/kd")) == 6
    # a new fit samples its own rounds: it never reads those the first one sampled with other weights
    main(["fit", "--config", str(path), "--trainer.max_steps", "2"])
    runs = sorted((tmp_path / "cache" / "rounds").glob("run-*"))
    assert len(runs) == 2 and all((run / "round-00000" / "rank000.jsonl").exists() for run in runs)


def test_a_killed_rounds_fit_resumes_at_its_round_and_batch(tmp_path, kd_teacher_dir):
    def config_in(name: str):
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        config = rounds_config(directory, kd_teacher_dir, num_rounds=5, num_generations=1)
        config["data"]["init_args"]["batch_size"] = 2  # 2 batches a round
        config["trainer"].update(val_check_interval=None, limit_val_batches=0, enable_checkpointing=True)
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, ["--trainer.max_steps", "10"])
    for run in ("reference", "resumed"):
        for index in range(5):
            lines = round_lines(tmp_path / run / "cache", index)  # the resumed fit kept its run
            assert len(lines) == 4  # a resumed round is read back, not sampled again
    reference, resumed = (round_lines(tmp_path / r / "cache", 4) for r in ("reference", "resumed"))
    # the same student sampled the round after the resume
    assert [ln["messages"] for ln in reference] == [ln["messages"] for ln in resumed]


def _sample_a_round_on_two_ranks(rank: int, directory, teacher, port: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    rounds = Rounds(
        1, 4, num_generations=2, sampling=Sampling(5), max_prompt_length=64, generation_batch_size=1,
        directory=str(directory / "rounds"),
    )  # fmt: skip
    data = KDDataModule(
        [Teacher(model=str(teacher))],
        train_files=str(directory / "prompts.jsonl"),  # written once, before the ranks start
        tokenizer=str(TOKENIZER_DIR),
        template="mistral",
        max_seq_length=160,
        rounds=rounds,
    )
    data.rounds.load_state_dict({"rounds_run": "killed"})  # a resumed fit's run
    data.rounds.read_prompts()
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(data.tokenizer))
    policy = AutoModelForCausalLM.from_config(config)
    sample = partial(data.rounds.samples, 0, policy, rank=rank, world_size=2, step=0)
    if rank == 0:  # its file was complete when the fit was killed; rank 1's had not begun
        sample(synced=False)
    # sharded: every forward is a collective, and transformers' synced generate all-reduces every token
    trained = sample(synced=True)
    counts = [None, None]
    dist.all_gather_object(counts, len(trained))
    assert counts == [4, 4]  # two prompts x two completions on each rank
    dist.destroy_process_group()


def test_sharded_ranks_sample_a_round_in_step_when_one_has_nothing_left(tmp_path, kd_teacher_dir):
    """Rank 0 has nothing left to sample after a kill, rank 1 two generate calls: rank 0 joins both,
    idle (sharded weights hang, or mismatch collectives, when ranks make different numbers of calls)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prompt_file(tmp_path)
    args = (tmp_path, kd_teacher_dir, port)
    ranks = mp.start_processes(_sample_a_round_on_two_ranks, args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish sampling the round: a rank hung in a generate call")
    directory = tmp_path / "rounds" / "run-killed" / "round-00000"
    lines = [(directory / f"rank{r:03d}.jsonl").read_text() for r in (0, 1)]
    assert [text.count("\n") for text in lines] == [4, 4]


def test_rounds_without_validation_files_record_and_align_to_their_template(tmp_path, chat_tokenizer, caplog):
    """With no data.val_files nothing is encoded before round 0, yet the rounds train on conversations:
    the cache spec records their template, and a teacher in a template of its own aligns to it (round 0
    failed: "plan_jobs needs the student's (template=)")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(chat_tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "instruct")
    chat_tokenizer.save_pretrained(tmp_path / "instruct")
    data = KDDataModule(
        [Teacher(model=str(tmp_path / "instruct"), name="inst", template="llama3")],
        train_files=str(prompt_file(tmp_path)),
        tokenizer=str(tmp_path / "instruct"),
        template="chatml",
        add_eot_to_stop_tokens=True,
        max_seq_length=160,
        cache_dir=str(tmp_path / "cache"),
        rounds=Rounds(2, 4, sampling=Sampling(5), max_prompt_length=64),
    )
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    template = resolve_template(chat_tokenizer, "chatml")
    assert data.collector.spec.template == CacheSpec(template=template.source).template
    stream = data.rounds.stream(4, 0, 1, lambda: 0)
    with stream.round(0) as batch:
        built = batch(0).build(AutoModelForCausalLM.from_config(config), False)  # samples, then collects
    assert built.input_ids.shape[0] == 4 and len(built.targets.per_teacher) == 1
    assert data.rounds.prompts.resolve_chat_template().source == template.source  # what encoded them
    assert "perplexity" not in caplog.text  # nothing collected before training: nothing to report


def test_rounds_refuse_what_cannot_work(tmp_path, kd_teacher_dir, capsys, monkeypatch):
    collected, collect = [], teacher_targets.collect
    monkeypatch.setattr(teacher_targets, "collect", lambda *a, **k: collected.append(a) or collect(*a, **k))
    cases = [
        ({"prompts_per_round": 11}, {}, r"prompts_per_round is 11, but data\.train_files hold 10 usable"),
        ({"sampling": {"max_new_tokens": 200}}, {}, r"need max_seq_length > 264"),
        ({}, {"cache_size_gb": 3e-5}, r"less than a round's targets may take \(2\.16e-06 GB\): raise "
         r"data\.cache_size_gb to at least [\d.e-]+, or lower data\.rounds\.prompts_per_round"),
    ]  # fmt: skip
    for rounds, data, error in cases:
        config = rounds_config(tmp_path, kd_teacher_dir, **rounds)
        config["data"]["init_args"].update(data)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(ValueError, match=error):
            main(["fit", "--config", str(path)])
        assert not collected, error  # refused before any teacher ran (the validation set's included)
    path.write_text(yaml.safe_dump(rounds_config(tmp_path, kd_teacher_dir, num_rounds=0)))
    with pytest.raises(SystemExit):  # a config error: the message alone
        main(["fit", "--config", str(path)])
    assert "data.rounds: num_rounds, prompts_per_round and num_generations must be at least 1" in (
        capsys.readouterr().err
    )
    config = rounds_config(tmp_path, kd_teacher_dir)
    config["data"]["init_args"]["packing"] = True
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path)])
    assert "each round's completions as they come: no packing" in capsys.readouterr().err
