"""GRPO and RLOO on the one StudentModule path: the objectives against naive full-logits references,
groups, the reuse of a rollout, the demo configs' runs, and resume."""

from __future__ import annotations

import copy
import json
import socket
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from distill.callbacks import CompletionLog
from lightning.pytorch.loggers import WandbLogger
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from distill.cli import main
from distill.data.batch import PromptBatch, RolloutBatch, extended
from distill.data.facts import DataFacts
from distill.objectives import GRPO, RLOO
from distill.objectives.base import loss_inputs
from distill.objectives.context import Step
from distill.objectives.rollouts import Rollouts
from distill.rewards import Format
from distill.rollout import Sampling, rollout_batch, trim_at_stop
from distill.train.model import LoraOptions
from distill.train.sharding import sharded as is_sharded
from distill.train.student import StudentModule
from tests.helpers import (
    ROOT,
    TINY_LLAMA,
    TOKENIZER_DIR,
    check_killed_fit_resumes,
    logged_values,
    losses_named,
    objective_context,
    objective_loss,
    save_tiny_teacher,
    with_last_checkpoint,
    write_jsonl,
)

PAD, EOT = 0, 7
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=128, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(config).train()


def completion_batch(num_prompts: int = 2, group: int = 3) -> RolloutBatch:
    """Rows of left-padded prompts and completions (some stopped at EOT), with rollout values."""
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(8, 128, (num_prompts, 5), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[1, :2], prompt_mask[1, :2] = PAD, 0
    ids = torch.randint(8, 128, (num_prompts * group, 6), generator=generator)
    ids[0, 2] = ids[4, 0] = EOT
    completions = trim_at_stop(ids, [EOT], PAD)
    rows = rollout_batch(prompt_ids, prompt_mask, completions)
    total = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.5])[: num_prompts * group]
    return extended(
        rows,
        RolloutBatch,
        prompt_shas=[f"sha{i}" for i in range(num_prompts)],
        rewards=total[:, None],
        reward_total=total,
        advantages=torch.zeros_like(total),
        completion_lengths=completions.lengths,
        stopped=completions.stopped,
    )


def naive_token_logps(model, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (B, T, V) logits: the tempered log-prob of every label, and which row each belongs to."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / TEMPERATURE, dim=-1)
    labels = batch.labels[:, 1:]
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    rows = torch.arange(labels.shape[0])[:, None].expand_as(labels)
    return picked[mask], rows[mask]


def gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("normaliser", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_loss_and_gradient_equal_a_full_logits_computation(policy, normaliser, beta):
    batch = completion_batch()
    advantages = torch.tensor([1.0, -0.5, -0.5, 1.2, -0.7, -0.5])
    with torch.no_grad():
        logps, rows = naive_token_logps(policy, batch)
    # an older policy's log-probs and a reference's, off by enough that both clip bounds are hit
    generator = torch.Generator().manual_seed(2)
    batch = replace(
        batch,
        old_logps=logps + 0.4 * torch.randn(logps.shape, generator=generator),
        reference_logps=logps + 0.2 * torch.randn(logps.shape, generator=generator),
        advantages=advantages,
    )
    low, high, max_new = 0.2, 0.28, 6
    objective = GRPO(
        [Format()], num_generations=3, sampling=Sampling(max_new, TEMPERATURE), beta=beta,
        epsilon=low, epsilon_high=high, loss_normaliser=normaliser,
    )  # fmt: skip

    out = objective_loss(objective, policy, batch)
    (out.loss_sum / out.num_units).backward()
    got = gradients(policy)

    logps, rows = naive_token_logps(policy, batch)
    ratio = torch.exp(logps - batch.old_logps)
    a = advantages[rows]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - low, 1 + high) * a)
    log_ref_ratio = batch.reference_logps - logps
    per_token = per_token + beta * (torch.exp(log_ref_ratio) - log_ref_ratio - 1)
    if normaliser == "dapo":  # every token of the step weighs the same
        want, units = per_token.sum(), rows.numel()
    else:
        per_row = [per_token[rows == r] for r in range(6)]
        reduce = (lambda t: t.mean()) if normaliser == "grpo" else (lambda t: t.sum() / max_new)
        want, units = sum(reduce(t) for t in per_row), 6
    (want / units).backward()
    assert out.num_units == units
    assert_close(out.loss_sum, want.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got, gradients(policy), strict=True):
        assert_close(g, w, rtol=1e-4, atol=1e-6)
    clipped = (ratio < 1 - low) & (a < 0), (ratio > 1 + high) & (a > 0)
    assert out.sums["clip_ratio/low"] == clipped[0].sum() and out.sums["clip_ratio/high"] == clipped[1].sum()
    assert clipped[0].any() and clipped[1].any()  # the case exercises both bounds


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_rloo_loss_and_gradient_equal_a_full_logits_computation(policy, beta):
    batch = completion_batch()
    with torch.no_grad():
        logps, rows = naive_token_logps(policy, batch)
    batch = replace(batch, reference_logps=logps - 0.3)
    objective = RLOO([Format()], num_generations=3, sampling=Sampling(6, TEMPERATURE), beta=beta)

    out = objective_loss(objective, policy, batch)
    (out.loss_sum / out.num_units).backward()
    got = gradients(policy)

    logps, rows = naive_token_logps(policy, batch)
    sequence = torch.zeros(6).index_add(0, rows, logps)
    kl = torch.zeros(6).index_add(0, rows, logps.detach() - batch.reference_logps)
    rewards = (batch.reward_total - beta * kl).tolist()
    advantages = []
    for start in (0, 3):
        group = rewards[start : start + 3]
        advantages += [r - (sum(group) - r) / 2 for r in group]  # each against the mean of the others
    want = -(torch.tensor(advantages) * sequence).sum()
    (want / 6).backward()
    assert out.num_units == 6
    assert_close(out.loss_sum, want.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got, gradients(policy), strict=True):
        assert_close(g, w, rtol=1e-4, atol=1e-6)


