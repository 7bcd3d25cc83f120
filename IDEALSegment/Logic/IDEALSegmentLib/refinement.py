"""Click to fix in Slicer: clicks as markups, refinement in a worker process, the segmentation updated in place.

A :class:`RefinementSession` ties one volume and one segmentation node to a markups point list (the
clicks: saved with the scene, each point's description holds its label and sign) and to a hidden
labelmap node holding the draft as it was before the first click (saved with the scene too). Each
click runs ``idealtrain refine`` with the draft and every click so far in the warm worker process
(:mod:`.worker`: torch, the model and the network's prior for this image stay there, so clicks after
the first cost only the engine); :meth:`RefinementSession.poll`, called from a GUI timer on the main
thread, writes the result into the segments that changed. *Undo last click* removes the last point
and restores the labels from before it. Nothing here imports qt or torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from IDEALTrain.errors import IdealError
from IDEALTrain.inference.clicks import Click, clicks_document, parse_clicks, voxel_of
from IDEALTrain.io.image import Image
from IDEALTrain.io.volume_files import read_label, write_image
from IDEALTrain.labels import CARDIAC_LABELS

from .segmentations import LabelMap, labels_from_segmentation, replace_segments
from .volumes import image_from_volume, node_label, volume_from_image
from .worker import WorkerJob

CLICKS_ATTRIBUTE = "IDEALSegment.RefineClicksFor"  # on the markups node: the segmentation's node ID
DRAFT_ATTRIBUTE = "IDEALSegment.RefineDraftFor"  # on the draft labelmap node: the segmentation's node ID
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: The engines the Refine section offers (``idealtrain refine --engine``), and what the status line calls them.
ENGINE_OPTIONS = (("auto", "Correction network (level set if the model has none)"), ("levelset", "Level set"))
ENGINE_NAMES = {"guided": "correction network", "levelset": "level set"}


def _find_node(scene: object, node_class: str, attribute: str, value: str) -> object | None:
    for index in range(scene.GetNumberOfNodesByClass(node_class)):
        node = scene.GetNthNodeByClass(index, node_class)
        if node.GetAttribute(attribute) == value:
            return node
    return None


class RefinementSession:
    """Clicks on one segmentation of one volume; every method returns at once, :meth:`poll` applies results."""

    def __init__(
        self,
        volume: object,
        segmentation: object,
        model: str | Path,
        device: str = "auto",
        label_map: LabelMap = CARDIAC_LABELS,
        engine: str = "auto",
    ) -> None:
        """``engine``: ``idealtrain refine --engine`` (auto: the model's correction network where it has one)."""
        self.volume, self.segmentation, self.model, self.device = volume, segmentation, str(model), device
        self.engine = engine
        self.label_map = tuple(label_map)
        self.job: WorkerJob | None = None
        self.scene = volume.GetScene()
        if self.scene is None or segmentation.GetScene() is not self.scene:
            raise IdealError("the volume and the segmentation must be in the same scene")
        self.folder = Path(tempfile.mkdtemp(prefix="IDEALSegment-refine-"))
        self.image: Image | None = None
        self.undo_stack: list[np.ndarray] = []  # labels before each click still in the list
        self.last_message = ""
        self.markups = _find_node(self.scene, "vtkMRMLMarkupsFiducialNode", CLICKS_ATTRIBUTE, segmentation.GetID())
        self.draft = _find_node(self.scene, "vtkMRMLLabelMapVolumeNode", DRAFT_ATTRIBUTE, segmentation.GetID())

    # -- clicks ---------------------------------------------------------------------------------
    def _ensure_nodes(self) -> None:
        """The clicks point list and the draft labelmap, created on the first click (saved with the scene)."""
        if self.markups is None:
            self.markups = self.scene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", f"{self.segmentation.GetName()} clicks"
            )
            self.markups.SetAttribute(CLICKS_ATTRIBUTE, self.segmentation.GetID())
            self.markups.CreateDefaultDisplayNodes()
        if self.draft is None:
            labels = labels_from_segmentation(self.segmentation, self.volume, self.label_map, allow_missing=True)
            self.draft = volume_from_image(
                labels, self.scene, f"{self.segmentation.GetName()} draft", labelmap=True, reference=self.volume
            )
            self.draft.SetAttribute(DRAFT_ATTRIBUTE, self.segmentation.GetID())
            self.draft.SetHideFromEditors(True)
            self.draft.AddDefaultStorageNode()  # hidden, so no save dialog offers it: a .mrml + files save needs this

    def clicks(self) -> list[Click]:
        """The clicks of the point list, oldest first (points in world LPS mm)."""
        if self.markups is None:
            return []
        clicks = []
        for index in range(self.markups.GetNumberOfControlPoints()):
            ras = [0.0, 0.0, 0.0]
            self.markups.GetNthControlPointPositionWorld(index, ras)
            try:
                meta = json.loads(self.markups.GetNthControlPointDescription(index))
            except json.JSONDecodeError:
                raise IdealError(f"click {index + 1} of {node_label(self.markups)} has no label: remove it") from None
            point = (RAS_TO_LPS @ np.array(ras)).tolist()
            clicks += parse_clicks(
                {"clicks": [{"point": point, "label": meta.get("label"), "positive": meta.get("positive")}]}
            )
        return clicks

    def _segment_id(self, label: int) -> str:
        for info in self.label_map:
            if info.value == label:
                return info.segment_id
        raise IdealError(f"unknown structure {label}; choose one of {[i.segment_id for i in self.label_map]}")

    def add_click(self, point_ras: tuple[float, float, float], label: int, positive: bool) -> None:
        """Add a click at a world RAS point and ask the worker to refine; :meth:`poll` applies the result."""
        self._check_idle()
        self._segment_id(label)
        self._check_inside(point_ras)  # refused before a point is added
        self._ensure_nodes()
        index = self.markups.AddControlPointWorld(*[float(v) for v in point_ras])
        self.label_placed_point(index, label, positive)

    def label_placed_point(self, index: int, label: int, positive: bool) -> None:
        """Give a point the user placed (markups placement mode) its structure and sign, then refine."""
        self._check_idle()
        self._ensure_nodes()
        try:
            segment_id = self._segment_id(label)
            ras = [0.0, 0.0, 0.0]
            self.markups.GetNthControlPointPositionWorld(index, ras)
            self._check_inside(ras)
        except IdealError:
            self.markups.RemoveNthControlPoint(index)  # a point without a structure, or off the image, is no click
            raise
        self.markups.SetNthControlPointLabel(index, f"{segment_id} {'+' if positive else '-'}")
        self.markups.SetNthControlPointDescription(index, json.dumps({"label": int(label), "positive": bool(positive)}))
        self.undo_stack.append(self.current_labels().array.copy())
        try:
            self._request(self.clicks())
        except IdealError:
            self.markups.RemoveNthControlPoint(index)
            self.undo_stack.pop()
            raise

    def undo_last_click(self) -> None:
        """Remove the last click and restore the labels from before it (refining again after a scene reload)."""
        self._check_idle()
        count = self.markups.GetNumberOfControlPoints() if self.markups is not None else 0
        if count == 0:
            raise IdealError("there is no click to undo")
        self.markups.RemoveNthControlPoint(count - 1)
        if self.undo_stack:
            self._apply(self.image_grid().with_array(self.undo_stack.pop()))
            self.last_message = f"undid click {count}"
        else:  # the clicks came with a saved scene: recompute from the stored draft
            self._request(self.clicks())

    def _check_inside(self, point_ras) -> None:
        """Refuse a point outside the volume: kept in the list, it would fail every later refinement until Undo."""
        voxel_of(self.image_grid(), tuple((RAS_TO_LPS @ np.array([float(v) for v in point_ras])).tolist()))

    # -- worker round trip ----------------------------------------------------------------------
    def _check_idle(self) -> None:
        if self.busy:
            raise IdealError("the previous click is still being refined; wait for it to finish")

    def image_grid(self) -> Image:
        """The volume's voxels and world geometry (read once per session)."""
        if self.image is None:
            self.image = image_from_volume(self.volume, allow_labelmap=False)
            write_image(self.image, self.folder / "image.nrrd")
        return self.image

    def current_labels(self) -> Image:
        """The segmentation's labels on the volume's grid."""
        return labels_from_segmentation(self.segmentation, self.volume, self.label_map, allow_missing=True)

    def _request(self, clicks: list[Click]) -> None:
        self.image_grid()
        write_image(image_from_volume(self.draft), self.folder / "draft.nrrd")
        (self.folder / "clicks.json").write_text(json.dumps(clicks_document(clicks)), encoding="utf-8")
        self.output = self.folder / f"refined-{len(clicks)}.nrrd"
        self.job = WorkerJob(
            [
                "refine",
                "--model",
                self.model,
                "--device",
                self.device,
                "--engine",
                self.engine,
                "--input",
                self.folder / "image.nrrd",
                "--draft",
                self.folder / "draft.nrrd",
                "--clicks",
                self.folder / "clicks.json",
                "--output",
                self.output,
                "--overwrite",
            ]
        )
        self.job.start()

    @property
    def busy(self) -> bool:
        """True while a refinement is in flight."""
        return self.job is not None and not self.job.finished

    def poll(self) -> str | None:
        """Apply a finished refinement to the segmentation; its status line, or None when nothing finished."""
        if self.job is None:
            return None
        events = self.job.poll()
        if not self.job.finished:
            return None
        job, self.job = self.job, None
        if job.returncode != 0:
            self.last_message = f"refinement failed: {job.error}"
            raise IdealError(self.last_message)
        done = next((e for e in events if e.get("event") == "refined"), {})
        self._apply(self.image_grid().with_array(read_label(self.output).array))
        self.last_message = (
            f"refined with {self.markups.GetNumberOfControlPoints()} click(s)"
            f" in {done.get('seconds', float('nan')):.2f} s ({ENGINE_NAMES.get(done.get('engine'), 'unknown engine')})"
        )
        return self.last_message

    def wait(self, timeout: float = 120.0) -> str:
        """Block until the refinement in flight is applied (scripts and tests; a GUI polls instead)."""
        end = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() > end:
                self.job.request_cancel()
                raise IdealError(f"refinement did not finish within {timeout:.0f} s")
            if self.poll() is None:
                time.sleep(0.05)
        return self.last_message

    def _apply(self, labels: Image) -> None:
        write_changed_segments(self.segmentation, self.volume, self.current_labels(), labels, self.label_map)

    def close(self) -> None:
        """Cancel a refinement in flight and delete the session's temporary files (the clicks stay in the scene)."""
        if self.busy:
            self.job.request_cancel()
        shutil.rmtree(self.folder, ignore_errors=True)


