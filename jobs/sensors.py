"""Config-change sensor: a new or changed model, profile or dataset file triggers runs of what it affects.

The cursor keeps the sha256 of the registry file (``$EMOTION_MODEL_REGISTRY`` or ``data/models.yaml``),
the profile file (``$EMOTION_PROFILES`` or ``data/profiles.yaml``) and every profile's dataset file, plus
one hash per registry entry, per profile and per dataset, so a change is traced to what it touches:

- a new or changed model: its partitions of every job with a ``model`` dimension, for every profile
  (and, through ``pairs``, the ``model_pair`` partitions it takes part in);
- a new or changed profile, or a changed dataset file: ``dataset_job`` and every other job for that
  profile.

Partition definitions are static: they are built from the registry and the profile file when the code
location loads. A model or profile added to the files after that has no partitions until the code
location is reloaded (UI: Deployment → Reload, or restart ``dagster dev``); the sensor logs such
partitions as skipped with the reason "reload the code location", and picks them up as new on the first
tick after the reload. Models whose weights are not on this machine are skipped with the reason.

Affected partitions wait in the cursor (``pending``) until the partitions they read are ready: a changed
dataset first reruns ``dataset_job``, and the model jobs of that profile are requested once that run has
written a fresh dataset; missing prerequisites (e.g. the dataset for a new model's profile) are requested
too. Every run carries the tags of ``jobs.schedules`` (config hash, request key, accelerator).
"""

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import dagster as dg

from emotion_assets.profiles import Profile, load_profiles, profiles_path
from emotion_assets.registry import ModelRegistry, load_registry, pair_key, registry_path, split_pair_key
from jobs.jobs import ALL_JOBS
from jobs.schedules import (
    FINISHED_STATUSES,
    FRESH,
    MISSING,
    PROFILE_DIMENSION,
    JobPartition,
    Planner,
    json_sha256,
    path_sha256,
    repository_of,
)

CURSOR_VERSION = 1
RELOAD = "reload the code location"
SENSOR_NAME = "config_change_sensor"


@dataclass
class Snapshot:
    """Hashes of the configuration files and of each entry in them."""

    files: dict[str, str]
    models: dict[str, str]
    pairs: list[str]
    profiles: dict[str, str]
    datasets: dict[str, str]


@dataclass
class SensorState:
    """What the cursor holds between ticks."""

    snapshot: Snapshot
    generation: int = 0
    pending: dict[str, str] = field(default_factory=dict)  # "job:partition" -> why
    launched: dict[str, str] = field(default_factory=dict)  # "job:partition" -> request key
    finished: dict[str, str] = field(default_factory=dict)  # "job:partition" -> run status this generation

    def to_cursor(self) -> str:
        return json.dumps({"version": CURSOR_VERSION, **asdict(self)}, sort_keys=True)

    @staticmethod
    def from_cursor(cursor: str | None) -> "SensorState | None":
        if not cursor:
            return None
        try:
            raw = json.loads(cursor)
            if raw.get("version") != CURSOR_VERSION:
                return None
            return SensorState(
                snapshot=Snapshot(**raw["snapshot"]),
                generation=int(raw.get("generation", 0)),
                pending=dict(raw.get("pending", {})),
                launched=dict(raw.get("launched", {})),
                finished=dict(raw.get("finished", {})),
            )
        except (ValueError, KeyError, TypeError):
            return None


def take_snapshot(registry: ModelRegistry, profiles: Mapping[str, Profile]) -> Snapshot:
    datasets = {name: path_sha256(p.dataset.resolved_path()) for name, p in profiles.items()}
    files = {
        str(registry_path()): path_sha256(registry_path()),
        str(profiles_path()): path_sha256(profiles_path()),
    }
    for profile in profiles.values():
        path = profile.dataset.resolved_path()
        files[str(path)] = datasets[profile.name]
    return Snapshot(
        files=files,
        models={name: json_sha256(spec.model_dump(mode="json")) for name, spec in registry.models.items()},
        pairs=sorted(registry.pair_keys),
        profiles={name: json_sha256(p.model_dump(mode="json")) for name, p in profiles.items()},
        datasets=datasets,
    )


