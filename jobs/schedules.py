"""Backfill schedules: request runs only for partitions that are missing or stale, for models available here.

One schedule per partitioned job of ``jobs.jobs.ALL_JOBS`` (``<job>_backfill``), so a job added there gets
its schedule without touching this file. Each tick walks the job's partitions for the selected profiles
and asks the instance, partition by partition, whether the last materialization is still valid:

- **missing**: some asset of the job has no materialization for the partition;
- **stale**: an asset's recorded code version differs from its current ``code_version``; an upstream
  asset outside the job (e.g. ``emotion_dataset``) has a newer materialization with a different data
  version than the one the partition was built from; or the run that built it carries a config hash
  (tag ``emotion/config_hash``: the profile entry, the profile's dataset file and the registry entries
  of the partition's models) that differs from the current one;
- **fresh** otherwise. A partition built by a run without the config-hash tag (UI, command line) is
  *unverified*: trusted by the schedule, rebuilt by the config-change sensor when its inputs change.

A partition whose upstream partitions (built by another job of ``ALL_JOBS``) are themselves missing,
stale or running waits for a later tick, so a tick never starts a run on top of data about to change; the
default cron therefore ticks every 20 minutes of a nightly window and the chain advances one job per tick.
Models whose weights are not on this machine are never requested; the tick names them and why.

Environment (read when the code location loads): ``EMOTION_BACKFILL_CRON`` (default ``*/20 0-5 * * *``),
``EMOTION_BACKFILL_TIMEZONE`` (default ``UTC``), ``EMOTION_BACKFILL_PROFILES`` (comma-separated; default
every profile of ``data/profiles.yaml``). Schedules start stopped; turn them on in the UI or with
``dagster schedule start``.
"""

import datetime as dt
import graphlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from emotion_assets.partitions import PROFILES
from emotion_assets.profiles import Profile, load_profiles
from emotion_assets.registry import (
    EmbeddedGgufChunksSource,
    EmbeddedGgufSource,
    EmbeddedPackageSource,
    HuggingFaceSource,
    LocalSource,
    ModelRegistry,
    RegistryError,
    TwinSource,
    load_registry,
    split_pair_key,
)
from jobs.jobs import ALL_JOBS

# Run tags written on every run a schedule or the sensor requests.
CONFIG_HASH_TAG = "emotion/config_hash"
REQUEST_KEY_TAG = "emotion/request_key"
REQUESTED_BY_TAG = "emotion/requested_by"
# Runs that load a model carry this tag; `concurrency.runs.tag_concurrency_limits` in dagster.yaml can cap
# them (one model run at a time per accelerator). See docs/operations.md.
ACCELERATOR_TAG = "emotion/accelerator"
ACCELERATOR_VALUE = "model"

# Tags Dagster writes on runs and materializations.
PARTITION_TAG = "dagster/partition"
CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_TAG = "dagster/data_version"
INPUT_EVENT_POINTER_PREFIX = "dagster/input_event_pointer/"

MODEL_DIMENSIONS = ("model", "model_pair")
PROFILE_DIMENSION = "profile"

DEFAULT_CRON = "*/20 0-5 * * *"
IN_PROGRESS_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED_STATUSES = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)

MISSING = "missing"
STALE = "stale"
FRESH = "fresh"
UNVERIFIED = "unverified"


# --------------------------------------------------------------------------------------------------
# Which models can run here (no weights are loaded)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # short: what is missing
    hint: str = ""  # how to provide it


def _package_dir(package: str) -> Path | None:
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_HINT = (
    "nothing is downloaded at run time: run `huggingface-cli download <id>` on a connected machine and copy "
    "the Hugging Face cache here, or set `path:` in data/models.yaml to a local model folder"
)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").exists() and (
        any((folder / name).exists() for name in WEIGHT_FILES) or any(folder.glob("*.safetensors"))
    )


