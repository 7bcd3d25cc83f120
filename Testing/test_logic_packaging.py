"""IDEALSegmentLib imports the same way in Slicer (module folder on sys.path) and after pip install."""
from __future__ import annotations

import ast
import os
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
    import IDEALSegmentLib

    import IDEALTrain

    assert Path(IDEALSegmentLib.__file__).resolve() == MODULE_DIR / "Logic" / "IDEALSegmentLib" / "__init__.py"
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
        try:
            __import__("IDEALTrain")
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("IDEALTrain importable without the prelude: the test does not model Slicer")
        import IDEALSegmentPackages  # what the module files import first (developer mode: IDEALTrain one folder up)
        import slicer
        import IDEALSegmentLib, IDEALTrain
        from IDEALSegmentLib.volumes import image_from_volume, volume_from_image
        from IDEALSegmentLib.segmentations import segmentation_from_labels
        from IDEALTrain.io.image import Image
        import numpy as np
        scene = slicer.vtkMRMLScene()
        node = volume_from_image(Image(np.zeros((2, 3, 4), np.float32)), scene, "v")
        assert image_from_volume(node).array.shape == (2, 3, 4)
        assert "Logic" not in sys.modules, "something imported the generic name 'Logic'"
        print(IDEALSegmentLib.__file__)
        print(IDEALTrain.__file__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", "")},  # no PYTHONPATH: a developer's (the repository root) would model nothing
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logic_file, train_file = result.stdout.split()
    assert Path(logic_file).resolve() == MODULE_DIR / "Logic" / "IDEALSegmentLib" / "__init__.py"
    assert Path(train_file).resolve() == ROOT / "IDEALTrain" / "__init__.py"


def test_logic_never_uses_qt_or_slicer_globals():
    paths = sorted((MODULE_DIR / "Logic" / "IDEALSegmentLib").glob("*.py"))
    assert paths, "no Logic files found: the check would pass vacuously"
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in ("qt", "ctk", "slicer.qt", "Logic"), f"{path.name} imports {name}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in ("app", "mrmlScene", "modules"), f"{path.name} uses slicer.{node.attr}"
