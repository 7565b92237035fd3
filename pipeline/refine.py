"""Refinement: a coarse label or score map snapped to the photo's colour edges.

Masks made at a coarser scale than the photo (spectral saliency at patch resolution, objects cut
from a thresholded saliency map, a segmenter's upsampled logits) stop short of or bleed past the
objects' edges. Each label's score map is smoothed edge-aware, with the photo as the guide, and each
pixel then takes the label whose smoothed score is highest: where the coarse border crosses a
uniform colour region it moves to the region's edge, and a border on a colour edge stays.

Two smoothers, both from OpenCV's contrib module `ximgproc` (the `opencv-contrib-python-headless`
wheel): the guided filter (He et al., 2010: a local linear model of the photo in each window, linear
time) and the fast global smoother (Min et al., 2014: edge-aware weighted least squares over the whole
image, the objective of the bilateral solver TokenCut uses; the solver itself is not in the PyPI wheel,
which is built without Eigen). OpenCV is maintained, ships wheels for every platform, is the cv2 the
stages already use and is deterministic on the CPU; pydensecrf, the usual dense CRF, has had no
release since 2018.

Stages call `refine_labels` or `refine_scores` with a `RefineParams` of their own `Params`
(e.g. `objects.refine.method=guided`) and cache the result with their per-image results.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from pipeline.errors import ConfigError

METHODS = ("none", "guided", "global")


@dataclasses.dataclass(frozen=True)
class RefineParams:
    method: str = "none"  # none | guided (guided filter) | global (fast global smoother)
    radius: float = 0.05  # how far a border may move, as a fraction of the shorter side: the guided
    #                       filter's window radius; the global smoother's lambda is its square in pixels
    edge: float = 16.0  # a colour step (0-255) this large is an edge: guided filter eps = edge^2, smoother's sigma

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"refine.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 < self.radius < 1.0:
            raise ConfigError(f"refine.radius must be in (0, 1), got {self.radius}")
        if self.edge <= 0:
            raise ConfigError(f"refine.edge must be > 0, got {self.edge}")


def refine_labels(rgb: np.ndarray, labels: np.ndarray, params: RefineParams) -> np.ndarray:
    """`labels` (H, W) of any integer values, each pixel moved to the value whose edge-aware smoothed
    indicator is highest there (ties to the smaller value). Unchanged with method none or one value."""
    values = np.unique(labels)
    if params.method == "none" or len(values) < 2:
        return labels
    indicators = np.stack([labels == v for v in values], axis=-1).astype(np.float32)
    return values[np.argmax(refine_scores(rgb, indicators, params), axis=-1)].astype(labels.dtype)


def refine_scores(rgb: np.ndarray, scores: np.ndarray, params: RefineParams) -> np.ndarray:
    """(H, W, C) float32 scores (probabilities, indicators, logits) smoothed along the photo's colours,
    one channel at a time; `rgb` is the (H, W, 3) uint8 photo at the scores' size."""
    if params.method == "none":
        return scores
    if rgb.shape[:2] != scores.shape[:2]:
        raise ValueError(f"photo {rgb.shape[:2]} and scores {scores.shape[:2]} differ in size")
    smoother = _smoother(np.ascontiguousarray(rgb), params)
    channels = [smoother(np.ascontiguousarray(scores[..., c], dtype=np.float32)) for c in range(scores.shape[-1])]
    return np.stack(channels, axis=-1)


def _smoother(rgb: np.ndarray, params: RefineParams):
    ximgproc = _ximgproc()
    size = params.radius * min(rgb.shape[:2])
    if params.method == "guided":
        guided = ximgproc.createGuidedFilter(rgb, max(1, round(size)), params.edge ** 2)
        return lambda channel: guided.filter(channel)
    smoother = ximgproc.createFastGlobalSmootherFilter(rgb, max(1.0, size) ** 2, params.edge)
    return lambda channel: smoother.filter(channel)


def _ximgproc():
    if not hasattr(cv2, "ximgproc"):
        raise ConfigError("refinement needs OpenCV's contrib modules (cv2.ximgproc), which this cv2 lacks: "
                          "pip uninstall -y opencv-python-headless opencv-contrib-python-headless && "
                          "pip install opencv-contrib-python-headless")
    return cv2.ximgproc
