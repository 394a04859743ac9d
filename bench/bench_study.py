"""Run the whole study once in a throw-away instance and print the seconds each asset took.

The same plan as ``python -m jobs.study --profile P --model M`` (run as that command, in a subprocess),
with DAGSTER_HOME, the results folder and the MLflow store (tracking URI and artifacts) inside a temporary
folder that is deleted afterwards (``--keep`` keeps it). The model cache stays ``$EMOTION_MODEL_CACHE``.

Printed: per asset the Dagster step time summed over its partitions, the seconds its materializations
recorded in their metadata, its share; the total; the study's wall time. The one-off conversion of each embedded GGUF model of the plan is
measured separately: a cold ``ModelResource(cache_dir=<empty temp>).get(name)`` minus a warm reload from
that folder. Whether the study itself paid it is printed beside it (it did not when the model cache was
already warm). ``--conversion skip`` leaves the measurement out.

Run: ``python bench/bench_study.py`` (smoke), ``python bench/bench_study.py --profile baseline``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gguf_models(models: list[str]) -> list[str]:
    """The models of ``models`` converted from an embedded GGUF file."""
    from emotion_assets.partitions import REGISTRY
    from emotion_assets.registry import EmbeddedGgufSource

    return [m for m in models if isinstance(REGISTRY.get(m).source, EmbeddedGgufSource)]


def conversion_line(warm_before: dict[str, bool], measure: bool) -> str:
    """Cold conversion time of each embedded GGUF model, and whether the study paid it (cache cold)."""
    from resources.models import ModelResource, clear_model_cache

    if not warm_before:
        return "none (no embedded GGUF model in the plan)"
    parts = []
    for name, warm in warm_before.items():
        paid = (
            "0 s of it in the study (model cache warm)" if warm else "paid inside the study (cache was cold)"
        )
        if not measure:
            parts.append(f"{name}: not measured; {paid}")
            continue
        with tempfile.TemporaryDirectory(prefix="bench-convert-") as cache:
            resource = ModelResource(device="cpu", cache_dir=cache)
            clear_model_cache()
            start = time.perf_counter()
            resource.get(name)
            cold = time.perf_counter() - start
            clear_model_cache()
            start = time.perf_counter()
            resource.get(name)
            warm = time.perf_counter() - start
            clear_model_cache()
        parts.append(
            f"{name}: {cold - warm:.1f} s cold (load {cold:.1f} s cold vs {warm:.1f} s warm); {paid}"
        )
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", help="profile of data/profiles.yaml (default smoke)")
    parser.add_argument(
        "--models", default=None, help="registry model the study runs for (default: default_model)"
    )
    parser.add_argument("--conversion", choices=["measure", "skip"], default="measure")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args()

    from dagster import DagsterInstance

    from emotion_assets.partitions import REGISTRY
    from emotion_assets.timing import run_records
    from jobs.jobs import study_plan
    from jobs.study import target_problem
    from jobs.study_timings import asset_table, format_timings, step_rows
    from resources.models import default_cache_dir

    model = args.models or REGISTRY.default_model
    problem = target_problem(model, args.profile)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    plan_models = list(
        dict.fromkeys(
            side
            for _, partition in study_plan(model, args.profile)
            if "|" in partition
            for side in partition.split("|")[0].split("__")
        )
    )
    study_cache = Path(default_cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-study-{args.profile}-"))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp / "dagster_home"),
        "EMOTION_RESULTS_DIR": str(tmp / "results"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlruns.db'}",
        "EMOTION_MLFLOW_ARTIFACTS": str(tmp / "mlartifacts"),
        "EMOTION_MODEL_CACHE": str(study_cache),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    (tmp / "dagster_home").mkdir()
    shutil.copy(
        ROOT / "dagster_home" / "dagster.yaml", tmp / "dagster_home"
    )  # the project's instance settings
    warm_before = {m: (study_cache / m / "source.json").exists() for m in gguf_models(plan_models)}
    print(
        f"Running the {args.profile} study for {model} in {tmp} (models: {', '.join(plan_models)})",
        flush=True,
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.study", "--profile", args.profile, "--model", model], cwd=ROOT, env=env
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"error: the study failed (exit {done.returncode}); its files are in {tmp}", file=sys.stderr)
        return 1
    conversion = conversion_line(warm_before, measure=args.conversion == "measure")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    with DagsterInstance.get() as instance:
        steps = step_rows(instance)
        recorded = run_records(instance)
    table = asset_table(steps, recorded)
    title = f"Study {model} × {args.profile} on {os.cpu_count()} CPU cores"
    print(format_timings(table, wall_s=wall, conversion=conversion, title=title))
    if args.keep:
        print(f"Kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
