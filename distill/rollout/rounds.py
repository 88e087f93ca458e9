"""On-policy rounds through the teacher cache, for a teacher too large to sit beside the student.

Round r: the student, as it is when the round starts, samples completions of the round's prompts into
``<directory>/<run>/round-<r>/rank<k>.jsonl`` (the ``generate`` command's SFT-ready lines, flushed
batch by batch; ``run`` names the fit and a resumed fit keeps it, so a new fit never reads rounds an
earlier one sampled with other weights); those conversations are encoded as SFT samples; the cache
collection fills the chunk cache with the teachers' targets of exactly those samples (crash safe,
under the disk budget); the student trains on them; the chunk is purged. One epoch is ``num_rounds``
rounds (later epochs continue with new rounds). A killed fit resumes at its round and batch: the
rounds before are not touched, the round it stopped in is read back from its file, which is first
completed if the kill cut its generation short (by the weights and seeds that began it, which an
exact resume restores).

A round is sampled at the training step of its first batch, after the previous round's last optimizer
step: the student that samples round r has trained on all of round r - 1 (the log says at which step).
Batches are built there, not in the DataLoader: inside the strategy's forward, where sharded weights
(FSDP, ZeRO-3) can generate, every rank together and in the same number of generate calls.

The completions are stored as text and encoded again: the teachers and the student's update read the
same tokens, which a tokenizer may split differently from how the student sampled them.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from distill.data.batch import TokenBatch, UnbuiltBatch
from distill.data.encoding import Encoded, encode_record, truncate
from distill.data.formats import Record
from distill.data.prompt_datamodule import EncodedPrompt, PromptDataModule
from distill.data.resume import Part, ResumableStream, epoch_rng
from distill.rollout.engine import Sampling
from distill.rollout.generate import check_settings, completed_prompts, read_completions, write_completions

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

    from distill.cache.reader import CacheReader
    from distill.teacher.targets import TeacherTargets

PROMPT_OPTIONS = (
    "train_files", "dataset_name", "dataset_config", "dataset_revision", "split", "tokenizer", "template",
    "end_of_turn", "stop_tokens", "add_eot_to_stop_tokens",
)  # fmt: skip
"""The data module's options that say where the rounds' prompts are and how they are rendered."""


@dataclass
class Rounds:
    """What each round samples: ``prompts_per_round`` prompts of the data module's ``train_files`` (prompt
    records: ``question``, ``messages`` or ``prompt``, as RL reads them; or SFT records with
    ``responses``), ``num_generations`` completions each. ``max_prompt_length`` and ``responses`` read
    the prompts as ``PromptDataModule``'s options of those names do."""

    num_rounds: int
    """Rounds per epoch."""
    prompts_per_round: int
    """Prompts of one round over all ranks (each rank samples its share)."""
    num_generations: int = 1
    """Completions sampled per prompt."""
    sampling: Sampling = field(default_factory=Sampling)
    """How completions are drawn (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``)."""
    generation_batch_size: int = 16
    """Prompts per ``generate`` call."""
    max_prompt_length: int = 512
    seed: int = 0
    """Seed of the rounds' prompt order and of the sampling."""
    responses: bool = False
    directory: str | None = None
    """Where the rounds' completions are written (default: ``<cache_dir>/rounds``)."""

    def __post_init__(self) -> None:
        if self.num_rounds < 1 or self.prompts_per_round < 1 or self.num_generations < 1:
            raise ValueError(
                "data.rounds: num_rounds, prompts_per_round and num_generations must be at least 1; got "
                f"{self.num_rounds}, {self.prompts_per_round}, {self.num_generations}"
            )


