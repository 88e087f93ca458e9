"""PromptDataModule: prompt files -> prompts rendered with the generation prompt, tokenized -> left-padded
batches of prompts for RL (GRPO, RLOO) and on-policy distillation, each prompt later the seed of a group
of completions. With ``responses``, SFT files give each prompt its dataset response too (tokenized as
SFT trains on it), which on-policy distillation uses on the batches the student does not sample.

Prompts are short and generation dominates an RL step, so they are encoded once in ``setup`` and kept in
memory (no tokenized-data cache). Training batches resume at the exact next batch like SFT's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from distill.data.batch import PromptBatch
from distill.data.datamodule import DataModule
from distill.data.encoding import IGNORE_INDEX, encode_messages
from distill.data.facts import DataFacts
from distill.data.formats import DataFormatError, Source
from distill.data.prompts import PromptFormat, PromptRecord, read_prompt_records, read_response_records
from distill.data.resume import Part, ShuffledBatches
from distill.ranges import require


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt rendered with the generation prompt, its token ids, and its record's fields."""

    input_ids: list[int]
    text: str
    messages: tuple[dict[str, str], ...]
    fields: dict[str, Any]
    source: str
    sha: str
    response_ids: list[int] | None = None  # the dataset's response, its end-of-turn included


def padded(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """(B, L) token ids padded with ``pad_id`` (on the left: every sequence ends at the last column,
    where generation starts) and the (B, L) bool mask of the tokens."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        mask[row, columns] = True
    return ids, mask


class PromptCollator:
    """Left-pads prompts into a batch, so every prompt ends at the last column, where generation starts;
    the dataset's responses, where there are, right-padded beside them."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, prompts: Sequence[EncodedPrompt]) -> PromptBatch:
        prompt_ids, prompt_mask = padded([p.input_ids for p in prompts], self.pad_id, left=True)
        keys = dict.fromkeys(key for p in prompts for key in p.fields)  # first-seen order
        response_ids = response_mask = None
        if prompts[0].response_ids is not None:
            response_ids, response_mask = padded([p.response_ids for p in prompts], self.pad_id)
        return PromptBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask.long(),
            prompts=[p.text for p in prompts],
            messages=[list(p.messages) for p in prompts],
            fields={key: [p.fields.get(key) for p in prompts] for key in keys},
            sources=[p.source for p in prompts],
            shas=[p.sha for p in prompts],
            response_ids=response_ids,
            response_mask=response_mask,
        )


