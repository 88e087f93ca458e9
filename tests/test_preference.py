"""Preference and reward objectives on the one StudentModule path: log-probs, references, export, runs."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from distill.cli import main, run_cli
from distill.data.batch import PairBatch
from distill.data.pair_encoding import Grouped, UnitCollator, encode_unit
from distill.data.pairs import PairRecord
from distill.data.templates import resolve_template
from distill.objectives import KTO, Preference, Reference, RewardModel
from distill.objectives.base import loss_inputs
from distill.objectives.context import Step
from distill.objectives.reference import sequence_logps
from distill.train.model import LoraOptions
from distill.train.student import StudentModule
from tests.helpers import (
    TOKENIZER_DIR,
    check_killed_fit_resumes,
    logged_values,
    preference_config,
    preference_pair,
    save_tiny_teacher,
    with_last_checkpoint,
)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("policy"))


def pair_batch(tokenizer, n: int = 3, packed: bool = False) -> dict:
    template = resolve_template(tokenizer, "mistral", None)
    units = []
    for i in range(n):
        raw = preference_pair(i)
        prompt = ({"role": "user", "content": raw["conversations"][0]["value"]},)
        record = PairRecord(
            f"pairs:{i}",
            prompt,
            ({"role": "assistant", "content": raw["chosen"]},),
            ({"role": "assistant", "content": raw["rejected"]},),
        )
        units.extend(encode_unit(record, tokenizer, template))
    grouped = Grouped(units, 2)
    items = [list(grouped)] if packed else list(grouped)
    return UnitCollator(tokenizer.pad_token_id, packed=packed)(items)


def student_of(policy_dir, objective, lora: LoraOptions | None = None) -> StudentModule:
    student = StudentModule(model=str(policy_dir), objective=objective, lora=lora)
    student.configure_model()
    return student


def naive_sequence_logps(model, batch) -> torch.Tensor:
    """Full (B, T, V) logits, one row per sequence: the log-prob sum of each row's labelled tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    labels = batch.labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_log_probs_equal_a_full_logits_computation(policy_dir, packed):
    objective = Preference(loss="sigmoid", chunk_size=5)
    student = student_of(policy_dir, objective)
    unpacked = pair_batch(student.tokenizer)
    want = naive_sequence_logps(student.causal_lm, unpacked)
    batch = pair_batch(student.tokenizer, packed=packed)
    got = sequence_logps(student.causal_lm, batch, objective.chunk_size)
    assert got.shape == (6,)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the policy's own forward: the loss of pairs whose reference is the policy is log 2, rewards 0
    batch = replace(batch, reference_logps=want)
    out = objective(
        loss_inputs(student.forward_hidden(batch), student.causal_lm.get_output_embeddings(), batch)
    )
    assert out.num_units == 3
    assert float(out.loss_sum) == pytest.approx(3 * torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    assert float(out.sums["logps/chosen"]) == pytest.approx(float(want[0::2].sum()), rel=1e-4)


def test_ipo_logs_the_implicit_rewards_of_the_sums_and_keeps_its_loss_of_the_means():
    """IPO's loss is over per-token means; rewards/* are beta (log pi - log ref) over the sums, as DPO's."""
    from distill.objectives.base import LossInputs, sequence_log_probs

    torch.manual_seed(0)
    lengths = [6, 2, 3, 7, 4, 4, 5, 2]  # chosen, rejected of 4 pairs: longer, shorter, equal
    sequence = torch.repeat_interleave(torch.arange(8), torch.tensor(lengths))
    head = torch.nn.Linear(8, 16)
    inputs = LossInputs(
        torch.randn(len(sequence), 8),
        torch.randint(0, 16, (len(sequence),)),
        sequence,
        torch.zeros(8, 8),
        head,
        {},
    )
    sums = sequence_log_probs(inputs).detach()
    tokens = torch.tensor(lengths, dtype=sums.dtype)
    # log pi - log ref on the sums; pairs 0, 1 and 3 are ordered one way by the sums, the other by the means
    delta = torch.tensor([1.0, 0.6, 1.0, 2.0, 1.0, 0.5, 1.0, 0.45])
    empty = torch.zeros(1, 0, dtype=torch.long)
    batch = PairBatch(
        input_ids=empty, labels=empty, position_ids=empty, sequence_values=torch.zeros(8),
        sequence_shas=[""] * 8, reference_logps=(sums - delta).double(),
    )  # fmt: skip
    inputs = replace(inputs, batch=batch)
    beta = 0.2
    out = Preference(loss="ipo", beta=beta)(inputs)
    chosen, rejected = beta * delta[0::2], beta * delta[1::2]
    assert float(out.sums["rewards/chosen"]) == pytest.approx(float(chosen.sum()), rel=1e-5)
    assert float(out.sums["rewards/rejected"]) == pytest.approx(float(rejected.sum()), rel=1e-5)
    assert float(out.sums["rewards/margins"]) == pytest.approx(float((chosen - rejected).sum()), rel=1e-5)
    assert float(out.sums["rewards/accuracies"]) == 3  # pairs 0, 2 and 3 (by the means: 1 and 2)
    mean = delta / tokens
    want = ((mean[0::2] - mean[1::2]) - 1 / (2 * beta)) ** 2  # the loss stays over the means
    assert float(out.loss_sum) == pytest.approx(float(want.sum()), rel=1e-5)


def test_the_adapter_off_reference_is_the_base_model(policy_dir):
    objective = Preference(loss="sigmoid")
    student = student_of(policy_dir, objective, LoraOptions(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, param in student.model.named_parameters():
        if "lora_B" in name:  # a trained adapter: the policy is no longer the base
            param.data.normal_(0, 0.5)
    assert objective.reference.kind == "adapter" and objective.extra_forwards == 1  # counted in FLOPs
    batch = pair_batch(student.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = objective.reference.logps(batch)
    assert_close(reference, naive_sequence_logps(base, batch), rtol=1e-4, atol=1e-4)
    policy = naive_sequence_logps(student.model, batch)
    assert (policy - reference).abs().max() > 1e-2  # the adapter is back on after the reference


def test_the_frozen_reference_defaults_to_the_starting_weights(policy_dir):
    objective = Preference(loss="ipo")
    student = student_of(policy_dir, objective)
    assert objective.reference.kind == "model" and objective.reference.model == str(policy_dir)
    with torch.no_grad():
        student.causal_lm.get_input_embeddings().weight.mul_(1.5)  # training moved the policy
    batch = objective.prepare(pair_batch(student.tokenizer), Step())
    base = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert_close(batch.reference_logps, naive_sequence_logps(base, batch), rtol=1e-4, atol=1e-4)
    assert not any(
        p.requires_grad for p in objective.reference.frozen_model(torch.device("cpu")).parameters()
    )
    assert not [k for k in student.state_dict() if "frozen" in k or k.startswith("objective.")]


def test_the_frozen_reference_loads_the_starting_weights_as_the_student_loaded_them(tmp_path, policy_dir):
    import shutil

    eager = {"attn_implementation": "eager"}  # not this model's default: shows which arguments applied
    objective = Preference(loss="sigmoid")
    student = StudentModule(model=str(policy_dir), objective=objective, model_kwargs=eager)
    student.configure_model()
    assert student.causal_lm.config._attn_implementation == "eager"
    frozen = objective.reference.frozen_model(torch.device("cpu"))
    assert frozen.config._attn_implementation == "eager"
    assert objective.reference.store_identity(["entry"])["model_kwargs"] == eager  # a revision keys the store
    # another reference_model: model.model_kwargs (a revision of model.model) are not its arguments
    other = Preference(
        loss="sigmoid", reference=Reference(model=str(shutil.copytree(policy_dir, tmp_path / "other")))
    )
    StudentModule(model=str(policy_dir), objective=other, model_kwargs=eager).configure_model()
    assert other.reference.frozen_model(torch.device("cpu")).config._attn_implementation != "eager"
    assert "model_kwargs" not in other.reference.store_identity(["entry"])


def test_reference_free_losses_load_no_reference(policy_dir):
    for loss in ("simpo", "orpo"):
        objective = Preference(loss=loss)
        student = student_of(policy_dir, objective)
        batch = objective.prepare(pair_batch(student.tokenizer), Step())
        assert batch.reference_logps is None and not objective.reference.frozen
        assert objective.extra_forwards == 0
        hidden = student.forward_hidden(batch)
        out = objective(loss_inputs(hidden, student.causal_lm.get_output_embeddings(), batch))
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum)
        assert ("nll" in out.sums) == (loss == "orpo")


def test_a_student_built_from_a_config_must_name_its_reference():
    student = StudentModule(
        tokenizer=str(TOKENIZER_DIR),
        model_config={
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        objective=Preference(loss="sigmoid"),
    )
    with pytest.raises(ValueError, match=r"reference\.model"):
        student.configure_model()
    with pytest.raises(ValueError, match="needs a LoRA student"):
        student_of_config = StudentModule(
            tokenizer=str(TOKENIZER_DIR),
            model_config=student.model_config,
            objective=Preference(reference=Reference("adapter")),
        )
        student_of_config.configure_model()


def test_dpo_fit_logs_trl_metrics_and_raises_held_out_accuracy(tmp_path, policy_dir):
    objective = {"class_path": "distill.objectives.Preference", "init_args": {"loss": "sigmoid", "beta": 0.5}}
    config = preference_config(tmp_path, policy_dir, objective, n=16)
    main(["fit", "--config", str(config), "--trainer.max_steps", "12", "--trainer.val_check_interval", "4"])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert logged_values(tmp_path / "logs", f"train/{name}") and logged_values(
            tmp_path / "logs", f"val/{name}"
        )
    accuracy = logged_values(tmp_path / "logs", "val/rewards/accuracies")
    margins = logged_values(tmp_path / "logs", "val/rewards/margins")
    assert len(accuracy) == 3 and accuracy[-1] == 1.0 and margins[-1] > margins[0] > 0
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_reward_model_export_scores_what_the_module_scored(tmp_path, policy_dir):
    objective = {"class_path": "distill.objectives.RewardModel", "init_args": {"center_rewards": 0.01}}
    config = preference_config(tmp_path, policy_dir, objective, n=16)
    cli = run_cli(["fit", "--config", str(config), "--trainer.max_steps", "6"])
    assert logged_values(tmp_path / "logs", "val/accuracy") and logged_values(
        tmp_path / "logs", "val/rewards/std"
    )
    module = cli.model
    batch = pair_batch(module.tokenizer)
    with torch.no_grad():
        hidden = module.forward_hidden(batch)
        want = module.objective.rewards(loss_inputs(hidden, None, batch).last_hidden)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.num_labels == 1
    with torch.no_grad():
        got = exported(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert got.shape == (6, 1)
    assert_close(got.squeeze(-1), want, rtol=1e-4, atol=1e-4)
    assert (want[0::2] - want[1::2]).abs().min() > 0  # a trained head tells the responses apart


def test_a_lora_reward_model_exports_an_adapter_with_its_head_and_merges(tmp_path, policy_dir):
    from peft import PeftModel

    from distill.train.merge import merge_adapter

    objective = {"class_path": "distill.objectives.RewardModel"}
    config = preference_config(tmp_path, policy_dir, objective, n=8)
    lora = '{"r": 4, "alpha": 8, "dropout": 0.0}'
    cli = run_cli(
        ["fit", "--config", str(config), "--trainer.max_steps", "3", "--model.init_args.lora", lora]
    )
    module = cli.model
    assert all(p.requires_grad for p in module.objective.score.parameters())  # trained in full
    batch = pair_batch(module.tokenizer)
    with torch.no_grad():
        want = module.objective.rewards(loss_inputs(module.forward_hidden(batch), None, batch).last_hidden)
    exported = tmp_path / "hf"
    assert (exported / "adapter_config.json").exists() and not (exported / "model.safetensors").exists()
    base = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, pad_token_id=0)
    scorer = PeftModel.from_pretrained(base, exported).eval()
    merged = merge_adapter(exported, tmp_path / "merged").eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        for model in (scorer, merged, reloaded):
            assert_close(model(**inputs).logits.squeeze(-1), want, rtol=1e-4, atol=1e-4)


def test_a_killed_dpo_fit_resumes_exactly(tmp_path, policy_dir):
    import yaml

    objective = {"class_path": "distill.objectives.Preference", "init_args": {"loss": "sigmoid"}}
    base = yaml.safe_load(preference_config(tmp_path, policy_dir, objective, n=80, packing=True).read_text())

    def config_in(name: str):
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        config = copy.deepcopy(base)
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(directory)
        config["trainer"]["val_check_interval"] = None
        config["trainer"]["limit_val_batches"] = 0
        config["trainer"]["enable_checkpointing"] = True
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, ["--trainer.max_steps", "10"])


def test_the_precomputed_reference_equals_the_online_one_on_one_or_two_ranks_and_follows_the_reference(
    tmp_path, policy_dir, caplog, capsys
):
    from distill.objectives.reference_store import ReferenceStore
    from tests.helpers import clean_env, run

    config = preference_config(tmp_path, policy_dir, {"class_path": "distill.objectives.Preference"}, n=8)
    store = tmp_path / "reference"
    objective_args = "--model.init_args.objective.init_args"
    args = ["--config", str(config), f"{objective_args}.reference.kind", "precomputed"]
    args += [f"{objective_args}.reference.cache", str(store), "--trainer.max_steps", "2"]
    with caplog.at_level(logging.INFO):
        cli = run_cli(["fit", *args])
    assert caplog.text.count("reference log-probs of 12 units") == 1  # 8 train + 4 val pairs, once
    # progress as collection prints it (not on a terminal: a line every 30 s and one at the end)
    assert "[distill] precomputing reference log-probs: 12/12 units (100%)" in capsys.readouterr().err
    student, objective = cli.model, cli.model.objective
    assert not objective.reference.frozen  # the reference was freed once its log-probs were stored
    assert objective.extra_forwards == 0
    (entry,) = store.iterdir()
    assert (entry / "meta.json").exists() and [p.name for p in entry.glob("part-*.npz")] == [
        "part-0-of-1.npz"
    ]
    # two ranks precompute their shares of one store: each pair once, with this process's values
    two = tmp_path / "two"
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run(["fit", *args, f"{objective_args}.reference.cache", str(two), *ddp], clean_env())
    (shared,) = two.iterdir()
    assert sorted(p.name for p in shared.glob("part-*.npz")) == ["part-0-of-2.npz", "part-1-of-2.npz"]
    alone, ranks = ReferenceStore.at(entry).load(), ReferenceStore.at(shared).load()
    assert len(alone) == 12 and sorted(alone) == sorted(ranks)  # 8 training and 4 held-out pairs, each once
    for sha, values in alone.items():
        assert values == pytest.approx(ranks[sha], abs=1e-5)
    batch = pair_batch(student.tokenizer, n=2)  # pairs 0 and 1 of the training data
    online = Preference(reference=Reference("model"))
    online.setup(student.objective_context())
    assert_close(
        objective.reference.stored_logps(batch),
        online.reference.logps(batch).double(),
        rtol=1e-5,
        atol=1e-5,
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a second run maps the store
        run_cli(["fit", *args])
    assert "reference log-probs of" not in caplog.text
    # a damaged store: the rerun names it, computes it again and trains on the same values
    (part,) = entry.glob("part-*.npz")
    part.write_bytes(part.read_bytes()[:-100])
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match=rf"{entry}: {part.name} cannot be"):
        healed = run_cli(["fit", *args])
    assert caplog.text.count("reference log-probs of 12 units") == 1
    assert_close(
        healed.model.objective.reference.stored_logps(batch), objective.reference.stored_logps(batch)
    )
    # another reference (its weights changed) is another store, computed afresh
    moved = tmp_path / "moved"
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.3)
    model.save_pretrained(moved)
    with caplog.at_level(logging.INFO):
        cli = run_cli(["fit", *args, f"{objective_args}.reference.model", str(moved)])
    assert "reference log-probs of 12 units" in caplog.text and len(list(store.iterdir())) == 2
    moved_logps = cli.model.objective.reference.stored_logps(batch)
    assert (moved_logps - objective.reference.stored_logps(batch)).abs().max() > 1e-3


def kto_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        pair = preference_pair(i)
        prompt = [{"role": "user", "content": pair["conversations"][0]["value"]}]
        rows += [
            {"prompt": prompt, "completion": pair["chosen"], "label": True},
            {"prompt": prompt, "completion": pair["rejected"], "label": False},
        ]
    return rows


def test_kto_mismatched_completions_pair_each_prompt_with_the_next_completion(policy_dir):
    from distill.data.batching import Collator
    from distill.objectives.kto import mismatched_batch

    student = student_of(policy_dir, KTO())
    tokenizer = student.tokenizer
    batch = pair_batch(tokenizer, n=2)  # four sequences: prompt 0 twice, prompt 1 twice
    mixed = mismatched_batch(batch, Collator(tokenizer.pad_token_id))
    texts = [
        tokenizer.decode(row[mask.bool()])
        for row, mask in zip(mixed.input_ids, mixed.attention_mask, strict=True)
    ]
    responses = [tokenizer.decode([t for t in row if t != -100]) for row in mixed.labels.tolist()]
    assert "What is 0 plus 0" in texts[1] and "It is 1, I think" in responses[0]
    assert "What is 1 plus 1" in texts[3] and responses[3].startswith("It is 0.")  # wraps to the first


def test_kto_fit_rewards_desirable_samples_over_undesirable_ones(tmp_path, policy_dir):
    from tests.helpers import write_jsonl

    objective = {"class_path": "distill.objectives.KTO", "init_args": {"beta": 0.5}}
    config = preference_config(tmp_path, policy_dir, objective, n=4)
    train = write_jsonl(tmp_path / "kto.jsonl", kto_rows(12))
    val = write_jsonl(tmp_path / "kto_val.jsonl", kto_rows(3, start=100))
    args = ["--data.init_args.train_files", str(train), "--data.init_args.val_files", str(val)]
    main(
        [
            "fit",
            "--config",
            str(config),
            *args,
            "--trainer.max_steps",
            "8",
            "--data.init_args.batch_size",
            "6",
        ]
    )
    kl = logged_values(tmp_path / "logs", "train/kl")
    assert kl and all(value >= 0 for value in kl)
    signed = logged_values(tmp_path / "logs", "val/rewards/signed")
    assert logged_values(tmp_path / "logs", "val/rewards/accuracies")[-1] > 0.5 and signed[-1] > 0
    pairs = {"class_path": "distill.objectives.Preference"}
    config = preference_config(tmp_path, policy_dir, pairs, n=4)
    with pytest.raises(
        ValueError, match="Preference trains on pairs batches, but PreferenceDataModule yields unpaired"
    ):
        run_cli(["fit", "--config", str(config), *args, "--trainer.max_steps", "1"])


def damage_store(directory, damage: str) -> str:
    """Damage one file of a complete two-part reference store; the name of the file damaged."""
    part = directory / "part-1-of-2.npz"
    if damage == "flipped":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside an array's bytes
        part.write_bytes(bytes(data))
    elif damage == "truncated":
        part.write_bytes(part.read_bytes()[:-50])
    elif damage == "deleted":
        part.unlink()
    else:
        (directory / "meta.json").write_text('{"inputs": {"reference": "x"}, "parts": 2')  # cut short
        return "meta.json"
    return part.name


@pytest.mark.parametrize("damage", ["flipped", "truncated", "garbage meta", "deleted"])
def test_a_damaged_reference_store_is_named_and_a_rerun_recomputes_exactly_what_is_bad(tmp_path, damage):
    import threading

    import numpy as np

    from distill.objectives.reference_store import ReferenceStore

    rng = np.random.default_rng(0)
    shas = [[f"{rank}{i}".ljust(64, "a") for i in range(50)] for rank in range(2)]
    values = [rng.normal(size=(50, 2)) for _ in range(2)]
    store = ReferenceStore(tmp_path, {"reference": "x"})
    for rank in range(2):
        store.write_part(rank, 2, shas[rank], values[rank])
    store.finish(2)
    expected = store.load()
    good = (store.directory / "part-0-of-2.npz").read_bytes()
    name = damage_store(store.directory, damage)
    with pytest.raises(
        RuntimeError, match=rf"corrupt precomputed reference store {store.directory}: {name} "
    ):
        store.load()

    # two ranks as two threads; they load one after the other (CPython 3.11 can fail parsing two npy
    # headers at once in one process: "AST constructor recursion depth mismatch")
    computed, barrier, rank_0_done = [], threading.Barrier(2), threading.Event()

    def rank_run(rank: int, results: dict) -> None:
        def compute():
            computed.append(rank)
            return shas[rank], values[rank]

        def wait(name: str) -> None:
            barrier.wait(timeout=30)
            if rank == 1 and name == "reference_store_done":
                rank_0_done.wait(timeout=30)

        try:
            results[rank] = store.fill(rank, 2, compute, wait)
        except Exception as error:
            results[rank] = error
        finally:
            if rank == 0:
                rank_0_done.set()

    results: dict = {}
    with pytest.warns(
        UserWarning,
        match=rf"{store.directory}: {name} .*: deleted, (rewritten|its log-probs are computed again)",
    ):
        threads = [threading.Thread(target=rank_run, args=(rank, results)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert computed == ([] if name == "meta.json" else [1])  # the good part is kept, not computed again
    assert (store.directory / "part-0-of-2.npz").read_bytes() == good
    for rank in range(2):
        assert isinstance(results[rank], dict), results[rank]
        assert results[rank].keys() == expected.keys()
        assert all((results[rank][sha] == expected[sha]).all() for sha in expected)
    assert store.repair() == []  # healed: the next run finds nothing to do


def test_reward_model_freezes_an_untied_lm_head(tmp_path):
    """An LM head the reward never uses must not be trainable: DDP would wait for its gradient."""
    from transformers import AutoConfig, AutoTokenizer

    from tests.helpers import TINY_LLAMA

    config = AutoConfig.for_model(
        **{**TINY_LLAMA, "tie_word_embeddings": False}, vocab_size=32000, pad_token_id=0
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "untied")
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / "untied")
    student = student_of(tmp_path / "untied", RewardModel())
    assert not student.causal_lm.get_output_embeddings().weight.requires_grad
    assert student.causal_lm.get_input_embeddings().weight.requires_grad
    assert student.objective.score.weight.requires_grad


def test_option_combinations_that_cannot_work_are_refused(tmp_path, policy_dir):
    from distill.objectives.kto import mismatched_batch
    from distill.objectives.reference_store import ReferenceStore

    with pytest.raises(ValueError, match="NLL already"):
        Preference(loss="orpo", sft_weight=0.5)
    with pytest.raises(ValueError, match="not precomputed"):
        KTO(reference=Reference("precomputed"))
    tokenizer = student_of(policy_dir, KTO()).tokenizer
    pair = pair_batch(tokenizer, n=1)
    one = replace(
        pair, input_ids=pair.input_ids[:1], labels=pair.labels[:1], sequence_index=pair.sequence_index[:1]
    )
    with pytest.raises(ValueError, match="at least 2 samples"):
        mismatched_batch(one, None)
    store = ReferenceStore(tmp_path, {"reference": "x"})
    store.write_part(0, 2, ["00" * 32], torch.zeros(1, 2).numpy())
    with pytest.raises(FileNotFoundError, match=r"ranks \[1\].*every node shares"):
        store.finish(2)


def test_kto_mismatched_completions_of_a_packed_batch_are_packed(policy_dir):
    from distill.data.batching import Collator
    from distill.objectives.kto import mismatched_batch

    tokenizer = student_of(policy_dir, KTO()).tokenizer
    packed = pair_batch(tokenizer, n=4, packed=True)  # one row of 8 sequences
    mixed = mismatched_batch(packed, Collator(tokenizer.pad_token_id))
    assert mixed.attention_mask is None and mixed.input_ids.shape[1] <= packed.input_ids.shape[1]
    assert mixed.input_ids.shape[0] < 8 and int(mixed.sequence_index.max()) == 7
    unpacked = mismatched_batch(pair_batch(tokenizer, n=4), Collator(tokenizer.pad_token_id))
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    # packing reorders the sequences; z0 is their mean, so only the set of values matters
    got, want = sequence_logps(model, mixed).sort().values, sequence_logps(model, unpacked).sort().values
    assert_close(got, want, rtol=1e-4, atol=1e-4)


class _ShiftedReference:
    """A reference whose log-prob of each sequence is the policy's minus ``offset``."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def setup(self, context, owner: str, chunk_size: int) -> None:
        self.policy = context.policy

    def logps(self, batch) -> torch.Tensor:
        return sequence_logps(self.policy.causal_lm, batch) - self.offset


def _kto_reference_point_on_two_ranks(rank: int, store: str) -> None:
    from functools import partial

    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from transformers import AutoConfig

    from distill.data.encoding import Encoded
    from distill.data.facts import DataFacts
    from tests.helpers import TINY_LLAMA, objective_context

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, vocab_size=64))
    mean = partial(DDPStrategy().reduce, reduce_op="mean")  # over the gloo group
    data = DataFacts("a test", "unpaired", pad_id=0)
    context = objective_context(None, model, data, rank=rank, world_size=2, mean_over_ranks=mean)
    samples = [
        Encoded([1, 5 + i, 9, 10 + i], [-100, -100, 9, 10 + i], f"{i:064x}", f"kto:{i}", value=float(i % 2))
        for i in range(4)
    ]
    # the mean over the batch and the ranks, then clamped; not each rank's mean clamped, then averaged
    for offsets, want in (([-2.0, 1.0], 0.0), ([-1.0, 2.0], 0.5)):
        objective = KTO()
        objective.reference = _ShiftedReference(offsets[rank])  # policy - reference = the rank's offset
        objective.setup(context)
        batch = objective.prepare(
            UnitCollator(0, packed=False)([[sample] for sample in samples]), Step(training=True)
        )
        assert float(batch.kl_baseline) == pytest.approx(want, abs=1e-5), (rank, offsets)
    dist.destroy_process_group()


def test_kto_reference_point_is_the_mean_over_the_ranks_clamped(tmp_path):
    import torch.multiprocessing as mp

    store = str(tmp_path / "store")
    mp.start_processes(_kto_reference_point_on_two_ranks, (store,), nprocs=2, start_method="spawn")
