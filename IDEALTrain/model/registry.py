"""Installed segmentation models: bundles shipped with the extension plus those the user registered.

Torch-free and Slicer-free: the command line (``--model ID``, ``bundle list``) and the Slicer Logic
(``IDEALSegmentLib.registry`` re-exports this module) share this one definition.

Shipped bundles live in ``IDEALSegment/Resources/Models/<folder>/`` (card.json + model.safetensors,
or a .zip of them); the user's in a per-user folder (:func:`default_user_dir`). Every bundle is
checked when listed, without torch, so Slicer's process never imports it: the card (format, kind,
id, version, label map), the weights' SHA-256 against the card and the safetensors header (the
bundle format's torch-free checks are shared with IDEALTrain in ``IDEALTrain.model.card``). The
architecture check needs torch and is made by the child process that loads the model. A broken
bundle is described in :attr:`ModelRegistry.problems` (naming the bundle) and never hides the
others. A model's click-to-fix network (``refinement/``) is verified too: a broken one marks the model
(:attr:`ModelEntry.refinement_problem`, and a line in ``problems``) without hiding it. A registered bundle
is copied in as a new version, never replaces an installed one, and is refused whole (nothing copied) when
its network is broken or unsafe, its id or version is one the list would hide, or the disk is full.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IdealError
from ..io.output_guard import os_error_message, temp_prefix
from ..io.sample_data import shipped_models_dir
from ..labels import LabelInfo, check_label_map
from .card import (
    CARD_NAME,
    REFINEMENT_FOLDER,
    WEIGHTS_NAME,
    companion_files,
    copy_companion,
    read_verified,
    verify_companion,
)

#: Bundles shipped with the extension (the default model lands in idealsegment-acdc-<version>/).
SHIPPED_MODELS_DIR = shipped_models_dir()
DEFAULT_MODEL_ID = "idealsegment-acdc"
#: Environment variable overriding the per-user model folder.
USER_DIR_VARIABLE = "IDEALSEGMENT_MODELS_DIR"
#: A model version: ASCII numbers with dots, then an optional -pre-release or +build suffix.
VERSION_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*([-+][0-9A-Za-z.+-]+)?")
#: A model id: printable text without a path separator, at most 100 characters, not starting with a dot.
ID_PATTERN = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,99}")


def read_bundle(path: Path) -> tuple[dict, bytes]:
    """(card, weights bytes) of a segmentation bundle, verified without torch; IdealError naming it otherwise."""
    card, weights = read_verified(path)
    if card.get("kind", "segmentation") != "segmentation":
        raise IdealError(f"{path}: is a {card['kind']} bundle, not a segmentation model (finetune it first)")
    if not isinstance(card.get("id"), str) or not card["id"] or not isinstance(card.get("version"), str) or not card["version"]:
        raise IdealError(f"{path}: {CARD_NAME} has no model id or version")
    check_version(card["version"], f"{path}: model version")
    if not ID_PATTERN.fullmatch(card["id"]):
        raise IdealError(f"{path}: model id {card['id'][:120]!r} is not a usable name (printable, no / or \\, at most 100 characters)")
    try:
        labels = [LabelInfo.from_json(entry) for entry in card.get("labels") or []]
        check_label_map(labels, int(card["architecture"]["num_classes"]))
    except (KeyError, TypeError, ValueError, IdealError) as error:
        raise IdealError(f"{path}: unusable label map or architecture in {CARD_NAME}: {error}") from None
    return card, weights


def check_version(version: object, what: str = "model version") -> str:
    """``version`` when it is a version number like 1.2.0 (what the listing accepts), else an IdealError."""
    if not isinstance(version, str) or len(version) > 64 or not VERSION_PATTERN.fullmatch(version):
        raise IdealError(f"{what} {str(version)[:80]!r} is not a version number like 1.2.0")
    return version


def default_user_dir() -> Path:
    """The per-user model folder: $IDEALSEGMENT_MODELS_DIR, else the platform's user data folder."""
    override = os.environ.get(USER_DIR_VARIABLE)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "IDEALSegment" / "Models"


