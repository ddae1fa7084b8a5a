"""Every plotly figure of SIMU Studio, for the pages, the HTML evaluation report and the benchmark.

The only module of `simu_core` that imports plotly. Each builder takes what an algorithm module
returned (scores, a mask, a run's history, a path, an evaluation `Report`, benchmark records) and
returns a `plotly.graph_objects.Figure` (or None when there is nothing to draw); nothing here
computes beyond scaling and arranging for display. Sections:

- attribution: `scores_heatmap`, `selection_scatter`, `selection_bars`, `token_figure`;
- unlearning runs: `history_figure`;
- mode connectivity: `path_figure`;
- evaluation reports: `split_bars_figure`, `mia_auc_figure`, `truth_ratio_figure`, `runs_figure`;
- the quality benchmark: `scatter_figure`, `quality_figures`;
- HTML: `figure_html` (a figure as a `<div>` for the report page), `plotly_js` (the library, to
  inline once), `write_figures` (a self-contained page of figures).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from simu_core.attribution import TokenAttribution
from simu_core.connectivity import PathResult
from simu_core.metrics import MIA_ATTACKS, Delta, Report, compare
from simu_core.neurons import NeuronMask, NeuronScores

# --------------------------------------------------------------------------------------------
# Attribution: neuron scores, the selected mask, token-level attribution
# --------------------------------------------------------------------------------------------

_SELECTION_COLORS = {"selected": "#d62728", "dual": "#9467bd", "other": "#b8c2cc"}


def _layer_scaled(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores divided by that layer's largest |score| (so layers of any scale compare)."""
    return [s.float() / s.abs().max().clamp_min(1e-30) for s in layers]


def scores_heatmap(scores: NeuronScores, max_columns: int = 1024) -> go.Figure:
    """Heat map: one row per decoder layer, one column per neuron, colour = score / the layer's
    largest |score| (red supports the answer). Wider layers are shown in bins of neighbouring neurons,
    each bin showing its value of largest magnitude."""
    width = max(scores.widths())
    size = max(1, math.ceil(width / max_columns))
    rows = []
    for s in _layer_scaled(scores.layers):
        padded = torch.full((math.ceil(width / size) * size,), float("nan"))
        padded[: s.numel()] = s
        bins = padded.view(-1, size)
        pick = bins.nan_to_num(0).abs().argmax(1, keepdim=True)
        rows.append(bins.gather(1, pick).squeeze(1).tolist())
    x = [i * size for i in range(len(rows[0]))]
    fig = go.Figure(
        go.Heatmap(
            z=rows,
            x=x,
            y=list(range(len(rows))),
            colorscale="RdBu_r",
            zmid=0,
            zmin=-1,
            zmax=1,
            colorbar={"title": {"text": "score ÷ layer max |score|"}},
            hovertemplate="layer %{y}, neuron %{x}<br>scaled score %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Neuron scores on '{scores.data}' ({scores.method}, m={scores.steps})",
        xaxis_title="neuron index" + (f" (bins of {size} neurons)" if size > 1 else ""),
        yaxis_title="decoder layer",
        yaxis={"dtick": 1, "autorange": "reversed"},
        height=max(260, 60 + 36 * len(rows)),
        margin={"t": 50, "b": 40},
    )
    return fig


def selection_scatter(
    forget: NeuronScores, retain: NeuronScores, mask: NeuronMask, dual: Sequence[torch.Tensor]
) -> go.Figure:
    """Scatter, one point per neuron: forget vs retain score (each divided by its layer's largest
    |score|); colours: selected by `mask`, dual (critical for forget and retain), not selected.
    `dual`: bool [d_ff] per layer. Duals outside the mask are labelled as excluded."""
    fx, ry = torch.cat(_layer_scaled(forget.layers)), torch.cat(_layer_scaled(retain.layers))
    layer = torch.cat([torch.full((w,), i) for i, w in enumerate(forget.widths())])
    neuron = torch.cat([torch.arange(w) for w in forget.widths()])
    chosen, both = torch.cat(list(mask.layers)), torch.cat(list(dual))
    excluded = bool((both & ~chosen).any())
    groups = [
        ("other", ~chosen & ~both, "not selected"),
        ("selected", chosen & ~both, "selected, forget only"),
        ("dual", both, "dual: critical for forget and retain, " + ("excluded" if excluded else "selected")),
    ]
    fig = go.Figure()
    for kind, where, label in groups:
        idx = torch.nonzero(where).flatten()
        fig.add_trace(
            go.Scattergl(
                x=fx[idx].tolist(),
                y=ry[idx].tolist(),
                mode="markers",
                name=f"{label} ({len(idx)})",
                marker={
                    "color": _SELECTION_COLORS[kind],
                    "size": 5 if kind == "other" else 7,
                    "symbol": "diamond" if kind == "dual" else "circle",
                },
                customdata=torch.stack([layer[idx], neuron[idx]], 1).tolist(),
                hovertemplate="layer %{customdata[0]}, neuron %{customdata[1]}<br>forget %{x:.3f}, retain %{y:.3f}"
                "<extra></extra>",
            )
        )
    fig.update_layout(
        title="Forget vs retain score per neuron",
        xaxis_title="forget score ÷ layer max |score|",
        yaxis_title="retain score ÷ layer max |score|",
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50},
    )
    return fig