def _chunks_present(package: str) -> bool:
    """Whether a chunked GGUF package and every chunk it lists are installed (the chunks are not read)."""
    if _package_dir(package) is None:
        return False
    try:
        paths = importlib.import_module(package).chunk_paths()
    except (ImportError, AttributeError, FileNotFoundError):
        return False
    return all(Path(p).exists() for p in paths)


def _in_hf_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return False
    return any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in WEIGHT_FILES
    )


def model_availability(
    name: str, registry: ModelRegistry, _seen: frozenset[str] = frozenset()
) -> Availability:
    """Whether ``name``'s weights are on this machine, checked from files only (cheap, nothing loaded).

    Mirrors what ``resources.models`` needs at run time (where a missing model raises
    ``ModelUnavailableError``); ``hint`` says how to provide a missing model.
    """
    spec = registry.models.get(name)
    if spec is None:
        return Availability(False, "not in the model registry", "add it to data/models.yaml")
    src = spec.source
    if isinstance(src, EmbeddedGgufSource):
        root = _package_dir(src.package)
        if root is None or not (root / src.file).exists():
            return Availability(
                False, f"embedded file {src.package}/{src.file} is missing", f"`{src.install}`"
            )
        return Availability(True)
    if isinstance(src, EmbeddedGgufChunksSource):
        if not _chunks_present(src.package):
            return Availability(
                False, f"GGUF chunks of {src.package} are missing or incomplete", f"`{src.install}`"
            )
        return Availability(True)
    if isinstance(src, EmbeddedPackageSource):
        root = _package_dir(src.package)
        folder = (root / src.subdir if src.subdir else root) if root else None
        if folder is None or not _has_weights(folder):
            return Availability(False, f"package {src.package} is missing or incomplete", f"`{src.install}`")
        return Availability(True)
    if isinstance(src, TwinSource):
        if src.of in _seen:
            return Availability(False, f"{src.type} cycle through {src.of}", "fix data/models.yaml")
        base = model_availability(src.of, registry, _seen | {name})
        if base.available:
            return base
        return Availability(False, f"{src.type} of {src.of}, which is unavailable ({base.reason})", base.hint)
    if isinstance(src, HuggingFaceSource):
        if src.path:
            if _has_weights(Path(src.path).expanduser()):
                return Availability(True)
            return Availability(False, f"{src.path} has no config.json and weights", "fix `path:`")
        if _in_hf_cache(src.id, src.revision):
            return Availability(True)
        return Availability(False, f"{src.id} is not in the local Hugging Face cache", HF_HINT)
    if isinstance(src, LocalSource):
        if _has_weights(src.resolved_path()):
            return Availability(True)
        return Availability(False, f"{src.resolved_path()} has no config.json and weights", "fix `path:`")
    return Availability(False, f"unsupported source {type(src).__name__}", "fix data/models.yaml")


def describe_unavailable(unavailable: Mapping[str, Availability]) -> str:
    """``gpt2 (gpt2 is not in the local Hugging Face cache), ...`` plus each distinct hint once."""
    if not unavailable:
        return ""
    models = ", ".join(f"{name} ({found.reason})" for name, found in sorted(unavailable.items()))
    hints = sorted({found.hint for found in unavailable.values() if found.hint})
    return models + (". To provide them: " + "; ".join(hints) if hints else "")