def version_key(version: str) -> tuple:
    """Sort key comparing versions numerically: 1.10.0 > 1.9.0 > 1.9.0-rc1 > 1.9."""
    main, _, suffix = version.strip().partition("-")
    main, _, _build = main.partition("+")
    numbers = []
    for part in main.split("."):
        numbers.append((int(part), "") if re.fullmatch(r"[0-9]+", part) else (-1, part))
    return (tuple(numbers), 0 if suffix else 1, suffix)


def next_patch_version(version: str) -> str:
    """``1.2.3`` -> ``1.2.4``; a version without a numeric patch part gets ``.1`` appended."""
    main = re.split(r"[-+]", version.strip(), maxsplit=1)[0]
    parts = main.split(".")
    if parts and re.fullmatch(r"[0-9]+", parts[-1]) and len(parts) >= 3:
        return ".".join(parts[:-1] + [str(int(parts[-1]) + 1)])
    return f"{main}.1"


@dataclass(frozen=True)
class ModelEntry:
    """One installed, verified segmentation model."""

    model_id: str
    version: str
    path: Path
    source: str  # "shipped" or "user"
    card: dict = field(compare=False, repr=False)
    #: Why the model folder's click-to-fix network (``refinement/``) is refused, None when it is fine or absent.
    refinement_problem: str | None = field(default=None, compare=False)

    @property
    def labels(self) -> tuple[LabelInfo, ...]:
        """The card's label map (value, segment ID, name, colour, terminology), as the model writes it."""
        return tuple(LabelInfo.from_json(entry) for entry in self.card["labels"])

    @property
    def display_name(self) -> str:
        """``<id> <version>`` plus ``(yours)`` for a user-registered model, for selectors."""
        name = f"{self.model_id} {self.version}" + (" (yours)" if self.source == "user" else "")
        return name + (" [click-to-fix network unusable]" if self.refinement_problem else "")

    @property
    def validation_dice(self) -> float | None:
        """Mean validation Dice recorded in the card, None when it has none."""
        validation = self.card.get("validation") or {}
        for value in (validation.get("dice"), (validation.get("mean") or {}).get("dice"), validation.get("mean_dice")):
            if isinstance(value, (int, float)):
                return float(value)
        return None

    @property
    def training_summary(self) -> str:
        """One line on how the model was trained (data, labels, iterations), from the card."""
        training = self.card.get("training") or {}
        recipe = training.get("recipe") or {}
        parts = []
        data = training.get("labeled_data") or training.get("data")
        if data:
            parts.append(f"data {data}")
        if training.get("selection"):
            parts.append(f"labelled: {training['selection']}")
        if training.get("unlabeled_data"):
            parts.append(f"unlabelled {training['unlabeled_data']}")
        if recipe.get("iterations"):
            parts.append(f"{recipe['iterations']} iterations")
        dice = self.validation_dice
        if dice is not None:
            parts.append(f"validation Dice {dice:.3f}")
        if self.card.get("created"):
            parts.append(f"created {self.card['created']}")
        if self.refinement_problem:
            parts.append(f"click-to-fix network refused: {self.refinement_problem}")
        return "; ".join(parts) or "no training information in the card"


