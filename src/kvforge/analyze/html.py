"""A self-contained HTML page for a trace analysis: inline SVG plots, no scripts, no downloads.

Every chart reads on paper: axes carry scales and titles, the per-request chart names each
request, the heatmap prints its numbers in the cells beside a colour scale (tooltips only
repeat what is printed)."""

from __future__ import annotations

from html import escape

from kvforge.analyze.trace import TraceAnalysis

_COLORS = {"exact": "#2e7d32", "moved": "#f9a825", "near": "#8e24aa", "unique": "#b0bec5"}
_FONT = 12  # px, the charts' text size (see the page's style)


def _nice_step(top: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 × 10^k) giving about ``ticks`` intervals up to ``top``."""
    raw = max(top, 1) / ticks
    mag = 10 ** (len(str(int(raw))) - 1)
    return float(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def _compact(n: float) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return f"{n:,.0f}"


def _svg(cls: str, width: float, height: float, body: list[str], label: str) -> str:
    return (
        f'<svg class="{cls}" width="{width:.0f}" height="{height:.0f}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        + "".join(body)
        + "</svg>"
    )


def _legend(x: float, y: float, kinds: list[str]) -> list[str]:
    out = []
    for k, kind in enumerate(kinds):
        lx = x + k * 110
        out.append(
            f'<rect x="{lx}" y="{y - 10}" width="12" height="12" fill="{_COLORS[kind]}"/>'
            f'<text x="{lx + 16}" y="{y}">{kind}</text>'
        )
    return out


def _bars(result: TraceAnalysis) -> str:
    """Per agent, a stacked bar of exact / moved / near / unique prompt tokens, on a token
    axis with ticks, each bar labelled with its total and exact share."""
    agents = sorted(result.agents)
    left, right, row, top_pad = 130, 110, 26, 10
    width = 820
    plot = width - left - right
    peak = max((a.prompt_tokens for a in result.agents.values()), default=0)
    step = _nice_step(peak)
    axis_max = step * max(1, -(-peak // step))
    axis_y = top_pad + row * len(agents) + 4
    body: list[str] = []
    for i, name in enumerate(agents):
        a = result.agents[name]
        unique = max(0, a.prompt_tokens - a.exact_tokens - a.moved_tokens - a.near_tokens)
        x = float(left)
        y = top_pad + i * row
        body.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(name)}</text>')
        for kind, value in (
            ("exact", a.exact_tokens),
            ("moved", a.moved_tokens),
            ("near", a.near_tokens),
            ("unique", unique),
        ):
            w = plot * value / axis_max
            if w > 0:
                body.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="18" '
                    f'fill="{_COLORS[kind]}"><title>{escape(name)} {kind}: {value:,} tokens'
                    "</title></rect>"
                )
            x += w
        pct = 100 * a.exact_tokens / a.prompt_tokens if a.prompt_tokens else 0.0
        body.append(
            f'<text class="value" x="{x + 6:.1f}" y="{y + 14}">'
            f"{_compact(a.prompt_tokens)} ({pct:.0f}% exact)</text>"
        )
    body.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot}" y2="{axis_y}" stroke="#444"/>')
    v = 0.0
    while v <= axis_max + 1e-9:
        tx = left + plot * v / axis_max
        body.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 5}" stroke="#444"/>'
            f'<text class="tick" x="{tx:.1f}" y="{axis_y + 18}" text-anchor="middle">'
            f"{_compact(v)}</text>"
        )
        v += step
    body.append(
        f'<text class="axis-title" x="{left + plot / 2}" y="{axis_y + 36}" '
        'text-anchor="middle">prompt tokens, summed over the agent\'s requests</text>'
    )
    body += _legend(left, axis_y + 60, list(_COLORS))
    return _svg("bars", width, axis_y + 72, body, "prompt tokens per agent by kind")


def _heat(v: int, peak: int) -> tuple[str, str]:
    """Cell fill (white → dark green) and a text colour that stays readable on it."""
    f = v / peak if peak else 0.0
    r, g, b = (int(255 + (c - 255) * f) for c in (27, 94, 32))
    return f"rgb({r},{g},{b})", "#fff" if f > 0.55 else "#222"


def _heatmap(result: TraceAnalysis) -> str:
    """Agent (row) × source agent (column): tokens of the row's requests held exactly by the
    column's prompts, printed in each cell (moved tokens below, when any), with a colour scale."""
    agents = sorted(result.agents)
    size = len(agents)
    cell, left = 64, 130
    longest = max((len(a) for a in agents), default=4)
    top = 40 + int(longest * _FONT * 0.45)  # room for the rotated column labels
    peak = max(result.pair_exact.values(), default=0)
    grid_w = cell * size
    scale_x = left + grid_w + 30
    width = scale_x + 120
    height = top + grid_w + 50
    body: list[str] = [
        f'<text class="axis-title" x="{left + grid_w / 2}" y="14" text-anchor="middle">'
        "source agent (whose earlier prompts hold the tokens)</text>",
        f'<text class="axis-title" x="14" y="{top + grid_w / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + grid_w / 2})">agent (reusing)</text>',
    ]
    for j, src in enumerate(agents):
        x = left + j * cell + cell / 2
        body.append(
            f'<text x="{x}" y="{top - 8}" transform="rotate(-40 {x} {top - 8})">'
            f"{escape(src)}</text>"
        )
    for i, agent in enumerate(agents):
        y = top + i * cell
        body.append(
            f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">{escape(agent)}</text>'
        )
        for j, src in enumerate(agents):
            v = result.pair_exact.get((agent, src), 0)
            mv = result.pair_moved.get((agent, src), 0)
            fill, ink = _heat(v, peak)
            cx, cy = left + j * cell + (cell - 2) / 2, y + (cell - 2) / 2
            body.append(
                f'<rect class="cell" x="{left + j * cell}" y="{y}" width="{cell - 2}" '
                f'height="{cell - 2}" stroke="#ccc" fill="{fill}">'
                f"<title>{escape(agent)} ← {escape(src)}: {v:,} exact, {mv:,} moved tokens"
                "</title></rect>"
                f'<text class="cell-value" x="{cx}" y="{cy + (0 if mv else 4)}" '
                f'text-anchor="middle" fill="{ink}">{_compact(v)}</text>'
            )
            if mv:
                body.append(
                    f'<text class="cell-moved" x="{cx}" y="{cy + 15}" text-anchor="middle" '
                    f'fill="{ink}">+{_compact(mv)} moved</text>'
                )
    # the colour scale: 0 at the bottom, the peak at the top
    steps = 10
    h = grid_w / steps
    for k in range(steps):
        fill, _ = _heat(round(peak * (steps - k - 0.5) / steps), peak)
        body.append(
            f'<rect x="{scale_x}" y="{top + k * h:.1f}" width="16" height="{h + 0.5:.1f}" '
            f'fill="{fill}"/>'
        )
    body.append(
        f'<rect x="{scale_x}" y="{top}" width="16" height="{grid_w}" fill="none" stroke="#888"/>'
        f'<text class="tick" x="{scale_x + 22}" y="{top + 10}">{_compact(peak)}</text>'
        f'<text class="tick" x="{scale_x + 22}" y="{top + grid_w}">0</text>'
        f'<text class="tick" x="{scale_x}" y="{top + grid_w + 20}">exact tokens</text>'
    )
    return _svg("heatmap", width, height, body, "exact tokens reused per agent pair")


