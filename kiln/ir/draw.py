"""Pictures of a :class:`~kiln.ir.graph.Graph`: SVG (drawn here, no external tools), HTML and DOT.

The SVG uses a layered layout: one row per ``networkx.topological_generations``
layer, except that inputs and weights sit just above their first consumer
instead of all in the top row, and each row is ordered so that nodes sit under
their producers (a barycenter sweep), which keeps edges short. Boxes show the
node name and op; their colour says where a node runs (``placement``) or its
``role``, whichever tells nodes apart, and inputs, weights and outputs have
their own colours. The output is deterministic for a given graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape as _html_escape
from statistics import mean
from xml.sax.saxutils import escape, quoteattr

import networkx as nx

# Layout metrics in SVG user units; the font is monospace, so a label's width is known.
_CHAR_W = 7.2
_FONT_SIZE = 12
_PAD_X = 8
_BOX_H = 36
_GAP_X = 16
_GAP_Y = 40
_MARGIN = 20

_KIND_COLOURS = {"input": "#bcd9f5", "weight": "#e6e6e6", "output": "#f7c99b"}
_COMPUTE_COLOUR = "#d4ecd4"  # compute nodes when nothing is placed or given a role
_PALETTE = ["#a6cee3", "#b2df8a", "#fb9a99", "#fdbf6f", "#cab2d6", "#ffff99", "#8dd3c7", "#fccde5",
            "#d9d9d9", "#bebada"]
_UNSET_COLOUR = "#ffffff"  # a compute node without the attribute the others are coloured by


@dataclass(frozen=True)
class _Box:
    name: str
    op: str
    kind: str  # "input" | "weight" | "compute" | "output"
    colour: str
    tooltip: str


def _styled_view(graph) -> tuple[nx.DiGraph, list[tuple[str, str]]]:
    """The graph's networkx view with ``kind`` and ``colour`` on every vertex, and the legend.

    The legend lists ``(label, colour)`` for the colours in use.
    """
    g = graph.to_networkx()
    for name, attrs in g.nodes(data=True):
        if attrs["op"] == "placeholder":
            attrs["kind"] = "weight" if name in graph.weights else "input"
        elif attrs["op"] == "output":
            attrs["kind"] = "output"
        else:
            attrs["kind"] = "compute"
    key = _colour_key(g)
    values = sorted({str(v) for v in (_value(a, key) for _, a in g.nodes(data=True)) if v is not None})
    palette = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(values)}
    legend: dict[str, str] = {}
    for _, attrs in g.nodes(data=True):
        value = _value(attrs, key)
        if attrs["kind"] != "compute":
            label, colour = attrs["kind"], _KIND_COLOURS[attrs["kind"]]
        elif key is None:
            label, colour = "compute", _COMPUTE_COLOUR
        elif value is None:
            label, colour = f"no {key}", _UNSET_COLOUR
        else:
            label, colour = f"{key}: {value}", palette[str(value)]
        attrs["colour"] = colour
        legend.setdefault(label, colour)
    return g, sorted(legend.items())


def _value(attrs: dict, key: str | None):
    """The colouring attribute of a compute vertex (None for other vertices, or when unset)."""
    if key is None or attrs["kind"] != "compute":
        return None
    return getattr(attrs["meta"], key, None)


def _colour_key(g: nx.DiGraph) -> str | None:
    # One colour for everything tells nothing: a key that splits the graph wins over one that does not.
    distinct = {key: {_value(a, key) for _, a in g.nodes(data=True)} - {None} for key in ("placement", "role")}
    return next((k for k, v in distinct.items() if len(v) > 1), None) \
        or next((k for k, v in distinct.items() if v), None)


def _boxes(g: nx.DiGraph) -> dict[str, _Box]:
    boxes = {}
    for name, a in g.nodes(data=True):
        meta = a["meta"]
        lines = [f"{name} = {a['target']}"]
        if meta is not None:
            if meta.types:
                lines.append(", ".join(map(str, meta.types)))
            lines += [f"{k}: {v}" for k, v in meta.annotations().items()]
            if a["kind"] == "compute":
                lines.append(f"created by {meta.created_by}"
                             + (f", rewritten by {', '.join(meta.rewritten_by)}" if meta.rewritten_by else ""))
        op = a["kind"] if a["op"] in ("placeholder", "output") else a["target"]
        boxes[name] = _Box(name, op, a["kind"], a["colour"], "\n".join(lines))
    return boxes


def _layers(g: nx.DiGraph) -> list[list[str]]:
    """Rows of vertex names, top to bottom, each ordered to keep edges short."""
    layer = {n: i for i, gen in enumerate(nx.topological_generations(g)) for n in gen}
    # Weights and inputs are all in generation 0; drawn there, a deep model's weights would
    # form one huge top row with edges running down the whole picture.
    for n in g.nodes:
        if g.in_degree(n) == 0 and g.out_degree(n) > 0:
            layer[n] = max(0, min(layer[s] for s in g.successors(n)) - 1)
    order = {n: i for i, n in enumerate(g.nodes)}  # FX order: already a sensible left-to-right start
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in sorted(g.nodes, key=order.get):
        rows[layer[n]].append(n)
    for _ in range(2):
        for sweep, neighbours in ((rows[1:], g.predecessors), (rows[-2::-1], g.successors)):
            for row in sweep:
                pos = _centred_positions(rows)
                row.sort(key=lambda n: mean([pos[m] for m in neighbours(n)] or [pos[n]]))
    return rows


def _centred_positions(rows: list[list[str]]) -> dict[str, float]:
    return {n: i - (len(row) - 1) / 2 for row in rows for i, n in enumerate(row)}


def _box_width(box: _Box) -> float:
    return max(len(box.name), len(box.op)) * _CHAR_W + 2 * _PAD_X


def to_svg(graph) -> str:
    """The graph as a standalone SVG document (one ``<g class="node">`` per node)."""
    g, _ = _styled_view(graph)
    return _svg(g)


def _svg(g: nx.DiGraph) -> str:
    boxes = _boxes(g)
    rows = _layers(g)
    row_widths = [sum(_box_width(boxes[n]) for n in row) + _GAP_X * (len(row) - 1) for row in rows]
    width = max(row_widths, default=0) + 2 * _MARGIN
    height = len(rows) * (_BOX_H + _GAP_Y) - _GAP_Y + 2 * _MARGIN if rows else 2 * _MARGIN
    xy: dict[str, tuple[float, float]] = {}  # top-left corner of each box
    for r, (row, row_width) in enumerate(zip(rows, row_widths)):
        x = (width - row_width) / 2
        for n in row:
            xy[n] = (x, _MARGIN + r * (_BOX_H + _GAP_Y))
            x += _box_width(boxes[n]) + _GAP_X

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="{_FONT_SIZE}">',
           f"<title>{escape(str(g.graph.get('name', 'graph')))}</title>",
           '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="8" markerHeight="8" '
           'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>',
           '<g class="edges" fill="none" stroke="#777" stroke-width="1">']
    for src, dst in g.edges:
        x1 = xy[src][0] + _box_width(boxes[src]) / 2
        y1 = xy[src][1] + _BOX_H
        x2 = xy[dst][0] + _box_width(boxes[dst]) / 2
        y2 = xy[dst][1]
        ym = (y1 + y2) / 2
        out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{ym:.1f} {x2:.1f},{ym:.1f} '
                   f'{x2:.1f},{y2:.1f}" marker-end="url(#arrow)"/>')
    out.append("</g>")
    out.append('<g class="nodes">')
    for name, box in boxes.items():
        x, y = xy[name]
        w = _box_width(box)
        out.append(f'<g class="node {box.kind}" id={quoteattr("node-" + name)}>'
                   f"<title>{escape(box.tooltip)}</title>"
                   f'<rect class="box" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{_BOX_H}" rx="4" '
                   f'fill="{box.colour}" stroke="#444"/>'
                   f'<text x="{x + w / 2:.1f}" y="{y + 15:.1f}" text-anchor="middle" font-weight="bold">'
                   f"{escape(box.name)}</text>"
                   f'<text x="{x + w / 2:.1f}" y="{y + 29:.1f}" text-anchor="middle">{escape(box.op)}</text>'
                   "</g>")
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_html(graph, title: str | None = None) -> str:
    """A standalone HTML page: the SVG picture and a legend of its colours."""
    g, legend = _styled_view(graph)
    title = title or f"kiln graph {graph.name}"
    items = "\n".join(f'<li><span class="swatch" style="background:{c}"></span>{_html_escape(label)}</li>'
                      for label, c in legend)
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>{_html_escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.legend {{ list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; }}
.swatch {{ display: inline-block; width: 1em; height: 1em; border: 1px solid #444; margin-right: .3em;
          vertical-align: middle; }}
.picture {{ overflow: auto; }}
</style>
</head>
<body>
<h1>{_html_escape(title)}</h1>
<p>{g.number_of_nodes()} nodes, {g.number_of_edges()} edges. Hover over a node for its types and provenance.</p>
<ul class="legend">
{items}
</ul>
<div class="picture">
{_svg(g)}</div>
</body>
</html>
"""


def to_dot(graph) -> str:
    """The graph in Graphviz DOT, with the same labels and colours as the SVG."""
    g, _ = _styled_view(graph)
    boxes = _boxes(g)
    lines = [f"digraph {_dot_quote(str(g.graph.get('name', 'graph')))} {{",
             '  node [shape=box, style="rounded,filled", fontname="monospace"];']
    for name, box in boxes.items():
        lines.append(f"  {_dot_quote(name)} [label={_dot_quote(box.name + chr(10) + box.op)}, "
                     f"fillcolor={_dot_quote(box.colour)}, tooltip={_dot_quote(box.tooltip)}];")
    for src, dst in g.edges:
        lines.append(f"  {_dot_quote(src)} -> {_dot_quote(dst)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
