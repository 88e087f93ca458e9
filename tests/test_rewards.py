"""Reward functions: the built-ins on crafted strings, scoring and its errors, and the reward model."""

from __future__ import annotations

import math
import signal
import threading
import time

import pytest
import torch
from torch import nn

from distill.rewards import (
    Accuracy,
    Format,
    Function,
    Length,
    ModelReward,
    RewardError,
    TokenF1,
    names,
    score,
    weights,
)
from tests.helpers import TINY_LLAMA, TOKENIZER_DIR


def accuracy(completions: list[str], answers: list, **kwargs) -> list[float]:
    return Accuracy(**kwargs)([""] * len(completions), completions, answer=answers)


@pytest.mark.parametrize(
    ("completion", "answer", "want"),
    [
        ("<think>6 times 7</think> <answer>42</answer>", "42", 1.0),
        ("<answer>41</answer> though 42 is nicer", "42", 0.0),  # the tag wins over the last number
        (r"so it is \boxed{\frac{1}{2}}.", "0.5", 1.0),  # math-verify: 1/2 == 0.5
        (r"\boxed{\frac{\sqrt{4}}{4}} and \boxed{x}", "0.5", 0.0),  # the last boxed counts
        (r"first \boxed{3}, finally \boxed{\frac{\sqrt{4}}{4}}", "1/2", 1.0),  # nested braces
        ("the answer is 3 then 7", "7", 1.0),  # the last number
        ("the answer is 3 then 8", "7", 0.0),
        ("we get 1,234 apples", "1234", 1.0),  # thousands commas
        ("Paris", "paris", 1.0),  # string fallback
        ("Lyon", "paris", 0.0),
        ("<answer>ab</answer>", "ba", 0.0),  # words are not math-verified as products of symbols
        ("<answer>42</answer>", 42, 1.0),  # a numeric reference
        ("<answer>7</answer>", r"add them: \boxed{7}", 1.0),  # a full solution's boxed answer
        ("<answer>7</answer>", ["6", "7"], 1.0),  # any of several references
    ],
)
def test_accuracy_on_crafted_completions(completion, answer, want):
    assert accuracy([completion], [answer]) == [want]


def test_accuracy_needs_its_reference_field():
    with pytest.raises(ValueError, match="'solution'"):
        Accuracy(answer_field="solution")([""], ["42"], answer=["42"])


def test_accuracy_times_out_and_restores_an_outer_timer():
    """10^(10^10) would take sympy hours; an outer timer (pytest-timeout's) must keep running."""
    handler = signal.signal(signal.SIGALRM, lambda *_: None)
    outer = signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        start = time.monotonic()
        assert accuracy([r"\boxed{10^{10^{10}}}"], ["5"], timeout=0.3) == [0.0]
        assert time.monotonic() - start < 5
        assert 50 < signal.getitimer(signal.ITIMER_REAL)[0] <= 60
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
        signal.signal(signal.SIGALRM, handler)


def test_accuracy_works_off_the_main_thread():
    """No signals there: math-verify still compares, and expressions that could run for hours are skipped."""
    results: list = []
    thread = threading.Thread(
        target=lambda: results.append(
            accuracy([r"\boxed{\frac{1}{2}}", r"\boxed{10^{10^{10}}}", "7"], ["0.5", "5", "7"])
        ),
        daemon=True,  # were the guard broken, a thread computing for hours must not hold pytest's exit
    )
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and results == [[1.0, 0.0, 1.0]]


