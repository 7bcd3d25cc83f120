"""Makes ``IDEALTrain`` and ``IDEALSegmentLogic`` importable by name where nothing is pip-installed.

Inside Slicer the modules' folder is on ``sys.path`` but the two packages are plain folders beside
it (``Logic/`` has no importable name of its own). Importing this package registers them once,
from the installed layout (``qt-scripted-modules/IDEALTrain``) or the source tree
(``IDEALSegment/../IDEALTrain``); a package that is already imported is left alone.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]  # IDEALSegment/ in the source tree, qt-scripted-modules/ installed


def register_packages(module_dir: Path = MODULE_DIR) -> None:
    """Import IDEALTrain and IDEALSegmentLogic by name from the folders beside ``module_dir``."""
    for name, folders in (
        ("IDEALTrain", (module_dir / "IDEALTrain", module_dir.parent / "IDEALTrain")),
        ("IDEALSegmentLogic", (module_dir / "Logic",)),
    ):
        folder = next((f for f in folders if (f / "__init__.py").is_file()), None)
        if name in sys.modules or folder is None:
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


register_packages()
