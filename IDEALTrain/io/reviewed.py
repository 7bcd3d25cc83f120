"""What a clinician reviewed on a case: which structures, on which slices (no Slicer: the Logic and the CLI share it).

The default marking compares the corrected labels with the model's own output (:func:`edited_regions`):
a structure counts as edited only where the clinician changed *it* — drew it where the model had
something else, or erased it to background. Voxels of a structure that another segment was painted
over are that other segment's edit (painting the myocardium over 55 RV voxels does not make the RV
reviewed). Each edited structure counts on the slices where it was edited (:func:`default_reviewed`).
"""
from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import IdealError
from ..labels import CARDIAC_LABELS
from .image import Image


def check_slices(reviewed: Sequence[int] | None, image: Image) -> list[int] | None:
    """Sorted unique slice indices along the image's slice axis, checked against its size."""
    if reviewed is None:
        return None
    count = image.array.shape[image.slice_axis]
    slices = []
    for index in reviewed:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise IdealError(f"reviewed slice {index!r} is not a slice index (an integer)")
        if not 0 <= int(index) < count:
            raise IdealError(f"reviewed slice {index} is outside the volume's {count} slices (0-{count - 1})")
        slices.append(int(index))
    return sorted(set(slices))


def parse_slices(text: str) -> list[int]:
    """``"2-5,8"`` -> [2, 3, 4, 5, 8] (what the panel and the CLI accept for reviewed slices)."""
    slices: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            start, stop = int(first), int(last) if dash else int(first)
        except ValueError:
            raise IdealError(f"reviewed slices {text!r}: {part!r} is not a slice number or a range like 2-7") from None
        if stop < start:
            raise IdealError(f"reviewed slices {text!r}: the range {part!r} runs backwards")
        slices += range(start, stop + 1)
    return sorted(set(slices))


def format_slices(slices: Sequence[int]) -> str:
    """[2, 3, 4, 5, 8] -> ``"2-5,8"`` (the inverse of :func:`parse_slices`)."""
    runs: list[list[int]] = []
    for k in sorted(set(int(s) for s in slices)):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _values() -> dict[str, int]:
    return {label.segment_id: label.value for label in CARDIAC_LABELS}


def reviewed_regions(
    labels: Image, structures: Sequence[str] | Mapping[str, Sequence[int]], slices: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """Segment ID -> reviewed slices: a mapping is taken as given; a list of IDs means each one on every
    slice where the labels have it (only among ``slices`` when given)."""
    values = _values()
    unknown = [name for name in structures if name not in values]
    if unknown:
        raise IdealError(f"unknown structure(s) {unknown}: reviewed structures are segment IDs {', '.join(values)}")
    if isinstance(structures, Mapping):
        return {name: check_slices(list(ks), labels) for name, ks in structures.items() if ks}
    axis = labels.slice_axis
    other = tuple(a for a in range(3) if a != axis)
    allowed = None if slices is None else set(check_slices(slices, labels))
    result = {}
    for name in structures:
        present = np.flatnonzero((labels.array == values[name]).any(axis=other))
        chosen = [int(k) for k in present if allowed is None or int(k) in allowed]
        if chosen:
            result[name] = chosen
    return result


def edited_regions(model_output: np.ndarray, labels: Image) -> dict[str, list[int]]:
    """Segment ID -> slices where the clinician deliberately changed that structure (structures never edited are absent).

    Deliberate: the structure now covers voxels the model gave to something else, or voxels the
    model gave it became background. A structure's voxels taken over by another segment are not
    an edit of it (the other segment was painted over it).
    """
    old, new = np.asarray(model_output), labels.array
    if old.shape != new.shape:
        raise IdealError(f"the model's output has shape {old.shape} but the corrected labels {new.shape}: not the same image")
    axis = labels.slice_axis
    other = tuple(a for a in range(3) if a != axis)
    result = {}
    for name, value in _values().items():
        changed = ((new == value) & (old != value)) | ((old == value) & (new == 0))
        slices = np.flatnonzero(changed.any(axis=other))
        if slices.size:
            result[name] = [int(k) for k in slices]
    return result


def default_reviewed(model_output: np.ndarray, labels: Image, slices: Sequence[int] | None = None) -> dict[str, list[int]]:
    """The default marking: each structure the clinician edited, on the slices where they edited *it*.

    A slice where only the LV was redrawn does not make the myocardium there reviewed (the expert may
    never have looked at it). ``slices`` (the clinician's adjustment in the panel, or ``--slices``)
    replaces the edited slices: each edited structure then counts on those slices where it is drawn.
    """
    edited = edited_regions(model_output, labels)
    if slices is None:
        return edited
    return reviewed_regions(labels, list(edited), slices)


def describe_reviewed(reviewed: Mapping[str, Sequence[int]]) -> str:
    """What will be taught, in one line: ``LV on slices 2-9; LV_Myocardium on slices 3-8; RV not reviewed``."""
    names = {label.segment_id: label.name for label in CARDIAC_LABELS}
    parts = [f"{names.get(k, k)} on slice(s) {format_slices(v)}" for k, v in reviewed.items() if v]
    if not parts:
        return "nothing to teach: no structure was edited or ticked (tick the structures you reviewed)"
    missing = [names[k] for k in names if not reviewed.get(k)]
    return "; ".join(parts + ([f"not reviewed (not taught): {', '.join(missing)}"] if missing else []))


def encode_labels(array: np.ndarray) -> str:
    """A label array as compact text (zlib + base64 with its shape) that a node attribute or a JSON file can keep."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return json.dumps({"shape": list(array.shape), "zlib": base64.b64encode(zlib.compress(array.tobytes(), 6)).decode("ascii")})


def decode_labels(text: str) -> np.ndarray:
    """The array :func:`encode_labels` wrote (IdealError for anything else)."""
    try:
        data = json.loads(text)
        return np.frombuffer(zlib.decompress(base64.b64decode(data["zlib"])), dtype=np.uint8).reshape(data["shape"]).copy()
    except (ValueError, KeyError, TypeError, zlib.error) as error:
        raise IdealError(f"the recorded model output is unreadable ({type(error).__name__}): mark the reviewed structures by hand") from None
