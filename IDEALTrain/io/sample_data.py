"""The files that ship with IDEALSegment: the default model and a real cine MRI sample with expert contours.

They live in ``IDEALSegment/Resources/`` of a source checkout. The same folder is found from every
way the code can be installed (:func:`resources_dir`): a source checkout or ``pip install -e .``
(``<repo>/IDEALSegment/Resources``), the Slicer extension (``qt-scripted-modules/Resources``, beside
the ``IDEALTrain`` package) and ``pip install .`` (the wheel's data files, ``<prefix>/share/idealsegment/Resources``).

The sample (``SampleData/``) is one patient of the Sunnybrook Cardiac Data (CC0, Radau et al. 2009) in
the Sunnybrook layout that :func:`IDEALTrain.io.sunnybrook.read_sunnybrook_patient` reads: the DICOM
images that carry expert contours (end-diastole and end-systole, 9 short-axis slices each) and the
contour files. ``sample.json`` names each phase's DICOM files and the expert's LV figures, and
``labels/<patient>_<phase>.nrrd`` hold the expert's contours as label maps, so the phases and their
reference labels load without rasterising contours (Slicer has no scikit-image); tests check both
against the contours. The sample with its labels is the retraining comparison's non-site reference.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import IdealError
from .image import Image

SAMPLE_FOLDER = "SampleData"
SAMPLE_MANIFEST = "sample.json"
SAMPLE_LABELS = "labels"  # <patient>_<phase>.nrrd: the expert contours as label maps (LV 3, myocardium 2 where drawn)
DEFAULT_MODEL_PREFIX = "idealsegment-acdc-"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the IDEALTrain package


def _candidates() -> list[Path]:
    """Where the resources folder can be, most specific first."""
    return [
        _PACKAGE_ROOT / "IDEALSegment" / "Resources",  # source checkout, pip install -e .
        _PACKAGE_ROOT / "Resources",  # Slicer extension: qt-scripted-modules/{IDEALTrain,Resources}
        Path(sys.prefix) / "share" / "idealsegment" / "Resources",  # pip install . (data files)
    ]


def resources_dir() -> Path:
    """The shipped resources folder (holding ``Models/`` and ``SampleData/``) for this installation."""
    for folder in _candidates():
        if (folder / SAMPLE_FOLDER / SAMPLE_MANIFEST).is_file():
            return folder
    searched = ", ".join(str(c) for c in _candidates())
    raise IdealError(f"the shipped sample and model were not found (looked in {searched}); reinstall IDEALSegment")


def shipped_models_dir() -> Path:
    """The shipped ``Models`` folder of this installation (the first candidate's when none exists)."""
    for folder in _candidates():
        if (folder / "Models").is_dir():
            return folder / "Models"
    return _candidates()[0] / "Models"


def default_model_dir(resources: Path | None = None) -> Path:
    """The shipped default model bundle folder (``Models/idealsegment-acdc-<highest version>``)."""
    models = (resources or resources_dir()) / "Models"
    folders = [p for p in models.glob(DEFAULT_MODEL_PREFIX + "*") if (p / "card.json").is_file()]
    if not folders:
        raise IdealError(f"no {DEFAULT_MODEL_PREFIX}<version> model bundle in {models}; reinstall IDEALSegment")
    return max(folders, key=lambda p: tuple(int(n) for n in re.findall(r"\d+", p.name[len(DEFAULT_MODEL_PREFIX):])))


@dataclass(frozen=True)
class Sample:
    """The shipped sample: where it is, whose scan it is, its phases' DICOM files and the expert's figures."""

    root: Path  # a Sunnybrook-layout folder: link.csv, dicoms/, contourfiles/
    patient: str
    description: str
    phase_files: dict[str, tuple[Path, ...]]  # "ED" / "ES" -> DICOM files of that phase
    expert: dict[str, float]  # lv_edv_ml, lv_esv_ml, lv_ef_percent, myocardial_mass_g
    cine_frames: dict[str, int] | None = None  # "ED" / "ES" -> the phase's frame number in the patient's full cine

    @property
    def dicom_dir(self) -> Path:
        """The DICOM folder as a user would load it (both phases, one series)."""
        return self.root / "dicoms" / self.patient


def load_sample(root: str | Path | None = None) -> Sample:
    """Read the sample's manifest (default: the shipped sample) and check that its files are there."""
    root = Path(root) if root is not None else resources_dir() / SAMPLE_FOLDER
    try:
        manifest = json.loads((root / SAMPLE_MANIFEST).read_text())
        patient = str(manifest["patient"])
        folder = root / "dicoms" / patient
        phases = {phase: tuple(folder / name for name in manifest["phases"][phase]) for phase in ("ED", "ES")}
        expert = {key: float(value) for key, value in manifest["expert"].items()}
        description = str(manifest["description"])
        cine_frames = {phase: int(n) for phase, n in manifest.get("cine_frames", {}).items()} or None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IdealError(f"{root / SAMPLE_MANIFEST}: not a readable sample manifest ({error})") from None
    missing = [str(path) for files in phases.values() for path in files if not path.is_file()]
    if missing:
        raise IdealError(f"the sample in {root} is incomplete: {len(missing)} DICOM file(s) missing, e.g. {missing[0]}")
    return Sample(root, patient, description, phases, expert, cine_frames)


def read_sample_phase(sample: Sample, phase: str, contoured_only: bool = False) -> Image:
    """One phase ("ED" or "ES") of the sample as a volume with its DICOM geometry: the whole stack, or with
    ``contoured_only`` the slices the expert drew (the grid of :func:`read_sample_labels`)."""
    if phase not in sample.phase_files:
        raise IdealError(f"the sample has phases ED and ES, not {phase!r}")
    from .dicom_series import read_header, read_slices  # pydicom: not needed to find the models at Slicer's start-up

    files = sample.phase_files[phase]
    if contoured_only:
        contours = list((sample.root / "contourfiles").glob("*/i-contours"))
        files = [p for p in files if any((c / f"IM-0001-{int(p.stem):04d}-icontour-manual.txt").is_file() for c in contours)]
    headers = [read_header(path) for path in files]
    if any(header is None for header in headers):
        raise IdealError(f"the sample's {phase} files in {sample.dicom_dir} are not all readable DICOM images")
    return read_slices(headers)


def read_sample_labels(sample: Sample, phase: str) -> Image:
    """The expert's labels of one phase, on the phase's grid (shipped label maps of the contours)."""
    from .volume_files import read_label

    path = sample.root / SAMPLE_LABELS / f"{sample.patient}_{phase}.nrrd"
    if not path.is_file():
        raise IdealError(f"the sample in {sample.root} has no expert labels {path.name}: reinstall IDEALSegment")
    return read_label(path)
