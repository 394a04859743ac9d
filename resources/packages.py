"""Where an installed Python package lives, without importing it (models and scorers ship as packages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def installed_package_dir(package: str) -> Path | None:
    """The folder of the installed package ``package`` (not imported), or None when it is not installed."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))