def _diff(old: Mapping[str, str], new: Mapping[str, str]) -> tuple[list[str], list[str], list[str]]:
    added = sorted(set(new) - set(old))
    changed = sorted(k for k in set(new) & set(old) if new[k] != old[k])
    removed = sorted(set(old) - set(new))
    return added, changed, removed


class ChangeTracker:
    """Turns the difference between two snapshots into affected job partitions."""

    def __init__(self, planner: Planner, registry: ModelRegistry) -> None:
        self.planner = planner
        self.registry = registry
        self.loaded_models: set[str] = set()
        self.loaded_pairs: set[str] = set()
        self.loaded_profiles: set[str] = set()
        for job in planner.jobs:
            for partition in planner.partitions(job):
                dims = planner.dimensions(job, partition)
                self.loaded_profiles.add(dims.get(PROFILE_DIMENSION, ""))
                if "model" in dims:
                    self.loaded_models.add(dims["model"])
                if "model_pair" in dims:
                    self.loaded_pairs.add(dims["model_pair"])
        self.affected: dict[str, str] = {}
        self.skipped: list[str] = []

    def _add(self, job: str, dims: Mapping[str, str], why: str, existing_only: bool) -> None:
        partition = self.planner.partition_key(job, dims)
        if partition is not None:
            self._add_key(job, str(partition), why, existing_only)

    def _add_key(self, job: str, partition: str, why: str, existing_only: bool) -> None:
        """Mark ``job[partition]``; with ``existing_only``, only if it was materialized before."""
        if existing_only and self.planner.status(job, partition).verdict == MISSING:
            return
        self.affected.setdefault(JobPartition(job, partition).id, why)

    def model_changed(self, model: str, profiles: list[str], why: str, existing_only: bool = False) -> None:
        """A new model: its partitions for every profile; a changed entry: its existing partitions."""
        if model not in self.loaded_models:
            self.skipped.append(f"model {model} ({why}): has no partitions yet, {RELOAD}")
            return
        pairs = [pair_key(a, b) for a, b in self.registry.pairs if model in (a, b)]
        for job, info in self.planner.jobs.items():
            for profile in profiles:
                if "model" in info.dimensions:
                    self._add(job, {"model": model, PROFILE_DIMENSION: profile}, why, existing_only)
                if "model_pair" in info.dimensions:
                    for pair in pairs:
                        dims = {"model_pair": pair, PROFILE_DIMENSION: profile}
                        self._add(job, dims, why, existing_only)

    def pair_added(self, pair: str, profiles: list[str]) -> None:
        if pair not in self.loaded_pairs:
            self.skipped.append(f"model pair {pair} (new): has no partitions yet, {RELOAD}")
            return
        for job, info in self.planner.jobs.items():
            if "model_pair" in info.dimensions:
                for profile in profiles:
                    dims = {"model_pair": pair, PROFILE_DIMENSION: profile}
                    self._add(job, dims, f"new pair {pair}", existing_only=False)

    def profile_changed(self, profile: str, why: str, existing_only: bool = True) -> None:
        """Every partition of the profile that was materialized before (all of them for a new profile)."""
        if profile not in self.loaded_profiles:
            self.skipped.append(f"profile {profile} ({why}): has no partitions yet, {RELOAD}")
            return
        for job in self.planner.jobs:
            for partition in self.planner.partitions(job, [profile]):
                self._add_key(job, partition, why, existing_only)


def _split_id(jp_id: str) -> JobPartition:
    job, partition = jp_id.split(":", 1)
    return JobPartition(job, partition)


