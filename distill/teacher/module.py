"""TeacherModule: runs teacher LMs in Lightning's predict loop and returns sparse distributions.

One predict dataloader per (teacher, split) job; the module keeps only the current job's teacher in
memory and frees it when the next teacher's job starts.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, fields
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distill.data.batch import TokenBatch, to_device
from distill.data.batching import Collator, pad_token_id
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.templates import ChatTemplate
from distill.targets import SparseTargets
from distill.teacher.alignment import (
    TeacherSample,
    encode_for_teacher,
    end_of_turn_id,
    merge_token,
    resolve_teacher_template,
    same_template,
    template_identity,
)
from distill.teacher.identity import check_model_source, model_identity
from distill.train.model import load_causal_lm
from distill.train.quantization import Quantization, check_quantization

Scheme = Literal["topk", "sampled", "hybrid"]


@dataclass
class Teacher:
    """A teacher model and, optionally, its own chat template."""

    model: str | None = None
    """Hugging Face name or local path."""
    model_config: dict | None = None
    """A transformers config dict to build a random-init teacher (tests only)."""
    name: str | None = None
    """Name in the cache (default: derived from ``model``)."""
    dtype: str | None = "auto"
    """Weight dtype when loading (``auto``, ``bfloat16``, ``float32``)."""
    template: str | None = None
    """The teacher's own chat template: a built-in name (``chatml``, ``llama3``, ...), a Jinja string, or
    ``model`` for the one saved with the teacher's tokenizer. None: the student's. The teacher then reads
    each conversation in its format; its outputs are aligned to the student's positions by content."""
    end_of_turn: str | None = None
    """End-of-turn string of ``template``, when it cannot be inferred."""
    quantization: Quantization | None = None
    """Load ``model`` with 8- or 4-bit bitsandbytes weights (a CUDA GPU and the ``bnb`` extra). Its
    distributions are the quantized model's: the cache keys them apart from the unquantized model's."""

    def __post_init__(self) -> None:
        owner = f"teacher {self.name or self.model or 'model_config'} quantization"
        check_quantization(self.quantization, owner)
        if self.quantization is not None and self.model is None:
            raise ValueError(f"{owner}: quantized loading needs the teacher's model (a saved checkpoint)")
        if self.model is not None:
            # that it exists: what it holds is the loader's to say (a template's tokenizer may be all)
            owner = f"teacher {self.name}:" if self.name else "teacher"
            check_model_source(owner, self.model, config_file=None)

    @property
    def key(self) -> str:
        if self.name:
            return self.name
        if self.model:
            return self.model.rstrip("/").replace("/", "--")
        raise ValueError("a teacher built from model_config needs a name")


@dataclass
class SparseOutput:
    """One sample's teacher output, on the CPU: what the writer appends to the cache."""

    sha: str
    num_tokens: int
    ids: Tensor  # (P, K) int64, ascending per row
    logits: Tensor  # (P, K) float32 raw logits (temperature 1)
    lse: Tensor  # (P,) float32
    nll: float  # the teacher's -log p of the sample's trained tokens, summed over its P positions
    sample_ids: Tensor | None = None  # (P, S) int64
    sample_counts: Tensor | None = None  # (P, S) int32

    @property
    def targets(self) -> SparseTargets:
        return SparseTargets(self.ids, self.logits, self.lse, self.sample_ids, self.sample_counts)


LOG2_E = 1.4426950408889634
TOPK_BLOCK = 64  # columns per block of ``top_k``: 500 block maxima and 64 x 64 candidates at V=32000