def index_reward(prompts, completions, answer, **fields) -> list[float]:
    return [float(a) for a in answer]


def prompt_batch(lengths: list[int]) -> PromptBatch:
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.arange(10, 10 + n) + row
        mask[row, width - n :] = 1
    return PromptBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        prompts=[f"prompt {i}" for i in range(len(lengths))],
        messages=[[{"role": "user", "content": f"prompt {i}"}] for i in range(len(lengths))],
        fields={"answer": [str(i) for i in range(len(lengths))]},
        sources=[f"p.jsonl:{i + 1}" for i in range(len(lengths))],
        shas=[f"sha{i}" for i in range(len(lengths))],
    )


class Tokenizer:
    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(map(str, row.tolist())) for row in ids]


def prompts(num_iterations: int = 1, stop_ids: tuple[int, ...] = (EOT,)) -> DataFacts:
    """What a prompt data module tells the objective."""
    return DataFacts("a test", "prompts", PAD, stop_ids=stop_ids, num_iterations=num_iterations)


def set_up(rollouts, policy, **options):
    rollouts.setup(objective_context(Tokenizer(), policy, prompts(), **options))
    return rollouts


def test_a_rollout_keeps_each_prompts_group_together_and_equals_generate(policy):
    g, sampling = 4, Sampling(max_new_tokens=5, temperature=1.0)
    rollouts = set_up(Rollouts([index_reward], g, sampling), policy)
    batch = prompt_batch([3, 5, 2])
    rollout = rollouts.roll(policy, batch, seed=11)
    assert rollout.rewards[:, 0].tolist() == [0.0] * g + [1.0] * g + [2.0] * g  # prompt i's group: rows ig..
    rows = rollout.rows.input_ids
    for row in range(3 * g):
        assert torch.equal(rows[row, :5], batch.prompt_ids[row // g])
    assert rollout.prompts == [p for p in batch.prompts for _ in range(g)]
    # the engine adds nothing to generate: the same draws from the same seed
    torch.manual_seed(11)
    bare = policy.eval().generate(
        input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, do_sample=True,
        num_return_sequences=g, max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=None, eos_token_id=[EOT],
        pad_token_id=PAD,
    )[:, 5:]  # fmt: skip
    policy.train()
    assert torch.equal(trim_at_stop(bare, [EOT], PAD).ids, rollout.completions.ids)


def repeated(batch: PromptBatch, window: int, iteration: int, iterations: int) -> PromptBatch:
    """A prompt batch as the data module repeats it for ``iterations`` updates (num_iterations)."""
    return replace(batch, window=window, iteration=iteration, iterations=iterations)


def test_later_iterations_reuse_the_kept_rollout_until_their_window_ends(policy, monkeypatch):
    objective = GRPO([index_reward], num_generations=2, sampling=Sampling(max_new_tokens=4), num_iterations=3)
    objective.setup(objective_context(Tokenizer(), policy, prompts(num_iterations=3)))
    sampled = []

    def sample(batch, step):
        sampled.append(batch.shas)
        return objective.rollouts.roll(policy, batch, seed=len(sampled))

    monkeypatch.setattr(objective.rollouts, "sample", sample)
    training = Step(training=True)
    seen = []
    for iteration in range(3):
        seen.append(objective.prepare(repeated(prompt_batch([3, 2]), 0, iteration, 3), training))
    assert len(sampled) == 1  # sampled once, trained on three times
    for batch in seen[1:]:
        assert torch.equal(batch.input_ids, seen[0].input_ids)
        assert batch.noise_seed == seen[0].noise_seed  # the same dropout and NEFTune noise
    assert objective.rank_state() is None  # its iterations used up: nothing kept
    # a window cut short (limit_train_batches) leaves nothing behind once the next one starts
    objective.prepare(repeated(prompt_batch([3, 2]), 1, 0, 3), training)
    assert objective.rank_state()["window"] == 1
    objective.prepare(repeated(prompt_batch([4, 2]), 2, 0, 3), training)
    assert list(objective.rank_state()["rows"]) == [("sha0", "sha1")] and len(sampled) == 3
    assert objective.rank_state()["window"] == 2
    # an iteration with no kept rollout (a checkpoint without it) samples one for the iterations left
    objective.prepare(repeated(prompt_batch([5, 2]), 3, 2, 3), training)
    assert len(sampled) == 4 and objective.rank_state() is None
    # the data module must repeat each step's prompts as often
    with pytest.raises(ValueError, match=r"data\.num_iterations: 3"):
        objective.setup(objective_context(Tokenizer(), policy, prompts(num_iterations=1)))


def completion_length(prompts, completions, **fields) -> list[float]:
    return [float(len(c)) for c in completions]


def grpo_student(**model) -> StudentModule:
    """A tiny StudentModule training GRPO with 2 iterations per rollout, as a fit's first step sees it."""
    objective = GRPO(
        [completion_length], num_generations=4, sampling=Sampling(max_new_tokens=6), num_iterations=2
    )
    student = StudentModule(
        model_config=TINY_LLAMA, tokenizer=str(TOKENIZER_DIR), objective=objective, **model
    )
    progress = SimpleNamespace(current=SimpleNamespace(completed=0, ready=0))
    loop = SimpleNamespace(epoch_progress=progress, epoch_loop=SimpleNamespace(batch_progress=progress))
    data = SimpleNamespace(facts=lambda: prompts(num_iterations=2))
    student._trainer = SimpleNamespace(
        datamodule=data, strategy=None, training=True, fit_loop=loop, world_size=1, global_rank=0
    )
    torch.manual_seed(0)
    student.configure_model()
    return student


def test_a_rollouts_ratio_is_one_at_the_same_weights_with_dropout_and_neftune(tmp_path):
    # LoRA dropout 0.5 and NEFTune: two forwards at the same weights differ unless they draw the same noise
    model = {"lora": LoraOptions(r=4, alpha=8, dropout=0.5), "neftune_alpha": 5.0}
    student = grpo_student(**model)
    prompts = prompt_batch([3, 2])
    first, _ = student.compute_loss(repeated(prompts, 0, 0, 2))
    checkpoint = {}
    student.on_save_checkpoint(checkpoint)  # between the iterations, at the same weights (lr 0)
    second, _ = student.compute_loss(repeated(prompts, 0, 1, 2))
    for out in (first, second):
        assert out.sums["clip_ratio/low"] == out.sums["clip_ratio/high"] == 0
    assert second.loss_sum == first.loss_sum  # ratio exactly 1: the same function of the same weights
    assert student.objective.rank_state() is None  # the last iteration took the rollout out
    # a fit resumed between the iterations trains the second on the kept rollout, not a new one
    torch.save(checkpoint, tmp_path / "last.ckpt")
    resumed = grpo_student(**model)
    resumed.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=True))
    resumed.objective.rollouts.sampler = None  # sampling again would fail
    again, _ = resumed.compute_loss(repeated(prompts, 0, 1, 2))
    assert again.loss_sum == second.loss_sum and again.sums["reward"] == second.sums["reward"]
    assert resumed.objective.rank_state() is None


