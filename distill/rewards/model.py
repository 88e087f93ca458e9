"""A reward model as a reward function: the RM stage's export, scoring each prompt + completion."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distill.rewards.scoring import snake_case
from distill.train.quantization import Quantization, check_quantization

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelReward:
    """The scalar of a ``*ForSequenceClassification`` model (``num_labels=1``) at the end of the prompt's
    ``messages`` plus the completion as the assistant's turn (docs/rl.md). A plain class, not an
    ``nn.Module``: no part of the policy's parameters or checkpoint; it loads on the first call."""

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
        quantization: Quantization | None = None,
    ) -> None:
        """
        Args:
            path: Directory of the model and its tokenizer with a chat template (the RM stage's export).
            batch_size: Conversations per forward.
            max_length: Tokens kept per conversation, the last ones (the score is read at the end).
            device: Where the model runs (default: this process's CUDA device if any, else the CPU).
            weight: Weight of this reward in the total.
            name: Name in the logged metrics (default ``model_reward``).
            quantization: Load the model with 8- or 4-bit bitsandbytes weights (a CUDA GPU and the
                ``bnb`` extra; the score head stays unquantized).
        """
        if batch_size < 1 or max_length < 1:
            raise ValueError(
                f"ModelReward batch_size and max_length must be >= 1, got {batch_size}, {max_length}"
            )
        self.path, self.batch_size, self.max_length, self.device = path, batch_size, max_length, device
        self.weight = weight
        self.name = name or snake_case(type(self).__name__)
        check_quantization(quantization, f"{self.name} quantization")
        if quantization is not None and device is not None and not device.startswith("cuda"):
            raise ValueError(f"{self.name} quantization: bitsandbytes weights run on CUDA, not {device}")
        self.quantization = quantization
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not tokenizer.chat_template:
            raise ValueError(f"ModelReward: the tokenizer at {self.path} has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.device is not None:
            device = torch.device(self.device)
        elif torch.cuda.is_available():  # this rank's GPU under DDP
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        quantized = {}
        if self.quantization is not None:  # loaded onto the device, where it stays
            quantized = {"quantization_config": self.quantization.config(), "device_map": {"": device}}
        # "auto": the dtype the config names, float32 when it names none
        model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype="auto", **quantized)
        if model.config.num_labels != 1:
            raise ValueError(f"ModelReward: {self.path} has {model.config.num_labels} labels, expected 1")
        config = model.config.get_text_config()
        if config.pad_token_id is None:
            # the classifier reads each row at its last token that is not the pad token (with pad = EOS
            # that skips a final EOS: the RM stage exports a tokenizer whose pad token is its own)
            config.pad_token_id = tokenizer.pad_token_id
        if self.quantization is None:
            model = model.to(device)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        if "messages" not in fields:
            raise ValueError("ModelReward needs the field 'messages' (the prompt conversation)")
        if self.model is None:
            self.load()
        assert self.model is not None and self.tokenizer is not None
        texts = [
            self.tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": c}], tokenize=False)
            for turns, c in zip(fields["messages"], completions, strict=True)
        ]
        encoded = self.tokenizer(texts, add_special_tokens=False)
        rows = [ids[-self.max_length :] for ids in encoded["input_ids"]]  # keep the end: the score is there
        pad_id = self.model.config.get_text_config().pad_token_id
        device = self.model.device
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            width = max(len(r) for r in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):  # right padding: causal, so padding cannot change a score
                input_ids[i, : len(row)] = torch.tensor(row)
                attention_mask[i, : len(row)] = 1
            logits = self.model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores
