"""Phase 1: how well each evaluator scores the labels of the eval split."""

import dagster as dg
import numpy as np
import pandas as pd

from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, all_emotion_words, effective_profile, recorded
from emotion_assets.context import evaluator_suite_for
from emotion_assets.dataset import EMOTION_COLUMNS, emotion_dataset
from emotion_assets.io import ArtifactHandle, prompts_of
from emotion_assets.partitions import profile_partitions
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.evaluator_checks import CLASSIFIER, POLITENESS, evaluator_quality_table
from emotion_assets.science.prompts import fitting_mask
from jobs.jobs import DATASET_GROUP
from resources.device import resolve_device
from resources.evaluators import EvaluatorResource
from resources.storage import ArtifactStore, reader_path, write_json, write_table
from resources.tracking import TrackingResource


@dg.asset(
    partitions_def=profile_partitions,
    deps=config_deps("evaluator_quality", profile_partitions),
    group_name=DATASET_GROUP,
    ins={"dataset": dg.AssetIn(emotion_dataset.key)},
    kinds={"sklearn"},
    code_version="3",
    description="How well each evaluator recovers the labels of the eval split's fitting prompts (the "
    "embedded classifier is fit on train fitting prompts): accuracy, macro-F1, AUROC; the classifier's "
    "accuracy per register and on first/second- vs third-person neutral sentences; politeness (without "
    "gratitude/apology keywords) and the separate keyword marker on the polite vs direct register.",
)
def evaluator_quality(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    evaluators: EvaluatorResource,
    tracking: TrackingResource,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    profile = effective_profile(context.partition_key, config)
    frame = prompts_of(dataset)
    evaluation = frame[(frame["split"] == "eval").to_numpy() & fitting_mask(frame)].reset_index(drop=True)
    with recorded(
        context,
        tracking=tracking,
        store=store,
        phase="1-dataset",
        model="-",
        profile=profile,
        device=str(resolve_device(evaluators.device)),
        config=config,
        throughput_unit="texts",
    ) as rec:
        suite = evaluator_suite_for(evaluators, profile, frame)
        scores = suite.score(evaluation["text"].tolist())
        rec.timing.samples = len(evaluation)
        absent = [c for c in EMOTION_COLUMNS.values() if c not in scores]
        if absent:
            raise ValueError(
                f"Profile {profile.name!r}: the evaluators score no {absent} (evaluators.emotions is "
                f"{profile.evaluators.get('emotions')!r}); the emotion scores that steering targets come from the "
                "embedded classifier. Set `evaluators: {emotions: {backend: embedded}}` in the profile."
            )

        table, quality = evaluator_quality_table(evaluation, scores, EMOTION_COLUMNS, all_emotion_words())
        headline = table.set_index(["evaluator", "metric"])["value"]
        politeness_auroc = float(headline.get((POLITENESS, "auroc_polite_vs_direct_register"), float("nan")))

        out = store.directory(profile.name, "evaluator_quality")

        rec.artifacts(out)
        write_table(out / "quality.parquet", table, csv=True)
        write_table(
            out / "eval_scores.parquet",
            pd.concat([evaluation[["id", "emotion", "register"]], scores], axis=1),
        )
        write_json(out / "quality.json", {**quality, "null_reasons": suite.null_reasons})
        confusion = np.asarray(quality["confusion_matrix"], dtype=float)
        plot = save_figure(
            heatmap(
                confusion,
                list(EMOTION_COLUMNS),
                list(EMOTION_COLUMNS),
                "Embedded emotion classifier (eval split)",
                "predicted",
                "true",
                center=False,
            ),
            out / "confusion_matrix.png",
        )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out)),
            "quality": markdown_table(table, max_rows=len(table)),
            "emotion_macro_f1": dg.MetadataValue.float(float(quality["macro_f1"])),
            "classifier_by_register_and_person": markdown_table(
                table[(table["evaluator"] == CLASSIFIER) & table["metric"].str.contains("register=|person")]
            ),
            "politeness_auroc_polite_vs_direct": dg.MetadataValue.float(politeness_auroc),
            "confusion_matrix": plot,
            "null_metrics": dg.MetadataValue.json(suite.null_reasons),
            "n_eval_prompts": dg.MetadataValue.int(len(evaluation)),
            **rec.metadata(),
        }
    )
