"""The reference model of DPO-family and KTO objectives: its log-probs of each sequence's response.

- ``adapter``: the policy itself with its LoRA adapter disabled (no second copy in memory);
- ``model``: a frozen model loaded from ``model`` (default: the policy's starting weights, loaded with
  the student's ``from_pretrained`` arguments: the same revision), kept out of the student's module
  tree (never trained, checkpointed or exported);
- ``precomputed``: that frozen model runs once over every unit of the data before the first step, its
  log-probs go to a ``ReferenceStore`` and the model is freed: a step then costs what an SFT step on
  the same tokens costs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from distill.data.batch import TokenBatch, UnitBatch, to_device
from distill.objectives.base import LossInputs, loss_inputs, sequence_log_probs, token_log_probs
from distill.objectives.context import Context
from distill.objectives.reference_store import ReferenceStore
from distill.progress import Progress
from distill.train.quantization import Quantization, check_quantization

ReferenceKind = Literal["auto", "adapter", "model", "precomputed"]


class Reference:
    """The reference of an objective that has one: ``objective.reference: {kind: ..., model: ...}``."""

    def __init__(
        self,
        kind: ReferenceKind = "auto",
        model: str | None = None,
        dtype: str | None = None,
        quantization: Quantization | None = None,
        cache: str = "cache/reference",
    ) -> None:
        """
        Args:
            kind: ``adapter`` (the policy with its LoRA adapter disabled), ``model`` (a frozen copy),
                ``precomputed`` (the frozen copy run once before training, its log-probs stored in
                ``cache``; preference pairs only) or ``auto`` (adapter when the student trains a LoRA
                adapter, else model).
            model: Path or hub name of the frozen reference (default: the student's ``model``, loaded with
                its ``from_pretrained`` arguments).
            dtype: Weight dtype of the frozen reference (default: the student's).
            quantization: Load the frozen reference with 8- or 4-bit bitsandbytes weights (a CUDA GPU and
                the ``bnb`` extra; default: unquantized, whatever the student's).
            cache: Directory of the precomputed reference log-probs.
        """
        check_quantization(quantization, "objective.reference.quantization")
        self.kind = kind
        self.model = model
        self.dtype = dtype
        self.cache = cache
        self.chunk_size = 1024  # the objective's, from setup
        self.quantization = quantization
        self.model_kwargs: dict = {}  # from_pretrained arguments of the frozen model (see setup)
        # a list keeps the frozen model out of the student's module tree
        self.frozen: list[nn.Module] = []
        self.stored: dict[str, np.ndarray] | None = None

    def setup(self, context: Context, owner: str, chunk_size: int) -> None:
        """Resolve ``auto`` and the default model from the student (``owner`` names the objective, whose
        ``chunk_size`` the reference's forwards use)."""
        self.chunk_size = chunk_size
        has_adapter = context.policy.has_adapter
        if self.kind == "auto":
            self.kind = "adapter" if has_adapter else "model"
        if self.kind == "adapter" and not has_adapter:
            raise ValueError(f"{owner} reference 'adapter' needs a LoRA student (model.lora)")
        if self.kind == "adapter" and self.quantization is not None:
            raise ValueError(
                f"{owner} reference.quantization quantizes a frozen reference: the 'adapter' reference is "
                "the student's own base; set reference.kind: model or precomputed, or drop its quantization"
            )
        origin = context.origin
        if self.kind in ("model", "precomputed") and self.model is None:
            if origin.model is None:
                raise ValueError(
                    "a student built from model_config has no starting weights to refer to: set "
                    "objective.reference.model to the path of the reference (usually the SFT model)"
                )
            self.model = origin.model
        if self.model == origin.model:  # the starting weights: at the revision the student loaded
            self.model_kwargs = dict(origin.model_kwargs)
        self.dtype = self.dtype or origin.dtype
        self.tokenizer = context.tokenizer
        if self.kind == "precomputed" and context.data.units is None:
            raise ValueError(
                f"{owner} reference 'precomputed' runs once over the data's units, which "
                f"{context.data.source} does not give: use distill.PreferenceDataModule"
            )
        if self.kind == "model" and context.sharded:
            rank_zero_warn(
                f"[distill] {owner}'s frozen reference is a whole copy of the model on every rank, not "
                "sharded: with FSDP or ZeRO-3 use reference adapter (LoRA) or precomputed"
            )
        self.context = context

    @torch.no_grad()
    def logps(self, batch: TokenBatch) -> Tensor:
        """(S,) the reference's log-prob sum of every sequence's response tokens."""
        if self.kind == "precomputed":
            if self.stored is None:
                self.stored = self.precompute(batch.input_ids.device)
            return self.stored_logps(batch)
        if self.kind == "adapter":
            with self.context.policy.adapter_disabled() as base:
                return sequence_logps(base, batch, self.chunk_size)
        return sequence_logps(self.frozen_model(batch.input_ids.device), batch, self.chunk_size)

    @torch.no_grad()
    def token_logps(self, batch: TokenBatch, temperature: float = 1.0) -> Tensor:
        """(N,) the reference's log-prob of every labelled token (on-policy completions: never stored)."""
        if self.kind == "adapter":
            with self.context.policy.adapter_disabled() as base:
                return token_logps(base, batch, self.chunk_size, temperature)
        if self.kind == "model":
            model = self.frozen_model(batch.input_ids.device)
            return token_logps(model, batch, self.chunk_size, temperature)
        raise ValueError(f"a {self.kind!r} reference has no log-probs of sampled completions")

    def stored_logps(self, batch: UnitBatch) -> Tensor:
        size, values = batch.unit_size, []
        for index, sha in enumerate(batch.sequence_shas):
            unit = self.stored.get(sha)
            if unit is None:
                raise KeyError(f"no precomputed reference log-probs for sample {sha}: the store is stale")
            values.append(unit[index % size])
        return torch.tensor(values, dtype=torch.float64, device=batch.input_ids.device)

    def precompute(self, device: torch.device) -> dict[str, np.ndarray]:
        """The reference's log-probs of every unit of the training and validation data, from the store,
        computed (this rank's share; the reference loaded onto ``device``, then freed) where the store
        lacks them or holds them damaged."""
        context = self.context
        units, rank, world = context.data.units, context.rank, context.world_size
        store = ReferenceStore(self.cache, self.store_identity(units.identity()))

        def compute() -> tuple[list[str], np.ndarray]:
            model = self.frozen_model(device)
            shas, values = [], []
            total = units.unit_count(rank, world)
            with Progress(total, "precomputing reference log-probs", "units", enabled=rank == 0) as progress:
                for batch in units.unit_batches(rank, world):
                    batch = to_device(batch, device)
                    logps = sequence_logps(model, batch, self.chunk_size).double()
                    shas += batch.sequence_shas[:: batch.unit_size]
                    values.append(logps.reshape(-1, batch.unit_size).cpu().numpy())
                    progress.update(len(values[-1]))
            self.frozen.clear()  # freed: training needs no reference model from here on
            rank_zero_info(
                f"[distill] reference log-probs of {len(shas):,} units computed for {store.directory}"
            )
            return shas, np.concatenate(values) if values else np.zeros((0, 2))

        return store.fill(rank, world, compute, context.barrier)

    def store_identity(self, data: list[str]) -> dict:
        """What the precomputed log-probs of ``data`` (its tokenized-cache entries) are a function of."""
        from distill.teacher.identity import model_identity

        identity = {"reference": model_identity(self.model), "dtype": self.dtype, "data": data}
        # each absent when unset: stores written before stay valid
        if self.quantization is not None:
            identity["quantization"] = self.quantization.identity()
        if self.model_kwargs:  # a revision, or remote code, changes the weights a hub name stands for
            identity["model_kwargs"] = self.model_kwargs
        return identity

    def frozen_model(self, device: torch.device) -> nn.Module:
        if not self.frozen:
            from distill.train.model import load_causal_lm

            model = load_causal_lm(
                self.model,
                None,
                self.tokenizer,
                self.dtype,
                "reference",
                self.quantization,
                device,
                options=self.model_kwargs,
            )
            if self.quantization is None:  # a quantized one is loaded onto the device, and stays there
                model = model.to(device)
            self.frozen.append(model.eval().requires_grad_(False))
        return self.frozen[0]


def model_loss_inputs(model: nn.Module, batch: TokenBatch) -> LossInputs:
    """``model``'s ``LossInputs`` of ``batch``: its final hidden states at the loss positions."""
    outputs = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return loss_inputs(outputs.last_hidden_state, model.get_output_embeddings(), batch)


def sequence_logps(model: nn.Module, batch: TokenBatch, chunk_size: int = 1024) -> Tensor:
    """(S,) ``model``'s log-prob sum of every sequence's labelled tokens (chunked at loss positions)."""
    return sequence_log_probs(model_loss_inputs(model, batch), chunk_size)


def token_logps(
    model: nn.Module, batch: TokenBatch, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """(N,) ``model``'s log-prob of every labelled token, in ``LossInputs`` order."""
    inputs = model_loss_inputs(model, batch)
    return token_log_probs(inputs.hidden, inputs.head, inputs.labels, chunk_size, temperature)
