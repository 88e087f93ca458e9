"""LightningDataModule: JSON/JSONL/parquet/arrow/csv files or a Hugging Face dataset -> encoded samples
(tokenized once, then memory-mapped from the tokenized-data cache) -> (packed) batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distill.data.batching import Collator, EvalBatches, pack, pad_token_id
from distill.data.encoding import Encoded, EncodingStats, NoTrainableTokensError, Truncation
from distill.data.facts import DataFacts
from distill.data.formats import DataFormatError, Format, Record, Source, read_records, split_held_out
from distill.data.hf_datasets import DatasetSplit, split_sources
from distill.data.resume import (
    ResumableLoader,
    ShuffledBatches,
    leave_sigterm_to_main,
    rank_and_world,
    trained_batches,
    trained_position,
)
from distill.data.streaming import StreamingLoader, StreamingRows, require_max_steps
from distill.data.templates import ChatTemplate, check_stops_on_end_of_turn, resolve_template
from distill.data.tokenized import TokenizedSamples, default_root
from distill.data.tokenized_splits import TokenizedSplits
from distill.pretrained import load_tokenizer
from distill.ranges import require


class DataModule(TokenizedSplits, L.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.0,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        dataset_revision: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        format: Format = "auto",
        tokenizer: str | None = None,
        template: str | None = None,
        end_of_turn: str | None = None,
        stop_tokens: list[str] | None = None,
        add_eot_to_stop_tokens: bool = False,
        train_on_responses_only: bool = True,
        max_seq_length: int = 1024,
        truncation: Truncation = "right",
        packing: bool = False,
        streaming: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 42,
        num_proc: int = 1,
        tokenized_cache: str | None = None,
    ) -> None:
        """
        Args:
            train_files: JSON/JSONL, parquet, arrow or csv files, or directories of them (ShareGPT,
                messages, Alpaca or text records, detected per record or row).
            val_files: Validation files (with no records: an error); when unset, ``val_fraction`` of the
                training records is held out.
            val_fraction: Share of training records held out for validation when neither ``val_files`` nor
                ``val_split`` is set.
            dataset_name: A Hugging Face dataset instead of files: a hub id, a directory written by
                ``save_to_disk``, or a directory of data files ``datasets.load_dataset`` reads. When set,
                ``train_files`` and ``val_files`` are not read (one flag overrides a config's files).
            dataset_config: The dataset's config name, where it has several.
            dataset_revision: A hub dataset's branch, tag or commit (pins the data a config trains on).
            split: The dataset's training split.
            val_split: The dataset's validation split (e.g. ``validation``); unset: ``val_fraction``.
            format: Record format, or ``auto`` to detect it per record.
            tokenizer: Tokenizer name or path (linked to ``model.tokenizer`` by the CLI).
            template: Chat template: ``chatml``, ``llama3``, ``alpaca``, ``mistral``, a Jinja string, or unset
                for the tokenizer's own ``chat_template``.
            end_of_turn: The string that ends an assistant turn, when it cannot be inferred from the template.
            stop_tokens: Tokens the model already stops on besides its EOS.
            add_eot_to_stop_tokens: Accept an end-of-turn that is not a stop token, adding it to the saved
                model's generation_config instead of failing.
            train_on_responses_only: Loss on assistant tokens only (with their end-of-turn); False: on all.
            max_seq_length: Maximum tokens per sample (and per packed row).
            truncation: Over-long samples: ``right`` keeps the start, ``left`` keeps the end, ``drop``.
            packing: Pack several samples per row; attention stays within each sample.
            streaming: Read ``train_files`` (``{"text"}`` JSONL, ``.txt`` with one document per line,
                parquet/arrow/csv with a ``text`` column) or the ``dataset_name`` split (streamed by
                ``datasets``) as a stream, tokenized on the fly into full rows of ``max_seq_length``
                tokens, sharded over ranks and workers, endless (the fit ends at ``trainer.max_steps``)
                and resumable at the exact row: pretraining corpora larger than memory. Validation reads
                ``val_files`` or ``val_split``.
            batch_size: Rows per device per micro-batch.
            eval_batch_size: Rows per validation batch (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            max_train_samples: Use at most this many training records (quick checks).
            max_eval_samples: Use at most this many validation records.
            seed: Seed of the validation split, the packing and each epoch's order of training rows.
            num_proc: Processes that encode the records (once: the result goes to the tokenized cache).
            tokenized_cache: Directory of the tokenized-data cache (default ``$DISTILL_DATA_CACHE``, else
                ``~/.cache/distill/tokenized``): a rerun with the same files, tokenizer, template and
                encoding options maps the samples from there instead of encoding them again.
        """
        super().__init__()
        require("data.val_fraction", val_fraction, at_least=0, below=1)
        require("data.max_seq_length", max_seq_length, at_least=2)  # a sample of one token has no target
        require("data.batch_size", batch_size, at_least=1)
        require("data.eval_batch_size", eval_batch_size, at_least=1)
        require("data.num_workers", num_workers, at_least=0)
        require("data.max_train_samples", max_train_samples, at_least=1)
        require("data.max_eval_samples", max_eval_samples, at_least=0)
        require("data.num_proc", num_proc, at_least=1)
        if streaming and val_fraction > 0:
            raise ValueError(
                "data.streaming reads train_files as a stream and holds nothing out: give the validation "
                "documents as data.val_files (or data.val_split) and set data.val_fraction: 0"
            )
        self.train_sources, self.val_sources = split_sources(
            train_files, val_files, dataset_name, dataset_config, split, val_split, dataset_revision
        )
        # the tokenizer is linked from the model's (which may leave it unset): logged there once
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train_files = train_files
        self.val_files = val_files
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.dataset_revision = dataset_revision
        self.split = split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.format = format
        self.tokenizer_name = tokenizer
        self.template_name = template
        self.end_of_turn = end_of_turn
        self.stop_tokens = stop_tokens or []
        self.add_eot_to_stop_tokens = add_eot_to_stop_tokens
        self.train_on_responses_only = train_on_responses_only
        self.max_seq_length = max_seq_length
        self.truncation = truncation
        self.packing = packing
        self.streaming = streaming
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.num_proc = num_proc
        self.tokenized_cache = Path(tokenized_cache) if tokenized_cache else default_root()
        self.train: Sequence[Encoded] = []
        self.val: Sequence[Encoded] = []
        self.stats: dict[str, float] = {}
        self.stop_token_ids: list[int] = []
        self._predict_jobs: list[list[Encoded]] | None = None  # see predict_only
        self._set_up = False
        self._splits: dict[str, TokenizedSamples] | None = None  # see tokenized_splits
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.chat_template: ChatTemplate | None = None  # resolved once a conversation is encoded

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError("data.tokenizer is not set (the CLI links it from model.tokenizer)")
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def load_records(self) -> tuple[list[Record], list[Record]]:
        """Training and validation records, split and capped as configured (streaming: validation only,
        the corpus is never read whole)."""
        train = self.read_files(self.train_sources) if self.trains_on_files else []
        if self.val_sources:
            val = self.read_files(self.val_sources)
            if not val:  # a validation set given and empty: the run would validate nothing, unseen
                raise DataFormatError(self._no_val_message())
        elif self.val_fraction > 0:
            train, val = split_held_out(train, self.val_fraction, self.seed)
        else:
            val = []
        return train[: self.max_train_samples], val[: self.max_eval_samples]

    @property
    def trains_on_files(self) -> bool:
        """Whether the training samples are the training files' records, encoded whole up front."""
        return not self.streaming

    def read_files(self, files: list[Source]) -> list[Record]:
        """Every record of ``files`` (files, directories, dataset splits) in order."""
        return read_records(files, self.format)

    def template_for(self, records: list[Record]) -> ChatTemplate | None:
        """The chat template, resolved and checked once: only needed when some record is a conversation."""
        if any(r.messages is not None for r in records):
            self.resolve_chat_template()
        return self.chat_template

    def resolve_chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            self.chat_template = resolve_template(self.tokenizer, self.template_name, self.end_of_turn)
            self.stop_token_ids = check_stops_on_end_of_turn(
                self.tokenizer, self.chat_template, self.stop_tokens, self.add_eot_to_stop_tokens
            )
        return self.chat_template

    def prepare_data(self) -> None:
        """Local rank 0 of each node builds the tokenized cache entries this run lacks; Lightning holds
        the other ranks at a barrier meanwhile, and their ``setup`` maps what was built."""
        self.tokenized_splits()

    def attach_records(self) -> None:
        """Give the training and validation samples their records (read again from the files, once,
        matched by SHA), for teachers that render each record in a chat template of their own."""
        train, val = self.load_records()
        by_sha = {record.sha: record for record in (*train, *val)}
        self.train = [replace(sample, record=by_sha[sample.sha]) for sample in self.train]
        self.val = [replace(sample, record=by_sha[sample.sha]) for sample in self.val]

    def setup(self, stage: str) -> None:
        if self._set_up:
            return
        splits = self.tokenized_splits()
        if any(samples.meta.get("conversations") for samples in splits.values()):
            self.resolve_chat_template()
        self.train = splits.get("train", [])
        self.val = splits.get("val", [])
        if stage == "predict":  # teacher collection: a teacher may render each record in its own template
            self.attach_records()
        train_stats = splits["train"].stats if "train" in splits else EncodingStats()
        val_stats = splits["val"].stats if "val" in splits else EncodingStats()
        empty_fit = stage == "fit" and not self.train and self.trains_on_files
        if empty_fit or (stage == "predict" and not (self.train or self.val)):
            # before any model is built: an empty fit would "succeed" and export an untrained model
            raise NoTrainableTokensError(self._no_samples_message(train_stats.samples, train_stats))
        train_counts = train_stats.as_dict() if self.trains_on_files else {}
        self.stats = {
            **{f"data/train_{k}": v for k, v in train_counts.items()},
            **{f"data/val_{k}": v for k, v in val_stats.as_dict().items()},
        }
        if "train" in splits:
            rank_zero_info(f"[distill] train: {train_stats.as_dict()} ({splits['train'].directory.parent})")
        if "val" in splits:
            rank_zero_info(f"[distill] val: {val_stats.as_dict()}")
        self._set_up = True

    def _no_samples_message(self, records: int, stats: EncodingStats) -> str:
        files = ", ".join(map(str, self.train_sources))
        option = "dataset_name" if isinstance(self.train_sources[0], DatasetSplit) else "train_files"
        if not records:
            why = (
                "no training records: the files are empty, or val_fraction / max_train_samples "
                f"(now {self.val_fraction} / {self.max_train_samples}) left none"
            )
        else:
            why = (
                f"all {records} training records were dropped: {stats.dropped_too_long} longer than "
                f"max_seq_length={self.max_seq_length} (truncation '{self.truncation}'), "
                f"{stats.dropped_no_trainable} without a trainable token"
            )
        return f"nothing to train on in data.{option} ({files}): {why}. Add samples or fix the data"

    def _no_val_message(self) -> str:
        files = ", ".join(map(str, self.val_sources))
        option = "val_split" if isinstance(self.val_sources[0], DatasetSplit) else "val_files"
        return (
            f"data.{option} ({files}) holds no records: add records to it, or unset data.{option} to "
            "validate on none (data.val_fraction holds some training records out instead)"
        )

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def facts(self) -> DataFacts:
        """What the objective training on these batches is told (once set up)."""
        return DataFacts(type(self).__name__, "samples", self.pad_id, self.chat_template)

    @property
    def collator(self) -> Callable[[list], object]:
        return Collator(self.pad_id)

    @property
    def unpacked_collator(self) -> Callable[[list], object]:
        """The collator of one sample (unit) per row: prediction's (packing is for training rows)."""
        return self.collator

    def _rows(self, samples: Sequence[Encoded], shuffle_seed: int | None) -> Sequence:
        return pack(samples, self.max_seq_length, shuffle_seed) if self.packing else samples

    @property
    def _rank(self) -> int:
        return rank_and_world(self.trainer)[0]

    @property
    def _world_size(self) -> int:
        return rank_and_world(self.trainer)[1]

    def _progress(self) -> tuple[int, int]:
        return trained_position(self.trainer)

    def _trained_batches(self) -> int:
        return trained_batches(self.trainer)

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            require_max_steps(self.trainer.max_steps if self.trainer else None)
            stream = StreamingRows(
                self.train_sources,
                self.tokenizer,
                self.max_seq_length,
                self.batch_size,
                self._rank,
                self._world_size,
                self.seed,
            )
            return StreamingLoader(stream, self._trained_batches, num_workers=self.num_workers)
        # the order is a function of (seed, epoch), not of the global RNG, so `--ckpt_path` resumes
        # mid-epoch at the very next batch
        return ResumableLoader(self.train_batches(), self._progress, num_workers=self.num_workers)

    def train_batches(self) -> ShuffledBatches:
        """One epoch of this rank's training batches."""
        rows = self._rows(self.train, self.seed)
        return ShuffledBatches(rows, self.collator, self.batch_size, self.seed, self._rank, self._world_size)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self._rows(self.val, None), self.collator)

    def eval_loader(self, rows: Sequence, collate: Callable[[list], object]) -> DataLoader:
        """Each rank validates its own shard of ``rows``, every row once over all ranks (metrics are sums)."""
        batches = EvalBatches(rows, collate, self.eval_batch_size, self._rank, self._world_size)
        return DataLoader(
            batches, batch_size=None, num_workers=self.num_workers, worker_init_fn=leave_sigterm_to_main
        )

    test_dataloader = val_dataloader

    def predict_only(self, jobs: list[list[Encoded]]) -> None:
        """Predict these sample lists, one loader each (the cache writer's teacher x split jobs, from its
        sync plan), instead of all samples once."""
        self._predict_jobs = jobs

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per collection job (teacher x split), in order; by default all samples once."""
        jobs = self._predict_jobs if self._predict_jobs is not None else [[*self.train, *self.val]]
        collate = self.unpacked_collator
        return [
            DataLoader(job, batch_size=self.eval_batch_size, collate_fn=collate, num_workers=self.num_workers)
            for job in jobs
        ]