def _timeline(result: TraceAnalysis) -> str:
    """Per request in replay order: the share of its prompt reused exactly, and moved, on a
    0-100% axis; each request labelled with its trace line and agent."""
    reqs = result.per_request
    n = max(1, len(reqs))
    left, right, top, plot_h = 50, 20, 30, 160
    bw = max(14.0, min(60.0, 760 / n))
    width = left + bw * n + right
    longest = max((len(f"{ln} {a}") for ln, a, *_ in reqs), default=4)
    label_room = 20 + int(longest * _FONT * 0.5)
    base = top + plot_h
    body: list[str] = [
        f'<text class="axis-title" x="{left}" y="{top - 12}">share of each request\'s prompt '
        "(replay order)</text>",
    ]
    for pct in (0, 25, 50, 75, 100):
        y = base - plot_h * pct / 100
        body.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + bw * n:.1f}" y2="{y:.1f}" '
            f'stroke="{"#444" if pct == 0 else "#e0e0e0"}"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{pct}%</text>'
        )
    for k, (line, agent, tokens, exact, moved) in enumerate(reqs):
        x = left + k * bw
        fe = exact / tokens if tokens else 0.0
        fm = moved / tokens if tokens else 0.0
        for kind, frac, below in (("exact", fe, 0.0), ("moved", fm, fe)):
            h = plot_h * frac
            if h > 0:
                y = base - plot_h * below - h
                body.append(
                    f'<rect class="{kind}" x="{x + 1:.1f}" y="{y:.1f}" '
                    f'width="{max(bw - 2, 1):.1f}" height="{h:.1f}" fill="{_COLORS[kind]}">'
                    f"<title>line {line} {escape(agent)}: {kind} {frac:.0%}</title></rect>"
                )
        cx = x + bw / 2
        body.append(
            f'<text class="req-label" x="{cx:.1f}" y="{base + 12}" text-anchor="end" '
            f'transform="rotate(-60 {cx:.1f} {base + 12})">{line} {escape(agent)}</text>'
        )
    body.append(
        f'<text class="axis-title" x="{left + bw * n / 2:.1f}" y="{base + label_room}" '
        'text-anchor="middle">request (trace line, agent)</text>'
    )
    body += _legend(left, base + label_room + 22, ["exact", "moved"])
    return _svg("timeline", width, base + label_room + 34, body, "reuse per request")


