"""``python -m distill pipeline``: stages chained through their exports and merges, skipped when complete,
rerun from a changed stage, resumed after a kill; the stage files hold what they say."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from distill.callbacks.stage_results import batch_size

from distill import commands
from distill.data.batch import CompletionBatch, PairBatch, TokenBatch, extended
from distill.pipeline.inputs import ContentHashes, data_digest
from distill.pipeline.plan import Stage, plan
from distill.pipeline.runner import (
    Runner,
    describe,
    fit_command,
    launch_id,
    stage_env,
    stage_key,
    wait_for,
)
from distill.pipeline.spec import PipelineError, StageSpec, read_pipeline
from tests.helpers import (
    LAUNCH_VARS,
    ROOT,
    TINY_LLAMA,
    TOKENIZER_DIR,
    clean_env,
    conversation,
    kd_config,
    preference_pair,
    run,
    start_script,
    write_jsonl,
)


def stage_config(tmp_path, name: str, data: dict, model: dict, steps: int) -> str:
    """A tiny CPU fit config: a checkpoint every step, logs and export in places the runner replaces."""
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": steps,
            "log_every_n_steps": 1,
            "val_check_interval": steps,
            "check_val_every_n_epoch": None,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "x"}},
            "callbacks": [
                {"class_path": "distill.callbacks.HFExport", "init_args": {"dirpath": "elsewhere"}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": "elsewhere", "every_n_train_steps": 1, "save_top_k": 0},
                },
            ],
        },
        "model": {"class_path": "distill.StudentModule", "init_args": model},
        "data": data,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def stage_configs(tmp_path) -> dict[str, str]:
    """PT of a fresh tiny Llama on text, SFT with LoRA on conversations, DPO on pairs."""
    texts = [
        {"text": f"Document {i}: the number {i} follows {i - 1} and comes before {i + 1}."} for i in range(40)
    ]
    text = write_jsonl(tmp_path / "text.jsonl", texts)
    chats = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(24)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [preference_pair(i) for i in range(16)])
    optimizer = {"class_path": "distill.train.optim.AdamW", "init_args": {"lr": 0.01}}
    common = {"batch_size": 4, "max_seq_length": 64, "val_fraction": 0.2}
    return {
        "pt": stage_config(
            tmp_path,
            "pt",
            {
                "class_path": "distill.DataModule",
                "init_args": {"train_files": str(text), "packing": True, **common},
            },
            {"tokenizer": str(TOKENIZER_DIR), "model_config": TINY_LLAMA, "optimizer": optimizer},
            steps=4,
        ),
        "sft": stage_config(
            tmp_path,
            "sft",
            {
                "class_path": "distill.DataModule",
                "init_args": {"train_files": str(chats), "template": "mistral", **common},
            },
            {
                "model": "replaced-by-the-runner",
                "optimizer": optimizer,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            },
            steps=6,
        ),
        "dpo": stage_config(
            tmp_path,
            "dpo",
            {
                "class_path": "distill.PreferenceDataModule",
                "init_args": {"train_files": str(pairs), **common},
            },
            {
                "model": "replaced-by-the-runner",
                "optimizer": {"class_path": "distill.train.optim.AdamW", "init_args": {"lr": 0.001}},
                "objective": {"class_path": "distill.objectives.Preference", "init_args": {"beta": 0.1}},
            },
            steps=2,
        ),
    }


def write_pipeline(path, output_dir, configs: dict[str, str], overrides: dict | None = None) -> str:
    overrides = overrides or {}
    stages = [{"name": n, "config": c, "overrides": overrides.get(n, {})} for n, c in configs.items()]
    path.write_text(yaml.safe_dump({"output_dir": str(output_dir), "stages": stages}))
    return str(path)


def forked_child(command: list[str], env: dict[str, str] | None = None, stop_when=None) -> int:
    """``run_child`` for a one-process pipeline: the stage's ``python -m distill ...`` forked from the
    tests' server (``helpers.run``), the same fresh process without the seconds of imports a new
    interpreter pays. What ``run_child`` itself does (signals, dying with the runner, other ranks) is
    tested below on stand-in fits."""
    assert command[:3] == [sys.executable, "-m", "distill"], command
    result = run(command[3:], dict(os.environ) if env is None else env, check=False)
    print(result.stdout, end="")
    print(result.stderr, end="", file=sys.stderr)  # the stage's error, above the runner's own
    return result.returncode


def as_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as ``python -m distill pipeline`` would run (``clean_env``, in ROOT), its stages
    forked (``forked_child``)."""
    from distill.pipeline import runner

    monkeypatch.chdir(ROOT)
    for name in [k for k in os.environ if k.startswith(LAUNCH_VARS)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", clean_env()["PYTHONPATH"])
    monkeypatch.setattr(runner, "run_child", forked_child)


def pipeline_main(args: list[str], capsys=None) -> tuple[int, str, str]:
    """``python -m distill pipeline ARGS`` in this process: exit code, and with ``capsys`` its stdout
    and stderr."""
    try:
        commands.main(["pipeline", *args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def marker(stage_dir) -> dict:
    return json.loads((stage_dir / "complete.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A three-stage pipeline run once to its end."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    configs = stage_configs(tmp_path)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", tmp_path / "out", configs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        as_launched(monkeypatch)
        code, _, _ = pipeline_main(["--config", pipeline])
    assert code == 0, "the pipeline failed: its stages' errors are in the captured stderr"
    return tmp_path, configs, pipeline


def test_stages_chain_through_exports_and_the_merge(finished):
    from transformers import AutoModelForCausalLM

    from distill.train.merge import load_adapter

    tmp_path, _, _ = finished
    out = tmp_path / "out"
    configs = {
        name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in ("pt", "sft", "dpo")
    }
    assert configs["sft"]["model"]["init_args"]["model"] == str(out / "pt" / "model")
    assert configs["sft"]["model"]["init_args"]["model_config"] is None
    # the LoRA stage's adapter was merged, and the merged model is what DPO trains and refers to
    assert configs["dpo"]["model"]["init_args"]["model"] == str(out / "sft" / "merged")
    dpo_objective = configs["dpo"]["model"]["init_args"]["objective"]["init_args"]
    assert dpo_objective["reference"]["init_args"]["model"] is None
    assert (out / "sft" / "model" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 415, 2188, 349, 264, 1369, 28723, 2]])
    merged = AutoModelForCausalLM.from_pretrained(out / "sft" / "merged").eval()
    adapter = load_adapter(out / "sft" / "model").eval()
    with torch.no_grad():
        want, got = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    # the merge changed something: the adapter over its base is not the PT model
    base = AutoModelForCausalLM.from_pretrained(out / "pt" / "model").eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, got, atol=1e-4)


def test_a_prune_stage_chains_its_pruned_model_into_kd_from_its_teacher(tmp_path, monkeypatch, teacher_dir):
    from transformers import AutoModelForCausalLM

    kd = kd_config(tmp_path, teacher_dir, n=8)
    data = {"train_files": str(tmp_path / "train.jsonl"), "template": "mistral", "max_seq_length": 64}
    prune = {"pruning": {"num_layers": 1, "keep_first_last": False, "intermediate_size": 32}, "data": data}
    (tmp_path / "prune.yaml").write_text(yaml.safe_dump(prune))
    stages = [
        {"name": "prune", "kind": "prune", "config": str(tmp_path / "prune.yaml"), "model": str(teacher_dir)},
        {
            "name": "kd",
            "config": str(kd),
            "overrides": {"trainer.max_steps": 2, "trainer.val_check_interval": 2},
        },
    ]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": stages}))
    as_launched(monkeypatch)
    code, _, _ = pipeline_main(["--config", str(pipeline)])
    assert code == 0
    out = tmp_path / "out"
    assert json.loads((out / "prune" / "model" / "importance.json").read_text())["layers"]["kept"] in (
        [0],
        [1],
    )
    kd_stage = yaml.safe_load((out / "kd" / "config.yaml").read_text())
    assert kd_stage["model"]["init_args"]["model"] == str(out / "prune" / "model")
    assert kd_stage["data"]["init_args"]["teachers"][0]["model"] == str(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(out / "kd" / "model")
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (1, 32)
    assert json.loads((out / "kd" / "train_results.json").read_text())["global_step"] == 2
    assert marker(out / "prune")["model"] == str(out / "prune" / "model")


def test_a_prune_stage_without_a_model_is_refused(tmp_path):
    prune = {"name": "p", "kind": "prune", "config": str(ROOT / "configs" / "prune.yaml")}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [prune]}))
    with pytest.raises(PipelineError, match="stage p: no model to prune: give the stage 'model: PATH'"):
        plan(read_pipeline(path))


