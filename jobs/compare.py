"""Compare two results trees file by file, with numeric tolerance, and report every difference.

Run ``python -m jobs.compare RESULTS_A RESULTS_B --help`` for the command line.
"""

from __future__ import annotations

import argparse
import filecmp
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VERSIONS_DIR = ".versions"  # resources.storage.VERSIONS_DIR, not imported so the command stays light
RESUME_DIR = ".resume"  # resources.storage.RESUME_DIR
DEFAULT_IGNORE = ("run_timings.*", "run_timings", "manifest.json", "*.lock", "*.png", ".tmp-*")
DEFAULT_IGNORE_KEYS = (
    "started_at",
    "run_id",
    "elapsed_s",
    "load_seconds",
    "source_cached",
    "throughput_per_s",
    "timing_*",
)
ROOT_TOKEN = "<root>"
TABLE_SUFFIXES = {".parquet", ".csv"}
TEXT_SUFFIXES = {".md", ".txt", ".html"}
CHUNK_ELEMENTS = 1 << 22
SNIPPET = 80


class Unreadable(Exception):
    """A file on one side could not be read or parsed."""


@dataclass(frozen=True)
class Difference:
    """One difference inside a file present on both sides."""

    path: str
    key: str
    detail: str
    max_abs: float | None = None
    max_rel: float | None = None

    def line(self) -> str:
        return f"DIFF {self.path} :: {self.key} :: {self.detail}"


@dataclass(frozen=True)
class FileError:
    """A file that exists on both sides but could not be read on at least one of them."""

    path: str
    message: str

    def line(self) -> str:
        return f"ERROR {self.path}: {self.message}"


