"""RL stage: the GRPO demo's held-out reward before and after training, where a step's time goes, and
what our rollout costs over a bare ``model.generate``.

Quality and time split: ``configs/grpo.yaml`` as it is (the bundled chat model, 4 prompts x 8
completions a step, 12 new tokens, 40 steps): ``val/reward`` on the held-out prompts of
``rl_val.jsonl`` from a validation of the starting policy, then after the fit. During the fit the
engine's calls are timed, so ``generation_share`` is the share of the training steps' wall time spent
sampling (the rest: scoring, the update's forward and backward, the optimizer).

Rollout overhead: on the same held-out prompt batches, with the same settings and seeds, ``Rollouts.roll``
(sampling, cutting at the stop token, decoding, both reward functions, building the training rows) vs
``model.generate`` alone. Both draw the very same tokens (checked), so the ratio of their times is the
ratio of their tokens/s; interleaved, ``--repeats`` rounds, median. On a CPU the process runs
``--threads`` threads (default 1; see benchmarks/preference.py for why).

    python benchmarks/rl.py [--steps 40] [--repeats 5]

Last line: one JSON object with reward_before, reward_after, generation_share, rollout_vs_generate (and
the raw figures).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import StepTime, build, demo_config, device_name, require_teacher, result

from distill.data.batch import PromptBatch
from distill.rollout.completions import trim_at_stop
from distill.rollout.engine import generation_options, rollout_seed


class TimedEngine:
    """An engine that times the one it wraps, during training steps only."""

    def __init__(self, engine, trainer: L.Trainer) -> None:
        self.engine, self.trainer, self.seconds = engine, trainer, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.engine(*args, **kwargs)
        if self.trainer.training:
            self.seconds += time.perf_counter() - start
        return out


def train_and_time(steps: int, directory: Path) -> dict:
    config = demo_config("grpo.yaml", directory)
    config["trainer"].update(max_steps=steps, val_check_interval=steps)  # validated once, at the end
    cli = build(config, directory)
    (before,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    step_time = StepTime()
    cli.trainer.callbacks.append(step_time)
    rollouts = cli.model.objective.rollouts
    rollouts.engine = timed = TimedEngine(rollouts.engine, cli.trainer)  # a measuring probe
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rollouts.engine = timed.engine
    after = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "reward_before": before["val/reward"],
        "reward_after": after["val/reward"],
        **{f"{k.removeprefix('val/rewards/')}_before": v for k, v in before.items() if "rewards/" in k},
        **{f"{k.removeprefix('val/rewards/')}_after": v for k, v in after.items() if "rewards/" in k},
        "generation_share": timed.seconds / step_time.seconds,
        "step_seconds": step_time.seconds / steps,
        "cli": cli,
    }


def bare_generate(model, batch: PromptBatch, rollouts, seed: int) -> torch.Tensor:
    """What the engine calls (every generation option given: ``generation_options``), with nothing
    around it."""
    options = generation_options(
        rollouts.sampling, rollouts.num_generations, rollouts.stop_ids, rollouts.pad_id
    )
    torch.manual_seed(seed)
    out = model.generate(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, **options)
    return out[:, batch.prompt_ids.shape[1] :]


@torch.no_grad()
def rollout_overhead(cli, repeats: int) -> dict:
    """Seconds of ``Rollouts.roll`` and of a bare ``generate`` over the same held-out batches, per round."""
    model, rollouts = cli.model.model, cli.model.objective.rollouts
    batches = list(cli.datamodule.val_dataloader())
    model.eval()
    ratios = []
    for _ in range(repeats):
        seconds = {"rollout": 0.0, "generate": 0.0}
        for index, batch in enumerate(batches):
            seed = rollout_seed("benchmark", index)
            start = time.perf_counter()
            bare = bare_generate(model, batch, rollouts, seed)
            seconds["generate"] += time.perf_counter() - start
            start = time.perf_counter()
            rollout = rollouts.roll(model, batch, seed)
            seconds["rollout"] += time.perf_counter() - start
            same = trim_at_stop(bare, rollouts.stop_ids, rollouts.pad_id)
            assert torch.equal(same.ids, rollout.completions.ids), "the rollout drew other tokens"
        ratios.append(seconds["generate"] / seconds["rollout"])
    return {"rounds": ratios, "prompts": sum(len(b.shas) for b in batches)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's)")
    args = parser.parse_args()
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    require_teacher()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = train_and_time(args.steps, Path(tmp))
        overhead = rollout_overhead(run.pop("cli"), args.repeats)
    ratio = statistics.median(overhead["rounds"])
    print(
        f"device: {device_name()}; configs/grpo.yaml, {args.steps} steps; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    print(f"held-out reward: {run['reward_before']:.3f} before, {run['reward_after']:.3f} after")
    for key in sorted(k for k in run if k.endswith(("_before", "_after")) and not k.startswith("reward")):
        print(f"  {key}: {run[key]:.3f}")
    print(f"step: {run['step_seconds']:.2f} s, {run['generation_share']:.0%} of it generating")
    rounds = ", ".join(f"{r:.3f}" for r in overhead["rounds"])
    print(f"rollout vs bare generate on {overhead['prompts']} prompts: {ratio:.3f}x (rounds {rounds})")
    result(
        {
            "reward_before": round(run["reward_before"], 3),
            "reward_after": round(run["reward_after"], 3),
            "generation_share": round(run["generation_share"], 3),
            "rollout_vs_generate": round(ratio, 3),
            "step_seconds": round(run["step_seconds"], 3),
            **{
                k: round(v, 3)
                for k, v in run.items()
                if k.endswith(("_before", "_after")) and "reward" not in k
            },
        }
    )


if __name__ == "__main__":
    main()
