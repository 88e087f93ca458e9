"""On-policy distillation: the student samples completions of the prompts, the teachers grade every
sampled token (GKD, Agarwal et al. 2024; the reverse-KL "on-policy distillation" of Qwen3 and
Thinking Machines), on the one training path.

``prepare`` picks where a batch's completions come from: the student (a share ``lmbda`` of the training
batches, and every validation batch when ``lmbda`` > 0), the first teacher (``seq_kd``: sequence-level
KD) or the dataset's responses (``PromptDataModule(responses=True)``). The teachers, held in memory, run
on the prompt + completion rows (``OnlineTeachers``: one with its own chat template reads the prompt in
it) and attach their targets to the rows as the KD data module attaches cached ones; the forward is then
the KD objective's, or the reverse-KL policy-gradient form, on the completion tokens.
"""

from __future__ import annotations

import math
import random

import torch

from distill.data.batch import CompletionBatch, PromptBatch, extended
from distill.losses.kd import LOSSES, reverse_kl_policy_gradient
from distill.objectives.base import Loss, LossInputs, Objective, token_log_probs
from distill.objectives.context import Context, Step
from distill.objectives.kd import Distillation, batch_targets, teacher_ce_names
from distill.objectives.rollouts import sampling_seed
from distill.ranges import require
from distill.rollout.completions import Completions, rollout_batch
from distill.rollout.engine import Engine, Sampler, Sampling, TransformersEngine, rollout_seed
from distill.teacher.module import Teacher
from distill.teacher.online import OnlineTeachers

POLICY_GRADIENT = "reverse_kl_pg"