def top_k(logits: Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[Tensor, Tensor]:
    """``logits.topk(k, dim=-1)`` of (n, V) rows: the k largest values, descending, and their ids.

    On a CPU the k are picked among the elements of the k blocks of ``block`` columns with the
    largest maxima: an element outside them is at most the smallest of those k maxima, so it cannot
    beat the k-th largest element (at best it ties with it). torch.topk copies and heap-sorts each
    whole row; this reads it once (the block maxima) and ranks 1/8 of it: 1.6-2x faster at V=32,000,
    K=64. On a GPU torch.topk's radix select is one kernel already.
    """
    n, vocab = logits.shape
    blocks = vocab // block
    if logits.device.type != "cpu" or not 0 < 4 * k <= blocks:
        return logits.topk(k, dim=-1)
    whole = blocks * block
    grid = logits[:, :whole].view(n, blocks, block)
    chosen = grid.amax(dim=-1).topk(k, dim=-1).indices  # (n, k) blocks holding every top-k element
    rows = torch.arange(n, device=logits.device)[:, None]
    if logits.stride() == (whole, 1):  # one block is one row of a (n * blocks, block) view: row copies
        candidates = grid.view(n * blocks, block).index_select(0, (chosen + rows * blocks).view(-1))
    else:
        candidates = grid[rows, chosen]
    candidates = candidates.view(n, k * block)
    if whole < vocab:  # the partial last block always competes
        candidates = torch.cat([candidates, logits[:, whole:]], dim=1)
    values, slots = candidates.topk(k, dim=-1)
    ids = chosen.gather(1, (slots // block).clamp_(max=k - 1)) * block + slots % block
    if whole < vocab:
        ids = torch.where(slots >= k * block, slots - k * block + whole, ids)
    return values, ids


def sparse_distribution(
    logits: Tensor,
    k: int,
    scheme: Scheme = "topk",
    num_draws: int = 0,
    temperature: float = 1.0,
    scratch: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-k ids/logits, the full log-sum-exp, and sampled ids/counts from (n, V) logits.

    Top-k runs on the model's dtype; the log-sum-exp (and the draws) need one float32 (n, V) buffer
    of this chunk only, so no (batch, seq, vocab) float32 tensor exists. ``scratch``: float32
    ``logits`` may serve as that buffer (they are overwritten), which saves an allocation per chunk.
    """
    n = logits.shape[0]
    if scheme == "sampled":
        ids = torch.empty((n, 0), dtype=torch.long, device=logits.device)
        head = torch.empty((n, 0), device=logits.device)
        peak = logits.amax(dim=-1).float()
    else:
        head, ids = top_k(logits, k)  # descending: column 0 is the row's maximum
        peak = head[:, 0].float()
        ids, order = ids.sort(dim=-1)
        head = head.gather(-1, order).float()
    work = logits.float()
    if work.data_ptr() == logits.data_ptr() and not scratch:
        work = work.clone()
    work.sub_(peak[:, None])
    if scheme == "topk":
        # exp(x) = 2 ** (x * log2(e)): torch's exp2 is ~3x faster than its exp on a CPU; the log-sum-exp
        # stays within a float32 ulp of the exact one (the draws below keep exp: the same draws as ever)
        lse = peak + work.mul_(LOG2_E).exp2_().sum(dim=-1).log()
        return ids, head, lse, None, None
    weights = work.exp_()  # exp(logit - max), in place
    lse = peak + weights.sum(dim=-1).log()
    if temperature != 1.0:
        weights.pow_(1.0 / temperature)  # exp((logit - max) / T)
    if scheme == "hybrid":
        weights.scatter_(-1, ids, 0.0)  # draw from the tail only
    draws = torch.multinomial(weights, num_draws, replacement=True)  # unnormalised weights are fine
    counts = torch.zeros_like(weights, dtype=torch.int32).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=torch.int32)
    )
    sample_counts, sample_ids = counts.topk(min(num_draws, counts.shape[-1]), dim=-1)
    return ids, head, lse, sample_ids, sample_counts


class TeacherModule(L.LightningModule):
    def __init__(
        self,
        teachers: list[Teacher],
        k: int = 64,
        scheme: Scheme = "topk",
        num_draws: int = 0,
        temperature: float = 1.0,
        chunk_size: int = 256,
        vocab_size: int | None = None,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            teachers: Teacher models, collected one after another (one in memory at a time).
            k: Exact top-k ids kept per position (``topk`` and ``hybrid``).
            scheme: ``topk`` (exact head + tail mass), ``sampled`` (``num_draws`` tokens drawn from the
                teacher: unbiased) or ``hybrid`` (exact head + draws from the tail).
            num_draws: Draws per position for ``sampled``/``hybrid``.
            temperature: Temperature of the draws (stored logits are always raw).
            chunk_size: Positions whose logits exist at once (on a CPU at V=32,000, 256 was 5-9% faster
                than 128, whose head matrix products are less efficient, and than 512, whose (512, V)
                buffers leave the CPU's caches and heap).
            vocab_size: True vocabulary size (default: the tokenizer's); ids past it are never stored.
            tokenizer: Tokenizer of the student and teachers (linked from the data module).
        """
        super().__init__()
        if scheme != "topk" and num_draws <= 0:
            raise ValueError(f"scheme {scheme!r} needs num_draws > 0")
        self.teachers = teachers
        self.k = 0 if scheme == "sampled" else k
        self.scheme = scheme
        self.num_draws = num_draws
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.tokenizer_id = tokenizer or teachers[0].model
        self._vocab_size = vocab_size
        self.job_teachers: list[int] = [0]  # teacher index of each predict dataloader (prepare_jobs)
        # teachers reading their own template: index -> sha -> encoding and rows (see prepare_templates)
        self.aligned: dict[int, dict[str, TeacherSample]] = {}
        self._eot: dict[int, tuple[int, int]] = {}  # teacher index -> (its end-of-turn id, the student's)
        self._prepared: set[int] = set()  # teachers whose samples prepare_templates has seen
        self._templates: dict[int, ChatTemplate] = {}
        self._loaded: tuple[int, nn.Module] | None = None
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_id)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size or len(self.tokenizer)

    def identity(self, index: int) -> dict[str, str]:
        teacher = self.teachers[index]
        ident = {"name": teacher.key, **model_identity(teacher.model, teacher.model_config)}
        if teacher.template is not None:  # absent otherwise: caches collected before stay valid
            ident["template"] = template_identity(teacher.template, teacher.end_of_turn)
        if teacher.quantization is not None:  # likewise
            ident["quantization"] = teacher.quantization.identity()
        return ident

    def teacher_template(self, index: int) -> ChatTemplate | None:
        """The teacher's own chat template, or None when it reads the student's."""
        teacher = self.teachers[index]
        if teacher.template is None:
            return None
        if index not in self._templates:
            self._templates[index] = resolve_teacher_template(
                self.tokenizer, teacher.template, teacher.end_of_turn, teacher.model
            )
        return self._templates[index]

    def prepare_jobs(
        self, jobs: list[tuple[int, list[Encoded]]], student_template: ChatTemplate | None
    ) -> None:
        """Predict dataloader j runs teacher ``jobs[j][0]`` on the samples ``jobs[j][1]``; those of
        teachers reading their own template are aligned now (``prepare_templates``)."""
        self.job_teachers = [index for index, _ in jobs]
        own: dict[int, list[Encoded]] = {i: [] for i, t in enumerate(self.teachers) if t.template is not None}
        for index, samples in jobs:
            if index in own:
                own[index].extend(samples)
        self.prepare_templates(own, student_template)

    def prepare_templates(
        self, samples: dict[int, list[Encoded]], student_template: ChatTemplate | None
    ) -> None:
        """Encode and align the samples of each teacher with its own template (``samples``: teacher index
        -> student samples it will be run on); raises ``AlignmentError`` before any teacher is loaded.

        Teachers whose template is the student's keep the plain path (nothing is stored for them).
        """
        self.aligned, self._eot, self._prepared = {}, {}, set(samples)
        for index, todo in samples.items():
            template = self.teacher_template(index)
            if template is None or same_template(template, student_template) or not todo:
                continue
            key = self.teachers[index].key
            self.aligned[index] = encode_for_teacher(todo, self.tokenizer, template, student_template, key)
            source = end_of_turn_id(self.tokenizer, template)
            target = end_of_turn_id(self.tokenizer, student_template)
            if source is not None and target is not None and source != target:
                if max(source, target) >= self.vocab_size:
                    raise ValueError(
                        f"teacher {key}: end-of-turn ids {source}, {target} past vocab_size {self.vocab_size}"
                    )
                self._eot[index] = (source, target)

    def teacher_model(self, index: int) -> nn.Module:
        """The teacher of ``index``, loaded on first use; the previous one is freed first."""
        if self._loaded is not None and self._loaded[0] == index:
            return self._loaded[1]
        self.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        teacher = self.teachers[index]
        model = load_causal_lm(
            teacher.model,
            teacher.model_config,
            self.tokenizer,
            teacher.dtype,
            role=f"teacher {teacher.key}",
            quantization=teacher.quantization,
            device=self.device,
        )
        if teacher.quantization is None:  # a quantized one is loaded onto the device, and stays there
            model = model.to(self.device)
        model = model.eval().requires_grad_(False)
        self._loaded = (index, model)
        return model

    def release(self) -> None:
        """Free the loaded teacher. A full garbage collection (~0.25 s once transformers is imported)
        runs only when a reference cycle keeps the model alive; otherwise dropping it freed it."""
        if self._loaded is None:
            return
        model = weakref.ref(self._loaded[1])
        self._loaded = None
        if model() is not None:
            gc.collect()

    @torch.no_grad()
    def batch_targets(
        self, model: nn.Module, batch: TokenBatch, merge: tuple[int, int] | None = None
    ) -> tuple[SparseTargets, Tensor]:
        """The teacher's sparse distribution (and NLL of the labels) at every trainable position of
        ``batch`` (row-major, i.e. sample after sample, packed rows included) and the number of those
        positions per row. ``merge`` = (the teacher's end-of-turn id, the student's): the first's
        probability moves onto the second at every position, and labels of the first become the second."""
        hidden = self._hidden(model, batch)
        trainable = batch.labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        positions = hidden[:, :-1][trainable]  # (N, H)
        labels = batch.labels[:, 1:][trainable]  # (N,)
        head = model.get_output_embeddings()
        if merge is None:
            return self._sparse(head, positions, labels), trainable.sum(dim=1)
        source, target = merge
        rows = torch.ones_like(labels, dtype=torch.bool)
        labels = torch.where(labels == source, target, labels)
        return self._sparse(head, positions, labels, (source, target, rows)), trainable.sum(dim=1)

    @staticmethod
    def _hidden(model: nn.Module, batch: TokenBatch) -> Tensor:
        return model.get_decoder()(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state

    def _sparse(
        self,
        head: nn.Module,
        positions: Tensor,
        labels: Tensor,
        merge: tuple[int, int, Tensor] | None = None,
    ) -> SparseTargets:
        """Sparse distributions of (N, H) hidden states and the NLL of the (N,) ``labels``, ``chunk_size``
        rows of logits at a time; ``merge`` = (source id, target id, (N,) bool rows) moves source's
        probability onto target first."""

        def part(i: int, n: int) -> tuple:
            logits = head(positions[i : i + n])[:, : self.vocab_size]
            if merge is not None:
                logits = merge_token(logits, merge[0], merge[1], merge[2][i : i + n])
            label_logits = logits.gather(1, labels[i : i + n, None]).squeeze(1).float()  # (n,)
            # read before sparse_distribution takes float32 logits as its scratch buffer
            columns = sparse_distribution(
                logits, self.k, self.scheme, self.num_draws, self.temperature, scratch=True
            )
            return (*columns, columns[2] - label_logits)  # -log softmax(logits)[label] = lse - logit

        parts = [part(i, self.chunk_size) for i in range(0, positions.shape[0], self.chunk_size)]
        if not parts:  # no trainable position in the batch
            parts = [part(0, 0)]
        columns = [torch.cat(c) if c[0] is not None else None for c in zip(*parts, strict=True)]
        return SparseTargets(*columns)

    @torch.no_grad()
    def aligned_targets(
        self, model: nn.Module, index: int, shas: list[str]
    ) -> tuple[SparseTargets, list[int]]:
        """Teacher ``index`` run on its own encodings of ``shas``: one row per student trainable position
        (sample after sample), the end-of-turn remapped, and the number of rows per sample."""
        views = [self.aligned[index][sha] for sha in shas]
        batch = to_device(self.collator([v.teacher for v in views]), self.device)
        trainable = batch.labels[:, 1:] != IGNORE_INDEX
        starts = torch.cumsum(trainable.sum(dim=1), 0) - trainable.sum(dim=1)
        select = torch.cat(
            [torch.as_tensor(v.rows, dtype=torch.long) + int(s) for v, s in zip(views, starts, strict=True)]
        ).to(self.device)
        positions = self._hidden(model, batch)[:, :-1][trainable][select]
        labels = batch.labels[:, 1:][trainable][select]  # the student's tokens, but for the end-of-turn
        merge = None
        if index in self._eot:
            rows = torch.cat([torch.full((len(v.rows),), v.merge_eot) for v in views]).to(self.device)
            merge = (*self._eot[index], rows)
            source, target = self._eot[index]
            labels = torch.where(rows & (labels == source), target, labels)  # the student's end-of-turn
        head = model.get_output_embeddings()
        return self._sparse(head, positions, labels, merge), [len(v.rows) for v in views]

    @property
    def collator(self) -> Collator:
        return Collator(pad_token_id(self.tokenizer))

    @torch.no_grad()
    def predict_step(self, batch: TokenBatch, batch_idx: int, dataloader_idx: int = 0) -> list[SparseOutput]:
        index = self.job_teachers[dataloader_idx]
        if self.teachers[index].template is not None and index not in self._prepared:
            raise RuntimeError(
                f"teacher {self.teachers[index].key} reads its own chat template: its samples must be "
                "aligned first (TeacherModule.prepare_jobs(jobs, <the student's template>))"
            )
        model = self.teacher_model(index)
        if index in self.aligned:  # the teacher reads its own template; rows follow the student's positions
            targets, per_sample = self.aligned_targets(model, index, batch.shas)
        else:
            targets, per_sample = self.batch_targets(model, batch)
            per_sample = per_sample.tolist()
        columns = [getattr(targets, f.name) for f in fields(SparseTargets)]
        columns = [c.cpu() if c is not None else None for c in columns]
        lengths = batch.attention_mask.sum(dim=1).tolist()
        outputs = []
        start = 0
        for sha, count, length in zip(batch.shas, per_sample, lengths, strict=True):
            rows = slice(start, start + count)
            ids, logits, lse, sample_ids, sample_counts, nll = (
                c[rows] if c is not None else None for c in columns
            )
            total_nll = float(nll.double().sum())
            outputs.append(
                SparseOutput(sha, int(length), ids, logits, lse, total_nll, sample_ids, sample_counts)
            )
            start += count
        return outputs
