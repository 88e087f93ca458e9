"""Train the bundled teacher (``distill/assets/teacher``) with distill itself, shrink it, measure it.

Steps:

1. ``python -m distill fit --config configs/teacher_pretrain.yaml``: a ~5.6M-parameter Llama-style LM
   trained from scratch on the bundled text and chat corpus (~12 minutes on 2 CPU cores);
2. the float32 export is rewritten as 16-bit safetensors (half the size), keeping only the files a
   Hugging Face model needs;
3. validation perplexity of the shipped files is computed with plain transformers and distill's data
   code: on ``text_val.jsonl`` (every token) and ``chat_val.jsonl`` (assistant tokens only), and written,
   with the training facts, into the directory's model card.

Usage::

    python scripts/train_teacher.py              # train, shrink, evaluate, write README.md
    python scripts/train_teacher.py --eval-only  # re-evaluate the shipped teacher
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.data.batching import Collator
from distill.data.encoding import IGNORE_INDEX, Encoded, encode_all
from distill.data.formats import read_records
from distill.data.templates import resolve_template

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "teacher_pretrain.yaml"
TEACHER = REPO / "distill" / "assets" / "teacher"
DATA = REPO / "distill" / "assets" / "data"
SHIPPED_DTYPE = torch.bfloat16  # the training precision; the loss it gives is checked against float32
MAX_LOSS_CHANGE = 0.01  # relative change of validation loss allowed by the 16-bit conversion
# what save_pretrained writes for a model, its generation config and tokenizer, plus our run config
KEEP = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "distill_config.yaml",
    "README.md",
}


@dataclass
class Perplexity:
    loss: float  # mean next-token cross-entropy (nats) over the counted tokens
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def train(config: Path) -> float:
    """Run distill's own training on ``config``; returns the wall time in seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "distill", "fit", "--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


