"""Save the trained student as a Hugging Face directory at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from distill.train.sharding import zero3


class HFExport(L.Callback):
    """Writes the model (or its LoRA adapter), the tokenizer and the resolved run config to ``dirpath``.

    The result loads with ``AutoModelForCausalLM.from_pretrained`` (full weights) or
    ``PeftModel.from_pretrained`` (adapter); ``python -m distill merge`` folds an adapter into its base.
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
        model = pl_module.model
        state_dict = gathered_state_dict(trainer)
        if not trainer.is_global_zero:
            return
        prefix = "model."
        weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        stop_ids = getattr(trainer.datamodule, "stop_token_ids", None)
        generation_config = pl_module.causal_lm.generation_config
        if stop_ids:
            generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
        if getattr(model, "peft_config", None) is not None:
            self._point_adapter_at_base(pl_module, weights)
            model = _unwrapped(model)
        model.save_pretrained(self.dirpath, state_dict=weights)
        generation_config.save_pretrained(self.dirpath)
        pl_module.tokenizer.save_pretrained(self.dirpath)
        template = getattr(trainer.datamodule, "chat_template", None)
        if template is not None and not pl_module.tokenizer.chat_template:
            # the tokenizer saved above gains the template it was trained with, so chat tools render alike
            (self.dirpath / "chat_template.jinja").write_text(template.source)
        self._save_config(trainer)
        rank_zero_info(f"[distill] saved Hugging Face model to {self.dirpath}")
        if self.log_artifact:
            self._log_artifact(trainer)

    def _log_artifact(self, trainer: L.Trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                artifact = wandb.Artifact(name=f"model-{logger.experiment.id}", type="model")
                artifact.add_dir(str(self.dirpath))
                logger.experiment.log_artifact(artifact, aliases=["latest"])
                rank_zero_info(f"[distill] logged {self.dirpath} as W&B artifact {artifact.name}")

    def _point_adapter_at_base(self, pl_module: L.LightningModule, weights: dict[str, Tensor]) -> None:
        """An adapter on a model built from a config has no base to load: save that base beside it."""
        config = pl_module.model.peft_config["default"]
        if pl_module.model_name is not None:
            config.base_model_name_or_path = pl_module.model_name
            return
        base_dir = self.dirpath / "base_model"
        pl_module.causal_lm.save_pretrained(base_dir, state_dict=_base_weights(weights))
        pl_module.tokenizer.save_pretrained(base_dir)
        config.base_model_name_or_path = str(base_dir.resolve())

    def _save_config(self, trainer: L.Trainer) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                text = callback.parser.dump(callback.config, skip_none=False)
                (self.dirpath / "distill_config.yaml").write_text(text)


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
