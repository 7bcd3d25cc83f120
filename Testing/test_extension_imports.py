"""Import rules of the extension, checked on the import graph.

Slicer imports every scripted module file at start-up, before PyTorch may be installed, and the
network runs in child processes: the module files (and their shared GUI helpers) import only Slicer,
Qt/CTK/VTK, the standard library and torch-free Logic modules, anywhere, and no Logic module they
import pulls torch in, directly or through IDEALTrain. No Python thread runs model work. The Logic
layer never touches Qt or Slicer's application/GUI globals.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "IDEALSegment"
LOGIC_DIR = MODULE_DIR / "Logic" / "IDEALSegmentLib"
GUI_DIR = MODULE_DIR / "IDEALSegmentGui"
GUI_FILES = [MODULE_DIR / "IDEALSegment.py", MODULE_DIR / "IDEALTrainer.py", *sorted(GUI_DIR.glob("*.py"))]
PACKAGES = {"IDEALSegmentLib": LOGIC_DIR, "IDEALTrain": ROOT / "IDEALTrain", "IDEALSegmentGui": GUI_DIR}

#: What a module file may import at its top level (plus the standard library and TORCH_FREE_LOGIC).
GUI_TOP_LEVEL_ALLOWED = {"slicer", "qt", "ctk", "vtk", "typing", "IDEALSegmentPackages", "IDEALSegmentGui"}
#: The scene-free slicer.util helpers that work on slicer-core; anything else needs the application.
SCENE_FREE_UTIL = {
    "arrayFromVolume", "arrayFromVolumeModified", "updateVolumeFromArray", "arrayFromVTKMatrix",
    "vtkMatrixFromArray", "updateVTKMatrixFromArray", "arrayFromTableColumn", "updateTableFromArray", "NodeModify",
}
SLICER_APP_GLOBALS = {"app", "mrmlScene", "modules", "moduleNames", "qSlicerApplication"}


def top_level_imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported when the file is imported (not inside functions or classes).

    Imports under ``if TYPE_CHECKING:`` are skipped; relative imports are resolved against the
    file's package (IDEALSegmentLib or IDEALTrain).
    """
    package = next(
        (".".join((name, *path.parent.relative_to(folder).parts)) for name, folder in PACKAGES.items() if path.parent.is_relative_to(folder)),
        None,
    )
    found: list[tuple[str, int]] = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                found.extend((alias.name, node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".") if package else []
                    assert package and node.level <= len(parts), f"{path}: relative import beyond its package"
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                    found.append((module, node.lineno))
                    if not node.module:  # from . import x -> the submodules
                        found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
                else:
                    found.append((node.module, node.lineno))
                    found.extend((f"{node.module}.{alias.name}", node.lineno) for alias in node.names if _is_module(f"{node.module}.{alias.name}"))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _source_file(module: str) -> Path | None:
    """The repository file of an IDEALSegmentLib / IDEALTrain module, None for anything else."""
    top, _, rest = module.partition(".")
    folder = PACKAGES.get(top)
    if folder is None:
        return None
    candidate = folder.joinpath(*rest.split(".")) if rest else folder
    if candidate.with_suffix(".py").is_file():
        return candidate.with_suffix(".py")
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return None


def _is_module(module: str) -> bool:
    return _source_file(module) is not None


def import_closure(module: str) -> dict[str, list[str]]:
    """Every module imported (transitively, top level only) by importing ``module``: name -> import chain."""
    chains = {module: [module]}
    pending = [module]
    while pending:
        current = pending.pop()
        parts = current.split(".")
        files = [_source_file(".".join(parts[:n])) for n in range(1, len(parts) + 1)]  # parents run first
        for path in filter(None, files):
            for imported, _ in top_level_imports(path):
                if imported not in chains:
                    chains[imported] = chains[current] + [imported]
                    if _source_file(imported) is not None:
                        pending.append(imported)
    return chains


def torch_chain(module: str) -> list[str] | None:
    """The import chain from ``module`` to torch (or safetensors.torch), None when there is none."""
    for name, chain in import_closure(module).items():
        if name.split(".")[0] == "torch" or name == "safetensors.torch":
            return chain
    return None


def lazy_imports(path: Path) -> set[str]:
    """IDEALSegmentLib / IDEALTrain modules a GUI file imports anywhere (inside methods too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES)
    return names


# -- the module files -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", [p for p in GUI_FILES if p.name != "__init__.py"], ids=lambda p: p.name)
def test_module_files_import_only_slicer_qt_stdlib_and_torch_free_logic_at_top_level(path):
    imports = top_level_imports(path)
    assert imports, "the parser found no imports: the check would pass vacuously"
    for module, line in imports:
        top = module.split(".")[0]
        assert top in GUI_TOP_LEVEL_ALLOWED or top in sys.stdlib_module_names or module in TORCH_FREE_LOGIC or module == "IDEALSegmentLib", (
            f"{path.name}:{line} imports {module} at module level; Slicer runs this at start-up: only torch-free Logic modules"
        )


def _threads(path: Path) -> list[str]:
    """Python threads a file starts that do anything but read a child's output (target ``..._read...``), as 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("Thread", "ThreadPoolExecutor", "start_new_thread"):
            target = next((ast.unparse(k.value) for k in node.keywords if k.arg == "target"), "")
            if "._read" not in target:
                found.append(f"{node.lineno}: {ast.unparse(node.func)}")
    return found


@pytest.mark.parametrize("path", [*GUI_FILES, *sorted(LOGIC_DIR.glob("*.py"))], ids=lambda p: p.name)
def test_no_python_thread_runs_model_work(path):
    """Model work runs in child processes; the only threads move a child's output lines into a queue."""
    assert _threads(path) == []


def test_the_thread_check_sees_threads(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import threading\nthreading.Thread(target=work).start()\nthreading.Thread(target=self._read_stdout).start()\n")
    assert _threads(bad) == ["2: threading.Thread"]


# Logic modules the widgets use before PyTorch is installed (listing models, checking inputs, the
# training set, starting jobs): importing them must not import torch.
TORCH_FREE_LOGIC = [
    "IDEALSegmentLib.cancel", "IDEALSegmentLib.volumes", "IDEALSegmentLib.segmentations",
    "IDEALSegmentLib.registry", "IDEALSegmentLib.inference", "IDEALSegmentLib.uncertainty",
    "IDEALSegmentLib.measurements", "IDEALSegmentLib.cine", "IDEALSegmentLib.corrections",
    "IDEALSegmentLib.jobs", "IDEALSegmentLib.selftest", "IDEALSegmentLib.retraining",
    "IDEALSegmentLib.sample_data", "IDEALSegmentLib.refinement", "IDEALSegmentLib.panel", "IDEALSegmentLib.segment_job",
    "IDEALSegmentLib.trainer_panel", "IDEALSegmentLib.comparison_job", "IDEALSegmentLib.comparison", "IDEALSegmentLib.devices",
    "IDEALSegmentLib.review", "IDEALSegmentLib.slicer_support", "IDEALSegmentLib.worker",
]


def test_every_logic_module_the_widgets_import_is_in_the_torch_free_list():
    used = set().union(*(lazy_imports(path) for path in GUI_FILES))
    logic = {name for name in used if name.startswith("IDEALSegmentLib.")}
    assert logic, "the widgets import no Logic module: the parser is broken"
    assert logic <= set(TORCH_FREE_LOGIC), f"add these to TORCH_FREE_LOGIC (and keep them torch-free): {sorted(logic - set(TORCH_FREE_LOGIC))}"


@pytest.mark.parametrize("module", TORCH_FREE_LOGIC)
def test_logic_modules_import_no_torch_at_top_level(module):
    if _source_file(module) is None:
        pytest.skip(f"{module} does not exist yet")
    assert torch_chain(module) is None, f"importing {module} imports torch via {' -> '.join(torch_chain(module))}"


def test_import_graph_finds_a_transitive_torch_import():
    """The graph really follows imports: IDEALTrain.inference.predictor reaches torch, IDEALTrain.io.image does not."""
    assert torch_chain("IDEALTrain.inference.predictor") is not None
    assert torch_chain("IDEALTrain.io.image") is None
    chain = torch_chain("IDEALTrain.demo")
    assert chain is not None and len(chain) >= 3, chain  # demo -> bundle/predictor -> ... -> torch


def test_torch_free_logic_modules_really_import_without_torch():
    """The same, at run time: a fresh interpreter imports each module and torch stays out of sys.modules."""
    pytest.importorskip("slicer")
    present = [m for m in TORCH_FREE_LOGIC if _source_file(m) is not None]
    script = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {present!r}:
            importlib.import_module(name)
            leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
            if leaked:
                raise SystemExit(name + " imported torch")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:] + result.stdout[-500:]


# -- the Logic layer ------------------------------------------------------------------------------
def gui_uses(path: Path) -> list[str]:
    """Qt imports and Slicer application / GUI names that a Logic file uses, as 'line: what'."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("qt", "ctk", "PythonQt") or alias.name in ("slicer.app", "slicer.ScriptedLoadableModule"):
                    problems.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if module.split(".")[0] in ("qt", "ctk", "PythonQt") or module.startswith("slicer.ScriptedLoadableModule"):
                problems.append(f"{node.lineno}: from {module} import ...")
            for alias in node.names:
                if module == "slicer" and alias.name in SLICER_APP_GLOBALS | {"util"}:
                    problems.append(f"{node.lineno}: from slicer import {alias.name}")
                if module == "slicer.util" and alias.name not in SCENE_FREE_UTIL:
                    problems.append(f"{node.lineno}: from slicer.util import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            if node.attr in SLICER_APP_GLOBALS:
                problems.append(f"{node.lineno}: slicer.{node.attr}")
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) == "slicer.util" and node.attr not in SCENE_FREE_UTIL:
            problems.append(f"{node.lineno}: slicer.util.{node.attr}")
    return problems


@pytest.mark.parametrize("path", sorted(LOGIC_DIR.glob("*.py")), ids=lambda p: p.name)
def test_logic_uses_no_qt_and_no_slicer_application(path):
    assert gui_uses(path) == []


def test_logic_check_catches_gui_names(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import qt\nimport slicer\nfrom slicer import app\nfrom slicer.util import errorDisplay, arrayFromVolume\n"
        "def f(v):\n    slicer.util.loadVolume('x')\n    slicer.mrmlScene.Clear()\n    return slicer.util.arrayFromVolume(v)\n"
    )
    assert gui_uses(bad) == [
        "1: import qt", "3: from slicer import app", "4: from slicer.util import errorDisplay",
        "6: slicer.util.loadVolume", "7: slicer.mrmlScene",
    ]


def test_module_files_register_the_packages_before_using_them():
    """Both module files import IDEALSegmentPackages (the one registration) before any Logic import."""
    for path in GUI_FILES[:2]:
        imports = top_level_imports(path)
        names = [name for name, _ in imports]
        assert "IDEALSegmentPackages" in names, f"{path.name} never imports IDEALSegmentPackages"
        first = names.index("IDEALSegmentPackages")
        early = [name for name in names[:first] if name.split(".")[0] in PACKAGES]
        assert not early, f"{path.name} imports {early} before registering the packages"
