"""Cine (4D) segmentation: every frame of a volume sequence, ED/ES from the LV volume curve, a measurements table.

A cine is a ``vtkMRMLSequenceNode`` whose data nodes are scalar volumes. The result is a new
sequence of segmentation nodes with the same index values, synchronised with the cine in a
sequence browser (the cine's own browser when it has one), and a measurements table. Nothing is
added to the scene until every frame has been segmented: a cancel or an error leaves the scene as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import slicer

from IDEALTrain.errors import IdealError
from IDEALTrain.labels import CARDIAC_LABELS
from IDEALTrain.metrics import label_volume_ml

from .cancel import CancelToken
from .measurements import cardiac_measurements, find_ed_es, measurements_table
from .segmentations import Provenance, segmentation_from_labels
from .volumes import check_scalar_volume, image_from_volume, node_label, unique_node_name, volume_from_image

SEQUENCE_CLASS = "vtkMRMLSequenceNode"
BROWSER_CLASS = "vtkMRMLSequenceBrowserNode"
#: Share of the progress bar spent predicting (the rest builds the nodes).
_PREDICTION_SHARE = 0.95


@dataclass
class CineResult:
    """What :func:`segment_sequence` added to the scene, and the numbers it measured."""

    segmentation_sequence: object
    browser: object | None  # None where no sequence browser can be made (no Sequences module)
    frame_labels_ml: list[dict]  # per frame: segment ID -> volume in ml
    ed_index: int
    es_index: int
    measurements: dict
    table: object | None = None


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


def segment_sequence(
    sequence_node: object,
    predictor: object,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: CancelToken | None = None,
) -> CineResult:
    """Segment every frame of a cine with ``predictor`` (an IDEALTrain Predictor) into a new segmentation sequence.

    ED and ES are the frames with the largest and smallest LV blood pool; their measurements go
    into a new table node. ``progress`` gets 0..1; ``cancel`` is checked between frames.
    """
    frames = sequence_frames(sequence_node)
    scene = sequence_node.GetScene()
    if scene is None:
        raise IdealError(f"sequence {node_label(sequence_node)} is not in a scene")
    if len(frames) < 2:
        raise IdealError(
            f"sequence {node_label(sequence_node)} has only one frame: ED and ES need a cine with several "
            "frames (segment a single volume instead)"
        )
    bundle = predictor.bundle
    report = progress or (lambda fraction: None)
    report(0.0)
    labels = []
    for index, frame in enumerate(frames):
        if cancel is not None:
            cancel.check("segmenting the cine")
        image = image_from_volume(frame, allow_labelmap=False)

        def frame_progress(done: int, total: int, index: int = index) -> None:
            report(_PREDICTION_SHARE * (index + done / max(total, 1)) / len(frames))

        labels.append(predictor.predict(image, frame_progress).labels)
    if cancel is not None:
        cancel.check("segmenting the cine")
    volumes_ml = [{label.segment_id: label_volume_ml(frame, label.value) for label in CARDIAC_LABELS} for frame in labels]
    ed, es = find_ed_es([frame["LV"] for frame in volumes_ml])
    measurements = {**cardiac_measurements(labels[ed], labels[es]), "ed_frame": ed, "es_frame": es}

    provenance = Provenance.now(bundle.model_id, bundle.version)
    segmentation_sequence = _segmentation_sequence(sequence_node, frames, labels, provenance)
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    existing = _cine_browser(scene, sequence_node)
    try:
        scene.AddNode(segmentation_sequence)
        browser = _browse_together(scene, sequence_node, segmentation_sequence, existing)
        table = measurements_table(scene, measurements, f"{sequence_node.GetName()} measurements")
    except BaseException:
        if existing is not None and existing.IsSynchronizedSequenceNodeID(segmentation_sequence.GetID(), False):
            existing.RemoveSynchronizedSequenceNode(segmentation_sequence.GetID())
        _remove_added_nodes(scene, before)
        raise
    report(1.0)
    return CineResult(segmentation_sequence, browser, volumes_ml, ed, es, measurements, table)


def _segmentation_sequence(sequence_node: object, frames: list[object], labels: list, provenance: Provenance) -> object:
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
        segmentation = segmentation_from_labels(frame_labels, reference, CARDIAC_LABELS, provenance, name=f"{name} segmentation")
        sequence.SetDataNodeAtValue(segmentation, sequence_node.GetNthIndexValue(index))
    scratch.Clear(True)
    return sequence


def _cine_browser(scene: object, volume_sequence: object) -> object | None:
    """The sequence browser that already shows the cine (as after loading a 4D file), None if there is none."""
    if not scene.IsNodeClassRegistered(BROWSER_CLASS):
        return None
    browsers = [node for node in _nodes_of_class(scene, BROWSER_CLASS) if node.IsSynchronizedSequenceNodeID(volume_sequence.GetID(), True)]
    return browsers[0] if browsers else None


def _browse_together(scene: object, volume_sequence: object, segmentation_sequence: object, existing: object | None) -> object | None:
    """Synchronise the segmentation sequence with the cine's ``existing`` browser, or with a new one.

    Plain slicer-core has no Sequences module logic: the browser class is registered here (as that
    logic does) and the proxy nodes are made by a scene-less Sequences logic, which in Slicer merely
    repeats what the module's own logic does. None without any Sequences support.
    """
    if not hasattr(slicer, "vtkSlicerSequencesLogic"):
        return None  # no Sequences module at all: the sequence alone is the result
    if existing is not None:
        browser = existing
        browser.AddSynchronizedSequenceNodeID(segmentation_sequence.GetID())
    else:
        if not scene.IsNodeClassRegistered(BROWSER_CLASS):
            scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
        browser = scene.AddNewNodeByClass(BROWSER_CLASS, unique_node_name(scene, f"{volume_sequence.GetName()} browser"))
        browser.SetAndObserveMasterSequenceNodeID(volume_sequence.GetID())
        browser.AddSynchronizedSequenceNodeID(segmentation_sequence.GetID())
        browser.SetSelectedItemNumber(0)
    slicer.vtkSlicerSequencesLogic().UpdateProxyNodesFromSequences(browser)
    _follow_volume_transform(browser, volume_sequence, segmentation_sequence)
    return browser


def _follow_volume_transform(browser: object, volume_sequence: object, segmentation_sequence: object) -> None:
    """Put the segmentation proxy under the cine proxy's parent transform, so they overlay in any frame."""
    volume_proxy = browser.GetProxyNode(volume_sequence)
    segmentation_proxy = browser.GetProxyNode(segmentation_sequence)
    if volume_proxy is not None and segmentation_proxy is not None:
        segmentation_proxy.SetAndObserveTransformNodeID(volume_proxy.GetTransformNodeID())


def _nodes_of_class(scene: object, class_name: str) -> list[object]:
    return [scene.GetNthNodeByClass(index, class_name) for index in range(scene.GetNumberOfNodesByClass(class_name))]


def _remove_added_nodes(scene: object, before: set[str]) -> None:
    """Remove every node added to the scene since ``before`` (the IDs that were there)."""
    added = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
    for node in added:
        if node is not None and node.GetID() not in before and scene.IsNodePresent(node):
            scene.RemoveNode(node)