def write_changed_segments(segmentation: object, volume: object, old: Image, new: Image, label_map: LabelMap) -> int:
    """Write ``new`` into the segments whose voxels differ from ``old`` (the others are untouched); changed voxels."""
    changed = new.array != old.array
    values = set(np.unique(old.array[changed]).tolist()) | set(np.unique(new.array[changed]).tolist())
    segment_ids = [info.segment_id for info in label_map if info.value in values]
    if segment_ids:
        replace_segments(segmentation, new, volume, segment_ids, label_map)
    return int(changed.sum())


def refine_with_clicks_file(volume: object, segmentation: object, clicks_path: Path, predictor: object) -> str | None:
    """Batch review: refine a segmentation in place with a ``<case>.clicks.json`` file; a summary (None: no file).

    Runs in this process (batch scripts already hold the network); the draft is the segmentation as it is.
    """
    if not Path(clicks_path).is_file():
        return None
    from IDEALTrain.inference.clicks import read_clicks
    from IDEALTrain.inference.refine import Refiner

    clicks = read_clicks(clicks_path)
    label_map = predictor.bundle.labels
    draft = labels_from_segmentation(segmentation, volume, label_map, allow_missing=True)
    result = Refiner(predictor).refine(image_from_volume(volume, allow_labelmap=False), draft, clicks)
    changed = write_changed_segments(segmentation, volume, draft, result.labels, label_map)
    return f"refined with {len(clicks)} click(s) from {Path(clicks_path).name}: {changed} voxel(s) changed"


