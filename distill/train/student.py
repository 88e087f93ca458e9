"""StudentModule: a Hugging Face causal LM (optionally with LoRA) trained on one pluggable objective."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from distill.data.batch import PromptBatch, TokenBatch, UnbuiltBatch
from distill.data.batching import pad_token_id
from distill.data.facts import DataFacts
from distill.data.resume import trained_position
from distill.objectives.base import Loss, Objective, check_pairing, loss_inputs
from distill.objectives.ce import CrossEntropy
from distill.objectives.context import Context, Origin, Policy, Step, unwrapped
from distill.train.flops import ModelShape, model_shape, transformer_flops
from distill.train.metrics import ObjectiveMetrics
from distill.train.model import LoraOptions, add_lora, load_causal_lm, student_tokenizer
from distill.train.neftune import add_embedding_noise
from distill.train.optim import AdamW, weight_decay_groups
from distill.train.quantization import Quantization, check_quantization, prepare_for_kbit_training
from distill.train.randomness import CHECKPOINT_KEY, draw_run_seed, seed_step
from distill.train.schedule import SchedulerCallable, WarmupDecay
from distill.train.sharding import (
    flat_parameters,
    shard_adapter_apart,
    sharded,
    transformers_zero3,
    unpartitioned,
)

STEP_BATCH = "batch"  # in a training or evaluation step's output: the batch the step ran on


def step_batch(outputs: Any, batch: Any) -> Any:
    """What a step ran on, for callbacks that count it: the batch its objective prepared (completion rows
    of the loader's prompts, a built round's samples), else the loader's."""
    return outputs[STEP_BATCH] if isinstance(outputs, dict) and STEP_BATCH in outputs else batch


def unit_mean_scale(units: Tensor, accumulate_grad_batches: int, world_size: int) -> Tensor:
    """What turns a loss summed over units (tokens, pairs) into the mean over ``units`` (all ranks').

    Lightning divides every micro-batch's loss by ``accumulate_grad_batches`` and the strategy averages
    gradients over ``world_size`` ranks; the factor undoes both and divides by the units instead.
    """
    return accumulate_grad_batches * world_size / units.clamp(min=1.0)