class RepeatedSteps(ShuffledBatches):
    """``ShuffledBatches`` whose every ``window`` batches (one optimizer step's) come ``repeats`` times in a
    row: GRPO's ``num_iterations`` updates on one rollout. Each batch says where it stands: ``window``
    (its window's index, counted over the epochs), ``iteration`` (0 .. ``repeats`` - 1) and
    ``iterations``; the first iteration samples the rollout and the others reuse it.

    Lightning ends an optimizer step after every ``window`` batches of an epoch and at the epoch's last
    batch. A last window shorter than ``window`` would therefore hold all its iterations in one step: one
    update, each prompt counted ``repeats`` times. With repeats, only whole windows are trained: the
    batches after an epoch's last whole window are left out of that epoch (as TRL's ``RepeatSampler``
    leaves out a partial generation batch), and the next epoch's order trains them.
    """

    def __init__(self, *args: Any, repeats: int = 1, window: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.repeats = repeats
        self.window = window

    @property
    def kept(self) -> int:
        """Batches of the epoch's order that are trained: all, or with repeats those of whole windows."""
        once = super().__len__()
        return once if self.repeats == 1 else once // self.window * self.window

    def windows(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer-step windows of batches (row indices), each trained ``repeats`` times."""
        once = super().batches(epoch)
        return [once[start : start + self.window] for start in range(0, self.kept, self.window)]

    def schedule(self, epoch: int) -> list[tuple[list[int], dict[str, int]]]:
        """Every batch of the epoch in order, with where it stands in its window's iterations."""
        windows = self.windows(epoch)
        return [
            (batch, {"window": epoch * len(windows) + w, "iteration": i, "iterations": self.repeats})
            for w, step in enumerate(windows)
            for i in range(self.repeats)
            for batch in step
        ]

    def parts(self, epoch: int) -> list[Part]:
        schedule = self.schedule(epoch)

        def build(number: int) -> PromptBatch:
            batch, where = schedule[number]
            return replace(self.collate([self.rows[i] for i in batch]), **where)

        return [Part(len(schedule), lambda: nullcontext(build))]

    def __len__(self) -> int:
        return self.kept * self.repeats


def check_whole_windows(batches: RepeatedSteps) -> None:
    """Refuse an epoch too short for one whole optimizer step; say what each epoch leaves out."""
    if not batches.kept:
        raise ValueError(
            f"data.num_iterations {batches.repeats} trains whole optimizer steps of trainer."
            f"accumulate_grad_batches={batches.window} batches of data.batch_size={batches.batch_size} "
            f"prompts, but each rank has {batches.rows_per_rank} prompt(s) per epoch: lower "
            "accumulate_grad_batches or batch_size, or add prompts"
        )
    left = batches.rows_per_rank - batches.kept * batches.batch_size
    if left > 0:
        rank_zero_info(
            f"[distill] num_iterations {batches.repeats}: each epoch trains whole optimizer steps of "
            f"{batches.window} batches; the last {left} prompt(s) per rank of each epoch's order wait "
            "for a later epoch's order"
        )


SAMPLE_OPTIONS = (
    "max_seq_length", "truncation", "packing", "streaming", "train_on_responses_only", "num_proc",
    "tokenized_cache",
)  # fmt: skip


class PromptDataModule(DataModule):
    """``DataModule``'s files, splits, caps and chat template, read as prompts to sample from."""

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        format: PromptFormat = "auto",
        max_prompt_length: int = 512,
        responses: bool = False,
        max_response_length: int = 1024,
        num_iterations: int = 1,
        batch_size: int = 4,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            train_files: JSON/JSONL, parquet, arrow or csv files or directories of them (``question``,
                ``messages``/ShareGPT or TRL ``prompt`` records); every key besides the prompt is kept for
                the reward functions.
            format: Record format (``question``, ``messages``, ``prompt``), or ``auto`` to detect it per
                record.
            max_prompt_length: Prompts longer than this many tokens (rendered, with the generation prompt)
                are dropped and counted.
            responses: Read SFT files (any format of ``distill.data.formats``) whose last turn is the
                assistant's response: the turns before it are the prompt, the response is kept as SFT
                tokenizes it (on-policy distillation trains on it when the student does not sample).
            max_response_length: With ``responses``, records whose response is longer than this many
                tokens are dropped and counted.
            num_iterations: Times each optimizer step's prompt batches come in a row (GRPO's
                ``num_iterations``: the repeats train again on the stored rollout). Above 1, an epoch
                trains whole steps only: the prompts after its last whole step wait for the next
                epoch's order, so that no step holds a prompt twice.
            batch_size: Prompts per device per step; each becomes a group of completions.
            **kwargs: ``DataModule``'s sources, caps, template and loader options (``val_files``,
                ``dataset_name``, ``template``, ``max_eval_samples``, ``seed``, ...). Its options that shape
                samples (``max_seq_length``, ``packing``, ...) do not apply to prompts and are refused.
        """
        defaults = inspect.signature(DataModule.__init__).parameters
        shaping = [
            key for key in SAMPLE_OPTIONS if kwargs.get(key, defaults[key].default) != defaults[key].default
        ]
        if shaping:
            raise ValueError(
                f"data.{shaping[0]} shapes training samples, not prompts: PromptDataModule renders each "
                "prompt whole (bounded by max_prompt_length); drop it"
            )
        require("data.max_prompt_length", max_prompt_length, at_least=1)
        require("data.max_response_length", max_response_length, at_least=1)
        require("data.num_iterations", num_iterations, at_least=1)
        if responses and format != "auto":
            raise ValueError("data.responses reads SFT files, whose format is detected per record: drop it")
        super().__init__(train_files=train_files, format=format, batch_size=batch_size, **kwargs)
        self.max_prompt_length = max_prompt_length
        self.responses = responses
        self.max_response_length = max_response_length
        self.num_iterations = num_iterations
        self.train: list[EncodedPrompt] = []
        self.val: list[EncodedPrompt] = []

    def facts(self) -> DataFacts:
        """What the objective sampling from these prompts is told (once set up)."""
        return DataFacts(
            type(self).__name__,
            "prompts",
            self.pad_id,
            self.resolve_chat_template(),
            stop_ids=tuple(self.generation_stop_ids),
            responses=self.responses,
            num_iterations=self.num_iterations,
        )

    @property
    def generation_stop_ids(self) -> list[int]:
        """The ids generation stops on: the template's end-of-turn, the EOS, then the stop tokens."""
        template = self.resolve_chat_template()
        # one token: resolving the template raised a TemplateError (a ValueError) otherwise
        (end_of_turn,) = self.tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]
        stop = [end_of_turn, self.tokenizer.eos_token_id, *self.stop_token_ids]
        return [i for i in dict.fromkeys(stop) if i is not None]

    def read_files(self, files: list[Source]) -> list[PromptRecord]:
        return read_response_records(files) if self.responses else read_prompt_records(files, self.format)

    def prepare_data(self) -> None:
        """Nothing: prompts are short and encoded in ``setup`` (no tokenized-data cache)."""

    def encode(self, records: list[PromptRecord]) -> tuple[list[EncodedPrompt], list[str]]:
        """The records rendered with the generation prompt and tokenized; the sources of those too long."""
        template = self.resolve_chat_template()
        texts = [template.render(self.tokenizer, list(r.messages), generation_prompt=True) for r in records]
        # the template renders the BOS itself
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        kept, dropped = [], []
        for record, text, input_ids in zip(records, texts, ids, strict=True):
            response = self.encode_response(record, input_ids, text) if self.responses else None
            too_long = response is not None and len(response) > self.max_response_length
            if len(input_ids) > self.max_prompt_length or too_long:
                dropped.append(record.source)
            else:
                kept.append(
                    EncodedPrompt(
                        input_ids, text, record.messages, record.fields, record.source, record.sha, response
                    )
                )
        return kept, dropped

    def encode_response(self, record: PromptRecord, prompt_ids: list[int], prompt_text: str) -> list[int]:
        """The tokens SFT trains on in the record's response: the conversation with its response is
        rendered and masked as SFT does it, and what follows the prompt's tokens is the response."""
        messages = [*record.messages, {"role": "assistant", "content": record.response}]
        template = self.resolve_chat_template()
        ids, labels = encode_messages(
            messages, self.tokenizer, template, record.source, trained_from=len(prompt_text)
        )
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        if ids[: len(prompt_ids)] != prompt_ids or not trained or trained[0] != len(prompt_ids):
            raise DataFormatError(
                f"{record.source}: under template {template.name!r} the response does not start where the "
                "prompt with its generation prompt ends (the rendered prompt tokenizes differently once the "
                "response follows): sampled and dataset responses would not be read alike"
            )
        return ids[trained[0] : trained[-1] + 1]

    def setup(self, stage: str) -> None:
        if self._set_up:
            return
        train_records, val_records = self.load_records()
        self.train, train_dropped = self.encode(train_records)
        self.val, val_dropped = self.encode(val_records)
        dropped = train_dropped + val_dropped
        if dropped:
            rank_zero_warn(
                f"dropped {len(train_dropped)} training and {len(val_dropped)} validation prompts longer "
                f"than max_prompt_length={self.max_prompt_length} tokens"
                + (f" or with responses longer than {self.max_response_length}" if self.responses else "")
                + f" (first: {dropped[0]})"
            )
        if not self.train:
            files = ", ".join(map(str, self.train_sources))
            why = (
                f"all {len(train_records)} were longer than max_prompt_length={self.max_prompt_length}"
                if train_records
                else f"val_fraction / max_train_samples (now {self.val_fraction} / "
                f"{self.max_train_samples}) left none"
            )
            option = "train_files" if self.dataset_name is None else "dataset_name"
            raise ValueError(f"no training prompts in data.{option} ({files}): {why}")
        if val_records and not self.val:
            files = ", ".join(map(str, self.val_sources or self.train_sources))
            raise ValueError(
                f"no validation prompts from {files}: all {len(val_records)} were longer than "
                f"max_prompt_length={self.max_prompt_length}"
            )
        self.stats = {
            "data/train_prompts": len(self.train),
            "data/train_dropped_too_long": len(train_dropped),
            "data/val_prompts": len(self.val),
            "data/val_dropped_too_long": len(val_dropped),
        }
        rank_zero_info(f"[distill] prompts: {self.stats}")
        self._set_up = True

    @property
    def collator(self) -> PromptCollator:
        return PromptCollator(self.pad_id)

    def train_batches(self) -> RepeatedSteps:
        window = self.trainer.accumulate_grad_batches if self.trainer else 1
        batches = RepeatedSteps(
            self.train, self.collator, self.batch_size, self.seed, self._rank, self._world_size,
            repeats=self.num_iterations, window=window,
        )  # fmt: skip
        if self.num_iterations > 1:
            check_whole_windows(batches)
        return batches
