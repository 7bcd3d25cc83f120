"""Installed segmentation models: the one definition lives in ``IDEALTrain.model.registry`` (torch-free,
shared with the command line); the Logic re-exports it under its historical name."""
from __future__ import annotations

from IDEALTrain.model.registry import (  # noqa: F401  (re-exported for the Logic and the widgets)
    DEFAULT_MODEL_ID,
    ID_PATTERN,
    SHIPPED_MODELS_DIR,
    USER_DIR_VARIABLE,
    VERSION_PATTERN,
    ModelEntry,
    ModelRegistry,
    check_version,
    default_entry,
    default_user_dir,
    entry_key,
    next_patch_version,
    read_bundle,
    select_entry,
    version_key,
)
