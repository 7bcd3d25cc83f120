"""IDEALSegmentLogic imports the same way in Slicer (module folder on sys.path) and after pip install."""
from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path


from helpers import import_slicer_core  # noqa: E402

import_slicer_core()

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "IDEALSegment"

def test_pip_install_maps_the_logic_folder():
    import IDEALSegmentLogic
    import IDEALTrain

    assert Path(IDEALSegmentLogic.__file__).resolve() == MODULE_DIR / "Logic" / "__init__.py"
    assert Path(IDEALTrain.__file__).resolve() == ROOT / "IDEALTrain" / "__init__.py"


def test_slicer_style_import_without_pip(tmp_path):
    # Slicer: the scripted module's folder is on sys.path and nothing is pip-installed. Run Python
    # without site processing so the editable install's import hook is absent, keeping only the
    # third-party libraries (numpy, vtk, slicer-core) that Slicer itself would provide.
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path[:0] = [{str(MODULE_DIR)!r}]
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        for name in ("IDEALSegmentLogic", "IDEALTrain"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(name + " importable without the prelude: the test does not model Slicer")
        import IDEALSegmentPackages  # what the module files import first
        import slicer
        import IDEALSegmentLogic, IDEALTrain
        from IDEALSegmentLogic.volumes import image_from_volume, volume_from_image
        from IDEALSegmentLogic.segmentations import segmentation_from_labels
        from IDEALTrain.image import Image
        import numpy as np
        scene = slicer.vtkMRMLScene()
        node = volume_from_image(Image(np.zeros((2, 3, 4), np.float32)), scene, "v")
        assert image_from_volume(node).array.shape == (2, 3, 4)
        assert "Logic" not in sys.modules, "something imported the generic name 'Logic'"
        print(IDEALSegmentLogic.__file__)
        print(IDEALTrain.__file__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logic_file, train_file = result.stdout.split()
    assert Path(logic_file).resolve() == MODULE_DIR / "Logic" / "__init__.py"
    assert Path(train_file).resolve() == ROOT / "IDEALTrain" / "__init__.py"


def test_logic_never_uses_qt_or_slicer_globals():
    for path in (MODULE_DIR / "Logic").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in ("qt", "ctk", "slicer.qt", "Logic"), f"{path.name} imports {name}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in ("app", "mrmlScene", "modules"), f"{path.name} uses slicer.{node.attr}"
