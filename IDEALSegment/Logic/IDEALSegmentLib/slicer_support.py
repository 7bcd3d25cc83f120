"""Which 3D Slicer the extension supports, and the one line the modules show on an older one.

Slicer 5.10 and later are supported (Python 3.12). Slicer 5.6 and 5.8 embed Python 3.9: there the
module files still import (``ruff`` checks them with a Python 3.9 target, and
``Testing/test_python39.py`` imports them under Python 3.9), and each module shows
:func:`unsupported_slicer`'s line instead of its panel. The extension's CMakeLists.txt refuses to
build against an older Slicer with the same minimum.
"""
from __future__ import annotations

#: The oldest supported Slicer (major, minor); CMakeLists.txt's IDEALSEGMENT_MINIMUM_SLICER_VERSION says the same.
MINIMUM_SLICER = (5, 10)


def unsupported_slicer(module: str, version: tuple[int, int]) -> str | None:
    """One line saying which Slicer ``module`` needs, or None when Slicer ``version`` (major, minor) is supported."""
    if tuple(version[:2]) >= MINIMUM_SLICER:
        return None
    needed = ".".join(map(str, MINIMUM_SLICER))
    found = ".".join(map(str, version[:2]))
    return f"{module} needs 3D Slicer {needed} or later (this is Slicer {found}): install a current Slicer to use it."
