"""Run the study for one model and profile: every job of the plan, in order, on the local instance.

python -m jobs.study                       # default model on the smoke profile
python -m jobs.study --model minilm-l6 --profile baseline
python -m jobs.study --profile baseline --dry-run   # the plan, work units and estimated time; runs nothing
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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the jobs and partitions in order, each asset's work units and its estimated time from "
        "the Dagster instance's earlier materializations (those of the same model on another profile, scaled "
        "by the ratio of the work, where this partition has none), and exit without running anything.",
    )
    return parser


def target_problem(model: str, profile: str) -> str | None:
    """Why ``model`` on ``profile`` cannot be studied (a name the registry or profile file lacks), or None."""
    from emotion_assets.partitions import PROFILES, REGISTRY

    if model not in REGISTRY.models:
        return f"unknown model {model!r}; registered: {', '.join(REGISTRY.names)}"
    if profile not in PROFILES:
        return f"unknown profile {profile!r}; defined: {', '.join(PROFILES)}"
    return None


def plan_study(model: str, profile: str, instance) -> list:
    """Every asset the study materializes for ``model`` × ``profile``, in run order, with work and the
    estimate from ``instance``'s earlier materializations (a ``DagsterInstance``)."""
    from emotion_assets.definitions import defs
    from emotion_assets.partitions import PROFILES, REGISTRY
    from jobs.jobs import ALL_JOBS, study_plan
    from jobs.plan import PlannedAsset, estimates, prompt_frame, work_scale, work_units

    graph = defs.resolve_asset_graph()
    order = graph.toposorted_asset_keys
    selections = {job.name: job.selection.resolve(graph) for job in ALL_JOBS}
    frame = prompt_frame(PROFILES[profile])
    runs = [
        (job, partition, key.to_user_string())
        for job, partition in study_plan(model, profile)
        for key in order
        if key in selections[job]
    ]
    frames = {profile: frame}

    def scale(asset: str, name: str) -> tuple[float, str] | None:
        """The asset's work for the planned model on profile ``name`` (records of other profiles scale by it)."""
        if name not in frames:
            try:
                frames[name] = prompt_frame(PROFILES[name])
            except (OSError, ValueError):  # another profile's dataset is not on this machine: no scaling
                return None
        return work_scale(asset, PROFILES[name], REGISTRY.get(model), frames[name])

    past = estimates(instance, [(asset, partition) for _, partition, asset in runs], scale)
    planned = []
    for job, partition, asset in runs:
        subject = partition.split("|")[0] if "|" in partition else model
        spec = REGISTRY.get(subject) if subject in REGISTRY.models else REGISTRY.get(model)
        work = work_units(asset, PROFILES[profile], spec, frame)
        estimate = past.get((asset, partition))
        planned.append(
            PlannedAsset(
                job, partition, asset, work, estimate and estimate.seconds, estimate and estimate.source
            )
        )
    return planned


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / "dagster_home"))

    from dagster import DagsterInstance

    from emotion_assets.definitions import defs
    from emotion_assets.partitions import REGISTRY
    from jobs.jobs import study_plan
    from resources.storage import default_results_root
    from resources.tracking import default_tracking_uri

    model = args.model or REGISTRY.default_model
    problem = target_problem(model, args.profile)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    if args.dry_run:
        from jobs.plan import format_plan

        with DagsterInstance.get() as instance:
            print(format_plan(plan_study(model, args.profile, instance), model, args.profile))
        return 0

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
