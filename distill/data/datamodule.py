"""LightningDataModule: JSON/JSONL files -> encoded samples -> (packed) batches."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distill.data.batching import Collator, EvalBatches, pack
from distill.data.encoding import Encoded, EncodingStats, NoTrainableTokensError, Truncation, encode_all
from distill.data.formats import Format, Record, read_records
from distill.data.resume import ResumableLoader, ShuffledBatches, leave_sigterm_to_main
from distill.data.templates import ChatTemplate, check_stops_on_end_of_turn, resolve_template


class DataModule(L.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.0,
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
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 42,
    ) -> None:
        """
        Args:
            train_files: JSON/JSONL files or directories of them (ShareGPT, messages, Alpaca or text records).
            val_files: Validation files; when unset, ``val_fraction`` of the training records is held out.
            val_fraction: Share of training records held out for validation when ``val_files`` is unset.
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
            batch_size: Rows per device per micro-batch.
            eval_batch_size: Rows per validation batch (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            max_train_samples: Use at most this many training records (quick checks).
            max_eval_samples: Use at most this many validation records.
            seed: Seed of the validation split, the packing and each epoch's order of training rows.
        """
        super().__init__()
        # the tokenizer is linked from the model's (which may leave it unset): logged there once
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train_files = train_files
        self.val_files = val_files
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
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.train: list[Encoded] = []
        self.val: list[Encoded] = []
        self.stats: dict[str, float] = {}
        self.stop_token_ids: list[int] = []
        self._predict_jobs: list[list[Encoded]] | None = None  # see predict_only
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.chat_template: ChatTemplate | None = None  # resolved once a conversation is encoded

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError("data.tokenizer is not set (the CLI links it from model.tokenizer)")
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    def load_records(self) -> tuple[list[Record], list[Record]]:
        """Training and validation records, split and capped as configured."""
        train = read_records(_as_list(self.train_files), self.format)
        if self.val_files:
            val = read_records(_as_list(self.val_files), self.format)
        elif self.val_fraction > 0:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, round(len(train) * self.val_fraction))
            held_out = set(order[:n_val])
            val = [r for i, r in enumerate(train) if i in held_out]
            train = [r for i, r in enumerate(train) if i not in held_out]
        else:
            val = []
        return train[: self.max_train_samples], val[: self.max_eval_samples]

    def template_for(self, records: list[Record]) -> ChatTemplate | None:
        """The chat template, resolved and checked once: only needed when some record is a conversation."""
        if self.chat_template is None and any(r.messages is not None for r in records):
            self.chat_template = resolve_template(self.tokenizer, self.template_name, self.end_of_turn)
            self.stop_token_ids = check_stops_on_end_of_turn(
                self.tokenizer, self.chat_template, self.stop_tokens, self.add_eot_to_stop_tokens
            )
        return self.chat_template

    def encode(self, records: list[Record]) -> tuple[list[Encoded], EncodingStats]:
        return encode_all(
            records,
            self.tokenizer,
            self.template_for(records),
            self.max_seq_length,
            self.truncation,
            self.train_on_responses_only,
        )

    def setup(self, stage: str) -> None:
        if self.train or self.val:
            return
        train_records, val_records = self.load_records()
        self.train, train_stats = self.encode(train_records)
        self.val, val_stats = self.encode(val_records) if val_records else ([], EncodingStats())
        if (stage == "fit" and not self.train) or (stage == "predict" and not self.train + self.val):
            # before any model is built: an empty fit would "succeed" and export an untrained model
            raise NoTrainableTokensError(self._no_samples_message(len(train_records), train_stats))
        self.stats = {
            **{f"data/train_{k}": v for k, v in train_stats.as_dict().items()},
            **{f"data/val_{k}": v for k, v in val_stats.as_dict().items()},
        }
        rank_zero_info(f"[distill] train: {train_stats.as_dict()}")
        if val_records:
            rank_zero_info(f"[distill] val: {val_stats.as_dict()}")

    def _no_samples_message(self, records: int, stats: EncodingStats) -> str:
        files = ", ".join(map(str, _as_list(self.train_files)))
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
        return f"nothing to train on in data.train_files ({files}): {why}. Add samples or fix the data"

    @property
    def collator(self) -> Collator:
        pad_id = self.tokenizer.pad_token_id
        return Collator(pad_id if pad_id is not None else self.tokenizer.eos_token_id)

    def _rows(self, samples: list[Encoded], shuffle_seed: int | None) -> list:
        if not self.packing:
            return samples
        order = list(samples)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        return pack(order, self.max_seq_length)

    @property
    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer else 0

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer else 1

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches of it already trained) from Lightning's loop state."""
        if self.trainer is None:  # used outside a Trainer
            return 0, 0
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.completed, loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> DataLoader:
        # the order is a function of (seed, epoch), not of the global RNG, so `--ckpt_path` resumes
        # mid-epoch at the very next batch
        rows = ShuffledBatches(
            self._rows(self.train, self.seed),
            self.collator,
            self.batch_size,
            self.seed,
            self._rank,
            self._world_size,
        )
        return ResumableLoader(rows, self._progress, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        # each rank validates its own shard, every sample once over all ranks (metrics are sums)
        batches = EvalBatches(
            self._rows(self.val, None), self.collator, self.eval_batch_size, self._rank, self._world_size
        )
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
        jobs = self._predict_jobs if self._predict_jobs is not None else [self.train + self.val]
        return [
            DataLoader(
                job, batch_size=self.eval_batch_size, collate_fn=self.collator, num_workers=self.num_workers
            )
            for job in jobs
        ]


def _as_list(files: str | list[str]) -> list[str | Path]:
    return [files] if isinstance(files, str) else list(files)
