"""Packing several samples into one row must not change any per-token loss."""

import random
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from distill.data.batching import Collator, best_fit_decreasing, pack
from distill.data.encoding import IGNORE_INDEX, Encoded
from tests.helpers import TINY_LLAMA


def per_token_loss(model, batch) -> torch.Tensor:
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    labels = batch.labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
    )
    return loss[labels != IGNORE_INDEX]


def naive_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """The reference packer: each item into the first row it fits."""
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        row = next((r for r in rows if sum(lengths[j] for j in r) + n <= capacity), None)
        if row is None:
            rows.append([i])
        else:
            row.append(i)
    return rows


def test_pack_fills_the_best_row_longest_first():
    samples = [Encoded([1] * n, [1] * n, str(n), "") for n in (2, 5, 3, 4)]
    rows = pack(samples, max_length=7)
    assert [[len(s.input_ids) for s in row] for row in rows] == [[5, 2], [4, 3]]
    # 6 goes where it fits best (free 6 after the 4), not into the first row with room (free 7)
    assert best_fit_decreasing([8, 4, 6], 10) == [[0], [2, 1]]


def test_best_fit_decreasing_covers_every_item_once_within_capacity_and_is_no_less_dense():
    rng = random.Random(0)
    for trial in range(20):
        capacity = rng.choice([16, 64, 512])
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
        lengths.append(capacity + 5)  # too long: a row of its own
        rows = best_fit_decreasing(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows if len(row) > 1)
        assert [len(lengths) - 1] in rows
        assert len(rows) <= len(naive_first_fit(lengths, capacity)), trial
        assert rows == best_fit_decreasing(lengths, capacity)  # a function of the lengths alone


def test_packed_batch_gives_the_same_per_token_loss_as_unpacked():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in (9, 5, 12, 7):
        ids = torch.randint(3, 200, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]  # the prompt part carries no loss
        samples.append(Encoded(ids, labels, "", ""))
    collate = Collator(pad_id=0)
    for attention in ("sdpa", "eager"):
        config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=256, attn_implementation=attention)
        model = AutoModelForCausalLM.from_config(config).eval()
        rows = pack(samples, max_length=32)
        unpacked = collate([s for row in rows for s in row])  # the same samples in the packed order
        packed = collate(rows)
        assert packed.input_ids.shape[0] < len(samples)
        assert packed.attention_mask is None
        with torch.no_grad():
            expected, got = per_token_loss(model, unpacked), per_token_loss(model, packed)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # without the restart of position ids, tokens would attend across samples and the loss would differ
        leaky = replace(packed, position_ids=torch.arange(packed.input_ids.shape[1])[None])
        with torch.no_grad():
            assert not torch.allclose(per_token_loss(model, leaky), expected, atol=1e-3)