class OnPolicyRounds:
    """A KD fit's on-policy rounds in one place (``KDDataModule`` composes it): the fit's run name and
    directory, the rounds' prompts, the check that a round fits the disk budget, each round's sampling
    and batches (``stream``), and the checkpointed state a resumed fit reads its rounds back by."""

    def __init__(
        self,
        options: Rounds,
        targets: TeacherTargets,
        cache_dir: str,
        max_seq_length: int,
        data_options: dict[str, Any],
    ) -> None:
        """``data_options``: what the data module was given, of which the rounds read ``PROMPT_OPTIONS``."""
        if data_options.get("packing") or data_options.get("val_fraction"):
            raise ValueError(
                "data.rounds trains on each round's completions as they come: no packing, and validation "
                "from data.val_files (SFT records), not val_fraction of the prompts"
            )
        self.options = options
        self.targets = targets
        self.max_seq_length = max_seq_length
        self.prompt_options = {k: v for k, v in data_options.items() if k in PROMPT_OPTIONS}
        self.base = Path(options.directory or Path(cache_dir) / "rounds")
        self.run: str | None = None  # names this fit's rounds; checkpointed, so a resume keeps it
        self.prompts: PromptDataModule | None = None

    def setup(self, strategy: Strategy | None) -> None:
        """Read the prompts and name this fit's run (rank 0's name on every rank)."""
        self.read_prompts()
        run = uuid.uuid4().hex[:12]
        self.run = strategy.broadcast(run) if strategy is not None else run
        rank_zero_info(
            f"[distill] on-policy rounds: {self.options.num_rounds} per epoch, "
            f"{self.options.prompts_per_round} prompts x {self.options.num_generations} completions each, "
            f"written under {self.base}"
        )

    def read_prompts(self) -> None:
        """Read and encode the prompts; refuse rounds they cannot fill or completions too long to train."""
        options = self.options
        self.prompts = PromptDataModule(
            **self.prompt_options,
            max_prompt_length=options.max_prompt_length,
            responses=options.responses,
            max_response_length=self.max_seq_length,  # drops what SFT could not train on whole
        )
        self.prompts.setup("fit")
        pool = len(self.prompts.train)
        if options.prompts_per_round > pool:
            raise ValueError(
                f"data.rounds.prompts_per_round is {options.prompts_per_round}, but data.train_files hold "
                f"{pool} usable prompts: a round samples each prompt once at most"
            )
        longest = options.max_prompt_length + options.sampling.max_new_tokens
        if longest >= self.max_seq_length:
            raise ValueError(
                f"data.rounds: a prompt of max_prompt_length {options.max_prompt_length} tokens and "
                f"{options.sampling.max_new_tokens} new ones need max_seq_length > {longest} (now "
                f"{self.max_seq_length}); every completion must stay trainable"
            )

    @property
    def directory(self) -> Path:
        """Where this fit's rounds are written: a new fit's own directory, a resumed fit's earlier one."""
        return self.base / f"run-{self.run}"

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_run": self.run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed fit reads back the rounds its first part sampled (Lightning restores this after
        ``setup``, before the first batch)."""
        if state.get("rounds_run"):
            self.run = state["rounds_run"]

    def per_rank(self, world_size: int) -> int:
        """Samples one rank trains on per round (all ranks the same: DDP needs equal steps)."""
        return self.options.prompts_per_round // world_size * self.options.num_generations

    def positions(self, world_size: int) -> int:
        """Trainable positions one rank's round may hold at most: what the disk budget must fit."""
        return self.per_rank(world_size) * (self.options.sampling.max_new_tokens + 1)

    def round_prompts(self, index: int, rank: int, world_size: int) -> list[EncodedPrompt]:
        """This rank's prompts of round ``index``: rounds take consecutive slices of the prompts in an
        order shuffled per pass over them (a pass holds as many whole rounds as fit)."""
        per_round = self.options.prompts_per_round
        pool, take = self.prompts.train, per_round // world_size * world_size
        rounds_per_pass = len(pool) // per_round
        order = list(range(len(pool)))
        random.Random(f"rounds:{self.options.seed}:{index // rounds_per_pass}").shuffle(order)
        start = index % rounds_per_pass * per_round
        return [pool[i] for i in order[start : start + take]][rank::world_size]

    def samples(
        self, index: int, policy: nn.Module, *, rank: int, world_size: int, synced: bool, step: int
    ) -> list[Encoded]:
        """Round ``index``'s training samples of this rank: its completions sampled by ``policy`` (trained
        ``step`` steps; ``synced``: its weights are sharded, every rank samples at once) where its file
        lacks them, then read back in prompt order and encoded as SFT encodes them."""
        options, prompts = self.options, self.round_prompts(index, rank, world_size)
        path = self.directory / f"round-{index:05d}" / f"rank{rank:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {
            "round": index,
            "prompts": [p.sha for p in prompts],
            "num_generations": options.num_generations,
            "sampling": asdict(options.sampling),
            "seed": options.seed,
        }
        check_settings(path, settings)
        done = completed_prompts(path, options.num_generations)
        pending = [p for p in prompts if p.sha not in done]
        if pending or synced:  # synced: a rank with nothing left still joins the others' generate calls
            write_completions(
                path, policy, self.prompts, pending, options.sampling, options.num_generations,
                options.generation_batch_size, (options.seed, "round", index), synced=synced,
            )  # fmt: skip
        lines = read_completions(path)
        tokenizer, template = self.prompts.tokenizer, self.prompts.resolve_chat_template()
        samples, stopped = [], 0
        for prompt in prompts:
            for sample in range(options.num_generations):
                line, number = lines[(prompt.sha, sample)]
                record = Record(source=f"{path}:{number}", messages=tuple(line["messages"]))
                encoded = encode_record(record, tokenizer, template, True)
                samples.append(truncate(encoded, self.max_seq_length, "right"))
                stopped += line["stopped"]
        trainable = [s.num_trainable for s in samples]
        if not all(trainable):
            raise ValueError(f"{samples[trainable.index(0)].source}: a completion without a trainable token")
        sampled = len(pending) * options.num_generations
        rank_zero_info(
            f"[distill] round {index}: {len(samples)} completions of {len(prompts)} prompts on rank {rank} "
            f"(sampled at step {step}: {sampled}, read back from {path}: {len(samples) - sampled}), "
            f"{stopped / len(samples):.0%} stopped, {sum(trainable) / len(samples):.1f} tokens trained each"
        )
        return samples

    def stream(self, batch_size: int, rank: int, world_size: int, step: Callable[[], int]) -> RoundStream:
        """One epoch of rounds as this rank's KD batches (``step``: the fit's global step, logged)."""
        return RoundStream(self, batch_size, rank, world_size, step)


