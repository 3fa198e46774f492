"""Clipping detection boxes to their image, and the tally of what clipping fixed or dropped.

The COCO and YOLO readers (``coco.py``, ``yolo.py``) both turn a box from their file into
pixel xyxy with :func:`clip_box`, so they agree on when a box is clipped (and noted) and when
it is too thin to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lensforge.data.records import Box

MIN_BOX_SIDE = 1.0  # px; thinner boxes (after clipping) carry no object and break IoU losses
CLIP_TOLERANCE = 0.5  # px; clipping by less is float/rounding noise and is not counted


@dataclass
class BoxTally:
    """Where :func:`clip_box` clipped or dropped a box (one ``where`` text each), for the
    reader's notes."""

    clipped: list[str] = field(default_factory=list)
    degenerate: list[str] = field(default_factory=list)


def clip_box(raw: Box, width: float, height: float, where: str, tally: BoxTally) -> Box | None:
    """``raw`` (xyxy pixels, possibly reaching outside the image) clipped to the
    ``width`` x ``height`` image; None when the clipped box is at most :data:`MIN_BOX_SIDE`
    px wide or high. Either case is recorded in ``tally`` under ``where`` (a clip only when
    a side moved by more than :data:`CLIP_TOLERANCE` px)."""
    box = (
        min(max(raw[0], 0.0), width), min(max(raw[1], 0.0), height),
        min(max(raw[2], 0.0), width), min(max(raw[3], 0.0), height),
    )
    if box[2] - box[0] <= MIN_BOX_SIDE or box[3] - box[1] <= MIN_BOX_SIDE:
        tally.degenerate.append(where)
        return None
    if max(abs(a - b) for a, b in zip(box, raw)) > CLIP_TOLERANCE:
        tally.clipped.append(where)
    return box
