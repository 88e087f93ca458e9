"""Save the trained student as a Hugging Face directory at the end of fit."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from distill.data.batching import pad_token_id
from distill.data.templates import ChatTemplate
from distill.train.reward_export import SCORE_KEY, save_reward_adapter, save_reward_model
from distill.train.sharding import zero3


class HFExport(L.Callback):
    """Writes the model (or its LoRA adapter; a reward model as a sequence classifier), the tokenizer with
    the chat template the data was rendered with and the resolved run config to ``dirpath`` (README,
    "Training"). A fit that took no optimizer step or did not reach its end (an error, a pre-emption
    signal) exports nothing, and an export replaces the previous one only once complete.
    """

    def __init__(self, dirpath: str = "out/model", log_artifact: bool = False) -> None:
        """
        Args:
            dirpath: Output directory of the Hugging Face export.
            log_artifact: Also upload the directory as a W&B ``model`` artifact (with a WandbLogger;
                offline runs keep it for ``wandb sync``).
        """
        self.dirpath = Path(dirpath)
        self.log_artifact = log_artifact

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = untrained_reason(trainer)
        if reason is not None:  # the same on every rank, so no rank waits in the gather below
            rank_zero_warn(f"[distill] not exporting to {self.dirpath}: {reason}; any earlier export stays")
            return
        state_dict = gathered_state_dict(trainer)
        if not trainer.is_global_zero:
            return
        staging = self.dirpath.with_name(f".{self.dirpath.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write(staging, trainer, pl_module, state_dict)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_directory(staging, self.dirpath)
        rank_zero_info(f"[distill] saved Hugging Face model to {self.dirpath}")
        if self.log_artifact:
            self._log_artifact(trainer)

    def _write(
        self, directory: Path, trainer: L.Trainer, pl_module: L.LightningModule, state_dict: dict[str, Tensor]
    ) -> None:
        model = pl_module.model
        prefix = "model."
        weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        tokenizer = with_template(pl_module.tokenizer, getattr(trainer.datamodule, "chat_template", None))
        stop_ids = getattr(trainer.datamodule, "stop_token_ids", None)
        generation_config = pl_module.causal_lm.generation_config
        if stop_ids:
            generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
        adapter = getattr(model, "peft_config", None) is not None
        if SCORE_KEY in state_dict:  # a reward model: a sequence classifier (or an adapter of one)
            pad_id = pad_token_id(tokenizer)  # what the batches were padded with
            if adapter:
                self._point_adapter_at_base(directory, pl_module, tokenizer, weights)
                save_reward_adapter(directory, _unwrapped(model), weights, state_dict[SCORE_KEY], pad_id)
            else:
                save_reward_model(
                    directory, pl_module.causal_lm.config, weights, state_dict[SCORE_KEY], pad_id
                )
        elif adapter:
            self._point_adapter_at_base(directory, pl_module, tokenizer, weights)
            # resized embeddings travel as modules_to_save; peft's own copy of them would be a third one
            _unwrapped(model).save_pretrained(directory, state_dict=weights, save_embedding_layers=False)
        else:
            model.save_pretrained(directory, state_dict=weights)
        generation_config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        self._save_config(directory, trainer)

    def _log_artifact(self, trainer: L.Trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                artifact = wandb.Artifact(name=f"model-{logger.experiment.id}", type="model")
                artifact.add_dir(str(self.dirpath))
                logger.experiment.log_artifact(artifact, aliases=["latest"])
                rank_zero_info(f"[distill] logged {self.dirpath} as W&B artifact {artifact.name}")

    def _point_adapter_at_base(
        self,
        directory: Path,
        pl_module: L.LightningModule,
        tokenizer: PreTrainedTokenizerBase,
        weights: dict[str, Tensor],
    ) -> None:
        """An adapter on a model built from a config has no base to load: save that base beside it."""
        config = pl_module.model.peft_config["default"]
        if pl_module.model_name is not None:
            config.base_model_name_or_path = pl_module.model_name
            return
        pl_module.causal_lm.save_pretrained(directory / "base_model", state_dict=_base_weights(weights))
        tokenizer.save_pretrained(directory / "base_model")
        # where the base will lie once the export is moved into place
        config.base_model_name_or_path = str((self.dirpath / "base_model").resolve())

    def _save_config(self, directory: Path, trainer: L.Trainer) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                text = callback.parser.dump(callback.config, skip_none=False)
                (directory / "distill_config.yaml").write_text(text)


def untrained_reason(trainer: L.Trainer) -> str | None:
    """Why the model in hand is not the outcome of this fit, or None when it is."""
    if trainer.interrupted:  # an exception or a pre-emption signal (SIGTERM) stopped it
        return "the fit was stopped before its end (resume it with --ckpt_path last)"
    if trainer.global_step == 0:
        return "no optimizer step ran"
    return None


def with_template(
    tokenizer: PreTrainedTokenizerBase, template: ChatTemplate | None
) -> PreTrainedTokenizerBase:
    """The tokenizer to save: a copy carrying the chat template training rendered with, when it differs
    from the tokenizer's own (a built-in or custom ``data.template``), so chat tools render alike."""
    if template is None or tokenizer.chat_template == template.source:
        return tokenizer
    exported = copy.deepcopy(tokenizer)
    exported.chat_template = template.source
    return exported


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``. A crash at any point leaves one whole export:
    the previous one at ``target`` (or, between the two renames, at ``.<name>.old`` beside it) or the new
    one."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def gathered_state_dict(trainer: L.Trainer) -> dict[str, Tensor]:
    """The LightningModule's full state dict on rank 0 (other ranks may get an empty one).

    Every rank must call it: under FSDP (``state_dict_type: full``) and DeepSpeed ZeRO-3 the parameters
    are sharded and gathering them is a collective. ZeRO-3 gathers one layer at a time onto rank 0's CPU,
    so the whole model never sits on one GPU.
    """
    strategy = trainer.strategy
    if zero3(strategy):
        # the engine wraps Lightning's module wrapper, whose attribute holding the LightningModule is
        # `_forward_module`
        state_dict = strategy.model._zero3_consolidated_16bit_state_dict() or {}
        wrapper = "_forward_module."
        return {k.removeprefix(wrapper): v for k, v in state_dict.items()}
    return strategy.lightning_module_state_dict()


def _unwrapped(peft_model: nn.Module) -> nn.Module:
    """The adapter model as peft built it. peft picks the adapter's tensors by the names of its modules,
    and FSDP renames those (``_fsdp_wrapped_module.``): save through an unwrapped twin on the meta device
    (it holds no weights; the gathered state dict is what gets saved)."""
    if not any("_fsdp_wrapped_module" in name for name, _ in peft_model.named_modules()):
        return peft_model
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(peft_model.get_base_model().config)
        return get_peft_model(base, peft_model.peft_config["default"])


def _base_weights(peft_weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The base model's own weights under their transformers names, without any adapter tensor."""
    weights = {}
    for name, tensor in peft_weights.items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.removeprefix("base_model.model.")
        weights[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return weights