class OnPolicyDistillation(Objective):
    accepts = ("prompts",)

    def __init__(
        self,
        teachers: list[Teacher],
        loss: str = "jsd",
        beta: float = 0.5,
        skew: float = 0.1,
        temperature: float = 1.0,
        lmbda: float = 1.0,
        seq_kd: bool = False,
        teacher_weights: list[float] | None = None,
        online_k: int = 64,
        num_generations: int = 1,
        sampling: Sampling | None = None,
        seed: int = 0,
        chunk_size: int = 1024,
        engine: Engine | None = None,
    ) -> None:
        """
        Args:
            teachers: Teacher models held in memory (each may read its own chat ``template``).
            loss: A KD divergence on the teachers' top-``online_k`` + tail (``jsd``, as GKD, with
                ``beta``; ``forward_kl``, ``reverse_kl``, ``skew_kl``, ``skew_reverse_kl``), or
                ``reverse_kl_pg``: the policy-gradient form, per sampled token the advantage
                ``log p_teacher - log p_student`` (needs only the teacher's log-prob of the token).
            beta: JSD interpolation (0: forward KL, 1: reverse KL).
            skew: Skew of ``skew_kl``/``skew_reverse_kl``.
            temperature: Softens both distributions in the KD divergence (scaled by T**2).
            lmbda: Share of training batches whose completions the student samples; the others use the
                dataset's responses (or, with ``seq_kd``, the teacher's samples).
            seq_kd: Batches the student does not sample are sampled from the first teacher (sequence-level
                KD) instead of taken from the dataset.
            teacher_weights: Mixture weights of several teachers (default: equal).
            online_k: Top-k kept of each teacher's distribution at every position.
            num_generations: Completions sampled per prompt.
            sampling: How completions are drawn (``distill.rollout.Sampling``); the divergences compare the
                untempered distributions unless ``temperature`` says otherwise.
            seed: Seed of the sampling and of the lmbda draws (with the epoch and the prompts or step: a
                resumed fit samples the same).
            chunk_size: Positions whose logits exist at once (forward and backward).
            engine: What samples (default: ``TransformersEngine``, ``model.generate``).
        """
        require("objective.chunk_size", chunk_size, at_least=1)
        require("objective.temperature", temperature, above=0)
        require("objective.beta", beta, at_least=0, at_most=1)
        require("objective.skew", skew, at_least=0, at_most=1)
        require("objective.online_k", online_k, at_least=1)
        if loss != POLICY_GRADIENT and (loss not in LOSSES or loss == "sampled_ce"):
            choices = sorted({*LOSSES, POLICY_GRADIENT} - {"sampled_ce"})
            raise ValueError(f"unknown OnPolicyDistillation loss {loss!r}; choose one of {choices}")
        if not teachers:
            raise ValueError("give at least one teacher (objective.teachers)")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda (the share of batches the student samples) must be in [0, 1]: {lmbda}")
        if loss == POLICY_GRADIENT and (lmbda < 1.0 or seq_kd):
            raise ValueError(
                "the reverse_kl_pg form is a policy gradient: it is unbiased on the student's own samples "
                "only, so it needs lmbda: 1.0 and no seq_kd"
            )
        if seq_kd and teachers[0].template is not None:
            raise ValueError(
                "seq_kd samples from the first teacher, which must read the student's chat template "
                f"(teacher {teachers[0].key!r} has template {teachers[0].template!r})"
            )
        require("objective.num_generations", num_generations, at_least=1)
        super().__init__()
        self.loss = loss
        self.kd = Distillation(
            loss="reverse_kl" if loss == POLICY_GRADIENT else loss,
            temperature=temperature,
            beta=beta,
            skew=skew,
            teacher_weights=teacher_weights,
            chunk_size=chunk_size,
        )
        self.teacher_configs = list(teachers)
        self.teacher_weights = teacher_weights
        self.online_k = online_k
        self.lmbda = lmbda
        self.seq_kd = seq_kd
        self.num_generations = num_generations
        self.sampling = sampling or Sampling()
        self.seed = seed
        self.chunk_size = chunk_size
        self.engine = engine or TransformersEngine()
        self.teachers: OnlineTeachers | None = None  # a plain object: never trained, checkpointed, exported

    @property
    def metric_names(self) -> tuple[str, ...]:
        teacher_ce = tuple(teacher_ce_names([t.key for t in self.teacher_configs]).values())
        kd = ("ce", "kd") if self.loss == POLICY_GRADIENT else ("ce", "kd", "agree")
        return (*kd, *teacher_ce, "on_policy")

    def setup(self, context: Context) -> None:
        data = context.data
        needs_responses = self.lmbda == 0.0 or (self.lmbda < 1.0 and not self.seq_kd)
        if needs_responses and not data.responses:
            raise ValueError(
                f"with lmbda {self.lmbda}{'' if self.seq_kd else ' and no seq_kd'}, batches train on the "
                "dataset's responses: set data.responses: true (SFT files whose last turn is the response)"
            )
        self.teachers = OnlineTeachers(self.teacher_configs, self.online_k, context.origin.tokenizer)
        self.sampler = Sampler(self.engine, self.sampling, list(data.stop_ids), data.pad_id, context.sharded)
        self.template = data.chat_template
        self.policy = context.policy

    def completion_source(self, step: Step) -> str:
        """``student``, ``teacher`` or ``dataset``: where this batch's completions come from."""
        if not step.training:
            return "student" if self.lmbda > 0 else "dataset"
        otherwise = "teacher" if self.seq_kd else "dataset"
        if self.lmbda in (0.0, 1.0):
            return "student" if self.lmbda else otherwise
        # a draw per micro-batch, the same on every rank (sharded generation needs all ranks to sample)
        # and after a resume
        u = random.Random(rollout_seed(self.seed, "lmbda", step.epoch, step.batch)).random()
        return "student" if u < self.lmbda else otherwise

    @torch.no_grad()
    def prepare(self, batch: PromptBatch, step: Step) -> CompletionBatch:
        source = self.completion_source(step)
        prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
        if source == "dataset":
            ids, mask = batch.response_ids, batch.response_mask
            completions = Completions(ids, mask, stopped=mask.any(dim=1))  # they end with their end-of-turn
            samples = 1
        else:
            model = self.policy.model if source == "student" else self.teachers.models(prompt_ids.device)[0]
            samples, seed = self.num_generations, sampling_seed(self.seed, step, batch.shas)
            completions = self.sampler(model, prompt_ids, prompt_mask, samples, seed)
        rows = rollout_batch(prompt_ids, prompt_mask, completions)
        messages = [m for m in batch.messages for _ in range(samples)]
        per_teacher = self.teachers.completion_targets(rows, completions, messages, self.template)
        return extended(
            rows,
            CompletionBatch,
            targets=batch_targets(per_teacher, self.teachers.names, self.teachers.vocab_size),
            prompt_shas=batch.shas,
            on_policy=source == "student",
        )

    def forward(self, inputs: LossInputs) -> Loss:
        batch = inputs.batch
        out = self.policy_gradient(inputs) if self.loss == POLICY_GRADIENT else self.kd(inputs)
        tokens = inputs.labels.numel()
        out.sums["on_policy"] = inputs.hidden.new_tensor(float(tokens if batch.on_policy else 0))
        return out

    def policy_gradient(self, inputs: LossInputs) -> Loss:
        """The reverse-KL policy-gradient loss over the sampled tokens, the teachers mixed by weight."""
        batch = inputs.batch
        logps = token_log_probs(inputs.hidden, inputs.head, inputs.labels, self.chunk_size)
        per_teacher = [-t.nll.to(logps) for t in batch.targets.per_teacher]  # log p_teacher(sampled token)
        weights = self.teacher_weights or [1.0] * len(per_teacher)
        if len(weights) != len(per_teacher):
            raise ValueError(f"{len(per_teacher)} teachers but {len(weights)} teacher_weights")
        log_w = [math.log(w / sum(weights)) for w in weights]
        teacher = torch.logsumexp(torch.stack([lp + w for lp, w in zip(per_teacher, log_w, strict=True)]), 0)
        loss, estimate = reverse_kl_policy_gradient(logps, teacher)
        sums = {"ce": -logps.detach().sum(), "kd": estimate.sum(), **self.kd.teacher_ce_sums(batch)}
        tokens = inputs.labels.numel()
        return Loss(loss.sum(), num_units=tokens, num_tokens=tokens, sums=sums)
