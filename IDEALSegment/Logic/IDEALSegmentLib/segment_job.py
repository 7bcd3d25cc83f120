"""Segmenting from the Slicer panel in a child process: inputs to files, ``idealtrain segment``, results into the scene.

Slicer's process never imports torch. :func:`read_inputs` reads what the user chose (a volume, an
ED/ES pair, or the proxy volume of a cine, whose browser and sequence it finds);
:class:`SegmentationJob` writes the voxels with their exact geometry into a private temporary
folder, runs ``python -m IDEALTrain segment ... --progress-json`` through :class:`~.jobs.TrainingJob`
(one run per volume; a cine is one 4D file segmented with ``--all-frames``), and
:meth:`SegmentationJob.add_results` reads the label files back onto the source volumes' grids and
adds every result node, or none. Nothing touches the scene before that, so a cancel or a failure
leaves the scene exactly as it was. Every call returns at once: a GUI polls from a timer.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.function import CardiacReport
from IDEALTrain.io.volume_files import read_image, write_image

from .cine import CineResult, add_frame_labels_to_scene, cine_of_proxy, frame_images
from .folder_job import FolderJob
from .inference import SegmentationResult, add_labels_to_scene, node_ids, remove_nodes_added_since
from .jobs import JobChain
from .measurements import measurements_table, report_from_segmentations
from .registry import ModelEntry
from .volumes import check_scalar_volume, image_from_volume, node_label
from .worker import WorkerJob

VOLUME, PAIR, CINE = "volume", "pair", "cine"


@dataclass
class SegmentInputs:
    """What a Segment click reads from the scene: a volume, an ED/ES pair, or a cine (proxy, browser, sequence)."""

    volume: object
    es_volume: object | None = None
    browser: object | None = None
    sequence: object | None = None

    @property
    def kind(self) -> str:
        """``cine``, ``pair`` or ``volume``."""
        return CINE if self.sequence is not None else PAIR if self.es_volume is not None else VOLUME

    def volumes(self) -> list[object]:
        """The volumes segmented one by one (not used for a cine)."""
        return [self.volume] + ([self.es_volume] if self.es_volume is not None else [])

    def missing(self) -> list[str]:
        """Names of input nodes that are no longer in their scene (removed, or the scene was closed)."""
        scene = self.volume.GetScene()
        nodes = [n for n in (self.volume, self.es_volume, self.sequence) if n is not None]
        return [node_label(n) for n in nodes if scene is None or n.GetScene() is not scene or not scene.IsNodePresent(n)]


def read_inputs(volume: object | None, es_volume: object | None, sequences_logic: object | None) -> SegmentInputs:
    """Check the chosen image(s) and find a cine's browser and sequence through the Sequences logic."""
    if volume is None:
        raise IdealError("select an image to segment: a volume, or a frame of a cine")
    check_scalar_volume(volume, allow_labelmap=False)
    cine = cine_of_proxy(volume, sequences_logic)
    if cine is not None:
        if es_volume is not None:
            raise IdealError(
                f"{node_label(volume)} is a cine: it is segmented whole and its ED and ES frames are found from the LV "
                "volume curve; clear the end-systolic volume"
            )
        return SegmentInputs(volume, None, *cine)
    if es_volume is not None:
        if es_volume is volume:
            raise IdealError("the end-systolic volume is the same as the input volume: choose the ES frame, or none")
        check_scalar_volume(es_volume, allow_labelmap=False)
    return SegmentInputs(volume, es_volume)


@dataclass
class SegmentOutcome:
    """What a finished segmentation added to the scene."""

    kind: str
    results: list[SegmentationResult] = field(default_factory=list)  # volume / pair
    table: object | None = None  # measurements (pair, cine)
    cine: CineResult | None = None
    device: str = ""
    seconds: float = 0.0
    report: CardiacReport | None = None  # whole-heart measurements and QC flags (pair, cine)

    def summary(self, entry: ModelEntry) -> str:
        """One status line: what ran where, how long, and the ED/ES frames of a cine."""
        if self.cine is not None:
            return (
                f"{self.cine.segmentation_sequence.GetName()}: {entry.model_id} {entry.version} on {self.device}, "
                f"{len(self.cine.frame_labels_ml)} frames in {self.seconds:.1f} s; ED frame {self.cine.ed_index}, "
                f"ES frame {self.cine.es_index}"
            )
        return "\n".join(("ES: " if number else "") + result.summary() for number, result in enumerate(self.results))


