"""The KD objective: sparse teacher targets (cached, or from a teacher held in memory) -> token loss sums."""

from __future__ import annotations

from dataclasses import replace

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from distill.data.batch import TokenBatch
from distill.losses.kd import LOSSES, kd_terms, loss_ids, mix_teachers, student_log_probs, teacher_buckets
from distill.objectives.base import Loss, LossInputs, Objective, in_chunks
from distill.objectives.context import Context, Step
from distill.ranges import require
from distill.targets import BatchTargets, SparseTargets, teacher_top1
from distill.teacher.module import Teacher
from distill.teacher.online import OnlineTeachers


class Distillation(Objective):
    """``alpha * T**2 * KD_T(teacher || student) + (1 - alpha) * CE`` per trainable token.

    Targets come from the batch (``batch.targets``: one ``SparseTargets`` per teacher, aligned with the
    trainable positions, as the KD data module builds them from the cache), or, for online KD, from
    ``online`` teachers run on the same batch in memory. Several teachers are mixed with
    ``teacher_weights`` over the union of their heads (at temperature 1; the loss then applies T to the
    mixture), so the weights can change without recollecting. Online teachers run in ``prepare`` and
    attach to the batch what the KD data module attaches from the cache.

    Beside the student's ``ce`` it logs each teacher's own cross-entropy on the same labels
    (``teacher_ce``, or ``teacher_ce/<name>`` with several teachers): a teacher whose CE is above the
    student's has little to teach. Cached teachers' NLL sums arrive in ``batch.targets.nll``
    ({name: sum over the batch's trainable tokens}); online teachers' are computed from their logits.
    """

    def __init__(
        self,
        loss: str = "forward_kl",
        temperature: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
        teacher_weights: list[float] | None = None,
        chunk_size: int = 1024,
        online: list[Teacher] | None = None,
        online_k: int = 64,
    ) -> None:
        """
        Args:
            loss: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl`` or
                ``sampled_ce`` (for caches collected with ``scheme: sampled``).
            temperature: Softens both distributions; the KD term is scaled by T**2.
            alpha: Weight of the KD term; ``1 - alpha`` goes to the hard-label cross-entropy.
            beta: JSD interpolation (0: forward KL, 1: reverse KL).
            skew: Skew of ``skew_kl``/``skew_reverse_kl`` (DistiLLM).
            teacher_weights: Mixture weights of several teachers (default: equal).
            chunk_size: Positions whose logits exist at once (forward and backward).
            online: Teachers held in memory and run on each batch instead of reading a cache.
            online_k: Top-k kept from the online teachers' full distributions.
        """
        require("objective.chunk_size", chunk_size, at_least=1)
        require("objective.temperature", temperature, above=0)
        require("objective.beta", beta, at_least=0, at_most=1)
        require("objective.skew", skew, at_least=0, at_most=1)
        require("objective.online_k", online_k, at_least=1)
        if loss not in LOSSES:
            raise ValueError(f"unknown Distillation loss {loss!r}; choose one of {sorted(LOSSES)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"Distillation alpha (the KD term's weight; 1 - alpha goes to cross-entropy) must be in "
                f"[0, 1]; got {alpha}"
            )
        if online and any(t.template is not None or t.tokenizer is not None for t in online):
            raise ValueError(
                "online teachers read the student's batch: a teacher template or tokenizer of its own "
                "needs cached KD (data.teachers)"
            )
        super().__init__()
        self.loss = loss
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.skew = skew
        self.teacher_weights = teacher_weights
        self.chunk_size = chunk_size
        self.online = online
        self.online_k = online_k
        # a plain object: the teachers stay out of the module tree (never trained, checkpointed, exported)
        self.teachers: OnlineTeachers | None = None
        self.teacher_names = [t.key for t in online] if online else []
        self.cross_tokenizer = False  # cached teachers of another tokenizer (set up from the data)
        self.val_history: list[tuple[float, float]] = []  # (val ce, val kd) of this fit's validations
        self.told_losing = False

    @property
    def metric_names(self) -> tuple[str, ...]:
        aligned = ("aligned_share", "mapped_mass") if self.cross_tokenizer else ()
        teacher_ce = teacher_ce_names(self.teacher_names).values() or ["teacher_ce"]
        return ("ce", "kd", "agree", *teacher_ce, *aligned)

    @staticmethod
    def derived_metrics(values: dict[str, Tensor]) -> dict[str, Tensor]:
        """``mapped_mass`` as a mean over the aligned positions (it is summed over them)."""
        if "mapped_mass" in values:
            values = {
                **values,
                "mapped_mass": values["mapped_mass"] / values["aligned_share"].clamp(min=1e-12),
            }
        return values

    def validated(self, values: dict[str, Tensor]) -> None:
        """Say once when KD is losing: the student fits the teacher better and better, the labels no more."""
        self.val_history.append((float(values["ce"]), float(values["kd"])))
        if self.told_losing or not kd_stalled(self.val_history):
            return
        self.told_losing = True
        ce, kd = zip(*self.val_history, strict=True)
        rank_zero_info(
            f"[distill] KD is losing: val/ce has not improved for {STALL_PATIENCE} validations (best "
            f"{min(ce):.4f}, now {ce[-1]:.4f}) while the KD term still falls ({kd[-STALL_PATIENCE - 1]:.4f} "
            f"-> {kd[-1]:.4f}). Try a lower alpha (objective.alpha {self.alpha} -> 0.5), more "
            "steps, and check the teacher's own perplexity on this data (val/teacher_ce beside val/ce: a "
            "teacher not far better than the student has little to teach)."
        )

    def mix(self, per_teacher: list[SparseTargets], vocab_size: int) -> SparseTargets:
        """One teacher's targets as they are, several mixed with ``teacher_weights``."""
        if len(per_teacher) == 1:
            return per_teacher[0]
        weights = self.teacher_weights or [1.0] * len(per_teacher)
        if len(weights) != len(per_teacher):
            raise ValueError(f"{len(per_teacher)} teachers but {len(weights)} teacher_weights")
        return mix_teachers(per_teacher, weights, vocab_size)

    def setup(self, context: Context) -> None:
        """Learn the student's tokenizer (online teachers read its ids) and the cached teachers' names."""
        self.tokenizer_id = context.origin.tokenizer
        if self.online is None:
            self.teacher_names = list(context.data.teacher_names)
            self.cross_tokenizer = context.data.cross_tokenizer

    @property
    def needs_teacher_targets(self) -> bool:
        return self.online is None

    @torch.no_grad()
    def prepare(self, batch: TokenBatch, step: Step) -> TokenBatch:
        """Online teachers run on the batch (loaded on the first one) and attach what a cached batch
        holds: their targets, the vocabulary size and their NLL sums of the labels."""
        if self.online is None:
            return batch
        if self.teachers is None:
            self.teachers = OnlineTeachers(self.online, self.online_k, self.tokenizer_id)
        targets = batch_targets(self.teachers.targets(batch), self.teachers.names, self.teachers.vocab_size)
        return replace(batch, targets=targets)

    def teacher_ce_sums(self, batch: TokenBatch) -> dict[str, Tensor]:
        """Each teacher's NLL of the labels summed over the batch, under its metric name."""
        sums = batch.targets.nll
        if len(sums) == 1 and len(self.teacher_names) <= 1:
            return {"teacher_ce": next(iter(sums.values()))}
        names = teacher_ce_names(self.teacher_names or list(sums))
        return {names[name]: value for name, value in sums.items() if name in names}

    def forward(self, inputs: LossInputs) -> Loss:
        hidden, head, labels, batch = inputs.hidden, inputs.head, inputs.labels, inputs.batch
        per_teacher, vocab_size = batch.targets.per_teacher, int(batch.targets.vocab_size)
        teacher_ce = self.teacher_ce_sums(batch)
        targets = self.mix(per_teacher, vocab_size).to(hidden.device)
        if targets.num_positions != labels.shape[0]:
            raise ValueError(
                f"{targets.num_positions} teacher positions for {labels.shape[0]} trainable tokens: "
                "the cache does not match the data (collected with another template or max length?)"
            )
        if targets.ids.shape[-1] == 0 and self.loss != "sampled_ce":
            raise ValueError(
                f"the cache holds sampled targets only (no top-k): use loss sampled_ce, not {self.loss}"
            )
        # the teacher's side needs no gradient: once per batch, not in every (recomputed) chunk
        teacher = teacher_buckets(targets, vocab_size, self.temperature)

        def chunk(h: Tensor, y: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            logits = head(h)
            if logits.shape[-1] > vocab_size:  # a padded head's extra rows are not tokens
                logits = logits[:, :vocab_size]  # (only then: a no-op slice still costs a dense backward)
            return *student_log_probs(logits, ids, y, self.temperature), logits.argmax(-1)

        # only the vocabulary-wide pass runs per chunk; the (P, M) terms once, over all positions (their
        # many small ops per chunk, recomputed in backward, cost KD up to a fifth of its speed on a CPU)
        ids = loss_ids(teacher, self.loss)
        picked, ce, predicted = in_chunks(chunk, hidden, labels, ids, chunk_size=self.chunk_size)
        terms = kd_terms(
            picked,
            ce,
            teacher,
            kind=self.loss,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            skew=self.skew,
        )
        total, kd, aligned = terms.total, terms.kd, batch.targets.aligned
        extra = {}
        if aligned is not None:  # a position aligned with no teacher distribution: the hard label alone
            aligned = aligned.to(hidden.device)
            total, kd = torch.where(aligned, total, ce), kd.masked_fill(~aligned, 0.0)
            mass = batch.targets.mapped_mass.to(hidden.device)
            extra = {"aligned_share": aligned.sum(), "mapped_mass": mass.masked_fill(~aligned, 0.0).sum()}
        loss_sum, kd_sum, ce_sum = total.sum(), kd.detach().sum(), terms.ce.detach().sum()
        correct, agree = (predicted == labels).sum(), (predicted == teacher_top1(targets)).sum()
        sums = {"ce": ce_sum, "kd": kd_sum, "agree": agree, **teacher_ce, **extra}
        tokens = labels.numel()
        return Loss(loss_sum, num_units=tokens, num_tokens=tokens, correct=correct, sums=sums)


def batch_targets(per_teacher: list[SparseTargets], names: list[str], vocab_size: int) -> BatchTargets:
    """Teachers' targets at a batch's trainable positions, as the KD data module attaches cached ones."""
    nll = {name: t.nll.double().sum() for name, t in zip(names, per_teacher, strict=True)}
    return BatchTargets(per_teacher, vocab_size, nll)


def teacher_ce_names(teachers: list[str]) -> dict[str, str]:
    """Teacher name -> its CE metric: ``teacher_ce`` for one teacher, ``teacher_ce/<name>`` for several."""
    if len(teachers) == 1:
        return {teachers[0]: "teacher_ce"}
    return {name: f"teacher_ce/{name}" for name in teachers}


STALL_PATIENCE = 2  # validations without a better val/ce before KD is said to be losing


def kd_stalled(history: list[tuple[float, float]], patience: int = STALL_PATIENCE) -> bool:
    """Whether, over the last ``patience`` validations ((val ce, val kd) each), val/ce stayed above its best
    before them while the KD term kept falling (each below the one before)."""
    if len(history) <= patience:
        return False
    ce, kd = zip(*history, strict=True)
    no_better = min(ce[-patience:]) >= min(ce[:-patience])
    return no_better and all(b < a for a, b in zip(kd[-patience - 1 :], kd[-patience:], strict=False))