# --------------------------------------------------------------------------------------------------
# Hashes of the configuration a partition is built from
# --------------------------------------------------------------------------------------------------


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of every file under a folder (names and bytes, sorted); "" if absent."""
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                digest.update(str(child.relative_to(path)).encode())
                digest.update(child.read_bytes())
    elif path.is_file():
        digest.update(path.read_bytes())
    else:
        return ""
    return digest.hexdigest()


def json_sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def short(value: str, n: int = 12) -> str:
    return value[:n]


# --------------------------------------------------------------------------------------------------
# Partition status against the instance
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPartition:
    job: str
    partition: str

    @property
    def label(self) -> str:
        return f"{self.job}[{self.partition}]"

    @property
    def id(self) -> str:
        return f"{self.job}:{self.partition}"


@dataclass
class PartitionStatus:
    verdict: str  # missing | stale | fresh | unverified
    reasons: list[str] = field(default_factory=list)

    @property
    def needs_run(self) -> bool:
        return self.verdict in (MISSING, STALE)

    def describe(self) -> str:
        return self.verdict + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


@dataclass
class JobInfo:
    name: str
    partitions_def: dg.PartitionsDefinition
    asset_keys: frozenset[dg.AssetKey]
    dimensions: tuple[str, ...]
    keys_by_str: dict[str, str]

    @property
    def uses_model(self) -> bool:
        return any(d in MODEL_DIMENSIONS for d in self.dimensions)


def _dimension_names(
    partitions_def: dg.PartitionsDefinition, profiles: Iterable[str]
) -> tuple[str, ...] | None:
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        return tuple(partitions_def.partition_dimension_names)
    if isinstance(partitions_def, dg.StaticPartitionsDefinition) and set(
        partitions_def.get_partition_keys()
    ) <= set(profiles):
        return (PROFILE_DIMENSION,)
    return None


def repository_of(context: Any) -> dg.RepositoryDefinition:
    repo = getattr(context, "repository_def", None)
    if repo is None:  # test contexts built without definitions
        from emotion_assets.definitions import defs

        repo = defs.get_repository_def()
    return repo


class Planner:
    """Answers, for one evaluation, what each job partition needs; every instance query is cached."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        repository: dg.RepositoryDefinition,
        registry: ModelRegistry,
        profiles: Mapping[str, Profile],
        jobs: Sequence[Any] = ALL_JOBS,
    ) -> None:
        self.instance = instance
        self.repository = repository
        self.asset_graph = repository.asset_graph
        self.registry = registry
        self.profiles = dict(profiles)
        self.jobs: dict[str, JobInfo] = {}
        self.ignored_jobs: dict[str, str] = {}
        for job in jobs:
            self._add_job(job)
        self._producer = {key: info.name for info in self.jobs.values() for key in info.asset_keys}
        self._status: dict[JobPartition, PartitionStatus] = {}
        self._latest: dict[tuple[dg.AssetKey, tuple[str, ...] | None], Any] = {}
        self._run_tags: dict[str, Mapping[str, str]] = {}
        self._availability: dict[str, Availability] = {}
        self._dataset_sha: dict[str, str] = {}
        self._in_progress = self._load_in_progress()

    # ---- jobs and partitions -------------------------------------------------------------------

    def _add_job(self, job: Any) -> None:
        name = job.name
        try:
            resolved = self.repository.get_job(name)
        except Exception as exc:  # not in these definitions
            self.ignored_jobs[name] = f"not in the loaded definitions ({exc})"
            return
        partitions_def = resolved.partitions_def
        if partitions_def is None:
            self.ignored_jobs[name] = "not partitioned"
            return
        dims = _dimension_names(partitions_def, set(self.profiles) | set(PROFILES))
        if dims is None or PROFILE_DIMENSION not in dims:
            self.ignored_jobs[name] = "has no `profile` partition dimension"
            return
        keys = resolved.asset_layer.selected_asset_keys
        self.jobs[name] = JobInfo(
            name=name,
            partitions_def=partitions_def,
            asset_keys=frozenset(keys),
            dimensions=dims,
            keys_by_str={str(k): k for k in partitions_def.get_partition_keys()},
        )

    def job_order(self) -> list[str]:
        """Jobs with every job that builds their upstream assets first."""
        graph: dict[str, set[str]] = {}
        for info in self.jobs.values():
            deps = set()
            for key in info.asset_keys:
                for parent in self.asset_graph.get(key).parent_keys - info.asset_keys:
                    producer = self._producer.get(parent)
                    if producer and producer != info.name:
                        deps.add(producer)
            graph[info.name] = deps
        try:
            return list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError:
            return list(self.jobs)

    def dimensions(self, job: str, partition: str) -> dict[str, str]:
        info = self.jobs[job]
        key = info.keys_by_str.get(partition, partition)
        if isinstance(key, dg.MultiPartitionKey):
            return dict(key.keys_by_dimension)
        if len(info.dimensions) > 1:
            values = partition.split("|")
            return dict(zip(sorted(info.dimensions), values, strict=False))
        return {info.dimensions[0]: partition}

    def partition_key(self, job: str, dims: Mapping[str, str]) -> str | None:
        """The job's partition key for these dimension values, if it exists in the loaded definitions."""
        info = self.jobs[job]
        if set(dims) != set(info.dimensions):
            return None
        text = "|".join(dims[d] for d in sorted(info.dimensions))
        return info.keys_by_str.get(text)

    def partitions(self, job: str, profiles: Iterable[str] | None = None) -> list[str]:
        wanted = set(profiles) if profiles is not None else None
        out = []
        for text in self.jobs[job].keys_by_str:
            if wanted is None or self.dimensions(job, text).get(PROFILE_DIMENSION) in wanted:
                out.append(text)
        return out

    def models_of(self, job: str, partition: str) -> list[str]:
        dims = self.dimensions(job, partition)
        models = []
        if "model" in dims:
            models.append(dims["model"])
        if "model_pair" in dims:
            try:
                models.extend(split_pair_key(dims["model_pair"]))
            except RegistryError:
                models.append(dims["model_pair"])
        return models

    # ---- availability and configuration --------------------------------------------------------

    def model_available(self, model: str) -> Availability:
        if model not in self._availability:
            self._availability[model] = model_availability(model, self.registry)
        return self._availability[model]

    def unavailable(self, job: str, partition: str) -> dict[str, Availability]:
        """Models (or the profile) of the partition that cannot run here, with why; empty if it can run."""
        profile = self.dimensions(job, partition).get(PROFILE_DIMENSION)
        if profile not in self.profiles:
            return {
                f"profile {profile}": Availability(
                    False, "no longer in the profile file", "reload the code location"
                )
            }
        found = {model: self.model_available(model) for model in self.models_of(job, partition)}
        return {model: a for model, a in found.items() if not a.available}

    def dataset_sha(self, profile: str) -> str:
        if profile not in self._dataset_sha:
            self._dataset_sha[profile] = path_sha256(self.profiles[profile].dataset.resolved_path())
        return self._dataset_sha[profile]

    def config_hash(self, job: str, partition: str) -> str:
        """Hash of what the partition is built from: profile entry, its dataset file, its models' entries."""
        dims = self.dimensions(job, partition)
        profile = dims.get(PROFILE_DIMENSION, "")
        payload: dict[str, Any] = {
            "profile": self.profiles[profile].model_dump(mode="json") if profile in self.profiles else None,
            "dataset_sha256": self.dataset_sha(profile) if profile in self.profiles else "",
            "models": {
                m: (self.registry.models[m].model_dump(mode="json") if m in self.registry.models else None)
                for m in self.models_of(job, partition)
            },
            "dimensions": dims,
        }
        return json_sha256(payload)

    # ---- instance queries ----------------------------------------------------------------------

    def _load_in_progress(self) -> dict[tuple[str, str], str]:
        """(job name or asset key, partition) -> id of a queued or running run that covers it."""
        runs = self.instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS_STATUSES), limit=5000)
        found: dict[tuple[str, str], str] = {}
        for run in runs:
            partition = run.tags.get(PARTITION_TAG)
            if partition is None:
                continue
            found.setdefault((run.job_name, partition), run.run_id)
            for key in run.asset_selection or ():  # e.g. a materialization launched from the UI
                found.setdefault((key.to_user_string(), partition), run.run_id)
        return found

    def in_progress(self, job: str, partition: str) -> str | None:
        """Id of a queued or running run that materializes ``job``'s assets for ``partition``."""
        found = self._in_progress.get((job, partition))
        if found is None and job in self.jobs:
            for key in self.jobs[job].asset_keys:
                found = found or self._in_progress.get((key.to_user_string(), partition))
        return found

    def run_with_request_key(self, key: str) -> dg.DagsterRun | None:
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_KEY_TAG: key}), limit=1)
        return runs[0] if runs else None

    def latest(self, key: dg.AssetKey, partitions: Sequence[str] | None) -> Any:
        cache_key = (key, tuple(partitions) if partitions is not None else None)
        if cache_key not in self._latest:
            records = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=key, asset_partitions=list(partitions) if partitions else None
                ),
                limit=1,
            ).records
            self._latest[cache_key] = records[0] if records else None
        return self._latest[cache_key]

    def _tags_of_run(self, run_id: str) -> Mapping[str, str]:
        if run_id not in self._run_tags:
            run = self.instance.get_run_by_id(run_id) if run_id else None
            self._run_tags[run_id] = run.tags if run is not None else {}
        return self._run_tags[run_id]

    def parent_partitions(self, child: dg.AssetKey, parent: dg.AssetKey, partition: str) -> list[str] | None:
        """Partitions of ``parent`` that ``child``'s ``partition`` reads (None: parent not partitioned)."""
        if self.asset_graph.get(parent).partitions_def is None:
            return None
        result = self.asset_graph.get_parent_partition_keys_for_child(partition, parent, child)
        return sorted(str(k) for k in result.partitions_subset.get_partition_keys())

    def _upstream_change(self, child: dg.AssetKey, parent: dg.AssetKey, partition: str, tags: Mapping) -> str:
        pointer = tags.get(INPUT_EVENT_POINTER_PREFIX + parent.to_user_string())
        if pointer is None or not str(pointer).isdigit():
            return ""
        parent_partitions = self.parent_partitions(child, parent, partition)
        newest = self.latest(parent, parent_partitions)
        if newest is None or newest.storage_id <= int(pointer):
            return ""
        used = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=parent, storage_ids=[int(pointer)]), limit=1
        ).records
        used_version = used[0].asset_materialization.tags.get(DATA_VERSION_TAG) if used else None
        new_version = (newest.asset_materialization.tags or {}).get(DATA_VERSION_TAG)
        if used_version is not None and used_version == new_version:
            return ""
        where = f"{parent.to_user_string()}[{','.join(parent_partitions or [])}]"
        return f"upstream {where} data version {short(str(used_version))} -> {short(str(new_version))}"

    def status(self, job: str, partition: str) -> PartitionStatus:
        """Missing, stale, fresh or unverified: see the module docstring."""
        jp = JobPartition(job, partition)
        if jp in self._status:
            return self._status[jp]
        info = self.jobs[job]
        missing: list[str] = []
        reasons: list[str] = []
        recorded_hashes: list[str | None] = []
        for key in sorted(info.asset_keys, key=lambda k: k.to_user_string()):
            record = self.latest(key, [partition])
            if record is None:
                missing.append(key.to_user_string())
                continue
            tags = record.asset_materialization.tags or {}
            current = self.asset_graph.get(key).code_version
            recorded = tags.get(CODE_VERSION_TAG)
            if current is not None and recorded != current:
                reasons.append(f"{key.to_user_string()} code version {recorded} -> {current}")
            for parent in sorted(self.asset_graph.get(key).parent_keys - info.asset_keys):
                change = self._upstream_change(key, parent, partition, tags)
                if change:
                    reasons.append(change)
            recorded_hashes.append(self._tags_of_run(record.run_id).get(CONFIG_HASH_TAG))
        if missing:
            result = PartitionStatus(MISSING, [f"not materialized: {', '.join(missing)}"])
        else:
            current_hash = self.config_hash(job, partition)
            if any(h is not None and h != current_hash for h in recorded_hashes):
                reasons.append("configuration changed (profile, dataset file or registry entry)")
            if reasons:
                result = PartitionStatus(STALE, sorted(set(reasons)))
            elif any(h is None for h in recorded_hashes):
                result = PartitionStatus(UNVERIFIED, ["built by a run without a config-hash tag"])
            else:
                result = PartitionStatus(FRESH)
        self._status[jp] = result
        return result

    def upstream(self, job: str, partition: str) -> tuple[list[JobPartition], list[str]]:
        """Upstream job partitions this one reads, and upstream assets no job of ALL_JOBS builds (missing)."""
        info = self.jobs[job]
        found: dict[JobPartition, None] = {}
        orphans: list[str] = []
        for key in sorted(info.asset_keys, key=lambda k: k.to_user_string()):
            for parent in sorted(self.asset_graph.get(key).parent_keys - info.asset_keys):
                try:
                    parent_partitions = self.parent_partitions(key, parent, partition)
                except Exception:  # a mapping this planner cannot evaluate: do not block on it
                    continue
                producer = self._producer.get(parent)
                if producer is None:
                    if self.latest(parent, parent_partitions) is None:
                        orphans.append(f"{parent.to_user_string()} was never materialized")
                    continue
                for parent_partition in parent_partitions or []:
                    found[JobPartition(producer, parent_partition)] = None
        return list(found), orphans

    def blockers(self, job: str, partition: str) -> list[str]:
        """Why ``job[partition]`` should not start now: its upstream is missing, stale or running."""
        upstream, reasons = self.upstream(job, partition)
        for jp in upstream:
            if self.unavailable(jp.job, jp.partition):
                continue  # cannot be built here, so nothing to wait for
            run_id = self.in_progress(jp.job, jp.partition)
            if run_id:
                reasons.append(f"{jp.label} is running ({run_id[:8]})")
                continue
            state = self.status(jp.job, jp.partition)
            if state.needs_run:
                reasons.append(f"{jp.label} is {state.verdict}")
        return reasons

    def run_request(self, jp: JobPartition, run_key: str, requested_by: str) -> dg.RunRequest:
        """A run request for ``jp`` carrying the config-hash, request-key and accelerator tags."""
        tags = {
            CONFIG_HASH_TAG: self.config_hash(jp.job, jp.partition),
            REQUEST_KEY_TAG: run_key,
            REQUESTED_BY_TAG: requested_by,
        }
        if self.jobs[jp.job].uses_model:
            tags[ACCELERATOR_TAG] = ACCELERATOR_VALUE
        return dg.RunRequest(
            run_key=run_key,
            job_name=jp.job,
            partition_key=self.jobs[jp.job].keys_by_str[jp.partition],
            tags=tags,
        )


