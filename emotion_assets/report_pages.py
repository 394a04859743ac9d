"""Rendering of the findings report: sections with anchors and their plots inline, the claims table first,
as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

#: Which section shows the plots of each asset.
FIGURE_SECTIONS = {
    "emotion_dataset": "dataset",
    "evaluator_quality": "evaluator-quality",
    "activations": "representations",
    "emotion_subspaces": "representations",
    "emotion_vectors": "representations",
    "confound_audit": "confound-vectors",
    "residual_patching": "steering",
    "patching_statistics": "corrected-effects",
    "head_screening": "top-heads",
    "head_patching": "head-patching",
    "emotion_circuits": "circuits",
    "subspace_alignment": "alignment",
    "k_selection": "k-selection",
}
#: The section that lists plots of assets no section claims (named, never dropped).
UNPLACED = "unplaced-plots"
_ANCHOR = re.compile(r"^[a-z0-9][a-z0-9-]*$")
STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;"
    "vertical-align:top}figure{display:inline-block;margin:8px}img{max-width:520px}"
    ".supported{background:#dfd}.not-supported{background:#fdd}.confounded{background:#fed}"
    ".not-tested{background:#eee}"
)


@dataclass(frozen=True)
class Figure:
    """A published plot: its checked file and its label (``asset/partition/file.png``)."""

    path: Path
    label: str


@dataclass
class Section:
    """One report section: its anchor (``id`` in HTML, an ``<a id>`` in Markdown), its Markdown (heading,
    note, table) and the plots shown beside the table."""

    anchor: str
    markdown: str
    figures: list[Figure] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _ANCHOR.match(self.anchor):
            raise ValueError(f"Section anchor {self.anchor!r} must be lower-case letters, digits and '-'.")


def place_figures(sections: Sequence[Section], figures: Sequence[tuple[str, Path, str]]) -> list[Section]:
    """Each plot ``(asset, path, label)`` attached to the section of :data:`FIGURE_SECTIONS`; plots of
    other assets go to a closing section that names them."""
    by_anchor = {s.anchor: s for s in sections}
    unplaced = []
    for asset, path, label in figures:
        anchor = FIGURE_SECTIONS.get(asset)
        if anchor in by_anchor:
            by_anchor[anchor].figures.append(Figure(path, label))
        else:
            unplaced.append(Figure(path, label))
    if not unplaced:
        return list(sections)
    names = ", ".join(sorted({f.label.split("/")[0] for f in unplaced}))
    note = f"## Plots of assets without a section\n\nAssets: {html.escape(names)}.\n"
    return [*sections, Section(UNPLACED, note, unplaced)]


def _links_markdown(evidence: str) -> str:
    return ", ".join(f"[{a}](#{a})" for a in evidence.split())


def _cell(text: object) -> str:
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ")


def claims_markdown(claims: pd.DataFrame, counts: pd.DataFrame) -> str:
    """The claims section in Markdown: verdict counts per kind, then one row per claim."""
    lines = [
        "## Claims and verdicts",
        '<a id="claims"></a>',
        "",
        "Each claim is generated from the statistics below and linked to its evidence. **supported**: every "
        "check passed; **not supported**: a check failed (named); **confounded**: every check passed but the "
        "confound audit flags the vector (named); **not tested**: evidence is missing (named).",
        "",
        counts.to_markdown(index=False),
        "",
        "| verdict | claim | why | evidence |",
        "|---|---|---|---|",
    ]
    for r in claims.itertuples():
        why = r.reasons or ("audit flag: " + r.confound if r.confound else "")
        lines.append(
            f"| **{r.verdict}** | {_cell(r.sentence)} | {_cell(why)} | {_links_markdown(r.evidence)} |"
        )
    return "\n".join(lines) + "\n"


def claims_html(claims: pd.DataFrame, counts: pd.DataFrame, known: set[str]) -> str:
    """The claims section as HTML (every text escaped; links only to anchors of this page in ``known``)."""
    missing = sorted({a for e in claims["evidence"] for a in e.split()} - known)
    if missing:
        raise ValueError(f"Claims cite sections {missing} that the report does not have; add those sections.")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in counts.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in counts.itertuples(index=False)
    )
    rows = []
    for r in claims.itertuples():
        why = r.reasons or ("audit flag: " + r.confound if r.confound else "")
        links = ", ".join(f'<a href="#{a}">{a}</a>' for a in r.evidence.split())
        css = r.verdict.replace(" ", "-")
        rows.append(f'<tr class="{css}" id="claim-{html.escape(r.claim_id)}"><td><b>{html.escape(r.verdict)}'
                    f"</b></td><td>{html.escape(r.sentence)}</td><td>{html.escape(why)}</td><td>{links}</td></tr>")  # fmt: skip
    return (
        '<section id="claims"><h2>Claims and verdicts</h2><p>Each claim is generated from the statistics below '
        "and linked to its evidence. <b>supported</b>: every check passed; <b>not supported</b>: a check failed "
        "(named); <b>confounded</b>: every check passed but the confound audit flags the vector (named); "
        "<b>not tested</b>: evidence is missing (named).</p>"
        f"<table><tr>{head}</tr>{body}</table><p></p>"
        "<table><tr><th>verdict</th><th>claim</th><th>why</th><th>evidence</th></tr>"
        f"{''.join(rows)}</table></section>"
    )


def page_markdown(header: str, claims: str, sections: Sequence[Section]) -> str:
    """The Markdown report: header, claims, then each section with its anchor and its plots' paths."""
    parts = [header, claims]
    for s in sections:
        heading, _, rest = s.markdown.partition("\n")
        plots = "".join(f"\n- plot: `{f.label}`" for f in s.figures)
        parts.append(f'{heading}\n<a id="{s.anchor}"></a>\n{rest}{plots}\n')
    return "\n".join(parts)


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    caption = html.escape(figure.label)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def page_html(header: str, claims: str, sections: Sequence[Section]) -> str:
    """One self-contained page: ``header`` (Markdown), ``claims`` (HTML), then each section as
    ``<section id=anchor>`` with its table and its plots inlined right after it."""
    convert = safe_markdown_html
    body = [convert(header), claims]
    for s in sections:
        figures = "".join(_figure(f) for f in s.figures)
        body.append(f'<section id="{s.anchor}">{convert(s.markdown)}{figures}</section>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Findings</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")  # fmt: skip


def safe_markdown_html(markdown: str) -> str:
    """Markdown to HTML with raw HTML escaped and links left as text: profile descriptions and table cells
    come from user files, and the page must not run or link to anything they contain."""
    import markdown as md_lib

    converter = md_lib.Markdown(extensions=["tables"])
    converter.preprocessors.deregister("html_block")
    for pattern in ("html", "link", "image_link", "reference", "image_reference", "short_reference",
                    "short_image_ref", "autolink", "automail"):  # fmt: skip
        converter.inlinePatterns.deregister(pattern)
    return converter.convert(markdown)
