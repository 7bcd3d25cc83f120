"""Model bundles: safetensors weights plus a JSON card, as a folder or a .zip of one.

Loading never unpickles anything, so a bundle from an untrusted source cannot run code; a
pickle-based checkpoint (``torch.save`` output) is refused before any of it is read as Python.
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
from ..io.atomic import atomic_path
from ..errors import IdealError
from ..labels import CARDIAC_LABELS, LabelInfo, check_label_map
from ..model.networks import NetworkConfig, SegmentationNetwork
from ..model.postprocessing import Postprocessing
from ..model.preprocessing import Preprocessing

CARD_NAME = "card.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLE_FORMAT = "idealsegment-bundle"
#: 2 added the optional ``postprocessing`` section: an older reader would ignore it and predict differently.
FORMAT_VERSION = 2
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
#: A segmentation model, or an encoder from contrastive pretraining (weights ``encoder.*`` only).
BUNDLE_KINDS = ("segmentation", "pretrained-encoder")


@dataclass
class Bundle:
    """A loaded (or about to be saved) model: card sections plus weights."""

    network: NetworkConfig
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
        with torch.device("meta"):
            expected = SegmentationNetwork(self.network).state_dict()
        if self.kind == "pretrained-encoder":
            expected = {name: t for name, t in expected.items() if name.startswith("encoder.")}
        missing = sorted(set(expected) - set(self.weights))
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


def save_bundle(bundle: Bundle, path: str | Path, *, half_precision: bool = False, overwrite: bool = False) -> Path:
    """Write ``bundle`` as a folder, or a .zip when ``path`` ends in .zip; atomically."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise IdealError(f"{path} already exists; choose another output or pass --overwrite")
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
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a model folder must be readable like any other
    try:
        (staging / CARD_NAME).write_text(card_text)
        (staging / WEIGHTS_NAME).write_bytes(data)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _read_bundle_files(path: Path) -> tuple[str, bytes]:
    """The card text and weights bytes of a folder or .zip bundle; refuses pickles unread."""
    if not path.exists():
        raise IdealError(f"{path}: no such model bundle")
    if path.is_dir():
        card_file, weights_file = path / CARD_NAME, path / WEIGHTS_NAME
        if not card_file.is_file():
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]
            hint = f" (found pickle-based file(s) {pickles}, which are never loaded)" if pickles else ""
            raise IdealError(f"{path}: not a model bundle: no {CARD_NAME}{hint}")
        if not weights_file.is_file():
            raise IdealError(f"{path}: bundle has no {WEIGHTS_NAME}")
        return card_file.read_text(), weights_file.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if CARD_NAME not in names or WEIGHTS_NAME not in names:
                if any(name.endswith((".pkl", "data.pkl")) for name in names):
                    raise IdealError(
                        f"{path}: is a pickle-based PyTorch checkpoint (torch.save); it is refused because "
                        "unpickling can run arbitrary code. Export the weights to a bundle (card.json + "
                        "model.safetensors) with trusted code first"
                    )
                raise IdealError(f"{path}: zip is not a model bundle (needs {CARD_NAME} and {WEIGHTS_NAME})")
            try:
                return archive.read(CARD_NAME).decode(), archive.read(WEIGHTS_NAME)
            except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as error:
                raise IdealError(f"{path}: corrupt bundle archive ({error})") from None
    head = path.read_bytes()[:2]
    if head[:1] == b"\x80" or path.suffix.lower() in _PICKLE_SUFFIXES:
        raise IdealError(
            f"{path}: looks like a pickle-based checkpoint; it is refused because unpickling can run "
            "arbitrary code. A model bundle is a folder or .zip with card.json and model.safetensors"
        )
    raise IdealError(f"{path}: not a model bundle (expected a folder or .zip with {CARD_NAME} and {WEIGHTS_NAME})")


def read_card(path: str | Path) -> dict:
    """The card of a bundle, checked for format (weights are not read)."""
    card_text, _ = _read_bundle_files(Path(path))
    return _parse_card(Path(path), card_text)


def _parse_card(path: Path, card_text: str) -> dict:
    try:
        card = json.loads(card_text)
    except json.JSONDecodeError as error:
        raise IdealError(f"{path}: {CARD_NAME} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        raise IdealError(f"{path}: {CARD_NAME} is not an IDEALSegment bundle card (format field missing or wrong)")
    if card.get("kind", "segmentation") not in BUNDLE_KINDS:
        raise IdealError(f"{path}: unknown bundle kind {card.get('kind')!r}; expected one of {BUNDLE_KINDS}")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise IdealError(f"{path}: bundle format {card['format_version']} is newer than this IDEALTrain supports ({FORMAT_VERSION})")
    for section in ("architecture", "labels", "preprocessing", "weights"):
        if section not in card:
            raise IdealError(f"{path}: {CARD_NAME} lacks the '{section}' section")
    return card


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle (checksum, label map, architecture); never executes stored code."""
    path = Path(path)
    card_text, data = _read_bundle_files(path)
    card = _parse_card(path, card_text)
    expected_sha = card["weights"].get("sha256", "")
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        raise IdealError(f"{path}: weights checksum does not match the card: the file is corrupt, truncated or replaced")
    try:
        weights = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise IdealError(f"{path}: {WEIGHTS_NAME} is not a valid safetensors file ({error})") from None
    network = NetworkConfig.from_json(card["architecture"])
    labels = tuple(LabelInfo.from_json(entry) for entry in card["labels"])
    check_label_map(labels, network.num_classes)
    bundle = Bundle(
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
    bundle.check_weights()  # fail now, with a clear message, if weights and card disagree
    return bundle
