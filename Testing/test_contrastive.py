"""Dense and global contrastive building blocks: exact view geometry, loss behaviour, key queue."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from IDEALTrain.errors import IdealError
from IDEALTrain.training.contrastive import (
    KeyQueue,
    ViewConfig,
    corresponding_points,
    dense_info_nce,
    global_info_nce,
    make_views,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _identity(batch: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(batch, 2, 3).clone()


def _smooth_images(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random low-frequency images that fade to zero at the border (so zero padding is seamless)."""
    noise = torch.rand(batch, 1, 6, 6, generator=_generator(seed))
    smooth = F.interpolate(noise, size=size, mode="bicubic", align_corners=True)
    ys = torch.linspace(0, math.pi, size[0]).sin()
    xs = torch.linspace(0, math.pi, size[1]).sin()
    return smooth * (ys[:, None] * xs[None, :]) ** 2


def _location_embedding(theta: torch.Tensor, size: tuple[int, int], dim: int = 32) -> torch.Tensor:
    """Embeddings (B, D, h, w) that are a smooth, distinctive function of the source location."""
    source = F.affine_grid(theta, [theta.shape[0], 1, *size], align_corners=False)
    frequencies = torch.randn(2, dim // 2, generator=_generator(7)) * 3
    phase = source @ frequencies
    return F.normalize(torch.cat([phase.sin(), phase.cos()], -1), dim=-1).permute(0, 3, 1, 2)


def _random_embeddings(batch: int, dim: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, *size, generator=_generator(seed)), dim=1)


def _loss(queries, keys, points, valid, **options):
    options = {"temperature": 0.1, "samples_per_image": 32, "generator": _generator(3), **options}
    return dense_info_nce(queries, keys, points, valid, **options)


def test_make_views_is_deterministic_per_seed():
    images = _smooth_images(3, (32, 32))
    first = make_views(images, ViewConfig(), _generator(11))
    again = make_views(images, ViewConfig(), _generator(11))
    other = make_views(images, ViewConfig(), _generator(12))
    for name in ("view1", "view2", "theta1", "theta2"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.theta1, other.theta1)
    assert not torch.equal(first.theta1, first.theta2)
    assert first.view1.shape == images.shape and first.theta2.shape == (3, 2, 3)


@pytest.mark.parametrize("feature_size", [(48, 40), (12, 10)])
def test_corresponding_points_are_exact(feature_size):
    images = _smooth_images(4, (48, 40))
    config = ViewConfig(gamma_range=(1, 1), contrast_range=(1, 1), brightness=0.0, noise_std=0.0, translation=0.2)
    views = make_views(images, config, _generator(5))
    points, valid = corresponding_points(views.theta1, views.theta2, feature_size)
    assert points.shape == (4, *feature_size, 2) and valid.shape == (4, *feature_size)
    assert 0.3 < valid.float().mean() < 1.0  # the views overlap, but not completely

    centres = F.affine_grid(_identity(4), [4, 1, *feature_size], align_corners=False)
    in_view1 = F.grid_sample(views.view1, centres, align_corners=False)[:, 0]
    in_view2 = F.grid_sample(views.view2, points, align_corners=False)[:, 0]
    error = (in_view1 - in_view2).abs()[valid]
    assert error.max() < 0.02 * images.max() and error.mean() < 0.002 * images.max()
    shuffled = F.grid_sample(views.view2, points.flip(1), align_corners=False)[:, 0]
    assert (in_view1 - shuffled).abs()[valid].mean() > 10 * error.mean()


def test_identity_views_map_each_cell_to_itself():
    points, valid = corresponding_points(_identity(2), _identity(2), (5, 7))
    assert valid.all()
    assert torch.allclose(points, F.affine_grid(_identity(2), [2, 1, 5, 7], align_corners=False))


def test_identical_views_beat_shuffled_correspondences():
    embeddings = _random_embeddings(2, 16, (8, 8))
    points, valid = corresponding_points(_identity(2), _identity(2), (8, 8))
    shuffled = points.flatten(1, 2)[:, torch.randperm(64, generator=_generator(4))].view_as(points)
    matched = _loss(embeddings, embeddings, points, valid).loss
    assert matched < _loss(embeddings, embeddings, shuffled, valid).loss
    assert matched < 0.05


def test_true_correspondence_beats_random_correspondence():
    views = make_views(_smooth_images(3, (32, 32)), ViewConfig(), _generator(9))
    queries = _location_embedding(views.theta1, (16, 16))
    keys = _location_embedding(views.theta2, (16, 16))
    points, valid = corresponding_points(views.theta1, views.theta2, (16, 16))
    random_points = torch.rand(points.shape, generator=_generator(2)) * 2 - 1
    assert _loss(queries, keys, points, valid).loss < 0.5 * _loss(queries, keys, random_points, valid).loss


