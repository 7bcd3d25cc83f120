"""Click propagation: a click also acts on the neighbouring slices where they show the same kind of error.

The click simulator's (and a user's) error regions are 3D: a missed piece of myocardium or a spurious
blob usually spans two or three short-axis slices, while a click lands on one. So each real click
(positive ones only unless PROPAGATE_NEGATIVE) is copied, as a *soft* click at the same in-plane voxel
(or the nearest passing one within PROPAGATE_SEARCH_MM), to the slices up to ``slices`` away on either
side, as long as (slice by slice outwards, stopping at the first slice that fails):

- the draft there has the same label as the draft at the click (for a positive click: not yet the
  clicked structure; for a negative click: the clicked structure) -- the same kind of error;
- the 3x3 mean normalised intensity there is within PROPAGATE_INTENSITY of the clicked voxel's;
- the clicked structure's margin (log p_L - log max other p, of the draft prior) is comparable: for a
  positive click at least the click's minus PROPAGATE_MARGIN, for a negative one at most the click's
  plus PROPAGATE_MARGIN.

A soft click runs through the same engine as a real one, but its voxel is not forced (see
:func:`.refine_engines.honour_clicks`), and on each slice soft clicks come before the real ones, so a
real click always wins. Measured on the click simulator (``benchmarks/interactive.py``, docs/click-to-fix.md):
+-1 slice, positive clicks only, intensity 0.3, margin 0.5 was the best of the variants tried, by a small margin.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .refine_engines import SliceClick, draft_prior, label_margin

#: Slices either side of a click that it may reach. Default 0, a click edits only the slice in view: 1 was
#: measured worth +0.0002 Dice at 3 clicks on ACDC (docs/click-to-fix.md), too little for edits out of sight.
PROPAGATE_SLICES = 0
#: Largest difference of the 3x3 mean normalised intensity (slice range 0-1) between the clicked voxel and the
#: same in-plane voxel on a neighbouring slice.
PROPAGATE_INTENSITY = 0.3
#: Tolerance (nats) on the clicked structure's margin on the neighbouring slice.
PROPAGATE_MARGIN = 0.5
#: Whether negative clicks carry over too (a spurious region often ends where the real structure begins).
PROPAGATE_NEGATIVE = False
#: A soft click lands on the nearest voxel of the neighbouring slice that passes these tests, within this
#: in-plane distance of the click (0: the same in-plane voxel only), then the next slice searches from there.
PROPAGATE_SEARCH_MM = 0.0


def _local_means(slice_image: np.ndarray) -> np.ndarray:
    """Mean of every voxel's 3x3 neighbourhood."""
    return sitk.GetArrayFromImage(sitk.Mean(sitk.GetImageFromArray(slice_image.astype(np.float64)), [1, 1]))


def _margins(probabilities: np.ndarray, draft: np.ndarray, label: int) -> np.ndarray:
    """The margin of ``label`` over one slice, from the prior the engines use."""
    return label_margin(np.log(np.clip(draft_prior(probabilities, draft), 1e-6, None)), label)[0]


def _seed(
    near: tuple[int, int], allowed: np.ndarray, spacing: tuple[float, float], search_mm: float
) -> tuple[int, int] | None:
    """The ``allowed`` voxel nearest to ``near`` within ``search_mm`` (first in row order on a tie), or None."""
    rows, cols = np.nonzero(allowed)
    if not len(rows):
        return None
    distance = np.hypot((rows - near[0]) * spacing[0], (cols - near[1]) * spacing[1])
    best = int(np.argmin(distance))
    return (int(rows[best]), int(cols[best])) if distance[best] <= search_mm + 1e-9 else None


def propagated_clicks(
    by_slice: dict[int, list[SliceClick]],
    normalised: np.ndarray,
    probabilities: np.ndarray,
    draft: np.ndarray,
    slices: int = PROPAGATE_SLICES,
    spacing: tuple[float, float] = (1.0, 1.0),
) -> dict[int, list[SliceClick]]:
    """Soft clicks per slice copied from the real ``by_slice`` clicks (arrays slice-first: (S, H, W), (C, S, H, W);
    ``spacing``: in-plane, mm).

    The result holds, per slice, its soft clicks (in the order of the real clicks they come from)
    followed by its real clicks; slices without any click are left out.
    """
    soft: dict[int, list[SliceClick]] = {}
    means: dict[int, np.ndarray] = {}
    for s, clicks in by_slice.items():
        for click in clicks:
            here = int(draft[s][click.voxel])
            if not (click.positive or PROPAGATE_NEGATIVE) or (here == click.label) == click.positive:
                continue  # nothing to fix at the click: nothing to carry over
            if s not in means:
                means[s] = _local_means(normalised[s])
            intensity = means[s][click.voxel]
            margin = _margins(probabilities[:, s], draft[s], click.label)[click.voxel]
            for step in (-1, 1):
                at = click.voxel
                for n in range(s + step, s + step * (slices + 1), step):
                    if not 0 <= n < len(draft):
                        break
                    if n not in means:
                        means[n] = _local_means(normalised[n])
                    there = _margins(probabilities[:, n], draft[n], click.label)
                    alike = there >= margin - PROPAGATE_MARGIN if click.positive else there <= margin + PROPAGATE_MARGIN
                    allowed = alike & (draft[n] == here) & (np.abs(means[n] - intensity) <= PROPAGATE_INTENSITY)
                    at = _seed(at, allowed, spacing, PROPAGATE_SEARCH_MM)
                    if at is None:
                        break
                    soft.setdefault(n, []).append(SliceClick(at, click.label, click.positive, soft=True))
    return {s: soft.get(s, []) + by_slice.get(s, []) for s in sorted(set(soft) | set(by_slice))}


#: Whether :func:`adjacent_clicks` carries negative clicks too.
ADJACENT_NEGATIVE = True


def adjacent_clicks(
    by_slice: dict[int, list[SliceClick]], num_slices: int, reach_mm: float
) -> dict[int, list[SliceClick]]:
    """Every real click also as a soft click on the slices either side, ungated, with in-plane reach ``reach_mm``
    (none when it is not > 0): for an engine that judges itself whether the error continues there (the guided
    network with adjacent guidance). Per slice: its soft clicks, then its real ones."""
    soft: dict[int, list[SliceClick]] = {}
    for s, clicks in by_slice.items():
        for click in clicks:
            if click.soft or not (click.positive or ADJACENT_NEGATIVE) or not reach_mm > 0:
                continue
            for n in (s - 1, s + 1):
                if 0 <= n < num_slices:
                    carried = SliceClick(click.voxel, click.label, click.positive, soft=True, reach_mm=reach_mm)
                    soft.setdefault(n, []).append(carried)
    return {s: soft.get(s, []) + by_slice.get(s, []) for s in sorted(set(soft) | set(by_slice))}
