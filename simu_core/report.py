"""The before/after evaluation report as one self-contained HTML page (plotly.js inlined, no network).

`render_html(after, before)` returns the page; `write_html(path, after, before)` writes it.
With `before=None` the page shows one model. Sections: headline numbers with deltas, bar charts
per split (before vs after, delta on the bars), membership-inference AUCs, the forget-set truth
ratio distributions (what forget quality compares), all numbers, per-example answers, and the
metrics that were skipped with their reasons.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from simu_core.metrics import MIA_ATTACKS, Report, compare, goal_of

HEADLINE = ("forget_quality", "model_utility", "privleak", "mia_score", "perplexity")
BAR_METRICS = (
    "rouge_l",
    "exact_match",
    "prob",
    "exact_memorization",
    "extraction_strength",
    "truth_ratio",
    "prob_vs_perturbed",
)
TABLE_VALUES = ("rouge_l", "prob", "truth_ratio")
COLORS = {"before": "#8c9bb0", "after": "#2f6fdf", "reference": "#e39b2d"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1d2430}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d8dde6;padding-bottom:4px}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}td,th{border:1px solid #d8dde6;padding:3px 7px;vertical-align:top}
th{background:#f2f4f8;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#6b7280}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #d8dde6;border-radius:8px;padding:10px 14px;min-width:170px}
.card .v{font-size:1.4em;font-weight:600}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _delta_cell(delta, improved) -> str:
    if delta is None:
        return '<td class="num muted">–</td>'
    css = "num" if improved is None else ("num good" if improved else "num bad")
    return f'<td class="{css}">{"+" if delta > 0 else ""}{_fmt(delta)}</td>'


def _e(text) -> str:
    return html.escape(str(text))


def _figure_html(fig, div_id: str) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 50, "r": 20, "t": 50, "b": 40}, height=360)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _headline(after: Report, before: Report | None) -> str:
    deltas = compare(before, after) if before else {}
    cards = []
    for key in HEADLINE:
        value = after.summary.get(key)
        line = ""
        if key in deltas and deltas[key].delta is not None:
            d = deltas[key]
            css = "" if d.improved is None else ("good" if d.improved else "bad")
            line = f'<div class="{css}">{"+" if d.delta > 0 else ""}{_fmt(d.delta)} (before {_fmt(d.before)})</div>'
        reason = after.skipped.get(key)
        note = f'<div class="muted">skipped: {_e(reason)}</div>' if reason else ""
        goal = goal_of(key)
        cards.append(
            f'<div class="card"><div class="muted">{_e(key)} ({_e(goal or "info")} is better)</div>'
            f'<div class="v">{_fmt(value)}</div>{line}{note}</div>'
        )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _split_bars(after: Report, before: Report | None, split: str) -> str:
    fig = split_bars_figure(after, before, split)
    return _figure_html(fig, f"bars-{split}") if fig is not None else ""


def _delta_text(delta) -> str:
    if delta is None or delta.delta is None:
        return ""
    return f"{'+' if delta.delta > 0 else ''}{delta.delta:.3f}"


def _mia_bars(after: Report, before: Report | None) -> str:
    import plotly.graph_objects as go

    keys = [f"mia_auc_{a}" for a in MIA_ATTACKS if after.summary.get(f"mia_auc_{a}") is not None]
    if not keys:
        return ""
    fig = go.Figure()
    for label, report in (("before", before), ("after", after)):
        if report is not None:
            fig.add_bar(
                name=f"{label} ({report.model})",
                x=keys,
                y=[report.summary.get(k) for k in keys],
                marker_color=COLORS[label],
            )
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="0.5 = forget and holdout look alike")
    fig.update_layout(
        title="Membership inference AUC, forget vs holdout (1 = forget set recognised)", yaxis_range=[0, 1.05]
    )
    return _figure_html(fig, "mia")


def _truth_ratio_hist(after: Report, before: Report | None) -> str:
    import plotly.graph_objects as go

    series = []
    for label, report in (("before", before), ("after", after)):
        if report is not None and "forget" in report.splits and "truth_ratio" in report.splits["forget"].values:
            series.append((f"{label} ({report.model})", report.values("forget", "truth_ratio"), COLORS[label]))
    ref = after.reference_values.get("forget", {}).get("truth_ratio")
    if ref:
        series.append((f"reference ({after.reference})", np.array(ref, dtype=float), COLORS["reference"]))
    if not series:
        return ""
    fig = go.Figure()
    for name, values, color in series:
        values = values[np.isfinite(values) & (values > 0)]
        fig.add_histogram(x=np.log10(values), name=name, marker_color=color, opacity=0.6, nbinsx=30)
    fig.update_layout(
        title="Forget-set truth ratios, log10 R (forget quality = KS test of after vs reference)",
        barmode="overlay",
        xaxis_title="log10 R  (R < 1: prefers the true answer)",
    )
    return _figure_html(fig, "truth-ratio")


def _all_numbers(after: Report, before: Report | None) -> str:
    rows = []
    if before is not None:
        deltas = compare(before, after)
        head = "<tr><th>metric</th><th>goal</th><th>before</th><th>after</th><th>delta</th></tr>"
        for key, d in deltas.items():
            rows.append(
                f"<tr><td>{_e(key)}</td><td>{_e(d.goal)}</td><td class=num>{_fmt(d.before)}</td>"
                f"<td class=num>{_fmt(d.after)}</td>{_delta_cell(d.delta, d.improved)}</tr>"
            )
    else:
        head = "<tr><th>metric</th><th>goal</th><th>value</th></tr>"
        for key, value in after.summary.items():
            rows.append(f"<tr><td>{_e(key)}</td><td>{_e(goal_of(key))}</td><td class=num>{_fmt(value)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _examples(after: Report, before: Report | None, split: str) -> str:
    res = after.splits[split]
    prev = before.splits.get(split) if before is not None else None
    prev_rows = {idx: i for i, idx in enumerate(prev.indices)} if prev is not None else {}
    cols = [m for m in TABLE_VALUES if m in res.values]
    head = "<tr><th>#</th><th>question</th><th>gold answer</th>"
    head += "<th>answer before</th>" if prev is not None else ""
    head += "<th>answer</th>" + "".join(f"<th>{_e(m)}{' before / after' if prev else ''}</th>" for m in cols) + "</tr>"
    rows = []
    for i, idx in enumerate(res.indices):
        j = prev_rows.get(idx)
        cells = [f"<td class=num>{idx}</td><td>{_e(res.questions[i])}</td><td>{_e(res.answers[i])}</td>"]
        if prev is not None:
            cells.append(f"<td>{_e(prev.generations[j]) if j is not None and prev.generations else '–'}</td>")
        cells.append(f"<td>{_e(res.generations[i]) if res.generations else '–'}</td>")
        for m in cols:
            now = _fmt(res.values[m][i], 3)
            was = _fmt(prev.values[m][j], 3) if j is not None and m in prev.values else "–"
            cells.append(f"<td class=num>{was} / {now}</td>" if prev is not None else f"<td class=num>{now}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    title = f"{split} ({res.dataset}): {len(res.indices)} of {res.n_total} items"
    return f"<details><summary>{_e(title)}</summary><table>{head}{''.join(rows)}</table></details>"


def _header(after: Report, before: Report | None) -> str:
    models = f"<b>{_e(after.model)}</b>" + (f" compared with <b>{_e(before.model)}</b> (before)" if before else "")
    data = ", ".join(f"{_e(k)}: {_e(s.dataset)} ({len(s.indices)}/{s.n_total})" for k, s in after.splits.items())
    seconds = ", ".join(f"{_e(k)} {v:.1f}s" for k, v in after.seconds.items())
    return (
        f"<p>Model {models}; retain reference: <b>{_e(after.reference or 'none')}</b>.</p>"
        f"<p class=muted>Data: {data}.<br>Settings: {_e(json.dumps(after.settings))}<br>"
        f"Versions: {_e(json.dumps(after.versions))}<br>Time: {seconds}. Created {_e(after.created)}.</p>"
    )


def _skipped(after: Report) -> str:
    if not after.skipped and not after.notes:
        return ""
    rows = "".join(f"<tr><td>{_e(k)}</td><td>skipped: {_e(v)}</td></tr>" for k, v in after.skipped.items())
    rows += "".join(f"<tr><td>{_e(k)}</td><td>note: {_e(v)}</td></tr>" for k, v in after.notes.items())
    return f"<h2>Skipped metrics and notes</h2><table>{rows}</table>"


def render_html(after: Report, before: Report | None = None, title: str | None = None) -> str:
    """The whole report page as a string; plotly.js is inlined so the file opens offline."""
    from plotly.offline import get_plotlyjs

    title = title or (f"SIMU Studio evaluation: {after.model}" + (f" vs {before.model}" if before else ""))
    charts = [_split_bars(after, before, split) for split in after.splits]
    charts += [_mia_bars(after, before), _truth_ratio_hist(after, before)]
    body = [
        f"<h1>{_e(title)}</h1>",
        _header(after, before),
        "<h2>Headline</h2>",
        _headline(after, before),
        "<h2>Charts</h2>",
        *[c for c in charts if c],
        "<h2>All numbers</h2>",
        _all_numbers(after, before),
        "<h2>Per-example answers</h2>",
        *[_examples(after, before, split) for split in after.splits],
        _skipped(after),
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>{''.join(body)}</body></html>"
    )


def write_html(path: str | Path, after: Report, before: Report | None = None, title: str | None = None) -> Path:
    """Write `render_html(...)` to `path` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(after, before, title), encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# Figures for the app (plotly figure objects; the page above embeds its own as HTML)
