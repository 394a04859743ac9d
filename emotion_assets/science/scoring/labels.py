"""Label sets of the emotion scorers, read from ``emotion_assets/science/data/emotion_labels.yaml``."""

from __future__ import annotations

import functools

from emotion_assets.science.data_files import DataFileError, data_file_path, entry, string_list

LABELS_FILE = "emotion_labels.yaml"


@functools.cache
def nrc_affects() -> tuple[str, ...]:
    """Affects of the NRC Emotion Lexicon, in column order."""
    return string_list(LABELS_FILE, "nrc_affects")


@functools.cache
def go_emotions_labels() -> tuple[str, ...]:
    """GoEmotions labels, in the classifier's label order."""
    return string_list(LABELS_FILE, "go_emotions")


@functools.cache
def known_transformer_labels() -> dict[str, tuple[str, ...]]:
    """{Hugging Face id: its labels} of known classifiers, to declare NaN columns when one is unavailable."""
    table = entry(LABELS_FILE, "known_transformers")
    if not isinstance(table, dict):
        raise DataFileError(
            f"Data file {data_file_path(LABELS_FILE)}: 'known_transformers' must be a mapping."
        )
    return {
        str(model_id): (
            go_emotions_labels()
            if labels == "go_emotions"
            else string_list(LABELS_FILE, "known_transformers", model_id)
        )
        for model_id, labels in table.items()
    }
