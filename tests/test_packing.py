"""Packing several samples into one row must not change any per-token loss."""

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from distill.data.batching import Collator, pack
from distill.data.encoding import IGNORE_INDEX, Encoded
from tests.helpers import TINY_LLAMA


def per_token_loss(model, batch) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
    )
    return loss[labels != IGNORE_INDEX]


def test_pack_first_fit():
    samples = [Encoded([1] * n, [1] * n, str(n), "") for n in (5, 4, 3, 2)]
    rows = pack(samples, max_length=7)
    assert [[len(s.input_ids) for s in row] for row in rows] == [[5, 2], [4, 3]]


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
        unpacked = collate(samples)
        packed = collate(pack(samples, max_length=32))
        assert packed["input_ids"].shape[0] < len(samples)
        assert "attention_mask" not in packed
        with torch.no_grad():
            expected, got = per_token_loss(model, unpacked), per_token_loss(model, packed)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # without the restart of position ids, tokens would attend across samples and the loss would differ
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        with torch.no_grad():
            assert not torch.allclose(per_token_loss(model, leaky), expected, atol=1e-3)
