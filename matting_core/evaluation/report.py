"""Reports of an `EvaluationResult`: terminal table, JSON, CSV and a self-contained HTML page.

The HTML page references no file: plots are inline SVG (one per clip and metric, a line per
method, metric over frame index) and the contact sheet of the worst frames is base64 PNG.
Best, second and third of each metric (lowest overall value) are marked everywhere.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os

import cv2
import numpy as np

from matting_core import storage
from matting_core.evaluation.evaluate import EvaluationResult
from matting_core.evaluation.metrics import METRIC_NOTES

__all__ = ["format_table", "to_csv", "to_html", "write_reports", "report_paths", "RANK_MARKS"]

RANK_MARKS = {1: "(1st)", 2: "(2nd)", 3: "(3rd)"}
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    return f"{v:.4f}" if a < 1 else f"{v:.3f}" if a < 100 else f"{v:.1f}"


def _mark(result: EvaluationResult, metric: str, method: str) -> str:
    r = result.ranks.get(metric, {}).get(method)
    return RANK_MARKS.get(r, "") if len(result.ranks.get(metric, {})) > 1 else ""


def format_table(result: EvaluationResult, per_clip: bool = True) -> str:
    """Plain-text tables: overall per method (ranks marked) and, optionally, per clip."""
    metrics = list(result.metrics)
    lines = []
    header = ["method", "frames"] + metrics
    rows = []
    for m in result.methods:
        rows.append([m.name, str(m.evaluated_frames)] +
                    [(_fmt(m.overall.get(k)) + _mark(result, k, m.name)) for k in metrics])
    lines += _grid(header, rows)
    if per_clip and result.clips:
        lines.append("")
        rows = []
        for clip in result.clips:
            for m in result.methods:
                c = m.clips.get(clip)
                if c is None:
                    rows.append([clip, m.name, "0"] + ["-"] * len(metrics))
                else:
                    rows.append([clip, m.name, f"{len(c.frames)}/{c.expected_frames}"] +
                                [_fmt(c.mean.get(k)) for k in metrics])
        lines += _grid(["clip", "method", "frames"] + metrics, rows)
    if "messddt" in metrics:
        lines.append("messddt: this project's motion-aware temporal error; not comparable with other papers' numbers.")
    if result.problems:
        lines.append(f"{len(result.problems)} problem(s): see the report's problem list.")
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return out


def to_csv(result: EvaluationResult) -> str:
    """CSV rows `level,method,clip,frame,<metrics>,<metric>_rank`: overall (ranked), clip and frame rows."""
    metrics = list(result.metrics)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["level", "method", "clip", "frame"] + metrics + [f"{k}_rank" for k in metrics])
    num = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))
    for m in result.methods:
        w.writerow(["overall", m.name, "", ""] + [num(m.overall.get(k)) for k in metrics] +
                   [result.ranks.get(k, {}).get(m.name, "") for k in metrics])
    for m in result.methods:
        for c in m.clips.values():
            w.writerow(["clip", m.name, c.name, ""] + [num(c.mean.get(k)) for k in metrics] + [""] * len(metrics))
    for m in result.methods:
        for c in m.clips.values():
            for f in c.frames:
                w.writerow(["frame", m.name, c.name, f["frame"]] + [num(f.get(k)) for k in metrics] + [""] * len(metrics))
    return buf.getvalue()


def _png_data_uri(img: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode a thumbnail as PNG")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _svg_chart(series: dict[str, list[tuple[int, float]]], colours: dict[str, str], title: str,
               width: int = 360, height: int = 170) -> str:
    """An inline SVG line chart: x = frame index, y = value, one polyline per series."""
    pts = [p for s in series.values() for p in s if not math.isnan(p[1])]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = 0.0, max(p[1] for p in pts)
    y1 = y1 if y1 > 0 else 1.0
    left, right, top, bottom = 46, 8, 18, 22
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1) * (width - left - right)
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
             f'<text x="{left}" y="12" font-size="11">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="9" text-anchor="end">{_fmt(y1)}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" font-size="9" text-anchor="end">0</text>',
             f'<text x="{left}" y="{height - 6}" font-size="9">{x0}</text>',
             f'<text x="{width - right}" y="{height - 6}" font-size="9" text-anchor="end">frame {x1}</text>']
    for name, s in series.items():
        good = [(x, y) for x, y in s if not math.isnan(y)]
        if not good:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        if len(good) == 1:
            parts.append(f'<circle cx="{sx(good[0][0]):.1f}" cy="{sy(good[0][1]):.1f}" r="2" fill="{colours[name]}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{colours[name]}" stroke-width="1.3" points="{coords}">'
                         f'<title>{html.escape(name)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child,td.name{text-align:left}
td.r1{background:#ffe27a;font-weight:bold} td.r2{background:#e3e3e3;font-weight:bold} td.r3{background:#f0c9a0}
.legend span{display:inline-block;margin-right:1em} .legend i{display:inline-block;width:1.2em;height:.3em;vertical-align:middle;margin-right:.3em}
.charts{display:flex;flex-wrap:wrap;gap:6px} .sheet td{text-align:center;font-size:11px}
.problems li{color:#a00} .note{color:#555;font-size:90%}
"""


