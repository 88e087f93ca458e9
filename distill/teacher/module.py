"""TeacherModule: runs teacher LMs in Lightning's predict loop and returns sparse distributions.

One predict dataloader per (teacher, split) job; the module keeps only the current job's teacher in
memory and frees it when the next teacher's job starts.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, fields
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from distill.data.batch import TokenBatch, to_device
from distill.data.batching import Collator, pad_token_id
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.data.templates import BUILTIN_TEMPLATES, ChatTemplate
from distill.pretrained import load_tokenizer
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
from distill.teacher.cross import TextAxis, teacher_view
from distill.teacher.identity import check_model_source, model_identity, tokenizer_hash
from distill.teacher.sparse import SparseOutput, Sparsity, sparse_distribution
from distill.train.model import load_causal_lm
from distill.train.quantization import Quantization, check_quantization


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
    tokenizer: str | None = None
    """The teacher's own tokenizer (a name or path; ``model``: the one saved with ``model``), when it is
    not the student's: collection then renders each record in the teacher's template and tokenizer, the
    cache keeps its top-k in its vocabulary with each position's place in the text, and each student's
    training aligns them to its own tokens (KD across tokenizers, docs/cross_tokenizer.md)."""
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


class TeacherModule(L.LightningModule):
    def __init__(
        self,
        teachers: list[Teacher],
        sparsity: Sparsity | None = None,
        chunk_size: int = 256,
        vocab_size: int | None = None,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            teachers: Teacher models, collected one after another (one in memory at a time).
            sparsity: What is kept of each distribution (``k``, ``scheme``, ``num_draws``,
                ``draw_temperature``; default: the top 64).
            chunk_size: Positions whose logits exist at once (on a CPU at V=32,000, 256 was 5-9% faster
                than 128, whose head matrix products are less efficient, and than 512, whose (512, V)
                buffers leave the CPU's caches and heap).
            vocab_size: True vocabulary size (default: the tokenizer's); ids past it are never stored.
            tokenizer: Tokenizer of the student and teachers (linked from the data module).
        """
        super().__init__()
        self.teachers = teachers
        self.sparsity = sparsity or Sparsity()
        self.chunk_size = chunk_size
        self.tokenizer_id = tokenizer or teachers[0].model
        self._vocab_size = vocab_size
        self.job_teachers: list[int] = [0]  # teacher index of each predict dataloader (prepare_jobs)
        # teachers reading their own template: index -> sha -> encoding and rows (see prepare_templates)
        self.aligned: dict[int, dict[str, TeacherSample]] = {}
        self._eot: dict[int, tuple[int, int]] = {}  # teacher index -> (its end-of-turn id, the student's)
        self._prepared: set[int] = set()  # teachers whose samples prepare_templates has seen
        self._templates: dict[int, ChatTemplate] = {}
        self._tokenizers: dict[int, PreTrainedTokenizerBase] = {}  # teachers' own tokenizers
        self._axes: dict[int, TextAxis] = {}  # teachers of another tokenizer: index -> their text axis
        self.views: dict[int, dict[str, tuple[Encoded, Any]]] = {}  # index -> sha -> (encoding, spans)
        self._loaded: tuple[int, nn.Module] | None = None
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(self.tokenizer_id)
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
        if teacher.tokenizer is not None:
            ident["tokenizer"] = tokenizer_hash(self.teacher_tokenizer(index))
        return ident

    def teacher_tokenizer(self, index: int) -> PreTrainedTokenizerBase:
        """The tokenizer teacher ``index`` reads with: its own, or the student's."""
        teacher = self.teachers[index]
        if teacher.tokenizer is None:
            return self.tokenizer
        if index not in self._tokenizers:
            source = teacher.model if teacher.tokenizer == "model" else teacher.tokenizer
            if source is None:
                raise ValueError(f"teacher {teacher.key}: tokenizer 'model' needs the teacher's model")
            self._tokenizers[index] = load_tokenizer(source)
        return self._tokenizers[index]

    def text_axis(self, index: int, student_template: ChatTemplate | None) -> TextAxis:
        """Where teacher ``index`` (of another tokenizer) places its positions in the text: its tokenizer
        and its template (by default the student's, rendered with the teacher's special tokens)."""
        if index not in self._axes:
            teacher, tokenizer = self.teachers[index], self.teacher_tokenizer(index)
            name, template = teacher.template, None
            if name is None and student_template is not None:  # a built-in by name: its special tokens
                builtin = student_template.name in BUILTIN_TEMPLATES
                name = student_template.name if builtin else student_template.source
            if name is not None:
                template = resolve_teacher_template(tokenizer, name, teacher.end_of_turn, teacher.model)
            self._axes[index] = TextAxis(tokenizer, template, f"teacher {teacher.key!r}")
        return self._axes[index]

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
        own: dict[int, list[Encoded]] = {
            i: [] for i, t in enumerate(self.teachers) if t.template is not None or t.tokenizer is not None
        }
        for index, samples in jobs:
            if index in own:
                own[index].extend(samples)
        self.views = {}
        for index in [i for i in own if self.teachers[i].tokenizer is not None]:
            axis = self.text_axis(index, student_template)  # renders every sample before a teacher loads
            self.views[index] = {s.sha: teacher_view(axis, s) for s in own.pop(index)}
        self.prepare_templates(own, student_template)
        self._prepared.update(self.views)

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
            self.teacher_tokenizer(index),
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
        self,
        model: nn.Module,
        batch: TokenBatch,
        merge: tuple[int, int] | None = None,
        vocab_size: int | None = None,
    ) -> tuple[SparseTargets, Tensor]:
        """The teacher's sparse distribution (and NLL of the labels) at every trainable position of
        ``batch`` (row-major, i.e. sample after sample, packed rows included) and the number of those
        positions per row. ``merge`` = (the teacher's end-of-turn id, the student's): the first's
        probability moves onto the second at every position, and labels of the first become the second.
        ``vocab_size``: the teacher's own (another tokenizer's), if not the student's."""
        hidden = self._hidden(model, batch)
        trainable = batch.labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        positions = hidden[:, :-1][trainable]  # (N, H)
        labels = batch.labels[:, 1:][trainable]  # (N,)
        head = model.get_output_embeddings()
        if merge is None:
            return self._sparse(head, positions, labels, vocab_size=vocab_size), trainable.sum(dim=1)
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
        vocab_size: int | None = None,
    ) -> SparseTargets:
        """Sparse distributions of (N, H) hidden states and the NLL of the (N,) ``labels``, ``chunk_size``
        rows of logits at a time; ``merge`` = (source id, target id, (N,) bool rows) moves source's
        probability onto target first."""

        def part(i: int, n: int) -> tuple:
            logits = head(positions[i : i + n])[:, : vocab_size or self.vocab_size]
            if merge is not None:
                logits = merge_token(logits, merge[0], merge[1], merge[2][i : i + n])
            label_logits = logits.gather(1, labels[i : i + n, None]).squeeze(1).float()  # (n,)
            # read before sparse_distribution takes float32 logits as its scratch buffer
            kept = self.sparsity
            columns = sparse_distribution(
                logits, kept.head, kept.scheme, kept.num_draws, kept.draw_temperature, scratch=True
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
        teacher = self.teachers[index]
        if (teacher.template or teacher.tokenizer) is not None and index not in self._prepared:
            raise RuntimeError(
                f"teacher {self.teachers[index].key} reads its own chat template: its samples must be "
                "aligned first (TeacherModule.prepare_jobs(jobs, <the student's template>))"
            )
        model = self.teacher_model(index)
        spans = None
        if index in self.views:  # another tokenizer: its own encodings, every trained position kept
            views = [self.views[index][sha] for sha in batch.shas]
            pad = pad_token_id(self.teacher_tokenizer(index))
            batch = to_device(Collator(pad)([encoded for encoded, _ in views]), self.device)
            spans = [placed for _, placed in views]
        if index in self.aligned:  # the teacher reads its own template; rows follow the student's positions
            targets, per_sample = self.aligned_targets(model, index, batch.shas)
        else:
            vocab = len(self.teacher_tokenizer(index)) if index in self.views else None
            targets, per_sample = self.batch_targets(model, batch, vocab_size=vocab)
            per_sample = per_sample.tolist()
        columns = [getattr(targets, f.name) for f in fields(SparseTargets)]
        columns = [c.cpu() if c is not None else None for c in columns]
        lengths = batch.attention_mask.sum(dim=1).tolist()
        outputs = []
        start = 0
        for i, (sha, count, length) in enumerate(zip(batch.shas, per_sample, lengths, strict=True)):
            rows = slice(start, start + count)
            ids, logits, lse, sample_ids, sample_counts, nll = (
                c[rows] if c is not None else None for c in columns
            )
            total_nll = float(nll.double().sum())
            outputs.append(
                SparseOutput(sha, int(length), ids, logits, lse, total_nll, sample_ids, sample_counts)
            )
            if spans is not None:
                outputs[-1].spans = spans[i]
            start += count
        return outputs
