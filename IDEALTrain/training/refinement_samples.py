"""Training samples of the click-conditioned correction network: harder drafts, simulated clicks, augmented crops.

The network (:mod:`IDEALTrain.model.refinement_network`) learns to correct a draft from clicks. A training
sample is a crop of a stored slice (normalised image, the segmentation model's probabilities, its draft and
the reference label): rotated / flipped / gamma-changed, often with a harder draft (:func:`corrupt`: a
structure eroded, dilated, removed or shifted, or a false blob, with softened probabilities that agree with
it), and 1-3 clicks that follow the click-simulator benchmark's rule (:func:`simulate_clicks`). The loss
weighs voxels within a click's reach more, since only those may change when the engine runs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..inference.refine_engines import SliceClick, click_region, draft_prior
from ..model.refinement_network import RefinementConfig, guidance_maps, slice_guidance

#: Reach of a training click (px): its error region counts as fixed within it, and the loss weighs it more.
TRAIN_RADIUS_PX = 20
RANDOM_CLICK_CHANCE = 0.08  # a click where nothing is wrong (a user confirming a structure)
LARGEST_CHANCE = 0.85  # the largest error region and its deepest point, else a random region / voxel
CORRUPT_CHANCE = 0.6  # a sample's draft is made harder
CLICK_WEIGHT = 3.0  # extra loss weight within the clicks' reach
ADJACENT_CHANCE = 0.5  # with adjacent guidance: a sample's clicks lie on the slice next to it
OWN_CLICK_CHANCE = 0.3  # ... and the slice has a click of its own as well
#: A removed structure enclosed by another becomes that one half the time (ACDC: the LV inside the myocardium).
ENCLOSED_BY = {3: 2}


def disk(shape: tuple[int, int], centre, radius: float) -> np.ndarray:
    """Boolean disk of ``radius`` px around ``centre`` (row, column)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def corrupt(labels: np.ndarray, rng: np.random.Generator, num_classes: int = 4) -> np.ndarray:
    """A harder draft: one structure eroded / dilated / removed / shifted, or a false blob."""
    out = labels.copy()
    present = [s for s in range(1, num_classes) if (labels == s).any()]
    kind = rng.choice(["erode", "dilate", "remove", "shift", "blob"], p=[0.25, 0.25, 0.15, 0.15, 0.2])
    if kind == "blob" or not present:
        heart = np.argwhere(labels > 0)
        centre = heart[rng.integers(len(heart))] if len(heart) else np.array(labels.shape) // 2
        centre = centre + rng.integers(-15, 16, 2)
        blob = disk(labels.shape, centre, rng.uniform(3, 10))
        if rng.random() < 0.5:  # over the background only
            blob &= out == 0
        out[blob] = rng.integers(1, num_classes)
        return out
    s = int(rng.choice(present))
    mask = labels == s
    steps = int(rng.integers(1, 5))
    if kind == "erode":
        lost = mask & ~ndimage.binary_erosion(mask, iterations=steps)
        if rng.random() < 0.5 and lost.any():  # only part of the rim
            lost &= disk(labels.shape, np.argwhere(lost)[rng.integers(lost.sum())], rng.uniform(6, 20))
        around = ndimage.grey_dilation(np.where(mask, 0, labels), size=2 * steps + 3)
        out[lost] = around[lost]
    elif kind == "dilate":
        grown = ndimage.binary_dilation(mask, iterations=steps) & ~mask
        if rng.random() < 0.5 and grown.any():
            grown &= disk(labels.shape, np.argwhere(grown)[rng.integers(grown.sum())], rng.uniform(6, 20))
        out[grown] = s
    elif kind == "remove":
        enclosing = ENCLOSED_BY.get(s, 0)
        out[mask] = enclosing if 0 < enclosing < num_classes and rng.random() < 0.5 else 0
    else:
        shift = rng.integers(-4, 5, 2)
        moved = np.roll(mask, tuple(shift), axis=(0, 1))
        out[mask & ~moved] = 0
        out[moved] = s
    return out


