"""Phase 1: the validated prompt set with its splits and its blocking checks."""

import dagster as dg
import pandas as pd

from emotion_assets.automation import config_deps
from emotion_assets.common import (
    RunConfig,
    all_emotion_words,
    effective_profile,
    json_metadata,
    recorded,
    refuse_failing_checks,
)
from emotion_assets.io import PROMPTS_FILE, ArtifactHandle, prompts_of
from emotion_assets.partitions import profile_partitions
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.profiles import Profile
from emotion_assets.science.prompts import (
    EMOTIONS,
    ROLE_STEERING,
    assign_splits,
    dataset_summary,
    fitting_mask,
    given_splits,
    limit_per_emotion,
    load_prompts,
    normalize_text,
)
from emotion_assets.science.surface import (
    ALL_REGISTERS,
    prompt_surface,
    share_matrix,
    surface_balance_problems,
    surface_table,
)
from jobs.jobs import DATASET_GROUP
from resources.storage import ArtifactStore, reader_path, tree_sha256, write_json, write_table
from resources.tracking import TrackingResource

EMOTION_COLUMNS = {emotion: f"emotion_{emotion}" for emotion in EMOTIONS}
SURFACE_FILE = "surface.parquet"


@dg.asset(
    partitions_def=profile_partitions,
    deps=config_deps("emotion_dataset", profile_partitions),
    group_name=DATASET_GROUP,
    kinds={"pandas", "parquet"},
    code_version="2",
    description="The profile's prompt set, validated (labels, roles, duplicates, balance, UTF-8) and split "
    "into train (fit) and eval (held out) per role; surface features (final punctuation, person, 'The', "
    "length, register, emotion keywords) of the fitting prompts per class × register.",
)
def emotion_dataset(
    context: dg.AssetExecutionContext, config: RunConfig, store: ArtifactStore, tracking: TrackingResource
) -> dg.MaterializeResult:
    profile = effective_profile(context.partition_key, config)
    source = profile.dataset.resolved_path()
    with recorded(
        context,
        tracking=tracking,
        store=store,
        phase="1-dataset",
        model="-",
        profile=profile,
        device="cpu",
        config=config,
        throughput_unit="prompts",
    ) as rec:
        frame = load_prompts(source, max_imbalance_ratio=profile.dataset.max_imbalance_ratio)
        splits_given = int(given_splits(frame).sum())
        splits_assigned = len(frame) - splits_given
        frame = assign_splits(frame, eval_fraction=profile.dataset.eval_fraction, seed=profile.seed)
        if splits_given and splits_assigned:
            context.log.warning(
                f"{splits_given} of {len(frame)} prompts in {source.name} give a split and keep it; the "
                f"other {splits_assigned} were assigned (eval_fraction {profile.dataset.eval_fraction}, "
                f"seed {profile.seed}). Give every row a split, or none, to make this explicit."
            )
        if profile.samples_per_emotion is not None:
            frame = limit_per_emotion(frame, profile.samples_per_emotion, profile.seed)
        frame = frame.sort_values(["emotion", "split", "id"]).reset_index(drop=True)
        frame["n_words"] = frame["text"].str.split().str.len()
        summary = dataset_summary(frame)
        rec.timing.samples = len(frame)

        out = store.directory(profile.name, "emotion_dataset")

        rec.artifacts(out)
        columns = ["id", "text", "emotion", "lang", "register", "split", "role", "n_words"]
        # The blocking checks' logic runs on the staged table: a failing dataset is never published.
        refuse_failing_checks("emotion_dataset", profile.name, dataset_gates(frame[columns], profile))
        write_table(out / PROMPTS_FILE, frame[columns], csv=True)
        source_sha = tree_sha256(source)
        write_json(
            out / "summary.json",
            {
                **summary,
                "source": str(source),
                "source_sha256": source_sha,
                "splits": {"given": splits_given, "assigned": splits_assigned},
            },
        )

        surface = surface_table(prompt_surface(frame, all_emotion_words()))  # fitting prompts only
        write_table(out / SURFACE_FILE, surface, csv=True)
        shares, classes, features = share_matrix(surface)
        surface_plot = save_figure(
            heatmap(
                shares,
                classes,
                features,
                "Surface features of the fitting prompts (share per class, all registers)",
                "feature",
                "class",
                center=False,
            ),
            out / "surface_shares.png",
        )

        counts = frame.pivot_table(
            index=["emotion", "role"], columns="split", values="id", aggfunc="count", fill_value=0
        )
        counts = counts.reset_index()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / PROMPTS_FILE)),
            "dg.row_count": dg.MetadataValue.int(len(frame)),
            "source": dg.MetadataValue.path(str(source)),
            "source_sha256": dg.MetadataValue.text(source_sha),
            "counts_by_emotion_role_and_split": markdown_table(counts),
            "n_steering_prompts": dg.MetadataValue.int(int((frame["role"] == ROLE_STEERING).sum())),
            # Of the source file's rows: splits kept as given, and splits assigned here.
            "splits_given": dg.MetadataValue.int(splits_given),
            "splits_assigned": dg.MetadataValue.int(splits_assigned),
            "surface_table": markdown_table(surface, max_rows=len(surface), floatfmt=".3f"),
            "surface_table_all_registers": markdown_table(
                surface[surface["register"] == ALL_REGISTERS], floatfmt=".3f"
            ),
            "surface_shares": surface_plot,
            "words_min": dg.MetadataValue.int(int(frame["n_words"].min())),
            "words_mean": dg.MetadataValue.float(round(float(frame["n_words"].mean()), 2)),
            "words_max": dg.MetadataValue.int(int(frame["n_words"].max())),
            "preview": markdown_table(
                frame[["id", "emotion", "register", "split", "role", "text"]].sample(
                    n=min(12, len(frame)), random_state=profile.seed
                )
            ),
            **rec.metadata(),
        },
        data_version=dg.DataVersion(source_sha[:16] + f"-{profile.seed}-{profile.samples_per_emotion}"),
    )