def _kept_rollouts_on_two_ranks(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    objective = GRPO([index_reward], num_generations=2, num_iterations=2)
    objective.kept.take((f"sha{rank}",), 0, 0, 2)
    objective.kept.keep((f"sha{rank}",), {"old_logps": torch.tensor([float(rank)])})
    checkpoint = {}
    fit = SimpleNamespace(objective=objective, _run_seed=1234)
    StudentModule.on_save_checkpoint(fit, checkpoint)  # a collective
    assert len(checkpoint["objective_rank_states"]) == 2  # rank 0's checkpoint is the one written
    resumed = GRPO([index_reward], num_generations=2, num_iterations=2)
    fit = SimpleNamespace(objective=resumed, trainer=SimpleNamespace(world_size=2), global_rank=rank)
    StudentModule.on_load_checkpoint(fit, checkpoint)
    assert fit._run_seed == 1234
    state = resumed.rank_state()
    assert list(state["rows"]) == [(f"sha{rank}",)]
    assert state["rows"][(f"sha{rank}",)]["old_logps"].item() == rank
    dist.destroy_process_group()


def test_a_checkpoint_keeps_every_ranks_kept_rollouts():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_kept_rollouts_on_two_ranks, (port,), nprocs=2, start_method="fork")  # imports done


class RecordingModel(torch.nn.Module):
    """Records what ``generate`` was asked; returns the prompts with one EOT appended per sample."""

    def generate(self, input_ids, num_return_sequences, **kwargs):
        self.asked = kwargs
        rows = input_ids.repeat_interleave(num_return_sequences, dim=0)
        return torch.cat([rows, torch.full((rows.shape[0], 1), EOT)], dim=1)


