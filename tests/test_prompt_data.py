"""RL prompts from files to batches: the three formats and their errors by file and line, rendering with
the generation prompt, left padding, fields for the reward functions, dropping over-long prompts, the
validation split, stop ids, rank shards and exact resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from distill.data import datamodule
from distill.data.formats import DataFormatError
from distill.data.prompt_datamodule import EncodedPrompt, PromptCollator, PromptDataModule
from distill.data.prompts import PromptRecord, read_prompt_records
from distill.data.resume import ShuffledBatches
from tests.helpers import TOKENIZER_DIR, write_jsonl

LONG = " ".join(f"word{i}" for i in range(60))


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def question(i: int, **extra) -> dict:
    return {"question": f"What is {i} plus {i}?", "answer": str(2 * i), **extra}


def fake_trainer(rank: int, world_size: int, accumulate: int = 1) -> SimpleNamespace:
    """What the data module reads of a Trainer: its rank, and the fit loop's progress (none yet)."""
    progress = SimpleNamespace(current=SimpleNamespace(completed=0, ready=0))
    loop = SimpleNamespace(epoch_progress=progress, epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(
        global_rank=rank, world_size=world_size, fit_loop=loop, accumulate_grad_batches=accumulate
    )


@pytest.fixture(autouse=True)
def _session_tokenizers(monkeypatch, tokenizer, chat_tokenizer, chat_tokenizer_dir):
    """The data modules share the session's tokenizers: loading one is most of their setup time."""
    loaded = {str(TOKENIZER_DIR): tokenizer, str(chat_tokenizer_dir): chat_tokenizer}
    monkeypatch.setattr(datamodule, "load_tokenizer", loaded.__getitem__)


def data(train: Path, **options) -> PromptDataModule:
    settings = {"train_files": str(train), "tokenizer": str(TOKENIZER_DIR), "template": "mistral", **options}
    dm = PromptDataModule(**settings)
    dm.setup("fit")
    return dm


# ---- reading --------------------------------------------------------------------------------------


def test_question_records_keep_every_other_key_as_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl",
        [question(1, solution="1+1=2"), {"question": "Hi?", "answer": [1, 2], "system": "Be brief."}],
    )
    first, second = read_prompt_records(path, "question")
    assert first.source == f"{path}:1" and second.source == f"{path}:2"
    assert first.messages == (u("What is 1 plus 1?"),)
    assert first.fields == {"answer": "2", "solution": "1+1=2"}
    assert second.messages == ({"role": "system", "content": "Be brief."}, u("Hi?"))
    assert second.fields == {"answer": [1, 2]}  # the system turn is part of the prompt, not a field


def test_messages_and_sharegpt_records_allow_earlier_assistant_turns(tmp_path):
    turns = [{"role": "system", "content": "S"}, u("Q1"), a("A1"), u("Q2")]
    sharegpt = [
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
    ]
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": turns, "answer": 4}, {"conversations": sharegpt, "id": "x"}],
    )
    first, second = read_prompt_records(path, "messages")
    assert first.messages == tuple(turns) and first.fields == {"answer": 4}
    assert second.messages == (u("Q1"), a("A1"), u("Q2")) and second.fields == {"id": "x"}


def test_prompt_records_as_a_string_or_a_conversation(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Say hi.", "solution": "hi"}, {"prompt": [u("Q1"), a("A1"), u("Q2")], "answer": None}],
    )
    first, second = read_prompt_records(path, "prompt")
    assert first.messages == (u("Say hi."),) and first.fields == {"solution": "hi"}
    assert second.messages == (u("Q1"), a("A1"), u("Q2")) and second.fields == {"answer": None}


def test_auto_detects_the_format_per_record(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            question(3),
            {"messages": [u("M")], "k": 1},
            {"conversations": [{"from": "human", "value": "C"}]},
            {"prompt": "P"},
        ],
    )
    records = read_prompt_records(path)
    assert [r.messages for r in records] == [(u("What is 3 plus 3?"),), (u("M"),), (u("C"),), (u("P"),)]
    assert [r.fields for r in records] == [{"answer": "6"}, {"k": 1}, {}, {}]
    # a JSON array file and a directory read the same
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.json").write_text(json.dumps([question(3)]))
    (record,) = read_prompt_records(tmp_path / "dir")
    assert record.source == f"{tmp_path / 'dir' / 'a.json'}[0]" and record.fields == {"answer": "6"}


