"""How well an evaluator's scores separate known labels: classification quality and binary AUROC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def classification_quality(
    y_true: Sequence[str], scores: pd.DataFrame, label_columns: dict[str, str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, one-vs-rest AUROC per class and the confusion matrix of argmax predictions.

    ``label_columns`` maps each true label to the score column that stands for it; the prediction is the
    label whose column is largest. AUROC is ``None`` for a class absent from (or the only class in) y_true.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    labels = list(label_columns)
    y = np.asarray([str(v) for v in y_true])
    if len(y) != len(scores):
        raise ValueError(f"{len(y)} labels but {len(scores)} score rows.")
    stray = sorted(set(y.tolist()) - set(labels))
    if stray:
        raise ValueError(f"True labels {stray} have no score column in label_columns ({labels}).")
    mat = scores[[label_columns[lab] for lab in labels]].to_numpy(dtype=float)  # [n, n_labels]
    if np.isnan(mat).any():
        raise ValueError("Scores contain NaN; classification quality needs a complete score table.")
    pred = np.asarray(labels)[mat.argmax(axis=1)] if len(y) else np.asarray([], dtype=str)
    auroc: dict[str, float | None] = {}
    for j, lab in enumerate(labels):
        pos = y == lab
        auroc[lab] = float(roc_auc_score(pos, mat[:, j])) if 0 < pos.sum() < len(y) else None
    return {
        "labels": labels,
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else float("nan"),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
        if len(y)
        else float("nan"),
        "auroc": auroc,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist() if len(y) else [],
    }


def binary_auroc(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2; NaNs are dropped.

    Returns NaN when either side is empty.
    """
    pos = np.asarray(pos_scores, dtype=float)
    neg = np.asarray(neg_scores, dtype=float)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))