def request_digest(status: PartitionStatus, config_hash: str) -> str:
    return short(json_sha256([status.verdict, status.reasons, config_hash]))


# --------------------------------------------------------------------------------------------------
# The schedules
# --------------------------------------------------------------------------------------------------


def backfill_profiles(all_profiles: Iterable[str]) -> list[str]:
    """Profiles the schedules cover: ``$EMOTION_BACKFILL_PROFILES`` (comma-separated) or all of them."""
    names = list(all_profiles)
    wanted = [p.strip() for p in os.environ.get("EMOTION_BACKFILL_PROFILES", "").split(",") if p.strip()]
    return [p for p in wanted if p in names] if wanted else names


def plan_backfill(
    context: dg.ScheduleEvaluationContext, job_name: str, profiles: Sequence[str] | None = None
) -> list[dg.RunRequest] | dg.SkipReason:
    """Run requests for every missing or stale partition of ``job_name`` whose models are available."""
    try:
        registry = load_registry()
        all_profiles = load_profiles()
    except ValueError as exc:
        return dg.SkipReason(f"Configuration unreadable, nothing requested: {exc}")
    planner = Planner(context.instance, repository_of(context), registry, all_profiles)
    if job_name not in planner.jobs:
        return dg.SkipReason(f"{job_name}: {planner.ignored_jobs.get(job_name, 'unknown job')}")
    selected = list(profiles) if profiles is not None else backfill_profiles(all_profiles)
    try:
        when = context.scheduled_execution_time
    except Exception:  # a test context built without a scheduled time raises instead of returning None
        when = None
    when = when or dt.datetime.now(dt.UTC)
    night = when.strftime("%Y-%m-%d")
    requests: list[dg.RunRequest] = []
    unavailable: dict[str, Availability] = {}
    blocked: list[str] = []
    waiting_on: dict[str, None] = {}
    fresh = 0
    busy: list[str] = []
    for partition in planner.partitions(job_name, selected):
        jp = JobPartition(job_name, partition)
        missing_models = planner.unavailable(job_name, partition)
        if missing_models:
            unavailable.update(missing_models)
            continue
        run_id = planner.in_progress(job_name, partition)
        if run_id:
            busy.append(f"{jp.label} ({run_id[:8]})")
            continue
        state = planner.status(job_name, partition)
        if not state.needs_run:
            fresh += 1
            continue
        waits = planner.blockers(job_name, partition)
        if waits:
            blocked.append(f"{jp.label}: {'; '.join(waits)}")
            waiting_on.update(dict.fromkeys(waits))
            continue
        digest = request_digest(state, planner.config_hash(job_name, partition))
        run_key = f"backfill:{jp.id}:{digest}:{night}"
        earlier = planner.run_with_request_key(run_key)
        if earlier is not None:
            context.log.info(
                f"{jp.label}: already requested tonight as run {earlier.run_id[:8]} ({earlier.status.value}); "
                "a failed run is retried on the next night or after a change"
            )
            continue
        context.log.info(f"request {jp.label}: {state.describe()}")
        requests.append(planner.run_request(jp, run_key, f"schedule:{job_name}_backfill"))

    unavailable_text = describe_unavailable(unavailable)
    if unavailable:
        context.log.info(f"not requested, weights not available here: {unavailable_text}")
    for line in blocked:
        context.log.info(f"deferred: {line}")
    if requests:
        return requests
    parts = [f"{job_name}: nothing to request for profiles {', '.join(selected) or '(none)'}"]
    parts.append(f"{fresh} partition(s) fresh")
    if busy:
        parts.append(f"running: {', '.join(busy)}")
    if blocked:
        parts.append(
            f"{len(blocked)} partition(s) deferred until upstream is ready ({'; '.join(waiting_on)})"
        )
    if unavailable:
        parts.append(f"unavailable models: {unavailable_text}")
    return dg.SkipReason(". ".join(parts) + ".")