def test_sha_is_of_the_content_and_fields_alone(tmp_path):
    first, moved, other = read_prompt_records(
        write_jsonl(tmp_path / "s.jsonl", [question(1), question(1), question(1, answer="3")])
    )
    assert first.source != moved.source and first.sha == moved.sha
    assert first.sha != other.sha and len(first.sha) == 64
    assert (
        PromptRecord("x:1", (u("Q"),), {"b": 1, "a": 2}).sha
        == PromptRecord("y:9", (u("Q"),), {"a": 2, "b": 1}).sha
    )


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"question": "  "}, "auto", "empty 'question'"),
        ({"prompt": ""}, "auto", "empty 'prompt'"),
        ({"question": 3}, "auto", "field 'question' must be a string, got int"),
        ({"messages": [{"role": "user", "content": 5}]}, "auto", "'content' must be a string or a list"),
        ({"conversations": [{"from": "human", "value": None}]}, "auto", "missing a string 'value'"),
        (
            {"messages": [u("Q"), a("A")]},
            "auto",
            "the last turn is 'assistant': a prompt must end with a user turn",
        ),
        (
            {"messages": [u("Q"), {"role": "system", "content": "S"}, u("R")]},
            "auto",
            "system message must come",
        ),
        ({"messages": []}, "auto", "'messages' must be a non-empty list"),
        ({"text": "hello", "id": 1}, "auto", "unknown prompt record format with keys ['id', 'text']"),
        ({"prompt": "P", "question": "Q"}, "auto", "several prompt keys"),
        ({"prompt": "P"}, "question", "missing field 'question'"),
        ({"question": "Q", "stopped": False}, "auto", "['stopped'] are reserved"),
        ({"question": "Q", "completion_length": 3}, "question", "['completion_length'] are reserved"),
        ([1, 2], "auto", "expected a JSON object, got list"),
    ],
)
def test_bad_records_are_named_by_file_and_line(tmp_path, row, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [question(0), row])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: ")) as err:
        read_prompt_records(path, fmt)
    assert message in str(err.value)


def test_no_records_at_all_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{empty}: no prompt records")):
        read_prompt_records(empty)
    with pytest.raises(DataFormatError, match="no prompt files given"):
        read_prompt_records([])


# ---- collating ------------------------------------------------------------------------------------


def test_collator_left_pads_and_fills_missing_fields_with_none():
    prompts = [
        EncodedPrompt([5, 6, 7], "abc", (u("a"),), {"answer": "1"}, "f:1", "s1"),
        EncodedPrompt([8], "d", (u("b"),), {"solution": "x"}, "f:2", "s2"),
    ]
    batch = PromptCollator(pad_id=0)(prompts)
    assert batch.prompt_ids.dtype == torch.long and batch.prompt_mask.dtype == torch.long
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.fields == {"answer": ["1", None], "solution": [None, "x"]}
    assert batch.prompts == ["abc", "d"] and batch.sources == ["f:1", "f:2"]
    assert batch.shas == ["s1", "s2"]
    assert batch.messages == [[u("a")], [u("b")]]


# ---- the data module ------------------------------------------------------------------------------


def test_batches_hold_the_rendered_prompts_left_padded(tmp_path, tokenizer):
    rows = [
        question(1),
        {"messages": [u("Hi"), a("Hello."), u("What is a very long question here?")], "id": 7},
    ]
    dm = data(write_jsonl(tmp_path / "train.jsonl", rows), batch_size=2)
    (batch,) = list(dm.train_dataloader())
    by_source = {source: row for row, source in enumerate(batch.sources)}
    short, long = by_source[f"{tmp_path / 'train.jsonl'}:1"], by_source[f"{tmp_path / 'train.jsonl'}:2"]
    texts = batch.prompts
    assert texts[short] == "<s>[INST] What is 1 plus 1? [/INST]"
    assert texts[long] == "<s>[INST] Hi [/INST] Hello.</s>[INST] What is a very long question here? [/INST]"
    ids, mask = batch.prompt_ids, batch.prompt_mask
    width = ids.shape[1]
    for row in (short, long):
        expected = tokenizer(texts[row], add_special_tokens=False)["input_ids"]
        pad = width - len(expected)
        assert ids[row].tolist() == [0] * pad + expected  # <unk> (id 0) is the pad token
        assert mask[row].tolist() == [0] * pad + [1] * len(expected)
        assert expected[0] == tokenizer.bos_token_id and expected.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids[row][mask[row] == 1]) == texts[row]
    assert width == mask[long].sum() > mask[short].sum()
    assert batch.fields["answer"][short] == "2" and batch.fields["answer"][long] is None
    assert batch.fields["id"] == [7 if row == long else None for row in range(2)]
    assert dm.generation_stop_ids == [tokenizer.eos_token_id]  # mistral ends turns with the EOS


def test_chatml_prompts_end_with_the_generation_prompt(tmp_path, chat_tokenizer, chat_tokenizer_dir):
    path = write_jsonl(tmp_path / "train.jsonl", [question(i, system="Be brief.") for i in range(3)])
    dm = data(
        path,
        tokenizer=str(chat_tokenizer_dir),
        template="chatml",
        add_eot_to_stop_tokens=True,
        stop_tokens=["<|eot_id|>"],
    )
    for prompt in dm.train:
        assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is ")
        assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert chat_tokenizer.decode(prompt.input_ids) == prompt.text
    im_end, eot = chat_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    assert dm.stop_token_ids == [chat_tokenizer.eos_token_id, eot, im_end]
    assert dm.generation_stop_ids == [im_end, chat_tokenizer.eos_token_id, eot]


def test_an_end_of_turn_of_several_tokens_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [question(1)])
    dm = PromptDataModule(str(path), tokenizer=str(TOKENIZER_DIR), template="chatml")
    with pytest.raises(ValueError, match="is not one token"):
        dm.generation_stop_ids  # noqa: B018


def test_too_long_prompts_are_dropped_counted_and_warned_once(tmp_path):
    rows = [question(0), {"question": LONG}, question(2), {"question": LONG + " again"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.warns(UserWarning) as caught:
        dm = data(path, max_prompt_length=32)
    warned = [str(w.message) for w in caught if "max_prompt_length" in str(w.message)]
    assert len(warned) == 1
    assert "dropped 2 training and 0 validation prompts" in warned[0] and f"{path}:2" in warned[0]
    assert [p.source for p in dm.train] == [f"{path}:1", f"{path}:3"]
    assert all(len(p.input_ids) <= 32 for p in dm.train)
    assert dm.stats == {
        "data/train_prompts": 2,
        "data/train_dropped_too_long": 2,
        "data/val_prompts": 0,
        "data/val_dropped_too_long": 0,
    }
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"question": LONG}])
    with pytest.raises(ValueError, match=re.escape(f"({only_long}): all 1 were longer")):
        data(only_long, max_prompt_length=32)


def test_val_fraction_split_is_disjoint_and_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [question(i) for i in range(20)])
    first = data(path, val_fraction=0.25, seed=3)
    again = data(path, val_fraction=0.25, seed=3)
    other = data(path, val_fraction=0.25, seed=4)
    train, val = {p.source for p in first.train}, {p.source for p in first.val}
    assert len(train) == 15 and len(val) == 5 and train.isdisjoint(val)
    assert train | val == {f"{path}:{line}" for line in range(1, 21)}
    assert [p.source for p in again.val] == [p.source for p in first.val]
    assert {p.source for p in other.val} != val
    assert first.stats["data/val_prompts"] == 5
    batches = list(first.val_dataloader())
    assert [len(b.sources) for b in batches] == [2, 3]  # near-equal batches of at most 4
    assert [s for b in batches for s in b.sources] == [p.source for p in first.val]
    capped = data(path, val_fraction=0.25, seed=3, max_train_samples=4, max_eval_samples=2)
    assert [p.source for p in capped.train] == [p.source for p in first.train][:4]
    assert [p.source for p in capped.val] == [p.source for p in first.val][:2]


