"""Training of the click-conditioned correction network (a ``refinement`` bundle) for one segmentation model.

The network corrects *that* model's drafts, so it learns from that model's own class probabilities:
:func:`prepare_refinement_data` runs the segmentation model once over every labelled training slice and
keeps crops around the heart; :func:`train_refinement` then trains on augmented crops with simulated clicks
(:mod:`.refinement_samples`); :func:`refinement_bundle` wraps the weights as a bundle that
:class:`~IDEALTrain.inference.refine.Refiner` finds in the model folder's ``refinement/``.
``idealtrain train-refiner`` (:mod:`IDEALTrain.cli.refiner`) runs all three.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IdealError
from ..io.image import Image
from ..io.ssl4mis import Ssl4misCase, read_list, read_ssl4mis
from ..model.bundle import Bundle
from ..model.preprocessing import normalise_slices
from ..model.refinement_network import RefinementConfig, RefinementNetwork, widen_for_adjacent_guidance
from .refinement_samples import adjacent_slices, draw_sample

STORED_PX = 128  # slices are kept as crops this wide around the heart ...
CROP_PX = 96  # ... and drawn as random crops this wide
WEIGHT_DECAY = 1e-4
SUMMARY_STEPS = 50  # iterations averaged for the first / last loss of a run's summary

CaseLike = Ssl4misCase | str | Path | tuple[Image, Image]


def _validation_volumes(case: Ssl4misCase | Path) -> set[str]:
    """Volume names of the ``val.list`` in the case's SSL4MIS root folder (empty when there is none)."""
    path = (case.path if isinstance(case, Ssl4misCase) else case).absolute()
    is_slice = case.is_slice if isinstance(case, Ssl4misCase) else path.parent.name == "slices"
    root = path.parents[2 if is_slice else 1]  # ROOT/data/slices/NAME.h5 or ROOT/data/NAME.h5
    return set(read_list(root, "val.list")) if (root / "val.list").is_file() else set()


def refuse_validation_cases(cases: Iterable[CaseLike]) -> None:
    """Refuse any SSL4MIS case (entry or h5 path) of a volume named in its root folder's ``val.list``."""
    for case in cases:
        if isinstance(case, (Ssl4misCase, str, Path)):
            case = case if isinstance(case, Ssl4misCase) else Path(case)
            name = case.name if isinstance(case, Ssl4misCase) else case.stem
            if name.rsplit("_slice", 1)[0] in _validation_volumes(case):
                raise IdealError(
                    f"{name} belongs to a val.list volume: the refinement network must never see validation data"
                )


def _read(case: CaseLike) -> tuple[str, Image, Image | None]:
    """Name, image and label of a case; an SSL4MIS slice of a ``val.list`` volume is refused."""
    if isinstance(case, (Ssl4misCase, str, Path)):
        refuse_validation_cases([case])
        if isinstance(case, Ssl4misCase):
            return (case.name, *read_ssl4mis(case.path))
        return (Path(case).stem, *read_ssl4mis(case))
    image, label = case
    return "", image, label


