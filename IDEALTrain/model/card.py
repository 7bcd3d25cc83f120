"""The torch-free half of a model bundle: its file names, card checks and weight verification.

Slicer's process lists and verifies models with this module alone, so it never imports torch:
the card (format, kind, version, sections), the weights' SHA-256 against the card and the
safetensors header are all checked from bytes. :mod:`.bundle` adds what needs torch (reading the
tensors, checking them against the architecture, building the network). Nothing here unpickles:
a pickle-based checkpoint is refused before any of it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

from ..errors import IdealError

CARD_NAME = "card.json"
WEIGHTS_NAME = "model.safetensors"
#: Folder, inside a segmentation bundle folder, of the refinement bundle trained on that model's probabilities.
REFINEMENT_FOLDER = "refinement"
BUNDLE_FORMAT = "idealsegment-bundle"
#: 2 added the optional ``postprocessing`` section: an older reader would ignore it and predict differently.
FORMAT_VERSION = 2
#: A segmentation model, an encoder from contrastive pretraining (weights ``encoder.*`` only), or a
#: click-conditioned correction network trained on a segmentation model's probabilities.
BUNDLE_KINDS = ("segmentation", "pretrained-encoder", "refinement")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_bundle_files(path: Path) -> tuple[str, bytes]:
    """The card text and weights bytes of a folder or .zip bundle; refuses pickles unread."""
    if not path.exists():
        raise IdealError(f"{path}: no such model bundle")
    if path.is_dir():
        card_file, weights_file = path / CARD_NAME, path / WEIGHTS_NAME
        if not card_file.is_file():
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            hint = f" (found pickle-based file(s) {pickles}, which are never loaded)" if pickles else ""
            raise IdealError(f"{path}: not a model bundle: no {CARD_NAME}{hint}")
        if not weights_file.is_file():
            raise IdealError(f"{path}: bundle has no {WEIGHTS_NAME}")
        try:
            return card_file.read_text(encoding="utf-8"), weights_file.read_bytes()
        except UnicodeDecodeError as error:
            raise IdealError(f"{path}: {CARD_NAME} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if zipfile.is_zipfile(path):
        return _zip_files(path)
    head = path.read_bytes()[:2]
    if head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES:
        raise IdealError(
            f"{path}: looks like a pickle-based checkpoint; it is refused because unpickling can run "
            "arbitrary code. A model bundle is a folder or .zip with card.json and model.safetensors"
        )
    raise IdealError(f"{path}: not a model bundle (expected a folder or .zip with {CARD_NAME} and {WEIGHTS_NAME})")


def _zip_files(path: Path) -> tuple[str, bytes]:
    """The card text and weights bytes of a .zip bundle; a torch.save archive is named as such."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if CARD_NAME not in names or WEIGHTS_NAME not in names:
                if any(name.endswith(".pkl") for name in names):
                    raise IdealError(
                        f"{path}: is a pickle-based PyTorch checkpoint (torch.save); it is refused because "
                        "unpickling can run arbitrary code. Export the weights to a bundle (card.json + "
                        "model.safetensors) with trusted code first"
                    )
                raise IdealError(f"{path}: zip is not a model bundle (needs {CARD_NAME} and {WEIGHTS_NAME})")
            return archive.read(CARD_NAME).decode("utf-8"), archive.read(WEIGHTS_NAME)
    except UnicodeDecodeError as error:
        raise IdealError(f"{path}: {CARD_NAME} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
        raise IdealError(f"{path}: corrupt bundle archive ({error})") from None


def parse_card(path: Path, card_text: str) -> dict:
    """The card as a dict, checked for format, kind, format version and required sections."""
    try:
        card = json.loads(card_text)
    except json.JSONDecodeError as error:
        raise IdealError(f"{path}: {CARD_NAME} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        raise IdealError(f"{path}: {CARD_NAME} is not an IDEALSegment bundle card (format field missing or wrong)")
    if card.get("kind", "segmentation") not in BUNDLE_KINDS:
        raise IdealError(f"{path}: unknown bundle kind {card.get('kind')!r}; expected one of {BUNDLE_KINDS}")
    version = card.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise IdealError(f"{path}: {CARD_NAME} has a format_version that is not a whole number: {version!r}")
    if version > FORMAT_VERSION:
        raise IdealError(f"{path}: bundle format {version} is newer than this IDEALTrain supports ({FORMAT_VERSION})")
    for section in ("architecture", "labels", "preprocessing", "weights"):
        if section not in card:
            raise IdealError(f"{path}: {CARD_NAME} lacks the '{section}' section")
    return card


def read_card(path: str | Path) -> dict:
    """The card of a bundle, checked for format (weights are not read or verified)."""
    card_text, _ = read_bundle_files(Path(path))
    return parse_card(Path(path), card_text)


def verify_weights(path: Path, card: dict, data: bytes) -> None:
    """Refuse weights that do not match the card's SHA-256 or are no well-formed safetensors file."""
    expected = card["weights"].get("sha256") if isinstance(card.get("weights"), dict) else None
    if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
        raise IdealError(f"{path}: {CARD_NAME} records no valid weights checksum (sha256), so the weights cannot be verified")
    if hashlib.sha256(data).hexdigest() != expected:
        raise IdealError(f"{path}: weights checksum does not match the card: the file is corrupt, truncated or replaced")
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise IdealError(f"{path}: {WEIGHTS_NAME} is not a valid safetensors file") from None
    if not ends or max(ends) != len(data) - 8 - length:
        raise IdealError(f"{path}: {WEIGHTS_NAME} is not a valid safetensors file (its tensors do not fill the file)")


def read_verified(path: str | Path) -> tuple[dict, bytes]:
    """(card, weights bytes) of a bundle whose card format and weights checksum are verified."""
    path = Path(path)
    card_text, data = read_bundle_files(path)
    card = parse_card(path, card_text)
    verify_weights(path, card, data)
    return card, data


# -- companion networks (a model folder's refinement/) ---------------------------------------------------------------
#: Most entries a companion folder may hold (a bundle holds two or three files; a huge tree is no bundle).
COMPANION_MAX_ENTRIES = 64


def bundle_fingerprint(path: str | Path, companion: bool = True) -> str:
    """SHA-256 of a bundle's card text and verified weights (and, with ``companion``, of its verified
    ``refinement/``): what a cache of loaded networks is keyed on, so a bundle changed in place is never used
    from memory."""
    path = Path(path)
    card_text, data = read_bundle_files(path)
    card = parse_card(path, card_text)
    verify_weights(path, card, data)  # the weights' SHA-256 is now the card's
    digest = hashlib.sha256(card_text.encode("utf-8"))
    digest.update(card["weights"]["sha256"].encode())
    if companion and path.is_dir():
        digest.update((verify_companion(path) or "no refinement network").encode())
    return digest.hexdigest()


def companion_entry(bundle: Path, name: str = REFINEMENT_FOLDER) -> Path | None:
    """``bundle/name`` when there is such an entry (a folder, a file, a dangling or looping link), else None."""
    entry = Path(bundle) / name
    return entry if os.path.lexists(entry) else None


def verify_companion(bundle: str | Path, name: str = REFINEMENT_FOLDER) -> str | None:
    """Verify a model folder's companion network (``refinement/``); its card's weights SHA-256, None without one.

    The companion must be a folder inside the bundle holding a refinement bundle whose checksum matches its
    card and whose labels are the model's; no pickle-based file, nothing but plain files and folders, and no
    symbolic link that leaves the bundle, loops or points at a folder. Anything else is an IdealError naming it."""
    bundle = Path(bundle)
    entry = companion_entry(bundle, name)
    if entry is None:
        return None
    root = _resolved(bundle, bundle)
    where = f"{bundle}: {name}/"
    if entry.is_symlink():
        target = _resolved(entry, bundle, f"{name}/")
        if not target.is_dir() or root not in target.parents:
            raise IdealError(f"{where} is a symbolic link to {target}, outside the model folder; replace it with the folder itself")
    if not entry.is_dir():
        raise IdealError(f"{where} is not a folder (a refinement bundle is a folder with {CARD_NAME} and {WEIGHTS_NAME}); remove it or put the network there")
    count = 0
    for folder, subfolders, files in os.walk(entry):
        for item in [*subfolders, *files]:
            count += 1
            if count > COMPANION_MAX_ENTRIES:
                raise IdealError(f"{where} holds more than {COMPANION_MAX_ENTRIES} entries; a refinement bundle is {CARD_NAME} and {WEIGHTS_NAME}")
            _check_companion_item(Path(folder) / item, entry, root, bundle)
    card_text, data = read_bundle_files(entry)
    card = parse_card(entry, card_text)
    verify_weights(entry, card, data)
    if card.get("kind") != "refinement":
        raise IdealError(f"{where} holds a {card.get('kind', 'segmentation')} bundle, not a refinement network")
    model_card = _folder_card(bundle)
    if model_card is not None and _label_values(card) != _label_values(model_card):
        raise IdealError(
            f"{where} was made for labels {_label_values(card)}, the model has {_label_values(model_card)}; "
            "train a refinement network for this model (idealtrain train-refiner)"
        )
    return card["weights"]["sha256"]


def _check_companion_item(item: Path, entry: Path, root: Path, bundle: Path) -> None:
    """One entry of a companion folder: a plain file or folder, or a link to a plain file inside the bundle; no pickle."""
    inside = item.relative_to(entry).as_posix()
    where = f"{bundle}: {entry.name}/"
    if item.suffix.lower() in PICKLE_SUFFIXES:
        raise IdealError(f"{where} holds the pickle-based file {inside}, which can run code when loaded; remove it")
    if item.is_symlink():
        target = _resolved(item, bundle, f"{entry.name}/{inside}")
        if root not in target.parents or not target.is_file():
            raise IdealError(f"{where}{inside} is a symbolic link to {target}, outside the model folder or not a file; remove it")
    elif not (item.is_file() or item.is_dir()):
        raise IdealError(f"{where}{inside} is not a plain file or folder; remove it")


def _resolved(path: Path, bundle: Path, shown: str | None = None) -> Path:
    """``path`` with every symbolic link followed; a loop or a dangling link is an IdealError naming the bundle
    and ``shown`` (the path as the message shows it, default its name)."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop on Python < 3.13
        reason = getattr(error, "strerror", None) or str(error)
        raise IdealError(f"{bundle}: {shown or path.name} is a broken or looping symbolic link ({reason}); remove it") from None


def _folder_card(bundle: Path) -> dict | None:
    """The card of a folder bundle (its weights are not read), None without one."""
    try:
        return parse_card(bundle, (bundle / CARD_NAME).read_text(encoding="utf-8")) if (bundle / CARD_NAME).is_file() else None
    except UnicodeDecodeError as error:
        raise IdealError(f"{bundle}: {CARD_NAME} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _label_values(card: dict) -> list:
    labels = card.get("labels")
    values = [entry.get("value") for entry in labels if isinstance(entry, dict)] if isinstance(labels, list) else []
    return sorted(values, key=str)  # any JSON values: a hostile card is a mismatch, not a TypeError


def copy_companion(bundle: str | Path, destination: str | Path, name: str = REFINEMENT_FOLDER) -> bool:
    """Copy a verified companion (:func:`verify_companion`) into the folder ``destination`` (a bundle being
    staged), then verify the copy; False when ``bundle`` has none. Links inside the bundle are copied as files."""
    bundle, destination = Path(bundle), Path(destination)
    if verify_companion(bundle, name) is None:
        return False
    try:
        shutil.copytree((bundle / name).resolve(), destination / name, symlinks=False)
    except shutil.Error as error:  # copytree gathers every failed file: report the first reason in one line
        reason = error.args[0][0][2] if error.args and isinstance(error.args[0], list) and error.args[0] else str(error)
        raise IdealError(f"{destination}: could not copy {name}/ ({reason})") from None
    card_text, data = read_bundle_files(destination / name)
    verify_weights(destination / name, parse_card(destination / name, card_text), data)  # the copy is what was verified
    return True
