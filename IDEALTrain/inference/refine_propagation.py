"""Click propagation: a click also acts on the neighbouring slices where they show the same kind of error.

The click simulator's (and a user's) error regions are 3D: a missed piece of myocardium or a spurious
blob usually spans two or three short-axis slices, while a click lands on one. So each real click is
copied, as a *soft* click at the same in-plane voxel, to the slices up to ``slices`` away on either
side, as long as (slice by slice outwards, stopping at the first slice that fails):

- the draft there has the same label as the draft at the click (for a positive click: not yet the
  clicked structure; for a negative click: the clicked structure) -- the same kind of error;
- the smoothed normalised intensity there is within PROPAGATE_INTENSITY of the clicked voxel's;
- the clicked structure's margin (log p_L - log max other p, of the draft prior) is comparable: for a
  positive click at least the click's minus PROPAGATE_MARGIN, for a negative one at most the click's
  plus PROPAGATE_MARGIN.

A soft click runs through the same engine as a real one, but its voxel is not forced (see
:func:`.refine_engines.honour_clicks`), and on each slice soft clicks come before the real ones, so a
real click always wins.
"""

from __future__ import annotations

import numpy as np

from .refine_engines import SliceClick, draft_prior

#: Slices either side of a click that it may reach (0: a click edits only its own slice).
PROPAGATE_SLICES = 1
#: Largest difference of the 3x3 mean normalised intensity (slice range 0-1) between the clicked voxel and the
#: same in-plane voxel on a neighbouring slice.
PROPAGATE_INTENSITY = 0.1
#: Tolerance (nats) on the clicked structure's margin on the neighbouring slice.
PROPAGATE_MARGIN = 1.0


def _local_mean(slice_image: np.ndarray, at: tuple[int, int]) -> float:
    r, c = at
    return float(slice_image[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].mean())


def _margin(probabilities: np.ndarray, draft: np.ndarray, at: tuple[int, int], label: int) -> float:
    """The margin of ``label`` at one in-plane voxel of one slice, from the prior the engines use."""
    r, c = at
    prior = draft_prior(probabilities[:, r : r + 1, c : c + 1], draft[r : r + 1, c : c + 1])[:, 0, 0]
    log_p = np.log(np.clip(prior, 1e-6, None))
    others = np.delete(log_p, label)
    return float(log_p[label] - others.max())


def propagated_clicks(
    by_slice: dict[int, list[SliceClick]],
    normalised: np.ndarray,
    probabilities: np.ndarray,
    draft: np.ndarray,
    slices: int = PROPAGATE_SLICES,
) -> dict[int, list[SliceClick]]:
    """Soft clicks per slice copied from the real ``by_slice`` clicks (arrays slice-first: (S, H, W), (C, S, H, W)).

    The result holds, per slice, its soft clicks (in the order of the real clicks they come from)
    followed by its real clicks; slices without any click are left out.
    """
    soft: dict[int, list[SliceClick]] = {}
    if slices > 0:
        for s, clicks in by_slice.items():
            for click in clicks:
                at = click.voxel
                here = int(draft[s][at])
                if here == click.label if click.positive else here != click.label:
                    continue  # nothing to fix at the click: nothing to carry over
                intensity = _local_mean(normalised[s], at)
                margin = _margin(probabilities[:, s], draft[s], at, click.label)
                for step in (-1, 1):
                    for n in range(s + step, s + step * (slices + 1), step):
                        if not 0 <= n < len(draft) or int(draft[n][at]) != here:
                            break
                        if abs(_local_mean(normalised[n], at) - intensity) > PROPAGATE_INTENSITY:
                            break
                        there = _margin(probabilities[:, n], draft[n], at, click.label)
                        alike = (
                            there >= margin - PROPAGATE_MARGIN if click.positive else there <= margin + PROPAGATE_MARGIN
                        )
                        if not alike:
                            break
                        soft.setdefault(n, []).append(SliceClick(at, click.label, click.positive, soft=True))
    return {s: soft.get(s, []) + by_slice.get(s, []) for s in sorted(set(soft) | set(by_slice))}
