"""Segment terminology as Slicer files it: LV and RV under Anatomical Structure in Slicer's anatomy list, the
LV myocardium in the list the extension ships (loaded at start-up), checked with Slicer's own Terminologies logic."""
from __future__ import annotations

import json
from pathlib import Path

import vtk
from helpers import import_slicer_core

slicer = import_slicer_core()

from IDEALTrain.labels import (  # noqa: E402
    ANATOMICAL_STRUCTURE,
    CARDIAC_LABELS,
    GENERAL_ANATOMY_CONTEXT,
    IDEALSEGMENT_CONTEXT,
)

MODULE_DIR = Path(__file__).resolve().parents[1] / "IDEALSegment"
TERM_FILE = MODULE_DIR / "Resources" / "Terminology" / "IDEALSegmentCardiac.term.json"


def entry_of(label):
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(label.terminology_entry, entry), label.terminology_entry
    return entry


def test_every_structure_is_an_anatomical_structure_with_its_snomed_code():
    codes = {}
    for label in CARDIAC_LABELS:
        entry = entry_of(label)
        category = entry.GetCategoryObject()
        assert f"{category.GetCodingSchemeDesignator()}^{category.GetCodeValue()}^{category.GetCodeMeaning()}" == ANATOMICAL_STRUCTURE
        codes[label.segment_id] = (entry.GetTerminologyContextName(), entry.GetTypeObject().GetCodeValue())
    assert codes == {
        "LV": (GENERAL_ANATOMY_CONTEXT, "87878005"),
        "RV": (GENERAL_ANATOMY_CONTEXT, "53085002"),
        "LV_Myocardium": (IDEALSEGMENT_CONTEXT, "74281007"),
    }


def test_the_shipped_list_loads_in_slicers_logic_and_holds_the_myocardium():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(TERM_FILE)) == IDEALSEGMENT_CONTEXT
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    assert IDEALSEGMENT_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    document = json.loads(TERM_FILE.read_text())
    [category] = document["SegmentationCodes"]["Category"]
    assert (category["CodeValue"], category["CodeMeaning"]) == ("123037004", "Anatomical Structure")
    assert [(t["CodeValue"], t["CodeMeaning"]) for t in category["Type"]] == [("74281007", "Myocardium")]


def test_the_gui_loads_the_shipped_file_guarded():
    source = (MODULE_DIR / "IDEALSegmentGui" / "common.py").read_text()
    assert '"Terminology" / "IDEALSegmentCardiac.term.json"' in source
    assert 'getattr(slicer.modules, "terminologies", None)' in source  # no Terminologies module: nothing to do
    assert "common.loadTerminology" in (MODULE_DIR / "IDEALSegment.py").read_text()
