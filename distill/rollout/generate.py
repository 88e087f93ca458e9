"""``python -m distill generate``: a model's completions of a prompt file, written as SFT data (README,
"Generating completions": the output's lines, resuming, the recorded settings). An adapter's saved
``distill_config.yaml`` never turns ``trust_remote_code`` on: only ``--trust_remote_code true`` does.

    python -m distill generate --model out/sft --prompts prompts.jsonl --output completions.jsonl
    python -m distill generate --config generate.yaml --temperature 0.7
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.prompt_datamodule import EncodedPrompt, PromptDataModule
from distill.data.templates import BUILTIN_TEMPLATES, TemplateError
from distill.progress import Progress
from distill.rollout.engine import Engine, Sampler, Sampling, TransformersEngine, rollout_seed
from distill.teacher.identity import check_model_source, model_identity
from distill.train.merge import tokenizer_source, trained_model_kwargs
from distill.train.model import load_causal_lm


def generate(
    model: str,
    prompts: str | list[str],
    output: str,
    adapter: str | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    max_prompt_length: int = 2048,
    seed: int = 0,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """Write ``num_samples`` completions of every prompt to ``output`` (JSONL, messages format).

    Sampling follows these options alone (``engine.Sampling``): the model's own ``generation_config.json``
    is not applied. Set ``temperature``, ``top_p`` and ``top_k`` to its card's values to sample as it says.

    Args:
        model: Hugging Face directory, hub name or ``.gguf`` file of the model (the base, when
            ``adapter`` is set).
        prompts: JSON/JSONL files or directories of prompt records (``question``, ``messages`` or
            ``prompt``).
        output: The JSONL file to write; an existing one is resumed.
        adapter: A LoRA adapter directory to apply to ``model``.
        tokenizer: Tokenizer name or path (default: the adapter's, else the model's).
        template: Chat template (``chatml``, ``llama3``, ``alpaca``, ``mistral`` or Jinja; default:
            the tokenizer's own).
        num_samples: Completions per prompt.
        max_new_tokens: Longest completion; longer ones are cut (``stopped: false``).
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        top_k: Top-k sampling (0: off).
        batch_size: Prompts per generate call.
        max_prompt_length: Longer prompts are skipped and counted.
        seed: Seed of the sampling (with each batch's prompts).
        dtype: Weight dtype (``auto``: the checkpoint's; ``float32``, ``bfloat16``, ...).
        trust_remote_code: Run the model's own code (its ``config.json``'s ``auto_map``). Only this
            option turns it on, never an adapter's saved config.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be at least 1, got {num_samples}, {batch_size}")
    check_dtype(dtype)
    check_model_source("--model", model, "config.json", "model")
    if adapter is not None:
        check_model_source("--adapter", adapter, "adapter_config.json", "adapter")
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k)
    tokenizer = tokenizer or (str(tokenizer_source(Path(adapter), model)) if adapter else model)
    data = PromptDataModule(
        prompts,
        tokenizer=tokenizer,
        template=template,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
    )
    if template is None and not data.tokenizer.chat_template:
        raise TemplateError(
            f"the tokenizer {tokenizer} has no chat_template; pass --template with one of "
            f"{sorted(BUILTIN_TEMPLATES)} or a Jinja template"
        )
    data.setup("predict")
    output_path = Path(output)
    settings = {
        "model": model_identity(model),
        "adapter": None if adapter is None else model_identity(adapter),
        "trust_remote_code": trust_remote_code,
        "template": data.resolve_chat_template().name,
        "num_samples": num_samples,
        "sampling": asdict(sampling),
        "seed": seed,
    }
    refuse_other_settings(output_path, settings)
    done = completed_prompts(output_path, num_samples)
    pending = [p for p in data.train if p.sha not in done]
    print(
        f"[distill] generate: {len(data.train)} prompts, {len(data.train) - len(pending)} already in "
        f"{output_path}, {len(pending)} to go, {num_samples} completion(s) each"
    )
    policy = load_model(model, adapter, dtype, data.tokenizer, trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy.to(device).eval()
    record_settings(output_path, settings)  # only now: a load that fails leaves nothing behind
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with Progress(len(pending), "generating", "prompts") as bar:
        written = write_completions(
            output_path, policy, data, pending, sampling, num_samples, batch_size, (seed, "generate"), bar
        )
    print(f"[distill] generate: wrote {written} completions to {output_path}")
    return output_path


def write_completions(
    path: Path,
    policy: torch.nn.Module,
    data: PromptDataModule,
    prompts: list[EncodedPrompt],
    sampling: Sampling,
    num_samples: int,
    batch_size: int,
    seed: tuple,
    progress: Progress | None = None,
    engine: Engine | None = None,
    synced: bool = False,
) -> int:
    """Append the completions of ``prompts`` (``num_samples`` each) that ``path`` lacks, batch by batch,
    each batch flushed to disk (a crash loses at most the batch being generated); returns how many were
    written. A (prompt SHA, sample) already in the file (a batch a kill cut short wrote part of) is
    generated with its batch but not written again. Batches are seeded by ``seed`` and their prompts'
    SHAs.

    ``synced`` (sharded weights): every rank must call this at once, and every rank then makes as many
    generate calls as the rank with the most batches; a rank with fewer (its file nearly complete after
    a kill, or nothing left) steps through idle ones, whose completions are dropped.
    """
    sampler = Sampler(engine or TransformersEngine(), sampling, data.generation_stop_ids, data.pad_id, synced)
    present = set(read_completions(path)) if path.exists() else set()
    written = 0
    device = next(policy.parameters()).device
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    calls = agreed_calls(len(batches), device) if synced else len(batches)
    with open(path, "a", encoding="utf-8") as file:
        for chunk in batches:
            batch = data.collator(chunk)
            ids, mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
            completions = sampler(policy, ids, mask, num_samples, rollout_seed(*seed, *batch.shas))
            texts = data.tokenizer.batch_decode(completions.ids, skip_special_tokens=True)
            stopped = completions.stopped.tolist()
            for row, text in enumerate(texts):
                prompt, sample = chunk[row // num_samples], row % num_samples
                if (prompt.sha, sample) in present:
                    continue
                line = completion_line(prompt, text.strip(), sample, stopped[row])
                file.write(json.dumps(line, ensure_ascii=False) + "\n")
                present.add((prompt.sha, sample))  # a prompt listed twice is written once
                written += 1
            file.flush()
            os.fsync(file.fileno())
            if progress is not None:
                progress.update(len(chunk))
    for _ in range(calls - len(batches)):
        # a one-token prompt: this rank's forwards serve only to gather the shards the other ranks need
        one = torch.full((1, 1), sampler.pad_id, device=device)
        sampler(policy, one, torch.ones_like(one), num_samples=1, seed=0)
    return written


def agreed_calls(calls: int, device: torch.device) -> int:
    """The most generate calls any rank has to make (a collective: every rank calls it)."""
    count = torch.tensor([calls], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def completion_line(prompt: EncodedPrompt, text: str, sample: int, stopped: bool) -> dict:
    """One SFT record: the prompt's turns and the completion; then where it came from."""
    return {
        **prompt.fields,  # the record's own keys (an answer, an id), under the ones that say what this is
        "messages": [*prompt.messages, {"role": "assistant", "content": text}],
        "prompt_sha": prompt.sha,
        "sample": sample,
        "source": prompt.source,
        "stopped": stopped,
    }


def completed_prompts(path: Path, num_samples: int) -> set[str]:
    """SHAs of the prompts with all their completions in ``path``. A last line that is cut short (a
    crash mid-write) is dropped from the file first; any other bad line is an error naming it."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"[distill] generate: dropping the last line of {path}, cut short by an interrupted run")
        with open(path, "r+b") as file:
            file.truncate(keep)
        data = data[:keep]
    lines = read_completions(path)
    return {sha for sha, _ in lines if all((sha, sample) in lines for sample in range(num_samples))}


def read_completions(path: Path) -> dict[tuple[str, int], tuple[dict, int]]:
    """Each completion of ``path`` by (prompt SHA, sample number), with its line number; the first line
    wins (a batch cut short by a crash is generated again after its surviving lines). A line that is not
    a completion is an error naming it."""
    lines: dict[tuple[str, int], tuple[dict, int]] = {}
    # \n only: str.splitlines() also cuts at U+2028 and friends, which a completion's JSON string may hold
    for number, text in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], start=1):
        try:
            line = json.loads(text)
            key = (line["prompt_sha"], line["sample"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}:{number}: not a completion line written by distill generate ({error}); "
                "write to another output"
            ) from error
        lines.setdefault(key, (line, number))
    return lines


def check_settings(output: Path, settings: dict) -> None:
    """Record the run's settings beside ``output``, or refuse to resume a file written with others."""
    refuse_other_settings(output, settings)
    record_settings(output, settings)


def _meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def refuse_other_settings(output: Path, settings: dict) -> None:
    """Refuse to resume ``output`` if the settings recorded beside it are not ``settings``."""
    meta = _meta_path(output)
    if output.exists() and meta.exists():
        before = json.loads(meta.read_text())
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise ValueError(
                f"{output} was written with other settings ({', '.join(changed)} differ, see {meta}): "
                "write to another output, or delete both files to start again"
            )


def record_settings(output: Path, settings: dict) -> None:
    """Write ``settings`` beside ``output``, unless they are there (``refuse_other_settings`` checked
    that those are the same)."""
    meta = _meta_path(output)
    if output.exists() and meta.exists():
        return
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(settings, indent=2) + "\n")


def load_model(
    model: str,
    adapter: str | None,
    dtype: str,
    tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """``model`` (a directory, hub name or ``.gguf`` file; with ``adapter`` on it) with weights of
    ``dtype`` (``check_dtype``'s), loaded as a fit loads its student (rows added for tokens of
    ``tokenizer`` it lacks). The model's own code runs only with ``trust_remote_code``, whatever the
    adapter's saved config says."""
    trusted = {"trust_remote_code": True} if trust_remote_code else {}
    if adapter is not None:
        from distill.train.merge import load_adapter

        options = {**trained_model_kwargs(Path(adapter), opt_in="--trust_remote_code true"), **trusted}
        return load_adapter(adapter, base=model, model_kwargs=options, dtype=dtype)
    return load_causal_lm(model, None, tokenizer, dtype, options=trusted)


def check_dtype(dtype: str) -> None:
    """``auto`` (the checkpoint's) or the name of a torch float type."""
    named = getattr(torch, dtype, None)
    if dtype != "auto" and not (isinstance(named, torch.dtype) and named.is_floating_point):
        raise ValueError(f"--dtype is auto or a float type (float32, bfloat16, float16), got {dtype!r}")
