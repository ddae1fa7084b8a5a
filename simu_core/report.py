"""The before/after evaluation report as one self-contained HTML page (plotly.js inlined, no network).

`render_html(after, before)` returns the page; `write_html(path, after, before)` writes it.
With `before=None` the page shows one model. Sections: headline numbers with deltas, bar charts
per split (before vs after, delta on the bars), membership-inference AUCs, the forget-set truth
ratio distributions (what forget quality compares), all numbers, per-example answers, and the
metrics that were skipped with their reasons. The charts come from `simu_core.figures` (this
module writes HTML and imports no plotting library itself).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from simu_core import figures
from simu_core.metrics import Report, compare, goal_of

HEADLINE = ("forget_quality", "model_utility", "privleak", "mia_score", "perplexity")
TABLE_VALUES = ("exact_match", "answer_contained", "rouge_l", "prob", "truth_ratio")

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
    title = title or (f"SIMU Studio evaluation: {after.model}" + (f" vs {before.model}" if before else ""))
    charts = [(f"bars-{split}", figures.split_bars_figure(after, before, split)) for split in after.splits]
    charts += [
        ("mia", figures.mia_auc_figure(after, before)),
        ("truth-ratio", figures.truth_ratio_figure(after, before)),
    ]
    body = [
        f"<h1>{_e(title)}</h1>",
        _header(after, before),
        "<h2>Headline</h2>",
        _headline(after, before),
        "<h2>Charts</h2>",
        *[figures.figure_html(fig, div_id) for div_id, fig in charts if fig is not None],
        "<h2>All numbers</h2>",
        _all_numbers(after, before),
        "<h2>Per-example answers</h2>",
        *[_examples(after, before, split) for split in after.splits],
        _skipped(after),
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style><script>{figures.plotly_js()}</script></head><body>{''.join(body)}</body></html>"
    )


def write_html(path: str | Path, after: Report, before: Report | None = None, title: str | None = None) -> Path:
    """Write `render_html(...)` to `path` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(after, before, title), encoding="utf-8")
    tmp.replace(path)
    return path
