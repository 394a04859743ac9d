"""Resumable sweeps: an interrupted steering sweep and its log-likelihood pass continue where they stopped,
with results identical to an uninterrupted run; changed inputs never match a stored batch."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from emotion_assets.science.batch_cache import batch_key
from emotion_assets.science.fluency import continuation_logprob
from emotion_assets.science.steering import build_conditions, generate_sweep
from resources.resume import ResumeFolder
from resources.storage import ArtifactStore, UnsafePathError
from tests.tiny_models import byte_tokenizer, tiny_llama

PROMPTS = ["Thank you so much, truly.", "Hi", "I am sorry about that", "The weather"]
LAYERS = [1, 2]
NEW = 5
BATCH = 4
FINGERPRINT = "tiny-llama-seed-0"


class Interrupted(RuntimeError):
    """Stands for a killed run."""


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def conditions(model):
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    vectors = {e: {layer: torch.randn(d, generator=gen) for layer in LAYERS} for e in ("joy", "anger")}
    return build_conditions(vectors, {1: 3.0, 2: 4.0}, LAYERS, [-1.0, 0.0, 1.0], n_random=1, seed=7)


@pytest.fixture(scope="module")
def reference(model, tokenizer, conditions):
    return generate_sweep(model, tokenizer, PROMPTS, conditions, max_new_tokens=NEW, batch_size=BATCH)


@pytest.fixture
def counted_generate(model, monkeypatch):
    """``model.generate`` that counts its calls and raises ``Interrupted`` once ``limit`` calls are done."""
    state = {"calls": 0, "limit": None}
    original = model.generate

    def generate(*args, **kwargs):
        if state["limit"] is not None and state["calls"] >= state["limit"]:
            raise Interrupted("killed")
        state["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return state


def _sweep(model, tokenizer, conditions, cache, fingerprint=FINGERPRINT):
    return generate_sweep(
        model, tokenizer, PROMPTS, conditions, max_new_tokens=NEW, batch_size=BATCH, cache=cache,
        fingerprint=fingerprint,
    )  # fmt: skip


def test_an_interrupted_sweep_resumes_with_identical_results(
    model, tokenizer, conditions, reference, counted_generate, tmp_path
):
    folder = ResumeFolder(tmp_path / "resume")
    counted_generate["limit"] = 3
    with pytest.raises(Interrupted):
        _sweep(model, tokenizer, conditions, folder)
    assert folder.written == 3 and len(list(folder.path.glob("*.json"))) == 3

    counted_generate.update(calls=0, limit=None)
    resumed = ResumeFolder(folder.path)
    result = _sweep(model, tokenizer, conditions, resumed)
    pd.testing.assert_frame_equal(result, reference)
    assert resumed.reused == 3 and resumed.written == counted_generate["calls"] > 0
    assert resumed.unreadable == []

    counted_generate.update(calls=0, limit=0)  # everything is stored now: no generate call at all
    again = ResumeFolder(folder.path)
    pd.testing.assert_frame_equal(_sweep(model, tokenizer, conditions, again), reference)
    assert again.reused == 3 + resumed.written and again.written == 0


def test_changed_inputs_never_match_a_stored_batch(model, tokenizer, conditions, counted_generate, tmp_path):
    folder = ResumeFolder(tmp_path / "resume")
    _sweep(model, tokenizer, conditions, folder)
    n_batches = folder.written

    other_model = ResumeFolder(folder.path)
    counted_generate["calls"] = 0
    _sweep(model, tokenizer, conditions, other_model, fingerprint="another-model")
    assert other_model.reused == 0 and counted_generate["calls"] == n_batches

    # One steered vector changes: only the batches that carry it are generated again.
    changed = list(conditions)
    index = next(i for i, c in enumerate(changed) if c.kind == "emotion" and c.alpha == 1.0)
    changed[index] = dataclasses.replace(changed[index], vector=changed[index].vector * 1.5)
    partial = ResumeFolder(folder.path)
    counted_generate["calls"] = 0
    _sweep(model, tokenizer, changed, partial)
    assert 0 < counted_generate["calls"] < n_batches
    assert partial.reused == n_batches - counted_generate["calls"]


def test_an_unreadable_batch_is_generated_again_and_reported(
    model, tokenizer, conditions, reference, counted_generate, tmp_path
):
    folder = ResumeFolder(tmp_path / "resume")
    _sweep(model, tokenizer, conditions, folder)
    files = sorted(folder.path.glob("*.json"))
    files[0].write_text("{ not json", encoding="utf-8")
    files[1].write_text(json.dumps({"key": files[1].stem, "value": [["only one row", 3]]}), encoding="utf-8")

    again = ResumeFolder(folder.path)
    counted_generate["calls"] = 0
    pd.testing.assert_frame_equal(_sweep(model, tokenizer, conditions, again), reference)
    assert counted_generate["calls"] == 2 and again.written == 2
    assert len(again.unreadable) == 2 and any("instead of" in line for line in again.unreadable)
    assert again.describe()["batches_reused"] == len(files) - 2


def test_a_cache_needs_the_model_fingerprint(model, tokenizer, conditions, tmp_path):
    with pytest.raises(ValueError, match="fingerprint"):
        _sweep(model, tokenizer, conditions, ResumeFolder(tmp_path), fingerprint="")


def test_log_likelihood_batches_resume_and_the_prompt_boundary_is_part_of_the_key(model, tokenizer, tmp_path):
    prompts = ["Thank you", "Hi there", "Sorry", "The weather is"]
    continuations = [" so much.", " friend", "", " nice today"]
    plain = continuation_logprob(model, tokenizer, prompts, continuations, batch_size=2)
    folder = ResumeFolder(tmp_path / "resume")
    first = continuation_logprob(
        model, tokenizer, prompts, continuations, batch_size=2, cache=folder, fingerprint=FINGERPRINT
    )
    pd.testing.assert_frame_equal(first, plain)
    assert folder.written == 2  # the empty continuation is not scored

    class NoForward(torch.nn.Module):
        """Raises if the model is run: every batch must come from the folder."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def parameters(self, recurse: bool = True):
            return self.inner.parameters(recurse)

        def forward(self, *args, **kwargs):
            raise Interrupted("the model ran although every batch was stored")

    again = ResumeFolder(folder.path)
    second = continuation_logprob(
        NoForward(model),
        tokenizer,
        prompts,
        continuations,
        batch_size=2,
        cache=again,
        fingerprint=FINGERPRINT,
    )
    pd.testing.assert_frame_equal(second, plain)
    assert again.reused == 2

    # The same token ids split differently between prompt and continuation score other tokens.
    ids = torch.tensor([[1, 5, 6, 7]])
    mask = torch.ones_like(ids)
    assert batch_key("k", "f", {}, ids, mask, torch.tensor([1])) != batch_key(
        "k", "f", {}, ids, mask, torch.tensor([2])
    )


