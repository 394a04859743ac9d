"""Every asset with a blocking check runs the check's logic on its staged result before publishing: a
result that fails is refused with the check's name, and readers keep seeing the last good version.

Assets run through Dagster on a tiny random Llama (registered under a real partition key), a temporary
profile file and a fake prompt table; the α = 0, head-screening and head-patching checks, whose assets need
generation and evaluators, are tested on planted tables of their pure logic.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from resources.storage import ArtifactStore, read_tensors, write_table
from tests.artifacts import materialize

PROJECT = Path(__file__).resolve().parents[2]
MODEL, PROFILE = "smollm2-135m", "smoke"  # partition keys that exist; the model is a tiny Llama here
KEY = dg.MultiPartitionKey({"model": MODEL, "profile": PROFILE})
EMOTIONS = ("gratitude", "anger", "apology", "neutral")
WORDS = {
    "gratitude": "thank you so much for the help",
    "anger": "I am furious about this delay",
    "apology": "I am so sorry for the trouble",
    "neutral": "the train leaves at nine today",
}


def _prompts() -> pd.DataFrame:
    rows = []
    for emotion in EMOTIONS:
        for i in range(6):
            rows.append({
                "id": f"{emotion}-{i:02d}", "text": f"{WORDS[emotion]} number {i}.", "emotion": emotion,
                "lang": "en", "register": "casual", "split": "train" if i < 4 else "eval", "role": "fit",
                "n_words": 8,
            })  # fmt: skip
    return pd.DataFrame(rows)


def _profile_file(path: Path, **changes) -> None:
    doc = yaml.safe_load((PROJECT / "data" / "profiles.yaml").read_text(encoding="utf-8"))
    smoke = doc["profiles"]["smoke"]
    smoke.update(layers="all", samples_per_emotion=None, batch_size=8, k_max=2)
    smoke["steering"]["layers"] = [1]
    for key, value in changes.items():
        if key == "steering_layers":
            smoke["steering"]["layers"] = value
        else:
            smoke[key] = value
    path.write_text(yaml.safe_dump({"version": 1, "profiles": {"smoke": smoke}}), encoding="utf-8")


@pytest.fixture
def study(tmp_path, tiny_llama_dir, monkeypatch):
    """A results root with a published prompt table, a registry naming the tiny Llama ``smollm2-135m``, and
    resources; ``study.run(assets)`` materializes the partition."""
    from resources.models import ModelResource, clear_model_cache
    from resources.tracking import TrackingResource

    registry = tmp_path / "models.yaml"
    registry.write_text(
        "version: 1\ndefault_model: smollm2-135m\nmodels:\n"
        f"  smollm2-135m: {{kind: causal_lm, source: {{type: huggingface, id: tiny, path: '{tiny_llama_dir}'}}, "
        "width: 64, layers: 3, heads: 4, kv_heads: 2}\npairs: []\n",
        encoding="utf-8",
    )
    profiles = tmp_path / "profiles.yaml"
    _profile_file(profiles)
    monkeypatch.setenv("EMOTION_PROFILES", str(profiles))
    root = tmp_path / "results"
    store = ArtifactStore(root_dir=str(root))
    with store.publishing():
        write_table(store.directory(PROFILE, "emotion_dataset") / "prompts.parquet", _prompts())
    clear_model_cache()
    resources = {
        "store": store,
        "tracking": TrackingResource(enabled=False),
        "models": ModelResource(registry_path=str(registry), device="cpu", dtype="float32"),
    }

    def run(assets: list) -> dg.ExecuteInProcessResult:
        return materialize(
            assets, store=store, partition_key=KEY, resources=resources, instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
        )  # fmt: skip

    yield SimpleNamespace(run=run, root=root, store=store, profiles=profiles)
    clear_model_cache()


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error, messages = failure.event_specific_data.error, []
    while error is not None:  # the step error, then the exception the asset raised
        messages.append(error.message)
        error = error.cause
    return " ".join(messages)


def _published(study, asset: str, file: str) -> dict[str, torch.Tensor]:
    return read_tensors(study.store.existing(PROFILE, asset, MODEL) / file)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_activations_are_refused_and_the_last_good_version_stays(study, monkeypatch):
    from emotion_assets.activations import ACTIVATIONS_FILE, activations, activations_finite
    from resources.models import ModelHandle

    good = study.run([activations, activations_finite])
    assert good.success and all(c.passed for c in good.get_asset_check_evaluations())
    before = _published(study, "activations", ACTIVATIONS_FILE)

    extract = ModelHandle.extract

    def nan_at_one_prompt(self, texts, **kwargs):  # a forward that overflows on one prompt
        result = extract(self, texts, **kwargs)
        result.pooled["last"][3, 2] = float("nan")
        return result

    monkeypatch.setattr(ModelHandle, "extract", nan_at_one_prompt)
    message = _failure(study.run([activations, activations_finite]))
    assert (
        "activations for partition 'smollm2-135m|smoke' fails its blocking check(s) activations_finite"
        in (message)
    )
    assert "last: 1 non-finite vector(s)" in message and "last good version" in message
    assert _same(_published(study, "activations", ACTIVATIONS_FILE), before)


def test_a_nan_weight_fails_activations_before_anything_is_published(study):
    from emotion_assets.activations import ACTIVATIONS_FILE, activations
    from resources.models import ModelResource

    assert study.run([activations]).success
    before = _published(study, "activations", ACTIVATIONS_FILE)
    handle = ModelResource(
        registry_path=str(study.root.parent / "models.yaml"), device="cpu", dtype="float32"
    )
    model = handle.get(MODEL).model  # the cached handle the next run gets
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    message = _failure(study.run([activations]))
    assert "Non-finite activations" in message and "boundary 2" in message
    assert _same(_published(study, "activations", ACTIVATIONS_FILE), before)


def test_zero_vectors_are_refused_and_the_last_good_vectors_stay(study):
    from emotion_assets.activations import ACTIVATIONS_FILE, INDEX_FILE, SINKS_FILE, activations
    from emotion_assets.vectors import VECTORS_FILE, emotion_vectors, emotion_vectors_nonzero
    from resources.storage import read_table, write_tensors

    assert study.run([activations]).success
    assert study.run([emotion_vectors, emotion_vectors_nonzero]).success
    before = _published(study, "emotion_vectors", VECTORS_FILE)

    # Upstream publishes activations in which 'anger' was captured from the neutral prompts (a mix-up):
    # its mean equals neutral's exactly, so its vector is zero at every boundary.
    folder = study.store.existing(PROFILE, "activations", MODEL)
    tensors, index, sinks = read_tensors(folder / ACTIVATIONS_FILE), read_table(folder / INDEX_FILE), None
    sinks = read_tensors(folder / SINKS_FILE)
    anger = ((index["emotion"] == "anger") & (index["split"] == "train")).to_numpy()
    neutral = ((index["emotion"] == "neutral") & (index["split"] == "train")).to_numpy()
    for name, value in tensors.items():
        if name != "boundaries":
            value[anger] = value[neutral]
    with study.store.publishing():
        out = study.store.directory(PROFILE, "activations", MODEL)
        write_tensors(out / ACTIVATIONS_FILE, tensors)
        write_tensors(out / SINKS_FILE, sinks)
        write_table(out / INDEX_FILE, index)
        write_table(out / "residual_norms.parquet", read_table(folder / "residual_norms.parquet"))

    message = _failure(study.run([emotion_vectors, emotion_vectors_nonzero]))
    assert "fails its blocking check(s) emotion_vectors_nonzero" in message
    assert "zero vectors past the embeddings" in message and "last/anger" in message
    assert _same(_published(study, "emotion_vectors", VECTORS_FILE), before)


def test_non_orthonormal_subspaces_are_refused_and_the_last_good_ones_stay(study, monkeypatch):
    import emotion_assets.subspaces as subspaces
    from emotion_assets.activations import activations

    assert study.run([activations]).success
    assert study.run([subspaces.emotion_subspaces, subspaces.emotion_subspaces_orthonormal]).success
    before = _published(study, "emotion_subspaces", subspaces.SUBSPACES_FILE)
    fitted = subspaces.emotion_subspace

    def unnormalised(x, neutral_mean, k):  # a numerical bug: the basis is scaled by 2
        basis, ratio = fitted(x, neutral_mean, k)
        return 2 * basis, ratio

    monkeypatch.setattr(subspaces, "emotion_subspace", unnormalised)
    message = _failure(study.run([subspaces.emotion_subspaces, subspaces.emotion_subspaces_orthonormal]))
    assert "fails its blocking check(s) emotion_subspaces_orthonormal" in message
    assert "is not orthonormal (max |B Bᵀ - I| = 3" in message
    assert _same(_published(study, "emotion_subspaces", subspaces.SUBSPACES_FILE), before)


def test_over_long_prompt_and_missing_steering_layer_stop_activations_with_the_fix(study):
    from emotion_assets.activations import ACTIVATIONS_FILE, activations

    assert study.run([activations]).success
    before = _published(study, "activations", ACTIVATIONS_FILE)
    longest = max(len(t.encode()) for t in _prompts()["text"]) + 1  # byte tokenizer: bytes + BOS

    _profile_file(study.profiles, max_prompt_tokens=longest - 1)
    message = _failure(study.run([activations]))
    assert f"prompt 'gratitude-00' has {longest} tokens" in message
    assert f"max_prompt_tokens of profile 'smoke' (tokens of {MODEL}) = {longest - 1}" in message
    assert "never truncated" in message

    _profile_file(study.profiles, max_prompt_tokens=longest, steering_layers=[1, 3, 7])
    message = _failure(study.run([activations]))
    assert "field steering.layers has [3, 7], which smollm2-135m does not have" in message
    assert "3 blocks, so steerable layers (resid_pre of a block) are 0..2" in message

    _profile_file(study.profiles, max_prompt_tokens=longest)
    assert study.run([activations]).success  # exactly at the limit is allowed
    assert _same(_published(study, "activations", ACTIVATIONS_FILE), before)


# ---------------------------------------------------------------- the other blocking checks' logic


def _sweep(mismatch: bool) -> pd.DataFrame:
    rows = [
        {"kind": "baseline", "alpha": np.nan, "prompt_index": i, "continuation": f"text {i}"}
        for i in range(3)
    ]
    rows += [
        {"kind": "emotion", "alpha": a, "prompt_index": i, "continuation": f"text {i}" if a == 0 else "other"}
        for a in (-0.1, 0.0, 0.1)
        for i in range(3)
    ]
    if mismatch:
        rows[7]["continuation"] = "changed by a hook that should add nothing"  # α = 0 row of prompt 1
    return pd.DataFrame(rows)


def test_alpha_zero_logic_finds_the_one_planted_mismatch():
    from emotion_assets.patching import alpha_zero_check

    clean = alpha_zero_check(_sweep(mismatch=False))
    assert clean.passed and clean.metadata["mismatches"].value == 0
    bad = alpha_zero_check(_sweep(mismatch=True))
    assert not bad.passed and bad.metadata["mismatches"].value == 1
    assert "1 of 3 α = 0 rows differ" in bad.description


def _screen(n_layers: int = 2, n_heads: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "emotion": e,
                "half": half,
                "layer": ly,
                "head": h,
                "ablation_effect": 0.1 * h,
                "attribution": -0.1 * ly,
            }
            for e in ("anger", "gratitude")
            for half in ("A", "B")
            for ly in range(n_layers)
            for h in range(n_heads)
        ]
    )


def test_screening_logic_finds_a_missing_head_and_a_nan_score():
    from emotion_assets.head_screening import screening_check

    split = pd.DataFrame({"emotion": ["anger"] * 2, "half": ["A", "B"], "prompt_id": ["a-1", "a-2"],
                          "neutral_prompt_id": ["n-1", "n-2"], "pair_index": [0, 1]})  # fmt: skip
    assert screening_check(_screen(), split, 2, 3).passed
    missing = screening_check(_screen().drop(index=4), split, 2, 3)
    assert not missing.passed and missing.metadata["incomplete"].value == {"anger/A": 2}
    nan = _screen()
    nan.loc[7, "attribution"] = np.nan
    result = screening_check(nan, split, 2, 3)
    assert not result.passed and "non-finite" in result.description
    assert not screening_check(_screen(), split, 3, 3).passed  # a model with more layers than were screened


def _patching() -> pd.DataFrame:
    kinds = {"baseline": "baseline", "zero": "ablation", "z": "patch", "r0": "random_ablation",
             "rz": "random_patch"}  # fmt: skip
    return pd.DataFrame(
        [
            {"emotion": "anger", "condition": c, "kind": k, "pair_index": i}
            for c, k in kinds.items()
            for i in range(3)
        ]
    )


def test_head_patching_logic_finds_a_lost_and_a_doubled_row():
    from emotion_assets.head_patching import patching_check

    assert patching_check(_patching()).passed
    lost = patching_check(_patching().drop(index=5))
    assert not lost.passed and lost.metadata["incomplete"].value == ["anger/zero"]
    doubled = _patching()
    doubled = pd.concat([doubled, doubled.iloc[[7]]], ignore_index=True)
    assert patching_check(doubled).metadata["incomplete"].value == ["anger/z"]
    no_random = patching_check(_patching()[lambda f: f["kind"] != "random_patch"])
    assert not no_random.passed and no_random.metadata["missing_kinds"].value == ["random_patch"]


# ---------------------------------------------------------------- every blocking check has its gate


def test_every_blocking_check_gates_its_asset_before_publishing():
    """A blocking check added later without a pre-publish gate fails here: the asset's body (or the
    module's ``*_gates`` helper) must pass the check's name to ``refuse_failing_checks``."""
    import importlib

    from emotion_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    blocking = [graph.get_check_spec(key) for key in graph.asset_check_keys]
    blocking = [spec for spec in blocking if spec.blocking]
    assert len(blocking) >= 9
    for spec in blocking:
        asset = spec.asset_key.to_user_string()
        module = importlib.import_module(
            graph.get(spec.asset_key).assets_def.op.compute_fn.decorated_fn.__module__
        )
        body = inspect.getsource(graph.get(spec.asset_key).assets_def.op.compute_fn.decorated_fn)
        helpers = "".join(inspect.getsource(f) for n, f in vars(module).items() if n.endswith("_gates"))
        assert "refuse_failing_checks(" in body, asset
        assert f'"{spec.name}"' in body + helpers, f"{spec.name} is not run on the staged {asset}"