def selection_bars(mask: NeuronMask, dual: Sequence[torch.Tensor] | None = None) -> go.Figure:
    """Stacked bars: selected neurons per decoder layer (dual neurons in the mask shown apart)."""
    widths, counts = mask.widths(), mask.counts()
    duals = [0] * len(counts)
    if dual is not None:
        duals = [int((d & m).sum()) for d, m in zip(dual, mask.layers, strict=True)]
    layers = list(range(len(counts)))
    fig = go.Figure()
    fig.add_bar(x=layers, y=[c - d for c, d in zip(counts, duals, strict=True)], name="selected",
                marker_color=_SELECTION_COLORS["selected"])  # fmt: skip
    if any(duals):
        fig.add_bar(x=layers, y=duals, name="dual (kept in the mask)", marker_color=_SELECTION_COLORS["dual"])
    fig.add_scatter(
        x=layers,
        y=counts,
        mode="text",
        text=[f"{c} / {w}" for c, w in zip(counts, widths, strict=True)],
        textposition="top center",
        showlegend=False,
        hoverinfo="skip",
    )
    fig.update_layout(
        title="Selected neurons per layer",
        barmode="stack",
        xaxis_title="decoder layer",
        yaxis_title="neurons selected",
        xaxis={"dtick": 1},
        yaxis={"range": [0, max(1, max(counts)) * 1.25]},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50},
    )
    return fig


def token_figure(result: TokenAttribution) -> go.Figure:
    """A `TokenAttribution`: per prompt token the total attribution (bars, top) and the matrix answer
    token x prompt token (heat map, bottom); units: nats of answer log-probability."""
    xs = list(range(len(result.prompt_tokens)))
    ys = list(range(len(result.answer_tokens)))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.04)
    fig.add_bar(x=xs, y=result.per_prompt_token, marker_color="#d62728", name="sum over the answer", row=1, col=1)
    limit = max((abs(v) for row in result.matrix for v in row), default=1.0) or 1.0
    fig.add_trace(
        go.Heatmap(
            z=result.matrix,
            x=xs,
            y=ys,
            colorscale="RdBu_r",
            zmid=0,
            zmin=-limit,
            zmax=limit,
            colorbar={"title": {"text": "nats"}, "y": 0.35, "len": 0.7},
            hovertemplate="answer token %{y}, prompt token %{x}<br>%{z:.4f} nats<extra></extra>",
        ),
        row=2,
        col=1,
    )
    ticks = {"tickmode": "array", "tickvals": xs, "ticktext": [repr(t)[1:-1] for t in result.prompt_tokens]}
    fig.update_xaxes(title_text="prompt token", tickangle=-45, row=2, col=1, **ticks)
    fig.update_yaxes(title_text="answer token", tickmode="array", tickvals=ys,
                     ticktext=[repr(t)[1:-1] for t in result.answer_tokens], autorange="reversed", row=2, col=1)  # fmt: skip
    fig.update_yaxes(title_text="nats", row=1, col=1)
    fig.update_layout(
        title="Which prompt tokens support each answer token (Captum, integrated gradients on the embeddings)",
        showlegend=False,
        height=max(380, 180 + 22 * len(ys)),
        margin={"t": 60},
    )
    return fig


# --------------------------------------------------------------------------------------------
# Unlearning runs: losses per step
# --------------------------------------------------------------------------------------------

_RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def history_figure(histories: dict[str, list[dict]], title: str = "Losses during unlearning") -> go.Figure:
    """Line chart of per-step records (`runs.read_history` dicts or `StepRecord.to_dict()`).

    One run: forget loss (red) and retain loss (blue) per step, and the forget set's greedy exact match
    on evaluation steps (right axis). Several runs: one colour per run, forget solid, retain dashed.
    Losses are the batch losses in nats per answer token.
    """
    fig = go.Figure()
    single = len(histories) == 1
    for i, (name, records) in enumerate(histories.items()):
        steps = [r["step"] for r in records]
        color = _RUN_COLORS[i % len(_RUN_COLORS)]
        prefix = "" if single else f"{name}: "
        fig.add_scatter(x=steps, y=[r["forget_loss"] for r in records], mode="lines", name=f"{prefix}forget loss",
                        line={"color": "#d62728" if single else color})  # fmt: skip
        if any(r.get("retain_loss") is not None for r in records):
            fig.add_scatter(x=steps, y=[r.get("retain_loss") for r in records], mode="lines",
                            name=f"{prefix}retain loss",
                            line={"color": "#1f77b4" if single else color, "dash": "solid" if single else "dash"})  # fmt: skip
        evals = [r for r in records if r.get("forget_em") is not None]
        if single and evals:
            fig.add_scatter(x=[r["step"] for r in evals], y=[r["forget_em"] for r in evals], mode="markers+lines",
                            name="forget exact match (right axis)", yaxis="y2",
                            line={"color": "#7f7f7f", "dash": "dot"})  # fmt: skip
            fig.update_layout(yaxis2={"title": "forget exact match (0–1)", "overlaying": "y", "side": "right",
                                      "range": [0, 1.05], "showgrid": False})  # fmt: skip
    fig.update_layout(
        title=title,
        xaxis_title="optimiser step",
        xaxis_tickformat="d",
        yaxis_title="loss (nats / answer token)",
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50},
    )
    return fig


# --------------------------------------------------------------------------------------------
# Mode connectivity: loss along a path
# --------------------------------------------------------------------------------------------

_SPLIT_COLORS = {"forget": "#d62728", "retain": "#1f77b4"}
_FALLBACK_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def curve_points(records: Sequence[dict]) -> list[dict]:
    """The trade-off curve points of a run's per-step records (`StepRecord.curve`), each with its step."""
    return [{"step": r["step"], **r["curve"]} for r in records if r.get("curve")]