def test_stage_files_hold_what_they_say(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _, _ = finished
    steps = {"pt": 4, "sft": 6, "dpo": 2}
    for name, max_steps in steps.items():
        stage = tmp_path / "out" / name
        train = json.loads((stage / "train_results.json").read_text())
        assert train["global_step"] == max_steps
        assert max_steps <= train["train_samples"] <= 4 * max_steps  # rows: up to batch_size 4 a step
        assert train["train_runtime"] > 0 and train["train_tokens_per_second"] > 0
        evaluated = json.loads((stage / "eval_results.json").read_text())
        assert evaluated["step"] == max_steps and evaluated["eval_samples"] > 0
        assert evaluated["eval_samples_per_second"] > 0 and evaluated["eval_tokens_per_second"] > 0
        history = json.loads((stage / "trainer_state.json").read_text())["log_history"]
        logged = [entry for entry in history if "loss" in entry]
        assert [entry["step"] for entry in logged] == list(range(1, max_steps + 1))
        assert all(entry["learning_rate"] >= 0 for entry in logged)
        assert abs(train["train_loss"] - sum(e["loss"] for e in logged) / max_steps) < 1e-5
        assert history[-1]["step"] == max_steps and "eval_loss" in history[-1]
        assert (stage / "checkpoints" / "last.ckpt").is_file()
        events = EventAccumulator(str(stage / "logs"))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"]
        assert marker(stage)["model"] == str(stage / ("merged" if name == "sft" else "model"))
    for name in ("pt", "sft"):  # token objectives: perplexity is exp of the evaluation's cross-entropy
        evaluated = json.loads((tmp_path / "out" / name / "eval_results.json").read_text())
        assert math.isclose(evaluated["perplexity"], math.exp(evaluated["eval_loss"]), rel_tol=1e-4)
    assert "perplexity" not in json.loads((tmp_path / "out" / "dpo" / "eval_results.json").read_text())
    assert "eval_rewards_accuracies" in json.loads(
        (tmp_path / "out" / "dpo" / "eval_results.json").read_text()
    )


def test_rerun_skips_a_change_reruns_from_it_and_a_kill_there_resumes(finished, monkeypatch, capsys):
    tmp_path, configs, pipeline = finished
    as_launched(monkeypatch)
    out = tmp_path / "out"
    before = {name: marker(out / name)["run_id"] for name in configs}
    code, _, err = pipeline_main(["--config", pipeline], capsys)
    assert code == 0 and all(f"{name}: complete" in err for name in configs), err[-2000:]
    assert "distill fit" not in err
    assert {name: marker(out / name)["run_id"] for name in configs} == before

    # DPO's data edited in place reruns DPO; the same bytes written back (a new mtime) rerun nothing
    stages = plan(read_pipeline(pipeline))
    hashes = ContentHashes(out / "data_hashes.json")
    pairs = tmp_path / "pairs.jsonl"
    original = pairs.read_bytes()
    pairs.write_bytes(original.replace(b"{", b'{"extra": 1, ', 1))
    plan_text, _ = describe(stages, set(configs), hashes)
    assert "2. sft: complete, skipped" in plan_text and "3. dpo: runs" in plan_text, plan_text
    pairs.write_bytes(original)
    plan_text, _ = describe(stages, set(configs), hashes)
    assert "3. dpo: complete, skipped" in plan_text, plan_text

    # SFT changed: --dry_run says it and DPO would run, writing nothing
    changed = write_pipeline(
        tmp_path / "changed.yaml",
        out,
        configs,
        {"sft": {"model.init_args.lora.r": 2, "trainer.max_steps": 5}},
    )
    stages = plan(read_pipeline(changed))
    plan_text, refusals = describe(stages, set(configs), hashes)
    assert (
        "1. pt: complete, skipped" in plan_text
        and "2. sft: runs" in plan_text
        and "3. dpo: runs" in plan_text
        and not refusals
    )
    assert {name: marker(out / name)["run_id"] for name in configs} == before
    # --stages dpo alone cannot run on the stale SFT
    with pytest.raises(PipelineError, match="needs stage sft"):
        Runner(stages, {"dpo"}, hashes).run()

    # the changed SFT reruns afresh from the PT model kept; DPO, not selected, stays as it was
    code, _, err = pipeline_main(["--config", changed, "--stages", "pt,sft"], capsys)
    assert code == 0, err[-2000:]
    assert "pt: complete" in err and "sft: its config or inputs changed" in err
    sft = out / "sft"
    assert json.loads((sft / "train_results.json").read_text())["global_step"] == 5
    assert json.loads((sft / "model" / "adapter_config.json").read_text())["r"] == 2
    after = {name: marker(out / name)["run_id"] for name in configs}
    assert after["pt"] == before["pt"] and after["sft"] != before["sft"] and after["dpo"] == before["dpo"]
    plan_text, _ = describe(stages, set(configs), hashes)
    assert "2. sft: complete, skipped" in plan_text and "3. dpo: runs" in plan_text, plan_text


def test_a_killed_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """What a kill leaves (``stage.json`` of this key, ``last.ckpt``, no ``complete.json``) resumes;
    the resumed fit's history is ``test_a_resumed_fit_keeps_its_runtime_and_...``'s."""
    from distill.pipeline import runner

    resumed = []
    monkeypatch.setattr(
        runner, "fit_command", lambda stage, resume: resumed.append(resume) or [sys.executable, "-c", ""]
    )
    stage = fake_stage(tmp_path / "out")
    hashes = ContentHashes(tmp_path / "out" / "data_hashes.json")
    key = stage_key(stage, None, data_digest(stage.config, hashes))
    stage.checkpoint.parent.mkdir(parents=True)
    stage.checkpoint.write_bytes(b"step 3")
    (stage.dir / "stage.json").write_text(json.dumps({"key": key, "launch": "killed", "resume_from": None}))
    assert "1. a: resumes from" in describe([stage], {"a"}, hashes)[0]
    Runner([stage], {"a"}, hashes).run()
    assert resumed == [None, str(stage.checkpoint)]  # the plan's command line, then the fit's
    assert f"a: resuming from {stage.checkpoint}" in capsys.readouterr().err
    assert stage.checkpoint.read_bytes() == b"step 3" and (stage.dir / "complete.json").is_file()
    assert fit_command(stage, "x.ckpt")[-2:] == ["--ckpt_path", "x.ckpt"]


def test_pipeline_file_errors_name_the_file_and_stage(tmp_path):
    config = str(ROOT / "configs" / "sft.yaml")

    def refused(stages, message):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"stages": stages}))
        with pytest.raises(PipelineError, match=message):
            read_pipeline(path)

    refused([{"name": "a", "config": config, "lr": 1}], r"stage 1: unknown keys \['lr'\]")
    refused([{"name": "a", "config": config}, {"name": "a", "config": config}], "two stages are named 'a'")
    refused([{"name": "a", "config": "nope.yaml"}], "stage a: config nope.yaml does not exist")
    refused(
        [{"name": "a", "config": config, "model": "${stages.b.model}"}, {"name": "b", "config": config}],
        r"stage a: \$\{stages.b...\} names no earlier stage",
    )
    refused([], "non-empty list under 'stages'")
    refused([{"name": "a", "config": config, "kind": "train"}], "stage a: 'kind' must be one of fit, prune")
    prune = {"name": "a", "config": str(ROOT / "configs" / "prune.yaml"), "kind": "prune"}
    refused([{**prune, "reference_model": "x"}], "stage a: a prune stage has no reference_model")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "pipelines").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_pipeline_config_plans(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    pipeline = read_pipeline(path)
    stages = plan(pipeline)
    assert [s.name for s in stages] == [s.name for s in pipeline.stages]
    for earlier, stage in itertools.pairwise(stages):
        if stage.prunes:
            assert stage.config["output"] == str(stage.export) and stage.config["model"]
            continue
        if not earlier.trains_reward_model and stage.spec.model == "auto":
            assert stage.config["model"]["init_args"]["model"] == str(earlier.model)
        callbacks = {c["class_path"]: c.get("init_args") for c in stage.config["trainer"]["callbacks"]}
        assert callbacks["distill.callbacks.HFExport"]["dirpath"] == str(stage.export)
        assert callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]["dirpath"] == str(
            stage.dir / "checkpoints"
        )
    # keys differ when any stage's config does
    assert len({stage_key(s, None, "") for s in stages}) == len(stages)


