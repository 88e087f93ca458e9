"""Data the run can trust: every epoch yields the batches it announced, chunked KD stays within its disk
budget, validation under DDP sees each sample once, and today's chat formats (content parts, tool turns,
a byte-order mark) read and mask correctly."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from lightning.pytorch.utilities.data import has_iterable_dataset
from torch.utils.data import DataLoader, DistributedSampler

from distill.cli import main, run_cli
from distill.data.datamodule import DataModule
from distill.data.encoding import IGNORE_INDEX, encode_record
from distill.data.formats import TOOLS_HEADER, DataFormatError, read_records, to_record
from distill.data.templates import TOOL_PREFIX, resolve_template
from distill.teacher.targets import TeacherTargets
from tests.helpers import TOKENIZER_DIR, conversation, kd_config, write_jsonl

# ---- 14: each epoch yields the length Lightning read before the first epoch -------------------------

BUDGET_GB = 4.5e-5  # 45 kB: the validation cache and three or more chunks of the 16 training samples
CHUNKED = {"n": 16, "cache_size_gb": BUDGET_GB, "batch_size": 2}


def epoch_lengths(loader, epochs: int) -> list[int]:
    counts = []
    for epoch in range(epochs):
        loader.progress = lambda epoch=epoch: (epoch, 0)
        counts.append(sum(1 for _ in loader))
    return counts


@pytest.mark.parametrize(
    "extra",
    # packed: the epochs' plans used to give 35, 34, 35 batches; chunked ones varied likewise
    [{"n": 48, "packing": True, "batch_size": 1}, CHUNKED],
    ids=["packed", "chunked"],
)
def test_every_kd_epoch_yields_the_announced_number_of_batches(tmp_path, kd_teacher_dir, extra):
    config = kd_config(tmp_path, kd_teacher_dir, max_seq_length=160, **extra)
    data = run_cli(["--config", str(config)], run=False).datamodule
    data.setup("fit")
    assert data.collector.chunked == ("cache_size_gb" in extra)
    loader = data.train_dataloader()
    announced = len(loader)  # Lightning reads it once, before epoch 0
    assert data.collector.plan(0) != data.collector.plan(1)  # the epochs do differ in order
    assert epoch_lengths(loader, 3) == [announced] * 3


def test_every_packed_epoch_of_the_data_module_yields_the_announced_number_of_batches(tmp_path):
    rows = [conversation(i, turns=1 + i % 3) for i in range(40)]
    data = DataModule(
        train_files=str(write_jsonl(tmp_path / "train.jsonl", rows)),
        tokenizer=str(TOKENIZER_DIR),
        template="mistral",
        max_seq_length=160,
        packing=True,
        batch_size=3,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    assert epoch_lengths(loader, 4) == [len(loader)] * 4


def test_chunked_kd_over_three_epochs_stays_within_the_budget_and_purges_a_chunk_cut_short(
    tmp_path, kd_teacher_dir, monkeypatch
):
    config = kd_config(tmp_path, kd_teacher_dir, max_seq_length=160, **CHUNKED)
    data = run_cli(["--config", str(config)], run=False).datamodule
    data.setup("fit")
    per_epoch = len(data.train_dataloader())
    assert data.collector.chunked and len(data.collector.plan(0)) >= 3
    data.teardown("fit")  # releases train-chunks/ for the fit below
    sizes: list[int] = []
    original = TeacherTargets.prepare_chunk

    def prepare_and_measure(self, samples):  # disk use at its peak: a chunk just collected
        reader = original(self, samples)
        sizes.append(sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file()))
        return reader

    monkeypatch.setattr(TeacherTargets, "prepare_chunk", prepare_and_measure)
    steps = 2 * per_epoch + 3  # into the third epoch, in the middle of its first chunk
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            str(steps),
            "--trainer.limit_val_batches",
            "0",
        ]
    )
    assert len(sizes) > 2 * len(data.collector.plan(0)), sizes  # every chunk of two epochs, then the third's
    assert max(sizes) <= BUDGET_GB * 1e9, sizes
    assert not list((tmp_path / "cache" / "train-chunks").rglob("*.h5"))  # the cut chunk was purged


# ---- 15: validation shards without repeating a sample -----------------------------------------------


def as_lightning_prepares(loader, rank: int, world: int):
    """What Lightning's data connector does to a validation loader under DDP: a map-style loader gets a
    ``DistributedSampler`` (which pads by repeating samples); an iterable one is left as it is."""
    if has_iterable_dataset(loader):
        return loader
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, sampler=sampler
    )


def on_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(DataModule, "_rank", property(lambda self: rank))
    monkeypatch.setattr(DataModule, "_world_size", property(lambda self: world))


def test_an_empty_validation_file_given_is_an_error_naming_it(tmp_path):
    """Not a run that validates nothing without a word (issue 25 #8)."""
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(4)])
    val = tmp_path / "val.jsonl"
    val.write_text("\n  \n")
    data = DataModule(
        train_files=str(train),
        val_files=str(val),
        tokenizer=str(TOKENIZER_DIR),
        template="mistral",
        tokenized_cache=str(tmp_path / "tokenized"),
    )
    with pytest.raises(
        DataFormatError, match=rf"^data\.val_files \({re.escape(str(val))}\) holds no records"
    ):
        data.setup("fit")