def test_gradients_reach_queries_and_never_keys():
    queries = _random_embeddings(2, 16, (8, 8)).requires_grad_()
    keys = _random_embeddings(2, 16, (8, 8), seed=2).requires_grad_()
    points, valid = corresponding_points(_identity(2), _identity(2), (8, 8))
    result = _loss(queries, keys, points, valid)
    result.loss.backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert keys.grad is None and not result.keys.requires_grad
    assert result.keys.shape == (2 * 32, 16)

    image_keys = torch.randn(4, 8).requires_grad_()
    image_queries = torch.randn(4, 8).requires_grad_()
    global_info_nce(image_queries, image_keys, temperature=0.2).backward()
    assert image_queries.grad is not None and image_keys.grad is None


def test_temperature_changes_the_loss():
    embeddings = _random_embeddings(2, 16, (8, 8))
    points, valid = corresponding_points(_identity(2), _identity(2), (8, 8))
    cold = _loss(embeddings, embeddings, points, valid, temperature=0.05).loss
    warm = _loss(embeddings, embeddings, points, valid, temperature=0.5).loss
    assert not torch.isclose(cold, warm)
    with pytest.raises(IdealError):
        _loss(embeddings, embeddings, points, valid, temperature=0.0)


def test_queue_rows_act_as_negatives():
    embeddings = _random_embeddings(2, 16, (8, 8))
    points, valid = corresponding_points(_identity(2), _identity(2), (8, 8))
    plain = _loss(embeddings, embeddings, points, valid)
    with_positives_queued = _loss(embeddings, embeddings, points, valid, queue=plain.keys).loss
    assert with_positives_queued > plain.loss + 0.5
    unrelated = _loss(embeddings, embeddings, points, valid, queue=-plain.keys).loss
    assert unrelated < with_positives_queued


