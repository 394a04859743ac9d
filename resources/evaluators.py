"""Evaluator resource: loads the text scorers of a profile once per process and shares them across assets."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import dagster as dg

from emotion_assets.science.scoring import EvaluatorSuite, build_suite
from resources.device import resolve_device
from resources.storage import json_sha256

_SUITES: dict[tuple[str, str, str], EvaluatorSuite] = {}
_LOCK = threading.Lock()
_LOAD_COUNT = 0


def load_count() -> int:
    """How many evaluator suites this process has built (cache misses)."""
    return _LOAD_COUNT


def clear_cache() -> None:
    """Drop every cached suite (tests, or to free memory)."""
    with _LOCK:
        _SUITES.clear()


def _training_hash(texts: Sequence[str], labels: Sequence[str], seed: int) -> str:
    return json_sha256({"texts": list(texts), "labels": list(labels), "seed": int(seed)})


def _spec_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


class EvaluatorResource(dg.ConfigurableResource):
    """Builds the evaluator suite for a profile, cached per (spec, training data, device) in this process."""

    device: str = "auto"
    batch_size: int = 64

    def suite(
        self, spec: dict[str, Any], train_texts: list[str], train_labels: list[str], seed: int
    ) -> EvaluatorSuite:
        """The loaded suite for ``spec``; the first call loads models and fits, later calls reuse it."""
        global _LOAD_COUNT
        device = resolve_device(self.device)
        key = (_spec_key(spec), _training_hash(train_texts, train_labels, seed), str(device))
        with _LOCK:
            if key not in _SUITES:
                _SUITES[key] = build_suite(
                    spec,
                    device=device,
                    batch_size=self.batch_size,
                    train_texts=train_texts,
                    train_labels=train_labels,
                    seed=seed,
                )
                _LOAD_COUNT += 1
            return _SUITES[key]
