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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

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
    from distill.cache.reader import CacheReader
    from distill.data.datamodule import DataModule
    from distill.teacher.targets import TeacherTargets

SampleRound = Callable[[int, nn.Module, bool], list[Encoded]]
"""(round index, policy, synced) -> this rank's samples of the round (``RoundSamples.samples`` bound to
the fit's directory, rank and step)."""


@dataclass
class Rounds:
    """What each round samples: ``prompts_per_round`` prompts of the data module's ``train_files`` (prompt
    records: ``question``, ``messages`` or ``prompt``, as RL reads them; or SFT records with
    ``responses``), ``num_generations`` completions each."""

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
    """Longer prompts are dropped and counted."""
    seed: int = 0
    """Seed of the rounds' prompt order and of the sampling."""
    responses: bool = False
    """``train_files`` are SFT records (any format): each one's last turn, an answer, is left out and
    the turns before it are the prompt the student answers."""
    directory: str | None = None
    """Where the rounds' completions are written (default: ``<cache_dir>/rounds``)."""

    def __post_init__(self) -> None:
        if self.num_rounds < 1 or self.prompts_per_round < 1 or self.num_generations < 1:
            raise ValueError(
                "data.rounds: num_rounds, prompts_per_round and num_generations must be at least 1; got "
                f"{self.num_rounds}, {self.prompts_per_round}, {self.num_generations}"
            )


class RoundSamples:
    """A round's prompts, its completions (sampled, or read back), and those as training samples."""

    def __init__(self, rounds: Rounds, data: DataModule) -> None:
        self.rounds = rounds
        self.data = data
        self.prompts = PromptDataModule(
            data.train_files,
            dataset_name=data.dataset_name,
            dataset_config=data.dataset_config,
            dataset_revision=data.dataset_revision,
            split=data.split,
            tokenizer=data.tokenizer_name,
            template=data.template_name,
            end_of_turn=data.end_of_turn,
            stop_tokens=data.stop_tokens,
            add_eot_to_stop_tokens=data.add_eot_to_stop_tokens,
            max_prompt_length=rounds.max_prompt_length,
            responses=rounds.responses,
            max_response_length=data.max_seq_length,  # unused: the student answers
            batch_size=rounds.generation_batch_size,
            seed=rounds.seed,
        )
        self.prompts.setup("fit")
        pool = len(self.prompts.train)
        if rounds.prompts_per_round > pool:
            raise ValueError(
                f"data.rounds.prompts_per_round is {rounds.prompts_per_round}, but data.train_files hold "
                f"{pool} usable prompts: a round samples each prompt once at most"
            )
        longest = rounds.max_prompt_length + rounds.sampling.max_new_tokens
        if longest >= data.max_seq_length:
            raise ValueError(
                f"data.rounds: a prompt of max_prompt_length {rounds.max_prompt_length} tokens and "
                f"{rounds.sampling.max_new_tokens} new ones need max_seq_length > {longest} (now "
                f"{data.max_seq_length}); every completion must stay trainable"
            )

    def per_rank(self, world_size: int) -> int:
        """Samples one rank trains on per round (all ranks the same: DDP needs equal steps)."""
        return self.rounds.prompts_per_round // world_size * self.rounds.num_generations

    def round_prompts(self, index: int, rank: int, world_size: int) -> list[EncodedPrompt]:
        """This rank's prompts of round ``index``: rounds take consecutive slices of the prompts in an
        order shuffled per pass over them (a pass holds as many whole rounds as fit)."""
        pool, take = self.prompts.train, self.rounds.prompts_per_round // world_size * world_size
        rounds_per_pass = len(pool) // self.rounds.prompts_per_round
        order = list(range(len(pool)))
        random.Random(f"rounds:{self.rounds.seed}:{index // rounds_per_pass}").shuffle(order)
        start = index % rounds_per_pass * self.rounds.prompts_per_round
        return [pool[i] for i in order[start : start + take]][rank::world_size]

    def samples(
        self,
        directory: Path,
        index: int,
        policy: nn.Module,
        *,
        rank: int,
        world_size: int,
        synced: bool,
        step: int,
    ) -> list[Encoded]:
        """Round ``index``'s training samples: its completions sampled by ``policy`` (trained ``step``
        steps) where its file in ``directory`` lacks them, then read back in prompt order and encoded
        as SFT encodes them."""
        rounds, prompts = self.rounds, self.round_prompts(index, rank, world_size)
        path = directory / f"round-{index:05d}" / f"rank{rank:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {
            "round": index,
            "prompts": [p.sha for p in prompts],
            "num_generations": rounds.num_generations,
            "sampling": asdict(rounds.sampling),
            "seed": rounds.seed,
        }
        check_settings(path, settings)
        done = completed_prompts(path, rounds.num_generations)
        pending = [p for p in prompts if p.sha not in done]
        if pending or synced:  # synced: a rank with nothing left still joins the others' generate calls
            write_completions(
                path, policy, self.prompts, pending, rounds.sampling, rounds.num_generations,
                rounds.generation_batch_size, (rounds.seed, "round", index), synced=synced,
            )  # fmt: skip
        lines = read_completions(path)
        data = self.data
        samples, stopped = [], 0
        for prompt in prompts:
            for sample in range(rounds.num_generations):
                line, number = lines[(prompt.sha, sample)]
                record = Record(source=f"{path}:{number}", messages=tuple(line["messages"]))
                encoded = encode_record(record, data.tokenizer, data.chat_template, True)
                samples.append(truncate(encoded, data.max_seq_length, "right"))
                stopped += line["stopped"]
        trainable = [s.num_trainable for s in samples]
        if not all(trainable):
            raise ValueError(f"{samples[trainable.index(0)].source}: a completion without a trainable token")
        rank_zero_info(
            f"[distill] round {index}: {len(samples)} completions of {len(prompts)} prompts on rank {rank} "
            f"(sampled at step {step}: {len(pending) * rounds.num_generations}, read back from {path}: "
            f"{len(samples) - len(pending) * rounds.num_generations}), "
            f"{stopped / len(samples):.0%} stopped, {sum(trainable) / len(samples):.1f} tokens trained each"
        )
        return samples