def validated_rows(batch) -> list[tuple[int, ...]]:
    return [
        tuple(ids[mask.bool()].tolist())
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
    ]


@pytest.mark.parametrize("world", [2, 3])
def test_validation_under_ddp_sees_every_sample_exactly_once(tmp_path, monkeypatch, world):
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(4)])
    val = write_jsonl(tmp_path / "val.jsonl", [conversation(100 + i, turns=1 + i % 2) for i in range(7)])
    data = DataModule(
        train_files=str(train),
        val_files=str(val),
        tokenizer=str(TOKENIZER_DIR),
        template="mistral",
        batch_size=2,
    )
    data.setup("fit")
    seen, steps = Counter(), []
    for rank in range(world):
        on_rank(monkeypatch, rank, world)
        loader = as_lightning_prepares(data.val_dataloader(), rank, world)
        batches = list(loader)
        steps.append(len(batches))
        assert len(loader) == len(batches)
        seen.update(sha for batch in batches for sha in batch.shas)
    assert seen == Counter(s.sha for s in data.val)  # each of the 7 once, none twice
    assert len(set(steps)) == 1  # every rank the same number of forwards (sharded models gather in each)


@pytest.mark.parametrize("world", [2, 3])
def test_kd_validation_under_ddp_sees_every_sample_exactly_once(tmp_path, kd_teacher_dir, monkeypatch, world):
    config = kd_config(tmp_path, kd_teacher_dir, n=8, max_eval_samples=5)
    data = run_cli(["--config", str(config)], run=False).datamodule
    data.setup("fit")
    by_ids = {tuple(s.input_ids): s.sha for s in data.val}
    seen = Counter()
    for rank in range(world):
        on_rank(monkeypatch, rank, world)
        for batch in as_lightning_prepares(data.val_dataloader(), rank, world):
            seen.update(by_ids[row] for row in validated_rows(batch))
    assert seen == Counter(by_ids.values()) and len(seen) == 5


# ---- 17: formats users bring today -----------------------------------------------------------------

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
OPENAI_TOOL_USE = {
    "messages": [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is sunny in Paris."}]},
    ]
}
SHAREGPT_TOOL_USE = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": "sunny, 21 C"},
        {"from": "gpt", "value": "It is sunny in Paris."},
    ]
}
EXPECTED_TOOL_USE = (
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": json.dumps(CALL)},
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."},
)


def test_openai_parts_and_tool_turns_and_sharegpt_function_turns_read_alike(tmp_path):
    openai, sharegpt = read_records(
        write_jsonl(tmp_path / "tools.jsonl", [OPENAI_TOOL_USE, SHAREGPT_TOOL_USE])
    )
    assert openai.messages == EXPECTED_TOOL_USE == sharegpt.messages
    assert openai.sha == sharegpt.sha  # one sample, whichever format it came in