def test_two_ranks_get_disjoint_equal_shares(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [question(i) for i in range(11)])
    shares = []
    for rank in (0, 1):
        dm = data(path, batch_size=2)
        dm.trainer = fake_trainer(rank, 2)
        batches = list(dm.train_dataloader())
        assert [len(b.shas) for b in batches] == [2, 2, 1]  # 5 prompts each: 11 // 2
        shares.append([s for b in batches for s in b.sources])
    assert set(shares[0]).isdisjoint(shares[1]) and len(set(shares[0] + shares[1])) == 10


def test_a_resumed_loader_continues_after_the_trained_batches(tmp_path):
    dm = data(write_jsonl(tmp_path / "train.jsonl", [question(i) for i in range(9)]), batch_size=2)
    loader = dm.train_dataloader()
    full = [b.sources for b in loader]
    assert len(full) == 5 and sorted(s for b in full for s in b) == sorted(p.source for p in dm.train)
    for k in (1, 4):
        loader.load_state_dict({"epoch": 0, "batches": k})
        assert [b.sources for b in loader] == full[k:]
    assert [b.sources for b in loader] == full  # the resume applies to one epoch only
    # another epoch is another order, the same on every run
    stream = ShuffledBatches(dm.train, dm.collator, 2, dm.seed)
    stream.epoch = 1
    assert [b.sources for b in stream] != full
    assert [b.sources for b in stream] == [b.sources for b in stream]


def test_num_iterations_repeats_each_whole_optimizer_steps_batches_in_a_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [question(i) for i in range(10)])
    once = [b.shas for b in data(path, batch_size=2).train_dataloader()]  # 5 batches
    dm = data(path, batch_size=2, num_iterations=3)
    dm.trainer = fake_trainer(0, 1, accumulate=2)
    loader = dm.train_dataloader()
    steps = [once[0:2], once[2:4]]  # the fifth batch would make a short last step: it waits for an epoch
    batches = list(loader)
    assert [b.shas for b in batches] == [b for step in steps for _ in range(3) for b in step]
    assert [(b.window, b.iteration, b.iterations) for b in batches] == [
        (w, i, 3) for w in (0, 1) for i in range(3) for _ in range(2)
    ]
    assert len(loader) == 12
    loader.load_state_dict({"epoch": 0, "batches": 7})  # resumes inside the second step's repeats
    assert [b.shas for b in loader] == [once[3], once[2], once[3], once[2], once[3]]
    with pytest.raises(ValueError, match=r"data\.num_iterations must be >= 1, got 0"):
        data(path, num_iterations=0)
    dm = data(path, batch_size=4, num_iterations=2)
    dm.trainer = fake_trainer(0, 1, accumulate=4)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=4 batches of data.batch_size=4 prompts"):
        dm.train_dataloader()  # 10 prompts: not one whole step of 16


class StepRecorder(L.LightningModule):
    """The prompts each optimizer step of a real fit trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps: list[list[str]] = [[]]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.steps[-1].extend(batch.shas)
        return self.weight.sum() * 0.0

    def on_before_optimizer_step(self, optimizer) -> None:
        self.steps.append([])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_no_optimizer_step_of_a_fit_holds_a_prompt_twice(tmp_path):
    # 3 batches per epoch, 2 per step, 2 iterations: Lightning steps after every 2 batches and at an
    # epoch's end, so a repeated short last window [b2] would be one step [b2, b2]
    dm = data(write_jsonl(tmp_path / "train.jsonl", [question(i) for i in range(6)]), batch_size=2,
              num_iterations=2)  # fmt: skip
    module = StepRecorder()
    trainer = L.Trainer(
        max_epochs=2, accumulate_grad_batches=2, accelerator="cpu", logger=False, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    steps = module.steps[:-1]
    assert [len(step) - len(set(step)) for step in steps] == [0] * len(steps)  # no prompt twice in one update
    assert len(steps) == 4 and all(len(step) == 4 for step in steps)  # 2 windows x 2 iterations
    assert steps[0] == steps[1] and steps[2] == steps[3]  # each window's iterations, one step each