class RoundChunk:
    """One round's samples and the chunk of their teachers' targets, made when the student builds the
    round's first batch: its batches are ``UnbuiltBatch``es, which ``StudentModule`` builds at
    its training step, inside the strategy's forward, where sharded weights (FSDP, ZeRO-3) can generate
    (as RL objectives sample in ``prepare``), and after the previous round's last optimizer step."""

    def __init__(
        self, targets: TeacherTargets, sample: SampleRound, batch_size: int, index: int, seed: int
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
        self,
        targets: TeacherTargets,
        rounds: RoundSamples,
        sample: SampleRound,
        batch_size: int,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(batch_size, rank, world_size)
        self.targets = targets
        self.rounds = rounds
        self.sample = sample

    def parts(self, epoch: int) -> list[Part]:
        per_round = math.ceil(self.rounds.per_rank(self.world_size) / self.batch_size)
        num_rounds = self.rounds.rounds.num_rounds
        return [Part(per_round, partial(self.round, epoch * num_rounds + r)) for r in range(num_rounds)]

    @contextmanager
    def round(self, index: int) -> Iterator[Callable[[int], UnbuiltBatch]]:
        """Round ``index``'s batches, ``UnbuiltBatch``es (the round is sampled at the first built); its
        targets are purged when they are done."""
        chunk = RoundChunk(self.targets, self.sample, self.batch_size, index, self.rounds.rounds.seed)
        try:
            yield lambda number: UnbuiltBatch(partial(chunk.batch, number))
        finally:
            chunk.finish()