def _backfill_schedule(job: Any, cron: str, timezone: str) -> dg.ScheduleDefinition:
    job_name = job.name

    def evaluate(context: dg.ScheduleEvaluationContext):
        return plan_backfill(context, job_name)

    evaluate.__name__ = f"{job_name}_backfill"
    return dg.schedule(
        cron_schedule=cron,
        job=job,
        name=f"{job_name}_backfill",
        execution_timezone=timezone,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Requests {job_name} runs for missing or stale partitions of models available on this "
        "machine (profiles: $EMOTION_BACKFILL_PROFILES or all). Upstream jobs go first; see "
        "docs/operations.md.",
    )(evaluate)


def build_backfill_schedules(
    jobs: Sequence[Any] = ALL_JOBS, cron: str | None = None, timezone: str | None = None
) -> list[dg.ScheduleDefinition]:
    """One backfill schedule per job of ``jobs`` that is partitioned by profile."""
    cron = cron or os.environ.get("EMOTION_BACKFILL_CRON", DEFAULT_CRON)
    timezone = timezone or os.environ.get("EMOTION_BACKFILL_TIMEZONE", "UTC")
    schedules = []
    for job in jobs:
        partitions_def = getattr(job, "partitions_def", None)
        if partitions_def is None:
            continue
        if isinstance(partitions_def, dg.MultiPartitionsDefinition):
            if PROFILE_DIMENSION not in partitions_def.partition_dimension_names:
                continue
        elif _dimension_names(partitions_def, PROFILES) != (PROFILE_DIMENSION,):
            continue
        schedules.append(_backfill_schedule(job, cron, timezone))
    return schedules


backfill_schedules = build_backfill_schedules()

__all__ = [
    "ACCELERATOR_TAG",
    "CONFIG_HASH_TAG",
    "REQUEST_KEY_TAG",
    "Availability",
    "JobPartition",
    "PartitionStatus",
    "Planner",
    "backfill_schedules",
    "build_backfill_schedules",
    "model_availability",
    "plan_backfill",
]