def tradeoff_figure(
    curves: dict[str, list[dict]], reference: float | None = None, x: str = "forget/rouge_l"
) -> go.Figure:
    """What each run keeps (y) against what it still knows of the forget set (x), one line per run along its
    checkpoints (`curve_points`; hover: the step), one panel per kept set (retain, world facts, ...), and one
    for the forget set's fact probe where the points have it (how much of the facts is still predictable).

    x runs from right (before unlearning) to left; `reference`: the retain reference's forget score, drawn
    as a vertical line (MUSE's rule reads each curve where it first crosses it)."""
    panels = sorted({k for points in curves.values() for p in points for k in p if k.endswith("/exact_match")}
                    - {x.split("/")[0] + "/exact_match"})  # fmt: skip
    probe = f"{x.split('/')[0]}/fact_probe"  # what of the forget facts is still predictable, where recorded
    panels += [probe] if any(probe in p for points in curves.values() for p in points) else []
    titles = [k.split("/")[0].replace("_", " ") + (" fact probe" if k == probe else " exact match") for k in panels]
    fig = make_subplots(rows=1, cols=max(1, len(panels)), shared_xaxes=True, subplot_titles=titles)
    for i, (name, points) in enumerate(curves.items()):
        color = _RUN_COLORS[i % len(_RUN_COLORS)]
        for col, key in enumerate(panels, start=1):
            fig.add_scatter(x=[p.get(x) for p in points], y=[p.get(key) for p in points], mode="lines+markers",
                            name=name, legendgroup=name, showlegend=col == 1, line={"color": color},
                            text=[f"step {p['step']}" for p in points], row=1, col=col,
                            hovertemplate="%{text}<br>forget %{x:.3f}<br>%{y:.3f}<extra>" + name + "</extra>")  # fmt: skip
    if reference is not None:
        for col in range(1, len(panels) + 1):
            fig.add_vline(x=reference, line={"color": "#7f7f7f", "dash": "dot"}, row=1, col=col)
    title = "Trade-off along each run: kept (exact match) against forget " + x.split("/")[1].replace("_", "-").upper()
    if reference is not None:
        title += f" (dotted: the retain reference, {reference:.3f})"
    fig.update_layout(title=title, height=420, margin={"l": 60, "r": 20, "t": 70, "b": 50})
    fig.update_xaxes(title_text=x.replace("/", " ").replace("_", " "), autorange="reversed")
    fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def path_figure(result: PathResult) -> go.Figure:
    """Loss (nats per answer token) vs t for each split, the linear path dashed when present, each
    split's barrier marked at its peak; ROUGE-L recall in a second panel when present."""
    rows = 2 if result.rouge_l else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for i, (name, values) in enumerate(result.losses.items()):
        color = _SPLIT_COLORS.get(name, _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])
        fig.add_trace(
            go.Scatter(x=result.ts, y=values, mode="lines+markers", name=f"{name} ({result.curve})", line_color=color),
            row=1,
            col=1,
        )
        if result.linear is not None and name in result.linear.losses:
            fig.add_trace(
                go.Scatter(
                    x=result.linear.ts,
                    y=result.linear.losses[name],
                    mode="lines",
                    name=f"{name} (linear)",
                    line={"color": color, "dash": "dash"},
                ),
                row=1,
                col=1,
            )
        if values and result.complete:
            peak = max(range(len(values)), key=values.__getitem__)
            fig.add_trace(
                go.Scatter(
                    x=[result.ts[peak]],
                    y=[values[peak]],
                    mode="markers+text",
                    marker={"symbol": "triangle-down", "size": 12, "color": color},
                    text=[f"barrier {result.barrier[name]:.3f}"],
                    textposition="top center",
                    name=f"{name} barrier",
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
        if result.rouge_l:
            fig.add_trace(
                go.Scatter(
                    x=result.ts,
                    y=result.rouge_l[name],
                    mode="lines+markers",
                    name=f"{name} ROUGE-L",
                    line={"color": color, "dash": "dot"},
                ),
                row=2,
                col=1,
            )
    fig.update_yaxes(title_text="loss (nats / answer token)", row=1, col=1)
    if rows == 2:
        fig.update_yaxes(title_text="ROUGE-L recall", range=[0, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="t (0 = A, 1 = B)", row=rows, col=1)
    fig.update_layout(
        title=f"{result.curve} path: {result.a} → {result.b}",
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# --------------------------------------------------------------------------------------------
# Evaluation reports: before / after
# --------------------------------------------------------------------------------------------

# Split scores (0-1) drawn as bars per split, in this order.
BAR_METRICS = (
    "rouge_l",
    "exact_match",
    "answer_contained",
    "prob",
    "exact_memorization",
    "extraction_strength",
    "truth_ratio",
    "prob_vs_perturbed",
)
COLORS = {"before": "#8c9bb0", "after": "#2f6fdf", "reference": "#e39b2d"}


def _delta_text(delta: Delta | None) -> str:
    if delta is None or delta.delta is None:
        return ""
    return f"{'+' if delta.delta > 0 else ''}{delta.delta:.3f}"


def split_bars_figure(after: Report, before: Report | None, split: str) -> go.Figure | None:
    """Grouped bars of one split's scores (0–1), before vs after, the delta written on the after
    bars; None when the split has none of `BAR_METRICS`."""
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


def mia_auc_figure(after: Report, before: Report | None) -> go.Figure | None:
    """Bars of the membership-inference AUC per attack, before and after; None without any AUC."""
    keys = [f"mia_auc_{a}" for a in MIA_ATTACKS if after.summary.get(f"mia_auc_{a}") is not None]
    if not keys:
        return None
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
    return fig


def truth_ratio_figure(after: Report, before: Report | None) -> go.Figure | None:
    """Overlaid histograms of log10 of the forget-set truth ratios (before, after, the retain reference):
    what forget quality compares; None without truth ratios."""
    series = []
    for label, report in (("before", before), ("after", after)):
        if report is not None and "forget" in report.splits and "truth_ratio" in report.splits["forget"].values:
            series.append((f"{label} ({report.model})", report.values("forget", "truth_ratio"), COLORS[label]))
    ref = after.reference_values.get("forget", {}).get("truth_ratio")
    if ref:
        series.append((f"reference ({after.reference})", np.array(ref, dtype=float), COLORS["reference"]))
    if not series:
        return None
    fig = go.Figure()
    for name, values, color in series:
        values = values[np.isfinite(values) & (values > 0)]
        fig.add_histogram(x=np.log10(values), name=name, marker_color=color, opacity=0.6, nbinsx=30)
    fig.update_layout(
        title="Forget-set truth ratios, log10 R (forget quality = KS test of after vs reference)",
        barmode="overlay",
        xaxis_title="log10 R  (R < 1: prefers the true answer)",
    )
    return fig


def runs_figure(reports: dict[str, Report], keys: list[str]) -> go.Figure:
    """Grouped bars comparing several reports (one colour each) on summary `keys` (0–1 scores)."""
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


# --------------------------------------------------------------------------------------------
# The quality benchmark: one point per run
# --------------------------------------------------------------------------------------------

_METHOD_COLORS = {"simu": "#d62728", "random_mask": "#ff7f0e", "so_graddiff": "#1f77b4", "fo_graddiff": "#17becf",
                  "ga": "#7f7f7f", "npo": "#9467bd"}  # fmt: skip
# The benchmark's reference rows (`benchmark.REFERENCE_ROWS`), in that order: colour and marker.
_REF_STYLE = {"original": ("black", "x"), "retain_reference": ("#2ca02c", "star")}


def _record_value(record: dict, key: str) -> float | None:
    """A benchmark record's metric `key` (from its `metrics`, else the record itself)."""
    return record.get("metrics", {}).get(key, record.get(key))


def scatter_figure(records: Sequence[dict], splits: Sequence[str], x: str, y: str, x_title: str, y_title: str,
                   title: str, log_x: bool = False) -> go.Figure:  # fmt: skip
    """One subplot per split, one point per run (colour = method), the reference rows as big markers."""
    fig = make_subplots(rows=1, cols=len(splits), subplot_titles=list(splits), shared_yaxes=True)
    shown: set[str] = set()
    others = sorted({r["method"] for r in records} - set(_METHOD_COLORS) - set(_REF_STYLE))
    for col, split in enumerate(splits, start=1):
        for method in [*_REF_STYLE, *_METHOD_COLORS, *others]:
            group = [r for r in records if r["split"] == split and r["method"] == method]
            points = [(_record_value(r, x), _record_value(r, y), r) for r in group]
            points = [(a, b, r) for a, b, r in points if a is not None and b is not None]
            if not points:
                continue
            color, symbol = _REF_STYLE.get(method, (_METHOD_COLORS.get(method, "#8c564b"), "circle"))
            fig.add_scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name=method,
                legendgroup=method, showlegend=method not in shown, row=1, col=col,
                marker={"color": color, "symbol": symbol, "size": 14 if method in _REF_STYLE else 9,
                        "line": {"width": 1, "color": "white"}},
                text=[f"{method} seed {p[2]['seed']}" if p[2]["seed"] is not None else method for p in points],
                hovertemplate="%{text}<br>x=%{x:.3g}<br>y=%{y:.3f}<extra></extra>",
            )  # fmt: skip
            shown.add(method)
        fig.update_xaxes(title_text=x_title, type="log" if log_x else "linear", row=1, col=col)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(title=title, height=460, legend={"orientation": "h", "y": -0.2}, margin={"t": 70})
    return fig


def quality_figures(records: Sequence[dict], splits: Sequence[str]) -> list[go.Figure]:
    """Forget quality vs model utility, and forget EM vs retain EM (the trade-off)."""
    return [
        scatter_figure(records, splits, "forget_quality", "model_utility", "forget quality (KS p, log)",
                       "model utility", "Forget quality vs model utility (one point per run)", log_x=True),
        scatter_figure(records, splits, "forget/exact_match", "retain/exact_match", "forget exact match",
                       "retain exact match", "Forget EM vs retain EM: lower-left forgets, top keeps"),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def figure_html(fig: go.Figure, div_id: str) -> str:
    """`fig` as an HTML `<div>` for the report page (white template, 360 px high; plotly.js not included:
    inline `plotly_js()` once in the page)."""
    fig.update_layout(template="plotly_white", margin={"l": 50, "r": 20, "t": 50, "b": 40}, height=360)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def plotly_js() -> str:
    """The plotly.js library as one script text, to inline in a page that must open offline."""
    return get_plotlyjs()


def write_figures(path: str | Path, figures: Sequence[go.Figure], title: str) -> Path:
    """All figures in one self-contained HTML page (plotly.js inlined once); folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    html = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body style='font-family:sans-serif'><h1>{title}</h1>" + "".join(parts) + "</body></html>"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
