"""Distillation regimes side by side: SFT vs offline cached KD vs on-policy KD, from the same student.

The KD demo's student (configs/kd.yaml, 2.3M parameters) is first fine-tuned on the bundled
conversations for ``--warmup`` steps (on-policy distillation starts from an SFT'd student, as in GKD;
after 150 steps this student's samples are still noise to the teacher, and on-policy KD then gains
nothing over offline KD with the same loss);
from that one checkpoint three runs of ``--steps`` steps each, with the same optimizer, schedule, batch
size and seed:

- ``sft``: cross-entropy on the dataset's responses (configs/kd.yaml's data, ``CrossEntropy``);
- ``offline_kd``: configs/kd.yaml as it is (forward KL, alpha 0.9; its fit collects the teacher's
  top-64 into the cache before the first step: not timed);
- ``offline_kd_same_loss``: the same, with on-policy's loss (JSD(0.5), alpha 1): the control that
  separates the regime from the divergence (it trains every assistant turn of every conversation);
- ``offline_same_prompts``: configs/kd_onpolicy.yaml with ``lmbda: 0``: KD with on-policy's loss on the
  dataset's answers to the very prompts on-policy samples from (the teacher in memory; the same loss
  as cached KD, ``test_lmbda_zero_is_online_kd_on_the_datasets_responses``);
- ``onpolicy``: configs/kd_onpolicy.yaml as it is (GKD: JSD(0.5), half the batches sampled by the
  student, the teacher beside it);
- ``onpolicy_pg``: the same with ``loss: reverse_kl_pg`` and ``lmbda: 1`` (the policy-gradient form);
- ``rounds``: configs/examples/kd_onpolicy_rounds.yaml over configs/kd.yaml, on the same prompts: every
  4 steps the student answers 64 prompts, the teacher's top-64 of those answers is cached, trained on,
  purged (JSD(0.5) on the student's own answers only; sampling and collection are in its step time).

Each is measured on the held-out prompts of chat_val.jsonl: the student samples ``--samples`` answers
per prompt (temperature 1, the same seeds for every student) and the teacher's mean per-token NLL of
those answers is ``teacher_nll_*`` (lower: the student writes what the teacher would); ``ppl_*`` is the
student's perplexity on the held-out responses. ``seconds_per_step_*``: the training loop's wall time
over its steps (no validation runs): data included, so the rounds' sampling and collection and the
on-policy teacher's forward count; offline KD's collection before the first step does not.

    python benchmarks/onpolicy.py [--warmup 450] [--steps 100] [--samples 4]

Last line: one JSON object with teacher_nll_<run>, ppl_<run> and seconds_per_step_<run> for every run
above (and the starting point's teacher_nll_warm, ppl_warm).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from _common import (
    DATA,
    ROOT,
    TEACHER,
    build,
    device_name,
    held_out_perplexity,
    kd_and_sft_configs,
    require_teacher,
    result,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data.encoding import IGNORE_INDEX
from distill.data.prompt_datamodule import PromptDataModule
from distill.rollout.completions import rollout_batch, trim_at_stop
from distill.rollout.engine import Sampling, TransformersEngine, rollout_seed


def quiet(config: dict, directory: Path, steps: int) -> dict:
    """A config writing only into ``directory``: no logger, export, checkpoints or validation."""
    config["trainer"].update(
        max_steps=steps,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=str(directory),
    )
    return config


def from_checkpoint(config: dict, model_dir: Path) -> dict:
    """The config's student loaded from ``model_dir`` instead of built from ``model_config``."""
    init = config["model"]["init_args"]
    init.pop("model_config", None)
    init.update(model=str(model_dir), dtype="float32")
    return config


def rounds_config(kd: dict, steps: int) -> dict:
    """configs/examples/kd_onpolicy_rounds.yaml over the KD config, its prompts the KD data's own."""
    example = yaml.safe_load((ROOT / "configs" / "examples" / "kd_onpolicy_rounds.yaml").read_text())
    config = yaml.safe_load(yaml.safe_dump(kd))
    config["model"]["init_args"]["objective"]["init_args"].update(
        example["model"]["init_args"]["objective"]["init_args"]
    )
    rounds = {**example["data"]["init_args"]["rounds"], "responses": True, "max_prompt_length": 192}
    batches_per_round = rounds["prompts_per_round"] // config["data"]["init_args"]["batch_size"]
    rounds["num_rounds"] = -(-steps // batches_per_round)
    config["data"]["init_args"].update(
        rounds=rounds,
        cache_dir=str(Path(kd["data"]["init_args"]["cache_dir"]).with_name("rounds-cache")),
        cache_size_gb=example["data"]["init_args"]["cache_size_gb"],
    )
    return config


class LoopTime(L.Callback):
    """Wall time of the training loop, first batch fetch to last step, the data's work included."""

    def on_train_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, *args) -> None:
        self.seconds = time.perf_counter() - self.start


def fit(config: dict, directory: Path):
    """Fit ``config``; the trained causal LM and the training loop's seconds per step."""
    cli = build(config, directory)
    timer = LoopTime()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.causal_lm.eval(), timer.seconds / config["trainer"]["max_steps"]