class SegmentationJob(FolderJob):
    """One Segment click: the child process(es) and the files between them and the scene."""

    def __init__(
        self, inputs: SegmentInputs, entry: ModelEntry, device: str = "auto", with_uncertainty: bool = True, sequences_logic: object | None = None
    ) -> None:
        self.inputs, self.entry, self.device, self.with_uncertainty = inputs, entry, device, with_uncertainty
        self.sequences_logic = sequences_logic  # Slicer's Sequences module logic (a cine's browser is synchronised through it)
        self.folder: Path | None = None
        self.chain: JobChain | None = None

    # -- running --------------------------------------------------------------------------------
    def start(self, work_root: Path | None = None, job_class: type = WorkerJob) -> None:
        """Write the inputs into a new private folder and start the first run (in a warm worker by default)."""
        self.folder = Path(tempfile.mkdtemp(prefix="IDEALSegment-", dir=work_root))
        try:
            self.chain = JobChain(self._write_inputs(), log_path=self.folder / "segment.log", job_class=job_class)
            self.chain.start()
        except BaseException:
            self.discard()
            raise

    def _write_inputs(self) -> list[list[str]]:
        """Input files (exact geometry) and the ``idealtrain segment`` arguments for each."""
        common = ["--model", str(self.entry.path), "--device", self.device, "--progress-json"]
        if self.inputs.kind == CINE:
            images = frame_images(self.inputs.sequence)
            try:
                joined = sitk.JoinSeries([image.to_sitk() for image in images])
            except RuntimeError:
                raise IdealError(f"the frames of {node_label(self.inputs.sequence)} do not share one voxel grid") from None
            sitk.WriteImage(joined, str(self.folder / "cine.nrrd"), useCompression=False)
            step = ["segment", "--input", str(self.folder / "cine.nrrd"), "--all-frames", "--output", str(self.folder / "labels.nrrd")]
            if self.with_uncertainty:  # per-frame maps, for the QC flags of the whole-heart measurement
                step += ["--uncertainty", str(self.folder / "uncertainty.nrrd")]
            return [step + common]
        steps = []
        for number, volume in enumerate(self.inputs.volumes()):
            write_image(image_from_volume(volume, allow_labelmap=False), self.folder / f"input{number}.nrrd")
            step = ["segment", "--input", str(self.folder / f"input{number}.nrrd"), "--output", str(self.folder / f"labels{number}.nrrd")]
            if self.with_uncertainty and number == 0:
                step += ["--uncertainty", str(self.folder / "uncertainty0.nrrd")]
            steps.append(step + common)
        return steps

    # -- results --------------------------------------------------------------------------------
    def add_results(self) -> SegmentOutcome:
        """Main thread, once done: every result node on its source volume's grid, or none; the folder is removed."""
        if self.state != "done":
            raise IdealError(f"the segmentation is {self.state}, not done")
        try:
            gone = self.inputs.missing()
            if gone:
                raise IdealError(f"{', '.join(gone)} left the scene while segmenting; nothing was added")
            return self._add()
        finally:
            self.discard()

    def _add(self) -> SegmentOutcome:
        ran = [event for event in self.chain.events if event.get("event") == "segmented"]
        device = ran[-1]["device"] if ran else self.device
        seconds = sum(float(event.get("seconds", 0.0)) for event in ran)
        if self.inputs.kind == CINE:
            count = self.inputs.sequence.GetNumberOfDataNodes()
            labels = [read_image(self.folder / f"labels_frame{index:02d}.nrrd") for index in range(count)]
            maps = [self.folder / f"uncertainty_frame{index:02d}.nrrd" for index in range(count)]
            uncertainty = [read_image(path) for path in maps] if all(path.is_file() for path in maps) else None
            cine = add_frame_labels_to_scene(self.inputs.sequence, labels, self.entry, self.sequences_logic, uncertainty=uncertainty)
            return SegmentOutcome(CINE, table=cine.table, cine=cine, device=device, seconds=seconds, report=cine.report)
        scene = self.inputs.volume.GetScene()
        before = node_ids(scene)
        try:
            results = []
            for number, volume in enumerate(self.inputs.volumes()):
                uncertainty_file = self.folder / f"uncertainty{number}.nrrd"
                uncertainty = read_image(uncertainty_file) if uncertainty_file.exists() else None
                event = ran[number] if number < len(ran) else {}
                results.append(add_labels_to_scene(
                    volume, read_image(self.folder / f"labels{number}.nrrd"), uncertainty, self.entry,
                    str(event.get("device", device)), float(event.get("seconds", 0.0)), with_uncertainty=self.with_uncertainty,
                ))
            table = report = None
            if len(results) == 2:
                uncertainty_file = self.folder / "uncertainty0.nrrd"
                report = report_from_segmentations(results[0].segmentation, self.inputs.volume, results[1].segmentation,
                                                   self.inputs.es_volume, read_image(uncertainty_file) if uncertainty_file.exists() else None)
                table = measurements_table(scene, report.measurements, f"{self.inputs.volume.GetName()} measurements")
        except BaseException:
            remove_nodes_added_since(scene, before)
            raise
        return SegmentOutcome(self.inputs.kind, results, table, device=device, seconds=seconds, report=report)
