"""Shared fixtures: offline Hugging Face, temporary results roots, tiny models saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

# The profile partition dimension is read from data/profiles.yaml when emotion_assets.partitions is first
# imported. Import it before any test points EMOTION_PROFILES at a temporary file, so that the order the
# tests run in cannot change it (a test of a one-profile file run first left `smoke` with its batch size).
import emotion_assets.partitions  # noqa: F401


@pytest.fixture
def results_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "results"
    root.mkdir()
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(root))
    return root


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny random Llama (GQA) plus byte tokenizer saved as a transformers folder."""
    from tests.tiny_models import byte_tokenizer, tiny_llama

    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