@torch.no_grad()
def teacher_nll_of_samples(student, teacher, data: PromptDataModule, samples: int) -> float:
    """The teacher's mean per-token NLL of the student's sampled answers to the held-out prompts."""
    engine, sampling = TransformersEngine(), Sampling(max_new_tokens=48, temperature=1.0)
    stop = data.generation_stop_ids
    total, tokens = 0.0, 0
    for index, batch in enumerate(data.val_dataloader()):
        ids = engine(
            student, batch.prompt_ids, batch.prompt_mask, num_samples=samples, sampling=sampling,
            stop_ids=stop, pad_id=data.pad_id, seed=rollout_seed("benchmark", index),
        )  # fmt: skip
        rows = rollout_batch(batch.prompt_ids, batch.prompt_mask, trim_at_stop(ids, stop, data.pad_id))
        logits = teacher(
            input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids
        ).logits[:, :-1]
        labels = rows.labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        tokens += int((labels != IGNORE_INDEX).sum())
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=450, help="SFT steps of the shared starting point")
    parser.add_argument("--steps", type=int, default=100, help="steps of each regime")
    parser.add_argument("--samples", type=int, default=4, help="sampled answers per held-out prompt")
    args = parser.parse_args()
    require_teacher()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    val = DATA / "chat_val.jsonl"
    held_out = PromptDataModule(
        val, val_files=val, tokenizer=str(TEACHER), template="mistral", responses=True,
        max_prompt_length=256, max_response_length=256, batch_size=8,
    )  # fmt: skip
    held_out.setup("validate")
    nll, ppl, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configs = kd_and_sft_configs(tmp, args.warmup)
        warm, _ = fit(quiet(configs["sft"], tmp / "warmup", args.warmup), tmp / "warmup")
        warm.save_pretrained(tmp / "warm")
        tokenizer.save_pretrained(tmp / "warm")
        nll["warm"] = teacher_nll_of_samples(warm, teacher, held_out, args.samples)
        ppl["warm"] = held_out_perplexity(warm, tokenizer)

        configs = kd_and_sft_configs(tmp, args.steps)
        onpolicy = yaml.safe_load((ROOT / "configs" / "kd_onpolicy.yaml").read_text())
        same_loss = yaml.safe_load(yaml.safe_dump(configs["kd"]))
        objective = onpolicy["model"]["init_args"]["objective"]["init_args"]
        same_loss["model"]["init_args"]["objective"]["init_args"].update(
            loss=objective["loss"], beta=objective["beta"], alpha=1.0
        )
        same_prompts = yaml.safe_load(yaml.safe_dump(onpolicy))
        same_prompts["model"]["init_args"]["objective"]["init_args"]["lmbda"] = 0.0
        pg = yaml.safe_load(yaml.safe_dump(onpolicy))
        pg["model"]["init_args"]["objective"]["init_args"].update(loss="reverse_kl_pg", lmbda=1.0)
        runs = {
            "sft": configs["sft"],
            "offline_kd": configs["kd"],
            "offline_kd_same_loss": same_loss,
            "offline_same_prompts": same_prompts,
            "onpolicy": onpolicy,
            "onpolicy_pg": pg,
            "rounds": rounds_config(configs["kd"], args.steps),
        }
        for name, config in runs.items():
            config = from_checkpoint(quiet(config, tmp / name, args.steps), tmp / "warm")
            student, seconds[name] = fit(config, tmp / name)
            nll[name] = teacher_nll_of_samples(student, teacher, held_out, args.samples)
            ppl[name] = held_out_perplexity(student, tokenizer)
    prompts = len(held_out.val)
    print(
        f"device: {device_name()}; warm start {args.warmup} SFT steps, then {args.steps} steps each; "
        f"{prompts} held-out prompts x {args.samples} samples; {time.perf_counter() - start:.0f} s in all"
    )
    for name in ("warm", *runs):
        step = f", {seconds[name]:.3f} s/step" if name in seconds else ""
        print(f"{name:>20}: teacher NLL of own samples {nll[name]:.3f}, held-out ppl {ppl[name]:.2f}{step}")
    print(f"on-policy vs offline KD: teacher NLL {nll['onpolicy'] - nll['offline_kd']:+.3f} nats/token")
    print(f"on-policy vs offline KD with its loss: {nll['onpolicy'] - nll['offline_kd_same_loss']:+.3f}")
    print(f"on-policy vs offline on its prompts: {nll['onpolicy'] - nll['offline_same_prompts']:+.3f}")
    result(
        {
            **{f"teacher_nll_{k}": round(v, 4) for k, v in nll.items()},
            **{f"ppl_{k}": round(v, 3) for k, v in ppl.items()},
            **{f"seconds_per_step_{k}": round(v, 4) for k, v in seconds.items()},
            "onpolicy_minus_offline_nll": round(nll["onpolicy"] - nll["offline_kd"], 4),
            "onpolicy_minus_same_loss_nll": round(nll["onpolicy"] - nll["offline_kd_same_loss"], 4),
            "onpolicy_minus_same_prompts_nll": round(nll["onpolicy"] - nll["offline_same_prompts"], 4),
        }
    )


if __name__ == "__main__":
    main()
