"""Label placement without overlaps for the topology figure: each label goes to the first
spot, nearest its anchor, where its box (as the renderer measures it) touches no label placed
before it, no marker and nothing outside the axes; a label pushed away from its anchor gets a
leader line. Greedy and deterministic: the same figure gives the same picture.

adjustText (the usual library for this) repels labels iteratively and stops at a tolerance, so
it does not promise zero overlaps; this does, at the cost of labels sometimes moving further.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox

GAP_PX = 2.0  # clear space kept around every label box
STEP_PX = 5.0  # distance between rings of candidate spots
LEADER_PX = 14.0  # a label further than this from its anchor gets a leader line


@dataclass
class Label:
    text: Text  # already added to the axes, centred (ha/va "center") on its anchor
    anchor: tuple[float, float]  # data coordinates
    prefer: Sequence[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0)])  # first tries, pixels
    beside: float = 0.0  # > 0: the label names a marker of this radius (pixels) at the anchor; first tries
    # are then just below, above, right and left of it instead of `prefer`


def box(text: Text, renderer: object) -> Bbox:
    """What the label covers on the canvas: its background patch when it has one, else its text."""
    patch = text.get_bbox_patch()
    if patch is not None:
        text.update_bbox_position_size(renderer)
        return patch.get_window_extent(renderer)
    return text.get_window_extent(renderer)


def _spots(prefer: Sequence[tuple[float, float]], max_r: float) -> Iterator[np.ndarray]:
    """Candidate offsets in order, a batch at a time: the preferred ones, then rings of growing radius."""
    yield np.array(prefer, dtype=float).reshape(-1, 2)
    r = STEP_PX
    while r <= max_r:
        batch = []
        for _ in range(8):
            n = max(8, int(math.pi * r / STEP_PX))
            batch += [(r * math.cos(2 * math.pi * k / n), r * math.sin(2 * math.pi * k / n)) for k in range(n)]
            r += STEP_PX
        yield np.array(batch)


def _free(cands: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Which candidate boxes (x0, y0, x1, y1 rows) overlap none of the taken ones."""
    if not len(taken):
        return np.ones(len(cands), dtype=bool)
    hit = ((cands[:, None, 0] < taken[None, :, 2]) & (cands[:, None, 2] > taken[None, :, 0])
           & (cands[:, None, 1] < taken[None, :, 3]) & (cands[:, None, 3] > taken[None, :, 1]))
    return ~hit.any(axis=1)


def place(ax: Axes, labels: Sequence[Label], obstacles: Sequence[Bbox]) -> list[Label]:
    """Move each label (in the order given: the most important first) to its first free spot.
    The axes limits must be final. Returns the labels that found no free spot (left at their
    anchor); none on any figure with room for them."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the aspect and the transforms
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = ax.get_window_extent(renderer)
    limits = np.array([frame.x0, frame.y0, frame.x1, frame.y1])
    taken = np.array([[b.x0 - GAP_PX, b.y0 - GAP_PX, b.x1 + GAP_PX, b.y1 + GAP_PX] for b in obstacles]).reshape(-1, 4)
    to_data = ax.transData.inverted()
    max_r = math.hypot(frame.width, frame.height)
    stuck = []
    for lb in labels:
        lb.text.set_position(lb.anchor)
        b = box(lb.text, renderer)
        ax_px = ax.transData.transform(lb.anchor)
        base = np.array([b.x0 - GAP_PX, b.y0 - GAP_PX, b.x1 + GAP_PX, b.y1 + GAP_PX])
        prefer = lb.prefer
        if lb.beside > 0:
            dx, dy = lb.beside + b.width / 2 + 2 * GAP_PX, lb.beside + b.height / 2 + 2 * GAP_PX
            prefer = [(0.0, -dy), (0.0, dy), (dx, 0.0), (-dx, 0.0)]
        found = None
        for spots in _spots(prefer, max_r):
            cands = base[None, :] + np.tile(spots, 2)
            inside = ((cands[:, 0] >= limits[0]) & (cands[:, 1] >= limits[1])
                      & (cands[:, 2] <= limits[2]) & (cands[:, 3] <= limits[3]))
            ok = np.flatnonzero(inside & _free(cands, taken))
            if len(ok):
                found = spots[ok[0]], cands[ok[0]]
                break
        if found is None:
            stuck.append(lb)
            continue
        (dx, dy), spot_box = found
        lb.text.set_position(to_data.transform((ax_px[0] + dx, ax_px[1] + dy)))
        taken = np.vstack([taken, spot_box])
        if math.hypot(dx, dy) > LEADER_PX:
            end = to_data.transform((ax_px[0] + dx, ax_px[1] + dy))
            ax.add_line(Line2D([lb.anchor[0], end[0]], [lb.anchor[1], end[1]], lw=0.6, color="#777777",
                               zorder=lb.text.get_zorder() - 0.5, gid=f"leader:{lb.text.get_gid()}"))
    return stuck
