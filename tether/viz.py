"""Render an SMC run as a self-contained HTML page.

``tether.viz.render_html(result, tokenizer)`` takes a ``Result`` from
``LLM.generate(..., particles=N, trace=True)``: one row per final particle, its tokens in
boxes, the row tinted by the particle's normalized weight (white: 0, deep blue: the largest),
its finish reason and log weight at the end. Resampling times are marked by a red bar before
the token generated at that time, and a copy made at resampling names its parent. The ESS of
each step, when traced, is drawn as a bar chart above the rows.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def _colour(weight: float, top: float) -> str:
    share = 0.0 if top <= 0 else min(1.0, weight / top)
    light = 97 - int(55 * share)
    return f"hsl(215, 80%, {light}%)"


def render_html(result: Any, tokenizer: Any, title: str = "tether SMC trace") -> str:
    if result.particles is None:
        raise ValueError("render_html needs a Result from generate(..., particles=N > 1)")
    times = {event["time"] for event in result.resampling or []}
    top = max((p.normalized_weight or 0.0) for p in result.particles)
    lineage = result.ancestry or [{"uid": i, "parent": None} for i in range(len(result.particles))]
    rows = []
    for i, particle in enumerate(result.particles):
        cells = []
        for t, token in enumerate(particle.token_ids):
            piece = tokenizer.decode([token], skip_special_tokens=False)
            mark = ' class="rs"' if t in times else ""
            cells.append(f"<span{mark} title='step {t}'>{html.escape(piece) or '&nbsp;'}</span>")
        weight = particle.normalized_weight or 0.0
        parent = lineage[i]["parent"]
        origin = f" (copy of #{parent})" if parent is not None else ""
        rows.append(
            f"<tr style='background:{_colour(weight, top)}'><td>#{lineage[i]['uid']}{origin}</td>"
            f"<td class='toks'>{''.join(cells)}</td><td>{particle.finish_reason}</td>"
            f"<td>{particle.log_weight:.2f}</td><td>{weight:.3f}</td></tr>")
    ess_bars = ""
    if result.ess:
        n = len(result.particles)
        bars = "".join(
            f"<div title='t={t} ESS={e:.1f}' style='height:{max(1, int(40 * e / n))}px'"
            f"{' class=rsbar' if t in times else ''}></div>" for t, e in result.ess)
        ess_bars = f"<h2>ESS per step</h2><div class='ess'>{bars}</div>"
    return f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }} td {{ padding: 2px 6px; vertical-align: top; }}
.toks span {{ font-family: monospace; white-space: pre; border: 1px solid #ccc; margin: 1px;
  padding: 0 1px; display: inline-block; }}
.toks span.rs {{ border-left: 3px solid #d00; }}
.ess {{ display: flex; align-items: flex-end; gap: 1px; height: 42px; }}
.ess div {{ width: 6px; background: #58a; }} .ess div.rsbar {{ background: #d00; }}
</style>
<h1>{html.escape(title)}</h1>
<p>log Z = {"undefined" if result.log_z is None else f"{result.log_z:.3f}"};
{len(result.resampling or [])} resampling event(s), marked in
red; rows tinted by normalized weight.</p>
{ess_bars}
<table><tr><th>particle</th><th>tokens</th><th>finish</th><th>log w</th><th>weight</th></tr>
{''.join(rows)}
</table>
"""


def write_html(result: Any, tokenizer: Any, path: str | Path, **kwargs: Any) -> Path:
    path = Path(path)
    path.write_text(render_html(result, tokenizer, **kwargs), encoding="utf-8")
    return path