class RefineController:
    """The *Refine* section's decisions: which session, what is enabled, what a placed point means."""

    def __init__(self, label_map: LabelMap = CARDIAC_LABELS) -> None:
        self.label_map = tuple(label_map)
        self.session: RefinementSession | None = None
        self.placing: tuple[int, bool] | None = None  # (label, positive) of the point being placed
        self.engine = ENGINE_OPTIONS[0][0]  # the engine of the next session (the selector's choice)

    def engines(self) -> tuple[tuple[str, str], ...]:
        """(engine, name) of each choice the engine selector offers, the default first."""
        return ENGINE_OPTIONS

    def choose_engine(self, engine: str) -> None:
        """Refine with ``engine`` from the next click on (a click in flight finishes with the old one)."""
        if engine not in dict(ENGINE_OPTIONS):
            raise IdealError(f"unknown refinement engine {engine!r}; choose from {[key for key, _ in ENGINE_OPTIONS]}")
        self.engine = engine
        if self.session is not None:
            self.session.engine = engine

    def structures(self) -> list[tuple[int, str]]:
        """(label value, name) of each structure the selector offers."""
        return [(info.value, info.name) for info in self.label_map]

    def state(
        self, volume: object | None, segmentation: object | None, model: str | Path | None
    ) -> tuple[bool, bool, str]:
        """(add enabled, undo enabled, tooltip or status line) for the current inputs."""
        if volume is None or segmentation is None or model is None:
            return False, False, "Segment an image first: clicks refine its segmentation"
        session = self.session if self.session is not None and self.session.segmentation is segmentation else None
        busy = session is not None and session.busy
        markups = _find_node(
            segmentation.GetScene(), "vtkMRMLMarkupsFiducialNode", CLICKS_ATTRIBUTE, segmentation.GetID()
        )
        has_clicks = markups is not None and markups.GetNumberOfControlPoints() > 0
        text = (
            "Refining..."
            if busy
            else (
                session.last_message
                if session is not None and session.last_message
                else "Place a point inside (positive) or outside (negative) the structure"
            )
        )
        return not busy, has_clicks and not busy, text

    def _session(self, volume: object, segmentation: object, model: str | Path, device: str) -> RefinementSession:
        current = self.session
        if (
            current is None
            or current.segmentation is not segmentation
            or current.volume is not volume
            or current.model != str(model)
        ):
            if current is not None:
                current.close()
            self.session = RefinementSession(volume, segmentation, model, device, self.label_map, self.engine)
        self.session.device = device
        return self.session

    def start_placing(
        self, volume: object, segmentation: object, model: str | Path, device: str, label: int, positive: bool
    ) -> object:
        """Remember what the next placed point means; the point list to place it on (the GUI enters place mode)."""
        session = self._session(volume, segmentation, model, device)
        session._segment_id(label)
        session._ensure_nodes()
        self.placing = (label, positive)
        return session.markups

    def point_placed(self, index: int) -> None:
        """The user placed point ``index``: give it the chosen structure and sign and refine.

        A point placed on the clicks list some other way (the Markups toolbar) has no structure or sign:
        it is removed, else every later refinement would stop at it.
        """
        if self.session is None:
            return
        if self.placing is None:
            if self.session.markups is not None and 0 <= index < self.session.markups.GetNumberOfControlPoints():
                self.session.markups.RemoveNthControlPoint(index)
                self.session.last_message = "Place clicks with Add positive / Add negative (a point needs a structure and a sign)"
            return
        label, positive = self.placing
        self.placing = None
        self.session.label_placed_point(index, label, positive)

    def undo(self, volume: object, segmentation: object, model: str | Path, device: str) -> None:
        """Undo the last click on this segmentation (its clicks may come from a saved scene)."""
        self._session(volume, segmentation, model, device).undo_last_click()

    def poll(self) -> str | None:
        """Apply a finished refinement (timer tick); its status line, or None."""
        return self.session.poll() if self.session is not None else None

    def close(self) -> None:
        """The scene closes or the panel goes away: cancel and clean up."""
        if self.session is not None:
            self.session.close()
        self.session, self.placing = None, None
