"""The pages' SVG geometry (registry/web/figures.py): pure functions, no browser."""

from __future__ import annotations

from registry.web.figures import NODE_H, NODE_W, lineage_graph, loss_curve


def boxes_overlap(a, b) -> bool:
    return a.x < b.x + NODE_W and b.x < a.x + NODE_W and a.y < b.y + NODE_H and b.y < a.y + NODE_H


def test_lineage_graph_columns_edges_and_weights():
    graph = lineage_graph("mix@1", [{"ref": "a@1", "weight": 0.7}, {"ref": "b@2", "weight": 0.25}, {"ref": "c@1", "weight": None}],
                          [{"ref": "child@1", "weight": 0.5}])
    roles = {n.ref: n.role for n in graph.nodes}
    assert roles == {"a@1": "parent", "b@2": "parent", "c@1": "parent", "mix@1": "self", "child@1": "child"}
    xs = {n.role: n.x for n in graph.nodes}
    assert xs["parent"] < xs["self"] < xs["child"]
    assert [e.label for e in graph.edges] == ["0.7", "0.25", "", "0.5"]  # no weight: no label
    assert not any(boxes_overlap(a, b) for i, a in enumerate(graph.nodes) for b in graph.nodes[i + 1:])
    assert all(0 <= n.x and n.x + NODE_W <= graph.width and 0 <= n.y and n.y + NODE_H <= graph.height
               for n in graph.nodes)
    center = next(n for n in graph.nodes if n.role == "self")
    assert all(e.x2 == center.x for e in graph.edges[:3]) and graph.edges[3].x1 == center.x + NODE_W


def test_lineage_graph_without_parents_has_two_columns_and_long_refs_are_cut():
    long_ref = "a-very-long-adapter-name-indeed@12"
    graph = lineage_graph(long_ref, [], [{"ref": "c@1", "weight": 1.0}])
    assert [n.role for n in graph.nodes] == ["self", "child"]
    assert graph.width < 3 * NODE_W
    assert graph.nodes[0].ref == long_ref and graph.nodes[0].label.endswith("\u2026") and len(graph.nodes[0].label) == 26


def test_loss_curve_scales_into_the_box_and_goes_log_for_wide_ranges():
    assert loss_curve([]) is None
    curve = loss_curve([[1, 10.0], [50, 1.0], [100, 0.1]], width=400, height=200)
    assert curve.log_y  # a factor of 100
    points = [tuple(map(float, p.split(","))) for p in curve.points.split()]
    assert points[0] == (curve.left, curve.top) and points[-1] == (curve.right, curve.bottom)
    assert abs(points[1][1] - (curve.top + curve.bottom) / 2) < 0.1  # 1.0 is halfway on a log axis
    flat = loss_curve([[1, 0.5], [2, 0.4]])
    assert not flat.log_y and [label for _, label in flat.y_ticks] == ["0.4", "0.45", "0.5"]
