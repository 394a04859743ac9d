"""Confound audit: is an emotion vector more than a surface feature of its prompts?

Four kinds of evidence, each a pure function on texts, labels and pooled activations:

- **surface baselines** — classifiers that only see the surface (bag of words, an emotion-keyword rule,
  final punctuation + length) scored on the same held-out prompts as the probe;
- **nuisance directions** — directions of variation that are not emotion, each estimated *within one
  class* so emotion cannot leak into it: final punctuation by counterfactual edits of neutral prompts,
  length, grammatical person and register by contrasts inside each class, averaged over classes;
- **vector geometry** — each emotion vector's cosine with every nuisance direction, and the share of its
  norm left after projecting all of them out;
- **robustness** — probe accuracy per register (the keyword-free ``implicit`` register is the check) and on
  external validation sets nothing was fitted on.

:func:`flag_vectors` turns the evidence into one verdict per vector, naming the nuisance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from emotion_assets.science.directions import fit_probes_per_boundary
from emotion_assets.science.prompts import NEUTRAL, DatasetError, Problem, find_near_duplicates, load_prompts
from emotion_assets.science.residual import emotion_word_pattern
from emotion_assets.science.surface import surface_features

ALL = "all"  # the group label of "every eval prompt" in per-register tables
PUNCTUATION_NUISANCES: tuple[str, ...] = ("final_punctuation", "exclamation", "question")
BASELINES: tuple[str, ...] = ("bag_of_words", "keyword_rule", "punctuation_length")
# Baselines whose success makes a vector suspect. Bag of words is reported beside the probe but does not
# flag: emotion is expressed in words, so a lexical classifier that matches the probe is the expected
# ceiling, not an artefact. The keyword rule and punctuation + length are artefacts when they match it.
FLAGGING_BASELINES: tuple[str, ...] = ("keyword_rule", "punctuation_length")

_FINAL_PUNCTUATION = ".!?…"
_TOKEN_PATTERN = r"(?u)\b\w+\b"  # keeps one-letter words ("I"), unlike sklearn's default

ActsByStrategy = Mapping[str, Float[Tensor, "n n_boundaries d_model"]]


# --------------------------------------------------------------------------------------------------------
# Counterfactual edits


def strip_final_punctuation(text: str) -> str:
    """The text without its trailing run of ``.!?…`` (and trailing whitespace)."""
    return text.rstrip().rstrip(_FINAL_PUNCTUATION).rstrip()


def punctuation_counterfactuals(texts: Sequence[str]) -> dict[str, list[str]]:
    """The three counterfactual edits behind the punctuation nuisances, in the input order.

    ``final_punctuation``: final punctuation removed; ``exclamation`` / ``question``: replaced by ``!`` /
    ``?``. A text the edit leaves unchanged contributes a zero difference.
    """
    bare = [strip_final_punctuation(t) for t in texts]
    return {
        "final_punctuation": bare,
        "exclamation": [b + "!" for b in bare],
        "question": [b + "?" for b in bare],
    }


# --------------------------------------------------------------------------------------------------------
# Surface baselines


def _masks(train_mask: Sequence[bool] | np.ndarray, eval_mask: Sequence[bool] | np.ndarray, n: int):
    train, held = np.asarray(train_mask, dtype=bool), np.asarray(eval_mask, dtype=bool)
    if train.shape != (n,) or held.shape != (n,):
        raise ValueError(f"train/eval masks have shapes {train.shape}/{held.shape}, expected ({n},).")
    if (train & held).any():
        raise ValueError(f"{int((train & held).sum())} prompts are in both the train and the eval rows.")
    return train, held


def keyword_rule(
    texts: Sequence[str], emotion_words: Mapping[str, Sequence[str]], neutral: str = NEUTRAL
) -> tuple[np.ndarray, np.ndarray]:
    """Predict the emotion whose keywords appear; ``neutral`` when none does.

    Ties: the emotion with the most keyword matches wins; among equal counts, the one whose first match
    comes earliest in the text. Returns ``(predictions, tied)`` where ``tied`` marks texts whose top count
    was shared by several emotions (decided by position).
    """
    patterns = {
        e: p for e, words in emotion_words.items() if e != neutral and (p := emotion_word_pattern(words))
    }
    predictions, tied = [], []
    for text in texts:
        hits = {e: [m.start() for m in p.finditer(text)] for e, p in patterns.items()}
        hits = {e: starts for e, starts in hits.items() if starts}
        if not hits:
            predictions.append(neutral)
            tied.append(False)
            continue
        top = max(len(s) for s in hits.values())
        leaders = [e for e, s in hits.items() if len(s) == top]
        predictions.append(min(leaders, key=lambda e: (hits[e][0], e)))
        tied.append(len(leaders) > 1)
    return np.asarray(predictions, dtype=object), np.asarray(tied, dtype=bool)


def punctuation_length_features(texts: Sequence[str]) -> np.ndarray:
    """``[n, 5]``: ends in ``.`` / ``!`` / ``?`` (one-hot; none of them = no final punctuation), n_words,
    n_chars. Punctuation and length as :func:`emotion_assets.science.surface.surface_features` measures them."""
    features = surface_features(texts, ())
    period = features["final_punctuation"] & ~features["exclamation"] & ~features["question"]
    n_chars = [len(t.strip()) for t in texts]
    columns = [period, features["exclamation"], features["question"], features["n_words"], n_chars]
    return np.column_stack([np.asarray(c, dtype=np.float64) for c in columns])


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    if len(y_true) == 0:
        return math.nan, math.nan
    return (
        float(accuracy_score(y_true, y_pred)),
        float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    )


def _groups(registers: np.ndarray, held: np.ndarray) -> dict[str, np.ndarray]:
    """``{"all": eval rows, register: eval rows of that register, ...}``."""
    groups = {ALL: held}
    for register in sorted(set(registers[held].tolist())):
        groups[str(register)] = held & (registers == register)
    return groups


def surface_baselines(
    texts: Sequence[str],
    labels: Sequence[str],
    registers: Sequence[str],
    train_mask: Sequence[bool] | np.ndarray,
    eval_mask: Sequence[bool] | np.ndarray,
    emotion_words: Mapping[str, Sequence[str]],
    seed: int,
) -> pd.DataFrame:
    """Surface-only classifiers fit on the train rows, scored on the eval rows (all, then per register).

    - ``bag_of_words``: word counts (``CountVectorizer``, one-letter words kept) → logistic regression;
    - ``keyword_rule``: :func:`keyword_rule` (nothing fitted; ``n_train`` = 0);
    - ``punctuation_length``: :func:`punctuation_length_features`, standardized → logistic regression.

    Columns: baseline, register, accuracy, macro_f1, n_train, n_eval, chance (eval accuracy of the most
    frequent train label), note.
    """
    n = len(texts)
    lab = np.asarray(labels, dtype=object).astype(str)
    reg = np.asarray(registers, dtype=object).astype(str)
    if lab.shape != (n,) or reg.shape != (n,):
        raise ValueError(f"labels/registers have {lab.shape}/{reg.shape} entries for {n} texts.")
    train, held = _masks(train_mask, eval_mask, n)
    if len(set(lab[train])) < 2:
        raise ValueError("Surface baselines need at least two labels among the train prompts.")
    text_arr = np.asarray(texts, dtype=object)
    bow = make_pipeline(
        CountVectorizer(token_pattern=_TOKEN_PATTERN, lowercase=True),
        LogisticRegression(max_iter=2000, random_state=seed),
    ).fit(text_arr[train].tolist(), lab[train])
    features = punctuation_length_features(list(texts))
    surface = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)).fit(
        features[train], lab[train]
    )
    keyword, tied = keyword_rule(list(texts), emotion_words)
    predictions = {
        "bag_of_words": (
            bow.predict(text_arr.tolist()),
            int(train.sum()),
            "word counts → logistic regression",
        ),
        "keyword_rule": (
            keyword.astype(str),
            0,
            "most keyword matches; ties by earliest match; no match → neutral",
        ),
        "punctuation_length": (
            surface.predict(features),
            int(train.sum()),
            "final . ! ? + n_words + n_chars → logistic regression",
        ),
    }
    values, counts = np.unique(lab[train], return_counts=True)
    majority = values[np.argmax(counts)]
    rows = []
    for name, (predicted, n_train, note) in predictions.items():
        for group, rows_mask in _groups(reg, held).items():
            accuracy, macro_f1 = _scores(lab[rows_mask], np.asarray(predicted)[rows_mask])
            extra = f"; {int(tied[rows_mask].sum())} ties" if name == "keyword_rule" else ""
            rows.append(
                {
                    "baseline": name,
                    "register": group,
                    "accuracy": accuracy,
                    "macro_f1": macro_f1,
                    "n_train": n_train,
                    "n_eval": int(rows_mask.sum()),
                    "chance": float(np.mean(lab[rows_mask] == majority)) if rows_mask.any() else math.nan,
                    "note": note + extra,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------
# Nuisance directions


@dataclass(frozen=True)
class Nuisance:
    """A direction of non-emotion variation, per pooling strategy.

    ``directions[strategy]`` is ``[n_boundaries, d_model]``; all NaN when the direction could not be
    estimated (``reason`` says why; it is empty otherwise). ``n_prompts`` counts the prompts it used.
    """

    name: str
    kind: str  # "counterfactual" or "within_class"
    directions: dict[str, Float[Tensor, "n_boundaries d_model"]]
    n_prompts: int
    reason: str = ""
    detail: str = ""

    @property
    def estimated(self) -> bool:
        return not self.reason


def _nan_like(acts: Tensor) -> Tensor:
    return torch.full(acts.shape[1:], math.nan, dtype=torch.float64)


def counterfactual_directions(
    original: ActsByStrategy,
    edited: Mapping[str, ActsByStrategy],
    n_changed: Mapping[str, int],
) -> list[Nuisance]:
    """Per edit: mean over prompts of (activations of the edited prompt − activations of the prompt as is).

    ``original[strategy]`` and ``edited[name][strategy]`` are ``[n, n_boundaries, d_model]`` with rows in
    the same prompt order. An edit that changed no prompt (``n_changed[name] == 0``) is not estimable.
    """
    out = []
    for name, acts_by_strategy in edited.items():
        directions, reason = {}, ""
        if n_changed[name] == 0:
            reason = f"no prompt changes under the '{name}' edit (no variation)"
        for strategy, acts in acts_by_strategy.items():
            base = original[strategy]
            if acts.shape != base.shape:
                raise ValueError(f"Edited activations {tuple(acts.shape)} ≠ original {tuple(base.shape)}.")
            directions[strategy] = (
                _nan_like(acts) if reason else (acts.double() - base.double()).mean(dim=0)
            )  # [n_boundaries, d_model]
        out.append(
            Nuisance(
                name=name,
                kind="counterfactual",
                directions=directions,
                n_prompts=int(next(iter(original.values())).shape[0]),
                reason=reason,
                detail=f"{n_changed[name]} neutral prompts changed by the edit",
            )
        )
    return out


def within_class_contrast(
    acts: ActsByStrategy,
    labels: np.ndarray,
    rows: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    name: str,
    what: str,
) -> Nuisance:
    """mean(positive) − mean(negative) inside each class (restricted to ``rows``), averaged over the classes
    that have both sides. Emotion cannot leak in: every difference is taken between prompts of one class."""
    used = [
        c
        for c in sorted(set(labels[rows].tolist()))
        if (rows & (labels == c) & positive).any() and (rows & (labels == c) & negative).any()
    ]
    n_used = int(sum((rows & (labels == c) & (positive | negative)).sum() for c in used))
    reason = "" if used else f"no class has prompts on both sides of {what} (no variation)"
    directions = {}
    for strategy, x in acts.items():
        if reason:
            directions[strategy] = _nan_like(x)
            continue
        diffs = []
        for c in used:
            pos, neg = rows & (labels == c) & positive, rows & (labels == c) & negative
            diffs.append(x[torch.as_tensor(pos)].double().mean(0) - x[torch.as_tensor(neg)].double().mean(0))
        directions[strategy] = torch.stack(diffs).mean(0)  # [n_boundaries, d_model]
    return Nuisance(
        name=name,
        kind="within_class",
        directions=directions,
        n_prompts=n_used,
        reason=reason,
        detail=f"{what}; classes used: {', '.join(used)}" if used else what,
    )


def length_split(lengths: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(longer, shorter) masks: within each class, prompts above its median n_words vs the rest (when no
    prompt is above the median, those at or above it vs those below)."""
    longer = np.zeros(len(lengths), dtype=bool)
    shorter = np.zeros(len(lengths), dtype=bool)
    for c in set(labels[rows].tolist()):
        in_class = rows & (labels == c)
        median = float(np.median(lengths[in_class]))
        above = in_class & (lengths > median)
        if not above.any():
            above = in_class & (lengths >= median)
        longer |= above
        shorter |= in_class & ~above
    return longer, shorter