@contextmanager
def seeded_noise(seed: int | None, device: torch.device) -> Iterator[None]:
    """Dropout and NEFTune noise drawn from ``seed``, the global generators untouched (``None``: drawn
    from them). Recomputation in backward (gradient checkpointing) restores the state the forward saw."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def every_rank(state: dict | None) -> list[dict | None]:
    """``state`` of every rank, by rank (a collective: Lightning builds a checkpoint on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


class StudentModule(L.LightningModule):
    def __init__(
        self,
        model: str | None = None,
        model_config: dict | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        lora: LoraOptions | None = None,
        quantization: Quantization | None = None,
        model_kwargs: dict | None = None,
        gradient_checkpointing: bool = False,
        neftune_alpha: float | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerCallable = AdamW,
        scheduler: SchedulerCallable = WarmupDecay,
    ) -> None:
        """
        Args:
            model: Hugging Face model name or local path of the student.
            model_config: A transformers config as a dict (``model_type`` plus sizes) to build a fresh
                model instead of loading one (tests, demos, pretraining from scratch).
            tokenizer: Tokenizer name or path (default: ``model``); the data module uses the same one.
            dtype: Weight dtype when loading (``float32``, ``bfloat16``, ``auto``); mixed precision is
                ``trainer.precision``'s job.
            lora: Train a LoRA adapter instead of all weights.
            quantization: Load ``model`` with 8- or 4-bit bitsandbytes weights under the LoRA adapter
                (QLoRA with ``load_in_4bit``); needs ``lora``, a CUDA GPU and the ``bnb`` extra.
            model_kwargs: Any other ``from_pretrained`` argument for ``model``, e.g.
                ``{attn_implementation: flash_attention_2, trust_remote_code: true, revision: main}``.
            gradient_checkpointing: Recompute activations in backward to save memory.
            neftune_alpha: NEFTune: uniform noise on the input embeddings of training forwards, bounded by
                ``neftune_alpha / sqrt(length * width)`` (5 in the paper's SFT runs).
            objective: What to minimise: ``distill.objectives.CrossEntropy`` (``pt``/``sft``, the default),
                ``distill.objectives.Distillation`` (KD from cached or online teacher targets),
                ``distill.objectives.Preference`` (DPO, IPO, SimPO, ORPO, ...) or
                ``distill.objectives.RewardModel``.
            optimizer: Optimizer class path and arguments: ``distill.train.optim.AdamW``,
                ``distill.train.optim.AdamW8bit`` or any ``torch.optim`` class.
            scheduler: Learning-rate schedule class path, stepped once per optimizer step and given the
                optimizer and the run's optimizer steps: ``distill.train.schedule.WarmupDecay`` (warmup,
                then cosine, linear or constant; the default: cosine, no warmup) or any scheduler whose
                first two arguments these are (torch's ``CosineAnnealingLR``, ``PolynomialLR``).
        """
        if neftune_alpha is not None and neftune_alpha <= 0:
            raise ValueError(
                f"model.neftune_alpha scales the noise, above 0 (the paper uses 5 to 15): {neftune_alpha}"
            )
        check_quantization(quantization, "model.quantization")
        if quantization is not None and lora is None:
            raise ValueError(
                "model.quantization: a quantized student trains through a LoRA adapter only (QLoRA): set "
                "model.lora; bitsandbytes' 8- and 4-bit weights cannot be trained in full"
            )
        if quantization is not None and model is None:
            raise ValueError(
                "model.quantization: quantized loading needs model.model (a saved checkpoint to quantize); "
                "a model built from model_config is not quantized"
            )
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "optimizer", "scheduler"])
        self.model_name = model
        self.model_config = model_config
        self.tokenizer_id = tokenizer or model
        self.tokenizer = student_tokenizer(model, tokenizer)
        self.dtype_name = dtype
        self.lora = lora
        self.quantization = quantization
        self.gradient_checkpointing = gradient_checkpointing
        self.neftune_alpha = neftune_alpha
        self.objective = objective or CrossEntropy()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model_kwargs = dict(model_kwargs or {})
        self.model: nn.Module | None = None
        self.train_metrics = self._metrics()
        self.val_metrics = self._metrics()
        self._step_units = 0
        self.flops_shape: ModelShape | None = None  # what its FLOPs depend on, known once it is built
        self.flops_per_batch: int | None = None  # of the last batch: ThroughputMonitor's MFU reads it
        self._run_seed: int | None = None  # of each training step's randomness (``train.randomness``)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.tokenizer is None:
            raise ValueError("set model.tokenizer: a model built from model_config needs a tokenizer")
        strategy = self.strategy
        if self.quantization is not None and sharded(strategy):
            raise ValueError(
                "model.quantization: a quantized student cannot be sharded by FSDP or DeepSpeed ZeRO-3 here; "
                "use DDP or deepspeed_stage2 (each rank holds the whole quantized base)"
            )
        with transformers_zero3(strategy):
            model = load_causal_lm(
                self.model_name,
                self.model_config,
                self.tokenizer,
                self.dtype_name,
                quantization=self.quantization,
                device=strategy.root_device if strategy is not None else None,
                options=self.model_kwargs,
            )
        # from_pretrained returns a model in eval mode, and Lightning keeps the modes it finds: without
        # this, dropout (LoRA's too) and gradient checkpointing would be off in training
        model.train()
        if self.quantization is not None:  # enables gradient checkpointing itself, when asked
            model = prepare_for_kbit_training(model, self.gradient_checkpointing)
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.gradient_checkpointing:
            model.config.use_cache = False
        if self.lora is not None:
            with unpartitioned(strategy):
                model = add_lora(model, self.lora)
            shard_adapter_apart(strategy, model)
        if self.neftune_alpha is not None:
            add_embedding_noise(model, self.neftune_alpha)
        self.model = model
        self.flops_shape = model_shape(self.causal_lm)
        self.objective.setup(self.objective_context())
        # set up, the objective may report more (e.g. one teacher CE per teacher of the data module)
        self.train_metrics = self._metrics()
        self.val_metrics = self._metrics()

    def _metrics(self) -> ObjectiveMetrics:
        objective = self.objective
        return ObjectiveMetrics(objective.metric_names, objective.unit, objective.loss_is_cross_entropy)

    def objective_context(self) -> Context:
        """What the objective is told of this fit (its data module is set up by now)."""
        strategy = self.strategy
        data = self._trainer.datamodule if self._trainer is not None else None
        if hasattr(data, "facts"):
            facts = data.facts()
            check_pairing(self.objective, facts)
        else:  # no data module of ours (outside a fit, or a plain LightningDataModule): nothing to check
            source = type(data).__name__ if data is not None else "no data module"
            facts = DataFacts(source, self.objective.accepts[0], pad_token_id(self.tokenizer))
        origin = Origin(self.model_name, dict(self.model_kwargs), self.dtype_name, self.tokenizer_id)
        context = Context(self.tokenizer, facts, Policy(self.model, self.lora is not None), origin)
        if strategy is None:
            return context
        return replace(
            context,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
            sharded=sharded(strategy),
            mean_over_ranks=partial(strategy.reduce, reduce_op="mean"),
            barrier=strategy.barrier,
            unpartitioned=partial(unpartitioned, strategy),
        )

    def current_step(self) -> Step:
        """Whether the batch now prepared trains, and where it stands in the fit."""
        if self._trainer is None:
            return Step()
        return Step(self.trainer.training, *trained_position(self.trainer))

    @property
    def strategy(self) -> Strategy | None:
        """The trainer's strategy (None outside a Trainer): what builds and shards the model."""
        return self._trainer.strategy if self._trainer is not None else None

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model under any peft wrapper (LoRA layers stay in place inside it)."""
        return unwrapped(self.model)

    def forward_hidden(self, batch: TokenBatch) -> Tensor:
        """Final hidden states (B, T, H): the head runs later, only at positions that carry loss."""
        backbone = self.causal_lm.get_decoder()
        ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
        outputs = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return outputs.last_hidden_state

    def compute_loss(self, batch: TokenBatch | PromptBatch) -> tuple[Loss, TokenBatch]:
        """The objective's loss of the batch it ``prepare``s from ``batch``, and that batch."""
        batch = self.objective.prepare(batch, self.current_step())
        with seeded_noise(batch.noise_seed, self.device):
            hidden = self.forward_hidden(batch)
            return self.objective(loss_inputs(hidden, self.causal_lm.get_output_embeddings(), batch)), batch

    def training_step(self, batch: TokenBatch | PromptBatch | UnbuiltBatch, batch_idx: int) -> dict:
        """The loss, and the batch it was of (``batch`` prepared: what callbacks count as trained)."""
        out, batch = self.compute_loss(self.build_batch(batch))
        rows, seq_len = batch.input_ids.shape
        self.flops_per_batch = transformer_flops(self.flops_shape, rows, seq_len, out.num_tokens)
        if self.objective.extra_forwards:  # reference models, mismatched completions
            forward = transformer_flops(self.flops_shape, rows, seq_len, out.num_tokens, backward=False)
            self.flops_per_batch += self.objective.extra_forwards * forward
        values = self.train_metrics(out.loss_sum, out.correct, out.num_units, out.num_tokens, **out.sums)
        values = self.objective.derived_metrics(values)
        self.log_dict({f"train/{k}": v for k, v in values.items()}, prog_bar=True, batch_size=1)
        if self._gradients_hidden:
            # DeepSpeed's gradients are out of reach: each micro-batch's loss becomes the mean over its
            # units on all ranks. DeepSpeed divides it by the micro-batches once more (engine.backward
            # with scale_wrt_gas), which then makes the step's gradient the mean of those means.
            loss = out.loss_sum * self._unit_mean_scale(out.num_units, out.loss_sum.device)
            return {"loss": loss, STEP_BATCH: batch}
        self._step_units += out.num_units
        # a sum over units: on_before_optimizer_step scales the gradients by the step's units
        return {"loss": out.loss_sum, STEP_BATCH: batch}

    def build_batch(self, batch: TokenBatch | PromptBatch | UnbuiltBatch) -> TokenBatch | PromptBatch:
        """Build a batch that only the student can build (``UnbuiltBatch``: on-policy rounds sample the
        student at a round's first batch). Lightning runs ``training_step`` inside the strategy's
        forward, the one place where sharded weights (FSDP, ZeRO-3) can generate, as RL objectives do in
        ``prepare``; the tensors then go where the loop puts a loader's batch."""
        if not isinstance(batch, UnbuiltBatch):
            return batch
        built = self.trainer.precision_plugin.convert_input(batch.build(self.model, sharded(self.strategy)))
        return self.trainer.strategy.batch_to_device(built)

    @property
    def _gradients_hidden(self) -> bool:
        """DeepSpeed ZeRO keeps gradients in its own partitioned buffers, not in ``param.grad``."""
        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the gradient the mean over every unit (trainable token, pair) of the optimizer step, so a
        long and a short micro-batch weigh by what they hold (per-micro-batch means do not: TRL #6006)."""
        if self._gradients_hidden:
            return
        scale = self._unit_mean_scale(self._step_units, self.device)
        self._step_units = 0
        # the wrapped model's parameters: FSDP's flat ones hold the gradients when they replace the originals
        for param in self.trainer.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.dtype))

    def _unit_mean_scale(self, units: int, device: torch.device) -> Tensor:
        """``unit_mean_scale`` of ``units`` summed over the ranks, for this trainer."""
        total = self.trainer.strategy.reduce(torch.tensor(float(units), device=device), reduce_op="sum")
        return unit_mean_scale(total, self.trainer.accumulate_grad_batches, self.trainer.world_size)

    def validation_step(self, batch: TokenBatch | PromptBatch, batch_idx: int) -> dict:
        out, batch = self.compute_loss(batch)
        rows, seq_len = batch.input_ids.shape
        self.flops_per_batch = transformer_flops(
            self.flops_shape, rows, seq_len, out.num_tokens, backward=False
        )
        self.val_metrics.update(out.loss_sum, out.correct, out.num_units, out.num_tokens, **out.sums)
        return {STEP_BATCH: batch}

    def on_validation_epoch_end(self) -> None:
        values = self._log_evaluation("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.objective.validated(values)

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, prefix: str) -> dict[str, Tensor]:
        """Log what the evaluation loop's steps gathered (validation and test never run at once)."""
        values = self.objective.derived_metrics(self.val_metrics.compute())
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=True, sync_dist=False)
        self.val_metrics.reset()
        return values

    def on_fit_start(self) -> None:
        self._metrics_to_device()

    def on_validation_start(self) -> None:
        self._metrics_to_device()

    on_test_start = on_validation_start

    def _metrics_to_device(self) -> None:
        # ZeRO-3 places only the parameters it partitions, not the metric states
        device = self.trainer.strategy.root_device
        self.train_metrics.to(device)
        self.val_metrics.to(device)

    def on_train_start(self) -> None:
        if self._run_seed is None:  # a resumed fit has the checkpoint's
            self._run_seed = self.trainer.strategy.broadcast(draw_run_seed())
        stats = getattr(self.trainer.datamodule, "stats", None)
        if stats and self.logger is not None:
            self.logger.log_metrics({k: float(v) for k, v in stats.items()}, step=0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout masks and noise of a function of the batch's place, so a resumed fit draws the same ones
        seed_step(self._run_seed, self.global_rank, self.current_epoch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self._run_seed
        if not self.objective.keeps_rank_state:
            return
        states = every_rank(self.objective.rank_state())
        if any(state is not None for state in states):
            checkpoint["objective_rank_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._run_seed = checkpoint.get(CHECKPOINT_KEY)
        states = checkpoint.get("objective_rank_states")
        if states is None:
            return
        if len(states) != self.trainer.world_size:  # other ranks, other shares of the data
            rank_zero_info(
                f"[distill] the checkpoint holds the objective's state of {len(states)} ranks, this fit has "
                f"{self.trainer.world_size}: it starts without it (GRPO samples its kept rollouts again)"
            )
            return
        self.objective.load_rank_state(states[self.global_rank])

    def configure_optimizers(self) -> dict:
        if flat_parameters(self.trainer.strategy):  # FSDP units of LoRA matrices: all decayed alike
            params = [p for p in self.trainer.model.parameters() if p.requires_grad]
            return self._with_schedule(self.optimizer_factory(params))
        # biases and norms are not decayed, told by module rather than by shape: sharding (FSDP, ZeRO-3)
        # flattens parameters, so their shapes no longer say which is which
        return self._with_schedule(self.optimizer_factory(weight_decay_groups(self)))

    def _with_schedule(self, optimizer: torch.optim.Optimizer) -> dict:
        scheduler = self.scheduler_factory(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
