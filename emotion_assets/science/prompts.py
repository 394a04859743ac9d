"""Loading, import and validation of prompt datasets (no Dagster dependency).

Accepted inputs:

- JSONL: one object per line with ``text`` and ``emotion`` (or ``label``); optional ``id``, ``lang``,
  ``register``, ``split`` and ``role``.
- CSV with a header row naming the same columns.
- Per-emotion JSON ``{"prompts": [...]}`` whose items are strings or objects with ``text``; the emotion
  comes from a top-level ``"emotion"`` key, otherwise from the file stem (``anger.json``).
- A directory of such per-emotion JSON files.

``role`` is ``fit`` (the default) or ``steering_prompt``. Fitting prompts fit vectors, subspaces, maps,
probes and classifiers; steering prompts (e.g. unfinished openings such as "Walking home through the park,
they") only serve as starts for steering and patching generations. Steering prompts must be ``neutral``:
steering adds an emotion to a neutral start, so an emotion-labelled start has no use in the pipeline. Class
balance and the per-emotion coverage check count fitting prompts only; duplicates are checked across roles.

Every problem found (encoding, syntax, missing fields, unknown labels, duplicates, near-duplicates, class
balance) is collected first and reported together in one :class:`DatasetError` with file names, line
numbers and a fix for each.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

NEUTRAL = "neutral"  # the class every emotion is contrasted with (vectors, patching, evaluator checks)
EMOTIONS: tuple[str, ...] = ("gratitude", "anger", "apology", NEUTRAL)
SPLITS: tuple[str, ...] = ("train", "eval")
COLUMNS: tuple[str, ...] = ("id", "text", "emotion", "lang", "register", "split", "role", "source_line")
DEFAULT_REGISTER = "unspecified"
# A prompt's role: ``fit`` prompts fit vectors, subspaces, maps, probes and classifiers; ``steering_prompt``
# rows (e.g. unfinished neutral openings) only serve as starts for steering and patching generations.
ROLE_FIT = "fit"
ROLE_STEERING = "steering_prompt"
ROLES: tuple[str, ...] = (ROLE_FIT, ROLE_STEERING)
STEERING_EMOTION = NEUTRAL  # the only emotion whose prompts may have role steering_prompt
MAX_PROBLEMS_SHOWN = 20

_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_OPTIONAL_FIELDS = ("id", "lang", "register", "split", "role")
_APOSTROPHES = frozenset("'\u2019\u02bc")


# --------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One validation problem: where it is, what is wrong and how to fix it."""

    locations: tuple[tuple[str, int], ...]  # (file name, 1-based line); empty for dataset-wide problems
    message: str
    hint: str

    def render(self, default_file: str) -> str:
        """One human-readable line, e.g. ``a.jsonl line 3: malformed JSON (...). Fix: ...``."""
        return f"{_format_locations(self.locations, default_file)}: {self.message}. Fix: {self.hint}"


def _format_locations(locations: Sequence[tuple[str, int]], default_file: str) -> str:
    if not locations:
        return default_file
    files = list(dict.fromkeys(name for name, _ in locations))
    if len(files) == 1:
        lines = [line for _, line in locations]
        label = "line" if len(lines) == 1 else "lines"
        return f"{files[0]} {label} {', '.join(str(n) for n in lines)}"
    return ", ".join(f"{name} line {line}" for name, line in locations)


