"""The one Definitions object of the code location."""

import dagster as dg

from emotion_assets import (
    activations,
    alignment,
    circuits,
    confounds,
    dataset,
    evaluator_quality,
    head_patching,
    head_screening,
    model_card,
    patching,
    report,
    statistics,
    subspaces,
    vectors,
)
from emotion_assets.automation import CONFIG_ASSETS, automate, automation_sensors, config_sensor
from emotion_assets.io import ArtifactIOManager
from jobs.executors import run_executor
from jobs.jobs import ALL_JOBS
from resources.evaluators import EvaluatorResource
from resources.models import ModelResource
from resources.storage import ArtifactStore
from resources.tracking import TrackingResource

ASSET_MODULES = [
    dataset,
    evaluator_quality,
    model_card,
    activations,
    vectors,
    subspaces,
    confounds,
    alignment,
    patching,
    head_screening,
    head_patching,
    circuits,
    statistics,
    report,
]

defs = dg.Definitions(
    assets=[*automate(dg.load_assets_from_modules(ASSET_MODULES)), *CONFIG_ASSETS],
    asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
    jobs=ALL_JOBS,
    sensors=[config_sensor, *automation_sensors()],
    executor=run_executor(),
    resources={
        "models": ModelResource(),
        "evaluators": EvaluatorResource(),
        "store": ArtifactStore(),
        "tracking": TrackingResource(),
        "io_manager": ArtifactIOManager(store=ArtifactStore()),
    },
)
