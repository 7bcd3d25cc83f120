"""Model bundles: safetensors weights plus a JSON card, as a folder or a .zip of one.

Loading never unpickles anything, so a bundle from an untrusted source cannot run code; a
pickle-based checkpoint (``torch.save`` output) is refused before any of it is read as Python.
The torch-free checks (files, card, checksum) live in :mod:`.card`; this module adds the tensors.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import __version__
from ..errors import IdealError
from ..io.atomic import atomic_path
from ..io.output_guard import is_bundle, os_error_message, publish, signals_held, temp_prefix
from ..labels import CARDIAC_LABELS, LabelInfo, check_label_map
from .card import (
    BUNDLE_FORMAT,
    BUNDLE_KINDS,
    CARD_NAME,
    FORMAT_VERSION,
    REFINEMENT_FOLDER,
    WEIGHTS_NAME,
    companion_files,
    copy_companion,
    read_card,
    read_verified,
)
from .networks import NetworkConfig, SegmentationNetwork
from .postprocessing import Postprocessing
from .preprocessing import Preprocessing
from .refinement_network import RefinementConfig, RefinementNetwork

#: The public API; the file names, card checks and ``read_card`` come from the torch-free :mod:`.card`.
__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_KINDS", "CARD_NAME", "FORMAT_VERSION", "WEIGHTS_NAME",
    "Bundle", "load_bundle", "read_card", "save_bundle",
]


@dataclass
class Bundle:
    """A loaded (or about to be saved) model: card sections plus weights."""

    network: NetworkConfig | RefinementConfig  # RefinementConfig for kind "refinement"
    preprocessing: Preprocessing
    weights: dict[str, torch.Tensor]
    labels: tuple[LabelInfo, ...] = CARDIAC_LABELS
    model_id: str = "idealsegment-model"
    version: str = "0.0.0"
    description: str = ""
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    licence: str = "unspecified"
    created: str = ""
    kind: str = "segmentation"
    postprocessing: Postprocessing = field(default_factory=Postprocessing)

    def card(self, weights_sha256: str = "", weights_dtype: str = "float32") -> dict:
        """The JSON card describing this bundle."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "id": self.model_id,
            "version": self.version,
            "description": self.description,
            "created": self.created or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": __version__,
            "architecture": self.network.to_json(),
            "labels": [label.to_json() for label in self.labels],
            "preprocessing": self.preprocessing.to_json(),
            "postprocessing": self.postprocessing.to_json(),
            "training": self.training,
            "validation": self.validation,
            "licence": self.licence,
            "weights": {"file": WEIGHTS_NAME, "sha256": weights_sha256, "dtype": weights_dtype},
        }

    def check_weights(self) -> None:
        """Refuse weights that do not fit the card's architecture (names and shapes)."""
        network_class = RefinementNetwork if self.kind == "refinement" else SegmentationNetwork
        with torch.device("meta"):
            expected = network_class(self.network).state_dict()
        required = set(expected)
        if self.kind == "pretrained-encoder":  # the encoder, and the decoder blocks that decoder pretraining trained
            required = {name for name in expected if name.startswith("encoder.")}
            expected = {name: t for name, t in expected.items() if name in required or name in self.weights}
        missing = sorted(required - set(self.weights))
        unexpected = sorted(set(self.weights) - set(expected))
        if missing or unexpected:
            raise IdealError(
                f"weights do not match the card's architecture: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for name, tensor in self.weights.items():
            if tensor.shape != expected[name].shape:
                raise IdealError(f"weight {name} has shape {tuple(tensor.shape)}, the card's architecture needs {tuple(expected[name].shape)}")

    def build_network(self) -> SegmentationNetwork:
        """The network with this bundle's weights loaded, in eval mode."""
        if self.kind != "segmentation":
            raise IdealError(f"model {self.model_id} is a {self.kind} bundle, not a segmentation model: finetune it first")
        self.check_weights()
        network = SegmentationNetwork(self.network)
        network.load_state_dict(self.weights)
        return network.eval()

    def build_refinement_network(self) -> RefinementNetwork:
        """The click-conditioned correction network of a ``refinement`` bundle, in eval mode."""
        if self.kind != "refinement":
            raise IdealError(f"model {self.model_id} is a {self.kind} bundle, not a refinement network")
        self.check_weights()
        network = RefinementNetwork(self.network)
        network.load_state_dict(self.weights)
        return network.eval()


def save_bundle(
    bundle: Bundle,
    path: str | Path,
    *,
    half_precision: bool = False,
    overwrite: bool = False,
    companions_from: str | Path | None = None,
    files_from: str | Path | None = None,
) -> Path:
    """Write ``bundle`` as a folder, or a .zip when ``path`` ends in .zip; atomically.

    ``companions_from``: a model folder whose ``refinement/`` network is copied, verified
    (:func:`~.card.copy_companion`), into the new folder bundle in the same atomic step. ``files_from``: a bundle
    folder whose plain files (``LICENSE.txt``, notes: :func:`~.card.companion_files`) travel with the new bundle,
    a .zip included."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise IdealError(f"{path} already exists; choose another output or pass --overwrite")
    if path.exists() and not is_bundle(path):  # --overwrite replaces what this tool wrote, never any folder
        raise IdealError(f"{path} exists and is not a model bundle; it is not replaced: choose another output")
    if companions_from is not None and path.suffix.lower() == ".zip":
        raise IdealError(f"{path}: a .zip bundle cannot hold the {REFINEMENT_FOLDER}/ network of {companions_from}; save it as a folder")
    files = companion_files(files_from)
    weights = {name: t.detach().cpu().contiguous() for name, t in bundle.weights.items()}
    if half_precision:
        weights = {name: t.half() if t.is_floating_point() else t for name, t in weights.items()}
    data = save_safetensors(weights)
    card = bundle.card(hashlib.sha256(data).hexdigest(), "float16" if half_precision else "float32")
    card_text = json.dumps(card, indent=2)
    if path.suffix.lower() == ".zip":
        with atomic_path(path) as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(CARD_NAME, card_text)
            archive.writestr(WEIGHTS_NAME, data)
            for name, source in files.items():
                archive.write(source, name)
        return path
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a model folder must be readable like any other
        (staging / CARD_NAME).write_text(card_text)
        (staging / WEIGHTS_NAME).write_bytes(data)
        for name, source in files.items():
            shutil.copy2(source, staging / name)
        if companions_from is not None:
            copy_companion(companions_from, staging)
        with signals_held():
            publish(staging, path, overwrite)  # the old bundle is moved aside, never deleted first
    except OSError as error:  # a full disk included: the old bundle (if any) stays
        raise IdealError(os_error_message(path, error)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle (checksum, label map, architecture); never executes stored code."""
    path = Path(path)
    card, data = read_verified(path)
    try:
        weights = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise IdealError(f"{path}: {WEIGHTS_NAME} is not a valid safetensors file ({error})") from None
    try:
        bundle = _bundle_from_card(card, weights)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise IdealError(f"{path}: {CARD_NAME} has an unusable field ({type(error).__name__}: {error})") from None
    except IdealError as error:  # e.g. an invalid label map: say which bundle
        raise IdealError(f"{path}: {error}") from None
    bundle.check_weights()  # fail now, with a clear message, if weights and card disagree
    return bundle


def _bundle_from_card(card: dict, weights: dict) -> Bundle:
    """A Bundle from a checked card; a field of the wrong type raises KeyError, TypeError or ValueError."""
    config_class = RefinementConfig if card.get("kind") == "refinement" else NetworkConfig
    network = config_class.from_json(card["architecture"])
    labels = tuple(LabelInfo.from_json(entry) for entry in card["labels"])
    check_label_map(labels, network.num_classes)
    for field_name in ("id", "version", "description", "licence", "created"):
        if not isinstance(card.get(field_name, ""), str):
            raise TypeError(f"'{field_name}' must be text, not {type(card[field_name]).__name__}")
    return Bundle(
        network=network,
        preprocessing=Preprocessing.from_json(card["preprocessing"]),
        weights={name: t.float() if t.is_floating_point() else t for name, t in weights.items()},
        labels=labels,
        model_id=card.get("id", "unnamed"),
        version=card.get("version", "0.0.0"),
        description=card.get("description", ""),
        training=card.get("training", {}),
        validation=card.get("validation", {}),
        licence=card.get("licence", "unspecified"),
        created=card.get("created", ""),
        kind=card.get("kind", "segmentation"),
        postprocessing=Postprocessing.from_json(card.get("postprocessing", {})),
    )