class ModelRegistry:
    """The shipped and user model folders, read afresh on every :meth:`entries` call."""

    def __init__(self, user_dir: Path | None = None, shipped_dir: Path = SHIPPED_MODELS_DIR) -> None:
        self.user_dir = Path(user_dir) if user_dir is not None else default_user_dir()
        self.shipped_dir = Path(shipped_dir)
        self.problems: list[str] = []
        self._verified: dict[tuple, tuple[dict, str | None]] = {}  # (path, mtimes) -> (card, refinement problem)

    # -- listing --------------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        """Every valid model, by id then newest version first; broken bundles go to ``problems``."""
        self.problems = []
        found: dict[tuple[str, str], ModelEntry] = {}
        for source, folder in (("shipped", self.shipped_dir), ("user", self.user_dir)):
            for path in _bundle_paths(folder):
                try:
                    card, refinement_problem = self._verified_card(path)
                    entry = ModelEntry(card["id"], card["version"], path, source, card, refinement_problem)
                    version_key(entry.version)  # a version that cannot be ordered is a broken card, not a crash
                except Exception as error:  # any defect of one bundle is that bundle's problem only
                    self.problems.append(_naming(path, error))
                    continue
                if refinement_problem:  # the model segments; only its click-to-fix network is refused
                    self.problems.append(f"{refinement_problem} (the model is listed; click to fix will refuse it)")
                key = (entry.model_id, entry.version)
                if key in found:
                    self.problems.append(f"{path}: model {entry.model_id} {entry.version} is also installed at {found[key].path}; ignored")
                    continue
                found[key] = entry
        newest_first = sorted(found.values(), key=lambda e: version_key(e.version), reverse=True)
        return sorted(newest_first, key=lambda e: e.model_id)  # stable: versions stay newest first

    def _verified_card(self, path: Path) -> tuple[dict, str | None]:
        """The card of a bundle after the torch-free verification, and what is wrong with its ``refinement/``
        network (None: fine or absent); cached while its files and its refinement folder's are unchanged."""
        stamp = (path, *_stamps([path, path / CARD_NAME, path / WEIGHTS_NAME]), *_refinement_stamps(path))
        if stamp not in self._verified:
            card = read_bundle(path)[0]
            problem = None
            try:
                verify_companion(path)
            except IdealError as error:
                problem = str(error)
            self._verified[stamp] = (card, problem)
        return self._verified[stamp]

    def find(self, model_id: str, version: str | None = None) -> ModelEntry:
        """The model with this id (the highest version when ``version`` is None)."""
        entries = self.entries()
        matching = [e for e in entries if e.model_id == model_id]
        if not matching:
            installed = sorted({e.model_id for e in entries})
            raise IdealError(f"no model '{model_id}' is installed (installed: {', '.join(installed) or 'none'})")
        if version is None:
            return matching[0]  # entries() lists the newest version first
        for entry in matching:
            if entry.version == version:
                return entry
        raise IdealError(f"model '{model_id}' has no version {version} (installed: {', '.join(e.version for e in matching)})")

    def default(self) -> ModelEntry:
        """The default model (:func:`default_entry`); a clear error when none is installed."""
        entry = default_entry(self.entries())
        if entry is None:
            raise IdealError(
                f"no segmentation model is installed: put a model bundle folder (card.json + model.safetensors) into "
                f"{self.shipped_dir} or {self.user_dir}, or register a trained bundle (IDEALTrainer > Use this model)"
            )
        return entry

    # -- adding ---------------------------------------------------------------------------------
    def register(self, bundle_path: str | Path, version: str | None = None) -> ModelEntry:
        """Copy a trained bundle into the user folder as a NEW version; never replaces one.

        With ``version`` given, that version must be free (else an error). Without it the card's
        version is used, or, when that is taken, the next free patch version (1.0.0 -> 1.0.1 ...).
        The copy's card records the new version and where it came from; the bundle's ``refinement/``
        network comes along; it appears atomically.
        """
        source = Path(bundle_path)
        card, weights = read_bundle(source)  # refuses anything broken before a byte is copied
        if source.is_dir():
            try:
                verify_companion(source)  # a click-to-fix network that is not what it claims is never copied in
            except IdealError as error:
                raise IdealError(f"not registered: {error}") from None
        model_id, old_version = card["id"], card["version"]
        taken = {e.version for e in self.entries() if e.model_id == model_id}
        if version is not None:
            check_version(version)
            if version in taken:
                raise IdealError(f"model {model_id} version {version} is already installed; choose another version")
            new_version = version
        else:
            new_version = old_version
            while new_version in taken:
                new_version = next_patch_version(new_version)
        card["version"] = new_version
        card["registered_from"] = {"path": str(source.resolve()), "version": old_version}
        self._make_user_dir()
        target = self.user_dir / _folder_name(model_id, new_version)
        if target.exists():
            raise IdealError(f"{target} already exists; remove it or register under another version")
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=self.user_dir))
            staging.chmod(0o755)  # mkdtemp makes it owner-only; a model folder must be readable like any other
            (staging / WEIGHTS_NAME).write_bytes(weights)
            (staging / CARD_NAME).write_text(json.dumps(card, indent=2))
            if source.is_dir():
                copy_companion(source, staging)  # the model's click-to-fix network comes along, verified again
                for name, entry in companion_files(source).items():  # LICENSE.txt and notes come along too
                    shutil.copy2(entry, staging / name)
            read_bundle(staging)  # what was written is what was verified (a full disk can truncate silently)
            os.rename(staging, target)  # the whole folder appears at once, or not at all
        except OSError as error:  # a full disk: nothing half-copied stays behind
            raise IdealError(f"not registered: {os_error_message(target, error)}") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return ModelEntry(model_id, new_version, target, "user", card)

    def _make_user_dir(self) -> None:
        """Create the user model folder; a clear IdealError when the path is a file or cannot be made."""
        if self.user_dir.exists() and not self.user_dir.is_dir():
            raise IdealError(f"{self.user_dir}: the user model folder is a file, not a folder; choose another models folder")
        try:
            self.user_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IdealError(f"{self.user_dir}: cannot create the user model folder ({error.strerror or error})") from None


