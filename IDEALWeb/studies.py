"""The studies the web app offers from its data folder, and opening one into the MRML scene.

A study is the shipped sample (an ED/ES pair), a DICOM folder (a cine is split by phase by
IDEALTrain's reader and becomes a Sequence with a browser, as Slicer holds a loaded 4D file), a
``<case>_ED`` / ``<case>_ES`` pair of volume files, or one NIfTI/NRRD/MHA file (a 4D file is a cine).
Everything is read through IDEALTrain (exact oblique geometry), never through trame-slicer's own
DICOM reader, which does not split a cine by phase.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from IDEALSegmentLib.cine import sequence_from_images
from IDEALSegmentLib.sample_data import EXPERT_ATTRIBUTE, load_sample_volumes
from IDEALSegmentLib.scene_files import register_sequence_browser_class
from IDEALSegmentLib.volumes import unique_node_name, volume_from_image

from IDEALTrain.errors import IdealError
from IDEALTrain.io.volume_files import has_volume_suffix, read_frames, strip_volume_suffix

from .security import DataFolder

SAMPLE_ID = "sample:"
PAIR_PATTERN = re.compile(r"^(?P<case>.+)_(?P<phase>ED|ES)$", re.IGNORECASE)
MAX_DEPTH = 4
MAX_STUDIES = 500


@dataclass
class StudyInfo:
    """One entry of the study list: its id (a path relative to the data folder), a title and its kind."""

    study_id: str
    title: str
    kind: str  # sample, dicom, pair, volume

    def to_state(self) -> dict:
        return {"value": self.study_id, "title": self.title}


@dataclass
class OpenStudy:
    """A study in the scene: the image to segment, the ES volume of a pair, and a cine's browser."""

    info: StudyInfo
    volume: object
    es_volume: object | None = None
    browser: object | None = None
    sequence: object | None = None

    @property
    def frames(self) -> int:
        return self.sequence.GetNumberOfDataNodes() if self.sequence is not None else 1

    @property
    def output_name(self) -> str:
        """The study's folder name in the output folder."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.info.title if self.info.kind == "sample" else self.info.study_id).strip("._") or "study"


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def list_studies(data: DataFolder, skip: Path | None = None, with_sample: bool = True) -> list[StudyInfo]:
    """The studies under the data folder (the output folder ``skip`` excluded), the shipped sample first."""
    studies = [StudyInfo(SAMPLE_ID, "Sample: Sunnybrook SCD0000101 (ED/ES pair, shipped)", "sample")] if with_sample else []
    skip = skip.resolve() if skip is not None else None

    def walk(folder: Path, depth: int) -> None:
        if len(studies) >= MAX_STUDIES or (skip is not None and (folder == skip or skip in folder.parents)):
            return
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        files = [e for e in entries if e.is_file() and not e.name.startswith(".")]
        if any(_is_dicom(f) for f in files[:20]):
            studies.append(StudyInfo(data.relative(folder), f"DICOM {data.relative(folder)}", "dicom"))
        volumes = [f for f in files if has_volume_suffix(f)]
        pairs: dict[str, dict[str, Path]] = {}
        for f in volumes:
            match = PAIR_PATTERN.match(strip_volume_suffix(f.name))
            if match:
                pairs.setdefault(match["case"], {})[match["phase"].upper()] = f
        paired = set()
        for case, phases in pairs.items():
            if set(phases) == {"ED", "ES"}:
                studies.append(StudyInfo(data.relative(phases["ED"]), f"ED/ES pair {data.relative(folder / case)}", "pair"))
                paired |= set(phases.values())
        studies.extend(StudyInfo(data.relative(f), data.relative(f), "volume") for f in volumes if f not in paired)
        if depth < MAX_DEPTH:
            for sub in entries:
                if sub.is_dir() and not sub.name.startswith("."):
                    walk(sub, depth + 1)

    walk(data.root, 0)
    return studies[: MAX_STUDIES + (1 if with_sample else 0)]


def _es_partner(ed_path: Path) -> Path | None:
    match = PAIR_PATTERN.match(strip_volume_suffix(ed_path.name))
    if not match or match["phase"].upper() != "ED":
        return None
    stem = strip_volume_suffix(ed_path.name)
    suffix = ed_path.name[len(stem):]
    for phase in ("ES", "es", "Es"):
        candidate = ed_path.with_name(f"{match['case']}_{phase}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def browse_cine(scene: object, sequence: object, sequences_logic: object) -> tuple[object, object]:
    """(browser, proxy volume) for a cine sequence: a new browser on frame 0, as Slicer shows a loaded 4D file."""
    register_sequence_browser_class(scene)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", unique_node_name(scene, f"{sequence.GetName()} browser"))
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    return browser, browser.GetProxyNode(sequence)


def open_study(scene: object, sequences_logic: object, data: DataFolder, study_id: str) -> OpenStudy:
    """Read a study (checked to lie in the data folder) into ``scene``; nothing is added when reading fails."""
    if study_id == SAMPLE_ID:
        nodes = load_sample_volumes(scene)
        info = StudyInfo(SAMPLE_ID, nodes["ED"].GetName().rsplit("_", 1)[0], "sample")
        return OpenStudy(info, nodes["ED"], nodes["ES"])
    path = data.resolve(study_id)
    relative = data.relative(path)
    if path.is_dir():
        frames = read_frames(path)
        name, kind = path.name, "dicom"
    elif has_volume_suffix(path):
        es_path = _es_partner(path)
        if es_path is not None:
            ed_frames, es_frames = read_frames(path), read_frames(es_path)
            if len(ed_frames) != 1 or len(es_frames) != 1:
                raise IdealError(f"{relative}: an ED/ES pair must be two 3D volumes")
            ed = volume_from_image(ed_frames[0], scene, strip_volume_suffix(path.name))
            es = volume_from_image(es_frames[0], scene, strip_volume_suffix(es_path.name))
            return OpenStudy(StudyInfo(relative, relative, "pair"), ed, es)
        frames = read_frames(path)
        name, kind = strip_volume_suffix(path.name), "volume"
    else:
        raise IdealError(f"{relative} is neither a DICOM folder nor a NIfTI/NRRD/MHA volume")
    info = StudyInfo(relative, relative, kind)
    if len(frames) == 1:
        return OpenStudy(info, volume_from_image(frames[0], scene, name))
    sequence = sequence_from_images(scene, frames, name)
    browser, proxy = browse_cine(scene, sequence, sequences_logic)
    return OpenStudy(info, proxy, None, browser, sequence)


def expert_figures(volume: object) -> dict | None:
    """The expert's LV figures the sample carries (shown beside the table), None for other studies."""
    text = volume.GetAttribute(EXPERT_ATTRIBUTE) if volume is not None else None
    return json.loads(text) if text else None
