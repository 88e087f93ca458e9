"""Lightning's model summary without the FLOPs it did not count."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table


class ModelSummary(LightningModelSummary):
    """The table of modules and parameters Lightning prints when a fit starts, without its FLOPs column
    and "Total FLOPs" line when they read 0: Lightning counts the FLOPs of a forward pass of the module's
    ``example_input_array``, which distill's modules do not have. distill counts each training batch's
    FLOPs itself (``distill.train.flops``): ``TokenThroughput`` logs them per second and as MFU."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        totals = (total_parameters, trainable_parameters, model_size, total_training_modes)
        if total_flops:
            LightningModelSummary.summarize(summary_data, *totals, total_flops, **summarize_kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(*totals, 0, *columns)
        rank_zero_info("\n" + table.rpartition("\n")[0])  # the last line is the total of FLOPs