def test_other_ranks_wait_for_rank_zero_of_their_own_launch(tmp_path, monkeypatch):
    from distill.pipeline.runner import failure_elsewhere

    stage = fake_stage(tmp_path)
    stage.dir.mkdir()
    monkeypatch.setenv("MASTER_PORT", "1234")
    launch = launch_id()

    def failed() -> str | None:
        return failure_elsewhere(stage, "k", launch, rank=1)

    (stage.dir / "stage.json").write_text(json.dumps({"key": "k", "launch": "an earlier launch"}))
    # an earlier launch's failure is not this launch's: the stale files of a killed launch are ignored
    (stage.dir / "failed.json").write_text(json.dumps({"key": "k", "error": "stage a failed (exit 1)"}))
    assert failed() is None
    (stage.dir / "failed.json").write_text(
        json.dumps({"key": "k", "launch": launch, "rank": 0, "error": "stage a failed (exit 1)"})
    )
    with pytest.raises(PipelineError, match=r"rank 0: stage a failed \(exit 1\)"):
        wait_for(stage.dir / "stage.json", "k", failed, launch=launch)
    (stage.dir / "failed.json").unlink()
    (stage.dir / "stage.json").write_text(json.dumps({"key": "k", "launch": launch, "resume_from": None}))
    assert wait_for(stage.dir / "stage.json", "k", failed, launch=launch)["resume_from"] is None
    # under torchrun each stage's rank 0 hosts its own store, on a port of the stage's own
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    env = stage_env(2)
    assert env["MASTER_PORT"] == "1237" and "TORCHELASTIC_USE_AGENT_STORE" not in env
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    assert stage_env(2)["MASTER_PORT"] == "1234"  # srun, or a single process: as launched


