"""Small matplotlib helpers: every plot is written as a PNG artifact and embedded in metadata."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import dagster as dg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emotion_assets.science.steering_analysis import RANDOM_KINDS, SELECTION_LABEL
from resources.storage import write_bytes


def save_figure(fig: plt.Figure, path: Path) -> dg.MetadataValue:
    """Write ``fig`` to ``path`` (PNG, atomically) and return a Markdown image for the UI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = buffer.getvalue()
    write_bytes(path, data)
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{encoded})")


def line_plot(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None,
    title: str,
    ylabel: str,
    band: tuple[str, str] | None = None,
) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    groups = frame.groupby(hue) if hue else [("", frame)]
    for name, group in groups:
        group = group.sort_values(x)
        ax.plot(group[x], group[y], marker="o", ms=3, label=str(name) if hue else None)
        if band:
            ax.fill_between(group[x], group[band[0]], group[band[1]], alpha=0.15)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if hue:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def heatmap(
    values: np.ndarray,
    row_labels: list,
    col_labels: list,
    title: str,
    xlabel: str,
    ylabel: str,
    center: bool = True,
) -> plt.Figure:
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.45 * len(col_labels) + 2), max(3.0, 0.3 * len(row_labels) + 1.5))
    )
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    kwargs = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit} if center else {"cmap": "viridis"}
    image = ax.imshow(values, aspect="auto", **kwargs)
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=45, fontsize=7)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def markdown_table(frame: pd.DataFrame, max_rows: int = 20, floatfmt: str = ".4g") -> dg.MetadataValue:
    shown = frame.head(max_rows)
    return dg.MetadataValue.md(shown.to_markdown(index=False, floatfmt=floatfmt))


def prompt_shift_plot(prompt_shifts: pd.DataFrame, best: pd.DataFrame, model: str) -> plt.Figure:
    """Per emotion: the confirmation-half per-prompt shift of the best cell beside the random controls'."""
    series = ["emotion vector", *RANDOM_KINDS]
    colors = dict(zip(series, ["tab:red", "tab:grey", "tab:blue"], strict=True))
    emotions = list(dict.fromkeys(prompt_shifts["emotion"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(emotions)), 3.6))
    rng = np.random.default_rng(0)  # jitter only
    for i, emotion in enumerate(emotions):
        for j, name in enumerate(series):
            values = prompt_shifts.loc[(prompt_shifts["emotion"] == emotion) & (prompt_shifts["series"] == name),
                                       "shift"].to_numpy()  # fmt: skip
            if values.size == 0:
                continue
            x = i * (len(series) + 1) + j
            ax.boxplot(values, positions=[x], widths=0.6, showfliers=False)
            ax.scatter(x + rng.uniform(-0.15, 0.15, values.size), values, s=10, alpha=0.7, color=colors[name],
                       label=name if i == 0 else None)  # fmt: skip
    cells = best.set_index("emotion")
    ticks = [i * (len(series) + 1) + 1 for i in range(len(emotions))]
    ax.set_xticks(ticks, [f"{e}\nL{int(cells.loc[e, 'layer'])}, α={cells.loc[e, 'alpha']:g}" for e in emotions],
                  fontsize=8)  # fmt: skip
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("per-prompt shift of the target score")
    ax.set_title(f"{model}: best fluent cells, {SELECTION_LABEL}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def specificity_heatmap(grid: pd.DataFrame, title: str, model_a: str, model_b: str):
    """Cross-fitted emotion × emotion overlaps on a fixed 0–1 colour scale, each cell annotated."""
    fig = heatmap(grid.to_numpy(), list(grid.index), list(grid.columns),
                  f"{title}\ncross-fitted overlap (diagonal = same emotion)", f"{model_b} emotion",
                  f"{model_a} emotion (mapped)", center=False)  # fmt: skip
    ax = fig.axes[0]
    ax.images[0].set_clim(0.0, 1.0)  # overlaps are cos² in [0, 1]: one scale for every pair and k
    ax.title.set_fontsize(8)
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if value < 0.6 else "black",
        )
    return fig


def overlap_vs_k_plot(sweep: pd.DataFrame, layer_a: int, model_a: str, model_b: str):
    import matplotlib.pyplot as plt

    at_layer = sweep[sweep["layer_a"] == layer_a]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (method, emotion), group in at_layer.groupby(["method", "emotion"]):
        ax.plot(group["k"], group["overlap"], marker="o", ms=3, label=f"{method} · {emotion}")
    null = at_layer.groupby("k")[["null_mean", "null_p95", "chance"]].mean().reset_index()
    ax.fill_between(null["k"], 0, null["null_p95"], color="grey", alpha=0.25, label="null (≤ p95)")
    ax.plot(null["k"], null["chance"], color="black", ls=":", lw=1, label="chance k/d")
    ax.set_xlabel("k")
    ax.set_ylabel("overlap (mean cos²)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{model_a} → {model_b}, A boundary {layer_a}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig
