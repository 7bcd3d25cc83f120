"""Click to fix: refine a draft label map with clicks, on exactly the input grid.

A click is a point in patient coordinates (LPS mm), a structure (label value) and a sign: positive
("this is the structure") or negative ("this is not"). The network's class probabilities are the
prior, the draft is the starting point and the clicks edit it locally: only the clicked slices change
(and, with the shipped correction network, the slices next to them, where the network sees the same
error), only within ``radius_mm`` of a click (in 3D; gated propagation aside), except that a negative click in the middle of a blob
deletes the whole blob of its slice (:func:`.refine_engines.deleted_blob`). Every clicked voxel ends as its
click says; when two clicks hit the same voxel the later one wins. Without clicks the draft comes back
unchanged. A negative click never adds voxels of its structure within its reach
(:func:`.refine_engines.keep_negative_clicks_negative`), except within the reach of a positive click for it. Engines: :mod:`.refine_guided` (the click-conditioned network a model folder may hold in
``refinement/``; ``auto`` picks it when there is one, else ``levelset``), :mod:`.refine_engines` and
:mod:`.refine_tta`; ``propagate_slices`` carries clicks of the other engines to neighbouring slices where
those show the same kind of error (:mod:`.refine_propagation`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IdealError
from ..io.image import Image
from ..model.bundle import Bundle, load_bundle
from ..model.card import REFINEMENT_FOLDER, verify_companion
from ..model.preprocessing import normalise_slices
from .clicks import Click, voxel_of
from .predictor import Predictor
from .refine_engines import ENGINES, SliceClick, adopt_changed_decisions, keep_negative_clicks_negative
from .refine_propagation import PROPAGATE_SLICES, adjacent_clicks, propagated_clicks

DEFAULT_ENGINE = "auto"
ENGINE_CHOICES = ("auto", *sorted(ENGINES))
DEFAULT_RADIUS_MM = 20.0
MAX_RADIUS_MM = 500.0  # a click reaches at most half a metre: inf or 1e300 would overflow the reach arithmetic


def check_refinement_inputs(image: Image, draft: Image, clicks: list[Click], labels: tuple[int, ...]) -> list:
    """Voxel (k, j, i) of every click after checking the draft's grid, its values and the click labels."""
    if not draft.same_grid(image):
        raise IdealError(
            f"the draft is on another grid than the image (draft size {draft.size}, spacing {draft.spacing}; "
            f"image size {image.size}, spacing {image.spacing}): refine needs the draft made for this image"
        )
    if not np.issubdtype(draft.array.dtype, np.integer):
        raise IdealError(f"the draft must be an integer label map, got voxel type {draft.array.dtype}")
    values = set(np.unique(draft.array).tolist()) - {0, *labels}
    if values:
        raise IdealError(
            f"the draft holds label value(s) {sorted(values)} the model does not know; known: {list(labels)}"
        )
    for n, click in enumerate(clicks):
        if click.label not in labels:
            raise IdealError(f"click {n}: unknown label {click.label}; this model's labels are {list(labels)}")
    return [voxel_of(image, c.point) for c in clicks]


def distance_from_clicks_mm(image: Image, clicks: list[Click]) -> np.ndarray:
    """Distance (mm) from every voxel to its nearest click: the measure of how local a refinement is."""
    if not clicks:
        return np.full(image.array.shape, np.inf)
    k, j, i = np.meshgrid(*[np.arange(n) for n in image.array.shape], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).astype(np.float64)
    points = (ijk1 @ image.index_to_physical.T)[:, :3]
    nearest = np.full(len(points), np.inf)
    for click in clicks:
        nearest = np.minimum(nearest, np.linalg.norm(points - np.array(click.point), axis=1))
    return nearest.reshape(image.array.shape)


@dataclass
class Refinement:
    """A refined label map (on the input grid) and what it cost."""

    labels: Image
    changed_voxels: int
    seconds: float