def to_html(result: EvaluationResult, title: str = "Matting evaluation") -> str:
    """A self-contained HTML report (inline SVG plots, base64 PNG contact sheets, no external files)."""
    metrics = list(result.metrics)
    colours = {m.name: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(result.methods)}
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
           f"<p>Ground truth: <code>{esc(result.truth)}</code>; {len(result.clips)} clip(s); "
           f"{len(result.methods)} method(s). Lower is better for every metric; "
           "the best, second and third of each metric are marked (1st) gold, (2nd) silver, (3rd) bronze.</p>"]

    out.append("<h2>Overall (mean over clips)</h2><table><tr><th>method</th><th>source</th><th>frames</th>")
    out += [f"<th title='{esc(METRIC_NOTES.get(k, ''))}'>{esc(k)}</th>" for k in metrics]
    out.append("</tr>")
    for m in result.methods:
        out.append(f"<tr><td class='name'><i style='color:{colours[m.name]}'>&#9632;</i> {esc(m.name)}</td>"
                   f"<td class='name'>{esc(m.source)}</td><td>{m.evaluated_frames}</td>")
        for k in metrics:
            r = result.ranks.get(k, {}).get(m.name)
            ranked = len(result.ranks.get(k, {})) > 1 and r in RANK_MARKS
            cls = f" class='r{r}'" if ranked else ""
            out.append(f"<td{cls}>{_fmt(m.overall.get(k))}{(' ' + RANK_MARKS[r]) if ranked else ''}</td>")
        out.append("</tr>")
    out.append("</table>")
    out.append("<p class='note'>" + "<br>".join(f"<b>{esc(k)}</b>: {esc(METRIC_NOTES[k])}" for k in metrics) + "</p>")

    out.append(f"<h2>Problems ({len(result.problems)})</h2>")
    if result.problems:
        out.append("<ul class='problems'>" + "".join(f"<li>{esc(str(p))}</li>" for p in result.problems) + "</ul>")
    else:
        out.append("<p>None: every frame of every clip was evaluated.</p>")

    out.append("<h2>Per clip</h2><table><tr><th>clip</th><th>method</th><th>frames</th>")
    out += [f"<th>{esc(k)}</th>" for k in metrics]
    out.append("</tr>")
    for clip in result.clips:
        for m in result.methods:
            c = m.clips.get(clip)
            frames = f"{len(c.frames)}/{c.expected_frames}" if c else "0"
            vals = "".join(f"<td>{_fmt(c.mean.get(k)) if c else '-'}</td>" for k in metrics)
            out.append(f"<tr><td class='name'>{esc(clip)}</td><td class='name'>{esc(m.name)}</td><td>{frames}</td>{vals}</tr>")
    out.append("</table>")

    out.append("<h2>Metrics over time</h2><p class='legend'>" + "".join(
        f"<span><i style='background:{colours[m.name]}'></i>{esc(m.name)}</span>" for m in result.methods) + "</p>")
    for clip in result.clips:
        charts = []
        for k in metrics:
            series = {m.name: [(f["frame"], float(f[k])) for f in m.clips[clip].frames if k in f]
                      for m in result.methods if clip in m.clips}
            svg = _svg_chart(series, colours, f"{clip}: {k}")
            if svg:
                charts.append(svg)
        out.append(f"<h3>{esc(clip)}</h3><div class='charts'>{''.join(charts) or 'no evaluated frames'}</div>")

    out.append("<h2>Worst frames</h2>")
    for m in result.methods:
        if not m.worst:
            continue
        out.append(f"<h3>{esc(m.name)} (by {esc(m.worst[0].metric)})</h3><table class='sheet'>"
                   "<tr><th>clip / frame</th><th>composite</th><th>predicted</th><th>true</th><th>error</th></tr>")
        for w in m.worst:
            cells = "".join(f"<td><img alt='{esc(kind)} {esc(w.clip)} {w.frame}' src='{_png_data_uri(w.images[kind])}'></td>"
                            for kind in ("composite", "predicted", "true", "error"))
            out.append(f"<tr><td class='name'>{esc(w.clip)}<br>frame {w.frame}<br>{esc(w.metric)} {_fmt(w.value)}</td>{cells}</tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def report_paths(json_uri: str) -> dict[str, str]:
    """{'json','csv','html'} URIs: PATH.json with PATH.csv and PATH.html beside it."""
    base = json_uri[:-5] if json_uri.lower().endswith(".json") else json_uri
    return {"json": base + ".json", "csv": base + ".csv", "html": base + ".html"}


def write_reports(result: EvaluationResult, json_uri: str, extra: dict | None = None) -> dict[str, str]:
    """Write PATH.json, PATH.csv and PATH.html atomically; returns their URIs."""
    paths = report_paths(json_uri)
    data = result.to_dict()
    if extra:
        data.update(extra)
    storage.write_bytes_atomic(paths["json"], json.dumps(data, indent=1, allow_nan=False,
                                                         default=_json_default).encode())
    storage.write_bytes_atomic(paths["csv"], to_csv(result).encode())
    title = f"Matting evaluation: {os.path.basename(result.truth.rstrip('/')) or result.truth}"
    storage.write_bytes_atomic(paths["html"], to_html(result, title).encode())
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
