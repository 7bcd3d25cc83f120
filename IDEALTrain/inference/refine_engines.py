"""Refinement engines: one short-axis slice, its clicks and the network's probabilities in, labels out.

Every engine starts from a prior that agrees with the draft everywhere (the network's class
probabilities where the draft is the network's choice, the draft's class otherwise), changes voxels
only within ``radius_mm`` of a click of the slice, and finally sets every clicked voxel as its click
says (a negative click leaves the voxel's most probable other class).

- ``levelset`` (the default where a model has no correction network; the best of the engines without
  one on the click-simulator benchmark; ``guided``, :mod:`.refine_guided`, beats it): a click moves the boundary along
  the network's own iso-confidence lines through the clicked voxel; a negative click in the middle of
  a blob deletes all of it, the one edit that may reach past ``radius_mm`` (see :func:`levelset`).
- ``geodesic``: each click spreads its class (or removes it) with a weight that decays with the
  geodesic distance from the click, a path length that grows steeply across intensity edges, so a
  click fills the homogeneous region it lands in and stops at its boundary.
- ``random_walker``: per clicked structure, a two-class random walker with the prior as data term
  (Grady, "Multilabel random walker image segmentation using prior models", CVPR 2005): clicks
  are seeds, intensity differences weight the graph, the prior keeps unclicked voxels in place.
- ``tta``: test-time adaptation of the two decoders (:mod:`.refine_tta`), then
  :func:`adopt_changed_decisions`.

``levelset`` needs only NumPy and SimpleITK; ``geodesic`` and ``random_walker`` import SciPy and
scikit-image when called (the ``test`` extra), for benchmarking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: Geodesic engine: path cost per mm is BASE + EDGE * |intensity gradient per mm| (intensities in [0, 1])
#: + CONTRAST * |smoothed intensity - smoothed intensity at the click|; a click's weight is
#: 1 / (1 + (geodesic distance / SCALE_MM)^4): about 1 up to SCALE_MM, then falling fast.
GEODESIC_BASE = 0.5
GEODESIC_EDGE = 3.0
GEODESIC_SCALE_MM = 10.0
GEODESIC_CONTRAST = 20.0
#: Random walker: edge weight exp(-BETA * (intensity difference)^2), prior strength GAMMA.
WALKER_BETA = 30.0
WALKER_GAMMA = 0.02
#: Level set: tolerance (nats) on the clicked class's margin.
LEVEL_MARGIN = 1.0
LEVEL_EXTENT = 2.5  # a click reaches LEVEL_EXTENT times its depth (distance to its region's edge) ...
LEVEL_SLACK_MM = 3.0  # ... plus this
LEVEL_BLOB_DEPTH = 0.85  # a negative click this deep in its blob (share of the blob's deepest point) deletes it
LEVEL_INTENSITY = 0.2  # a positive click takes voxels within this of its smoothed intensity (slice range 0-1)
DRAFT_CONFIDENCE = 0.9  # prior probability given to the draft's class where it overrides the network


@dataclass(frozen=True)
class SliceClick:
    """A click on one slice: its in-plane voxel (row, column), label value and sign.

    A ``soft`` click is one carried over from a neighbouring slice (:mod:`.refine_propagation`): the
    engines use it like any other, but its voxel is not forced to what it says. ``reach_mm`` is its
    in-plane reach when it differs from the engine's radius (a carried click reaches only as far as keeps
    its edits within the radius of the real click in 3D).
    """

    voxel: tuple[int, int]
    label: int
    positive: bool
    soft: bool = False
    reach_mm: float | None = None


def draft_prior(probabilities: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """Class probabilities (C, H, W) whose argmax is the draft: the network's where it agrees, else the draft's."""
    agree = probabilities.argmax(axis=0) == draft
    onehot = np.eye(len(probabilities), dtype=np.float32)[draft].transpose(2, 0, 1)
    mixed = DRAFT_CONFIDENCE * onehot + (1 - DRAFT_CONFIDENCE) * probabilities
    return np.where(agree[None], probabilities, mixed).astype(np.float32)


def label_margin(log_p: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """``label``'s margin log p_L - log max other p, and the log prior with L masked out (its argmax: the best other class)."""
    others = log_p.copy()
    others[label] = -np.inf
    return log_p[label] - others.max(axis=0), others


