"""Building blocks of IDEAL's dense contrastive pretraining (Basak et al., ICASSP 2023).

Two augmented views of an unlabelled slice are made with known affine transforms, so every cell
of a feature map of view 1 has an exactly known partner location in view 2. The dense InfoNCE
loss pulls a query pixel towards the key at its partner location and pushes it from the keys at
all other sampled locations (same and other images) and from an optional queue of past keys;
an optional image-level InfoNCE term follows Chaitanya et al. (NeurIPS 2020). The training loop
(momentum key encoder, optimiser, checkpoints) lives elsewhere; everything here is stateless
except ``KeyQueue``.

All transforms use ``F.affine_grid`` conventions with ``align_corners=False``: a theta (B, 2, 3)
maps normalised output-view coordinates (x, y) to normalised source-image coordinates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import IdealError
from .augment import random_affine, random_intensity


@dataclass(frozen=True)
class ViewConfig:
    """Ranges of the random view transforms for contrastive pretraining (recorded in the bundle card)."""

    rotation_degrees: float = 20.0
    scale_range: tuple[float, float] = (0.7, 1.3)  # zoom: > 1 magnifies (a smaller crop of the source)
    translation: float = 0.1  # largest shift of the view centre, in normalised source coordinates
    flip: bool = True
    gamma_range: tuple[float, float] = (0.6, 1.7)
    contrast_range: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.15
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        for name in ("scale_range", "gamma_range", "contrast_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise IdealError(f"view {name} must satisfy 0 < low <= high, got {(low, high)}")
            object.__setattr__(self, name, (float(low), float(high)))
        if self.translation < 0 or self.brightness < 0 or self.noise_std < 0:
            raise IdealError("view translation, brightness and noise_std must not be negative")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TwoViews:
    """Two views (B, 1, H, W) of the same images and the thetas (B, 2, 3) that made them."""

    view1: torch.Tensor
    view2: torch.Tensor
    theta1: torch.Tensor
    theta2: torch.Tensor


class DenseLoss(NamedTuple):
    """The dense InfoNCE loss and the sampled positive keys (N, D), detached, ready to enqueue."""

    loss: torch.Tensor
    keys: torch.Tensor


def _random_view_theta(n: int, config: ViewConfig, generator: torch.Generator) -> torch.Tensor:
    theta = random_affine(n, config.rotation_degrees, config.scale_range, config.flip, generator)
    theta[:, :, 2] = (2 * torch.rand(n, 2, generator=generator) - 1) * config.translation
    return theta


def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_views(images: torch.Tensor, config: ViewConfig, generator: torch.Generator) -> TwoViews:
    """Two independently augmented views of images (B, 1, H, W) in [0, 1], with their exact geometry.

    Randomness comes only from ``generator`` (CPU), so the same seed gives the same views.
    """
    n, device = images.shape[0], images.device
    theta1 = _random_view_theta(n, config, generator).to(device=device, dtype=images.dtype)
    theta2 = _random_view_theta(n, config, generator).to(device=device, dtype=images.dtype)
    view1 = random_intensity(_warp(images, theta1), config, generator)
    view2 = random_intensity(_warp(images, theta2), config, generator)
    return TwoViews(view1, view2, theta1, theta2)


def corresponding_points(
    theta1: torch.Tensor, theta2: torch.Tensor, feature_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each cell centre of an (h, w) view-1 feature map lies in view 2.

    Returns points (B, h, w, 2) in normalised (x, y) for ``grid_sample`` and a mask (B, h, w) of the
    points that fall inside view 2 and inside the source image.
    """
    h, w = feature_size
    source = F.affine_grid(theta1, [theta1.shape[0], 1, h, w], align_corners=False)  # (B, h, w, 2)
    inverse = torch.linalg.inv(theta2[:, :, :2])  # (B, 2, 2)
    offset = source - theta2[:, None, None, :, 2]
    points = torch.einsum("bij,bhwj->bhwi", inverse, offset)
    valid = (source.abs() <= 1).all(-1) & (points.abs() <= 1).all(-1)
    return points, valid


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise IdealError(f"contrastive temperature must be positive, got {temperature}")