# --------------------------------------------------------------------------------------------


def split_bars_figure(after: Report, before: Report | None, split: str):
    """Plotly grouped bars of one split's scores (0–1), before vs after, the delta written on the after
    bars; None when the split has none of `BAR_METRICS`."""
    import plotly.graph_objects as go

    names = [m for m in BAR_METRICS if after.summary.get(f"{split}/{m}") is not None]
    if not names:
        return None
    deltas = compare(before, after) if before is not None else {}
    fig = go.Figure()
    if before is not None:
        fig.add_bar(name=f"before ({before.model})", x=names, y=[before.summary.get(f"{split}/{m}") for m in names],
                    marker_color=COLORS["before"])  # fmt: skip
    fig.add_bar(
        name=f"after ({after.model})" if before is not None else after.model,
        x=names,
        y=[after.summary.get(f"{split}/{m}") for m in names],
        text=[_delta_text(deltas.get(f"{split}/{m}")) for m in names] if deltas else None,
        textposition="outside",
        marker_color=COLORS["after"],
    )
    fig.update_layout(
        title=f"{split} split: scores before and after" + (" (delta on the after bars)" if deltas else ""),
        barmode="group",
        xaxis_title="metric",
        yaxis_title="score (0–1)",
        yaxis_range=[0, 1.15],
        legend={"orientation": "h", "y": -0.3},
        margin={"t": 50},
    )
    return fig


def runs_figure(reports: dict[str, Report], keys: list[str]):
    """Plotly grouped bars comparing several reports (one colour each) on summary `keys` (0–1 scores)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, report in reports.items():
        fig.add_bar(name=name, x=list(keys), y=[report.summary.get(k) for k in keys])
    fig.update_layout(
        title="Runs compared",
        barmode="group",
        xaxis_title="metric (split/metric)",
        yaxis_title="score (0–1)",
        yaxis_range=[0, 1.05],
        legend={"orientation": "h", "y": -0.3},
        margin={"t": 50},
    )
    return fig
