"""``python -m distill pipeline --config configs/pipelines/NAME.yaml``: run the stages in order, each as
its own ``python -m distill fit`` process, merging a LoRA stage's adapter before the next stage loads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.pipeline.inputs import ContentHashes
from distill.pipeline.plan import plan
from distill.pipeline.runner import Runner, describe, log
from distill.pipeline.spec import PipelineError, read_pipeline


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill pipeline", description=__doc__)
    parser.add_argument("--config", required=True, help="the pipeline file (configs/pipelines/*.yaml)")
    parser.add_argument("--stages", default=None, help="comma-separated stage names to run (default: all)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if complete")
    args = parser.parse_args(argv)
    try:
        pipeline = read_pipeline(args.config)
        names = [s.name for s in pipeline.stages]
        selected = set(args.stages.split(",")) if args.stages else set(names)
        if selected - set(names):
            raise PipelineError(
                f"--stages: no stage {sorted(selected - set(names))} in {args.config} ({names})"
            )
        stages = plan(pipeline)
        hashes = ContentHashes(Path(pipeline.output_dir) / "data_hashes.json")
        if args.dry_run:
            plan_text, refusals = describe(stages, selected, hashes)
            print(f"pipeline {args.config} -> {pipeline.output_dir}\n{plan_text}")
            if refusals:
                raise PipelineError("\n".join(refusals))
            return
        Runner(stages, selected, hashes, force=args.force).run()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    log(f"done: {pipeline.output_dir}")