@pytest.mark.parametrize("sharded", [True, False])
def test_sharded_weights_make_every_rank_step_until_all_are_done(sharded):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    rollouts = Rollouts([index_reward], 2, Sampling(max_new_tokens=3))
    strategy = FSDPStrategy() if sharded else DDPStrategy()
    model = RecordingModel()
    context = objective_context(Tokenizer(), model, prompts(stop_ids=(EOT, 2)), sharded=is_sharded(strategy))
    rollouts.setup(context)
    rollout = rollouts.roll(model, prompt_batch([2, 3]), seed=0)
    assert model.asked["synced_gpus"] is sharded and model.asked["eos_token_id"] == [EOT, 2]
    assert model.asked["use_cache"] is True and rollout.completions.stopped.all()


def test_the_completion_log_writes_a_wandb_table_or_jsonl_lines(tmp_path, policy):
    class Tables(WandbLogger):
        def log_table(self, key, columns, data, step):
            self.logged = (key, columns, data, step)

    rollouts = set_up(Rollouts([index_reward, Format()], 2, Sampling(max_new_tokens=3)), policy)
    rollouts.last = rollouts.roll(policy, prompt_batch([2, 3]), seed=0)
    module = SimpleNamespace(objective=SimpleNamespace(rollouts=rollouts))
    callback = CompletionLog(every_n_steps=2, num_completions=3)
    wandb = Tables(save_dir=str(tmp_path), offline=True)
    for step in (1, 2, 3):
        callback.on_train_batch_end(SimpleNamespace(global_step=step, logger=wandb), module)
        assert wandb.__dict__.get("logged", (None,) * 4)[3] == (1 if step < 3 else 3)
    key, columns, data, _ = wandb.logged
    assert key == "completions" and columns == ["step", "prompt", "completion", "reward", "index_reward",
                                                "format", "length", "stopped"]  # fmt: skip
    assert len(data) == 3 and [row[4] for row in data] == [0.0, 0.0, 1.0]  # prompt 0's group, then 1's
    # any other logger: JSON lines in its directory
    csv_logger = SimpleNamespace(log_dir=str(tmp_path / "csv"))
    callback.on_train_batch_end(SimpleNamespace(global_step=1, logger=csv_logger), module)
    rows = [json.loads(line) for line in (tmp_path / "csv" / "completions.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == rollouts.last.texts[:3]


def test_a_reward_model_from_the_rm_stage_scores_completions_as_it_was_trained(tmp_path, tiny_policy_dir):
    from distill.cli import run_cli
    from distill.rewards import ModelReward
    from tests.helpers import preference_config, preference_pair

    objective = {"class_path": "distill.objectives.RewardModel"}
    config = preference_config(tmp_path, tiny_policy_dir, objective, n=8)
    module = run_cli(["fit", "--config", str(config), "--trainer.max_steps", "3"]).model
    batch = next(iter(module.trainer.datamodule.val_dataloader()))  # held-out pairs 100.., chosen first
    with torch.no_grad():
        trained = module.objective.rewards(loss_inputs(module.forward_hidden(batch), None, batch).last_hidden)
    pairs = [preference_pair(100 + i) for i in range(len(trained) // 2)]
    questions = [p["conversations"][0]["value"] for p in pairs for _ in range(2)]
    messages = [[{"role": "user", "content": q}] for q in questions]
    completions = [text for p in pairs for text in (p["chosen"], p["rejected"])]
    reward = ModelReward(str(tmp_path / "hf"), batch_size=3)
    scores = reward(["unused"] * len(completions), completions, messages=messages)
    assert_close(torch.tensor(scores), trained, rtol=1e-4, atol=1e-4)


def test_rl_objectives_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="at least one reward"):
        GRPO([])
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        RLOO([Format()], num_generations=1)
    with pytest.raises(ValueError, match="unknown loss_normaliser"):
        GRPO([Format()], loss_normaliser="mean")


def rl_config(tmp_path, stage: str = "grpo.yaml", **objective) -> dict:
    """A demo config writing only under ``tmp_path`` (CSV logs, export, completion log)."""
    config = yaml.safe_load((ROOT / "configs" / stage).read_text())
    trainer = config["trainer"]
    trainer.update(
        default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False, enable_checkpointing=False
    )
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    trainer["callbacks"] = [
        {"class_path": "distill.callbacks.HFExport", "init_args": {"dirpath": str(tmp_path / "hf")}},
        {
            "class_path": "distill.callbacks.CompletionLog",
            "init_args": {"every_n_steps": 2, "num_completions": 3},
        },
    ]
    config["model"]["init_args"]["objective"]["init_args"].update(objective)
    config["model"]["init_args"]["model"] = str(ROOT / "distill" / "assets" / "teacher")
    for key in ("train_files", "val_files"):
        config["data"]["init_args"][key] = str(ROOT / config["data"]["init_args"][key])
    return config


def write(config: dict, path) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_grpo_demo_raises_the_held_out_reward(tmp_path):
    config = rl_config(tmp_path)
    config["trainer"].update(max_steps=12, val_check_interval=12, log_every_n_steps=1)
    config["data"]["init_args"]["max_eval_samples"] = 16
    path = write(config, tmp_path / "grpo.yaml")
    main(["validate", "--config", path])  # the starting policy, logged at step 0
    main(["fit", "--config", path])
    reward = losses_named(tmp_path / "logs", "val/reward")
    assert sorted(reward) == [0, 11]
    before, after = reward[0], reward[11]
    assert after > before + 0.15, (before, after)
    for name in (
        "reward_std", "rewards/token_f1", "rewards/format", "advantage_std", "clip_ratio/low",
        "clip_ratio/high", "entropy", "completions/mean_length", "completions/stopped",
        "completions/truncated",
    ):  # fmt: skip
        assert len(losses_named(tmp_path / "logs", f"train/{name}")) == 12, name
    stopped = losses_named(tmp_path / "logs", "train/completions/stopped")
    truncated = losses_named(tmp_path / "logs", "train/completions/truncated")
    assert all(abs(stopped[s] + truncated[s] - 1) < 1e-6 for s in stopped)
    (log,) = (tmp_path / "logs").rglob("completions.jsonl")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (1, 3, 5, 7, 9, 11) for _ in range(3)]
    assert {"prompt", "completion", "reward", "token_f1", "format", "length", "stopped"} <= rows[0].keys()
    assert rows[0]["prompt"].startswith("<s>[INST]")
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_rloo_with_kl_to_the_adapter_off_reference_starts_at_zero_kl(tmp_path):
    config = rl_config(tmp_path, "rloo.yaml", beta=0.1, num_generations=4, sampling={"max_new_tokens": 6})
    config["model"]["init_args"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    config["trainer"].update(max_steps=3, val_check_interval=None, limit_val_batches=0, log_every_n_steps=1)
    main(["fit", "--config", write(config, tmp_path / "rloo.yaml")])
    kl = logged_values(tmp_path / "logs", "train/kl")
    assert len(kl) == 3 and abs(kl[0]) < 1e-5  # before the first update the policy is its reference
    assert any(abs(k) > 1e-6 for k in kl[1:])
    assert (tmp_path / "hf" / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("policy"))


def test_a_killed_grpo_fit_resumes_with_the_same_rollouts(tmp_path, tiny_policy_dir):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"question": f"Say {w}", "answer": w} for w in "abcdefgh"]
    )
    rewards = [{"class_path": "distill.rewards.Function", "init_args": {"path": "tests.probes:vowel_share"}}]
    # 4 updates per rollout: the kill at step 6 falls between the third and fourth of the second's
    base = rl_config(
        tmp_path, rewards=rewards, num_generations=2, sampling={"max_new_tokens": 4}, num_iterations=4
    )
    base["model"]["init_args"]["model"] = str(tiny_policy_dir)
    base["data"]["init_args"].update(
        train_files=str(prompts), val_files=None, batch_size=2, template="mistral", num_iterations=4
    )
    base["trainer"].update(val_check_interval=None, limit_val_batches=0, log_every_n_steps=1)
    base["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.01

    def config_in(name: str):
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        config = copy.deepcopy(base)
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(directory)
        config["trainer"]["enable_checkpointing"] = True
        return with_last_checkpoint(config, directory)

    check_killed_fit_resumes(tmp_path, config_in, ["--trainer.max_steps", "10"])
    # the resumed steps' rewards are the uninterrupted run's: the same completions were drawn
    want = losses_named(tmp_path / "reference", "train/reward")
    (resumed,) = (tmp_path / "resumed").rglob("version_1")
    got = losses_named(resumed, "train/reward")
    assert sorted(got) == [6, 7, 8, 9] and all(want[s] == got[s] for s in got)
    # one rollout per 4 steps, and rewards that differ between rollouts: the check can fail
    assert want[0] == want[3] != want[4] == want[7] != want[8]


def test_two_ranks_train_on_disjoint_prompts_each_with_its_whole_group(tmp_path, tiny_policy_dir):
    from tests.helpers import clean_env, run

    words = [f"w{i}" for i in range(8)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"Say {w}", "answer": w} for w in words])
    rewards = [{"class_path": "distill.rewards.Function", "init_args": {"path": "tests.probes:vowel_share"}}]
    config = rl_config(tmp_path, rewards=rewards, num_generations=3, sampling={"max_new_tokens": 4})
    config["model"]["init_args"]["model"] = str(tiny_policy_dir)
    config["data"]["init_args"].update(
        train_files=str(prompts), val_files=None, batch_size=2, template="mistral"
    )
    config["trainer"].update(max_steps=2, val_check_interval=None, limit_val_batches=0)
    probe = {"class_path": "tests.probes.PromptLog", "init_args": {"directory": str(tmp_path / "probe")}}
    config["trainer"]["callbacks"].append(probe)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run(["fit", "--config", write(config, tmp_path / "grpo.yaml"), *ddp], clean_env())
    seen = {}
    for rank in (0, 1):
        lines = [
            json.loads(x) for x in (tmp_path / "probe" / f"prompts{rank}.jsonl").read_text().splitlines()
        ]
        assert [line["rows"] for line in lines] == [6, 6]  # 2 prompts x their 3 completions, each step
        seen[rank] = [sha for line in lines for sha in line["shas"]]
    assert len(seen[0]) == len(seen[1]) == 4 and set(seen[0]).isdisjoint(seen[1])