def dense_info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    points: torch.Tensor,
    valid: torch.Tensor,
    *,
    generator: torch.Generator,
    temperature: float = 0.1,
    samples_per_image: int = 64,
    queue: torch.Tensor | None = None,
    negative_min_distance: float = 0.0,
    same_image_negatives: bool = False,
    positive_radius: float = 0.0,
) -> DenseLoss:
    """Dense InfoNCE between view-1 queries and view-2 keys (B, D, h, w) at known correspondences.

    Up to ``samples_per_image`` valid cells are sampled per image; each query's positive is the key
    bilinearly sampled at its partner point, and its negatives are the positives of every other
    sampled cell in the batch plus the ``queue`` rows (K, D). Cells of the same image closer than
    ``negative_min_distance`` feature cells are left out of the negatives: neighbours that show the
    same tissue can only be told apart by position. With ``same_image_negatives`` only cells of the
    query's own image are negatives, as in Chaitanya et al.'s local loss: the same structure in
    another patient is never pushed away (no queue then, its keys come from other images). With
    ``positive_radius`` > 0 the keys of same-image cells closer than that many feature cells are
    positives too (PixPro-style; a multi-positive InfoNCE), so neighbours of the same tissue are
    pulled together instead of apart. Keys never receive gradients.
    """
    _check_temperature(temperature)
    if samples_per_image < 1:
        raise IdealError(f"samples_per_image must be at least 1, got {samples_per_image}")
    if not positive_radius >= 0:
        raise IdealError(f"positive_radius must be zero or more feature cells, got {positive_radius}")
    if not negative_min_distance >= 0:
        raise IdealError(f"negative_min_distance must be zero or more feature cells, got {negative_min_distance}")
    if same_image_negatives and queue is not None:
        raise IdealError("same-image negatives exclude a key queue (its keys come from other images); set the queue size to 0")
    b, d, h, w = queries.shape
    if keys.shape != queries.shape or points.shape != (b, h, w, 2) or valid.shape != (b, h, w):
        raise IdealError(
            f"dense contrastive shapes disagree: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, "
            f"points {tuple(points.shape)}, valid {tuple(valid.shape)}"
        )
    flat_valid = valid.flatten(1)
    # random scores from the generator; invalid cells score below every valid one and are dropped
    scores = torch.rand(b, h * w, generator=generator).to(valid.device).masked_fill(~flat_valid, -1.0)
    picked = scores.topk(min(samples_per_image, h * w), dim=1).indices  # (B, S)
    keep = flat_valid.gather(1, picked)

    flat_queries = queries.flatten(2).transpose(1, 2)  # (B, h*w, D)
    q = flat_queries.gather(1, picked[..., None].expand(-1, -1, d))[keep]
    grid = points.flatten(1, 2).gather(1, picked[..., None].expand(-1, -1, 2))[:, :, None, :]
    sampled = F.grid_sample(
        keys.detach().float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False
    )
    k = F.normalize(sampled[..., 0].transpose(1, 2)[keep], dim=1)  # (N, D)
    if q.shape[0] == 0:
        return DenseLoss(queries.sum() * 0.0, k)
    excluded = positives = None
    if negative_min_distance > 0 or same_image_negatives or positive_radius > 0:
        same_image, distance = _cell_pairs(picked, keep, w)
        excluded = same_image & (distance < negative_min_distance)
        if same_image_negatives:
            excluded |= ~same_image
        if positive_radius > 0:
            positives = (same_image & (distance < positive_radius)).fill_diagonal_(True)
            excluded &= ~positives
        excluded.fill_diagonal_(False)
    return DenseLoss(_info_nce(q, k, temperature, queue, exclude=excluded, positives=positives), k)


def _cell_pairs(picked: torch.Tensor, keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pair of kept sampled cells (N, N): whether they come from one image, and their distance in cells."""
    image = torch.arange(picked.shape[0], device=picked.device)[:, None].expand_as(picked)[keep]
    position = torch.stack([picked // width, picked % width], -1)[keep].float()
    return image[:, None] == image[None, :], torch.cdist(position, position)


def global_info_nce(
    queries: torch.Tensor, keys: torch.Tensor, *, temperature: float = 0.1, queue: torch.Tensor | None = None
) -> torch.Tensor:
    """Image-level InfoNCE (Chaitanya et al.): query i's positive is key i, the other keys and the
    queue rows are its negatives. Embeddings (B, D) are L2-normalised here; keys get no gradient."""
    _check_temperature(temperature)
    if keys.shape != queries.shape or queries.ndim != 2:
        shapes = f"{tuple(queries.shape)} and {tuple(keys.shape)}"
        raise IdealError(f"global contrastive needs queries and keys of one shape (B, D), got {shapes}")
    return _info_nce(queries, F.normalize(keys.detach().float(), dim=1), temperature, queue)


def _info_nce(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float, queue: torch.Tensor | None,
    exclude: torch.Tensor | None = None, positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy where row i of ``keys`` is the positive of query i and every other key row and
    every queue row is a negative (the diagonal form of 'positive at index 0'), except the key rows
    that ``exclude`` (N, N) marks for that query; ``positives`` (N, N, diagonal set) makes more key
    rows positives: the loss is then -log(sum over positives / sum over all candidates)."""
    q = F.normalize(queries.float(), dim=1)
    candidates = keys if queue is None else torch.cat([keys, queue.detach().to(keys)])
    logits = q @ candidates.T / temperature
    if exclude is not None:
        logits = logits.masked_fill(F.pad(exclude, (0, logits.shape[1] - exclude.shape[1])), float("-inf"))
    if positives is None:
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
    positive_logits = logits[:, : keys.shape[0]].masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1)).mean()


class KeyQueue:
    """Fixed-size ring buffer of past keys (MoCo-style negatives), checkpointable as plain tensors."""

    def __init__(self, size: int, dim: int, device: torch.device | str | None = None) -> None:
        if size < 1 or dim < 1:
            raise IdealError(f"a key queue needs a positive size and dimension, got {size} x {dim}")
        self._keys = torch.zeros(size, dim, device=device)
        self._position = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def enqueue(self, keys: torch.Tensor) -> None:
        """Add keys (N, D), overwriting the oldest ones once full."""
        size = self._keys.shape[0]
        keys = keys.detach().to(self._keys)[-size:]
        index = (self._position + torch.arange(keys.shape[0])) % size
        self._keys[index.to(self._keys.device)] = keys
        self._position = (self._position + keys.shape[0]) % size
        self._filled = min(size, self._filled + keys.shape[0])

    def tensor(self) -> torch.Tensor | None:
        """The stored keys (n, D), or None while the queue is empty."""
        return self._keys[: self._filled] if self._filled else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self._keys.clone(),
            "position": torch.tensor(self._position, dtype=torch.int64),
            "filled": torch.tensor(self._filled, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["keys"].shape) != tuple(self._keys.shape):
            held, expected = tuple(state["keys"].shape), tuple(self._keys.shape)
            raise IdealError(f"key queue checkpoint holds {held} keys, this run expects {expected}")
        self._keys.copy_(state["keys"])
        self._position = int(state["position"])
        self._filled = int(state["filled"])