def test_format_matches_the_whole_completion():
    fmt = Format()
    completions = [
        "<think>\nstep 1\nstep 2\n</think>\n<answer>4</answer>",  # newlines inside and between
        "  <think>ok</think><answer>4</answer>\n",  # surrounding whitespace is stripped
        "<think>ok</think>",  # no answer
        "<think>ok</think><answer>4</answer> and more",  # text after the answer
        "<answer>4</answer>",
    ]
    assert fmt([""] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert Format(r"\d+")([""] * 2, ["123", "12a"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regex"):
        Format("(unclosed")


def test_length_is_dapos_soft_overlong_penalty():
    lengths = [3, 6, 7, 8, 9, 10, 11]
    got = Length(max_tokens=10, buffer=4)([""] * 7, [""] * 7, completion_length=lengths)
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    assert Length(10)([""] * 3, [""] * 3, completion_length=[1, 10, 11]) == [0.0, 0.0, -1.0]
    for bad in ({"max_tokens": 0}, {"max_tokens": 10, "buffer": 11}, {"max_tokens": 10, "buffer": -1}):
        with pytest.raises(ValueError):
            Length(**bad)


def test_token_f1_against_a_hand_computation():
    f1 = TokenF1()
    # tokens: {cat, sat, on, mat} vs {cat, on, hat}: 2 shared, P = 2/4, R = 2/3 -> F1 = 4/7
    assert f1([""], ["The cat sat on the mat."], answer=["a cat on a hat"]) == [pytest.approx(4 / 7)]
    # the tagged answer, not the whole text; case, punctuation and articles do not count
    assert f1([""], ["<think>dogs?</think><answer>The Cat!</answer>"], answer=["cat"]) == [1.0]
    assert f1([""], ["dog dog"], answer=["dog"]) == [pytest.approx(2 * 0.5 * 1 / 1.5)]  # counts, not sets
    assert f1([""], ["a bird"], answer=["cat"]) == [0.0]
    assert f1([""], ["cat"], answer=[["dog", "the cat"]]) == [1.0]  # the best of several references


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def chars(prompts, completions, **fields):\n"
        "    return [float(len(c)) for c in completions]\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def first(prompts, completions, **fields):\n"
        "        return [float(c[:1] == 'a') for c in completions]\n"
        "value = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_function_imports_a_reward_by_path(reward_module):
    for path in (f"{reward_module}:chars", f"{reward_module}.chars"):
        fn = Function(path, weight=0.5)
        assert fn(["p", "p"], ["abc", ""]) == [3.0, 0.0]
        assert (fn.name, fn.weight) == ("chars", 0.5)
    assert Function(f"{reward_module}:Holder.first", name="first_a")([""] * 2, ["ab", "b"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        Function("no_such_module:chars")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        Function(f"{reward_module}:missing")
    with pytest.raises(ValueError, match="not a callable"):
        Function(f"{reward_module}:value")


SOURCES = ["data/x.jsonl:0", "data/x.jsonl:1", "data/x.jsonl:2"]


def scored(functions, completions=("<answer>1</answer>", "<answer>2</answer>", "2")) -> torch.Tensor:
    completions = list(completions)
    n = len(completions)
    fields = {"answer": ["1", "1", "2"][:n], "completion_length": [4, 12, 20][:n], "stopped": [True] * n}
    return score(functions, ["prompt"] * n, completions, fields, SOURCES[:n])


def test_score_is_one_column_per_function():
    def shout(prompts, completions, **fields):
        return [float(c.isupper()) for c in completions]

    functions = [Accuracy(), Length(16, buffer=8, weight=0.1), Format(r"\d"), Format(r"<.*", weight=2), shout]
    rewards = scored(functions)
    assert rewards.dtype == torch.float32 and rewards.shape == (3, 5)
    want = [[1, 0, 0, 1, 0], [0, -0.5, 0, 1, 0], [1, -1, 1, 0, 0]]
    assert torch.equal(rewards, torch.tensor(want, dtype=torch.float32))
    assert names(functions) == ["accuracy", "length", "format", "format_2", "shout"]
    assert torch.equal(weights(functions), torch.tensor([1.0, 0.1, 1.0, 2.0, 1.0]))
    assert names([Format(name="format_2"), Format(), Format()]) == ["format_2", "format", "format_3"]
    assert names([lambda p, c, **f: [0.0] * len(c)]) == ["lambda"]
    assert scored([]).shape == (3, 0)


def test_score_names_the_function_and_sample_that_raised():
    def picky(prompts, completions, **fields):
        return [1 / (c != "2") for c in completions]  # ZeroDivisionError on the third

    with pytest.raises(RewardError, match=r"'picky' raised on sample 2 \(data/x.jsonl:2\)") as info:
        scored([Format(), picky])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(RewardError, match=r"'accuracy' raised on sample 0 \(data/x.jsonl:0\).*'solution'"):
        scored([Accuracy(answer_field="solution")])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, math.nan, 0.0], r"'bad' returned nan for sample 1 \(data/x.jsonl:1\)"),
        ([1.0, 0.0, math.inf], r"'bad' returned inf for sample 2 \(data/x.jsonl:2\)"),
        ([1.0, None, 0.0], r"'bad' returned None for sample 1 \(data/x.jsonl:1\)"),
        (["1.0", 0.0, 0.0], r"'bad' returned '1.0' for sample 0 \(data/x.jsonl:0\)"),
        ([1.0, 0.0], r"'bad' returned 2 values for 3 completions"),
        (1.0, r"'bad' returned float, not a list of 3 numbers"),
    ],
)
def test_score_rejects_what_is_not_one_finite_number_per_completion(values, message):
    def bad(prompts, completions, **fields):
        return values

    with pytest.raises(RewardError, match=message):
        scored([bad])


def test_score_accepts_numbers_of_any_kind():
    def mixed(prompts, completions, **fields):
        return [True, 2, torch.tensor(0.5)]

    assert scored([mixed])[:, 0].tolist() == [1.0, 2.0, 0.5]


TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny random Llama classifier (num_labels=1) with the bundled tokenizer and a chat template."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reward_model")
    # no pad_token_id in the config: ModelReward must take the tokenizer's to batch
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=32000, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    nn.init.normal_(model.score.weight, std=1.0)  # scores far enough apart to tell rows apart
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def conversations(n: int) -> tuple[list[str], dict[str, list]]:
    completions = [f"answer {i}" + " and more" * (i % 4) for i in range(n)]  # lengths differ: padding
    messages = [[{"role": "user", "content": f"question {i}?"}] for i in range(n)]
    return completions, {"messages": messages, "completion_length": [3] * n}