def test_several_tool_calls_and_text_beside_them(tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    row = {
        "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call, call]},
            {"role": "function", "name": "f", "content": "1"},
            {"role": "assistant", "content": "A"},
        ]
    }
    (record,) = read_records(write_jsonl(tmp_path / "calls.jsonl", [row]))
    both = json.dumps([{"name": "f", "arguments": {}}] * 2)
    assert record.messages[1] == {"role": "assistant", "content": f"Checking.\n{both}"}
    assert record.messages[2] == {"role": "tool", "content": "1"}


def test_declared_tools_open_the_system_message_in_either_format(tmp_path):
    schema = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    openai = {**OPENAI_TOOL_USE, "tools": schema}
    sharegpt = {**SHAREGPT_TOOL_USE, "tools": json.dumps(schema)}
    sharegpt["conversations"] = [
        {"from": "system", "value": "Be brief."},
        *SHAREGPT_TOOL_USE["conversations"],
    ]
    a, b = read_records(write_jsonl(tmp_path / "tools.jsonl", [openai, sharegpt]))
    declared = TOOLS_HEADER + json.dumps(schema)
    assert a.messages[0] == {"role": "system", "content": declared}
    assert b.messages[0] == {"role": "system", "content": f"{declared}\n\nBe brief."}
    assert a.messages[1:] == EXPECTED_TOOL_USE == b.messages[1:]


def test_a_non_text_content_part_is_an_error_naming_file_and_line(tmp_path):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    rows = [
        conversation(0),
        {"messages": [{"role": "user", "content": [image]}, {"role": "assistant", "content": "A"}]},
    ]
    path = write_jsonl(tmp_path / "images.jsonl", rows)
    with pytest.raises(DataFormatError, match=rf"{path}:2: turn 0, content part 0 is of type 'image_url'"):
        read_records(path)


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_file_starting_with_a_byte_order_mark_reads(tmp_path, suffix):
    rows = [conversation(0), conversation(1)]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == "jsonl" else json.dumps(rows)
    path = tmp_path / f"bom.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    records = read_records(path)
    assert [r.messages for r in records] == [to_record(r, "x").messages for r in rows]


def trained_runs(sample, tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current).strip())
            current = []
    return runs + ([tokenizer.decode(current).strip()] if current else [])


@pytest.mark.parametrize(
    ("name", "tool_turn"),
    [
        ("chatml", "<|im_start|>tool\nsunny, 21 C"),
        ("llama3", "<|start_header_id|>ipython<|end_header_id|>\n\nsunny, 21 C"),
        ("alpaca", f"### Instruction:\n{TOOL_PREFIX}sunny, 21 C"),
        ("mistral", f"[INST] {TOOL_PREFIX}sunny, 21 C [/INST]"),
    ],
)
def test_tool_output_is_shown_but_masked_and_the_call_is_trained(chat_tokenizer, name, tool_turn):
    template = resolve_template(chat_tokenizer, name)
    record = to_record(SHAREGPT_TOOL_USE, "tools.jsonl:1")
    text, _ = template.render_with_spans(chat_tokenizer, list(record.messages))
    assert tool_turn in text
    sample = encode_record(record, chat_tokenizer, template)
    eot = template.end_of_turn
    assert trained_runs(sample, chat_tokenizer) == [f"{json.dumps(CALL)}{eot}", f"It is sunny in Paris.{eot}"]


def test_a_template_that_drops_tool_turns_gets_them_as_user_turns(chat_tokenizer):
    drops_tools = (
        "{% for m in messages %}{% if m.role == 'user' %}U: {{ m.content }}\n"
        "{% elif m.role == 'assistant' %}A: {{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    template = resolve_template(chat_tokenizer, drops_tools)
    sample = encode_record(to_record(SHAREGPT_TOOL_USE, "t:1"), chat_tokenizer, template)
    text = chat_tokenizer.decode(sample.input_ids)
    assert f"U: {TOOL_PREFIX}sunny, 21 C" in text
    eot = template.end_of_turn
    assert trained_runs(sample, chat_tokenizer) == [f"{json.dumps(CALL)}{eot}", f"It is sunny in Paris.{eot}"]