def render_html(result: TraceAnalysis, *, title: str = "kvforge trace analysis") -> str:
    rows = "".join(
        f"<tr><td>{escape(n)}</td><td>{a.requests}</td><td>{a.prompt_tokens:,}</td>"
        f"<td>{a.exact_tokens:,}</td><td>{a.moved_tokens:,}</td><td>{a.near_tokens:,}</td></tr>"
        for n, a in sorted(result.agents.items())
    )
    advice = "".join(f"<li>{escape(a)}</li>" for a in result.advice)
    advice = f"<ol>{advice}</ol>" if advice else ""
    notes = "".join(f"<p class='note'>{escape(n)}</p>" for n in result.notes())
    breaks = (
        "".join(
            f"<li>line {d.line}: {escape(d.agent_id)} vs {escape(d.source)}: "
            f"{escape(d.reason)}</li>"
            for d in result.divergences
        )
        or "<li>none</li>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td:not(:first-child) {{ text-align: right; }} svg text {{ font-size: {_FONT}px; }}
svg .axis-title {{ font-weight: 600; }} svg .tick, svg .req-label {{ fill: #444; }}
svg .cell-value {{ font-weight: 600; }} svg .cell-moved {{ font-size: 10px; }}
.note {{ color: #8a5a00; }}
</style></head><body>
<h1>{escape(title)}</h1>
<p>Block size {result.block_size}. Exact = reused by vLLM's prefix cache as is; moved = the same
tokens elsewhere (reusable only with recompute); near = blocks that differ in a few tokens.</p>
{notes}
<h2>Per agent</h2>
<table><tr><th>agent</th><th>requests</th><th>prompt tokens</th><th>exact</th><th>moved</th>
<th>near</th></tr>{rows}</table>
<h2>Tokens per agent</h2>{_bars(result)}
<h2>Who reuses whom (exact tokens; moved below)</h2>{_heatmap(result)}
<h2>Reuse per request</h2>{_timeline(result)}
<h2>Layout advice</h2><p class="summary">{escape(result.summary())}</p>{advice}
<h2>Where prefixes break</h2><ul>{breaks}</ul>
</body></html>
"""
