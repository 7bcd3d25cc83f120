"""The postprocessing plan a bundle carries (the ``postprocessing`` card section) and its one step.

Off by default, so a bundle without the section predicts exactly as before. With
``largest_heart_component`` the predictor keeps only the largest 3D connected component of the
heart (all foreground labels together, 26-connected): stray islands far from the heart, the usual
failure at the base and in neighbouring organs, are removed, while a myocardium ring that opens at
the base stays whole because the heart is taken as one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import SimpleITK as sitk

from ..errors import IdealError


@dataclass(frozen=True)
class Postprocessing:
    """What the predictor does to the label map after the network's argmax."""

    largest_heart_component: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Postprocessing:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise IdealError(f"unknown postprocessing field(s) {unknown}; this bundle needs a newer IDEALTrain")
        return cls(**{name: bool(value) for name, value in data.items()})

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """The label map (k, j, i) after this plan; a new array, the input is left as it is."""
        labels = labels.copy()
        if self.largest_heart_component:
            labels[~largest_component(labels > 0)] = 0
        return labels


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean volume (all False when it is empty)."""
    if not mask.any():
        return mask.copy()
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    return sitk.GetArrayFromImage(sitk.RelabelComponent(components, sortByObjectSize=True)) == 1