def test_chained_values_and_the_overrides_that_set_them_instead(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    stages = {s.name: s for s in plan(read_pipeline(ROOT / "configs" / "pipelines" / "demo_rl.yaml"))}
    grpo = stages["grpo"].config["model"]["init_args"]
    # the policy skips the reward model's stage; the reward model is the RM stage's export
    assert grpo["model"] == str(stages["sft"].merged)
    paths = [
        r["init_args"]["path"] for r in grpo["objective"]["init_args"]["rewards"] if "path" in r["init_args"]
    ]
    assert paths == [str(stages["rm"].export)]
    assert stages["rm"].config["model"]["init_args"]["model"] == str(stages["sft"].merged)

    sft = str(ROOT / "configs" / "sft.yaml")
    pipeline = tmp_path / "p.yaml"
    explicit = {"model.init_args.model": "some/model", "model.init_args.model_config": None}
    pipeline.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {"name": "a", "config": sft},
                    {"name": "b", "config": sft, "overrides": explicit},
                    {"name": "c", "config": sft, "model": "${stages.a.model}"},
                ]
            }
        )
    )
    a, b, c = plan(read_pipeline(pipeline))
    assert b.config["model"]["init_args"]["model"] == "some/model" and "model" not in b.inputs
    assert c.config["model"]["init_args"]["model"] == str(a.export)