def class_contrast_nuisances(
    acts: ActsByStrategy,
    texts: Sequence[str],
    labels: Sequence[str],
    registers: Sequence[str],
    rows: np.ndarray,
) -> list[Nuisance]:
    """Length, person and register directions, each estimated within one class (see
    :func:`within_class_contrast`) on ``rows`` (the train fitting prompts)."""
    lab = np.asarray(labels, dtype=object).astype(str)
    reg = np.asarray(registers, dtype=object).astype(str)
    rows = np.asarray(rows, dtype=bool)
    features = surface_features(texts, ())  # the dataset check's definitions of length and person
    longer, shorter = length_split(features["n_words"].to_numpy(), lab, rows)
    person = features["first_second_person"].to_numpy(dtype=bool)
    out = [
        within_class_contrast(
            acts, lab, rows, longer, shorter, "length", "longer half vs shorter half (n_words)"
        ),
        within_class_contrast(
            acts, lab, rows, person, ~person, "person", "first/second person vs third person"
        ),
    ]
    present = sorted(set(reg[rows].tolist()))
    if len(present) < 2:
        out.append(
            Nuisance(
                name="register",
                kind="within_class",
                directions={s: _nan_like(x) for s, x in acts.items()},
                n_prompts=int(rows.sum()),
                reason=f"registers {present}: fewer than two (no variation)",
            )
        )
        return out
    for register in present:
        out.append(
            within_class_contrast(
                acts,
                lab,
                rows,
                reg == register,
                reg != register,
                f"register:{register}",
                f"{register} vs rest",
            )
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Vector geometry against the nuisances


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if not (math.isfinite(na) and math.isfinite(nb)) or na == 0.0 or nb == 0.0:
        return math.nan
    return float((a @ b) / (na * nb))


def norm_share_left(
    vector: Float[Tensor, " d_model"], nuisances: Float[Tensor, "m d_model"], rtol: float = 1e-10
) -> tuple[float, int]:
    """‖v − P v‖ / ‖v‖ where P projects onto the span of the nuisance rows; and the rank of that span.

    1 for a vector orthogonal to every nuisance, 0 for one inside their span. Non-finite or zero rows are
    ignored; numerically dependent rows count once (singular values below ``rtol`` × the largest).
    """
    v = vector.double()
    norm = float(v.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return math.nan, 0
    keep = torch.isfinite(nuisances).all(dim=1) & (nuisances.double().norm(dim=1) > 0)
    rows = nuisances[keep].double()  # [m', d_model]
    if rows.shape[0] == 0:
        return 1.0, 0
    _, s, vt = torch.linalg.svd(rows, full_matrices=False)
    basis = vt[s > rtol * s[0]]  # [rank, d_model], orthonormal
    left = v - basis.T @ (basis @ v)
    return float(left.norm() / norm), int(basis.shape[0])


def vector_geometry(
    vectors: Mapping[str, Mapping[str, Float[Tensor, "n_boundaries d_model"]]],
    nuisances: Sequence[Nuisance],
    boundaries: Sequence[int],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For every emotion vector (strategy × emotion × boundary): its cosine with each nuisance, and the share
    of its norm left after projecting out all of them.

    ``vectors[strategy][emotion]`` is ``[n_boundaries, d_model]``. Returns ``(cosines, norm_share)``:
    cosines has strategy, boundary, emotion, nuisance, cosine (NaN where the nuisance is not estimable or
    zero at that boundary), note; norm_share has strategy, boundary, emotion, vector_norm, share_left,
    span_rank, nuisances_used.
    """
    cos_rows, share_rows = [], []
    for strategy, by_emotion in vectors.items():
        for position, boundary in enumerate(boundaries):
            available = []
            for nuisance in nuisances:
                direction = nuisance.directions[strategy][position]
                if nuisance.estimated and torch.isfinite(direction).all() and float(direction.norm()) > 0:
                    available.append(nuisance)
            stacked = (
                torch.stack([n.directions[strategy][position] for n in available])
                if available
                else torch.zeros(0, next(iter(by_emotion.values())).shape[-1], dtype=torch.float64)
            )  # [m, d_model]
            for emotion, vec in by_emotion.items():
                v = vec[position].double()
                for nuisance in nuisances:
                    direction = nuisance.directions[strategy][position]
                    note = nuisance.reason or ("" if nuisance in available else "nuisance is zero here")
                    if float(v.norm()) == 0.0:
                        note = "emotion vector is zero here"
                    cos_rows.append(
                        {
                            "strategy": strategy,
                            "boundary": int(boundary),
                            "emotion": emotion,
                            "nuisance": nuisance.name,
                            "cosine": _cosine(v, direction.double()) if nuisance in available else math.nan,
                            "note": note,
                        }
                    )
                share, rank = norm_share_left(v, stacked)
                share_rows.append(
                    {
                        "strategy": strategy,
                        "boundary": int(boundary),
                        "emotion": emotion,
                        "vector_norm": float(v.norm()),
                        "share_left": share,
                        "span_rank": rank,
                        "nuisances_used": ",".join(n.name for n in available),
                    }
                )
    return pd.DataFrame(cos_rows), pd.DataFrame(share_rows)


def emotion_cosines(
    vectors: Mapping[str, Mapping[str, Float[Tensor, "n_boundaries d_model"]]], boundaries: Sequence[int]
) -> pd.DataFrame:
    """Cosine between every pair of emotion vectors (a < b), per strategy × boundary."""
    rows = []
    for strategy, by_emotion in vectors.items():
        names = sorted(by_emotion)
        for position, boundary in enumerate(boundaries):
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    rows.append(
                        {
                            "strategy": strategy,
                            "boundary": int(boundary),
                            "emotion_a": a,
                            "emotion_b": b,
                            "cosine": _cosine(
                                by_emotion[a][position].double(), by_emotion[b][position].double()
                            ),
                        }
                    )
    return pd.DataFrame(rows, columns=["strategy", "boundary", "emotion_a", "emotion_b", "cosine"])


# --------------------------------------------------------------------------------------------------------
# Probes per register and on external sets


@dataclass
class LayerProbes:
    """One standardized logistic-regression probe per boundary, fit on the train rows (kept in memory only).

    Same estimator as :func:`emotion_assets.science.directions.linear_probe_by_layer`.
    """

    pipelines: list[Pipeline]
    majority_label: str
    converged: list[bool] = field(default_factory=list)

    def score(
        self,
        acts: Float[Tensor, "n n_boundaries d_model"],
        labels: Sequence[str],
        groups: Mapping[str, np.ndarray],
    ) -> pd.DataFrame:
        """Accuracy and macro-F1 per boundary position × named row group of ``acts``."""
        x = acts.detach().cpu().float().numpy()  # [n, n_boundaries, d_model]
        lab = np.asarray(labels, dtype=object).astype(str)
        rows = []
        for position, probe in enumerate(self.pipelines):
            predicted = probe.predict(x[:, position]) if len(lab) else np.asarray([], dtype=str)
            for group, mask in groups.items():
                accuracy, macro_f1 = _scores(lab[mask], predicted[mask])
                rows.append(
                    {
                        "position": position,
                        "group": group,
                        "accuracy": accuracy,
                        "macro_f1": macro_f1,
                        "n": int(mask.sum()),
                        "chance": float(np.mean(lab[mask] == self.majority_label))
                        if mask.any()
                        else math.nan,
                        "converged": self.converged[position],
                    }
                )
        return pd.DataFrame(rows)


def fit_layer_probes(
    acts: Float[Tensor, "n n_boundaries d_model"],
    labels: Sequence[str],
    train_mask: Sequence[bool] | np.ndarray,
    seed: int,
    C: float = 1.0,
    max_iter: int = 200,
) -> LayerProbes:
    """Standardize, then multinomial logistic regression (L2, lbfgs) per boundary on the train rows
    (:func:`~emotion_assets.science.directions.fit_probes_per_boundary`)."""
    lab = np.asarray(labels, dtype=object).astype(str)
    train = np.asarray(train_mask, dtype=bool)
    if len(set(lab[train])) < 2:
        raise ValueError("The probe needs at least two labels among the train prompts.")
    x = acts.detach().cpu().float().numpy()[train]  # [n_train, n_boundaries, d_model]
    values, counts = np.unique(lab[train], return_counts=True)
    fits = fit_probes_per_boundary(x, lab[train], seed, C, max_iter)
    return LayerProbes(
        pipelines=[probe for probe, _ in fits],
        majority_label=str(values[np.argmax(counts)]),
        converged=[converged for _, converged in fits],
    )


def probe_by_register(
    probes: LayerProbes,
    acts: Float[Tensor, "n n_boundaries d_model"],
    labels: Sequence[str],
    registers: Sequence[str],
    eval_mask: Sequence[bool] | np.ndarray,
    boundaries: Sequence[int],
) -> pd.DataFrame:
    """Probe scores on the eval rows: all of them (register ``all``) and each register alone.

    Columns: boundary, register, accuracy, macro_f1, n, chance, converged.
    """
    reg = np.asarray(registers, dtype=object).astype(str)
    table = probes.score(acts, labels, _groups(reg, np.asarray(eval_mask, dtype=bool)))
    table.insert(0, "boundary", [int(boundaries[p]) for p in table.pop("position")])
    return table.rename(columns={"group": "register"})


# --------------------------------------------------------------------------------------------------------
# Flags


def flag_vectors(
    cosines: pd.DataFrame,
    probe: pd.DataFrame,
    baselines: pd.DataFrame,
    cosine_threshold: float = 0.5,
    baseline_margin: float = 0.05,
    flagging_baselines: Iterable[str] = FLAGGING_BASELINES,
) -> pd.DataFrame:
    """One verdict per emotion vector (strategy × boundary × emotion).

    A vector is flagged when |cos| with any nuisance ≥ ``cosine_threshold``, or when a baseline in
    ``flagging_baselines`` (scored on all eval rows) reaches the probe's eval accuracy at that strategy ×
    boundary within ``baseline_margin`` (accuracy ≥ probe − margin) while beating chance by more than the
    margin (a baseline at chance explains nothing, even where the probe is at chance too). NaN cosines
    never flag.

    ``probe`` needs strategy, boundary, accuracy (register ``all`` rows); ``baselines`` needs baseline,
    register, accuracy, chance. Columns: strategy, boundary, emotion, flagged, max_abs_cosine, worst_nuisance,
    flagged_nuisances, flagged_baselines, reason.
    """
    if not 0 < cosine_threshold <= 1:
        raise ValueError(f"cosine_threshold must be in (0, 1], got {cosine_threshold}.")
    whole = baselines[(baselines["register"] == ALL) & baselines["baseline"].isin(list(flagging_baselines))]
    baseline_acc = {
        name: acc
        for name, acc, chance in zip(whole["baseline"], whole["accuracy"], whole["chance"], strict=True)
        if acc > chance + baseline_margin
    }
    probe_all = probe[probe["register"] == ALL] if "register" in probe else probe
    probe_acc = {(s, int(b)): float(a) for s, b, a in zip(probe_all["strategy"], probe_all["boundary"],
                                                          probe_all["accuracy"], strict=True)}  # fmt: skip
    rows = []
    for (strategy, boundary, emotion), group in cosines.groupby(
        ["strategy", "boundary", "emotion"], sort=True
    ):
        magnitude = group["cosine"].abs()
        finite = magnitude.notna()
        worst = group.loc[magnitude[finite].idxmax()] if finite.any() else None
        hits = group[magnitude >= cosine_threshold].sort_values("cosine", key=abs, ascending=False)
        nuisance_text = [f"{r.nuisance} (cos {r.cosine:+.2f})" for r in hits.itertuples()]
        accuracy = probe_acc.get((strategy, int(boundary)), math.nan)
        baseline_text = [
            f"{name} acc {acc:.2f} ≥ probe {accuracy:.2f} − {baseline_margin:g}"
            for name, acc in sorted(baseline_acc.items())
            if math.isfinite(accuracy) and acc >= accuracy - baseline_margin
        ]
        rows.append(
            {
                "strategy": strategy,
                "boundary": int(boundary),
                "emotion": emotion,
                "flagged": bool(nuisance_text or baseline_text),
                "max_abs_cosine": float(magnitude[finite].max()) if finite.any() else math.nan,
                "worst_nuisance": str(worst["nuisance"]) if worst is not None else "",
                "flagged_nuisances": "; ".join(nuisance_text),
                "flagged_baselines": "; ".join(baseline_text),
                "reason": "; ".join(nuisance_text + baseline_text),
            }
        )
    return pd.DataFrame(rows)


def vector_audit(cosines: pd.DataFrame, norm_share: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """One wide row per emotion vector: ``cos_<nuisance>`` columns, the norm share left and the verdict.

    Columns: strategy, boundary, emotion, cos_<nuisance> (one per nuisance, in order), vector_norm,
    share_left, span_rank, max_abs_cosine, worst_nuisance, flagged, reason.
    """
    keys = ["strategy", "boundary", "emotion"]
    order = list(dict.fromkeys(cosines["nuisance"]))
    wide = cosines.pivot(index=keys, columns="nuisance", values="cosine")[order]
    wide.columns = [f"cos_{c}" for c in order]
    out = wide.reset_index().merge(norm_share[[*keys, "vector_norm", "share_left", "span_rank"]], on=keys)
    out = out.merge(flags[[*keys, "max_abs_cosine", "worst_nuisance", "flagged", "reason"]], on=keys)
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------
# External validation sets


@dataclass(frozen=True)
class ValidationSet:
    """A labelled prompt set nothing was fitted on."""

    name: str
    texts: list[str]
    labels: list[str]
    registers: list[str]


def load_validation_set(
    path: str | Path, dataset_texts: Sequence[str], threshold: float = 0.9
) -> ValidationSet:
    """Read and validate a validation set (:func:`load_prompts` rules), then refuse any prompt that is a
    near-duplicate (character-trigram Jaccard ≥ ``threshold``) of a prompt of the main dataset."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Validation set {path} does not exist; fix or remove it in the profile's `validation_sets`."
        )
    frame = load_prompts(path, near_duplicate_threshold=threshold)
    n = len(dataset_texts)
    texts = frame["text"].tolist()
    problems = [
        Problem(
            ((path.name, int(frame["source_line"].iloc[j - n])),),
            f"near-duplicate of dataset prompt {dataset_texts[i]!r} (trigram Jaccard {sim:.2f} ≥ {threshold})",
            "a validation prompt must be new to the study: reword it substantially or delete it",
        )
        for i, j, sim in find_near_duplicates([*dataset_texts, *texts], threshold)
        if i < n <= j  # one side in the dataset, the other in the validation set
    ]
    if problems:
        raise DatasetError(path, problems)
    return ValidationSet(
        name=path.stem,
        texts=texts,
        labels=frame["emotion"].astype(str).tolist(),
        registers=frame["register"].astype(str).tolist(),
    )


def validation_scores(
    probes: Mapping[str, LayerProbes],
    sets: Sequence[ValidationSet],
    acts: Mapping[str, ActsByStrategy],
    boundaries: Sequence[int],
    evaluator_scores: Mapping[str, pd.DataFrame] | None = None,
    label_columns: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Train-split probes (per strategy) and the evaluator scored on each validation set.

    ``acts[set name][strategy]`` holds the set's pooled activations; ``evaluator_scores[set name]`` the
    evaluator's score table for its texts, read through ``label_columns`` (label → column, argmax wins).
    Columns: validation_set, scorer, strategy, boundary, accuracy, macro_f1, n, chance, note; the
    evaluator rows have strategy ``-`` and boundary -1, and NaN scores with a note when unavailable.
    """
    rows = []
    for vset in sets:
        labels = np.asarray(vset.labels, dtype=object).astype(str)
        everything = {ALL: np.ones(len(labels), dtype=bool)}
        for strategy, probe in probes.items():
            table = probe.score(acts[vset.name][strategy], labels, everything)
            for r in table.itertuples():
                rows.append(
                    {
                        "validation_set": vset.name,
                        "scorer": "probe",
                        "strategy": strategy,
                        "boundary": int(boundaries[r.position]),
                        "accuracy": r.accuracy,
                        "macro_f1": r.macro_f1,
                        "n": r.n,
                        "chance": r.chance,
                        "note": "" if r.converged else "probe did not converge",
                    }
                )
        scores = (evaluator_scores or {}).get(vset.name)
        accuracy = macro_f1 = math.nan
        note = "no evaluator scores"
        if scores is not None and label_columns:
            missing = [c for c in label_columns.values() if c not in scores.columns]
            mat = scores[[c for c in label_columns.values() if c in scores.columns]]
            if missing:
                note = f"evaluator has no columns {missing}"
            elif mat.isna().to_numpy().any():
                note = "evaluator scores contain nulls"
            else:
                predicted = np.asarray(list(label_columns))[mat.to_numpy(dtype=float).argmax(axis=1)]
                accuracy, macro_f1 = _scores(labels, predicted)
                note = "embedded evaluator fit on the train fitting prompts"
        rows.append(
            {
                "validation_set": vset.name,
                "scorer": "evaluator",
                "strategy": "-",
                "boundary": -1,
                "accuracy": accuracy,
                "macro_f1": macro_f1,
                "n": len(labels),
                "chance": math.nan,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------
# The whole audit


@dataclass(frozen=True)
class ConfoundAudit:
    """Every table of one audit (columns in each producer's docstring) and the nuisance directions."""

    surface_baselines: pd.DataFrame
    nuisance_summary: pd.DataFrame  # nuisance, kind, estimated, n_prompts, reason, detail
    vector_cosines: pd.DataFrame
    norm_share: pd.DataFrame
    vector_flags: pd.DataFrame
    vector_audit: pd.DataFrame
    probe_by_register: pd.DataFrame  # + strategy
    emotion_cosines: pd.DataFrame
    validation: pd.DataFrame
    nuisances: list[Nuisance]


Extractor = Callable[[list[str]], ActsByStrategy]


def audit_confounds(
    pooled: ActsByStrategy,
    frame: pd.DataFrame,
    boundaries: Sequence[int],
    vectors: Mapping[str, Mapping[str, Float[Tensor, "n_boundaries d_model"]]],
    *,
    fitting: np.ndarray,
    extract: Extractor,
    emotion_words: Mapping[str, Sequence[str]],
    seed: int,
    validation_sets: Sequence[ValidationSet] = (),
    score_texts: Callable[[list[str]], pd.DataFrame] | None = None,
    label_columns: Mapping[str, str] | None = None,
    cosine_threshold: float = 0.5,
    baseline_margin: float = 0.05,
) -> ConfoundAudit:
    """Run the whole audit on one model's pooled activations.

    ``frame`` is row-aligned with ``pooled`` and has text, emotion, split and register; ``fitting`` marks
    the rows that may fit anything. ``extract(texts)`` returns pooled activations at ``boundaries`` for
    every strategy of ``pooled`` — called once, on the punctuation counterfactuals of every neutral fitting
    prompt (and the prompts as they are) plus every validation text. ``score_texts`` is the evaluator
    fitted on the train fitting prompts.
    """
    n = len(frame)
    if any(x.shape[0] != n or x.shape[1] != len(boundaries) for x in pooled.values()):
        raise ValueError(
            f"Pooled activations do not match the {n} index rows × {len(boundaries)} boundaries."
        )
    fitting = np.asarray(fitting, dtype=bool)
    texts = frame["text"].astype(str).tolist()
    labels = frame["emotion"].astype(str).to_numpy()
    registers = frame["register"].fillna("unspecified").astype(str).to_numpy()
    train = (frame["split"] == "train").to_numpy() & fitting
    held = (frame["split"] == "eval").to_numpy() & fitting

    neutral_rows = np.flatnonzero(fitting & (labels == NEUTRAL))
    if neutral_rows.size == 0:
        raise ValueError("No neutral fitting prompts: the punctuation counterfactuals need some.")
    neutral_texts = [texts[i] for i in neutral_rows]
    edits = punctuation_counterfactuals(neutral_texts)
    batch = [
        *neutral_texts,
        *(t for edit in edits.values() for t in edit),
        *(t for v in validation_sets for t in v.texts),
    ]
    extracted = extract(batch)
    missing = sorted(set(pooled) - set(extracted))
    if missing:
        raise ValueError(
            f"The extractor returned no {missing} pooling; it must return every stored strategy."
        )
    m = len(neutral_texts)
    original = {s: extracted[s][:m] for s in pooled}
    edited = {
        name: {s: extracted[s][(k + 1) * m : (k + 2) * m] for s in pooled} for k, name in enumerate(edits)
    }
    changed = {
        name: sum(a != b for a, b in zip(edit, neutral_texts, strict=True)) for name, edit in edits.items()
    }
    nuisances = counterfactual_directions(original, edited, changed)
    nuisances += class_contrast_nuisances(pooled, texts, labels, registers, train)

    cosines, shares = vector_geometry(vectors, nuisances, boundaries)
    baselines = surface_baselines(texts, labels, registers, train, held, emotion_words, seed)
    probes = {s: fit_layer_probes(x, labels, train, seed) for s, x in pooled.items()}
    by_register = pd.concat(
        [
            probe_by_register(probes[s], x, labels, registers, held, boundaries).assign(strategy=s)
            for s, x in pooled.items()
        ],
        ignore_index=True,
    )
    by_register = by_register[["strategy", *[c for c in by_register.columns if c != "strategy"]]]
    flags = flag_vectors(cosines, by_register, baselines, cosine_threshold, baseline_margin)

    offset = 4 * m
    val_acts: dict[str, dict[str, Tensor]] = {}
    for vset in validation_sets:
        val_acts[vset.name] = {s: extracted[s][offset : offset + len(vset.texts)] for s in pooled}
        offset += len(vset.texts)
    evaluator = {v.name: score_texts(v.texts) for v in validation_sets} if score_texts else None
    validation = validation_scores(probes, validation_sets, val_acts, boundaries, evaluator, label_columns)

    summary = pd.DataFrame(
        [
            {
                "nuisance": nz.name,
                "kind": nz.kind,
                "estimated": nz.estimated,
                "n_prompts": nz.n_prompts,
                "reason": nz.reason,
                "detail": nz.detail,
            }
            for nz in nuisances
        ]
    )
    return ConfoundAudit(
        surface_baselines=baselines,
        nuisance_summary=summary,
        vector_cosines=cosines,
        norm_share=shares,
        vector_flags=flags,
        vector_audit=vector_audit(cosines, shares, flags),
        probe_by_register=by_register,
        emotion_cosines=emotion_cosines(vectors, boundaries),
        validation=validation,
        nuisances=nuisances,
    )