@dg.asset_check(
    asset=emotion_dataset,
    blocking=True,
    description="Every emotion has train and eval fitting prompts "
    "and the largest class is at most max_imbalance_ratio times the smallest (fitting prompts).",
)
def emotion_dataset_balance(
    context: dg.AssetCheckExecutionContext, emotion_dataset: ArtifactHandle
) -> dg.AssetCheckResult:
    profile = effective_profile(context.partition_key, None)
    return balance_check(prompts_of(emotion_dataset), profile)


def balance_check(frame: pd.DataFrame, profile: Profile) -> dg.AssetCheckResult:
    """The logic of ``emotion_dataset_balance`` on a prompt table."""
    frame = frame[fitting_mask(frame)]  # steering prompts fit nothing and do not count
    counts = frame.groupby(["emotion", "split"]).size().unstack(fill_value=0)
    missing = sorted(set(EMOTIONS) - set(counts.index))
    per_emotion = frame.groupby("emotion").size()
    ratio = float(per_emotion.max() / per_emotion.min())
    empty_splits = [
        f"{e}/{s}" for e in counts.index for s in ("train", "eval") if counts.get(s, {}).get(e, 0) == 0
    ]
    passed = not missing and not empty_splits and ratio <= profile.dataset.max_imbalance_ratio
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"imbalance_ratio": ratio, "missing_emotions": missing, "empty_splits": empty_splits},
    )


@dg.asset_check(
    asset=emotion_dataset,
    blocking=True,
    description="No two prompts are equal after normalisation (statistics count unique prompts).",
)
def emotion_dataset_unique(emotion_dataset: ArtifactHandle) -> dg.AssetCheckResult:
    return uniqueness_check(prompts_of(emotion_dataset))


def uniqueness_check(frame: pd.DataFrame) -> dg.AssetCheckResult:
    """The logic of ``emotion_dataset_unique`` on a prompt table."""
    normalized = frame["text"].map(normalize_text)
    duplicates = int(normalized.duplicated().sum())
    return dg.AssetCheckResult(
        passed=duplicates == 0 and frame["id"].is_unique,
        metadata={
            "n_prompts": len(frame),
            "duplicate_texts": duplicates,
            "ids_unique": bool(frame["id"].is_unique),
        },
    )


@dg.asset_check(
    asset=emotion_dataset,
    blocking=True,
    description="Fitting prompts differ only in emotion: for every emotion class vs neutral, the shares of "
    "final punctuation, '!', '?', first/second person, 'The' as first word and each register differ by at "
    "most dataset.surface_balance.max_share_difference, and mean lengths by at most max_length_ratio.",
)
def emotion_dataset_surface_balance(
    context: dg.AssetCheckExecutionContext, emotion_dataset: ArtifactHandle
) -> dg.AssetCheckResult:
    profile = effective_profile(context.partition_key, None)
    return surface_balance_check(prompts_of(emotion_dataset), profile)


def surface_balance_check(frame: pd.DataFrame, profile: Profile) -> dg.AssetCheckResult:
    """The logic of ``emotion_dataset_surface_balance`` on a prompt table."""
    thresholds = profile.dataset.surface_balance
    problems = surface_balance_problems(prompt_surface(frame, all_emotion_words()), thresholds)
    table = pd.DataFrame(
        problems,
        columns=["feature", "emotion", "neutral_value", "emotion_value", "difference", "threshold", "fix"],
    )
    return dg.AssetCheckResult(
        passed=not problems,
        description=(
            "Fitting prompts are balanced on every surface feature."
            if not problems
            else f"{len(problems)} surface imbalance(s): "
            + "; ".join(f"{p['feature']} ({p['emotion']} vs neutral)" for p in problems)
            + ". Fix: "
            + problems[0]["fix"]
        ),
        metadata={
            "n_problems": len(problems),
            "features": sorted({p["feature"] for p in problems}),
            "classes": sorted({p["emotion"] for p in problems}),
            "problems": markdown_table(table, max_rows=len(table) or 1, floatfmt=".3f"),
            "fixes": json_metadata([f"{p['feature']} / {p['emotion']}: {p['fix']}" for p in problems]),
            "max_share_difference": float(thresholds.max_share_difference),
            "max_length_ratio": float(thresholds.max_length_ratio),
        },
    )


def dataset_gates(frame: pd.DataFrame, profile: Profile) -> dict[str, dg.AssetCheckResult]:
    """Every blocking check of ``emotion_dataset`` run on a staged table, before it is published."""
    return {
        "emotion_dataset_balance": balance_check(frame, profile),
        "emotion_dataset_unique": uniqueness_check(frame),
        "emotion_dataset_surface_balance": surface_balance_check(frame, profile),
    }
