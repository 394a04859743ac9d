"""One phase context per materialization: the partition, the effective profile, the model and the recorder.

Every model × profile asset starts the same way: read its model and profile from the partition key, apply
the run config to the profile, load the model once through the resource (whose cache makes it once per
run), set the thread count, and open ``recorded(...)`` with the same nine arguments. :class:`Phase` does
that once, so an asset body reads its inputs, calls ``science/`` and writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dagster as dg
import pandas as pd
import torch

from emotion_assets.common import Recorder, RunConfig, effective_profile, limit_for_run, recorded
from emotion_assets.io import ArtifactHandle, prompts_of
from emotion_assets.partitions import model_and_profile
from emotion_assets.profiles import Profile
from emotion_assets.science.prompts import fitting_mask
from emotion_assets.science.scoring import EvaluatorSuite
from resources.evaluators import EvaluatorResource
from resources.models import ModelHandle, ModelResource
from resources.storage import ArtifactStore
from resources.tracking import TrackingResource


@dataclass
class Phase:
    """The context of one model × profile materialization (build it with :meth:`of`)."""

    context: dg.AssetExecutionContext
    config: RunConfig
    store: ArtifactStore
    tracking: TrackingResource
    name: str  # the study phase recorded with the timing, e.g. "6-heads"
    model: str
    profile: Profile
    models: ModelResource | None = None

    @classmethod
    def of(
        cls,
        context: dg.AssetExecutionContext,
        config: RunConfig,
        *,
        store: ArtifactStore,
        tracking: TrackingResource,
        phase: str,
        models: ModelResource | None = None,
    ) -> Phase:
        model, profile = model_and_profile(context)
        return cls(context, config, store, tracking, phase, model, effective_profile(profile, config), models)

    @cached_property
    def handle(self) -> ModelHandle:
        """The partition's model on the configured device (loaded once per run by the resource), with the
        run's thread count applied."""
        if self.models is None:
            raise ValueError(f"Phase {self.name!r} of {self.model!r} was built without the models resource.")
        handle = self.models.get(self.model, device=self.config.device)
        if self.config.n_jobs > 1:
            torch.set_num_threads(self.config.n_jobs)
        return handle

    @property
    def device(self) -> str:
        """The device the work runs on: the model's, or the CPU for phases without a model."""
        return str(self.handle.device) if self.models is not None else "cpu"

    def prompts(self, dataset: ArtifactHandle) -> pd.DataFrame:
        """The dataset's prompts, limited as the profile asks (``samples_per_emotion``)."""
        return limit_for_run(prompts_of(dataset), self.profile)

    def directory(self, asset: str) -> Path:
        """A new version folder of ``asset`` for this partition (published when the recorder closes)."""
        return self.store.directory(self.profile.name, asset, self.model)

    @contextlib.contextmanager
    def recorded(self, throughput_unit: str = "samples") -> Iterator[Recorder]:
        """:func:`emotion_assets.common.recorded` for this materialization."""
        with recorded(
            self.context, tracking=self.tracking, store=self.store, phase=self.name, model=self.model,
            profile=self.profile, device=self.device, config=self.config, throughput_unit=throughput_unit,
        ) as rec:  # fmt: skip
            yield rec


def evaluator_suite_for(
    evaluators: EvaluatorResource, profile: Profile, frame: pd.DataFrame
) -> EvaluatorSuite:
    """The profile's evaluator suite; the embedded emotion classifier is fit on train fitting prompts only."""
    train = frame[(frame["split"] == "train").to_numpy() & fitting_mask(frame)]
    return evaluators.suite(
        profile.evaluators, train["text"].tolist(), train["emotion"].tolist(), profile.seed
    )
