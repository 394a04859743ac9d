"""Run the study for one model and profile: every job of the plan, in order, on the local instance.

python -m jobs.study                       # default model on the smoke profile
python -m jobs.study --model minilm-l6 --profile baseline
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from emotion_assets.registry import PROJECT_ROOT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.study",
        description="Materialize every asset of the study for one model × profile and print where the "
        "results, the MLflow store and the Dagster UI are.",
    )
    parser.add_argument(
        "--model", default=None, help="Registry model (default: default_model in data/models.yaml)."
    )
    parser.add_argument(
        "--profile", default="smoke", help="Profile from data/profiles.yaml (default: smoke)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / "dagster_home"))

    from dagster import DagsterInstance

    from emotion_assets.definitions import defs
    from emotion_assets.partitions import PROFILES, REGISTRY
    from jobs.jobs import study_plan
    from resources.storage import default_results_root
    from resources.tracking import default_tracking_uri

    model = args.model or REGISTRY.default_model
    if model not in REGISTRY.models:
        print(f"error: unknown model {model!r}; registered: {', '.join(REGISTRY.names)}", file=sys.stderr)
        return 2
    if args.profile not in PROFILES:
        print(f"error: unknown profile {args.profile!r}; defined: {', '.join(PROFILES)}", file=sys.stderr)
        return 2

    instance = DagsterInstance.get()
    for job_name, partition in study_plan(model, args.profile):
        start = time.perf_counter()
        result = defs.resolve_job_def(job_name).execute_in_process(
            partition_key=partition, instance=instance, raise_on_error=False
        )
        status = "ok" if result.success else "FAILED"
        print(f"[{status}] {job_name} {partition} ({time.perf_counter() - start:.1f} s, run {result.run_id})")
        if not result.success:
            for event in result.all_events:
                if event.is_failure and event.event_specific_data is not None:
                    error = getattr(event.event_specific_data, "error", None)
                    if error is not None:
                        print(error.message.strip(), file=sys.stderr)
            return 1

    print(f"Results:      {default_results_root()}/{args.profile}/")
    print(f"Report:       {default_results_root()}/{args.profile}/findings_report/findings.html")
    print(f"MLflow store: {default_tracking_uri()}  (browse: .venv/bin/mlflow ui --backend-store-uri ...)")
    print(f"Dagster home: {os.environ['DAGSTER_HOME']}")
    print(f"UI:           DAGSTER_HOME={os.environ['DAGSTER_HOME']} .venv/bin/dagster dev -w workspace.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