def evaluate_config_changes(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """One tick of the config-change sensor (see the module docstring)."""
    try:
        registry = load_registry()
        profiles = load_profiles()
    except ValueError as exc:
        return dg.SkipReason(f"Configuration unreadable; waiting for a valid file: {exc}")
    snapshot = take_snapshot(registry, profiles)
    state = SensorState.from_cursor(context.cursor)
    if state is None:
        state = SensorState(snapshot=snapshot)
        return dg.SensorResult(
            skip_reason=dg.SkipReason(
                f"Recorded hashes of {len(snapshot.files)} file(s) ({len(snapshot.models)} models, "
                f"{len(snapshot.profiles)} profiles); later changes trigger runs."
            ),
            cursor=state.to_cursor(),
        )

    planner = Planner(context.instance, repository_of(context), registry, profiles)
    tracker = ChangeTracker(planner, registry)
    old = state.snapshot
    if snapshot != old:
        profile_names = list(profiles)
        added, changed, removed = _diff(old.models, snapshot.models)
        for model in added:
            tracker.model_changed(model, profile_names, f"new model {model}")
        for model in changed:
            tracker.model_changed(
                model, profile_names, f"registry entry of {model} changed", existing_only=True
            )
        for model in removed:
            context.log.info(f"model {model} left the registry; its results are kept, nothing is run")
        for pair in sorted(set(snapshot.pairs) - set(old.pairs)):
            if not set(split_pair_key(pair)) & set(added):  # else handled with the new model
                tracker.pair_added(pair, profile_names)
        p_added, p_changed, p_removed = _diff(old.profiles, snapshot.profiles)
        for profile in p_added:
            tracker.profile_changed(profile, f"new profile {profile}", existing_only=False)
        for profile in p_changed:
            tracker.profile_changed(profile, f"profile {profile} changed")
        for profile in p_removed:
            context.log.info(f"profile {profile} left the profile file; nothing is run")
        _, d_changed, _ = _diff(old.datasets, snapshot.datasets)
        for profile in d_changed:
            if profile not in p_changed:
                tracker.profile_changed(profile, f"dataset file of {profile} changed")
        state.snapshot = snapshot
        if tracker.affected or tracker.skipped:
            state.generation += 1
            state.finished = {}
        for line in tracker.skipped:
            context.log.warning(f"skipped {line}")
        for jp_id, why in tracker.affected.items():
            state.pending.setdefault(jp_id, why)
            state.launched.pop(jp_id, None)

    requests = _advance(context, planner, state)
    if requests:
        return dg.SensorResult(run_requests=requests, cursor=state.to_cursor())
    waiting = f"; {len(state.pending)} partition(s) waiting for upstream runs" if state.pending else ""
    skipped = f"; skipped: {' | '.join(tracker.skipped)}" if tracker.skipped else ""
    return dg.SensorResult(
        skip_reason=dg.SkipReason(f"No run needed now{waiting}{skipped}."), cursor=state.to_cursor()
    )


def _advance(
    context: dg.SensorEvaluationContext, planner: Planner, state: SensorState
) -> list[dg.RunRequest]:
    """Settle launched runs, add missing prerequisites, request every pending partition that is ready."""
    log = context.log
    for jp_id, key in list(state.launched.items()):
        run = planner.run_with_request_key(key)
        if run is not None and run.status in FINISHED_STATUSES:
            state.launched.pop(jp_id)
            state.finished[jp_id] = run.status.value
            if run.status != dg.DagsterRunStatus.SUCCESS:
                log.warning(
                    f"{jp_id}: run {run.run_id[:8]} ended {run.status.value}; not retried by the sensor"
                )

    def runnable(jp: JobPartition) -> str:
        """Why ``jp`` cannot be requested at all ("" if it can)."""
        if jp.job not in planner.jobs or jp.partition not in planner.jobs[jp.job].keys_by_str:
            return f"not in the loaded definitions, {RELOAD}"
        missing = planner.unavailable(jp.job, jp.partition)
        if missing:
            return "; ".join(f"{m}: {a.reason}" for m, a in missing.items())
        return ""

    # Prerequisites: upstream partitions that are missing or stale and not handled yet.
    frontier = list(state.pending)
    while frontier:
        jp = _split_id(frontier.pop())
        if runnable(jp):
            continue
        upstream, _ = planner.upstream(jp.job, jp.partition)
        for up in upstream:
            if up.id in state.pending or up.id in state.launched or up.id in state.finished:
                continue
            if (
                planner.in_progress(up.job, up.partition)
                or not planner.status(up.job, up.partition).needs_run
            ):
                continue
            if runnable(up):
                continue
            state.pending[up.id] = f"prerequisite of {jp.label}"
            frontier.append(up.id)

    order = {job: i for i, job in enumerate(planner.job_order())}
    requests: list[dg.RunRequest] = []
    for jp_id in sorted(state.pending, key=lambda i: (order.get(_split_id(i).job, len(order)), i)):
        jp = _split_id(jp_id)
        why = state.pending[jp_id]
        problem = runnable(jp)
        if problem:
            log.warning(f"skipped {jp.label} ({why}): {problem}")
            state.pending.pop(jp_id)
            continue
        if planner.in_progress(jp.job, jp.partition):
            log.info(f"{jp.label}: a run is in progress; requested once it ends")
            continue
        waits, dropped = [], ""
        upstream, orphans = planner.upstream(jp.job, jp.partition)
        waits.extend(orphans)
        for up in upstream:
            if runnable(up):
                continue  # cannot be built here, so nothing to wait for
            if up.id in state.pending:
                waits.append(f"{up.label} is pending")
            elif up.id in state.launched:
                if planner.status(up.job, up.partition).verdict != FRESH:
                    waits.append(f"{up.label} is running")
            elif planner.in_progress(up.job, up.partition):
                waits.append(f"{up.label} is running")
            elif planner.status(up.job, up.partition).needs_run:
                if up.id in state.finished:
                    dropped = f"{up.label} ended {state.finished[up.id]} without a fresh result"
                else:
                    waits.append(f"{up.label} is {planner.status(up.job, up.partition).verdict}")
        if dropped:
            log.warning(f"dropped {jp.label} ({why}): {dropped}; the backfill schedule retries it")
            state.pending.pop(jp_id)
            continue
        if waits:
            log.info(f"{jp.label} ({why}) waits: {'; '.join(waits)}")
            continue
        status = planner.status(jp.job, jp.partition)
        state.pending.pop(jp_id)
        if status.verdict == FRESH:
            log.info(f"{jp.label} ({why}): already up to date")
            continue
        run_key = f"sensor:{state.generation}:{jp.id}"
        if planner.run_with_request_key(run_key) is not None:
            continue
        log.info(f"request {jp.label}: {why}; {status.describe()}")
        requests.append(planner.run_request(jp, run_key, f"sensor:{SENSOR_NAME}"))
        state.launched[jp.id] = run_key
    return requests


def build_config_change_sensor(
    jobs: list[Any] | None = None, minimum_interval_seconds: int | None = None
) -> dg.SensorDefinition:
    """The sensor over ``jobs`` (default ``ALL_JOBS``); interval ``$EMOTION_SENSOR_INTERVAL`` or 60 s."""
    interval = minimum_interval_seconds or int(os.environ.get("EMOTION_SENSOR_INTERVAL", "60"))

    def config_change_sensor(context: dg.SensorEvaluationContext):
        return evaluate_config_changes(context)

    return dg.sensor(
        name=SENSOR_NAME,
        jobs=list(jobs or ALL_JOBS),
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Runs what a new or changed model (data/models.yaml), profile (data/profiles.yaml) or "
        "dataset file affects, upstream first. A model or profile new since the code location loaded "
        f"needs a reload ({RELOAD}) before it has partitions.",
    )(config_change_sensor)


config_change_sensor = build_config_change_sensor()

__all__ = ["SensorState", "Snapshot", "build_config_change_sensor", "config_change_sensor", "take_snapshot"]
