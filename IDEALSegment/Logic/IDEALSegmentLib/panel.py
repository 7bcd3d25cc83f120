"""Every decision of the IDEALSegment panel, without Qt: what is enabled, what a click starts, what a
finished job changes in the scene, and what a failure shows.

The widget binds Qt signals to these calls and copies :class:`PanelState` onto its widgets. The
controller reads and writes the module's parameters through any object with the parameter node's
attribute names (Slicer's ``@parameterNodeWrapper`` in Slicer, :class:`Parameters` in tests).
Model work runs in child processes (:mod:`.segment_job`); every call here returns at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.io.reviewed import describe_reviewed

from .corrections import SUFFIX, add_to_pool, corrected_case, export_correction, pool_count, reviewed_of, safe_case_id
from .measurements import cine_report, flags_text, report_from_segmentations, update_measurements_table
from .registry import ModelEntry, ModelRegistry, entry_key, select_entry
from .review import patient_of_volume
from .segment_job import CINE, SegmentationJob, read_inputs
from .uncertainty import slice_center_ras
from .volumes import node_label
from .worker import prestart


@dataclass
class Parameters:
    """The IDEALSegment parameter node's fields, as a plain object (tests, scripts)."""

    inputVolume: object = None
    esVolume: object = None
    modelKey: str = ""
    withUncertainty: bool = True
    showUncertainty: bool = False
    segmentation: object = None
    esSegmentation: object = None
    uncertaintyVolume: object = None
    measurementsTable: object = None
    reviewSlices: list = field(default_factory=list)
    reviewPosition: int = 0
    statusText: str = ""


@dataclass
class PanelState:
    """What the panel shows enabled or visible, and the Segment button's tooltip."""

    segment: bool
    segment_tip: str
    busy: bool
    fraction: float
    review: bool  # open Segment Editor, mark reviewed
    uncertainty: bool
    next_review_slice: bool
    measurements: bool  # copy, save
    recompute: bool
    quality: str = ""  # the QC flags of the measurements, shown beside the table


@dataclass
class PollResult:
    """What one timer tick changed: progress, and once the job has ended the status and any error to show."""

    fraction: float
    finished: bool = False
    error: str | None = None  # shown in an error dialog
    added: object | None = None  # the SegmentOutcome, when nodes were added


class SegmentPanelController:
    """The IDEALSegment panel's behaviour on one scene; ``sequences_logic`` is Slicer's Sequences module logic."""

    def __init__(self, parameters: object, sequences_logic: object | None, registry: ModelRegistry | None = None) -> None:
        self.p = parameters
        self.sequences_logic = sequences_logic
        self.registry = registry if registry is not None else ModelRegistry()
        self.job: SegmentationJob | None = None
        self.entries: list[ModelEntry] = []
        self.problems: list[str] = []
        self._closing: list[SegmentationJob] = []  # cancelled when the scene closed; polled until they end
        self.report = None  # the latest measurement's whole-heart report (IDEALTrain CardiacReport): QC flags

    def warm_up(self) -> None:
        """Start a worker process in the background (torch is imported there), so Segment only hands files over."""
        prestart()

    # -- models ---------------------------------------------------------------------------------
    def refresh_models(self, remembered_key: str = "") -> ModelEntry | None:
        """Re-read the installed models (no torch); the chosen one (parameter, else ``remembered_key``, else the default)."""
        self.entries = self.registry.entries()
        self.problems = list(self.registry.problems)
        return self.choose_model((self.p.modelKey if self.p is not None else "") or remembered_key)

    def choose_model(self, key: str) -> ModelEntry | None:
        """Select the model ``<id>@<version>`` (the default when it is not installed); stored in the parameters."""
        entry = select_entry(self.entries, key)
        if self.p is not None:
            self.p.modelKey = entry_key(entry) if entry is not None else ""
        return entry

    def chosen_model(self) -> ModelEntry:
        entry = next((e for e in self.entries if entry_key(e) == self.p.modelKey), None)
        if entry is None:
            raise IdealError(f"no model selected: put a model bundle into {self.registry.user_dir} (Settings) and click Refresh")
        return entry

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> PanelState:
        p, busy = self.p, self.job is not None
        has_input = p.inputVolume is not None
        return PanelState(
            segment=has_input and not busy and bool(self.entries),
            segment_tip=(
                "Segment the selected image (a cine frame segments the whole cine)" if has_input and self.entries
                else "Select an image (a volume, or a frame of a cine) first" if not has_input
                else "No model is installed: see Settings"
            ),
            busy=busy,
            fraction=self.job.fraction if busy else 0.0,
            review=p.segmentation is not None and not busy,
            uncertainty=p.uncertaintyVolume is not None and not busy,
            next_review_slice=(p.uncertaintyVolume is not None or self._flagged()) and len(p.reviewSlices) > 0 and not busy,
            measurements=p.measurementsTable is not None,
            recompute=p.measurementsTable is not None and p.segmentation is not None and not busy,
            quality=flags_text(self.report) if p.measurementsTable is not None else "",
        )

    def _flagged(self) -> bool:
        return self.report is not None and bool(self.report.flagged_slices())

    # -- segmenting -------------------------------------------------------------------------------
    def start(self, device: str = "auto", work_root: Path | None = None) -> None:
        """Segment Click: read the inputs, write them to files and start the child process."""
        if self.job is not None:
            raise IdealError("a segmentation is already running")
        inputs = read_inputs(self.p.inputVolume, self.p.esVolume, self.sequences_logic)
        job = SegmentationJob(inputs, self.chosen_model(), device, bool(self.p.withUncertainty), self.sequences_logic)
        job.start(work_root)
        self.job = job
        what = f"the cine {node_label(inputs.sequence)}" if inputs.kind == CINE else node_label(inputs.volume)
        self.p.statusText = f"Segmenting {what} with {job.entry.display_name}..."

    def cancel(self) -> None:
        """Cancel Click: stop the child process; the scene is not touched."""
        if self.job is not None:
            self.job.cancel()
            self.p.statusText = "Cancelling..."

    def scene_closing(self) -> None:
        """The scene is about to close: cancel the job and forget it (nothing will be added)."""
        self.report = None
        if self.job is not None:
            self.job.cancel()
            self._closing.append(self.job)
            self.job = None

    @property
    def polling(self) -> bool:
        """Whether the widget's timer must keep calling :meth:`poll`."""
        return self.job is not None or bool(self._closing)

    def poll(self) -> PollResult:
        """Timer tick: progress; once the job ends, its results in the scene (or why not)."""
        self._closing = [job for job in self._closing if job.poll() == "running"]
        job = self.job
        if job is None:
            return PollResult(0.0)
        state = job.poll()
        if state == "running":
            return PollResult(job.fraction)
        self.job = None
        if state == "cancelled":
            self.p.statusText = "Cancelled; the scene is unchanged."
            return PollResult(0.0, finished=True)
        if state == "failed":
            self.p.statusText = f"Failed: {job.error}"
            return PollResult(0.0, finished=True, error=f"Segmentation failed: {job.error}")
        try:
            outcome = job.add_results()
        except IdealError as error:
            self.p.statusText = f"Failed: {error}"
            return PollResult(1.0, finished=True, error=str(error))
        self._show_outcome(outcome, job.entry)
        return PollResult(1.0, finished=True, added=outcome)

    def _show_outcome(self, outcome: object, entry: ModelEntry) -> None:
        """What a finished segmentation changes in the parameters (the new nodes are already in the scene)."""
        p = self.p
        if outcome.cine is not None:
            browser = outcome.cine.browser
            p.segmentation = browser.GetProxyNode(outcome.cine.segmentation_sequence) if browser is not None else None
            p.esSegmentation, p.uncertaintyVolume, p.reviewSlices = None, None, []
        else:
            first = outcome.results[0]
            p.segmentation = first.segmentation
            p.esSegmentation = outcome.results[1].segmentation if len(outcome.results) > 1 else None
            p.uncertaintyVolume = first.uncertainty
            flagged = [r.slice_index for r in first.review if r.uncertain_voxels > 0]
            p.reviewSlices = flagged or [r.slice_index for r in first.review if r.heart_voxels > 0]
        p.reviewPosition = 0
        if outcome.table is not None:
            p.measurementsTable = outcome.table
        self._show_report(getattr(outcome, "report", None))
        p.statusText = outcome.summary(entry)

    def _show_report(self, report: object) -> None:
        """Keep a measurement's QC flags for the panel; their slices go first in the slices to review."""
        self.report = report
        if report is None:
            return
        flagged = report.flagged_slices()
        self.p.reviewSlices = flagged + [k for k in self.p.reviewSlices if k not in flagged]
        self.p.reviewPosition = 0

    # -- reviewing --------------------------------------------------------------------------------
    def next_review_slice(self) -> tuple[int, tuple[float, float, float], str]:
        """(slice index, its centre in RAS, a label) of the next slice to review; advances the position."""
        slices = list(self.p.reviewSlices)
        if not slices or self.p.inputVolume is None:
            raise IdealError("no slices to review: segment with the uncertainty map first")
        position = self.p.reviewPosition % len(slices)
        index = slices[position]
        self.p.reviewPosition = (position + 1) % len(slices)
        return index, slice_center_ras(self.p.inputVolume, index), f"Slice {index}: {position + 1} of {len(slices)} to review"

    def review_pair(self, end_systole: bool = False) -> tuple[object, object, str]:
        """(image, segmentation, case id) that "Mark reviewed" exports; refuses a segmentation of another image.

        A cine frame's case id is ``<cine>_frameNN`` (the proxy's name is the same for every frame),
        so marking its ED and its ES frame makes two cases.
        """
        p = self.p
        volume, segmentation = (p.esVolume, p.esSegmentation) if end_systole else (p.inputVolume, p.segmentation)
        if volume is None or segmentation is None:
            raise IdealError(f"no {'end-systolic ' if end_systole else ''}image and segmentation to mark as reviewed")
        cine = read_inputs(volume, None, self.sequences_logic) if not end_systole else None
        if cine is not None and cine.kind == CINE:
            browser = cine.browser
            if self.sequences_logic.GetFirstBrowserNodeForProxyNode(segmentation) is not browser:
                raise IdealError(
                    f"segmentation {node_label(segmentation)} is not the segmentation of the cine {node_label(cine.sequence)}: "
                    "choose the segmentation shown with it"
                )
            frame = browser.GetSelectedItemNumber()
            return volume, segmentation, safe_case_id(f"{cine.sequence.GetName()}_frame{frame:02d}")
        reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        if reference is not None and reference is not volume:
            raise IdealError(
                f"segmentation {node_label(segmentation)} was made on {node_label(reference)}, not on {node_label(volume)}: "
                "choose that image's segmentation"
            )
        return volume, segmentation, safe_case_id(volume.GetName())

    def existing_case(self, folder: Path, end_systole: bool = False) -> Path | None:
        """The label file marking this case reviewed would replace (the widget asks first), else None."""
        _, _, case_id = self.review_pair(end_systole)
        path = Path(folder) / "labels" / f"{case_id}{SUFFIX}"
        return path if path.exists() else None

    def scans_and_patient(self) -> tuple[object | None, str]:
        """(the cine the reviewed frame belongs to, or None; the patient): the subject hierarchy's patient, else the
        cine's name, else the ED/ES pair's common name, so every frame of one cine or pair is one patient."""
        p = self.p
        inputs = read_inputs(p.inputVolume, None, self.sequences_logic) if p.inputVolume is not None else None
        if inputs is not None and inputs.kind == CINE:
            sequence = inputs.sequence
            return sequence, patient_of_volume(sequence) or patient_of_volume(p.inputVolume) or safe_case_id(sequence.GetName())
        found = patient_of_volume(p.inputVolume) or patient_of_volume(p.esVolume)
        if found:
            return None, found
        name = safe_case_id(p.inputVolume.GetName()) if p.inputVolume is not None else "case"
        for suffix in ("_ED", "_ed", "_ES", "_es"):  # SCD0000101_ED / SCD0000101_ES: the pair naming of measurements
            if p.esVolume is not None and name.endswith(suffix):
                return None, name[: -len(suffix)]
        return None, name

    def review_preview(self, end_systole: bool = False, structures: list[str] | None = None, slices: list[int] | None = None) -> str:
        """What Mark reviewed will teach for one case, shown before export: structures and slices, and how they were chosen."""
        volume, segmentation, case_id = self.review_pair(end_systole)
        _, labels = corrected_case(volume, segmentation)
        reviewed, rule = reviewed_of(segmentation, labels, structures, slices)
        return f"{case_id}: {describe_reviewed(reviewed)} ({rule})"

    def mark_reviewed(
        self, folder: Path, reviewer: str, end_systole: bool = False, overwrite: bool = False, structures: list[str] | None = None,
        slices: list[int] | None = None,
    ) -> Path:
        """Add the (corrected) image and segmentation to the corrections data set as one case.

        ``structures``: the segment IDs the clinician ticked as reviewed; None: the ones they edited.
        ``slices``: the reviewed slices as adjusted in the panel; None: where each structure was edited.
        The patient comes from :meth:`scans_and_patient`; the scans behind the case (the whole cine of a
        frame, else the volume) join the unlabelled pool.
        """
        volume, segmentation, case_id = self.review_pair(end_systole)
        scans, patient = self.scans_and_patient()
        path = export_correction(
            folder, volume, segmentation, case_id=case_id, reviewer=reviewer, overwrite=overwrite, reviewed_structures=structures,
            reviewed_slices=slices, patient_id=patient, scans=scans,
        )
        self.p.statusText = f"Added to the training set: {path} (patient {patient})"
        return path

    def add_to_pool(self, folder: Path) -> int:
        """*Add to unlabelled pool*: the selected volume, or every frame of its cine; the pool's size after it."""
        inputs = read_inputs(self.p.inputVolume, None, self.sequences_logic)
        files = add_to_pool(folder, inputs.sequence if inputs.kind == CINE else inputs.volume)
        count = pool_count(folder)
        self.p.statusText = f"Added {len(files)} volume(s) to the unlabelled pool in {folder}; it now holds {count}."
        return count

    # -- measurements -----------------------------------------------------------------------------
    def recompute_measurements(self) -> dict:
        """Measure again from the segmentations as they are now (after corrections); the table is updated in place."""
        p = self.p
        if p.measurementsTable is None or p.segmentation is None:
            raise IdealError("no measurements to recompute: segment an ED/ES pair or a cine first")
        browser = self.sequences_logic.GetFirstBrowserNodeForProxyNode(p.segmentation) if self.sequences_logic else None
        if browser is not None:
            report = cine_report(browser, browser.GetMasterSequenceNode(), browser.GetSequenceNode(p.segmentation))
            measured = dict(report.measurements)
        elif p.esSegmentation is not None and p.esVolume is not None:
            report = report_from_segmentations(p.segmentation, p.inputVolume, p.esSegmentation, p.esVolume)
            measured = {k: v for k, v in report.measurements.items() if k not in ("ed_frame", "es_frame")}
        else:
            raise IdealError("measurements need an end-systolic segmentation, or a cine")
        update_measurements_table(p.measurementsTable, measured)
        self.report = report
        p.statusText = "Measurements recomputed from the corrected segmentations." + (
            f" {len(report.flags)} QC flag(s) remain." if report.flags else " No QC flag.")
        return measured


def table_rows(table: object) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of cell texts) of a table node, as a panel shows it (Slicer's table view, the web table)."""
    contents = table.GetTable()
    columns = range(contents.GetNumberOfColumns())
    names = [contents.GetColumnName(c) for c in columns]
    rows = [[contents.GetValue(row, c).ToString() for c in columns] for row in range(contents.GetNumberOfRows())]
    return names, rows


def table_text(table: object) -> str:
    """A table node as tab-separated text with a header row (for the clipboard)."""
    names, rows = table_rows(table)
    return "\n".join("\t".join(cells) for cells in [names, *rows]) + "\n"