def click_region(
    shape: tuple[int, int], clicks: list[SliceClick], spacing: tuple[float, float], radius_mm: float
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Bounding box of every voxel within ``radius_mm`` (or the click's own ``reach_mm``) of a click, and that
    disk union inside the box."""
    radii = [radius_mm if c.reach_mm is None else c.reach_mm for c in clicks]
    reach = [int(np.ceil(max(radii) / s)) for s in spacing]
    rows = [c.voxel[0] for c in clicks]
    cols = [c.voxel[1] for c in clicks]
    box = (
        slice(max(0, min(rows) - reach[0]), min(shape[0], max(rows) + reach[0] + 1)),
        slice(max(0, min(cols) - reach[1]), min(shape[1], max(cols) + reach[1] + 1)),
    )
    r, c = np.meshgrid(np.arange(box[0].start, box[0].stop), np.arange(box[1].start, box[1].stop), indexing="ij")
    near = np.zeros(r.shape, bool)
    for click, radius in zip(clicks, radii):
        near |= ((r - click.voxel[0]) * spacing[0]) ** 2 + ((c - click.voxel[1]) * spacing[1]) ** 2 <= radius**2
    return box, near


def _local(click: SliceClick, box: tuple[slice, slice]) -> tuple[int, int]:
    return click.voxel[0] - box[0].start, click.voxel[1] - box[1].start


def honour_clicks(labels: np.ndarray, prior: np.ndarray, clicks: list[SliceClick], box: tuple[slice, slice]) -> None:
    """Set each clicked voxel as its click says, in click order (the later click wins); soft clicks are skipped."""
    for click in clicks:
        if click.soft:
            continue
        r, c = _local(click, box)
        if click.positive:
            labels[r, c] = click.label
        elif labels[r, c] == click.label:
            others = prior[:, r, c].copy()
            others[click.label] = -1.0
            labels[r, c] = int(others.argmax())


def keep_negative_clicks_negative(
    draft: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    clicks: list[SliceClick],
    spacing: tuple[float, float],
    radius_mm: float,
) -> np.ndarray:
    """``labels`` of one slice without a voxel of structure L that the draft did not have, within the reach of a
    negative click for L (real or carried over) and out of reach of every positive click for L there: "this is
    not L" never adds L (the guided network, given a negative click, could redraw L around it). Such a voxel gets
    its draft class back, or, where that class is refused there too, its most probable class that is not.
    Clicked voxels are left as their clicks set them."""
    negated: dict[int, np.ndarray] = {}
    for label in {c.label for c in clicks if not c.positive}:
        near = {True: np.zeros(draft.shape, bool), False: np.zeros(draft.shape, bool)}
        for click in (c for c in clicks if c.label == label):
            reach = radius_mm if click.reach_mm is None else click.reach_mm
            near[click.positive] |= _distance_from(click.voxel, draft.shape, spacing) <= reach
        negated[label] = near[False] & ~near[True]
    wrong = np.zeros(draft.shape, bool)
    for label, mask in negated.items():
        wrong |= mask & (labels == label) & (draft != label)
    for click in clicks:
        if not click.soft:
            wrong[click.voxel] = False
    if not wrong.any():
        return labels
    out = labels.copy()
    allowed = np.log(np.clip(draft_prior(probabilities, draft), 1e-6, None))
    for label, mask in negated.items():
        allowed[label][mask] = -np.inf
    refused_draft = np.take_along_axis(allowed, draft[None].astype(np.intp), 0)[0] == -np.inf
    out[wrong] = np.where(refused_draft, allowed.argmax(axis=0), draft)[wrong]
    return out


def _finish(draft: np.ndarray, box, near, labels, prior, clicks) -> np.ndarray:
    """Keep the draft outside the click disks, honour the clicks, paste the box back."""
    labels = np.where(near, labels, draft[box]).astype(np.uint8)
    honour_clicks(labels, prior, clicks, box)
    out = draft.copy()
    out[box] = labels
    return out


def geodesic(
    image: np.ndarray,
    probabilities: np.ndarray,
    draft: np.ndarray,
    clicks: list[SliceClick],
    spacing: tuple[float, float],
    radius_mm: float,
) -> np.ndarray:
    """Geodesic-distance weighted edit of the prior (see the module docstring); needs scikit-image."""
    from scipy.ndimage import gaussian_filter, gaussian_gradient_magnitude
    from skimage.graph import MCP_Geometric

    box, near = click_region(draft.shape, clicks, spacing, radius_mm)
    prior = draft_prior(probabilities[(slice(None), *box)], draft[box])
    edited = prior.copy()
    step = float(np.mean(spacing))
    smooth = gaussian_filter(image[box].astype(np.float32), sigma=1.0)
    gradient = gaussian_gradient_magnitude(image[box].astype(np.float32), sigma=1.0) / step
    for click in clicks:
        contrast = np.abs(smooth - smooth[_local(click, box)])
        cost = GEODESIC_BASE + GEODESIC_EDGE * gradient + GEODESIC_CONTRAST * contrast
        distance, _ = MCP_Geometric(cost, sampling=spacing).find_costs([_local(click, box)])
        weight = (near / (1.0 + (distance / GEODESIC_SCALE_MM) ** 4)).astype(np.float32)
        if click.positive:  # it claims voxels of the class it was clicked on only, not the neighbours'
            weight *= draft[box] == draft[click.voxel]
            edited *= 1 - weight
            edited[click.label] += weight
        else:  # the removed share goes to each voxel's most probable other class
            others = edited.copy()
            others[click.label] = -1.0
            alternative = others.argmax(axis=0)
            moved = weight * edited[click.label]
            edited[click.label] -= moved
            np.add.at(edited, (alternative, *np.indices(alternative.shape)), moved)
    return _finish(draft, box, near, edited.argmax(axis=0), prior, clicks)


def _component_at(mask: np.ndarray, at: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask`` holding ``at`` (SimpleITK: no SciPy needed at run time)."""
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    return components == components[at]


def _distance_from(at: tuple[int, int], shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return np.hypot((rows - at[0]) * spacing[0], (cols - at[1]) * spacing[1])


def levelset(
    image: np.ndarray,
    probabilities: np.ndarray,
    draft: np.ndarray,
    clicks: list[SliceClick],
    spacing: tuple[float, float],
    radius_mm: float,
) -> np.ndarray:
    """The network's own confidence level set through each click, within the click's radius.

    For a click on structure L at voxel v, m = log p_L - log(max other p) is L's margin. A positive
    click adds the connected region around v of voxels of v's current class that are at least as
    L-like as v (m >= m(v) - LEVEL_MARGIN) and alike in smoothed intensity (within LEVEL_INTENSITY);
    a negative click removes the connected region of L voxels at most as L-like as v (m <= m(v) +
    LEVEL_MARGIN), giving each its most probable other class. Either reaches at most LEVEL_EXTENT
    times v's depth in its region plus LEVEL_SLACK_MM. So a click moves the boundary along the
    network's iso-confidence lines, the shape the network believes in. A negative click in the middle of
    a blob (its depth at least LEVEL_BLOB_DEPTH times the blob's deepest point) deletes the whole
    connected blob of its slice, however far it reaches: "this is not the structure" said at the
    centre of a spurious region (an atrium marked as RV on a basal slice) means all of it.
    """
    box, near = click_region(draft.shape, clicks, spacing, radius_mm)
    if any(not c.positive for c in clicks):  # a deleted blob may reach past the click disks: work on the slice
        whole = np.zeros(draft.shape, bool)
        whole[box] = near
        box, near = (slice(0, draft.shape[0]), slice(0, draft.shape[1])), whole
    reach = near.copy()
    prior = draft_prior(probabilities[(slice(None), *box)], draft[box])
    log_p = np.log(np.clip(prior, 1e-6, None))
    labels = draft[box].astype(np.uint8).copy()
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image[box]), 1.0))
    for click in clicks:
        margin, others = label_margin(log_p, click.label)
        at = _local(click, box)
        inside = labels == click.label
        blob = None if click.positive else deleted_blob(labels, at, click.label, spacing)
        if blob is not None:
            labels[blob] = others.argmax(axis=0)[blob]
            reach |= blob
            continue
        if click.positive:  # voxels of the clicked voxel's class, at least as L-like as it, and alike in intensity
            candidates = (labels == labels[at]) & (margin >= margin[at] - LEVEL_MARGIN)
            candidates &= np.abs(smooth - smooth[at]) <= LEVEL_INTENSITY
        else:
            candidates = inside & (margin <= margin[at] + LEVEL_MARGIN)
        # as far from the click as LEVEL_EXTENT times its depth in the region it was clicked in
        region_of_click = labels == labels[at]
        distance = _distance_from(at, labels.shape, spacing)
        depth = distance[~region_of_click].min() if not region_of_click.all() else radius_mm
        candidates &= near & (distance <= LEVEL_EXTENT * depth + LEVEL_SLACK_MM)
        candidates[at] = True
        region = _component_at(candidates, at)
        labels[region] = click.label if click.positive else others.argmax(axis=0)[region]
    return _finish(draft, box, reach, labels, prior, clicks)


