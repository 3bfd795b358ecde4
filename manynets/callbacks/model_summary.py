"""Lightning's model summary table without its FLOPs column when nothing was counted.

Lightning counts FLOPs only for a module that sets ``example_input_array``; the manynets modules do
not (their input shape comes from the data), so its summary shows a FLOPs column of zeros and
"Total Flops: 0". :class:`ParameterSummary` prints the same table without them; when FLOPs were
counted it prints Lightning's table unchanged. The manynets CLI uses it in place of Lightning's default
summary.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class ParameterSummary(ModelSummary):
    """Lightning's ``ModelSummary`` (layers, parameters, mode) without an all-zero FLOPs column.

    Args:
        max_depth: depth of nested modules shown (0 turns the summary off).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:  # fmt: skip
        if total_flops:
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                   total_training_modes, total_flops, **summarize_kwargs)  # fmt: skip
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes, 0,
                                      *columns)  # fmt: skip
        rank_zero_info("\n" + "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))
