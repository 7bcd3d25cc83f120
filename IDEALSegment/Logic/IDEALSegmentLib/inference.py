"""Segmenting a volume node with a model bundle, and adding label images to the scene as segmentations.

:func:`add_labels_to_scene` turns label (and uncertainty) images into nodes on the source volume's
grid and either adds every result node or, when anything fails, removes whatever it added; the
Slicer panel calls it with the files a child process wrote (:mod:`.segment_job`). The in-process
path (:func:`segment_volume`, used by batch scripts and tests) loads the network here: torch is
imported only then, so importing this module in Slicer's process stays torch-free.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.metrics import label_volume_ml
from IDEALTrain.io.image import Image

from .cancel import CancelToken
from .registry import ModelEntry
from .review import mark_model_output
from .segmentations import Provenance, segmentation_from_labels
from .uncertainty import SliceReview, review_order, uncertainty_volume
from .volumes import check_scalar_volume, image_from_volume, node_label

if TYPE_CHECKING:  # torch-importing modules, only for annotations
    from IDEALTrain.inference.predictor import Prediction, Predictor
    from IDEALTrain.model.bundle import Bundle

ProgressCallback = Callable[[float], None]
#: Share of segment_volume's progress spent predicting; the rest is building the nodes.
PREDICTION_SHARE = 0.95

_cache: dict[tuple[str, str, str], Predictor] = {}


@dataclass
class SegmentationResult:
    """What one segmentation run added to the scene, and how it went."""

    segmentation: object
    uncertainty: object | None
    review: list[SliceReview]
    model_id: str
    model_version: str
    device: str
    seconds: float
    volumes_ml: dict[str, float] = field(default_factory=dict)  # segment name -> ml

    def summary(self) -> str:
        """One line for the status bar: model, device, time, volumes, slices to review."""
        text = f"{self.segmentation.GetName()}: {self.model_id} {self.model_version} on {self.device} in {self.seconds:.1f} s"
        if self.volumes_ml:
            text += "; " + ", ".join(f"{name} {ml:.1f} ml" for name, ml in self.volumes_ml.items())
        flagged = [r for r in self.review if r.uncertain_voxels > 0]
        if flagged:
            text += f"; {len(flagged)} slice(s) to review, first slice {flagged[0].slice_index}"
        elif self.uncertainty is not None:
            text += "; the decoders agree on every slice"
        return text


def _bundle_path(model: ModelEntry | str | Path) -> Path:
    path = model.path if isinstance(model, ModelEntry) else Path(model)
    if not path.exists():
        raise IdealError(f"{path}: no such model bundle")
    return path.resolve()


def load_predictor(model: ModelEntry | str | Path, device: str = "auto") -> Predictor:
    """A :class:`Predictor` for the bundle, kept per path and device while its verified checksum is unchanged
    (a bundle replaced or damaged in place is reloaded or refused, never used from memory)."""
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.model.card import bundle_fingerprint

    path = _bundle_path(model)
    key = (str(path), bundle_fingerprint(path, companion=False), device)
    predictor = _cache.get(key)
    if predictor is None:
        predictor = Predictor(path, device=device)
        for old in [k for k in _cache if k[0] == key[0] and k[2] == device]:
            del _cache[old]  # an older copy of the same bundle
        _cache[key] = predictor
    return predictor


def predict_volume(
    image: Image,
    predictor: Predictor,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Prediction:
    """Run the predictor on ``image`` (in-process; touches no scene).

    ``progress`` gets the done fraction (0..1) after each slice batch; ``cancel`` is checked before,
    between batches and after the last one, raising :class:`~IDEALSegmentLib.cancel.Cancelled`.
    On a CPU the one or two slices already running finish first; the rest are dropped.
    """
    what = "segmentation"
    if min(image.array.shape) < 2:
        raise IdealError(
            f"the volume is a single 2D image ({' x '.join(map(str, image.array.shape[::-1]))} voxels); "
            "IDEALSegment needs a 3D short-axis stack of several slices"
        )
    if cancel is not None:
        cancel.check(what)

    def on_slices(done: int, total: int) -> None:
        if cancel is not None:
            cancel.check(what)
        if progress is not None:
            progress(done / total if total else 1.0)

    prediction = predictor.predict(image, on_slices)
    if cancel is not None:
        cancel.check(what)
    return prediction


def node_ids(scene: object) -> set[str]:
    """IDs of every node in the scene (to undo additions with :func:`remove_nodes_added_since`)."""
    return {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}


def remove_nodes_added_since(scene: object, before: set[str]) -> None:
    """Remove every node whose ID was not in ``before`` (newest first): the scene is as it was."""
    for node_id in sorted(node_ids(scene) - before, key=_id_order, reverse=True):
        node = scene.GetNodeByID(node_id)
        if node is not None:
            scene.RemoveNode(node)


def _id_order(node_id: str) -> tuple[int, str]:
    """Creation order of MRML IDs (``vtkMRMLScalarVolumeNode12`` -> 12)."""
    digits = len(node_id) - len(node_id.rstrip("0123456789"))
    return (int(node_id[-digits:]) if digits else 0, node_id)


def add_prediction_to_scene(
    volume: object,
    prediction: Prediction,
    bundle: Bundle,
    *,
    with_uncertainty: bool = True,
    name: str | None = None,
) -> SegmentationResult:
    """A NEW segmentation node (and uncertainty volume) for an in-process ``prediction``; see :func:`add_labels_to_scene`."""
    return add_labels_to_scene(
        volume, prediction.labels, prediction.uncertainty, bundle, prediction.device, prediction.seconds,
        with_uncertainty=with_uncertainty, name=name,
    )


def add_labels_to_scene(
    volume: object,
    labels: Image,
    uncertainty: Image | None,
    model: object,
    device: str,
    seconds: float,
    *,
    with_uncertainty: bool = True,
    name: str | None = None,
) -> SegmentationResult:
    """A NEW segmentation node (and uncertainty volume) for ``labels`` on ``volume``'s grid; main thread.

    ``model`` is anything with ``model_id``, ``version`` and ``labels`` (a Bundle or a ModelEntry);
    the nodes record its id and version. If anything fails, every node this call added is removed
    again and the error is raised: the scene is left as it was.
    """
    check_scalar_volume(volume)
    scene = volume.GetScene()
    if scene is None:
        raise IdealError(f"volume {node_label(volume)} is not in a scene")
    provenance = Provenance.now(model.model_id, model.version)
    before = node_ids(scene)
    try:
        segmentation = segmentation_from_labels(labels, volume, model.labels, provenance, name)
        mark_model_output(segmentation, labels)  # so Mark reviewed knows which structures the clinician edits
        uncertainty_node, review = None, []
        if with_uncertainty and uncertainty is not None:
            uncertainty_node = uncertainty_volume(volume, uncertainty, f"{segmentation.GetName()} uncertainty")
            for key, value in provenance.items():
                uncertainty_node.SetAttribute(key, value)
            review = review_order(uncertainty, labels)
    except BaseException:
        remove_nodes_added_since(scene, before)
        raise
    return SegmentationResult(
        segmentation=segmentation,
        uncertainty=uncertainty_node,
        review=review,
        model_id=model.model_id,
        model_version=model.version,
        device=device,
        seconds=seconds,
        volumes_ml={label.name: label_volume_ml(labels, label.value) for label in model.labels},
    )


def segment_volume(
    volume: object,
    model: ModelEntry | str | Path | Predictor,
    *,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    with_uncertainty: bool = True,
    name: str | None = None,
) -> SegmentationResult:
    """Segment a volume node with a model (entry, bundle path or loaded predictor), all in one call.

    Cancelling raises :class:`~IDEALSegmentLib.cancel.Cancelled` and leaves the scene unchanged.
    """
    check_scalar_volume(volume, allow_labelmap=False)
    image = image_from_volume(volume)
    predictor = model if hasattr(model, "predict") else load_predictor(model, device)
    scaled = None if progress is None else (lambda fraction: progress(PREDICTION_SHARE * fraction))
    prediction = predict_volume(image, predictor, scaled, cancel)
    result = add_prediction_to_scene(volume, prediction, predictor.bundle, with_uncertainty=with_uncertainty, name=name)
    if progress is not None:
        progress(1.0)
    return result
