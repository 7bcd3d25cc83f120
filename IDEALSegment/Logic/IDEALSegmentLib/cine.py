"""Cine (4D) segmentation: every frame of a volume sequence, ED/ES from the LV volume curve, a measurements table.

A cine is a ``vtkMRMLSequenceNode`` whose data nodes are scalar volumes; the user picks its proxy
volume (the browser's current frame) and :func:`cine_of_proxy` finds the browser and the sequence
through the Sequences logic. The result is a new sequence of segmentation nodes with the same
index values, synchronised with the cine in its browser with "save changes" on (so Segment Editor
edits of the proxy segmentation are kept when the frame changes), and a measurements table.

:func:`frame_images` reads the frames (main thread, cheap); the labels come from a child process
(the panel) or from :func:`predict_sequence` (in-process: batch scripts, tests);
:func:`add_frame_labels_to_scene` adds the nodes or, if anything fails, removes what it added.
A cancel or an error leaves the scene as it was.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import slicer

from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.function import CardiacReport, measure_function
from IDEALTrain.evaluation.metrics import label_volume_ml
from IDEALTrain.io.image import Image
from IDEALTrain.labels import CARDIAC_LABELS

from .cancel import Cancelled, CancelToken
from .inference import PREDICTION_SHARE, node_ids, predict_volume, remove_nodes_added_since
from .measurements import measurements_table
from .scene_files import register_sequence_browser_class
from .segmentations import Provenance, segmentation_from_labels
from .volumes import (
    check_scalar_volume,
    image_from_volume,
    node_label,
    unique_node_name,
    volume_from_image,
    volume_grid,
)

if TYPE_CHECKING:  # torch-importing modules, only for annotations
    from IDEALTrain.inference.predictor import Prediction, Predictor
    from IDEALTrain.model.bundle import Bundle

SEQUENCE_CLASS = "vtkMRMLSequenceNode"
BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"
#: What a cancelled cine reports ("segmenting the cine was cancelled; the scene is unchanged").
_WHAT = "segmenting the cine"


@dataclass
class CineResult:
    """What :func:`add_sequence_to_scene` added to the scene, and the numbers it measured."""

    segmentation_sequence: object
    browser: object | None  # None where no sequence browser can be made (no Sequences module)
    frame_labels_ml: list[dict]  # per frame: segment ID -> volume in ml
    ed_index: int | None  # None only with require_ed_es=False when ED/ES cannot be found
    es_index: int | None
    measurements: dict
    table: object | None = None
    note: str = ""  # why there are no ED/ES measurements, when there are none
    report: CardiacReport | None = None  # the whole-heart report (convention, per-slice volumes, QC flags)


def is_cine(node: object) -> bool:
    """True for a sequence node whose data nodes are (non-labelmap) scalar volumes."""
    if node is None or not hasattr(node, "IsA") or not node.IsA(SEQUENCE_CLASS) or node.GetNumberOfDataNodes() == 0:
        return False
    first = node.GetNthDataNode(0)
    return bool(
        first.IsA("vtkMRMLScalarVolumeNode")
        and not first.IsA("vtkMRMLLabelMapVolumeNode")
        and not first.IsA("vtkMRMLTensorVolumeNode")
    )


def sequences_logic_for(scene: object, logic: object | None = None) -> object | None:
    """The Sequences logic to use: ``logic`` (Slicer's module logic) else one bound to ``scene``; None without Sequences."""
    if logic is not None:
        return logic
    if not hasattr(slicer, "vtkSlicerSequencesLogic"):
        return None
    bound = slicer.vtkSlicerSequencesLogic()
    bound.SetMRMLScene(scene)  # registers the browser class and keeps proxies and sequences in step
    return bound


def cine_of_proxy(volume: object, logic: object | None) -> tuple[object, object] | None:
    """(browser, volume sequence) when ``volume`` is a cine's proxy volume, None for a plain volume."""
    if volume is None or logic is None or volume.GetScene() is None:
        return None
    browser = logic.GetFirstBrowserNodeForProxyNode(volume)
    sequence = browser.GetSequenceNode(volume) if browser is not None else None
    return (browser, sequence) if sequence is not None and is_cine(sequence) else None


def sequence_frames(sequence_node: object) -> list[object]:
    """The volume nodes of a cine, in index order (they live in the sequence's own scene: read, never edit)."""
    if sequence_node is None or not hasattr(sequence_node, "IsA") or not sequence_node.IsA(SEQUENCE_CLASS):
        kind = sequence_node.GetClassName() if hasattr(sequence_node, "GetClassName") else type(sequence_node).__name__
        raise IdealError(f"{kind} is not a sequence node: choose a cine (a volume sequence, e.g. a 4D NIfTI or cine DICOM)")
    count = sequence_node.GetNumberOfDataNodes()
    if count == 0:
        raise IdealError(f"sequence {node_label(sequence_node)} has no frames")
    frames = [sequence_node.GetNthDataNode(index) for index in range(count)]
    for index, frame in enumerate(frames):
        try:
            check_scalar_volume(frame, allow_labelmap=False)
        except IdealError as error:
            raise IdealError(f"frame {index} of sequence {node_label(sequence_node)}: {error}") from None
    return frames


def sequence_from_images(
    scene: object, images: Sequence[Image], name: str, index_name: str = "frame", index_unit: str = ""
) -> object:
    """A NEW cine in ``scene``: a sequence of scalar volumes holding ``images`` with their exact geometry.

    For cines read outside MRML (e.g. ``IDEALTrain.io.volume_files.read_frames`` on a 4D file or a cine
    DICOM folder). The index values are the frame numbers 0, 1, ...; the name is made unique. An
    empty list or frames on different voxel grids are refused, and then nothing is added to the scene.
    """
    if scene is None:
        raise IdealError("no scene to add the cine to")
    images = list(images)
    if not images:
        raise IdealError(f"cine {name!r} has no frames: give at least one image")
    for index, image in enumerate(images[1:], start=1):
        if not image.same_grid(images[0]):
            raise IdealError(
                f"frame {index} of cine {name!r} is not on frame 0's voxel grid (size {image.size} vs "
                f"{images[0].size}, or spacing/origin/direction differ): a cine's frames must share one grid"
            )
    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(unique_node_name(scene, name))
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(index_unit)
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    # Each frame is built in a scratch scene and copied into the sequence: the scene sees only the sequence.
    scratch = slicer.vtkMRMLScene()
    try:
        for index, image in enumerate(images):
            sequence.SetDataNodeAtValue(volume_from_image(image, scratch, f"{sequence.GetName()} frame {index}"), str(index))
    finally:
        scratch.Clear(True)
    scene.AddNode(sequence)
    return sequence


def _cine_frames(sequence_node: object) -> list[object]:
    """The frames of a cine that can be segmented: in a scene, with at least two frames (for ED and ES)."""
    frames = sequence_frames(sequence_node)
    if sequence_node.GetScene() is None:
        raise IdealError(f"sequence {node_label(sequence_node)} is not in a scene")
    if len(frames) < 2:
        raise IdealError(
            f"sequence {node_label(sequence_node)} has only one frame: ED and ES need a cine with several "
            "frames (segment a single volume instead)"
        )
    return frames


def frame_images(sequence_node: object) -> list[Image]:
    """Each frame's voxels (a copy) with its world geometry, in index order; main thread, no network."""
    return [image_from_volume(frame, allow_labelmap=False) for frame in _cine_frames(sequence_node)]


def predict_sequence(
    images: Sequence[Image],
    predictor: Predictor,
    progress: Callable[[float], None] | None = None,
    cancel: CancelToken | None = None,
) -> list[Prediction]:
    """Run the predictor on every frame image, in-process (batch scripts, tests); touches no scene.

    ``progress`` gets the done fraction (0..1) over all frames; ``cancel`` is checked between frames
    and between slice batches, raising :class:`~IDEALSegmentLib.cancel.Cancelled`. Only the labels
    are needed per frame, so each prediction keeps its labels, device and time but drops its
    class probabilities and uncertainty (an empty array and None): a long cine's probabilities
    would otherwise take hundreds of MB.
    """
    report = progress or (lambda fraction: None)
    report(0.0)
    predictions = []
    for index, image in enumerate(images):
        if cancel is not None:
            cancel.check(_WHAT)

        def frame_progress(fraction: float, index: int = index) -> None:
            report((index + fraction) / len(images))

        try:
            prediction = predict_volume(image, predictor, frame_progress, cancel)
        except Cancelled:
            if cancel is not None:
                cancel.check(_WHAT)  # the token is set: raise the cine's own message
            raise
        classes = prediction.probabilities.shape[0]
        uncertainty = prediction.uncertainty  # kept in half precision for the QC flags (1.5 MB a frame at 12x256x256)
        if uncertainty is not None:
            uncertainty = uncertainty.with_array(uncertainty.array.astype(np.float16))
        predictions.append(replace(prediction, probabilities=np.empty((classes, 0, 0, 0), np.float32), uncertainty=uncertainty))
    if cancel is not None:
        cancel.check(_WHAT)
    report(1.0)
    return predictions


def add_sequence_to_scene(
    sequence_node: object, predictions: Sequence[Prediction], bundle: Bundle, sequences_logic: object | None = None,
    *, require_ed_es: bool = True,
) -> CineResult:
    """:func:`add_frame_labels_to_scene` for in-process predictions."""
    maps = [p.uncertainty for p in predictions]
    return add_frame_labels_to_scene(
        sequence_node, [p.labels for p in predictions], bundle, sequences_logic, require_ed_es=require_ed_es,
        uncertainty=maps if all(m is not None for m in maps) else None,
    )


def add_frame_labels_to_scene(
    sequence_node: object, labels: Sequence[Image], model: object, sequences_logic: object | None = None,
    *, require_ed_es: bool = True, uncertainty: Sequence[Image] | None = None,
) -> CineResult:
    """A NEW segmentation sequence for the cine's per-frame ``labels``, synchronised with it, and a measurements table.

    ``model`` has ``model_id``, ``version`` and ``labels`` (a Bundle or a ModelEntry). The numbers,
    ED and ES and the QC flags come from IDEALTrain's whole-heart
    :func:`~IDEALTrain.evaluation.function.measure_function` (``uncertainty``, one map per frame,
    adds the uncertainty checks). If anything fails, every node this
    call added is removed (and the cine's own browser no longer synchronises the segmentation) and
    the error is raised: the scene is left as it was. Main thread. With ``require_ed_es`` False, a cine
    whose ED/ES cannot be found (no LV in any frame, the same LV volume in all) still gets its
    segmentation sequence, with no measurements or table and the reason in ``note`` (batch use).
    """
    frames = _cine_frames(sequence_node)
    labels = list(labels)
    if len(labels) != len(frames):
        raise IdealError(
            f"sequence {node_label(sequence_node)} has {len(frames)} frames but {len(labels)} were segmented: "
            "it changed while segmenting; segment it again"
        )
    for index, (frame, frame_labels) in enumerate(zip(frames, labels)):
        if not frame_labels.same_grid(volume_grid(frame)):
            raise IdealError(
                f"frame {index} of sequence {node_label(sequence_node)} is not on the grid it was segmented on: "
                "it changed while segmenting; segment it again"
            )
    volumes_ml = [{label.segment_id: label_volume_ml(frame, label.value) for label in CARDIAC_LABELS} for frame in labels]
    report = None
    try:
        report = measure_function(labels, uncertainty)
        ed, es = int(report.measurements["ed_frame"]), int(report.measurements["es_frame"])
        measurements, note = dict(report.measurements), ""
    except IdealError as error:
        if require_ed_es:
            raise
        ed = es = None
        measurements, note = {}, str(error)

    scene = sequence_node.GetScene()
    logic = sequences_logic_for(scene, sequences_logic)
    provenance = Provenance.now(model.model_id, model.version)
    segmentation_sequence = _segmentation_sequence(sequence_node, frames, labels, model.labels, provenance)
    before = node_ids(scene)
    existing = _cine_browser(sequence_node, logic)
    try:
        scene.AddNode(segmentation_sequence)
        browser = _browse_together(scene, sequence_node, segmentation_sequence, existing, logic)
        table = measurements_table(scene, measurements, f"{sequence_node.GetName()} measurements") if measurements else None
    except BaseException:
        if existing is not None and existing.IsSynchronizedSequenceNodeID(segmentation_sequence.GetID(), False):
            existing.RemoveSynchronizedSequenceNode(segmentation_sequence.GetID())
        remove_nodes_added_since(scene, before)
        raise
    return CineResult(segmentation_sequence, browser, volumes_ml, ed, es, measurements, table, note, report)


def segment_sequence(
    sequence_node: object,
    predictor: Predictor,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: CancelToken | None = None,
    require_ed_es: bool = True,
) -> CineResult:
    """Segment every frame of a cine with ``predictor`` (an IDEALTrain Predictor), all in one call.

    :func:`frame_images`, :func:`predict_sequence` and :func:`add_sequence_to_scene` in turn, on the
    calling thread. ``progress`` gets 0..1; cancelling raises
    :class:`~IDEALSegmentLib.cancel.Cancelled` and leaves the scene unchanged.
    """
    images = frame_images(sequence_node)
    scaled = None if progress is None else (lambda fraction: progress(PREDICTION_SHARE * fraction))
    predictions = predict_sequence(images, predictor, scaled, cancel)
    result = add_sequence_to_scene(sequence_node, predictions, predictor.bundle, require_ed_es=require_ed_es)
    if progress is not None:
        progress(1.0)
    return result


def _segmentation_sequence(sequence_node: object, frames: list[object], labels: list, label_map: Sequence, provenance: Provenance) -> object:
    """A sequence node (not yet in any scene) holding one segmentation per frame, at the cine's index values."""
    scene = sequence_node.GetScene()
    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(unique_node_name(scene, f"{sequence_node.GetName()} segmentation"))
    sequence.SetIndexName(sequence_node.GetIndexName())
    sequence.SetIndexUnit(sequence_node.GetIndexUnit())
    sequence.SetIndexType(sequence_node.GetIndexType())
    sequence.SetNumericIndexValueTolerance(sequence_node.GetNumericIndexValueTolerance())
    for key, value in provenance.items():
        sequence.SetAttribute(key, value)
    # Each segmentation is built in a scratch scene on a copy of its frame's grid, then copied
    # into the sequence: the user's scene sees none of it.
    scratch = slicer.vtkMRMLScene()
    for index, (frame, frame_labels) in enumerate(zip(frames, labels)):
        name = frame.GetName() or f"frame {index}"
        reference = volume_from_image(frame_labels, scratch, name)  # the frame's grid (labels lie on it)
        segmentation = segmentation_from_labels(frame_labels, reference, label_map, provenance, name=f"{name} segmentation")
        sequence.SetDataNodeAtValue(segmentation, sequence_node.GetNthIndexValue(index))
    scratch.Clear(True)
    return sequence


def _cine_browser(volume_sequence: object, logic: object | None) -> object | None:
    """The sequence browser that already shows the cine (as after loading a 4D file), None if there is none."""
    return logic.GetFirstBrowserNodeForSequenceNode(volume_sequence) if logic is not None else None


def _browse_together(
    scene: object, volume_sequence: object, segmentation_sequence: object, existing: object | None, logic: object | None
) -> object | None:
    """Synchronise the segmentation sequence with the cine's ``existing`` browser, or with a new one.

    "Save changes" is switched on for the segmentation sequence: the displayed segmentation is the
    browser's proxy, and without it Segment Editor edits are dropped when the frame changes. None
    without any Sequences support (the sequence alone is the result).
    """
    if logic is None:
        return None
    if existing is not None:
        browser = existing
        browser.AddSynchronizedSequenceNodeID(segmentation_sequence.GetID())
    else:
        register_sequence_browser_class(scene)
        browser = scene.AddNewNodeByClass(BROWSER_CLASS, unique_node_name(scene, f"{volume_sequence.GetName()} browser"))
        browser.SetAndObserveMasterSequenceNodeID(volume_sequence.GetID())
        browser.AddSynchronizedSequenceNodeID(segmentation_sequence.GetID())
        browser.SetSelectedItemNumber(0)
    browser.SetSaveChanges(segmentation_sequence, True)
    logic.UpdateProxyNodesFromSequences(browser)
    _follow_volume_transform(browser, volume_sequence, segmentation_sequence)
    return browser


def _follow_volume_transform(browser: object, volume_sequence: object, segmentation_sequence: object) -> None:
    """Put the segmentation proxy under the cine proxy's parent transform, so they overlay in any frame."""
    volume_proxy = browser.GetProxyNode(volume_sequence)
    segmentation_proxy = browser.GetProxyNode(segmentation_sequence)
    if volume_proxy is not None and segmentation_proxy is not None:
        segmentation_proxy.SetAndObserveTransformNodeID(volume_proxy.GetTransformNodeID())
