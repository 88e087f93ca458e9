"""What building and optimising the student must know about sharded strategies (ZeRO-3, FSDP).

Lightning shards; these helpers only make transformers and peft build into the shards correctly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn


def zero3(strategy: Strategy | None) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def sharded(strategy: Strategy | None) -> bool:
    """Whether the student's weights are sharded over the ranks (FSDP, ZeRO-3): every forward gathers
    the shards from all ranks, so generation keeps each rank stepping until all are done."""
    return isinstance(strategy, FSDPStrategy) or zero3(strategy)


@contextmanager
def transformers_zero3(strategy: Strategy | None) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, tell transformers (``HfDeepSpeedConfig``) that it builds into partitioned
    parameters (Lightning builds inside ``deepspeed.zero.Init``), so it initialises and loads the weights
    gathered instead of writing into the empty shards."""
    if not zero3(strategy):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(strategy.config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


@contextmanager
def unpartitioned(strategy: Strategy | None) -> Iterator[None]:
    """Suspend ZeRO-3's partitioning while new modules are made (a LoRA adapter), so their own
    initialisation (``lora_B`` = 0) applies; the DeepSpeed engine partitions them when it starts."""
    if not zero3(strategy):
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def shard_adapter_apart(strategy: Strategy | None, model: nn.Module) -> None:
    """Under FSDP, give the LoRA layers FSDP units of their own (peft's wrap policy), with flat parameters:
    with ``use_orig_params`` a unit mixing frozen and trainable weights, or holding only frozen ones (the
    embeddings at the root), loses its frozen weights from the state dict after a backward pass (torch
    2.11-2.13), so the export would miss them."""
    if not isinstance(strategy, FSDPStrategy):
        return
    from peft.utils.other import fsdp_auto_wrap_policy

    strategy.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
    strategy.kwargs["use_orig_params"] = False


def flat_parameters(strategy: Strategy | None) -> bool:
    """Whether the optimizer must take the FSDP module's flat parameters (``use_orig_params=False``)."""
    return isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", True)
