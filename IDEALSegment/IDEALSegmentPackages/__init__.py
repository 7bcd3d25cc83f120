"""Makes ``IDEALTrain`` importable by name in Slicer's developer mode, where nothing is pip-installed.

An installed extension has ``qt-scripted-modules/IDEALTrain/`` beside the modules, so plain
``import IDEALTrain`` works there. In developer mode (this repository's ``IDEALSegment/`` added as
a module path) the package sits one folder up, beside ``IDEALSegment/``; importing this package
puts that folder on ``sys.path`` once. ``IDEALSegmentLib`` needs nothing: it is a real subpackage
of the module folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]  # IDEALSegment/ in the source tree, qt-scripted-modules/ installed


def register_packages(module_dir: Path = MODULE_DIR) -> None:
    """Make ``import IDEALTrain`` work from the installed layout or from the source tree."""
    if "IDEALTrain" in sys.modules or (module_dir / "IDEALTrain" / "__init__.py").is_file():
        return
    source_root = module_dir.parent
    if (source_root / "IDEALTrain" / "__init__.py").is_file() and str(source_root) not in sys.path:
        sys.path.append(str(source_root))


register_packages()
