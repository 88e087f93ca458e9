"""Offline preference optimisation (DPO, robust/conservative DPO, hinge, IPO, SimPO, ORPO) on pairs.

A batch holds pairs as sequences 2p (chosen) and 2p + 1 (rejected) (``PreferenceDataModule``). The
policy's log-probs are gathered at the response tokens only, chunk by chunk, and summed per sequence
with one ``index_add``; the loss is a pure function of those sums (``distill.losses.preference``).

The reference model, for the losses that need one, runs in ``prepare`` without gradients:
- ``adapter``: the policy itself with its LoRA adapter disabled (no second copy in memory);
- ``model``: a frozen model loaded from ``reference_model`` (default: the policy's starting weights);
- ``precomputed``: that frozen model runs once over every pair before the first step, its log-probs
  go to a ``ReferenceStore`` and the model is freed: a DPO step then costs what an SFT step on the
  same tokens costs, and the memory of the reference is gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from distill.losses.preference import PAIR_LOSSES, PairLoss, pair_loss
from distill.objectives.base import (
    Loss,
    LossInputs,
    Objective,
    loss_inputs,
    per_sequence,
    require_pairs,
    token_log_probs,
)
from distill.objectives.reference_store import ReferenceStore

if TYPE_CHECKING:
    from distill.train.student import StudentModule

ReferenceKind = Literal["auto", "adapter", "model", "precomputed"]
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class Preference(Objective):
    """``loss`` over each pair's sequence log-probs, plus ``sft_weight`` x the chosen response's NLL."""

    unit = "pair"

    def __init__(
        self,
        loss: str = "sigmoid",
        beta: float | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        sft_weight: float = 0.0,
        reference: ReferenceKind = "auto",
        reference_model: str | None = None,
        reference_dtype: str | None = None,
        reference_cache: str = "cache/reference",
        chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            loss: ``sigmoid`` (DPO), ``robust`` (rDPO), ``hinge`` (SLiC), ``ipo``, ``simpo`` or ``orpo``
                (the last two need no reference model).
            beta: Scale of the implicit reward (DPO family, SimPO); ORPO's lambda. Default: 2.0 for
                ``simpo`` (its paper's range is 2-10), else 0.1.
            label_smoothing: Share of flipped preference labels assumed (conservative DPO, rDPO, SimPO).
            gamma: SimPO's target reward margin.
            sft_weight: Weight of the chosen response's per-token NLL added to the loss (RPO,
                LLaMA-Factory's ``pref_ftx``); ORPO has it built in.
            reference: ``adapter`` (LoRA disabled), ``model`` (a frozen copy), ``precomputed`` (the
                frozen copy run once before training, its log-probs stored in ``reference_cache``) or
                ``auto`` (adapter when the student trains a LoRA adapter, else model).
            reference_model: Path or hub name of the frozen reference (default: the student's ``model``).
            reference_dtype: Weight dtype of the frozen reference (default: the student's).
            reference_cache: Directory of the precomputed reference log-probs.
            chunk_size: Positions whose logits exist at once (forward and backward).
        """
        if loss not in PAIR_LOSSES:
            raise ValueError(f"unknown Preference loss {loss!r}; choose one of {sorted(PAIR_LOSSES)}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"Preference label_smoothing must be in [0, 0.5); got {label_smoothing}")
        super().__init__()
        self.loss = loss
        self.spec = PAIR_LOSSES[loss]
        beta = beta if beta is not None else (2.0 if loss == "simpo" else 0.1)
        self.options = {"beta": beta, "label_smoothing": label_smoothing, "gamma": gamma}
        self.sft_weight = sft_weight
        self.reference = reference
        self.reference_model = reference_model
        self.reference_dtype = reference_dtype
        self.reference_cache = reference_cache
        self.chunk_size = chunk_size
        # a list keeps the frozen reference out of the module tree: never trained, checkpointed or exported
        self._frozen: list[nn.Module] = []
        self._precomputed: dict[str, np.ndarray] | None = None

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (*PAIR_METRICS, "nll") if self.sft_weight or self.loss == "orpo" else PAIR_METRICS

    def setup(self, student: StudentModule) -> None:
        if not self.spec.reference:
            return
        has_adapter = student.lora is not None
        self.resolved_reference = self.reference
        if self.reference == "auto":
            self.resolved_reference = "adapter" if has_adapter else "model"
        if self.resolved_reference == "adapter" and not has_adapter:
            raise ValueError("Preference reference 'adapter' needs a LoRA student (model.lora)")
        if self.resolved_reference in ("model", "precomputed") and self.reference_model is None:
            if student.model_name is None:
                raise ValueError(
                    "a student built from model_config has no starting weights to refer to: set "
                    "objective.reference_model to the path of the reference (usually the SFT model)"
                )
            self.reference_model = student.model_name
        self.reference_dtype = self.reference_dtype or student.dtype_name
        self.tokenizer = student.tokenizer

    @torch.no_grad()
    def prepare(self, batch: dict, student: StudentModule) -> None:
        if self.spec.reference and "reference_logps" not in batch:
            batch["reference_logps"] = self.reference_logps(batch, student)

    def reference_logps(self, batch: dict, student: StudentModule) -> Tensor:
        """(S,) the reference's log-prob sum of every sequence's response tokens."""
        if self.resolved_reference == "precomputed":
            if self._precomputed is None:
                self._precomputed = self.precompute(student)
            return self.stored_logps(batch)
        if self.resolved_reference == "adapter":
            with student.model.disable_adapter():
                return self._sequence_logps(student.causal_lm, batch)
        return self._sequence_logps(self.frozen_reference(batch["input_ids"].device), batch)

    def stored_logps(self, batch: dict) -> Tensor:
        size, values = batch["unit_size"], []
        for index, sha in enumerate(batch["sequence_sha"]):
            unit = self._precomputed.get(sha)
            if unit is None:
                raise KeyError(f"no precomputed reference log-probs for sample {sha}: the store is stale")
            values.append(unit[index % size])
        return torch.tensor(values, dtype=torch.float64, device=batch["input_ids"].device)

    def precompute(self, student: StudentModule) -> dict[str, np.ndarray]:
        """The reference's log-probs of every unit of the training and validation data, from the store,
        computed (this rank's share; the reference loaded, then freed) where the store lacks them."""
        from distill.data.pair_encoding import UnitCollator
        from distill.teacher.identity import model_identity

        trainer, data = student.trainer, student.trainer.datamodule
        entries = sorted(samples.directory.parent.name for samples in data.tokenized_splits().values())
        identity = model_identity(self.reference_model)
        store = ReferenceStore(
            self.reference_cache, {"reference": identity, "dtype": self.reference_dtype, "data": entries}
        )
        rank, world = trainer.global_rank, trainer.world_size
        if not store.complete and not store.has_part(rank, world):
            units = [unit for split in (data.train, data.val) for unit in split][rank::world]
            collate = UnitCollator(data.pad_id, packed=False)
            device = student.device
            model = self.frozen_reference(device)
            shas, values = [], []
            for start in range(0, len(units), data.eval_batch_size):
                batch = collate(units[start : start + data.eval_batch_size])
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                logps = self._sequence_logps(model, batch).double().reshape(-1, batch["unit_size"])
                shas += batch["sequence_sha"][:: batch["unit_size"]]
                values.append(logps.cpu().numpy())
            self._frozen.clear()  # freed: training needs no reference model from here on
            store.write_part(rank, world, shas, np.concatenate(values) if values else np.zeros((0, 2)))
            rank_zero_info(
                f"[distill] reference log-probs of {len(units):,} units stored in {store.directory}"
            )
        trainer.strategy.barrier("reference_store")
        if rank == 0 and not store.complete:
            store.finish(world)
        trainer.strategy.barrier("reference_store_done")
        return store.load()

    def frozen_reference(self, device: torch.device) -> nn.Module:
        if not self._frozen:
            from distill.train.model import load_causal_lm

            model = load_causal_lm(
                self.reference_model, None, self.tokenizer, self.reference_dtype, role="reference"
            )
            self._frozen.append(model.to(device).eval().requires_grad_(False))
        return self._frozen[0]

    def _sequence_logps(self, model: nn.Module, batch: dict) -> Tensor:
        outputs = model.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        )
        inputs = loss_inputs(outputs.last_hidden_state, model.get_output_embeddings(), batch)
        logps = token_log_probs(inputs.hidden, inputs.head, inputs.labels, self.chunk_size)
        return per_sequence(logps, inputs.sequence, inputs.num_sequences)

    def forward(self, inputs: LossInputs) -> Loss:
        require_pairs(inputs.batch, "Preference")
        logps = token_log_probs(inputs.hidden, inputs.head, inputs.labels, self.chunk_size)
        count = inputs.num_sequences
        sums = per_sequence(logps, inputs.sequence, count)  # (S,)
        tokens = per_sequence(torch.ones_like(logps), inputs.sequence, count).clamp(min=1)
        scale = tokens if self.spec.length_normalised else torch.ones_like(tokens)
        policy = sums / scale
        reference = {}
        if self.spec.reference:
            ref = inputs.batch["reference_logps"].to(policy) / scale
            reference = {"ref_chosen": ref[0::2], "ref_rejected": ref[1::2]}
        out: PairLoss = pair_loss(self.loss, policy[0::2], policy[1::2], **reference, **self.options)
        loss = out.loss
        nll = -sums[0::2] / tokens[0::2]  # the chosen response's per-token NLL
        if self.sft_weight:
            loss = loss + self.sft_weight * nll
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": sums[0::2].detach().sum(),
            "logps/rejected": sums[1::2].detach().sum(),
        }
        if "nll" in self.metric_names:
            metrics["nll"] = nll.detach().sum()
        return Loss(loss.sum(), num_units=count // 2, num_tokens=inputs.labels.numel(), sums=metrics)
