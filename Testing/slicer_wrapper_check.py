"""Construct both modules' parameter-node classes with Slicer's real parameterNodeWrapper (qt and ctk mocked,
MRML from slicer-core), show the old Union annotation failing as in Slicer, and drive the panel controller
through the wrapped node. Not a pytest test: it needs Slicer's sources (Base/Python/slicer/parameterNodeWrapper).

    OMP_NUM_THREADS=1 python Testing/slicer_wrapper_check.py PATH/TO/Slicer/Base/Python/slicer/parameterNodeWrapper
"""

import ast
import importlib.util
import sys
import tempfile
import time
import types
import typing
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
GUI_CLASSES = ("qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView", "qMRMLSubjectHierarchyComboBox", "qSlicerWidget", "qMRMLWidget",
               "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLCheckableNodeComboBox", "qMRMLVolumeThresholdWidget",
               "qMRMLSegmentSelectorWidget", "qMRMLSegmentationGeometryWidget", "qSlicerMarkupsPlaceWidget", "qMRMLMarkupsROIWidget")


def load_wrapper(folder: Path, slicer) -> object:
    """Slicer's parameterNodeWrapper package as ``slicer.parameterNodeWrapper``, with Qt, CTK and GUI classes mocked."""
    for name in GUI_CLASSES:
        setattr(slicer, name, type(name, (), {}))
    for name in ("qt", "ctk"):
        sys.modules[name] = mock.MagicMock(name=name)
    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["slicer.parameterNodeWrapper"] = module
    slicer.parameterNodeWrapper = module
    spec.loader.exec_module(module)
    return module


def module_class(filename: str, classname: str, namespace: dict) -> type:
    """The class ``classname`` of a module file, executed alone with ``namespace`` (the file imports qt and slicer.app).

    With the file's ``from __future__ import annotations`` (its annotations are then strings, which the wrapper's
    typing.get_type_hints evaluates in the module's globals) in a module registered in sys.modules, as Slicer loads it.
    """
    tree = ast.parse((ROOT / "IDEALSegment" / filename).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == classname)
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    module = types.ModuleType(f"wrapper_check_{filename[:-3]}")
    module.__dict__.update(namespace)
    sys.modules[module.__name__] = module
    exec(compile(ast.Module([*future, cls], []), filename, "exec"), module.__dict__)
    return module.__dict__[classname]


def main() -> None:
    sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "IDEALSegment"), str(ROOT)]
    from helpers import import_slicer_core

    slicer = import_slicer_core()
    wrapper = load_wrapper(Path(sys.argv[1]), slicer)
    from IDEALSegmentLib.panel import SegmentPanelController
    from IDEALSegmentLib.registry import ModelRegistry
    from IDEALSegmentLib.selftest import make_selftest_model, selftest_phantom_volume
    from IDEALSegmentLib.trainer_panel import EncoderStart

    names = {n: getattr(slicer, n) for n in dir(slicer) if n.startswith("vtkMRML")}
    namespace = dict(parameterNodeWrapper=wrapper.parameterNodeWrapper, Minimum=wrapper.Minimum, WithinRange=wrapper.WithinRange,
                     Annotated=typing.Annotated, Union=typing.Union, Path=Path, EncoderStart=EncoderStart, **names)
    for filename, classname in (("IDEALSegment.py", "IDEALSegmentParameterNode"), ("IDEALTrainer.py", "IDEALTrainerParameterNode")):
        wrapped = module_class(filename, classname, namespace)(slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
        print(filename, "constructed; fields:", {k: getattr(wrapped, k) for k in wrapped.allParameters})

    exec("@parameterNodeWrapper\nclass Old:\n    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]\n", namespace)
    try:
        namespace["Old"](slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
        print("the old annotation constructed: UNEXPECTED")
    except TypeError as error:
        print("the old annotation fails as in Slicer:", error)

    work = Path(tempfile.mkdtemp())
    make_selftest_model(work / "models")
    scene = slicer.vtkMRMLScene()
    p = module_class("IDEALSegment.py", "IDEALSegmentParameterNode", namespace)(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    panel = SegmentPanelController(p, logic, ModelRegistry(work / "models", work / "none"))
    panel.refresh_models()
    p.inputVolume = selftest_phantom_volume(scene)
    p.esVolume = selftest_phantom_volume(scene, seed=8, name="es")
    panel.start("cpu")
    while not (result := panel.poll()).finished:
        time.sleep(0.05)
    print("pair through the real wrapper:", result.error, p.segmentation.GetName(), "|", p.esSegmentation.GetName(), "|",
          p.measurementsTable.GetName(), "| review", list(p.reviewSlices)[:3])
    panel.recompute_measurements()
    print("recomputed; panel state:", panel.state())


if __name__ == "__main__":
    main()
