"""Makes ``IDEALSegmentLib`` and ``IDEALTrain`` importable by name in Slicer, installed or in developer mode.

The Logic lives in ``Logic/IDEALSegmentLib/`` beside the module files, in the source tree and in the
installed extension alike (the design card's layout): importing this package puts ``Logic/`` on
``sys.path`` once, so ``import IDEALSegmentLib`` works with no aliasing and no generic top-level
name. An installed extension has ``qt-scripted-modules/IDEALTrain/`` beside the modules; in developer
mode (this repository's ``IDEALSegment/`` added as a module path) the package sits one folder up,
beside ``IDEALSegment/``, and that folder is put on ``sys.path`` once.
"""
from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]  # IDEALSegment/ in the source tree, qt-scripted-modules/ installed
LOGIC_DIR = MODULE_DIR / "Logic"


def _append_once(folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.append(str(folder))


def register_packages(module_dir: Path = MODULE_DIR) -> None:
    """Make ``import IDEALSegmentLib`` and ``import IDEALTrain`` work from the installed layout or the source tree."""
    if "IDEALSegmentLib" not in sys.modules and (module_dir / "Logic" / "IDEALSegmentLib" / "__init__.py").is_file():
        _append_once(module_dir / "Logic")
    if "IDEALTrain" in sys.modules or (module_dir / "IDEALTrain" / "__init__.py").is_file():
        return
    source_root = module_dir.parent
    if (source_root / "IDEALTrain" / "__init__.py").is_file():
        _append_once(source_root)


register_packages()