def _crop(array: np.ndarray, centre: np.ndarray, size: int, fill: np.ndarray | float = 0.0) -> np.ndarray:
    """(..., size, size) crop of (..., H, W) centred on ``centre``; outside the slice ``fill`` (per leading channel)."""
    out = np.empty((*array.shape[:-2], size, size), array.dtype)
    out[...] = np.asarray(fill, array.dtype).reshape(array.shape[:-2] + (1, 1)) if np.ndim(fill) else fill
    top, left = int(centre[0]) - size // 2, int(centre[1]) - size // 2
    rows = slice(max(0, top), min(array.shape[-2], top + size))
    cols = slice(max(0, left), min(array.shape[-1], left + size))
    out[..., rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = array[..., rows, cols]
    return out


def prepare_refinement_data(
    predictor,
    cases: Iterable[CaseLike],
    stored_px: int = STORED_PX,
    progress: Callable[[int, str], None] | None = None,
) -> dict[str, np.ndarray]:
    """The segmentation model's view of every labelled training slice, as ``stored_px`` crops around the heart.

    ``predictor`` is a :class:`~IDEALTrain.inference.predictor.Predictor` of the segmentation model; ``cases``
    are (image, label) pairs, :class:`~IDEALTrain.io.ssl4mis.Ssl4misCase` entries or SSL4MIS h5 paths (slices or
    volumes: every slice is used). Returns ``image`` (N, S, S) float16 normalised as the model does, ``prior``
    (N, C, S, S) float16 class probabilities, ``draft`` and ``label`` (N, S, S) uint8, and where each crop
    came from: ``volume`` (N,) a volume number, ``position`` (N,) the slice's position in it and ``corner``
    (N, 2) the crop's top-left voxel in the slice (adjacent-slice samples align neighbours with it). An SSL4MIS case whose
    volume is named in its root folder's ``val.list`` is refused: validation volumes stay unseen.
    ``progress(n, name)`` is called after each case.
    """
    bundle = predictor.bundle
    classes = bundle.network.num_classes
    background = np.eye(classes, dtype=np.float32)[0]  # the prior outside the slice: certainly background
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("image", "prior", "draft", "label", "volume", "position", "corner")}
    volumes: dict[str, int] = {}
    for n, case in enumerate(cases):
        name, image, label = _read(case)
        name = name or f"case {n}"
        volume, _, number = name.partition("_slice")  # an SSL4MIS slice: <volume>_slice_<position>
        number = number.lstrip("_")
        volume_id = volumes.setdefault(volume, len(volumes))
        if label is None:
            raise IdealError(f"{name} has no label: refinement training needs labelled slices")
        if int(label.array.max()) >= classes:
            raise IdealError(f"{name}: label value {int(label.array.max())} is not one of the model's {classes} classes")
        prediction = predictor.predict(image)
        axis = image.slice_axis
        normalised = normalise_slices(np.moveaxis(image.array, axis, 0), bundle.preprocessing.percentiles)
        probabilities = np.moveaxis(prediction.probabilities, axis + 1, 1)
        drafts = np.moveaxis(prediction.labels.array, axis, 0)
        references = np.moveaxis(label.array, axis, 0)
        for s, reference in enumerate(references):
            heart = np.argwhere(reference > 0)
            centre = heart.mean(axis=0).astype(int) if len(heart) else np.array(reference.shape) // 2
            parts["image"].append(_crop(normalised[s], centre, stored_px).astype(np.float16))
            parts["prior"].append(_crop(probabilities[:, s], centre, stored_px, background).astype(np.float16))
            parts["draft"].append(_crop(drafts[s], centre, stored_px).astype(np.uint8))
            parts["label"].append(_crop(reference, centre, stored_px).astype(np.uint8))
            parts["volume"].append(np.int32(volume_id))
            parts["position"].append(np.int32(int(number) if number.isdigit() else s))
            parts["corner"].append((centre - stored_px // 2).astype(np.int32))
        if progress is not None:
            progress(n + 1, name)
    if not parts["image"]:
        raise IdealError("no training slices: the case list is empty")
    return {key: np.stack(values) for key, values in parts.items()}


def _check_data(data: dict[str, np.ndarray], config: RefinementConfig) -> None:
    missing = sorted({"image", "prior", "draft", "label"} - set(data))
    if missing:
        raise IdealError(f"refinement training data lacks {missing}: make it with prepare_refinement_data")
    if len(data["image"]) == 0:
        raise IdealError("refinement training data holds no slices")
    if data["prior"].shape[1] != config.num_classes or int(data["label"].max()) >= config.num_classes:
        raise IdealError(f"the training data's classes do not fit a {config.num_classes}-class refinement network")


def check_training_budget(iterations: int | None, minutes: float | None, batch: int, lr: float) -> None:
    """Refuse a budget that is not exactly one of ``iterations`` >= 1 or ``minutes`` > 0, a batch < 1 or lr <= 0."""
    if (iterations is None) == (minutes is None):
        raise IdealError("give the training budget as iterations or as minutes (one of them)")
    if iterations is not None and iterations < 1:
        raise IdealError(f"iterations must be at least 1, got {iterations}")
    if minutes is not None and not minutes > 0:
        raise IdealError(f"minutes must be > 0, got {minutes}")
    if batch < 1 or not lr > 0:
        raise IdealError(f"batch must be >= 1 and lr > 0, got {batch} and {lr}")


def train_refinement(
    data: dict[str, np.ndarray],
    config: RefinementConfig,
    *,
    iterations: int | None = None,
    minutes: float | None = None,
    batch: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    start_weights: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
    device: str = "auto",
    crop_px: int = CROP_PX,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the correction network on ``data`` (from :func:`prepare_refinement_data`); (weights, log).

    The budget is ``iterations`` or ``minutes`` (one of them), the learning rate follows a cosine over it;
    AdamW, bf16 autocast, cross-entropy weighted up within the clicks' reach. ``start_weights`` continue a
    trained network (with a fresh optimiser). The same seed and iteration count give the same weights on
    the same machine. ``progress(iteration, loss)`` is called after each iteration. The log holds the loss
    of every iteration and the run's facts (iterations, seconds, slices, batch, lr, seed, parameters).
    """
    from ..inference.predictor import resolve_device

    check_training_budget(iterations, minutes, batch, lr)
    _check_data(data, config)
    stored = min(data["image"].shape[-2:])
    crop = min(crop_px, stored) // config.size_multiple * config.size_multiple
    if crop < config.size_multiple:
        raise IdealError(f"stored slices of {stored} px are too small for a network of depth {config.depth}")
    torch_device = resolve_device(device)
    adjacent = adjacent_slices(data)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = RefinementNetwork(config)
    if start_weights is not None:
        start_weights = widen_for_adjacent_guidance(start_weights, config)  # a 2D network warm-starts a 2.5D one
        try:
            network.load_state_dict(start_weights)
        except RuntimeError as error:
            raise IdealError(f"the start weights do not fit the refinement network: {str(error).splitlines()[0]}") from None
    network.to(torch_device).train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    budget = iterations if iterations is not None else minutes * 60.0
    start, losses = time.perf_counter(), []
    while True:
        elapsed = time.perf_counter() - start
        done = len(losses) if iterations is not None else elapsed
        if done >= budget:
            break
        for group in optimiser.param_groups:  # cosine over the budget
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done / budget)))
        indices = [int(rng.integers(len(data["image"]))) for _ in range(batch)]
        samples = [draw_sample(data, n, adjacent[n], rng, config, crop) for n in indices]
        image, prior, guide, reference, weight = (
            torch.from_numpy(np.stack(parts)).to(torch_device) for parts in zip(*samples)
        )
        with torch.autocast(torch_device.type, dtype=torch.bfloat16):
            logits = network(image, prior, guide)
        loss = (F.cross_entropy(logits.float(), reference, reduction="none") * weight).sum() / weight.sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(len(losses), losses[-1])
    weights = {name: t.detach().cpu().clone() for name, t in network.state_dict().items()}
    log = {
        "iterations": len(losses),
        "seconds": round(time.perf_counter() - start, 1),
        "slices": len(data["image"]),
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "crop_px": crop,
        "parameters": sum(p.numel() for p in network.parameters()),
        "loss": losses,
    }
    return weights, log


def training_summary(log: dict) -> dict:
    """The card-sized part of a :func:`train_refinement` log: its facts and the mean loss of the first and last iterations."""
    summary = {key: value for key, value in log.items() if key != "loss"}
    losses = log.get("loss") or []
    if losses:
        summary["loss_first"] = round(float(np.mean(losses[:SUMMARY_STEPS])), 5)
        summary["loss_last"] = round(float(np.mean(losses[-SUMMARY_STEPS:])), 5)
    return summary


def refinement_bundle(
    weights: dict[str, torch.Tensor],
    segmentation: Bundle,
    training: dict,
    config: RefinementConfig,
    *,
    version: str = "1.0.0",
) -> Bundle:
    """The ``refinement`` bundle of ``weights`` trained for ``segmentation``: its labels, preprocessing and licence.

    ``config`` is the architecture the weights were trained with; ``training`` goes to the card with the
    segmentation model's id and version added. Save it in the segmentation model's folder as
    ``refinement/`` (:data:`~IDEALTrain.model.card.REFINEMENT_FOLDER`) for the Refiner to find.
    """
    if segmentation.kind != "segmentation":
        raise IdealError(f"{segmentation.model_id} is a {segmentation.kind} bundle, not a segmentation model")
    if config.num_classes != segmentation.network.num_classes:
        raise IdealError(
            f"a {config.num_classes}-class refinement network does not fit {segmentation.model_id} "
            f"({segmentation.network.num_classes} classes)"
        )
    name = f"{segmentation.model_id} {segmentation.version}"
    bundle = Bundle(
        network=config,
        preprocessing=segmentation.preprocessing,
        weights=dict(weights),
        labels=segmentation.labels,
        model_id=f"{segmentation.model_id}-refinement",
        version=version,
        description=(
            f"Click-conditioned correction network for {name}: trained on that model's class probabilities "
            "with simulated clicks, it refines the model's drafts from positive and negative clicks "
            "(the guided refinement engine)."
        ),
        training={"segmentation_model": {"id": segmentation.model_id, "version": segmentation.version}}
        | {key: value for key, value in training.items() if key != "segmentation_model"},
        licence=segmentation.licence,
        kind="refinement",
    )
    bundle.check_weights()
    return bundle