class Refiner:
    """Refines drafts of one bundle; the network runs once per image, each click then costs only the engine."""

    def __init__(
        self,
        bundle: Bundle | str | Path | Predictor,
        device: str = "auto",
        engine: str = DEFAULT_ENGINE,
        radius_mm: float = DEFAULT_RADIUS_MM,
        propagate_slices: int = PROPAGATE_SLICES,
        refinement: Bundle | str | Path | None = None,
    ) -> None:
        """A bundle (or a loaded :class:`Predictor`, reused as it is), the engine to refine with, the in-plane
        reach of a click, how many slices either side it may carry over to (0: its own slice only) and, for
        ``guided``, the refinement bundle (default: the model folder's ``refinement/``, when there is one)."""
        if engine not in ENGINE_CHOICES:
            raise IdealError(f"unknown refinement engine {engine!r}; choose from {list(ENGINE_CHOICES)}")
        if not (isinstance(radius_mm, (int, float)) and 0 < radius_mm <= MAX_RADIUS_MM):
            raise IdealError(f"refinement radius must be a number of mm above 0 and at most {MAX_RADIUS_MM:g}, got {radius_mm}")
        if not (isinstance(propagate_slices, int) and propagate_slices >= 0):
            raise IdealError(f"propagate_slices must be a whole number >= 0, got {propagate_slices!r}")
        self.predictor = bundle if isinstance(bundle, Predictor) else Predictor(bundle, device)
        self.labels = tuple(label.value for label in self.predictor.bundle.labels)
        source = self.predictor.source
        if refinement is None and engine in ("auto", "guided") and source is not None and source.is_dir():
            if verify_companion(source) is not None:  # a broken or unsafe refinement/ is an error, never ignored
                refinement = source / REFINEMENT_FOLDER
        if engine == "auto":
            engine = "guided" if refinement is not None else "levelset"
        self.engine = engine
        self._guided = self._guided_engine(refinement) if engine == "guided" else None
        self.radius_mm = float(radius_mm)
        self.propagate_slices = propagate_slices
        self._cached: tuple[str, np.ndarray, np.ndarray] | None = None
        self._decoder_adapter = None  # the tta engine's, made on first use (it copies decoders)

    def _guided_engine(self, refinement: Bundle | str | Path | None):
        """The ``guided`` engine of a refinement bundle made for this model's labels."""
        from .refine_guided import GuidedEngine

        if refinement is None:
            raise IdealError(
                "the guided engine needs a refinement network: this model has no refinement/ folder; "
                "pass one (--refinement) or choose another engine (levelset)"
            )
        bundle = refinement if isinstance(refinement, Bundle) else load_bundle(refinement)
        if bundle.kind != "refinement":
            raise IdealError(f"{bundle.model_id} is a {bundle.kind} bundle, not a refinement network")
        if tuple(label.value for label in bundle.labels) != self.labels:
            raise IdealError(
                f"refinement network {bundle.model_id} was made for labels {[label.value for label in bundle.labels]}, "
                f"this model has {list(self.labels)}"
            )
        return GuidedEngine(bundle)

    def _adapter(self):
        if self._decoder_adapter is None:
            from .refine_tta import DecoderAdapter

            self._decoder_adapter = DecoderAdapter(self.predictor)
        return self._decoder_adapter

    def set_prior(self, image: Image, probabilities: np.ndarray) -> None:
        """Use already computed class probabilities (C, k, j, i) of ``image`` as the prior."""
        if probabilities.shape[1:] != image.array.shape:
            raise IdealError(f"probabilities of shape {probabilities.shape} do not fit the image {image.array.shape}")
        self._cached = (_image_key(image), probabilities.astype(np.float32, copy=False), self._normalised(image))

    def _prior(self, image: Image) -> tuple[np.ndarray, np.ndarray]:
        key = _image_key(image)
        if self._cached is None or self._cached[0] != key:
            self.set_prior(image, self.predictor.predict(image).probabilities)
        return self._cached[1], self._cached[2]

    def _normalised(self, image: Image) -> np.ndarray:
        axis = image.slice_axis
        slices = normalise_slices(np.moveaxis(image.array, axis, 0), self.predictor.bundle.preprocessing.percentiles)
        return np.moveaxis(slices, 0, axis)

    def refine(self, image: Image, draft: Image, clicks: list[Click]) -> Refinement:
        """New labels for ``image`` from ``draft`` and ``clicks`` (all clicks so far, oldest first)."""
        start = time.perf_counter()
        voxels = check_refinement_inputs(image, draft, clicks, self.labels)
        labels = draft.array.astype(np.uint8, copy=True)
        if clicks:
            probabilities, normalised = self._prior(image)
            axis = image.slice_axis
            spacing_kji = np.array(image.spacing[::-1])
            inplane_spacing = tuple(float(s) for n, s in enumerate(spacing_kji) if n != axis)
            by_slice: dict[int, list[SliceClick]] = {}
            for click, voxel in zip(clicks, voxels):
                inplane = tuple(v for n, v in enumerate(voxel) if n != axis)
                by_slice.setdefault(voxel[axis], []).append(SliceClick(inplane, click.label, click.positive))
            if self._guided is not None and self._guided.config.adjacent_guidance:
                gap = float(spacing_kji[axis])  # so that an edit on the next slice stays within radius_mm in 3D
                by_slice = adjacent_clicks(by_slice, draft.array.shape[axis], np.sqrt(max(0.0, self.radius_mm**2 - gap**2)))
            elif self.propagate_slices:
                by_slice = propagated_clicks(
                    by_slice,
                    np.moveaxis(normalised, axis, 0),
                    np.moveaxis(probabilities, axis + 1, 1),
                    np.moveaxis(draft.array, axis, 0),
                    self.propagate_slices,
                    inplane_spacing,
                )
            engine = self._guided or ENGINES[self.engine]
            for s, slice_clicks in by_slice.items():
                index = [slice(None)] * 3
                index[axis] = s
                prior, here = probabilities[(slice(None), *index)], tuple(index)
                if engine is None:  # test-time adaptation of the decoders
                    adapted = self._adapter().slice_probabilities(image, s, slice_clicks)
                    labels[here] = adopt_changed_decisions(
                        prior, adapted, labels[here], slice_clicks, inplane_spacing, self.radius_mm
                    )
                else:
                    labels[here] = engine(
                        normalised[here], prior, labels[here], slice_clicks, inplane_spacing, self.radius_mm
                    )
                labels[here] = keep_negative_clicks_negative(
                    draft.array[here], labels[here], prior, slice_clicks, inplane_spacing, self.radius_mm
                )
        changed = int(np.count_nonzero(labels != draft.array))
        return Refinement(image.with_array(labels), changed, time.perf_counter() - start)


def _image_key(image: Image) -> str:
    """A digest of voxels and geometry: the prior is reused only for the very same image."""
    digest = hashlib.blake2b(np.ascontiguousarray(image.array).tobytes(), digest_size=16)
    digest.update(repr((image.array.dtype.str, image.array.shape, image.spacing, image.origin)).encode())
    digest.update(image.direction.tobytes())
    return digest.hexdigest()
