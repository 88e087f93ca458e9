"""Rollouts: completions cut at their stop token, the training rows they become, seeded sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from distill.data.encoding import IGNORE_INDEX
from distill.rollout import Sampling, TransformersEngine, rollout_batch, trim_at_stop
from tests.helpers import TINY_LLAMA

PAD, EOT, EOS = 0, 7, 2


def test_a_stopped_completion_ends_at_its_first_stop_token():
    ids = torch.tensor(
        [
            [5, 6, EOT, 9, 9],  # stopped at the end-of-turn: what follows is padding
            [5, EOS, PAD, PAD, PAD],  # the model's EOS also stops
            [5, 6, 8, 9, 4],  # cut at max_new_tokens: every token kept, not stopped
            [EOT, EOT, PAD, PAD, PAD],  # stops at the first
        ]
    )
    out = trim_at_stop(ids, [EOT, EOS], PAD)
    assert out.stopped.tolist() == [True, True, False, True]
    assert out.lengths.tolist() == [3, 2, 5, 1]
    assert out.ids.tolist() == [
        [5, 6, EOT, PAD, PAD],
        [5, EOS, PAD, PAD, PAD],
        [5, 6, 8, 9, 4],
        [EOT, PAD, PAD, PAD, PAD],
    ]


def test_rollout_rows_label_only_the_completion_and_count_positions_over_tokens():
    prompt_ids = torch.tensor([[PAD, 11, 12], [13, 14, 15]])  # left-padded
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completions = trim_at_stop(
        torch.tensor([[21, EOT, 9], [22, 23, EOT], [24, 9, 9], [25, 26, 27]]), [EOT], PAD
    )
    completions.ids[2, 1:] = PAD
    completions.mask[2, 1:] = False  # a one-token completion
    batch = rollout_batch(prompt_ids, prompt_mask, completions)
    # two samples per prompt, consecutive; the last column is padding everywhere except row 1 and 3
    assert batch.input_ids.tolist() == [
        [PAD, 11, 12, 21, EOT, PAD],
        [PAD, 11, 12, 22, 23, EOT],
        [13, 14, 15, 24, PAD, PAD],
        [13, 14, 15, 25, 26, 27],
    ]
    assert batch.attention_mask.tolist() == [
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert batch.position_ids[0].tolist()[1:5] == [0, 1, 2, 3]
    assert batch.position_ids[3].tolist() == [0, 1, 2, 3, 4, 5]
    ignore = IGNORE_INDEX
    assert batch.labels.tolist() == [
        [ignore, ignore, ignore, 21, EOT, ignore],
        [ignore, ignore, ignore, 22, 23, EOT],
        [ignore, ignore, ignore, 24, ignore, ignore],
        [ignore, ignore, ignore, 25, 26, 27],
    ]


def test_rows_drop_trailing_padding_columns():
    completions = trim_at_stop(torch.tensor([[EOT, 9, 9, 9], [EOT, 9, 9, 9]]), [EOT], PAD)
    batch = rollout_batch(torch.tensor([[11]]), torch.tensor([[1]]), completions)
    assert batch.input_ids.tolist() == [[11, EOT], [11, EOT]]


@pytest.fixture(scope="module")
def tiny_policy():
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def test_the_engine_samples_reproducibly_from_its_seed_and_restores_train_mode(tiny_policy):
    engine, sampling = TransformersEngine(), Sampling(max_new_tokens=6, temperature=1.0)
    prompts, mask = torch.tensor([[PAD, 5, 6], [8, 9, 10]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    options = dict(num_samples=3, sampling=sampling, stop_ids=[EOT], pad_id=PAD)
    torch.manual_seed(123)
    before = torch.rand(1)
    first = engine(tiny_policy, prompts, mask, seed=1, **options)
    after_state = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched by the seeded draw
    assert torch.equal(torch.rand(1), after_state)
    again = engine(tiny_policy, prompts, mask, seed=1, **options)
    other = engine(tiny_policy, prompts, mask, seed=2, **options)
    assert first.shape == (6, 6) and torch.equal(first, again)
    assert not torch.equal(first, other)
    assert tiny_policy.training  # back in train mode after sampling in eval mode


@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpoints_own_generation_config_does_not_change_what_is_sampled(tiny_policy, lora):
    # what Qwen2.5-Instruct-like checkpoints ship, pushed far enough to change every draw
    shipped = GenerationConfig(
        repetition_penalty=5.0, no_repeat_ngram_size=1, top_k=1, min_new_tokens=6, suppress_tokens=[9, 10]
    )
    prompts, mask = torch.tensor([[PAD, 5, 6], [8, 9, 10]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    options = dict(num_samples=3, sampling=Sampling(max_new_tokens=6), stop_ids=[EOT], pad_id=PAD, seed=3)
    drawn = {}
    for name, defaults in (("shipped", shipped), ("clean", GenerationConfig())):
        model = copy.deepcopy(tiny_policy)
        model.generation_config = defaults
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        drawn[name] = TransformersEngine()(model, prompts, mask, **options)
        if name == "shipped":  # honoured, the checkpoint's options would have changed the draws
            torch.manual_seed(3)
            with torch.no_grad():
                own = model.eval().generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6)
            assert not torch.equal(own[:, 3:], drawn[name][::3])
    assert torch.equal(drawn["shipped"], drawn["clean"])


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