def _masked_reference(embeddings: torch.Tensor, temperature: float, distance: float, same_image_only: bool = False) -> torch.Tensor:
    """InfoNCE over every cell with identity views, written out: same-image pairs closer than
    ``distance`` cells are dropped from the negatives, and so are all pairs from two images if asked."""
    b, d, h, w = embeddings.shape
    q = F.normalize(embeddings.flatten(2).transpose(1, 2).reshape(-1, d), dim=1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.arange(b).repeat_interleave(h * w)
    where = torch.stack([rows.flatten(), cols.flatten()], -1).float().repeat(b, 1)
    same_image = image[:, None] == image[None, :]
    dropped = (same_image & (torch.cdist(where, where) < distance)) | (~same_image if same_image_only else False)
    logits = (q @ q.T / temperature).masked_fill(dropped & ~torch.eye(b * h * w, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(b * h * w))


@pytest.mark.parametrize("distance", [0.0, 1.5, 3.0])
def test_near_cells_of_the_same_image_are_left_out_of_the_negatives(distance):
    embeddings = _random_embeddings(2, 16, (6, 6))
    points, valid = corresponding_points(_identity(2), _identity(2), (6, 6))
    loss = _loss(embeddings, embeddings, points, valid, samples_per_image=36, negative_min_distance=distance).loss
    assert torch.isclose(loss, _masked_reference(embeddings, 0.1, distance), atol=1e-5)


@pytest.mark.parametrize("distance", [0.0, 1.5])
def test_same_image_negatives_leave_out_every_other_image(distance):
    embeddings = _random_embeddings(3, 16, (6, 6))
    points, valid = corresponding_points(_identity(3), _identity(3), (6, 6))
    options = dict(samples_per_image=36, negative_min_distance=distance, same_image_negatives=True)
    loss = _loss(embeddings, embeddings, points, valid, **options).loss
    assert torch.isclose(loss, _masked_reference(embeddings, 0.1, distance, same_image_only=True), atol=1e-5)
    one_by_one = [_loss(e[None], e[None], points[:1], valid[:1], **options).loss for e in embeddings]
    assert torch.isclose(loss, torch.stack(one_by_one).mean(), atol=1e-5)  # images no longer see each other
    assert not torch.isclose(loss, _loss(embeddings, embeddings, points, valid, samples_per_image=36, negative_min_distance=distance).loss)
    with pytest.raises(IdealError, match="queue"):
        _loss(embeddings, embeddings, points, valid, same_image_negatives=True, queue=embeddings[0, :, 0, :2].T)


def test_excluding_every_same_image_negative_leaves_only_other_images():
    embeddings = _random_embeddings(1, 16, (6, 6))
    points, valid = corresponding_points(_identity(1), _identity(1), (6, 6))
    alone = _loss(embeddings, embeddings, points, valid, negative_min_distance=100.0)
    assert alone.loss.item() == pytest.approx(0.0, abs=1e-6)  # the positive is the only candidate left
    assert _loss(embeddings, embeddings, points, valid).loss > 0.01
    queued = _loss(embeddings, embeddings, points, valid, negative_min_distance=100.0, queue=alone.keys).loss
    assert queued > 0.5  # queue rows stay negatives whatever the distance
    with pytest.raises(IdealError, match="negative_min_distance"):
        _loss(embeddings, embeddings, points, valid, negative_min_distance=-1.0)


def test_sampling_respects_validity_and_survives_empty_images():
    embeddings = _random_embeddings(3, 16, (8, 8)).requires_grad_()
    points, valid = corresponding_points(_identity(3), _identity(3), (8, 8))
    valid = valid.clone()
    valid[0] = False  # image 0 has no overlap at all
    valid[1, :, 4:] = False
    result = _loss(embeddings, embeddings, points, valid, samples_per_image=100)
    assert result.keys.shape[0] == 0 + 32 + 64  # all valid cells, at most samples_per_image each
    result.loss.backward()
    assert embeddings.grad[0].abs().sum() == 0 and embeddings.grad[1, :, :, 4:].abs().sum() == 0

    empty = _loss(embeddings, embeddings, points, torch.zeros_like(valid))
    assert empty.loss.item() == 0.0 and empty.keys.shape == (0, 16)
    empty.loss.backward()


def test_global_loss_is_lowest_when_keys_equal_queries():
    queries = F.normalize(torch.randn(6, 16, generator=_generator(1)), dim=1)
    matched = global_info_nce(queries, queries, temperature=0.1)
    noisy = queries + 0.3 * torch.randn(6, 16, generator=_generator(2))
    assert matched < global_info_nce(queries, noisy, temperature=0.1)
    assert matched < global_info_nce(queries, queries.roll(1, 0), temperature=0.1)
    assert matched < global_info_nce(queries, queries, temperature=0.1, queue=queries)


def test_key_queue_is_a_checkpointable_ring():
    queue = KeyQueue(size=5, dim=2)
    assert queue.tensor() is None
    queue.enqueue(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert torch.equal(queue.tensor()[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    queue.enqueue(torch.tensor([[4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]))
    assert len(queue) == 5 and sorted(queue.tensor()[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]

    restored = KeyQueue(size=5, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert all(isinstance(value, torch.Tensor) for value in queue.state_dict().values())
    queue.enqueue(torch.tensor([[7.0, 7.0]]))
    restored.enqueue(torch.tensor([[7.0, 7.0]]))
    assert torch.equal(queue.tensor(), restored.tensor())
    assert sorted(restored.tensor()[:, 0].tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]

    queue.enqueue(torch.arange(16.0).view(8, 2))  # more than it holds: keeps the newest
    assert sorted(queue.tensor()[:, 0].tolist()) == [6.0, 8.0, 10.0, 12.0, 14.0]
    with pytest.raises(IdealError):
        KeyQueue(size=4, dim=2).load_state_dict(queue.state_dict())


def test_pipeline_with_the_package_encoder_and_dense_head():
    from IDEALTrain.model.networks import DenseProjectionHead, NetworkConfig, UNetEncoder

    torch.manual_seed(0)
    config = NetworkConfig(base_channels=4, depth=3, dropout=(0.0, 0.0, 0.0), projection_dim=16)
    encoder, head = UNetEncoder(config), DenseProjectionHead(config.channels[-1], config.projection_dim)
    views = make_views(_smooth_images(2, (32, 32)), ViewConfig(), _generator(0))
    queries = head(encoder(views.view1)[-1])
    with torch.no_grad():
        keys = head(encoder(views.view2)[-1])
    points, valid = corresponding_points(views.theta1, views.theta2, tuple(queries.shape[-2:]))
    result = _loss(queries, keys, points, valid, samples_per_image=16)
    result.loss.backward()
    assert torch.isfinite(result.loss) and head.net[0].weight.grad is not None
    assert result.keys.shape[1] == config.projection_dim


def _multi_positive_reference(embeddings: torch.Tensor, temperature: float, radius: float) -> torch.Tensor:
    """Multi-positive InfoNCE over every cell with identity views, written out: a query's positives
    are the keys of its own image within ``radius`` cells (itself included), every other key a negative."""
    b, d, h, w = embeddings.shape
    q = F.normalize(embeddings.flatten(2).transpose(1, 2).reshape(-1, d), dim=1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.arange(b).repeat_interleave(h * w)
    where = torch.stack([rows.flatten(), cols.flatten()], -1).float().repeat(b, 1)
    positive = (image[:, None] == image[None, :]) & (torch.cdist(where, where) < radius) | torch.eye(b * h * w, dtype=torch.bool)
    logits = q @ q.T / temperature
    return -(torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1) - torch.logsumexp(logits, 1)).mean()


@pytest.mark.parametrize("radius", [1.5, 2.5])
def test_neighbours_within_the_positive_radius_are_positives(radius):
    embeddings = _random_embeddings(2, 16, (6, 6))
    points, valid = corresponding_points(_identity(2), _identity(2), (6, 6))
    loss = _loss(embeddings, embeddings, points, valid, samples_per_image=36, positive_radius=radius).loss
    assert torch.isclose(loss, _multi_positive_reference(embeddings, 0.1, radius), atol=1e-5)
    plain = _loss(embeddings, embeddings, points, valid, samples_per_image=36).loss
    assert not torch.isclose(loss, plain)
    everything = _loss(embeddings, embeddings, points, valid, samples_per_image=36, positive_radius=100.0, same_image_negatives=True)
    assert everything.loss.abs() < 1e-5  # every candidate is a positive: nothing left to contrast
    with pytest.raises(IdealError, match="positive_radius"):
        _loss(embeddings, embeddings, points, valid, positive_radius=-1.0)
