"""The web app's session: one scene, one open study, and the Slicer panels' own controllers.

Every decision lives in IDEALSegmentLib's controllers (:class:`SegmentPanelController`,
:class:`RefineController`, :class:`TrainerPanelController`); this class only holds what the browser
has open (which study, ED or ES shown, the click mode) and turns the controllers' state into plain
values for trame's state. No trame here, so the tests drive it without a browser or a server.
Every write goes under the output folder (:class:`~.security.OutputFolder`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from IDEALSegmentLib.corrections import dataset_summary, pool_count
from IDEALSegmentLib.measurements import MEASUREMENTS, table_measurements
from IDEALSegmentLib.panel import Parameters, SegmentPanelController, table_rows
from IDEALSegmentLib.refinement import CLICKS_ATTRIBUTE, RefineController
from IDEALSegmentLib.registry import ModelEntry, ModelRegistry, entry_key
from IDEALSegmentLib.segmentations import labels_from_segmentation
from IDEALSegmentLib.trainer_panel import EncoderStart, TrainerPanelController, dataset_overview
from IDEALSegmentLib.trainer_panel import Parameters as TrainerParameters
from IDEALSegmentLib.volumes import node_label
from IDEALSegmentLib.worker import shutdown as shutdown_workers

from IDEALTrain.errors import IdealError
from IDEALTrain.inference.clicks import clicks_document
from IDEALTrain.io.atomic import atomic_path
from IDEALTrain.io.volume_files import write_image
from IDEALTrain.labels import CARDIAC_LABELS

from .security import DataFolder, OutputFolder
from .studies import OpenStudy, expert_figures, list_studies, open_study


@dataclass
class Events:
    """What one :meth:`WebSession.poll` tick changed (the app redraws from it)."""

    segmented: bool = False  # a segmentation finished and its nodes are in the scene
    refined: bool = False  # a click's refinement was applied
    trained: bool = False  # a training run or its comparison ended
    error: str | None = None


class WebSession:
    """The browser's view of one scene; the controllers decide, this class keeps what is open."""

    def __init__(
        self, scene: object, sequences_logic: object, data: DataFolder, output: OutputFolder,
        registry: ModelRegistry | None = None, device: str = "auto", reviewer: str = "web",
    ) -> None:
        self.scene, self.sequences_logic, self.data, self.output = scene, sequences_logic, data, output
        self.registry = registry if registry is not None else ModelRegistry(output.models)
        self.device, self.reviewer = device, reviewer
        self.panel = SegmentPanelController(Parameters(), sequences_logic, self.registry)
        self.panel.refresh_models()
        self.refine = RefineController()
        self.trainer = TrainerPanelController(TrainerParameters(), scene, self.registry)
        self.study: OpenStudy | None = None
        self.showing_es = False
        self.click_structure = 3  # LV blood pool
        self.click_positive = True
        self.last_click_ras: tuple[float, float, float] | None = None
        self.training_line, self.validation_line, self.training_fraction = "", "", 0.0

    # -- models ---------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return [{"value": entry_key(e), "title": e.display_name} for e in self.panel.entries]

    def choose_model(self, key: str) -> ModelEntry | None:
        return self.panel.choose_model(key)

    # -- studies --------------------------------------------------------------------------------
    def studies(self) -> list[dict]:
        return [s.to_state() for s in list_studies(self.data, skip=self.output.root)]

    def open(self, study_id: str) -> OpenStudy:
        """Open a study (refused outside the data folder); the previous one is closed first."""
        if self.panel.job is not None or self.trainer.busy:
            raise IdealError("wait for the running job to finish (or cancel it) before opening another study")
        self.close_study()
        self.study = open_study(self.scene, self.sequences_logic, self.data, study_id)
        p = self.panel.p
        p.inputVolume, p.esVolume = self.study.volume, self.study.es_volume
        p.statusText = f"Opened {self.study.info.title}"
        return self.study

    def close_study(self) -> None:
        """Cancel what runs on the open study and clear the scene's data (views and editor nodes stay)."""
        self.panel.scene_closing()
        self.refine.close()
        if self.study is not None:
            self.scene.Clear(False)
        model_key = self.panel.p.modelKey
        self.panel.p = Parameters(modelKey=model_key)
        self.study, self.showing_es, self.last_click_ras = None, False, None

    # -- what is shown ----------------------------------------------------------------------------
    def shown_volume(self) -> object | None:
        p = self.panel.p
        return p.esVolume if self.showing_es and p.esVolume is not None else p.inputVolume

    def shown_segmentation(self) -> object | None:
        p = self.panel.p
        return p.esSegmentation if self.showing_es and p.esVolume is not None else p.segmentation

    def set_frame(self, frame: int) -> None:
        """Show frame ``frame`` of a cine (its segmentation follows through the browser)."""
        if self.study is None or self.study.browser is None:
            raise IdealError("the open study is not a cine: it has no frames to choose")
        if not 0 <= frame < self.study.frames:
            raise IdealError(f"frame {frame} is outside the cine's {self.study.frames} frames")
        self.study.browser.SetSelectedItemNumber(int(frame))

    # -- segmenting -----------------------------------------------------------------------------
    def segment(self) -> None:
        self.panel.start(self.device, work_root=self.output.scratch)

    def cancel(self) -> None:
        self.panel.cancel()
        self.trainer.cancel()

    def poll(self) -> Events:
        """Timer tick: the segmentation, a click's refinement and training, as the Qt panels' timers do."""
        events = Events()
        if self.panel.polling:
            result = self.panel.poll()
            events.segmented = result.added is not None
            events.error = result.error
        try:
            events.refined = self.refine.poll() is not None
        except IdealError as error:
            events.error = str(error)
        if self.trainer.busy:
            tick = self.trainer.poll()
            self.training_fraction = tick.fraction
            self.training_line = tick.line or self.training_line
            self.validation_line = tick.validation or self.validation_line
            if tick.finished:
                events.trained = True
                events.error = events.error or tick.error
        return events

    @property
    def busy(self) -> bool:
        return self.panel.job is not None or self.trainer.busy or (self.refine.session is not None and self.refine.session.busy)

    # -- measurements -----------------------------------------------------------------------------
    def table(self) -> list[dict]:
        """The measurements table's rows as the panel shows them, each with its exact value."""
        table = self.panel.p.measurementsTable
        if table is None:
            return []
        names, rows = table_rows(table)
        exact = table_measurements(table)
        keys = {MEASUREMENTS[key][0]: key for key in MEASUREMENTS}
        result = []
        for cells in rows:
            row = dict(zip(names, cells))
            key = keys.get(row.get("Measurement", ""), "")
            value = exact.get(key)
            row["key"] = key
            row["exact"] = "" if value is None else repr(float(value))
            # A row the measurements table knows is shown to one decimal; any other row (e.g. a QC flag) as the table has it.
            decimals = 0 if key.endswith("_frame") else 1
            row["shown"] = f"{value:.{decimals}f}" if value is not None and not math.isnan(value) else ("" if key else row.get("Value", ""))
            result.append(row)
        return result

    def expert(self) -> str:
        figures = expert_figures(self.panel.p.inputVolume)
        if not figures:
            return ""
        return "Expert (Sunnybrook contours): " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if isinstance(v, (int, float)))

    def recompute(self) -> dict:
        return self.panel.recompute_measurements()

    def voxel_counts(self) -> dict[str, int]:
        """Voxels per structure of the shown segmentation, read back from MRML (what the Python side holds)."""
        segmentation, volume = self.shown_segmentation(), self.shown_volume()
        if segmentation is None or volume is None:
            return {}
        labels = labels_from_segmentation(segmentation, volume, CARDIAC_LABELS, allow_missing=True).array
        return {info.segment_id: int((labels == info.value).sum()) for info in CARDIAC_LABELS}

    # -- review ---------------------------------------------------------------------------------
    def next_review_slice(self) -> tuple[int, tuple[float, float, float], str]:
        self.showing_es = False
        return self.panel.next_review_slice()

    def mark_reviewed(self, structures: list[str] | None = None) -> Path:
        """Add the shown image and segmentation as one reviewed case; ``structures``: the segment IDs ticked as
        reviewed (None or empty: the ones edited since the model drew them)."""
        end_systole = self.showing_es and self.panel.p.esSegmentation is not None
        return self.panel.mark_reviewed(self.output.corrections, self.reviewer, end_systole=end_systole, structures=list(structures) if structures else None)

    def add_to_pool(self) -> int:
        return self.panel.add_to_pool(self.output.corrections)

    # -- click to fix ---------------------------------------------------------------------------
    def click(self, point_ras: tuple[float, float, float]) -> None:
        """A click on the shown slice: a point of the chosen structure and sign, refined in the warm worker."""
        volume, segmentation = self.shown_volume(), self.shown_segmentation()
        if volume is None or segmentation is None:
            raise IdealError("segment the image first: clicks refine its segmentation")
        markups = self.refine.start_placing(
            volume, segmentation, self.panel.chosen_model().path, self.device, self.click_structure, self.click_positive
        )
        index = markups.AddControlPointWorld(*[float(v) for v in point_ras])
        self.last_click_ras = tuple(float(v) for v in point_ras)
        self.refine.point_placed(index)

    def undo_click(self) -> None:
        volume, segmentation = self.shown_volume(), self.shown_segmentation()
        if volume is None or segmentation is None:
            raise IdealError("there is no click to undo")
        self.refine.undo(volume, segmentation, self.panel.chosen_model().path, self.device)

    def refine_state(self) -> tuple[bool, bool, str]:
        model = self.panel.chosen_model().path if self.panel.p.modelKey and self.panel.entries else None
        return self.refine.state(self.shown_volume(), self.shown_segmentation(), model)

    # -- saving ---------------------------------------------------------------------------------
    def save(self) -> list[Path]:
        """Write the shown segmentation (.seg.nrrd), its clicks and the measurements into the study's output folder.

        Files are numbered, never replaced: an earlier save stays as it was.
        """
        if self.study is None or self.shown_segmentation() is None:
            raise IdealError("nothing to save: segment the image first")
        folder = self.output.folder("studies", self.study.output_name)
        volume, segmentation = self.shown_volume(), self.shown_segmentation()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", node_label(volume).strip("'")) or "image"
        number = 1 + max([int(m.group(1)) for f in folder.iterdir() if (m := re.match(rf"{re.escape(stem)}-(\d+)\.", f.name))] or [0])
        base = f"{stem}-{number:03d}"
        labels = labels_from_segmentation(segmentation, volume, CARDIAC_LABELS, allow_missing=True)
        written = [write_image(labels, folder / f"{base}.seg.nrrd", labels=CARDIAC_LABELS)]
        clicks = self._clicks_of(segmentation)
        if clicks:
            written.append(_write_json(folder / f"{base}.clicks.json", clicks_document(clicks)))
        if self.panel.p.measurementsTable is not None:
            rows = self.table()
            document = {
                "study": self.study.info.title,
                "model": self.panel.p.modelKey,
                "measurements": {row["key"]: (float(row["exact"]) if row["exact"] else None) for row in rows if row["key"]},
            }
            written.append(_write_json(folder / f"{base}.measurements.json", document))
        self.panel.p.statusText = f"Saved {', '.join(p.name for p in written)} in {folder}"
        return written

    def _clicks_of(self, segmentation: object) -> list:
        session = self.refine.session
        if session is not None and session.segmentation is segmentation:
            return session.clicks()
        return []

    # -- retraining -----------------------------------------------------------------------------
    def dataset(self) -> tuple[str | None, list[list[str]]]:
        return dataset_overview(self.output.corrections, self.trainer.p.iterations)

    def corrections_summary(self) -> dict:
        return dataset_summary(self.output.corrections) if (self.output.corrections / "manifest.json").is_file() else {}

    def pool_size(self) -> int:
        return pool_count(self.output.corrections)

    def train(self, encoder: str, iterations: int, label_budget: int = 0) -> None:
        p = self.trainer.p
        p.encoderStart = EncoderStart(encoder)
        p.iterations, p.labelBudget = int(iterations), int(label_budget)
        old = self.panel.chosen_model() if self.panel.p.modelKey else None
        self.training_line, self.validation_line, self.training_fraction = "", "", 0.0
        self.trainer.start(self.output.corrections, self.output.training, old, self.device)

    def comparison(self) -> list[dict]:
        table = self.trainer.p.comparisonTable
        if table is None:
            return []
        names, rows = table_rows(table)
        return [dict(zip(names, cells)) for cells in rows]

    def use_new_model(self) -> ModelEntry:
        """Register the trained bundle as a new version and make it the model Segment uses."""
        entry = self.trainer.register()
        self.panel.refresh_models()
        self.panel.choose_model(entry_key(entry))
        return entry

    # -- shutting down ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel every job (segmentation, refinement, training) and stop the warm workers."""
        self.panel.scene_closing()  # a cancelled job stops its (busy) worker
        self.refine.close()
        self.trainer.cancel()
        shutdown_workers()


def _write_json(path: Path, document: object) -> Path:
    with atomic_path(path) as temp:
        Path(temp).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def clicks_node(scene: object, segmentation: object) -> object | None:
    """The markups node holding the clicks on ``segmentation`` (None before the first click)."""
    for node in scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode"):
        if node.GetAttribute(CLICKS_ATTRIBUTE) == segmentation.GetID():
            return node
    return None