class DatasetError(ValueError):
    """A prompt dataset failed validation; the message lists every problem with its location and fix."""

    def __init__(self, path: str | Path, problems: Sequence[Problem]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        name = self.path.name or str(self.path)
        n = len(self.problems)
        head = f"Invalid prompt dataset {str(self.path)!r}: {n} problem{'s' if n != 1 else ''}."
        lines = [head] + [f"  - {p.render(name)}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        if n > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {n - MAX_PROBLEMS_SHOWN} more ({n} in total).")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Text normalisation and near-duplicate search


def fitting_mask(frame: pd.DataFrame) -> np.ndarray:
    """True for rows that may fit vectors, subspaces, maps, probes and classifiers (role ``fit``).

    A frame without a ``role`` column (older artifacts) counts every row as a fitting row.
    """
    if "role" not in frame.columns:
        return np.ones(len(frame), dtype=bool)
    return (frame["role"].fillna(ROLE_FIT) == ROLE_FIT).to_numpy()


def normalize_text(text: str) -> str:
    """Unicode-normalise (NFKC), lowercase, strip punctuation and collapse whitespace.

    Apostrophes are dropped (``don't`` → ``dont``); other punctuation separates words (``a—b`` → ``a b``).
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(
        "" if ch in _APOSTROPHES else " " if unicodedata.category(ch).startswith("P") else ch for ch in text
    )
    return " ".join(text.split())


def _trigrams(normalized: str) -> set[str]:
    if len(normalized) < 3:
        return {normalized}
    return {normalized[i : i + 3] for i in range(len(normalized) - 2)}


def find_near_duplicates(texts: Sequence[str], threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, jaccard)`` with ``i < j`` whose character-trigram Jaccard similarity is ≥ threshold.

    Similarity is computed on :func:`normalize_text`. Candidates come from a prefix filter (trigrams
    ordered rarest first; two sets with Jaccard ≥ t share a token within their first
    ``|A| - ceil(t·|A|) + 1`` tokens), found with one sparse matrix product; only candidates get an exact
    Jaccard. This is exact, not approximate, and fast for thousands of texts.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
    n = len(texts)
    if n < 2:
        return []
    sets = [_trigrams(normalize_text(t)) for t in texts]
    doc_freq = Counter(tok for s in sets for tok in s)
    rank = {tok: r for r, tok in enumerate(sorted(doc_freq, key=lambda tok: (doc_freq[tok], tok)))}

    rows: list[int] = []
    cols: list[int] = []
    prefix_rows: list[int] = []
    prefix_cols: list[int] = []
    sizes = np.empty(n, dtype=np.int64)
    for i, s in enumerate(sets):
        ordered = sorted(rank[tok] for tok in s)
        sizes[i] = len(ordered)
        rows.extend([i] * len(ordered))
        cols.extend(ordered)
        p = len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1
        prefix_rows.extend([i] * p)
        prefix_cols.extend(ordered[:p])

    shape = (n, len(rank))
    full = sparse.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=shape)
    prefix = sparse.csr_matrix(
        (np.ones(len(prefix_rows), dtype=np.int32), (prefix_rows, prefix_cols)), shape=shape
    )
    candidates = sparse.triu(prefix @ prefix.T, k=1).tocoo()
    ii, jj = candidates.row.astype(np.int64), candidates.col.astype(np.int64)
    if ii.size == 0:
        return []
    small, large = np.minimum(sizes[ii], sizes[jj]), np.maximum(sizes[ii], sizes[jj])
    keep = small >= threshold * large - 1e-9  # size filter: J ≤ |small| / |large|
    ii, jj = ii[keep], jj[keep]
    if ii.size == 0:
        return []
    inter = np.asarray(full[ii].multiply(full[jj]).sum(axis=1)).ravel().astype(np.float64)
    jaccard = inter / (sizes[ii] + sizes[jj] - inter)
    hit = jaccard >= threshold - 1e-12
    order = np.lexsort((jj[hit], ii[hit]))
    return [
        (int(a), int(b), float(j))
        for a, b, j in zip(ii[hit][order], jj[hit][order], jaccard[hit][order], strict=True)
    ]


# --------------------------------------------------------------------------------------------------------
# Readers: each returns raw records (fields + location) and the problems met while parsing.


@dataclass
class _Record:
    file: str
    line: int
    fields: dict[str, Any]
    default_emotion: str | None = None


@dataclass
class _Parsed:
    records: list[_Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


_UTF8_HINT = "re-save the file as UTF-8 (e.g. 'iconv -f latin1 -t utf-8') or fix the bytes on that line"


def _decode_lines(data: bytes, name: str, parsed: _Parsed) -> list[str]:
    """Split bytes into lines and decode each strictly; undecodable lines become empty (and are reported)."""
    out: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            parsed.problems.append(
                Problem(
                    ((name, number),),
                    f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at column {exc.start + 1}",
                    _UTF8_HINT,
                )
            )
            line = ""
        if number == 1:
            line = line.removeprefix("\ufeff")
        out.append(line)
    return out


def _read_jsonl(path: Path, parsed: _Parsed) -> None:
    name = path.name
    for number, line in enumerate(_decode_lines(path.read_bytes(), name, parsed), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            parsed.problems.append(
                Problem(
                    ((name, number),),
                    f"malformed JSON ({exc.msg} at column {exc.colno})",
                    'write exactly one JSON object per line, e.g. {"text": "...", "emotion": "anger"}',
                )
            )
            continue
        if not isinstance(obj, dict):
            parsed.problems.append(
                Problem(
                    ((name, number),),
                    f"expected a JSON object, found {type(obj).__name__}",
                    'write one object per line with "text" and "emotion" fields',
                )
            )
            continue
        parsed.records.append(_Record(name, number, obj))


def _read_csv(path: Path, parsed: _Parsed) -> None:
    name = path.name
    lines = _decode_lines(path.read_bytes(), name, parsed)
    reader = csv.reader(io.StringIO("\n".join(lines), newline=""))
    header: list[str] | None = None
    header_line = 0
    previous_end = 0
    try:
        for row in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header, header_line = [cell.strip().lower() for cell in row], start
                missing = [c for c in ("text",) if c not in header]
                if "emotion" not in header and "label" not in header:
                    missing.append("emotion (or label)")
                if missing:
                    parsed.problems.append(
                        Problem(
                            ((name, header_line),),
                            f"header is missing column(s) {', '.join(missing)}; found {row}",
                            "the first line must be a header naming at least the columns text and emotion",
                        )
                    )
                    return
                continue
            if len(row) != len(header):
                parsed.problems.append(
                    Problem(
                        ((name, start),),
                        f"expected {len(header)} fields (as in the header on line {header_line}), found {len(row)}",
                        "quote fields that contain commas and give every row the header's columns",
                    )
                )
                continue
            fields = {
                key: value for key, value in zip(header, row, strict=True) if value.strip() or key == "text"
            }
            parsed.records.append(_Record(name, start, fields))
    except csv.Error as exc:
        parsed.problems.append(
            Problem(((name, reader.line_num),), f"unreadable CSV ({exc})", "check quoting on that line")
        )
    if header is None:
        parsed.problems.append(
            Problem((), "the file is empty", "add a header line (text,emotion,...) and one row per prompt")
        )


def _array_item_lines(text: str, key: str) -> list[int] | None:
    """1-based line of each item of the first ``"key": [...]`` array in a JSON document, if locatable."""
    match = re.search(r'"' + re.escape(key) + r'"\s*:\s*\[', text)
    if match is None:
        return None
    decoder = json.JSONDecoder()
    pos, lines = match.end(), []
    try:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return lines
            lines.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


def _read_emotion_json(path: Path, parsed: _Parsed) -> None:
    name = path.name
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        parsed.problems.append(
            Problem(((name, line),), f"invalid UTF-8 byte 0x{data[exc.start]:02x}", _UTF8_HINT)
        )
        return
    structure_hint = 'use {"emotion": "anger", "prompts": ["...", "..."]} (or name the file anger.json)'
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        parsed.problems.append(
            Problem(
                ((name, exc.lineno),), f"malformed JSON ({exc.msg} at column {exc.colno})", structure_hint
            )
        )
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("prompts"), list):
        found = type(doc).__name__ if not isinstance(doc, dict) else f"keys {sorted(doc)}"
        parsed.problems.append(
            Problem(((name, 1),), f'expected an object with a "prompts" list, found {found}', structure_hint)
        )
        return
    emotion = doc.get("emotion", path.stem)
    defaults = {k: doc[k] for k in ("lang", "register", "split", "role") if k in doc}
    item_lines = _array_item_lines(text, "prompts")
    if item_lines is None or len(item_lines) != len(doc["prompts"]):
        item_lines = [1] * len(doc["prompts"])
    for index, (item, line) in enumerate(zip(doc["prompts"], item_lines, strict=True)):
        if isinstance(item, str):
            fields: dict[str, Any] = {"text": item}
        elif isinstance(item, dict):
            fields = dict(item)
        else:
            parsed.problems.append(
                Problem(
                    ((name, line),),
                    f"prompts[{index}] is a {type(item).__name__}",
                    'make each item a string or an object like {"text": "..."}',
                )
            )
            continue
        parsed.records.append(_Record(name, line, {**defaults, **fields}, default_emotion=emotion))


def _read(path: Path) -> _Parsed:
    parsed = _Parsed()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".json" and p.is_file())
        if not files:
            parsed.problems.append(
                Problem((), "the directory holds no *.json files", "add one <emotion>.json per emotion")
            )
        for file in files:
            _read_emotion_json(file, parsed)
        return parsed
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        _read_jsonl(path, parsed)
    elif suffix == ".csv":
        _read_csv(path, parsed)
    elif suffix == ".json":
        _read_emotion_json(path, parsed)
    else:
        parsed.problems.append(
            Problem(
                (),
                f"unsupported file type {suffix or '(none)'!r}",
                "use .jsonl, .csv, a per-emotion .json file or a directory of them",
            )
        )
    return parsed


# --------------------------------------------------------------------------------------------------------
# Validation


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _given(value: Any) -> bool:
    """A field value that says something (not missing, not blank)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def _label_key(value: Any) -> Any:
    """An emotion label as compared between the ``emotion`` and ``label`` fields (case and spaces aside)."""
    return value.strip().lower() if isinstance(value, str) else value


def _validate_record(
    rec: _Record, allowed: tuple[str, ...], default_lang: str, problems: list[Problem]
) -> dict[str, Any] | None:
    loc = ((rec.file, rec.line),)
    row: dict[str, Any] = {"source_line": rec.line, "_file": rec.file}
    ok = True

    text = rec.fields.get("text")
    if text is None:
        problems.append(Problem(loc, "missing field 'text'", "add the prompt text in a 'text' field"))
        ok = False
    elif not isinstance(text, str):
        problems.append(
            Problem(loc, f"'text' is a {type(text).__name__}, not a string", "quote the prompt text")
        )
        ok = False
    elif not text.strip():
        problems.append(Problem(loc, "empty text", "write the prompt or delete the line"))
        ok = False
    else:
        row["text"] = text.strip()

    label = rec.fields.get("emotion", rec.fields.get("label", rec.default_emotion))
    allowed_list = ", ".join(allowed)
    other = rec.fields.get("label")
    if _given(label) and _given(other) and "emotion" in rec.fields and _label_key(other) != _label_key(label):
        problems.append(
            Problem(
                loc,
                f"fields 'emotion' ({label!r}) and 'label' ({other!r}) disagree",
                "keep one of the two fields, or give both the same emotion",
            )
        )
        ok = False
    elif label is None or (isinstance(label, str) and not label.strip()):
        problems.append(
            Problem(loc, "missing field 'emotion' (or 'label')", f"add an emotion, one of: {allowed_list}")
        )
        ok = False
    elif not isinstance(label, str) or label.strip().lower() not in allowed:
        problems.append(Problem(loc, f"unknown emotion {label!r}", f"use one of: {allowed_list}"))
        ok = False
    else:
        row["emotion"] = label.strip().lower()

    for key in _OPTIONAL_FIELDS:
        value = rec.fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            problems.append(
                Problem(
                    loc,
                    f"field {key!r} must be a string, found {type(value).__name__}",
                    f"write {key} as text",
                )
            )
            ok = False
            value = None
        row[key] = None if value is None or not str(value).strip() else str(value).strip()

    split = row["split"]
    if split is not None:
        split = split.lower()
        if split not in SPLITS:
            problems.append(
                Problem(
                    loc,
                    f"unknown split {row['split']!r}",
                    "use 'train' or 'eval', or leave split out to have it assigned",
                )
            )
            ok = False
        row["split"] = split
    role = (row["role"] or ROLE_FIT).lower()
    if role not in ROLES:
        problems.append(
            Problem(
                loc,
                f"unknown role {row['role']!r}",
                f"use one of: {', '.join(ROLES)} (or leave role out for {ROLE_FIT!r})",
            )
        )
        ok = False
    elif role == ROLE_STEERING and row.get("emotion") not in (None, STEERING_EMOTION):
        problems.append(
            Problem(
                loc,
                f"role {ROLE_STEERING!r} on a {row['emotion']!r} prompt; steering prompts are neutral "
                "generation starts",
                f"label it {STEERING_EMOTION!r}, or drop the role to use it as a fitting prompt",
            )
        )
        ok = False
    row["role"] = role
    row["lang"] = row["lang"] or default_lang
    row["register"] = (row["register"] or DEFAULT_REGISTER).lower()
    return row if ok else None


def _check_dataset(
    rows: list[dict[str, Any]],
    allowed: tuple[str, ...],
    max_imbalance_ratio: float,
    near_duplicate_threshold: float | None,
    require_all_emotions: bool,
    problems: list[Problem],
) -> None:
    def loc(i: int) -> tuple[str, int]:
        return rows[i]["_file"], rows[i]["source_line"]

    # Identifiers: fill in missing ones, then reject repeats.
    used = {r["id"] for r in rows if r["id"] is not None}
    counters: Counter[str] = Counter()
    for r in rows:
        while r["id"] is None:
            counters[r["emotion"]] += 1
            candidate = f"{r['emotion']}-{counters[r['emotion']]:04d}"
            if candidate not in used:
                r["id"] = candidate
                used.add(candidate)
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_id[r["id"]].append(i)
    for ident, idx in by_id.items():
        if len(idx) > 1:
            problems.append(
                Problem(
                    tuple(loc(i) for i in idx), f"duplicate id {ident!r}", "give every prompt a unique id"
                )
            )

    # Exact duplicates after normalisation.
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[normalize_text(r["text"])].append(i)
    for idx in groups.values():
        if len(idx) > 1:
            labels = sorted({rows[i]["emotion"] for i in idx})
            extra = f" with conflicting emotions {labels}" if len(labels) > 1 else ""
            problems.append(
                Problem(
                    tuple(loc(i) for i in idx),
                    f"duplicate text {_short(rows[idx[0]]['text'])!r} (after normalisation){extra}",
                    "keep one copy; duplicates would count a prompt twice",
                )
            )

    # Near-duplicates among distinct texts.
    if near_duplicate_threshold is not None and near_duplicate_threshold <= 1.0:
        representatives = [idx[0] for idx in groups.values()]
        texts = [rows[i]["text"] for i in representatives]
        for a, b, sim in find_near_duplicates(texts, near_duplicate_threshold):
            i, j = sorted((representatives[a], representatives[b]))
            problems.append(
                Problem(
                    (loc(i), loc(j)),
                    f"near-duplicate texts (trigram Jaccard {sim:.2f} ≥ {near_duplicate_threshold}): "
                    f"{_short(rows[i]['text'])!r} / {_short(rows[j]['text'])!r}",
                    "reword one of them substantially or delete it",
                )
            )

    # Class coverage and balance, counted on fitting prompts (steering prompts fit nothing).
    counts = Counter(r["emotion"] for r in rows if r["role"] == ROLE_FIT)
    if not rows:
        problems.append(Problem((), "no valid prompts", "add prompts with text and emotion"))
        return
    missing = [e for e in allowed if counts[e] == 0]
    if require_all_emotions and missing:
        problems.append(
            Problem(
                (),
                f"no fitting prompts (role {ROLE_FIT!r}) for emotion(s) {', '.join(missing)}",
                "add prompts for them, or restrict allowed_emotions to the emotions you have",
            )
        )
    present = {e: counts[e] for e in allowed if counts[e] > 0}
    if len(present) >= 2:
        largest, smallest = max(present, key=present.get), min(present, key=present.get)
        ratio = present[largest] / present[smallest]
        if ratio > max_imbalance_ratio:
            problems.append(
                Problem(
                    (),
                    f"classes are imbalanced: {largest} has {present[largest]} fitting prompts, {smallest} "
                    f"has {present[smallest]} (ratio {ratio:.2f} > "
                    f"max_imbalance_ratio {max_imbalance_ratio})",
                    f"add fitting prompts to {smallest}, subsample {largest}, or raise max_imbalance_ratio",
                )
            )


def load_prompts(
    path: str | Path,
    *,
    allowed_emotions: Iterable[str] = EMOTIONS,
    default_lang: str = "en",
    max_imbalance_ratio: float = 3.0,
    near_duplicate_threshold: float | None = 0.9,
    require_all_emotions: bool = True,
) -> pd.DataFrame:
    """Read and validate a prompt dataset (JSONL, CSV, per-emotion JSON file or directory).

    Returns one row per prompt with columns :data:`COLUMNS` (``split`` is None where the file has none;
    ``role`` is ``fit`` where the file has none; ``source_line`` is the 1-based line in its file). Raises
    :class:`DatasetError` listing every problem. ``near_duplicate_threshold=None`` disables the
    near-duplicate check.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Prompt dataset {str(path)!r} does not exist; check the profile's dataset.path."
        )
    allowed = tuple(e.strip().lower() for e in allowed_emotions)
    parsed = _read(path)
    problems = list(parsed.problems)
    rows = [
        row
        for rec in parsed.records
        if (row := _validate_record(rec, allowed, default_lang, problems)) is not None
    ]
    _check_dataset(
        rows, allowed, max_imbalance_ratio, near_duplicate_threshold, require_all_emotions, problems
    )
    if problems:
        problems.sort(key=lambda p: (not p.locations, p.locations[:1]))
        raise DatasetError(path, problems)
    frame = pd.DataFrame(rows, columns=[*COLUMNS, "_file"]).drop(columns="_file")
    frame["split"] = frame["split"].astype(object).where(frame["split"].notna(), None)
    frame["source_line"] = frame["source_line"].astype(int)
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------
# Splits and subsampling


def _rng(seed: int, key: Hashable) -> np.random.Generator:
    """A generator seeded from the seed and a stable hash of the stratum key (process-independent)."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(key).encode("utf-8"))])


def _allocate(sizes: Mapping[Hashable, int], total: int) -> dict[Hashable, int]:
    """Split ``total`` across groups proportionally to their sizes (largest remainder, ties by key)."""
    n = sum(sizes.values())
    if n == 0 or total <= 0:
        return {k: 0 for k in sizes}
    quotas = {k: total * size / n for k, size in sizes.items()}
    out = {k: math.floor(q + 1e-9) for k, q in quotas.items()}
    order = sorted(sizes, key=lambda k: (-(quotas[k] - out[k]), str(k)))
    for k in order[: total - sum(out.values())]:
        out[k] += 1
    return out


def _strata_column(df: pd.DataFrame) -> pd.Series:
    if "register" in df.columns and df["register"].nunique(dropna=False) > 1:
        return df["register"].fillna(DEFAULT_REGISTER).astype(str)
    return pd.Series(DEFAULT_REGISTER, index=df.index)


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in a content-defined order, so that results do not depend on file order."""
    keys = df["id"].astype(str) if "id" in df.columns else pd.Series("", index=df.index)
    return df.assign(_k1=keys, _k2=df["text"].astype(str)).sort_values(["_k1", "_k2"], kind="stable")


def _pick(df: pd.DataFrame, k: int, seed: int, key: Hashable) -> list[Hashable]:
    """Deterministically pick ``k`` row labels of ``df``, stratified by register."""
    strata = _strata_column(df)
    sizes = strata.value_counts().to_dict()
    chosen: list[Hashable] = []
    for stratum, count in sorted(_allocate(sizes, k).items(), key=lambda kv: str(kv[0])):
        if count == 0:
            continue
        group = _ordered(df[strata == stratum])
        picks = _rng(seed, (key, stratum)).choice(len(group), size=count, replace=False)
        chosen.extend(group.index[np.sort(picks)])
    return chosen


def _eval_count(n: int, eval_fraction: float) -> int:
    if n < 2:
        return 0
    return min(max(math.floor(eval_fraction * n + 0.5), 1), n - 1)


def _role_column(df: pd.DataFrame) -> pd.Series:
    """Each row's role (``fit`` where the frame has no ``role`` column or the value is missing)."""
    if "role" not in df.columns:
        return pd.Series(ROLE_FIT, index=df.index)
    return df["role"].fillna(ROLE_FIT).astype(str)


def _groups(df: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """``(emotion, role, rows)`` for every emotion × role present, in a stable order."""
    roles = _role_column(df)
    return [
        (emotion, role, df[(df["emotion"] == emotion) & (roles == role)])
        for emotion in sorted(df["emotion"].unique())
        for role in ROLES
        if ((df["emotion"] == emotion) & (roles == role)).any()
    ]


def _key(role: str, *parts: Hashable) -> tuple[Hashable, ...]:
    """Random-stream key of a stratum: fitting prompts keep the key they had before roles existed."""
    return parts if role == ROLE_FIT else (*parts, role)


def given_splits(df: pd.DataFrame) -> pd.Series:
    """True where a row already has a valid split (``train`` / ``eval``); an unknown value is an error."""
    if "split" not in df.columns:
        return pd.Series(False, index=df.index)
    present = df["split"].notna()
    unknown = sorted(set(df.loc[present & ~df["split"].isin(SPLITS), "split"].astype(str)))
    if unknown:
        raise ValueError(f"Unknown split value(s) {unknown}; use 'train' or 'eval', or leave split empty.")
    return present


def assign_splits(df: pd.DataFrame, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Assign ``train``/``eval`` to the rows without a split, stratified by emotion × role (and register
    when there is more than one).

    A split given in the data is always kept. In each emotion × role the rows without one fill the eval
    split up to the eval count of the whole group (``eval_fraction`` of it, at least one prompt in each
    split when the group has two), as far as the given rows leave room: given eval rows count towards it
    and are never moved. Each role keeps its own eval share, so the eval split holds both held-out fitting
    prompts and steering starts. The result depends only on the rows' ids/texts/roles/given splits and the
    seed; with no split given it is the plain stratified split.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    given = given_splits(df).to_numpy()
    if given.all():
        return df.copy()
    out = df.reset_index(drop=True)
    out["split"] = out["split"].where(given, "train") if "split" in out.columns else "train"
    strata = _strata_column(out)
    for emotion, role, members in _groups(out):
        open_rows = members[~given[members.index]]
        if open_rows.empty:
            continue
        given_eval = int(((members["split"] == "eval").to_numpy() & given[members.index]).sum())
        n_eval = min(max(_eval_count(len(members), eval_fraction) - given_eval, 0), len(open_rows))
        sizes = strata[open_rows.index].value_counts().to_dict()
        for stratum, k in sorted(_allocate(sizes, n_eval).items(), key=lambda kv: str(kv[0])):
            if k == 0:
                continue
            group = _ordered(open_rows[strata[open_rows.index] == stratum])
            rng = _rng(seed, _key(role, "split", emotion, stratum))
            picks = rng.choice(len(group), size=k, replace=False)
            out.loc[group.index[picks], "split"] = "eval"
    out.index = df.index
    return out


def limit_per_emotion(df: pd.DataFrame, n_per_emotion: int | None, seed: int) -> pd.DataFrame:
    """Deterministic subsample of at most ``n_per_emotion`` prompts per emotion and role, keeping split
    proportions.

    ``None`` keeps everything. Fitting prompts are capped at ``n_per_emotion`` per emotion; steering prompts
    (which fit nothing and do not enter class balance) are capped separately at the same number, so a small
    run keeps steering starts in its eval split. When splits are assigned, each split present for an
    emotion × role keeps at least one prompt; within a split the sample is stratified by register.
    """
    if n_per_emotion is None:
        return df.copy()
    if n_per_emotion < 2:
        raise ValueError(
            f"n_per_emotion must be at least 2 (one train and one eval prompt), got {n_per_emotion}."
        )
    df = df.reset_index(drop=True)
    keep: list[Hashable] = []
    has_splits = "split" in df.columns and df["split"].notna().all()
    for emotion, role, members in _groups(df):
        if len(members) <= n_per_emotion:
            keep.extend(members.index)
            continue
        if not has_splits:
            keep.extend(_pick(members, n_per_emotion, seed, _key(role, "limit", emotion)))
            continue
        sizes = members["split"].value_counts().to_dict()
        quota = _allocate(sizes, n_per_emotion)
        if len(sizes) > 1:  # every split keeps at least one prompt
            for name in sizes:
                if quota[name] == 0:
                    donor = max(quota, key=lambda s: (quota[s], str(s)))
                    quota[donor] -= 1
                    quota[name] = 1
        for name, k in sorted(quota.items()):
            part = members[members["split"] == name]
            keep.extend(_pick(part, k, seed, _key(role, "limit", emotion, name)))
    return df.loc[sorted(keep)].reset_index(drop=True)


def steering_starts(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Eval-split prompts to steer from, in id order, and the role they have.

    The eval-split ``steering_prompt`` rows when there are any; otherwise the eval-split neutral fitting
    prompts (which the vectors were not fit on either). The returned role says which, so callers record it.
    """
    evaluation = frame[frame["split"] == "eval"]
    steering = evaluation[(_role_column(evaluation) == ROLE_STEERING).to_numpy()]
    if not steering.empty:
        return steering.sort_values("id"), ROLE_STEERING
    neutral = evaluation[(evaluation["emotion"] == STEERING_EMOTION).to_numpy() & fitting_mask(evaluation)]
    if neutral.empty:
        raise ValueError(
            "The dataset has no eval-split prompts to steer (neither role steering_prompt nor neutral "
            "fitting prompts); add neutral prompts (role fit or steering_prompt) so that the eval split "
            "gets some."
        )
    return neutral.sort_values("id"), ROLE_FIT


# --------------------------------------------------------------------------------------------------------
# Summary


def _length_stats(words: pd.Series) -> dict[str, float]:
    if words.empty:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(words.min()), "mean": round(float(words.mean()), 2), "max": int(words.max())}


def dataset_summary(df: pd.DataFrame, near_duplicate_threshold: float = 0.9) -> dict[str, Any]:
    """JSON-ready summary: counts per emotion × split, role and register, word-length stats, uniqueness."""
    split = (
        df["split"].fillna("unassigned") if "split" in df.columns else pd.Series("unassigned", index=df.index)
    )
    counts: dict[str, dict[str, int]] = {}
    for emotion in sorted(df["emotion"].unique()):
        mask = df["emotion"] == emotion
        per_split = split[mask].value_counts()
        counts[emotion] = {name: int(per_split.get(name, 0)) for name in (*SPLITS, "unassigned")}
        counts[emotion]["total"] = int(mask.sum())
    roles = _role_column(df)
    role_counts: dict[str, dict[str, int]] = {}
    for (emotion, role), n in df.groupby([df["emotion"], roles]).size().items():
        role_counts.setdefault(str(emotion), {})[str(role)] = int(n)
    registers: dict[str, dict[str, int]] = {}
    if "register" in df.columns:
        for (emotion, register), n in df.groupby(["emotion", "register"]).size().items():
            registers.setdefault(str(emotion), {})[str(register)] = int(n)
    words = df["text"].str.split().str.len()
    normalized = df["text"].map(normalize_text)
    unique_texts = normalized.drop_duplicates()
    near = find_near_duplicates(df.loc[unique_texts.index, "text"].tolist(), near_duplicate_threshold)
    return {
        "n_prompts": len(df),
        "counts": counts,
        "roles": role_counts,
        "registers": registers,
        "langs": {str(k): int(v) for k, v in df["lang"].value_counts().items()}
        if "lang" in df.columns
        else {},
        "length_words": {
            **_length_stats(words),
            "by_emotion": {str(e): _length_stats(w) for e, w in words.groupby(df["emotion"])},
        },
        "uniqueness": {
            "n_unique": len(unique_texts),
            "n_duplicate_rows": len(df) - len(unique_texts),
            "near_duplicate_threshold": near_duplicate_threshold,
            "n_near_duplicate_pairs": len(near),
        },
    }
