"""What to prune to (``Pruning``), and the checks that refuse a target before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PretrainedConfig

# the layouts the weight slicing knows (distill/prune/apply.py): Llama's decoder, which SmolLM shares
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class PruningError(ValueError):
    """A target the model cannot be pruned to, or a model that cannot be pruned; says which option."""


@dataclass(frozen=True)
class Pruning:
    """Targets of the pruning (unset: that dimension is kept whole) and how importance is measured."""

    num_layers: int | None = None
    """Decoder layers kept (depth pruning): the least important are dropped."""
    max_params: int | None = None
    """Instead of ``num_layers``: drop the least important layers until the pruned model (after any width
    pruning) has at most this many parameters."""
    keep_first_last: bool = True
    """Never drop the first and the last decoder layer (ShortGPT and Minitron find them most important)."""
    depth_metric: Literal["cosine", "loss"] = "cosine"
    """Block importance: ``cosine``, the mean cosine distance between a layer's input and output hidden
    states (one calibration pass); ``loss``, the calibration loss increase when the layer is skipped (one
    pass per layer)."""
    intermediate_size: int | None = None
    """MLP channels kept in every layer, ranked per layer by mean |activation| at the down projection."""
    num_attention_heads: int | None = None
    """Query heads kept in every layer, in whole grouped-query (KV) groups ranked by the summed norms of
    their heads' outputs: a multiple of the heads per KV group."""
    hidden_size: int | None = None
    """Hidden (embedding) channels kept, ranked by mean |activation| of every layer norm's output; the
    head dimension is kept (written explicitly into the config)."""
    calibration_samples: int = 256
    """Samples of the data's training split the importance is measured on."""

    def check(self, config: PretrainedConfig) -> None:
        """Refuse what cannot be done to a model of ``config``, naming the option."""
        architectures = config.architectures or [type(config).__name__]
        unsupported = [name for name in architectures if name not in SUPPORTED]
        if unsupported:
            raise PruningError(
                f"pruning supports {', '.join(SUPPORTED)} (and models of their layout, such as SmolLM); "
                f"this model is {', '.join(unsupported)}"
            )
        if self.num_layers is not None and self.max_params is not None:
            raise PruningError("pruning.num_layers and pruning.max_params both set: give one of them")
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        kv_heads = config.num_key_value_heads
        fewest = min(layers, 2) if self.keep_first_last else 1
        targets = {
            "num_layers": (self.num_layers, fewest, layers),
            "intermediate_size": (self.intermediate_size, 1, config.intermediate_size),
            "num_attention_heads": (self.num_attention_heads, 1, heads),
            "hidden_size": (self.hidden_size, 1, config.hidden_size),
        }
        for name, (value, low, high) in targets.items():
            if value is not None and not low <= value <= high:
                keep = " with keep_first_last" if name == "num_layers" and low > 1 else ""
                raise PruningError(
                    f"pruning.{name} is {value}: the model has {high}, so it must be in [{low}, {high}]{keep}"
                )
        group = heads // kv_heads
        if self.num_attention_heads is not None and self.num_attention_heads % group:
            raise PruningError(
                f"pruning.num_attention_heads is {self.num_attention_heads}: the model's {heads} query "
                f"heads share {kv_heads} KV heads, {group} each, and heads are pruned in whole KV groups: "
                f"give a multiple of {group}"
            )
        if self.calibration_samples < 1:
            raise PruningError(f"pruning.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.max_params is not None and self.max_params < 1:
            raise PruningError(f"pruning.max_params must be >= 1, got {self.max_params}")
