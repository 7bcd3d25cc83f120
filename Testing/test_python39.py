"""Slicer 5.6 and 5.8 embed Python 3.9: there both module files must still import, and each module says in one
line which Slicer it needs instead of failing (IDEALSegmentLib.slicer_support; Slicer 5.10+ is supported).

Two checks: every repository file the modules import at start-up (IDEALTrain files included) passes ruff with
a Python 3.9 target (always runs; ``pyproject.toml`` lints IDEALSegment/ that way too), and
Testing/python39_import_check.py imports both module files for real under a Python 3.9, where one is installed
(and under this Python), with Slicer's libraries as placeholders; it also closes each widget (cleanup on Reload).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from IDEALSegmentLib.slicer_support import MINIMUM_SLICER, unsupported_slicer
from test_extension_imports import _source_file, import_closure, top_level_imports

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILES = [ROOT / "IDEALSegment" / "IDEALSegment.py", ROOT / "IDEALSegment" / "IDEALTrainer.py"]


def startup_files() -> list[Path]:
    """The module files and every repository file importing them imports at its top level."""
    files = set(MODULE_FILES) | {ROOT / "IDEALSegment" / "IDEALSegmentPackages" / "__init__.py"}
    for path in MODULE_FILES:
        for name, _ in top_level_imports(path):
            for module in import_closure(name):
                parts = module.split(".")
                files.update(filter(None, (_source_file(".".join(parts[:n])) for n in range(1, len(parts) + 1))))
    return sorted(files)


def ruff_py39(paths: list[Path]) -> subprocess.CompletedProcess:
    """ruff with a Python 3.9 target: FA102 (`X | None` annotations without the future import) and 3.10+ syntax."""
    command = [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--target-version", "py39",
               "--select", "FA102,E9", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def ruff():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")


def test_every_file_imported_at_startup_is_python39_clean(ruff):
    files = startup_files()
    relative = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"IDEALSegment/IDEALSegmentGui/review_controls.py", "IDEALSegment/Logic/IDEALSegmentLib/panel.py",
            "IDEALTrain/io/image.py"} <= relative, "the start-up closure is incomplete: the check would miss files"
    result = ruff_py39(files)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_the_python39_lint_catches_what_breaks_slicer_58(ruff, tmp_path):
    union = tmp_path / "union.py"
    union.write_text("class A:\n    def f(self) -> list | None:\n        return None\n")
    match = tmp_path / "match.py"
    match.write_text("from __future__ import annotations\n\nmatch 1:\n    case 1:\n        pass\n")
    result = ruff_py39([union, match])
    assert result.returncode != 0
    assert "FA102" in result.stdout and "match" in result.stdout


def python39() -> str | None:
    """A Python 3.9 interpreter: $IDEAL_PYTHON39, python3.9 on PATH, or a pyenv 3.9."""
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [os.environ.get("IDEAL_PYTHON39"), *sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.9*", "bin", "python3.9"))),
                  shutil.which("python3.9")]
    for candidate in filter(None, candidates):  # a pyenv shim on PATH may name a 3.9 that is not installed
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="module", params=["python3.9", "this python"])
def harness_report(request, tmp_path_factory):
    """Testing/python39_import_check.py's report, under a Python 3.9 (Slicer 5.6/5.8) and under the test's Python."""
    interpreter = python39() if request.param == "python3.9" else sys.executable
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter (set IDEAL_PYTHON39, or install python3.9 / a pyenv 3.9)")
    result = subprocess.run([interpreter, "-S", "-B", str(ROOT / "Testing" / "python39_import_check.py")], capture_output=True,
                            text=True, cwd=tmp_path_factory.mktemp("harness"), timeout=120, env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["python"] == ([3, 9] if request.param == "python3.9" else list(sys.version_info[:2]))
    return report


def test_both_modules_load_and_say_which_slicer_they_need(harness_report):
    for module in ("IDEALSegment", "IDEALTrainer"):
        line = unsupported_slicer(module, (5, 8))
        old, new = harness_report[f"{module} 5.8"], harness_report[f"{module} 5.10"]
        assert old["warnings"] == [line] and old["helpText"] == line and old["panel"] == [line]
        assert old["connections"] == [] and not old["panelBuilt"]  # no Sample Data / terminology hooks, no panel
        assert new["warnings"] == [] and new["connections"] == ["startupCompleted()"]


def test_closing_a_widget_stops_its_timers_observers_and_children(harness_report):
    """Reload or exit: the Refine section's timer and observers, the folder timer and the idle warm workers stop too."""
    segment, trainer = harness_report["cleanup"]["IDEALSegment"], harness_report["cleanup"]["IDEALTrainer"]
    assert segment == ["panel.scene_closing", "refineSection.cleanup", "_timer.stop", "_folderTimer.stop", "removeObservers",
                       "worker.shutdown"]
    assert trainer == ["panel.cancel", "_timer.stop", "removeObservers"]


def test_the_supported_version_line():
    assert MINIMUM_SLICER == (5, 10)
    assert unsupported_slicer("IDEALSegment", (5, 10)) is None and unsupported_slicer("IDEALSegment", (6, 0)) is None
    line = unsupported_slicer("IDEALTrainer", (5, 8))
    assert line == "IDEALTrainer needs 3D Slicer 5.10 or later (this is Slicer 5.8): install a current Slicer to use it."
    assert unsupported_slicer("IDEALSegment", (5, 6)).startswith("IDEALSegment needs 3D Slicer 5.10")
    assert "\n" not in line


def test_readme_and_extension_metadata_state_the_same_minimum():
    needed = ".".join(map(str, MINIMUM_SLICER))
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f'set(IDEALSEGMENT_MINIMUM_SLICER_VERSION "{needed}")' in cmake
    assert "VERSION_LESS" in cmake and "IDEALSEGMENT_MINIMUM_SLICER_VERSION" in cmake.split("find_package(Slicer")[1]
    assert f"Slicer {needed} or later" in cmake  # the description the Extensions Manager shows
    assert f"Slicer {needed} or later" in (ROOT / "README.md").read_text(encoding="utf-8")
