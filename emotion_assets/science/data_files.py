"""The package's data files (``emotion_assets/science/data/*.yaml``): word lists, cue lists and label sets.

Each file is read once per process (:func:`load_data_file` is cached) and checked where it is used, so a
missing, malformed or incomplete file fails with an error that names it and the entry to fix.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from emotion_assets.yaml_loading import load_yaml

DATA_PACKAGE = "emotion_assets.science"
DATA_FOLDER = "data"


class DataFileError(ValueError):
    """A packaged data file is missing, is not valid YAML or lacks an entry the code needs."""


def data_file_path(name: str) -> Path:
    """Path of ``emotion_assets/science/data/<name>`` inside the installed package."""
    return Path(str(resources.files(DATA_PACKAGE).joinpath(DATA_FOLDER, name)))


@functools.cache
def load_data_file(name: str) -> dict[str, Any]:
    """The top-level mapping of the data file ``name`` (read once per process)."""
    path = data_file_path(name)
    fix = "reinstall the package (its data files ship as package data) or restore the file from git"
    if not path.is_file():
        raise DataFileError(f"Data file {path} does not exist; {fix}.")
    data = load_yaml(path, error=DataFileError, label="Data file")
    if not isinstance(data, dict):
        raise DataFileError(
            f"Data file {path} must hold a mapping at the top level, got {type(data).__name__}."
        )
    return data


def entry(name: str, *keys: str) -> Any:
    """The value at ``keys`` (one key per nesting level) in data file ``name``; an error names what is missing."""
    value: Any = load_data_file(name)
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(keys[: depth + 1])
            raise DataFileError(f"Data file {data_file_path(name)} has no entry {where!r}; add it.")
        value = value[key]
    return value


def string_list(name: str, *keys: str) -> tuple[str, ...]:
    """The entry at ``keys`` as a non-empty tuple of strings, in file order."""
    value = entry(name, *keys)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise DataFileError(
            f"Data file {data_file_path(name)}: entry {'.'.join(keys)!r} must be a non-empty list of "
            f"non-empty strings, got {value!r}. Quote entries YAML would read as another type."
        )
    return tuple(value)
