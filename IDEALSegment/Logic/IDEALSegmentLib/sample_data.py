"""The shipped real-scan sample in Slicer: *Sample Data > Cardiac MRI (IDEALSegment)*.

Slicer's Sample Data module downloads each registered URI into its cache and loads every file as one
node through Slicer's readers. The sample is one DICOM series holding two cardiac phases, which a
single-file load cannot split (and a file:// URI per DICOM image would load 18 slices as 18 nodes),
so the registration gives Sample Data a ``customDownloader``: its button then calls
:func:`load_sample_volumes`, which reads each phase with IDEALTrain's DICOM reader (true oblique
geometry) into a volume named ``<patient>_ED`` / ``<patient>_ES`` (the ED/ES pair naming the
module's measurements use). The expert's LV figures travel with the volumes as a node attribute.
No Qt here: the module file only connects :func:`sample_data_source` to Sample Data at start-up.
"""
from __future__ import annotations

import json
from pathlib import Path

from IDEALTrain.io.sample_data import SAMPLE_FOLDER, Sample, load_sample, read_sample_phase, resources_dir

from .volumes import volume_from_image

SAMPLE_CATEGORY = "Cardiac MRI (IDEALSegment)"
#: The sample's button text: registerCustomSampleDataSource takes no sampleDescription, so Sample Data shows the name.
SAMPLE_NAME = "Cine MRI ED/ES (Sunnybrook)"
THUMBNAIL = "Icons/IDEALSegmentSample.png"
EXPERT_ATTRIBUTE = "IDEALSegment.ExpertFigures"  # JSON: the expert's LV EDV, ESV, EF, mass
PHASES = ("ED", "ES")


def sample_data_source(resources: Path | None = None) -> dict:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (add ``customDownloader``).

    The URIs point at the shipped files (one per phase, never downloaded: the custom downloader
    loads the whole phase); ``loadFiles`` False keeps Sample Data's own loader off them.
    """
    resources = resources or resources_dir()
    sample = load_sample(resources / SAMPLE_FOLDER)
    return {
        "category": SAMPLE_CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [sample.phase_files[phase][0].as_uri() for phase in PHASES],
        "fileNames": [f"{sample.patient}_{phase}.dcm" for phase in PHASES],
        "nodeNames": [phase_node_name(sample, phase) for phase in PHASES],
        "loadFiles": [False] * len(PHASES),
        "loadFileTypes": ["VolumeFile"] * len(PHASES),
        "thumbnailFileName": str(resources / THUMBNAIL),
    }


def phase_node_name(sample: Sample, phase: str) -> str:
    """``SCD0000101_ED``: the ``<case>_ED`` / ``<case>_ES`` naming that pairs volumes for measurements."""
    return f"{sample.patient}_{phase}"


def load_sample_volumes(scene: object, sample_root: Path | None = None) -> dict[str, object]:
    """Add the sample's ED and ES volumes to ``scene`` (new nodes, unique names); return {"ED": node, "ES": node}."""
    sample = load_sample(sample_root)
    nodes = {}
    for phase in PHASES:
        node = volume_from_image(read_sample_phase(sample, phase), scene, phase_node_name(sample, phase))
        node.SetAttribute(EXPERT_ATTRIBUTE, json.dumps(sample.expert))
        nodes[phase] = node
    return nodes