def default_entry(entries: list[ModelEntry]) -> ModelEntry | None:
    """The one default-model rule: the newest shipped default model, else the most recently created model."""
    shipped = [e for e in entries if e.model_id == DEFAULT_MODEL_ID and e.source == "shipped"]
    if shipped:
        return max(shipped, key=lambda e: version_key(e.version))
    if entries:
        return max(entries, key=lambda e: (str(e.card.get("created", "")), version_key(e.version)))
    return None


def select_entry(entries: list[ModelEntry], key: str) -> ModelEntry | None:
    """The entry whose ``<id>@<version>`` is ``key`` (the user's last choice), else the default."""
    return next((e for e in entries if entry_key(e) == key), None) or default_entry(entries)


def entry_key(entry: ModelEntry) -> str:
    """``<id>@<version>``: how a model choice is remembered (settings, parameter node)."""
    return f"{entry.model_id}@{entry.version}"


def _naming(path: Path, error: Exception) -> str:
    """An error message that names the bundle it is about."""
    text = str(error.strerror if isinstance(error, OSError) and error.strerror else error)
    return text if text.startswith(str(path)) else f"{path}: {text}"


def _folder_name(model_id: str, version: str) -> str:
    """A safe folder name ``<id>-<version>`` (other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{model_id}-{version}")


def _stamps(paths: list[Path]) -> list[int]:
    """Modification times (ns) of ``paths`` without following links; -1 for a missing one."""
    stamps = []
    for path in paths:
        try:
            stamps.append(os.lstat(path).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return stamps


def _refinement_stamps(path: Path) -> list:
    """What changes when a model's ``refinement/`` entry or any file in it changes (names and mtimes, not followed)."""
    folder = path / REFINEMENT_FOLDER
    if not os.path.lexists(folder):
        return []
    names = sorted(os.listdir(folder)) if folder.is_dir() and not folder.is_symlink() else []
    return [*_stamps([folder]), *names, *_stamps([folder / name for name in names])]


def _bundle_paths(folder: Path) -> list[Path]:
    """Candidate bundles in a models folder: sub-folders and .zip files, hidden ones skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() == ".zip"))


def resolve_model(spec: str | Path | None, registry: ModelRegistry | None = None, flag: str = "--model") -> Path:
    """The bundle path a ``--model`` (or ``--init-from``: ``flag``) value names: a folder or .zip path, a model id
    (``idealsegment-acdc``, newest version) or ``id@version``; None is the default model (:func:`default_entry`)."""
    registry = registry if registry is not None else ModelRegistry()
    if spec is None:
        return registry.default().path
    text = str(spec)
    if Path(text).exists():
        return Path(text)
    model_id, _, version = text.partition("@")
    looks_like_path = any(sep in text for sep in ("/", "\\")) or text.lower().endswith(".zip")
    if looks_like_path or not any(e.model_id == model_id for e in registry.entries()):
        installed = ", ".join(sorted({e.model_id for e in registry.entries()})) or "none"
        raise IdealError(
            f"{flag} {text}: no such bundle folder or .zip, and no installed model of that id "
            f"(installed: {installed}; see idealtrain bundle list)"
        )
    return registry.find(model_id, version or None).path