def load(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def shrink(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite the weights in ``dtype`` and delete every file a Hugging Face model does not need."""
    model = load(directory).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:  # never overwrite the file the weights were read from
        model.save_pretrained(tmp)
        for path in Path(tmp).iterdir():
            shutil.move(path, directory / path.name)
    for path in directory.iterdir():
        if path.is_dir() or path.name not in KEEP:
            raise RuntimeError(f"unexpected file in the export: {path} (add it to KEEP or remove it)")


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, samples: list[Encoded], pad_id: int, batch_size: int = 8
) -> Perplexity:
    """Mean cross-entropy of ``model`` over the labelled next-token positions of ``samples``."""
    collate = Collator(pad_id)
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labels = batch.labels[:, 1:]  # position t predicts token t + 1
        logits = logits[:, :-1].float()
        loss_sum += F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        tokens += int((labels != IGNORE_INDEX).sum())
    return Perplexity(loss=float(loss_sum) / tokens, tokens=tokens)


def validation_sets(tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[Encoded]]:
    """``text``: every token of text_val.jsonl; ``chat``: the assistant tokens of chat_val.jsonl."""
    template = resolve_template(tokenizer, "mistral")
    text = read_records(DATA / "text_val.jsonl")
    chat = read_records(DATA / "chat_val.jsonl")
    return {
        "text": encode_all(text, tokenizer, None, max_length, "right", train_on_responses_only=False)[0],
        "chat": encode_all(chat, tokenizer, template, max_length, "right", train_on_responses_only=True)[0],
    }


def evaluate(model: PreTrainedModel, sets: dict[str, list[Encoded]], pad_id: int) -> dict[str, Perplexity]:
    return {name: perplexity(model, samples, pad_id) for name, samples in sets.items()}


def report(label: str, results: dict[str, Perplexity]) -> None:
    parts = [f"{name} ppl {r.ppl:.2f} (loss {r.loss:.4f}, {r.tokens} tokens)" for name, r in results.items()]
    print(f"[teacher] {label}: " + "; ".join(parts), flush=True)


def check_close(before: dict[str, Perplexity], after: dict[str, Perplexity]) -> None:
    for name in before:
        change = abs(after[name].loss - before[name].loss) / before[name].loss
        if change > MAX_LOSS_CHANGE:
            raise RuntimeError(f"{name}: 16-bit weights change the validation loss by {change:.1%}")


def directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def model_card(config: dict, model: PreTrainedModel, results: dict[str, Perplexity], minutes: float) -> str:
    arch = model.config
    trainer, data, module = config["trainer"], config["data"]["init_args"], config["model"]["init_args"]
    optimizer, schedule = module["optimizer"]["init_args"], module["scheduler"]["init_args"]
    rows = "\n".join(
        f"| {name} | {DATA.name}/{name}_val.jsonl | {label} | {r.tokens:,} | {r.loss:.3f} | {r.ppl:.1f} |"
        for (name, r), label in zip(results.items(), ("every token", "assistant tokens only"), strict=True)
    )
    return f"""# distill demo teacher

A tiny Llama-style causal LM, trained from scratch with distill itself on the corpus bundled in
`distill/assets/data`, so that distillation demos, tests and benchmarks transfer real (peaked,
corpus-shaped) next-token distributions rather than noise. It is a toy: it continues Python
documentation prose and answers in the style of the demo chats, often wrongly.

## Model

- Architecture: `LlamaForCausalLM`, hidden size {arch.hidden_size}, {arch.num_hidden_layers} layers,
  {arch.num_attention_heads} attention heads ({arch.num_key_value_heads} key/value heads), MLP
  {arch.intermediate_size}, tied input/output embeddings, max {arch.max_position_embeddings} positions.
- Parameters: {model.num_parameters():,} ({model.get_input_embeddings().weight.numel():,} of them in the
  embedding), stored in {str(SHIPPED_DTYPE).removeprefix("torch.")} (`model.safetensors`).
- Tokenizer: the bundled Mistral-7B SentencePiece tokenizer (`distill/assets/tokenizer`, 32,000 tokens),
  with the `mistral` chat template of distill (`chat_template.jinja`); turns end with `</s>`.

## Training

- Data: `text_train.jsonl` (Python 3.11 documentation passages) and `chat_train.jsonl` (Python FAQ and
  chatterbot-corpus conversations, `mistral` template), cross-entropy on every token, samples cut to
  {data["max_seq_length"]} tokens and packed into rows of {data["max_seq_length"]}.
- {trainer["max_steps"]} optimizer steps of {data["batch_size"]} rows, AdamW (lr {optimizer["lr"]},
  weight decay {optimizer["weight_decay"]}), {schedule["warmup_steps"]} warmup steps then cosine decay,
  gradient clipping {trainer["gradient_clip_val"]}, `{config["precision"]}` on 2 CPU cores:
  {minutes:.1f} minutes.
- Config: `configs/teacher_pretrain.yaml` (the resolved run config is `distill_config.yaml`).

## Validation perplexity

Computed by `scripts/train_teacher.py` on these 16-bit weights with plain transformers:

| set | file | tokens counted | tokens | loss (nats) | perplexity |
|---|---|---|---|---|---|
{rows}

## License and data

The weights are derived from the bundled demo data: Python documentation (PSF License Agreement) and
chatterbot-corpus (BSD-3-Clause); the tokenizer is Mistral AI's (Apache-2.0). See
`distill/assets/NOTICE.md` and the license files beside it. distill itself is Apache-2.0.

## Rebuild

```bash
python scripts/train_teacher.py
```

trains with `python -m distill fit --config configs/teacher_pretrain.yaml`, converts the export to
16-bit, checks that the validation loss moved by less than {MAX_LOSS_CHANGE:.0%}, prints the perplexities
above and rewrites this card. Results vary slightly with the machine (bf16 kernels, thread count).
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate the shipped teacher, no training")
    args = parser.parse_args()
    config = yaml.safe_load(CONFIG.read_text())
    tokenizer_path = TEACHER if args.eval_only else REPO / config["model"]["init_args"]["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sets = validation_sets(tokenizer, config["data"]["init_args"]["max_seq_length"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.eval_only:
        report("shipped", evaluate(load(TEACHER), sets, pad_id))
        return
    seconds = train(CONFIG)
    print(f"[teacher] training took {seconds / 60:.1f} min", flush=True)
    before = evaluate(load(TEACHER), sets, pad_id)
    report("float32 export", before)
    shrink(TEACHER, SHIPPED_DTYPE)
    after = evaluate(load(TEACHER), sets, pad_id)
    report(f"{SHIPPED_DTYPE} weights", after)
    check_close(before, after)
    (TEACHER / "README.md").write_text(model_card(config, load(TEACHER), after, seconds / 60))
    print(f"[teacher] {TEACHER.relative_to(REPO)}: {directory_size(TEACHER) / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