def direct_scores(path, completions, messages, max_length: int = 10_000) -> list[float]:
    """The model on each rendered conversation alone: no batching, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for completion, conversation in zip(completions, messages, strict=True):
        text = tokenizer.apply_chat_template(
            [*conversation, {"role": "assistant", "content": completion}], tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return out


def test_model_reward_scores_what_the_model_scores_at_any_batch_size(reward_model_dir):
    completions, fields = conversations(7)
    want = direct_scores(reward_model_dir, completions, fields["messages"])
    got = {}
    for batch_size in (2, 8):
        reward = ModelReward(str(reward_model_dir), batch_size=batch_size, device="cpu")
        got[batch_size] = reward([""] * 7, completions, **fields)
        assert got[batch_size] == pytest.approx(want, abs=1e-5)
    assert got[2] == pytest.approx(got[8], abs=1e-5)
    assert len(set(want)) == 7  # the rows differ: a mix-up would show
    assert not isinstance(reward, nn.Module) and reward.model.dtype == torch.float32
    assert not reward.model.training
    assert score([reward], [""] * 7, completions, fields, [f"x:{i}" for i in range(7)])[:, 0].tolist() == (
        pytest.approx(want, abs=1e-5)
    )


def test_model_reward_truncates_from_the_left(reward_model_dir):
    completions, fields = conversations(4)
    reward = ModelReward(str(reward_model_dir), batch_size=4, max_length=5, device="cpu")
    got = reward([""] * 4, completions, **fields)
    assert got == pytest.approx(direct_scores(reward_model_dir, completions, fields["messages"], 5), abs=1e-5)
    assert got != pytest.approx(direct_scores(reward_model_dir, completions, fields["messages"]), abs=1e-3)


def test_model_reward_loads_lazily_and_needs_messages(reward_model_dir):
    reward = ModelReward("/no/such/model", weight=0.5)  # a config naming it parses without loading
    assert reward.model is None and (reward.name, reward.weight) == ("model_reward", 0.5)
    with pytest.raises(ValueError, match="'messages'"):
        ModelReward(str(reward_model_dir))([""], ["x"], completion_length=[1])