def simulate_clicks(
    draft: np.ndarray,
    reference: np.ndarray,
    rng: np.random.Generator,
    *,
    num_classes: int = 4,
    radius_px: float = TRAIN_RADIUS_PX,
    count: int | None = None,
    random_chance: float = RANDOM_CLICK_CHANCE,
) -> list[SliceClick]:
    """``count`` (default 1-3) clicks by the benchmark's rule on the 2D errors of ``draft``.

    A click goes to the interior point of the largest error region of a wrong structure: positive in a
    missed region, negative in a false one; that region then counts as fixed within ``radius_px`` for the
    next click. Sometimes (``random_chance``, or when nothing is wrong) a positive click lands anywhere
    inside a structure, and 15 % of clicks take another region or voxel, so the network sees imperfect users.
    """
    current, clicks = draft.copy(), []
    if count is None:
        count = int(rng.choice([1, 2, 3], p=[0.35, 0.35, 0.3]))
    for _ in range(count):
        structures = [s for s in range(1, num_classes) if ((current == s) != (reference == s)).any()]
        if not structures or rng.random() < random_chance:
            s = int(rng.integers(1, num_classes))
            inside = ndimage.binary_erosion(reference == s, iterations=2)
            if inside.any():
                at = tuple(int(v) for v in np.argwhere(inside)[rng.integers(inside.sum())])
                clicks.append(SliceClick(at, s, True))
            continue
        s = int(rng.choice(structures))
        best = None
        for positive, error in ((True, (reference == s) & (current != s)), (False, (current == s) & (reference != s))):
            components, found = ndimage.label(error)
            if found:
                sizes = np.bincount(components.ravel())[1:]
                k = int(np.argmax(sizes)) if rng.random() < LARGEST_CHANCE else int(rng.integers(found))
                if best is None or sizes[k] > best[0]:
                    best = (sizes[k], components == k + 1, positive)
        _, region, positive = best
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        if rng.random() < LARGEST_CHANCE:
            at = np.unravel_index(int(np.argmax(depth)), depth.shape)
        else:
            at = np.argwhere(region)[rng.integers(region.sum())]
        at = tuple(int(v) for v in at)
        clicks.append(SliceClick(at, s, positive))
        fixed = region & disk(current.shape, at, radius_px)
        current[fixed] = reference[fixed]
    return clicks


def make_sample(
    data: dict[str, np.ndarray], index: int, rng: np.random.Generator, config: RefinementConfig, crop_px: int
) -> tuple[np.ndarray, ...]:
    """Image (1, H, W), prior (C, H, W), guidance, reference (H, W) and loss weight of one augmented crop of slice ``index``."""
    stored = data["image"].shape[-1]
    r0, c0 = rng.integers(0, stored - crop_px + 1, 2)
    crop = (slice(r0, r0 + crop_px), slice(c0, c0 + crop_px))
    image = data["image"][index][crop].astype(np.float32)
    prior = data["prior"][index][(slice(None), *crop)].astype(np.float32)
    draft, reference = data["draft"][index][crop], data["label"][index][crop]
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    image, draft, reference = (np.rot90(a, k) for a in (image, draft, reference))
    prior = np.rot90(prior, k, axes=(1, 2))
    if flip:
        image, draft, reference, prior = image[:, ::-1], draft[:, ::-1], reference[:, ::-1], prior[:, :, ::-1]
    image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < CORRUPT_CHANCE:  # a harder draft, with softened probabilities that agree with it
        draft, prior = soften_draft(reference if rng.random() < 0.5 else draft, prior, rng, config)
    draft, reference = np.ascontiguousarray(draft), np.ascontiguousarray(reference)
    prior = draft_prior(np.ascontiguousarray(prior), draft)
    clicks = simulate_clicks(draft, reference, rng, num_classes=config.num_classes)
    guide = guidance_maps(draft.shape, clicks, config)
    weight = np.ones(draft.shape, np.float32)
    if clicks:
        box, near = click_region(draft.shape, clicks, (1.0, 1.0), TRAIN_RADIUS_PX)
        weight[box] += CLICK_WEIGHT * near
    return image[None].copy(), prior, guide, reference.astype(np.int64), weight


def soften_draft(base: np.ndarray, prior: np.ndarray, rng: np.random.Generator, config: RefinementConfig):
    """A corrupted draft of ``base`` and probabilities that agree with it (blurred one-hot mixed with ``prior``)."""
    bad = corrupt(base, rng, config.num_classes)
    if rng.random() < 0.3:
        bad = corrupt(bad, rng, config.num_classes)
    onehot = np.eye(config.num_classes, dtype=np.float32)[bad].transpose(2, 0, 1)
    onehot = ndimage.gaussian_filter(onehot, (0, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)))
    w = rng.uniform(0.1, 0.45)
    mixed = (1 - w) * onehot + w * prior
    return mixed.argmax(axis=0).astype(np.uint8), mixed