def deleted_blob(labels: np.ndarray, at: tuple[int, int], label: int, spacing: tuple[float, float]) -> np.ndarray | None:
    """The whole blob of ``label`` that a negative click at ``at`` deletes (the click lies at least LEVEL_BLOB_DEPTH
    as deep in it as its deepest point), or None: a click near the blob's edge only trims it."""
    if labels[at] != label:
        return None
    blob = _component_at(labels == label, at)
    depth = _depth_inside(blob, spacing)
    return blob if depth[at] >= LEVEL_BLOB_DEPTH * depth.max() else None


def _depth_inside(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it (the slice edge counts as outside)."""
    padded = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))
    padded.SetSpacing((float(spacing[1]), float(spacing[0])))
    distance = sitk.SignedMaurerDistanceMap(padded, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    return np.clip(sitk.GetArrayFromImage(distance)[1:-1, 1:-1], 0, None)


def _grid_laplacian(image: np.ndarray, spacing: tuple[float, float]):
    """Graph Laplacian of the 4-connected pixel grid, edges weighted by intensity similarity."""
    import scipy.sparse as sparse

    h, w = image.shape
    index = np.arange(h * w).reshape(h, w)
    heads, tails, weights = [], [], []
    for axis, step in ((0, spacing[0]), (1, spacing[1])):
        a = index.take(np.arange(image.shape[axis] - 1), axis=axis).ravel()
        b = index.take(np.arange(1, image.shape[axis]), axis=axis).ravel()
        difference = image.ravel()[a] - image.ravel()[b]
        heads.append(a)
        tails.append(b)
        weights.append(np.exp(-WALKER_BETA * difference**2) / step)
    a, b, wt = np.concatenate(heads), np.concatenate(tails), np.concatenate(weights)
    adjacency = sparse.coo_matrix(
        (np.concatenate([wt, wt]), (np.concatenate([a, b]), np.concatenate([b, a]))), (h * w,) * 2
    )
    return (sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency).tocsr()


def random_walker(
    image: np.ndarray,
    probabilities: np.ndarray,
    draft: np.ndarray,
    clicks: list[SliceClick],
    spacing: tuple[float, float],
    radius_mm: float,
) -> np.ndarray:
    """Per-structure two-class random walker with the prior as data term (see the module docstring); needs SciPy."""
    import scipy.sparse as sparse
    from scipy.sparse.linalg import spsolve

    box, near = click_region(draft.shape, clicks, spacing, radius_mm)
    prior = draft_prior(probabilities[(slice(None), *box)], draft[box])
    labels = draft[box].astype(np.uint8).copy()
    laplacian = _grid_laplacian(image[box].astype(np.float64), spacing)
    free = near.ravel().copy()
    for click in clicks:
        free[np.ravel_multi_index(_local(click, box), near.shape)] = False
    unknown, known = np.flatnonzero(free), np.flatnonzero(~free)
    system = (laplacian[unknown][:, unknown] + WALKER_GAMMA * sparse.identity(len(unknown))).tocsc()
    coupling = laplacian[unknown][:, known]
    for structure in dict.fromkeys(c.label for c in clicks):
        fixed = (labels == structure).astype(np.float64).ravel()
        for click in clicks:
            index = np.ravel_multi_index(_local(click, box), near.shape)
            fixed[index] = (
                float(click.positive) if click.label == structure else (0.0 if click.positive else fixed[index])
            )
        rhs = WALKER_GAMMA * prior[structure].ravel()[unknown] - coupling @ fixed[known]
        inside = fixed.copy()
        inside[unknown] = spsolve(system, rhs)
        inside = inside.reshape(near.shape) > 0.5
        others = prior.copy()
        others[structure] = -1.0
        labels = np.where(inside, structure, np.where(labels == structure, others.argmax(axis=0), labels))
    return _finish(draft, box, near, labels, prior, clicks)


def adopt_changed_decisions(
    before: np.ndarray,
    after: np.ndarray,
    draft: np.ndarray,
    clicks: list[SliceClick],
    spacing: tuple[float, float],
    radius_mm: float,
) -> np.ndarray:
    """Labels of a slice whose probabilities went from ``before`` to ``after`` (test-time adaptation): the
    draft, except near the clicks where the most probable class changed."""
    box, near = click_region(draft.shape, clicks, spacing, radius_mm)
    old, new = before[(slice(None), *box)].argmax(axis=0), after[(slice(None), *box)].argmax(axis=0)
    clicked = [c.label for c in clicks]  # only decisions that involve a clicked structure
    labels = np.where((new != old) & (np.isin(new, clicked) | np.isin(old, clicked)), new, draft[box])
    return _finish(draft, box, near, labels, draft_prior(after[(slice(None), *box)], draft[box]), clicks)


Engine = Callable[[np.ndarray, np.ndarray, np.ndarray, list, tuple, float], np.ndarray]
ENGINES: dict[str, Engine | None] = {
    "geodesic": geodesic,
    "levelset": levelset,
    "random_walker": random_walker,
    "tta": None,
    "guided": None,
}  # tta: refine_tta; guided: refine_guided, made from the model's refinement network
