"""A self-contained HTML page for a trace analysis: inline SVG plots, no scripts, no downloads."""

from __future__ import annotations

from html import escape

from kvforge.analyze.trace import TraceAnalysis

_COLORS = {"exact": "#2e7d32", "moved": "#f9a825", "near": "#8e24aa", "unique": "#b0bec5"}


def _bars(result: TraceAnalysis) -> str:
    """Per agent, a stacked bar of exact / moved / near / unique prompt tokens."""
    agents = sorted(result.agents)
    width, row, left = 760, 26, 120
    top = max((a.prompt_tokens for a in result.agents.values()), default=1) or 1
    parts = [f'<svg class="bars" width="{width}" height="{row * len(agents) + 40}" '
             'xmlns="http://www.w3.org/2000/svg">']  # fmt: skip
    for i, name in enumerate(agents):
        a = result.agents[name]
        unique = max(0, a.prompt_tokens - a.exact_tokens - a.moved_tokens - a.near_tokens)
        x = left
        y = 10 + i * row
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(name)}</text>')
        for kind, value in (("exact", a.exact_tokens), ("moved", a.moved_tokens),
                            ("near", a.near_tokens), ("unique", unique)):  # fmt: skip
            w = (width - left - 10) * value / top
            if w > 0:
                parts.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="18" '
                    f'fill="{_COLORS[kind]}"><title>{escape(name)} {kind}: {value:,} tokens'
                    "</title></rect>"
                )
            x += w
    legend_y = 10 + len(agents) * row + 14
    for k, (kind, color) in enumerate(_COLORS.items()):
        x = left + k * 110
        parts.append(
            f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" fill="{color}"/>'
            f'<text x="{x + 16}" y="{legend_y}">{kind}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _heatmap(result: TraceAnalysis) -> str:
    """Agent (row) × source agent (column): tokens of the row's requests held exactly by the
    column's prompts."""
    agents = sorted(result.agents)
    cell, left, top = 44, 120, 90
    peak = max(result.pair_exact.values(), default=0) or 1
    size = len(agents)
    parts = [f'<svg class="heatmap" width="{left + cell * size + 10}" '
             f'height="{top + cell * size + 10}" xmlns="http://www.w3.org/2000/svg">']  # fmt: skip
    for j, src in enumerate(agents):
        x = left + j * cell + cell / 2
        parts.append(f'<text x="{x}" y="{top - 8}" transform="rotate(-40 {x} {top - 8})">'
                     f"{escape(src)}</text>")  # fmt: skip
    for i, agent in enumerate(agents):
        y = top + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">'
                     f"{escape(agent)}</text>")  # fmt: skip
        for j, src in enumerate(agents):
            v = result.pair_exact.get((agent, src), 0)
            shade = int(255 - 200 * v / peak)
            fill = f"rgb({shade},{255 - (255 - shade) // 3},{shade})"
            parts.append(
                f'<rect class="cell" x="{left + j * cell}" y="{y}" width="{cell - 2}" '
                f'height="{cell - 2}" stroke="#ddd" fill="{fill}">'
                f"<title>{escape(agent)} ← {escape(src)}: {v:,} exact tokens</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _timeline(result: TraceAnalysis) -> str:
    """Per request in replay order: the share of its prompt reused exactly, and moved."""
    reqs = result.per_request
    width, height, pad = 760, 180, 30
    n = max(1, len(reqs))
    bw = (width - 2 * pad) / n
    parts = [f'<svg class="timeline" width="{width}" height="{height}" '
             'xmlns="http://www.w3.org/2000/svg">']  # fmt: skip
    for k, (line, agent, tokens, exact, moved) in enumerate(reqs):
        x = pad + k * bw
        for kind, frac, base in (("exact", exact / tokens if tokens else 0, 0.0),
                                 ("moved", moved / tokens if tokens else 0,
                                  exact / tokens if tokens else 0)):  # fmt: skip
            h = (height - 2 * pad) * frac
            y = height - pad - (height - 2 * pad) * base - h
            if h > 0:
                parts.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="{_COLORS[kind]}"><title>line {line} '
                    f"{escape(agent)}: {kind} {frac:.0%}</title></rect>"
                )
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
                 'stroke="#444"/>')  # fmt: skip
    parts.append(
        f'<text x="{pad}" y="{pad - 8}">share of each request\'s prompt (replay order)</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(result: TraceAnalysis, *, title: str = "kvforge trace analysis") -> str:
    rows = "".join(
        f"<tr><td>{escape(n)}</td><td>{a.requests}</td><td>{a.prompt_tokens:,}</td>"
        f"<td>{a.exact_tokens:,}</td><td>{a.moved_tokens:,}</td><td>{a.near_tokens:,}</td></tr>"
        for n, a in sorted(result.agents.items())
    )
    advice = "".join(f"<li>{escape(a)}</li>" for a in result.advice) or "<li>none</li>"
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
td:not(:first-child) {{ text-align: right; }} svg text {{ font-size: 12px; }}
</style></head><body>
<h1>{escape(title)}</h1>
<p>Block size {result.block_size}. Exact = reused by vLLM's prefix cache as is; moved = the same
tokens elsewhere (reusable only with recompute); near = blocks that differ in a few tokens.</p>
<h2>Per agent</h2>
<table><tr><th>agent</th><th>requests</th><th>prompt tokens</th><th>exact</th><th>moved</th>
<th>near</th></tr>{rows}</table>
<h2>Tokens per agent</h2>{_bars(result)}
<h2>Who reuses whom (exact tokens)</h2>{_heatmap(result)}
<h2>Reuse per request</h2>{_timeline(result)}
<h2>Layout advice</h2><ul>{advice}</ul>
<h2>Where prefixes break</h2><ul>{breaks}</ul>
</body></html>
"""