def test_the_resume_folder_sits_outside_every_artifact_folder_and_is_checked(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    path = store.resume_path("smoke", "residual_patching", "smollm2-135m")
    assert path == tmp_path / ".resume" / "smoke" / "residual_patching" / "smollm2-135m"
    with pytest.raises(UnsafePathError, match="Partition"):
        store.resume_path("smoke", "residual_patching", "../escape")
    folder = ResumeFolder.of(store, "smoke", "residual_patching", "smollm2-135m")
    folder.put("ab12", ["x"])
    assert folder.get("ab12", lambda value: value == ["x"], "one row") == ["x"]
    with pytest.raises(ValueError, match="hex digest"):
        folder.get("../../etc/passwd", lambda value: True, "anything")
    other = ResumeFolder.of(store, "smoke", "residual_patching", "minilm-l6")
    other.put("cd34", [1])
    folder.clear()
    assert not path.exists() and other.path.is_dir()  # another partition's batches stay
    other.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".resume"] and not any(
        (tmp_path / ".resume").iterdir()
    )


def tiny_model_handle():
    """What a worker process loads: the fixtures' tiny model (seeded, so the same weights)."""
    from types import SimpleNamespace

    return SimpleNamespace(model=tiny_llama())


def test_log_likelihood_batches_in_worker_processes_give_the_same_numbers_and_resume(
    model, tokenizer, tmp_path
):
    from types import SimpleNamespace

    from emotion_assets.science.parallel import ModelWorkers

    prompts = ["Thank you", "Hi there", "Sorry", "The weather is", "Thank you", "Why"]
    continuations = [" so much.", " friend", "", " nice today", " again", " not?"]
    plain = continuation_logprob(model, tokenizer, prompts, continuations, batch_size=2)
    folder = ResumeFolder(tmp_path / "resume")
    with ModelWorkers(SimpleNamespace(model=model), tiny_model_handle, 2) as workers:
        spread = continuation_logprob(
            model, tokenizer, prompts, continuations, batch_size=2, cache=folder, fingerprint=FINGERPRINT,
            workers=workers,
        )  # fmt: skip
        assert workers.count == 2
    pd.testing.assert_frame_equal(spread, plain)
    assert folder.written == 3  # 5 scored pairs in batches of 2, each batch stored as it finished
    again = ResumeFolder(folder.path)
    resumed = continuation_logprob(
        model, tokenizer, prompts, continuations, batch_size=2, cache=again, fingerprint=FINGERPRINT
    )
    pd.testing.assert_frame_equal(resumed, plain)
    assert again.reused == 3 and again.written == 0
