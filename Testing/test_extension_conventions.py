"""Slicer conventions the module files follow, checked on their source (qt and slicer.app are absent here):
template Logic names, no widget-file imports between modules, self-tests that skip and never install,
the Sequences API as Slicer's sources define it."""
from __future__ import annotations

import ast
import time
import types
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "IDEALSegment"


def tree(name: str) -> ast.Module:
    return ast.parse((MODULE_DIR / name).read_text())


def class_names(module: ast.Module) -> set[str]:
    return {node.name for node in module.body if isinstance(node, ast.ClassDef)}


def test_logic_classes_follow_the_template_names():
    assert {"IDEALSegment", "IDEALSegmentWidget", "IDEALSegmentLogic", "IDEALSegmentTest"} <= class_names(tree("IDEALSegment.py"))
    assert {"IDEALTrainer", "IDEALTrainerWidget", "IDEALTrainerLogic", "IDEALTrainerTest"} <= class_names(tree("IDEALTrainer.py"))
    for name in ("IDEALSegment.py", "IDEALTrainer.py"):
        assert not any(n.endswith("ModuleLogic") for n in class_names(tree(name)))


def test_the_trainer_imports_nothing_from_the_segment_widget_file():
    imported = set()
    for node in ast.walk(tree("IDEALTrainer.py")):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert "IDEALSegment" not in imported and "IDEALSegmentGui" in imported  # shared helpers: IDEALSegmentGui.common


def _function(module: ast.Module, name: str) -> ast.FunctionDef:
    return next(node for node in ast.walk(module) if isinstance(node, ast.FunctionDef) and node.name == name)


def test_dependencies_are_never_installed_in_testing_mode():
    ensure = _function(ast.parse((MODULE_DIR / "IDEALSegmentGui" / "common.py").read_text()), "ensureDependencies")
    source = ast.unparse(ensure)
    guard = source.index("slicer.app.testingEnabled()")
    for install in ("pip_install", "installTorch", "confirmOkCancelDisplay"):
        assert guard < source.index(install), f"{install} can run before the testing-mode check"


class _NoSlicer:
    """Any use means a self-test body ran although it should have been skipped."""

    def __getattr__(self, name):
        raise AssertionError(f"the test body ran (slicer.{name}) instead of being skipped")


def ctest_run(filename: str, test_class: str, reason: str | None) -> unittest.TestResult:
    """The module's Test class run as CTest runs it: slicer.testing.runUnitTest loads the module's TestCases with
    unittest.TestLoader and calls every test_* method directly (runTest is never called)."""
    cls = next(n for n in tree(filename).body if isinstance(n, ast.ClassDef) and n.name == test_class)
    module = types.ModuleType(filename[:-3])
    module.__dict__.update(ScriptedLoadableModuleTest=unittest.TestCase, slicer=_NoSlicer(), Path=Path, time=time,
                           common=types.SimpleNamespace(selfTestSkipReason=lambda name: reason))
    exec(compile(ast.Module([cls], []), filename, "exec"), module.__dict__)
    result = unittest.TestResult()
    unittest.TestLoader().loadTestsFromModule(module).run(result)
    return result


def test_self_tests_skip_under_ctest_when_torch_is_missing_or_slicer_is_too_old():
    for name, test_class in (("IDEALSegment.py", "IDEALSegmentTest"), ("IDEALTrainer.py", "IDEALTrainerTest")):
        result = ctest_run(name, test_class, "IDEALSegment self-test skipped: Python package(s) torch not installed")
        assert result.testsRun >= 1 and not result.errors and not result.failures, (result.errors, result.failures)
        assert len(result.skipped) == result.testsRun, f"{test_class}: a test_* method ran without torch"
        assert {why for _, why in result.skipped} == {"IDEALSegment self-test skipped: Python package(s) torch not installed"}
        cls = next(n for n in tree(name).body if isinstance(n, ast.ClassDef) and n.name == test_class)
        assert "ensureDependencies" not in ast.unparse(cls)
    ran = ctest_run("IDEALSegment.py", "IDEALSegmentTest", None)  # nothing to skip: the bodies run (and meet _NoSlicer)
    assert not ran.skipped and ran.testsRun == len(ran.failures) + len(ran.errors)


def test_cine_code_uses_the_sequences_api_of_slicers_sources():
    """A cine is found from its proxy (GetFirstBrowserNodeForProxyNode); no deprecated IsSynchronizedSequenceNode(id);
    a Sequences logic made here is always bound to the scene."""
    sources = {p.name: p.read_text() for p in (MODULE_DIR / "Logic" / "IDEALSegmentLib").glob("*.py")}
    assert "GetFirstBrowserNodeForProxyNode" in sources["cine.py"]
    assert "SetSaveChanges(segmentation_sequence, True)" in sources["cine.py"]
    for name, source in sources.items():
        calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
        assert not [c for c in calls if c.func.attr == "IsSynchronizedSequenceNode" and len(c.args) == 1], name
        made = [c for c in calls if c.func.attr == "vtkSlicerSequencesLogic"]
        assert len(made) <= 1 and (not made or ".SetMRMLScene(scene)" in source), name