def test_samples_count_pairs_completions_and_rows():
    ids, mask = torch.ones(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long)
    mask[0, 3:] = 0
    rows = TokenBatch(input_ids=ids, labels=ids, attention_mask=mask)
    pairs = extended(rows, PairBatch, sequence_values=torch.zeros(4), sequence_shas=["a", "a", "b", "b"])
    # an RL batch: the rollout's completions are its rows
    completions = extended(rows, CompletionBatch, prompt_shas=["p"])
    assert batch_size(pairs) == (2, 18)
    assert batch_size(completions) == (4, 18)
    assert batch_size(TokenBatch(input_ids=ids, labels=ids)) == (4, 20)


def test_a_stage_key_counts_the_local_data_it_reads(tmp_path):
    import datasets

    from distill.pipeline.inputs import ContentHashes, data_files

    corpus = tmp_path / "corpus"
    for folder in ("sub", ".cache"):
        (corpus / folder).mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", [{"text": "a"}])
    write_jsonl(corpus / "sub" / "b.jsonl", [{"text": "b"}])
    write_jsonl(corpus / ".cache" / "c.jsonl", [{"text": "c"}])

    def config(**options) -> dict:
        return {"data": {"init_args": options}}

    assert data_files(config(train_files=str(corpus))) == [corpus / "a.jsonl", corpus / "sub" / "b.jsonl"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(str(saved))
    (saved / "cache-0123.arrow").write_bytes(b"written by a map")
    found = data_files(config(train_files=str(corpus), dataset_name=str(saved)))  # the dataset replaces files
    assert found and all(f.parent == saved and not f.name.startswith("cache-") for f in found)
    assert any(f.suffix == ".arrow" for f in found)
    assert data_files(config(dataset_name="org/hub-dataset")) == []  # by name only: nothing is fetched

    hashes = ContentHashes(tmp_path / "hashes.json")
    first = hashes.of(corpus / "a.jsonl")
    write_jsonl(corpus / "a.jsonl", [{"text": "a longer one"}])  # a new size: a new hash, whatever the mtime
    assert hashes.of(corpus / "a.jsonl") != first
    hashes.save()
    assert ContentHashes(tmp_path / "hashes.json").known == hashes.known


class TinyFit(L.LightningModule):
    """A linear layer on dict batches (``input_ids``), logging ``train/loss`` and ``val/loss``; its
    ``objective.rollouts`` holds one fixed rollout for ``CompletionLog``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        completions = SimpleNamespace(lengths=torch.tensor([3]), stopped=torch.tensor([True]))
        rollout = SimpleNamespace(
            prompts=["p"], texts=["t"], total=torch.ones(1), rewards=torch.ones(1, 1), completions=completions
        )
        self.objective = SimpleNamespace(rollouts=SimpleNamespace(last=rollout, names=["r"]))

    def loss(self, batch) -> torch.Tensor:
        return self.layer(batch.input_ids.float()).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_loader(batches: int):
    rows = [torch.full((4,), float(i) / 10) for i in range(2 * batches)]
    collate = lambda rows: TokenBatch(input_ids=torch.stack(rows), labels=torch.stack(rows))  # noqa: E731
    return torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collate)


def tiny_trainer(root, callbacks, **options) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **options})


def test_callbacks_act_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    from distill.callbacks import CompletionLog, StageResults
    from distill.callbacks.steps import OptimizerSteps

    class Ended(L.Callback):
        def __init__(self) -> None:
            self.steps, self.ended = OptimizerSteps(), []

        def on_train_start(self, trainer, pl_module) -> None:
            self.steps.start(trainer)

        def on_train_batch_end(self, trainer, *args) -> None:
            if self.steps.ended(trainer):
                self.ended.append(trainer.global_step)

    # 7 micro-batches an epoch, 2 a step: the last window of each epoch is one micro-batch short
    ended = Ended()
    callbacks = [ended, CompletionLog(every_n_steps=1, num_completions=1), StageResults(str(tmp_path))]
    trainer = tiny_trainer(tmp_path, callbacks, max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(TinyFit(), train_dataloaders=tiny_loader(7))
    assert trainer.global_step == 8 and ended.ended == list(range(1, 9))
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # once a step, not once a micro-batch
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history] == list(range(1, 9))


def test_a_resumed_fit_keeps_its_runtime_and_the_validation_of_its_checkpoint_step(tmp_path):
    from distill.callbacks import StageResults
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("killed at step 3")

    def fit(*extra: L.Callback, ckpt_path=None) -> dict:
        # a checkpoint at every second step's end, before that step's validation runs
        checkpoint = ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=2, save_last=True)
        callbacks = [StageResults(str(tmp_path)), checkpoint, *extra]
        trainer = tiny_trainer(
            tmp_path, callbacks, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None
        )
        trainer.fit(TinyFit(), tiny_loader(8), tiny_loader(2), ckpt_path=ckpt_path)
        return json.loads((tmp_path / "train_results.json").read_text())

    with pytest.raises(RuntimeError, match="killed at step 3"):
        fit(Crash())
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    resumed = fit(ckpt_path=last)
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]  # step 2's from the killed run
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    # rerun at completion (a pipeline killed during its merge): nothing trains, the results stay
    again = fit(ckpt_path=last)
    assert 0 < again["train_runtime"] <= resumed["train_runtime"], (again, resumed)
    assert again["global_step"] == 4 and again["train_samples"] == resumed["train_samples"]
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]


def fake_stage(out, lora: bool = False) -> Stage:
    """Stage ``a`` of a pipeline under ``out``, with a config that only the runner reads (its fit is
    replaced where it runs)."""
    init_args = {"lora": {"r": 4}} if lora else {}
    config = {"model": {"init_args": init_args}, "data": {"init_args": {}}}
    return Stage(spec=StageSpec(name="a", config=("unused.yaml",)), dir=out / "a", config=config)


def test_the_pipeline_removes_only_directories_it_made(tmp_path, monkeypatch):
    from distill.pipeline import runner

    ran = tmp_path / "ran"  # what the stage's fit writes
    fit = [sys.executable, "-c", f"open({str(ran)!r}, 'a').write('fit ')"]
    monkeypatch.setattr(runner, "fit_command", lambda stage, resume: fit)
    out = tmp_path / "out"
    stage = fake_stage(out)
    hashes = ContentHashes(out / "data_hashes.json")
    # a standalone run's directory where the stage would go: refused, untouched, and --dry_run says so
    (stage.dir / "checkpoints").mkdir(parents=True)
    (stage.dir / "checkpoints" / "last.ckpt").write_bytes(b"weeks of training")
    with pytest.raises(
        PipelineError, match=rf"stage a: {stage.dir} exists and was not made by this pipeline"
    ):
        Runner([stage], {"a"}, hashes).run()
    assert (stage.dir / "checkpoints" / "last.ckpt").read_bytes() == b"weeks of training"
    assert not ran.exists()
    text, refusals = describe([stage], {"a"}, hashes)
    assert f"1. a: refused: {stage.dir} was not made by this pipeline" in text
    assert refusals and "move it away" in refusals[0]
    # a directory the pipeline made for another config: removed and run afresh
    (stage.dir / "checkpoints" / "last.ckpt").unlink()
    (stage.dir / "stage.json").write_text(json.dumps({"key": "another config's"}))
    (stage.dir / "checkpoints" / "last.ckpt").write_bytes(b"the other config's")
    Runner([stage], {"a"}, hashes).run()
    assert ran.read_text() == "fit " and not (stage.dir / "checkpoints").exists()
    assert json.loads((stage.dir / "complete.json").read_text())["model"] == str(stage.model)
    assert [p.name for p in out.iterdir() if p.name.startswith(".a.")] == []  # nothing left behind


def test_a_dry_run_reports_a_directory_the_pipeline_would_refuse(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pipeline = tmp_path / "p.yaml"
    stages = [{"name": "important_data", "config": str(ROOT / "configs" / "sft.yaml")}]
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "stages": stages}))
    (tmp_path / "important_data").mkdir()
    (tmp_path / "important_data" / "notes.txt").write_text("mine")
    code, plan_text, err = pipeline_main(["--config", str(pipeline), "--dry_run"], capsys)
    assert code == 2 and "1. important_data: refused" in plan_text
    assert f"error: stage important_data: {tmp_path / 'important_data'} exists and was not made" in err
    assert (tmp_path / "important_data" / "notes.txt").read_text() == "mine"


# runs stage ``a`` (``fake_stage``) with a fit that runs ``sys.argv[2]``; a LoRA stage whose merge fails
# with ``sys.argv[3]`` when that is given
RUNNER = """
import os
import sys
import time
from pathlib import Path

from distill.pipeline import runner
from distill.pipeline.inputs import ContentHashes
from distill.pipeline.plan import Stage
from distill.pipeline.spec import PipelineError, StageSpec

out, fit, merge_error = Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
runner.fit_command = lambda stage, resume: [sys.executable, "-c", fit]


def merge(stage):
    raise PipelineError(merge_error)


runner.merge = merge
if "AFTER" in os.environ:  # rank 1 tells when it waits for rank 0, which starts only then
    here, wait_for = Path(os.environ["FAKE_DIR"]), runner.wait_for

    def waiting(*args, **kwargs):
        (here / "waiting").touch()
        return wait_for(*args, **kwargs)

    runner.wait_for = waiting
    while os.environ["RANK"] == "0" and not (here / "waiting").exists():
        time.sleep(0.1)
config = {"model": {"init_args": {"lora": {"r": 4}} if merge_error else {}}, "data": {"init_args": {}}}
stage = Stage(spec=StageSpec(name="a", config=("unused.yaml",)), dir=out / "a", config=config)
try:
    runner.Runner([stage], {"a"}, ContentHashes(out / "data_hashes.json")).run()
except PipelineError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
"""


def start_runner(tmp_path, name: str, *args: str, **env: str):
    """A runner process (forked from the tests' server: the runner's imports paid once), its stderr in
    ``tmp_path/name.err``."""
    err = tmp_path / f"{name}.err"
    err.write_text("")  # there before the process writes it, for the tests that read it while it runs
    return start_script(RUNNER, list(args), clean_env(**env), err), err


def wait_until(check, what: str, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    """Whether the process ended (a zombie nobody reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# a fit that says its pid; on SIGTERM it saves ("stopped") and exits as PreemptionCheckpoint does
SLEEPER = """
import os, signal, sys, time
from pathlib import Path
here = Path(os.environ["FAKE_DIR"])
def stop(signum, frame):
    (here / "stopped").write_text(str(signum))
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
(here / "fit.pid").write_text(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_second_run_waits_for_the_first_and_a_fit_ends_with_its_runner(tmp_path):
    from distill.cache.lock import WriterLock

    out, pid_file = tmp_path / "out", tmp_path / "fit.pid"
    with WriterLock(out):  # another pipeline run holds the output directory
        first, err = start_runner(tmp_path, "first", str(out), SLEEPER, FAKE_DIR=str(tmp_path))
        wait_until(lambda: "waiting" in err.read_text() or pid_file.exists(), "the first run to wait")
        assert first.is_alive() and f"is being written by pid {os.getpid()}" in err.read_text()
        assert not (out / "a").exists()
    wait_until(pid_file.exists, "the first run's fit")  # the lock released, it goes on into its fit
    fit = int(pid_file.read_text())
    try:
        first.kill()  # kill -9 of the runner alone: its fit must not go on as an orphan
        first.join()
        wait_until(lambda: gone(fit), "the fit of the killed runner to end", seconds=20)
    finally:
        if not gone(fit):
            os.kill(fit, signal.SIGKILL)


def test_a_signal_to_the_runner_reaches_its_fit(tmp_path, monkeypatch):
    from distill.pipeline.runner import run_child

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    pid_file = tmp_path / "fit.pid"

    def scheduler() -> None:  # SIGTERM to the runner alone, as a scheduler stopping the job sends it
        wait_until(pid_file.exists, "the fit")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=scheduler, daemon=True).start()
    try:
        code = run_child([sys.executable, "-c", SLEEPER])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and (tmp_path / "stopped").read_text() == str(int(signal.SIGTERM))
    assert received == []  # passed on to the fit while it ran, not left to the runner's own handling


# a rank's fit: joins the other rank's (the process group), then FAIL_RANK's exits 3 at once while the
# other waits in a collective that will never complete; FAIL_RANK -1: both succeed
RANK_FIT = """
import os, sys, time
from pathlib import Path
rank, here = int(os.environ["RANK"]), Path(os.environ["FAKE_DIR"])
(here / f"joined{rank}").touch()
deadline = time.time() + 30
while not (here / f"joined{1 - rank}").exists():
    if time.time() > deadline:
        sys.exit("the other rank never joined")
    time.sleep(0.1)
fail = int(os.environ["FAIL_RANK"])
if fail == rank:
    sys.exit(3)
if fail >= 0:
    time.sleep(120)
"""


def run_two_ranks(tmp_path, out, name: str, fail_rank: int, *args: str, **extra: str) -> list[str]:
    """Both ranks' runners to their end (bounded): their stderr."""
    fake = tmp_path / name
    fake.mkdir()
    env = {"WORLD_SIZE": "2", "MASTER_PORT": "29611", "FAKE_DIR": str(fake), "FAIL_RANK": str(fail_rank)}
    env.update(extra)
    ranks = [
        start_runner(tmp_path, f"{name}{r}", str(out), RANK_FIT, *args, RANK=str(r), **env) for r in (0, 1)
    ]
    try:
        for process, _ in ranks:
            process.join(timeout=150)
    finally:
        for process, _ in ranks:
            if process.is_alive():
                process.kill()
    return [err.read_text() for _, err in ranks]


def test_every_rank_ends_with_the_failing_ranks_message(tmp_path):
    out = tmp_path / "out"
    stage = fake_stage(out)
    key = stage_key(stage, None, data_digest(stage.config, ContentHashes(tmp_path / "hashes.json")))
    # an earlier launch failed at this stage: its markers must not end this launch's rank 1
    stage.dir.mkdir(parents=True)
    (stage.dir / "stage.json").write_text(json.dumps({"key": key, "launch": "an earlier launch"}))
    (stage.dir / "failed.json").write_text(json.dumps({"key": key, "error": "an earlier failure"}))
    rank0, rank1 = run_two_ranks(tmp_path, out, "fit", 1, AFTER="rank 1 waits")
    assert "an earlier failure" not in rank0 + rank1
    assert "error: stage a failed on rank 1 (exit 3)" in rank1, rank1[-2000:]
    assert "error: rank 1: stage a failed on rank 1 (exit 3)" in rank0, rank0[-2000:]


def test_a_stage_merges_with_the_pipelines_own_model_kwargs(tmp_path, monkeypatch):
    """Issue 25 #1: merge takes no trust_remote_code from the adapter folder's saved config any more, so a
    stage that asks for it in the pipeline's (the user's) config passes it to merge itself."""
    from distill.pipeline import runner

    commands = []
    monkeypatch.setattr(runner, "run_child", lambda command: commands.append(command) or 0)
    stage = fake_stage(tmp_path / "out", lora=True)
    stage.config["model"]["init_args"]["model_kwargs"] = {"trust_remote_code": True}
    runner.merge(stage)
    ((*_, option, value),) = commands
    assert option == "--model_kwargs" and json.loads(value) == {"trust_remote_code": True}


def test_a_failure_outside_the_fit_is_marked_for_the_other_ranks(tmp_path, monkeypatch):
    from distill.pipeline import runner

    monkeypatch.setattr(runner, "fit_command", lambda stage, resume: [sys.executable, "-c", ""])

    def merge(stage) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "merge", merge)
    stage = fake_stage(tmp_path / "out", lora=True)
    hashes = ContentHashes(tmp_path / "out" / "data_hashes.json")
    key = stage_key(stage, None, data_digest(stage.config, hashes))
    with pytest.raises(OSError, match="No space left"):
        Runner([stage], {"a"}, hashes).run()
    failed = json.loads((stage.dir / "failed.json").read_text())
    assert failed["launch"] == launch_id() and failed["error"].startswith("OSError: [Errno 28]")
    # rank 1, done with its fit, waits for rank 0's completion: it ends with rank 0's error
    with pytest.raises(PipelineError, match=r"rank 0: OSError: \[Errno 28\] No space left on device"):
        wait_for(
            stage.dir / "complete.json", key, lambda: runner.failure_elsewhere(stage, key, launch_id(), 1)
        )
