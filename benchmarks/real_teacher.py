"""KD from a real pretrained teacher vs cross-entropy alone, and the KD recipes that could explain which wins.

Teacher: SmolLM2-135M-Instruct (fetch and convert it once with ``python scripts/fetch_real_teacher.py``).
Students, on the teacher's tokenizer: ``pruned`` (``distill prune`` of the teacher: PRUNING below) and
``random`` (a fresh Llama of RANDOM_SHAPE). Data: the bundled chats (chat_train.jsonl to train,
chat_val.jsonl held out) in the teacher's own chat template. Every run of a student sees the same batches
in the same order (the KD data module's, seed 42); only the objective (or the learning rate) differs:

  ce               cross-entropy only (SFT)
  kd               configs/kd.yaml's loss: forward KL on cached top-64 + tail, alpha 0.9, T 1
  alpha0.5/1.0     kd with that alpha          t2       kd at temperature 2
  reverse_kl, jsd  kd with that divergence     k256     kd on a top-256 cache
  sampled          RS-KD style: sampled_ce on 64 draws per position from the whole teacher distribution
  lr2x, lr0.5x     kd at twice / half the student's learning rate; ce_lr2x: ce at twice the rate
  ce_long, best_long   ce and the best KD variant (held-out perplexity) at 3x the steps

The teacher's targets are collected once per cache setting (top-64, top-256, sampled: a cache answers
only the settings it was built with) into OUT/cache-*, and every KD run reads them. val/ce (the mean
cross-entropy on chat_val's assistant tokens) is recorded every ``--val_every`` steps; the held-out
perplexity is measured after each run with the same code for the teacher and every student.

Sized for a shared 2-core CPU (fp32), where the teacher's forward is the costliest part (~10 samples a
minute): the first TRAIN_SAMPLES (200) training conversations, batch 8, 256 tokens, 40 steps (1.6
epochs), students of ~11M parameters (most of them the 49,152-token embedding). With a GPU, raise
TRAIN_SAMPLES, ``--steps`` and the student sizes.

Resumable: each run's figures go to OUT/results.json as it finishes, and a rerun skips every run whose
settings are unchanged, so the grid can be completed over several sessions:

    OMP_NUM_THREADS=2 python benchmarks/real_teacher.py [--steps 40] [--students pruned,random]
        [--only ce,kd,alpha0.5] [--teacher models/smollm2-135m-instruct] [--out cache/real_teacher]

Last line: one JSON object: teacher_ppl, steps, and per student: ppl_ce, ppl_kd_default, ppl_kd_best,
best_recipe, kd_steps_to_ce_final_share (the best KD run's first validation step at which its val/ce is
at or below CE's final val/ce, as a share of the steps; null if never), and ``runs`` (every run's
held-out perplexity, val/ce curve and seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from _common import DATA, ROOT, build, device_name, held_out_perplexity, kd_and_sft_configs, result

DEFAULT_TEACHERS = (ROOT / "models" / "smollm2-135m-instruct", Path("/work/models/smollm2-135m-instruct"))
# 30 -> 4 layers, hidden 576 -> 192, MLP 1536 -> 512, 9 -> 6 heads (2 of 3 KV groups): ~11M parameters,
# 9.4M of them the (tied) embedding; sized so the grid runs on a shared 2-core CPU in about an hour
PRUNING = {"num_layers": 4, "hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6}
RANDOM_SHAPE = {
    "model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 3, "num_key_value_heads": 3, "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}  # fmt: skip
TRAIN_SAMPLES = 200  # of chat_train: the teacher (135M) runs over each once per cache, the costliest part
LR = {"pruned": 3e-4, "random": 1e-3}  # a pruned model needs repair, not relearning
SPARSITY = {"k64": {"k": 64}, "k256": {"k": 256}, "sampled": {"scheme": "sampled", "k": 0, "num_draws": 64}}
KD = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.9}
# name -> (objective options or None for CE, cache, learning-rate factor, steps factor)
VARIANTS: dict[str, tuple[dict | None, str, float, int]] = {
    "ce": (None, "k64", 1.0, 1),
    "kd": (KD, "k64", 1.0, 1),
    "alpha0.5": ({**KD, "alpha": 0.5}, "k64", 1.0, 1),
    "alpha1.0": ({**KD, "alpha": 1.0}, "k64", 1.0, 1),
    "t2": ({**KD, "temperature": 2.0}, "k64", 1.0, 1),
    "reverse_kl": ({**KD, "loss": "reverse_kl"}, "k64", 1.0, 1),
    "jsd": ({**KD, "loss": "jsd"}, "k64", 1.0, 1),
    "k256": (KD, "k256", 1.0, 1),
    "sampled": ({**KD, "loss": "sampled_ce"}, "sampled", 1.0, 1),
    "lr2x": (KD, "k64", 2.0, 1),
    "lr0.5x": (KD, "k64", 0.5, 1),
    "ce_lr2x": (None, "k64", 2.0, 1),  # lr2x's control: is a win at 2x the learning rate KD's or the rate's?
    "ce_long": (None, "k64", 1.0, 3),
}
CORE = ("ce", "kd", "alpha0.5")  # run first: the comparison the issue is about
# the variants that need new caches (k256, sampled) last: each costs a collection by the teacher
ORDER = (
    *CORE,
    "alpha1.0",
    "t2",
    "reverse_kl",
    "jsd",
    "lr2x",
    "lr0.5x",
    "ce_lr2x",
    "ce_long",
    "best_long",
    "k256",
    "sampled",
)


class ValCurve(L.Callback):
    """val/ce (and val/kd where KD runs) at every validation after the sanity check."""

    def __init__(self) -> None:
        self.points: list[dict] = []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        # CE only logs its cross-entropy as val/loss (KD: val/ce, its loss being the mix)
        names = {"ce": "val/ce" if "val/ce" in metrics else "val/loss", "kd": "val/kd"}
        point = {"step": trainer.global_step}
        point.update({k: round(float(metrics[name]), 4) for k, name in names.items() if name in metrics})
        self.points.append(point)


def find_teacher(given: str | None) -> Path:
    candidates = [Path(given)] if given else list(DEFAULT_TEACHERS)
    for path in candidates:
        if (path / "config.json").exists():
            return path
    raise SystemExit(
        f"no teacher at {', '.join(map(str, candidates))}: fetch and convert SmolLM2-135M-Instruct with "
        "`python scripts/fetch_real_teacher.py` (it writes models/smollm2-135m-instruct), or pass --teacher"
    )


def run_config(base: dict, variant: str, student: str, paths: dict, steps: int, val_every: int) -> dict:
    objective, cache, lr_factor, steps_factor = VARIANTS[variant]
    config = copy.deepcopy(base["sft" if objective is None else "kd"])
    config["trainer"].update(max_steps=steps * steps_factor, val_check_interval=val_every)
    data = config["data"]["init_args"]
    data.pop("template", None)  # the teacher's own chat template
    data.update(
        max_seq_length=256, batch_size=8, max_train_samples=TRAIN_SAMPLES, max_eval_samples=64,
        sparsity=SPARSITY[cache], cache_dir=str(paths["out"] / f"cache-{cache}"),
        teachers=[{"model": str(paths["teacher"]), "name": "smollm2-135m-instruct"}],
    )  # fmt: skip
    model = config["model"]["init_args"]
    fresh = student == "random"
    model.update(
        model=None if fresh else str(paths["pruned"]), model_config=RANDOM_SHAPE if fresh else None,
        tokenizer=str(paths["teacher"]), dtype="float32",
    )  # fmt: skip
    if objective is not None:
        model["objective"]["init_args"].update(objective)
    model["optimizer"]["init_args"]["lr"] = LR[student] * lr_factor
    model["scheduler"]["init_args"]["warmup_steps"] = 10
    return config


def train(config: dict, directory: Path, tokenizer) -> dict:
    torch.manual_seed(0)
    began = time.perf_counter()
    cli = build(config, directory)
    curve = ValCurve()
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - began  # the first run of a cache also collects it
    ppl = held_out_perplexity(cli.model.model, tokenizer, template=None)
    return {"ppl": round(ppl, 3), "val": curve.points, "seconds": round(seconds, 1)}


def best_kd(runs: dict[str, dict]) -> str | None:
    kd = {name: r["ppl"] for name, r in runs.items() if "long" not in name and VARIANTS[name][0] is not None}
    return min(kd, key=kd.get) if kd else None


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    return next((p["step"] for p in curve if p.get("ce", math.inf) <= target), None)


def summary(results: dict, students: list[str], steps: int) -> dict:
    """The figures of the runs made at ``steps`` (results.json may hold others)."""
    out: dict = {"teacher_ppl": results.get("teacher_ppl"), "steps": steps}
    keys = ("ppl_ce", "ppl_kd_default", "ppl_kd_best", "best_recipe", "kd_steps_to_ce_final_share")
    out.update({key: {} for key in (*keys, "steps_to_ce_final")})
    done = {key: run for key, run in results["runs"].items() if results["settings"][key]["steps"] == steps}
    for student in students:
        runs = {key.split("/", 1)[1]: run for key, run in done.items() if key.startswith(student + "/")}
        best = best_kd(runs)
        out["ppl_ce"][student] = runs.get("ce", {}).get("ppl")
        out["ppl_kd_default"][student] = runs.get("kd", {}).get("ppl")
        out["ppl_kd_best"][student] = runs[best]["ppl"] if best else None
        out["best_recipe"][student] = best
        if "ce" not in runs:
            continue
        # the first validation step at which each run's val/ce is at or below CE's final one
        ce_curve = [p["ce"] for p in runs["ce"]["val"] if "ce" in p]
        # without a curve (a run recorded before val/loss was read), the held-out perplexity's log: the
        # same mean cross-entropy over chat_val's assistant tokens
        target = ce_curve[-1] if ce_curve else math.log(runs["ce"]["ppl"])
        out["steps_to_ce_final"][student] = {
            name: steps_to_reach(run["val"], target) for name, run in runs.items()
        }
        if best:
            reached = out["steps_to_ce_final"][student][best]
            out["kd_steps_to_ce_final_share"][student] = (
                None if reached is None else round(reached / steps, 3)
            )
    out["runs"] = done
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default=None, help="the teacher's HF directory")
    parser.add_argument("--out", default=str(ROOT / "cache" / "real_teacher"), help="caches, runs, results")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--val_every", type=int, default=8)
    parser.add_argument("--students", default="pruned,random")
    parser.add_argument(
        "--only", default=None, help="comma-separated variants (default: all, then best_long)"
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = find_teacher(args.teacher)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"teacher": teacher, "out": out, "pruned": out / "pruned"}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": {}, "settings": {}}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    students = args.students.split(",")
    if results.get("teacher_ppl") is None:
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        results["teacher_ppl"] = round(held_out_perplexity(model, tokenizer, template=None), 3)
        save()
        del model
    if "pruned" in students and not (paths["pruned"] / "config.json").exists():
        from distill.prune.options import Pruning
        from distill.prune.run import prune

        data = {"train_files": str(DATA / "chat_train.jsonl"), "max_seq_length": 256, "batch_size": 8}
        prune(str(teacher), str(paths["pruned"]), Pruning(**PRUNING, calibration_samples=32), data)
    base = kd_and_sft_configs(out, args.steps, same_batches=True)
    order = [(s, v) for v in (args.only.split(",") if args.only else ORDER) for s in students]
    print(
        f"device: {device_name()}; teacher {teacher} (held-out perplexity {results['teacher_ppl']})",
        flush=True,
    )
    for student, variant in order:
        if variant == "best_long":
            runs = summary(results, [student], args.steps)["runs"]
            best = best_kd({k.split("/", 1)[1]: v for k, v in runs.items() if k.startswith(student + "/")})
            if best is None:
                continue
            VARIANTS["best_long"] = (*VARIANTS[best][:3], 3)
            settings_extra = {"of": best}
        else:
            settings_extra = {}
        key = f"{student}/{variant}"
        config = run_config(base, variant, student, paths, args.steps, args.val_every)
        settings = {
            "steps": args.steps,
            "val_every": args.val_every,
            "variant": VARIANTS[variant],
            **settings_extra,
        }
        settings = json.loads(json.dumps(settings))
        if key in results["runs"] and results["settings"].get(key) == settings:
            print(f"{key}: done before (ppl {results['runs'][key]['ppl']})", flush=True)
            continue
        print(f"{key}: training {config['trainer']['max_steps']} steps", flush=True)
        results["runs"][key] = {
            **train(config, out / "runs" / key.replace("/", "-"), tokenizer),
            **settings_extra,
        }
        results["settings"][key] = settings
        save()
        print(f"{key}: {json.dumps(results['runs'][key])}", flush=True)
    result(summary(results, students, args.steps))


if __name__ == "__main__":
    main()
