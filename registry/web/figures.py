"""Geometry for the pages' inline SVG: the lineage graph and a loss curve.

Pure functions: numbers and strings in, coordinates out. The templates draw them (and escape
every label), so no markup is built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

NODE_W, NODE_H = 200, 34  # one adapter box
ROW_GAP, COL_GAP = 14, 110  # between boxes in a column, between columns
PAD = 12
MAX_LABEL = 26  # characters shown in a box; the full ref is in its <title>


@dataclass
class Node:
    ref: str
    role: str  # "parent" | "self" | "child"
    x: float
    y: float
    label: str
    weight: float | None = None

    @property
    def cx(self) -> float:
        return self.x + NODE_W / 2


@dataclass
class Edge:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str  # the weight, or "" when the lineage has none
    lx: float = 0.0
    ly: float = 0.0


@dataclass
class LineageGraph:
    width: float
    height: float
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    node_w: int = NODE_W
    node_h: int = NODE_H


def _label(ref: str) -> str:
    return ref if len(ref) <= MAX_LABEL else ref[:MAX_LABEL - 1] + "\u2026"


def _weight(weight) -> str:
    if weight is None:
        return ""
    return f"{float(weight):.3g}"


def lineage_graph(ref: str, parents: list[dict], children: list[dict]) -> LineageGraph:
    """Three columns: parents (edges labelled with their weights) -> the adapter -> its children.

    ``parents`` and ``children`` are the API's lineage lists: ``[{"ref": ..., "weight": ...}]``.
    """
    rows = max(len(parents), len(children), 1)
    column_h = rows * NODE_H + (rows - 1) * ROW_GAP
    height = column_h + 2 * PAD
    columns = [c for c in (parents, None, children) if c is None or c]  # drop an empty side
    width = len(columns) * NODE_W + (len(columns) - 1) * COL_GAP + 2 * PAD

    def column_nodes(items, x, role):
        top = PAD + (column_h - (len(items) * NODE_H + (len(items) - 1) * ROW_GAP)) / 2
        return [Node(item["ref"], role, x, top + i * (NODE_H + ROW_GAP), _label(item["ref"]), item.get("weight"))
                for i, item in enumerate(items)]

    x = PAD
    graph = LineageGraph(width, height)
    parent_nodes = []
    if parents:
        parent_nodes = column_nodes(parents, x, "parent")
        x += NODE_W + COL_GAP
    center = column_nodes([{"ref": ref}], x, "self")[0]
    x += NODE_W + COL_GAP
    child_nodes = column_nodes(children, x, "child") if children else []
    graph.nodes = parent_nodes + [center] + child_nodes

    def edge(a: Node, b: Node, weight) -> Edge:
        x1, y1 = a.x + NODE_W, a.y + NODE_H / 2
        x2, y2 = b.x, b.y + NODE_H / 2
        return Edge(x1, y1, x2, y2, _weight(weight), lx=(x1 + x2) / 2, ly=(y1 + y2) / 2 - 4)

    graph.edges = [edge(p, center, p.weight) for p in parent_nodes]
    graph.edges += [edge(center, c, c.weight) for c in child_nodes]
    return graph


@dataclass
class Curve:
    width: float
    height: float
    points: str  # the polyline's "x,y x,y ..."
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    left: float
    top: float
    right: float
    bottom: float
    log_y: bool


def loss_curve(curve: list, width: float = 420, height: float = 180) -> Curve | None:
    """A generator's ``loss_curve`` ([[step, loss], ...]) scaled into a ``width`` x ``height`` box;
    the loss axis is logarithmic when the curve spans more than a factor of 20. None if empty."""
    points = [(float(s), float(v)) for s, v in curve if v is not None and math.isfinite(float(v))]
    if not points:
        return None
    left, right, top, bottom = 52.0, width - 10, 10.0, height - 26
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    log_y = min(values) > 0 and max(values) / min(values) > 20
    ys = [math.log10(v) for v in values] if log_y else values
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (right - left)

    def sy(y):
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    polyline = " ".join(f"{sx(s):.1f},{sy(y):.1f}" for s, y in zip(steps, ys))
    x_ticks = [(sx(v), f"{v:g}") for v in (x0, (x0 + x1) / 2, x1)]
    y_ticks = [(sy(v), f"{(10 ** v if log_y else v):.3g}") for v in (y0, (y0 + y1) / 2, y1)]
    return Curve(width, height, polyline, x_ticks, y_ticks, left, top, right, bottom, log_y)