class RoundChunk:
    """One round's samples and the chunk of their teachers' targets, made when the student builds the
    round's first batch: its batches are ``UnbuiltBatch``es, which ``StudentModule`` builds at
    its training step, inside the strategy's forward, where sharded weights (FSDP, ZeRO-3) can generate
    (as RL objectives sample in ``prepare``), and after the previous round's last optimizer step."""

    def __init__(
        self,
        targets: TeacherTargets,
        sample: Callable[[int, nn.Module, bool], list[Encoded]],
        batch_size: int,
        index: int,
        seed: int,
    ) -> None:
        self.targets = targets
        self.sample = sample
        self.batch_size = batch_size
        self.index = index
        self.seed = seed
        self.samples: list[Encoded] = []
        self.reader: CacheReader | None = None

    def batch(self, number: int, policy: nn.Module, synced: bool) -> TokenBatch:
        """Batch ``number`` of the round; the first one built samples the round with ``policy`` (``synced``:
        its weights are sharded, every rank samples at once) and collects its targets."""
        size = self.batch_size
        if self.reader is None:
            self.samples = self.sample(self.index, policy, synced)
            epoch_rng(self.seed, self.index).shuffle(self.samples)
            # duplicates (the same completion twice) are collected once and trained on twice
            self.reader = self.targets.prepare_chunk(list({s.sha: s for s in self.samples}.values()))
        rows = [[s] for s in self.samples[number * size : (number + 1) * size]]
        return self.targets.batch(rows, self.reader)

    def finish(self) -> None:
        if self.reader is not None:
            self.targets.finish_chunk(self.reader)


class RoundStream(ResumableStream):
    """One epoch of rounds as KD batches: each round sampled, collected into the chunk cache, trained
    on, purged. A round trained before a resume is passed over without sampling or collecting."""

    def __init__(
        self, rounds: OnPolicyRounds, batch_size: int, rank: int, world_size: int, step: Callable[[], int]
    ) -> None:
        super().__init__(batch_size, rank, world_size)
        self.rounds = rounds
        self.step = step

    def parts(self, epoch: int) -> list[Part]:
        per_round = math.ceil(self.rounds.per_rank(self.world_size) / self.batch_size)
        num_rounds = self.rounds.options.num_rounds
        return [Part(per_round, partial(self.round, epoch * num_rounds + r)) for r in range(num_rounds)]

    def sample(self, index: int, policy: nn.Module, synced: bool) -> list[Encoded]:
        return self.rounds.samples(
            index, policy, rank=self.rank, world_size=self.world_size, synced=synced, step=self.step()
        )

    @contextmanager
    def round(self, index: int) -> Iterator[Callable[[int], UnbuiltBatch]]:
        """Round ``index``'s batches, ``UnbuiltBatch``es (the round is sampled at the first built); its
        targets are purged when they are done."""
        chunk = RoundChunk(self.rounds.targets, self.sample, self.batch_size, index, self.rounds.options.seed)
        try:
            yield lambda number: UnbuiltBatch(partial(chunk.batch, number))
        finally:
            chunk.finish()