def adjacent_slices(data: dict[str, np.ndarray]) -> list[list[int]]:
    """Per stored slice, the indices of the slices next to it in the same volume (from prepare's ``volume`` and ``position``)."""
    if "volume" not in data:
        return [[] for _ in range(len(data["image"]))]
    where = {(int(v), int(p)): n for n, (v, p) in enumerate(zip(data["volume"], data["position"]))}
    return [
        [where[(int(v), int(p) + step)] for step in (-1, 1) if (int(v), int(p) + step) in where]
        for v, p in zip(data["volume"], data["position"])
    ]


def make_adjacent_sample(
    data: dict[str, np.ndarray], index: int, neighbour: int, rng: np.random.Generator, config: RefinementConfig, crop_px: int
) -> tuple[np.ndarray, ...]:
    """A sample whose clicks were placed on slice ``neighbour`` (by the simulator's rule on its own errors) and
    reach slice ``index`` as adjacent guidance: the network learns to correct ``index`` where the error continues.

    Both slices get the same kind of draft (the model's own, or the same corruption drawn with one seed), so the
    errors are alike across slices as they are in real drafts; sometimes ``index`` has a click of its own too."""
    stored = data["image"].shape[-1]
    offset = data["corner"][neighbour] - data["corner"][index]  # the neighbour's crop frame -> this slice's
    drafts, references, priors = [], [], []
    use_reference, seed = rng.random() < 0.5, int(rng.integers(2**31))
    corrupted = rng.random() < CORRUPT_CHANCE
    for n in (index, neighbour):
        prior = data["prior"][n].astype(np.float32)
        draft, reference = data["draft"][n], data["label"][n]
        if corrupted:
            draft, prior = soften_draft(reference if use_reference else draft, prior, np.random.default_rng(seed), config)
        drafts.append(np.ascontiguousarray(draft))
        references.append(np.ascontiguousarray(reference))
        priors.append(draft_prior(np.ascontiguousarray(prior), drafts[-1]))
    moved = [
        SliceClick((c.voxel[0] + int(offset[0]), c.voxel[1] + int(offset[1])), c.label, c.positive, soft=True)
        for c in simulate_clicks(drafts[1], references[1], rng, num_classes=config.num_classes)
    ]
    clicks = [c for c in moved if 0 <= c.voxel[0] < stored and 0 <= c.voxel[1] < stored]
    if rng.random() < OWN_CLICK_CHANCE:
        clicks += simulate_clicks(drafts[0], references[0], rng, num_classes=config.num_classes, count=1)
    # a crop that holds the first click, then the same rotation / flip for every array
    anchor = clicks[0].voxel if clicks else (stored // 2, stored // 2)
    r0, c0 = (int(rng.integers(max(0, a - crop_px + 1), min(stored - crop_px, a) + 1)) for a in anchor)
    crop = (slice(r0, r0 + crop_px), slice(c0, c0 + crop_px))
    local = [SliceClick((c.voxel[0] - r0, c.voxel[1] - c0), c.label, c.positive, c.soft) for c in clicks]
    guide = slice_guidance((crop_px, crop_px), local, config)
    weight = np.ones((crop_px, crop_px), np.float32)
    if local:
        box, near = click_region((crop_px, crop_px), local, (1.0, 1.0), TRAIN_RADIUS_PX)
        weight[box] += CLICK_WEIGHT * near
    image = np.clip(data["image"][index][crop].astype(np.float32), 0, 1) ** rng.uniform(0.7, 1.4)
    arrays = [image[None], priors[0][(slice(None), *crop)], guide, references[0][crop][None], weight[None]]
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    arrays = [np.rot90(a, k, axes=(1, 2)) for a in arrays]
    if flip:
        arrays = [a[:, :, ::-1] for a in arrays]
    image, prior, guide, reference, weight = (np.ascontiguousarray(a) for a in arrays)
    return image, prior, guide, reference[0].astype(np.int64), weight[0]


def draw_sample(
    data: dict[str, np.ndarray], index: int, adjacent: list[int], rng: np.random.Generator, config: RefinementConfig, crop_px: int
) -> tuple[np.ndarray, ...]:
    """One training sample of slice ``index``: with adjacent guidance, half the time clicked on a slice next to it."""
    if config.adjacent_guidance and adjacent and rng.random() < ADJACENT_CHANCE:
        return make_adjacent_sample(data, index, adjacent[int(rng.integers(len(adjacent)))], rng, config, crop_px)
    image, prior, guide, reference, weight = make_sample(data, index, rng, config, crop_px)
    if config.adjacent_guidance:  # no adjacent clicks: their maps are empty
        guide = np.concatenate([guide, np.zeros_like(guide)])
    return image, prior, guide, reference, weight