@dataclass
class CompareReport:
    """Outcome of :func:`compare_trees`; paths are relative to the roots, in POSIX form."""

    root_a: str
    root_b: str
    atol: float
    rtol: float
    identical: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    missing_in_a: list[str] = field(default_factory=list)
    missing_in_b: list[str] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return len(self.identical) + len(self.different) + self.n_missing + len(self.errors)

    @property
    def n_missing(self) -> int:
        return len(self.missing_in_a) + len(self.missing_in_b)

    @property
    def same(self) -> bool:
        return self.n_files == len(self.identical)

    def lines(self) -> list[str]:
        """Report lines ordered by path; within a file, in the order found."""
        entries: list[tuple[str, str]] = [(p, f"MISSING in A: {p}") for p in self.missing_in_a]
        entries += [(p, f"MISSING in B: {p}") for p in self.missing_in_b]
        entries += [(e.path, e.line()) for e in self.errors]
        entries += [(d.path, d.line()) for d in self.differences]
        return [line for _, line in sorted(entries, key=lambda entry: entry[0])]

    def summary(self) -> str:
        return (
            f"compared {self.n_files} files: {len(self.identical)} identical, {len(self.different)} different, "
            f"{self.n_missing} missing, {len(self.errors)} unreadable"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (non-finite numbers as strings)."""
        return {
            **_json_safe(asdict(self)),
            "summary": {
                "files": self.n_files,
                "identical": len(self.identical),
                "different": len(self.different),
                "missing": self.n_missing,
                "unreadable": len(self.errors),
                "same": self.same,
            },
        }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class _Context:
    atol: float
    rtol: float
    ignore_keys: tuple[str, ...]
    roots_a: tuple[str, ...]
    roots_b: tuple[str, ...]

    def key_ignored(self, key: object) -> bool:
        return any(fnmatch.fnmatchcase(str(key), pattern) for pattern in self.ignore_keys)

    def normalise(self, text: str, side: str) -> str:
        for root in self.roots_a if side == "A" else self.roots_b:
            text = text.replace(root, ROOT_TOKEN)
        return text


_Found = tuple[str, str, float | None, float | None]  # key, detail, max_abs, max_rel


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _snippet(value: object) -> str:
    text = repr(value)
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."


class _Stats:
    """Running mismatch statistics of ``np.isclose(a, b, rtol, atol, equal_nan=True)`` over chunks."""

    def __init__(self, atol: float, rtol: float, exact: bool) -> None:
        self.atol, self.rtol, self.exact = atol, rtol, exact
        self.total = self.bad = self.nonfinite = 0
        self.max_abs = self.max_rel = 0.0
        self.first: int | None = None

    def update(self, a: np.ndarray, b: np.ndarray, offset: int = 0) -> None:
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        self.total += a.size
        with np.errstate(all="ignore"):
            if not self.exact:
                a, b = _as_float(a), _as_float(b)
            bad = (
                (a != b) if self.exact else ~np.isclose(a, b, rtol=self.rtol, atol=self.atol, equal_nan=True)
            )
            if not bad.any():
                return
            where = np.flatnonzero(bad)
            if self.first is None:
                self.first = offset + int(where[0])
            self.bad += where.size
            av, bv = _as_float(a[where]), _as_float(b[where])
            finite = np.isfinite(av) & np.isfinite(bv)
            self.nonfinite += int((~finite).sum())
            if not finite.all():  # NaN or inf on one side only: the difference has no finite size
                self.max_abs = self.max_rel = math.inf
            if finite.any():
                diff = np.abs(av[finite] - bv[finite])
                ref = np.abs(bv[finite])
                rel = np.where(ref > 0, diff / np.where(ref > 0, ref, 1.0), np.inf)
                self.max_abs = max(self.max_abs, float(diff.max()))
                self.max_rel = max(self.max_rel, float(rel.max()))

    def found(self, key: str, shape: Sequence[int] | None = None, label: str = "first") -> _Found | None:
        if not self.bad:
            return None
        first: object = self.first
        if shape is not None and len(shape) != 1 and self.first is not None:
            first = [int(i) for i in np.unravel_index(self.first, tuple(shape))]
        detail = (
            f"max_abs={_fmt(self.max_abs)}, max_rel={_fmt(self.max_rel)}, "
            f"mismatched={self.bad}/{self.total}, {label}={first}"
        )
        if self.nonfinite:
            detail += f", nan/inf mismatches={self.nonfinite}"
        return key, detail, self.max_abs, self.max_rel


def _as_float(values: np.ndarray) -> np.ndarray:
    return values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)


def _is_exact_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "biu"


# ---------------------------------------------------------------- arrays


def _compare_chunked(
    key: str,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    dtype_a: str,
    dtype_b: str,
    exact: bool,
    read: Callable[[str, int, int], tuple[np.ndarray, np.ndarray]],
    ctx: _Context,
) -> Iterator[_Found]:
    """Compare two arrays read in row chunks by ``read(key, start, stop)``."""
    if dtype_a != dtype_b:
        yield key, f"dtype {dtype_a} vs {dtype_b}", None, None
    if shape_a != shape_b:
        yield key, f"shape {list(shape_a)} vs {list(shape_b)}", None, None
        return
    stats = _Stats(ctx.atol, ctx.rtol, exact)
    if len(shape_a) == 0:
        a, b = read(key, 0, 0)
        stats.update(a, b)
    else:
        per_row = int(np.prod(shape_a[1:], dtype=np.int64))
        step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
        for start in range(0, shape_a[0], step):
            a, b = read(key, start, min(start + step, shape_a[0]))
            stats.update(a, b, offset=start * per_row)
    found = stats.found(key, shape_a)
    if found:
        yield found


def _load(side: str, loader: Callable[[], Any]) -> Any:
    try:
        return loader()
    except Exception as exc:
        raise Unreadable(f"{side}: {type(exc).__name__}: {exc}") from exc


def _load_both(reader: Callable[[Path], Any], path_a: Path, path_b: Path) -> tuple[Any, Any]:
    """Read both sides; if either fails, raise one :class:`Unreadable` naming every failing side."""
    loaded, problems = [], []
    for side, path in (("A", path_a), ("B", path_b)):
        try:
            loaded.append(_load(side, lambda path=path: reader(path)))
        except Unreadable as exc:
            problems.append(str(exc))
    if problems:
        raise Unreadable("; ".join(problems))
    return loaded[0], loaded[1]


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype.is_floating_point:
        return tensor.to(torch.float64).numpy()
    return tensor.numpy()


def _compare_safetensors(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    from safetensors import safe_open

    fa, fb = _load_both(lambda path: safe_open(str(path), framework="pt"), path_a, path_b)
    handles = {"A": fa, "B": fb}
    with fa, fb:
        meta_a, meta_b = fa.metadata() or {}, fb.metadata() or {}
        yield from _json_diffs(meta_a, meta_b, "__metadata__", ctx)
        keys_a, keys_b = set(fa.keys()), set(fb.keys())
        for key in sorted(keys_a - keys_b):
            yield key, "missing in B", None, None
        for key in sorted(keys_b - keys_a):
            yield key, "missing in A", None, None

        def read(key: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            out = []
            for side in ("A", "B"):
                handle = handles[side]
                scalar = not handle.get_slice(key).get_shape()
                tensor = handle.get_tensor(key) if scalar else handle.get_slice(key)[start:stop]
                out.append(_load(side, lambda t=tensor: _torch_to_numpy(t)))
            return out[0], out[1]

        for key in sorted(keys_a & keys_b):
            sa, sb = fa.get_slice(key), fb.get_slice(key)
            da, db = sa.get_dtype(), sb.get_dtype()
            exact = all(d == "BOOL" or d[0] in "IU" for d in (da, db))  # BOOL, I8..I64, U8..U64
            yield from _compare_chunked(
                key, tuple(sa.get_shape()), tuple(sb.get_shape()), da, db, exact, read, ctx
            )


def _compare_numpy_arrays(key: str, a: np.ndarray, b: np.ndarray, ctx: _Context) -> Iterator[_Found]:
    exact = _is_exact_dtype(a.dtype) and _is_exact_dtype(b.dtype)
    numeric = a.dtype.kind in "biufc" and b.dtype.kind in "biufc"
    if not numeric:
        if a.dtype != b.dtype:
            yield key, f"dtype {a.dtype} vs {b.dtype}", None, None
        elif a.shape != b.shape:
            yield key, f"shape {list(a.shape)} vs {list(b.shape)}", None, None
        elif not np.array_equal(a, b):
            yield key, "values differ (non-numeric dtype, compared exactly)", None, None
        return

    def read(_: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if a.ndim == 0:
            return np.asarray(a), np.asarray(b)
        return np.asarray(a[start:stop]), np.asarray(b[start:stop])

    yield from _compare_chunked(key, a.shape, b.shape, str(a.dtype), str(b.dtype), exact, read, ctx)


def _compare_npy(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    a, b = _load_both(lambda path: np.load(path, mmap_mode="r", allow_pickle=False), path_a, path_b)
    yield from _compare_numpy_arrays("<array>", a, b, ctx)


def _compare_npz(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    a, b = _load_both(lambda path: dict(np.load(path, allow_pickle=False)), path_a, path_b)
    for key in sorted(set(a) - set(b)):
        yield key, "missing in B", None, None
    for key in sorted(set(b) - set(a)):
        yield key, "missing in A", None, None
    for key in sorted(set(a) & set(b)):
        yield from _compare_numpy_arrays(key, a[key], b[key], ctx)


# ---------------------------------------------------------------- JSON-like values


def _plain(value: Any) -> Any:
    """Arrays and numpy scalars as Python lists and numbers, for recursive comparison."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_child(path: str, key: object) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key) if isinstance(key, str) else key}]"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_diff(a: float, b: float, path: str, ctx: _Context) -> _Found | None:
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return None
    both_int = isinstance(a, int) and isinstance(b, int)
    finite = math.isfinite(a) and math.isfinite(b)
    if not both_int and finite and abs(a - b) <= ctx.atol + ctx.rtol * abs(b):
        return None
    diff = float(abs(a - b)) if finite else math.inf
    rel = diff / abs(b) if b else math.inf
    return path, f"max_abs={_fmt(diff)}, max_rel={_fmt(rel)}, A={a!r}, B={b!r}", diff, rel


def _json_diffs(a: Any, b: Any, path: str, ctx: _Context) -> Iterator[_Found]:
    """Differences between two JSON-like values, keyed by JSON path."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if ctx.key_ignored(key):
                continue
            child = _json_child(path, key)
            if key not in b:
                yield child, "missing in B", None, None
            elif key not in a:
                yield child, "missing in A", None, None
            else:
                yield from _json_diffs(a[key], b[key], child, ctx)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            yield path, f"list length {len(a)} vs {len(b)}", None, None
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from _json_diffs(x, y, f"{path}[{i}]", ctx)
    elif _is_number(a) and _is_number(b):
        found = _number_diff(a, b, path, ctx)
        if found:
            yield found
    elif isinstance(a, str) and isinstance(b, str):
        na, nb = ctx.normalise(a, "A"), ctx.normalise(b, "B")
        if a != b and na != nb:
            yield path, f"A={_snippet(na)} B={_snippet(nb)}", None, None
    elif type(a) is not type(b):
        yield (
            path,
            f"type {type(a).__name__} vs {type(b).__name__}: A={_snippet(a)} B={_snippet(b)}",
            None,
            None,
        )
    elif a != b:
        yield path, f"A={_snippet(a)} B={_snippet(b)}", None, None


def _compare_json(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    a, b = _load_both(lambda path: json.loads(path.read_text(encoding="utf-8")), path_a, path_b)
    yield from _json_diffs(a, b, "$", ctx)


def _read_jsonl(path: Path) -> list[Any]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _compare_jsonl(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    a, b = _load_both(_read_jsonl, path_a, path_b)
    yield from _json_diffs(a, b, "$", ctx)


# ---------------------------------------------------------------- tables


def _cells_equal(x: Any, y: Any, ctx: _Context) -> bool:
    if isinstance(x, dict) or isinstance(y, dict) or np.ndim(x) or np.ndim(y):
        return next(_json_diffs(x, y, "", ctx), None) is None
    x_na, y_na = bool(pd.isna(x)), bool(pd.isna(y))
    if x_na or y_na:
        return x_na and y_na
    if isinstance(x, str) and isinstance(y, str):
        return x == y or ctx.normalise(x, "A") == ctx.normalise(y, "B")
    if isinstance(x, str) or isinstance(y, str):
        return False
    return bool(x == y)


def _compare_column(name: str, a: pd.Series, b: pd.Series, ctx: _Context) -> Iterator[_Found]:
    numeric_a = pd.api.types.is_numeric_dtype(a) and not pd.api.types.is_bool_dtype(a)
    numeric_b = pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b)
    if numeric_a != numeric_b:
        yield name, f"dtype {a.dtype} vs {b.dtype}", None, None
        return
    if numeric_a:
        exact = all(pd.api.types.is_integer_dtype(s) and not s.isna().any() for s in (a, b))
        va = a.to_numpy() if exact else a.to_numpy(dtype=np.float64, na_value=np.nan)
        vb = b.to_numpy() if exact else b.to_numpy(dtype=np.float64, na_value=np.nan)
        stats = _Stats(ctx.atol, ctx.rtol, exact)
        stats.update(va, vb)
        found = stats.found(name, label="first_row")
        if found:
            yield found
        return
    cells_a, cells_b = a.tolist(), b.tolist()
    for row, (x, y) in enumerate(zip(cells_a, cells_b, strict=True)):
        if not _cells_equal(x, y, ctx):
            mismatched = sum(not _cells_equal(p, q, ctx) for p, q in zip(cells_a, cells_b, strict=True))
            yield (
                name,
                f"values differ: mismatched={mismatched}/{len(a)}, first_row={row}, "
                f"A={_snippet(x)} B={_snippet(y)}",
                None,
                None,
            )
            return


def _has_default_index(frame: pd.DataFrame) -> bool:
    index = frame.index
    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1


def _compare_frames(fa: pd.DataFrame, fb: pd.DataFrame, ctx: _Context) -> Iterator[_Found]:
    cols_a = [c for c in fa.columns if not ctx.key_ignored(c)]
    cols_b = [c for c in fb.columns if not ctx.key_ignored(c)]
    for column in (c for c in cols_a if c not in set(cols_b)):
        yield str(column), "column missing in B", None, None
    for column in (c for c in cols_b if c not in set(cols_a)):
        yield str(column), "column missing in A", None, None
    if len(fa) != len(fb):
        yield "<rows>", f"row count {len(fa)} vs {len(fb)}", None, None
        return
    if not (_has_default_index(fa) and _has_default_index(fb)):
        yield from _compare_column("<index>", fa.index.to_series(), fb.index.to_series(), ctx)
    common = [c for c in cols_a if c in set(cols_b)]
    for column in common:
        a, b = fa[column], fb[column]
        if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
            yield str(column), "duplicate column name", None, None
            continue
        yield from _compare_column(str(column), a.reset_index(drop=True), b.reset_index(drop=True), ctx)


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, low_memory=False)


def _compare_table(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    fa, fb = _load_both(_read_table, path_a, path_b)
    yield from _compare_frames(fa, fb, ctx)


# ---------------------------------------------------------------- text and bytes


def _compare_text(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    a, b = _load_both(lambda path: path.read_text(encoding="utf-8"), path_a, path_b)
    lines_a = ctx.normalise(a, "A").splitlines()
    lines_b = ctx.normalise(b, "B").splitlines()
    for number, (x, y) in enumerate(zip(lines_a, lines_b, strict=False), start=1):
        if x != y:
            yield f"line {number}", f"A={_snippet(x)} B={_snippet(y)}", None, None
            return
    if len(lines_a) != len(lines_b):
        yield (
            f"line {min(len(lines_a), len(lines_b)) + 1}",
            f"line count {len(lines_a)} vs {len(lines_b)}",
            None,
            None,
        )
    elif ctx.normalise(a, "A") != ctx.normalise(b, "B"):
        yield "<text>", "line endings or trailing newline differ", None, None


def _first_byte_difference(path_a: Path, path_b: Path) -> int:
    offset = 0
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
                    if x != y:
                        return offset + i
                return offset + min(len(ca), len(cb))
            if not ca:
                return offset
            offset += len(ca)


def _compare_bytes(path_a: Path, path_b: Path, ctx: _Context) -> Iterator[_Found]:
    size_a, size_b = _load_both(lambda path: path.stat().st_size, path_a, path_b)
    offset = _load("A/B", lambda: _first_byte_difference(path_a, path_b))
    yield "<bytes>", f"sizes {size_a} vs {size_b} bytes, first difference at byte {offset}", None, None


COMPARERS: dict[str, Callable[[Path, Path, _Context], Iterator[_Found]]] = {
    ".safetensors": _compare_safetensors,
    ".npy": _compare_npy,
    ".npz": _compare_npz,
    ".parquet": _compare_table,
    ".csv": _compare_table,
    ".json": _compare_json,
    ".jsonl": _compare_jsonl,
    **dict.fromkeys(TEXT_SUFFIXES, _compare_text),
}


# ---------------------------------------------------------------- walking


def _ignored(relative: str, patterns: Sequence[str]) -> bool:
    parts = relative.split("/")
    candidates = [relative, *parts]
    return any(fnmatch.fnmatchcase(c, pattern) for pattern in patterns for c in candidates)


def _walk(root: Path) -> set[str]:
    """Files by reader path: version pointers (symlinks) are followed, the stored versions behind them and
    the store's own bookkeeping (``.versions``) are not walked twice, and the batches an unfinished run
    left for resuming (``.resume``) are not results."""
    files: set[str] = set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if d not in (VERSIONS_DIR, RESUME_DIR)]
        for name in names:
            files.add((Path(directory) / name).relative_to(root).as_posix())
    return files


def _root_forms(root: Path) -> tuple[str, ...]:
    """Absolute spellings of a root (a relative one would also match ordinary words)."""
    forms = {str(root.absolute()), str(root.resolve()), root.resolve().as_posix()}
    return tuple(sorted(forms, key=len, reverse=True))


def _check_tolerance(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def compare_trees(
    a: Path,
    b: Path,
    atol: float = 1e-3,
    rtol: float = 1e-4,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    ignore_keys: Sequence[str] = DEFAULT_IGNORE_KEYS,
) -> CompareReport:
    """Compare every file under ``a`` with the file at the same relative path under ``b``.

    Raises ``ValueError`` for a root that is not a directory or a negative/non-finite tolerance;
    problems with individual files end up in the report instead.
    """
    a, b = Path(a), Path(b)
    for label, root in (("A", a), ("B", b)):
        if not root.exists():
            raise ValueError(f"results tree {label} does not exist: {root}")
        if not root.is_dir():
            raise ValueError(f"results tree {label} is not a directory: {root}")
    _check_tolerance("atol", atol)
    _check_tolerance("rtol", rtol)
    ctx = _Context(atol, rtol, tuple(ignore_keys), _root_forms(a), _root_forms(b))
    report = CompareReport(root_a=str(a), root_b=str(b), atol=atol, rtol=rtol)
    files_a, files_b = _walk(a), _walk(b)
    for relative in sorted(files_a | files_b):
        if _ignored(relative, ignore):
            report.ignored.append(relative)
        elif relative not in files_b:
            report.missing_in_b.append(relative)
        elif relative not in files_a:
            report.missing_in_a.append(relative)
        else:
            _compare_file(relative, a / relative, b / relative, ctx, report)
    return report


def _compare_file(relative: str, path_a: Path, path_b: Path, ctx: _Context, report: CompareReport) -> None:
    try:
        if filecmp.cmp(path_a, path_b, shallow=False):
            report.identical.append(relative)
            return
    except OSError:
        pass  # the comparer below reports which side cannot be read
    comparer = COMPARERS.get(path_a.suffix.lower(), _compare_bytes)
    try:
        found = [Difference(relative, *item) for item in comparer(path_a, path_b, ctx)]
    except Unreadable as exc:
        report.errors.append(FileError(relative, str(exc)))
        return
    except Exception as exc:
        report.errors.append(FileError(relative, f"{type(exc).__name__}: {exc}"))
        return
    if found:
        report.different.append(relative)
        report.differences.extend(found)
    else:
        report.identical.append(relative)


# ---------------------------------------------------------------- command line

DESCRIPTION = """\
Compare two results trees (results/<profile>/<asset>/<model>/...) file by file, by relative path,
and report every difference beyond tolerance.

What is compared, by file type:
  .safetensors   every tensor key: keys missing on either side, shape and dtype, values;
                 the header metadata like JSON
  .npy / .npz    arrays (loaded without pickle), like tensors
  .parquet/.csv  columns missing on either side, row count, then each column: numeric columns with
                 tolerance, other columns exactly; reports the max diff and the first differing row
  .json/.jsonl   recursively: keys missing on either side (with their JSON path), numbers with
                 tolerance, strings/bools/nulls exactly, list lengths
  .md/.txt/.html exact text; reports the first differing line
  anything else  byte for byte

Numbers are equal when |a - b| <= atol + rtol * |b| (np.allclose semantics, B is the reference);
NaN equals NaN at the same position. Integers (ints in JSON, integer/bool tensors and columns) are
compared exactly. Files with identical bytes are identical without being parsed.

Run-to-run noise that is not reported:
  * strings in JSON, tables, tensor metadata and text files have each tree's own root path
    replaced by "<root>" before comparison;
  * JSON keys, table columns and tensor metadata keys matching an --ignore-key glob are skipped
    (default: %(keys)s);
  * files matching an --ignore glob are skipped (default: %(globs)s):
    timing tables and lock files record wall-clock time and pictures are re-rendered on every run,
    so both legitimately differ; .tmp-* are leftovers of interrupted atomic writes.
  --include-timings (same as --no-default-ignores) turns both default lists off.

Output: one line per difference, then a summary line:
  DIFF path :: key/column :: max_abs=..., max_rel=...
  MISSING in A|B: path        (the file exists only in the other tree)
  ERROR path: message         (unreadable or corrupt file; the walk goes on)
  compared N files: X identical, Y different, Z missing, W unreadable
"""

EPILOG = """\
exit codes:
  0  the trees are the same within tolerance
  1  at least one difference, missing file or unreadable file
  2  bad input: a root that does not exist or is not a directory, a bad tolerance or option
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.compare",
        description=DESCRIPTION
        % {"keys": ", ".join(DEFAULT_IGNORE_KEYS), "globs": ", ".join(DEFAULT_IGNORE)},
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results_a", metavar="RESULTS_A", type=Path, help="first results tree (A)")
    parser.add_argument(
        "results_b", metavar="RESULTS_B", type=Path, help="second results tree (B, the reference)"
    )
    parser.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance (default: %(default)g)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default: %(default)g)")
    parser.add_argument(
        "--ignore",
        metavar="GLOB",
        action="append",
        default=[],
        help="skip files whose relative path, file name or any directory name matches GLOB; repeatable; "
        "added to the defaults",
    )
    parser.add_argument(
        "--no-default-ignores",
        "--include-timings",
        dest="default_ignores",
        action="store_false",
        help="turn all defaults off: compare the files and the keys skipped by default (timings included)",
    )
    parser.add_argument(
        "--ignore-key",
        metavar="GLOB",
        action="append",
        default=[],
        help="skip JSON keys, table columns and tensor metadata keys matching GLOB; repeatable; "
        "added to the defaults",
    )
    parser.add_argument(
        "--no-default-ignore-keys",
        dest="default_ignore_keys",
        action="store_false",
        help="turn only the default --ignore-key globs off",
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the full report as JSON to OUT")
    parser.add_argument(
        "--max-report",
        metavar="N",
        type=int,
        default=200,
        help="print at most N difference lines (0: all; the JSON report always has all; default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_report < 0:
        parser.error("--max-report must be >= 0")
    ignore = [*(DEFAULT_IGNORE if args.default_ignores else ()), *args.ignore]
    default_keys = args.default_ignores and args.default_ignore_keys
    ignore_keys = [*(DEFAULT_IGNORE_KEYS if default_keys else ()), *args.ignore_key]
    try:
        report = compare_trees(args.results_a, args.results_b, args.atol, args.rtol, ignore, ignore_keys)
    except ValueError as exc:
        parser.error(str(exc))
    lines = report.lines()
    shown = lines if args.max_report == 0 else lines[: args.max_report]
    for line in shown:
        print(line)
    if len(shown) < len(lines):
        print(f"... {len(lines) - len(shown)} more lines not shown (raise --max-report or use --json)")
    print(report.summary())
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8"
            )
        except OSError as exc:
            print(f"error: cannot write JSON report to {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0 if report.same else 1


if __name__ == "__main__":
    sys.exit(main())
