"""Samples -> padded batches, or several short samples packed into one row with no cross-attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.data.encoding import IGNORE_INDEX, Encoded


def pack(samples: Sequence[Encoded], max_length: int) -> list[list[Encoded]]:
    """Greedy first-fit in the given order: each row holds samples whose lengths sum to <= max_length."""
    rows: list[list[Encoded]] = []
    row_lengths: list[int] = []
    for sample in samples:
        size = len(sample.input_ids)
        for index, used in enumerate(row_lengths):
            if used + size <= max_length:
                rows[index].append(sample)
                row_lengths[index] += size
                break
        else:
            rows.append([sample])
            row_lengths.append(size)
    return rows


class Collator:
    """Right-pads a list of samples (or packed rows of samples) into tensors.

    Unpacked batches carry a 2-D ``attention_mask``. Packed rows carry ``position_ids`` that restart at
    0 for every sample and no ``attention_mask``: transformers then derives a block-diagonal causal mask
    from the restarts (``masking_utils.find_packed_sequence_indices``), so no token attends across a
    sample boundary, for SDPA and eager attention alike.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Encoded | list[Encoded]]) -> dict[str, torch.Tensor]:
        packed = isinstance(items[0], list)
        rows = [item if isinstance(item, list) else [item] for item in items]
        width = max(sum(len(s.input_ids) for s in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            offset = 0
            for sample in row:
                n = len(sample.input_ids)
                input_ids[r, offset : offset + n] = torch.tensor(sample.input_ids)
                labels[r, offset : offset + n] = torch.tensor(sample.labels)
                # the first token of a sample is never a target: nothing of that sample precedes it
                labels[r, offset] = IGNORE_INDEX
                position_ids[r, offset : offset + n] = torch.arange(n)
                attention_mask[r, offset : offset + n] = 1
                offset += n
            # padding forms its own segment so it never joins the last sample's block
            position_ids[r, offset:] = torch.arange(width - offset)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if not packed:
            batch["attention_mask"] = attention_mask
            batch["sha"] = [row[0].sha for row in rows]
        return batch
