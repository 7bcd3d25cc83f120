"""Test-time adaptation engine: the two decoders learn the clicks for a few steps, cross pseudo-labels hold the rest.

IDEAL's own consistency used at the point of care: per clicked slice, the encoder features are
computed once; copies of the decoders take ``TTA_STEPS`` Adam steps on a window of the features
around the clicks, with a cross-entropy pulling small disks at the clicks towards the click's
class (positive) or away from it (negative), while each decoder's initial hard prediction
supervises the other decoder everywhere else. The adapted decoders' mean probabilities replace the
prior on that slice; :func:`~.refine_engines.finish_from_probabilities` keeps the change local.
Weights always restart from the bundle's, so the result depends only on the draft and the clicks.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ..io.image import Image
from ..model.preprocessing import SliceGrid
from .predictor import Predictor
from .refine_engines import SliceClick

TTA_STEPS = 8
TTA_LEARNING_RATE = 2e-3
TTA_CLICK_RADIUS_PX = 2.0  # on the network grid
TTA_CONSISTENCY = 1.0
WINDOW = 64  # network pixels around the clicks (a multiple of the network's size multiple)


class DecoderAdapter:
    """Adapts copies of a predictor's decoders to the clicks of one slice; keeps the network input per image."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self._image_id: int | None = None

    def _prepare(self, image: Image) -> None:
        if self._image_id != id(image):
            bundle = self.predictor.bundle
            self.grid = SliceGrid(image, bundle.preprocessing, bundle.network.size_multiple)
            self.slices = self.grid.image_to_network(image)
            self._image_id = id(image)

    def _to_network(self, voxel: tuple[int, int]) -> tuple[float, float]:
        """In-plane volume voxel (row, column) to continuous network-grid pixel."""
        scale = [r / n for r, n in zip(self.grid.resized, self.grid.inplane_shape)]
        return tuple((v + 0.5) * s - 0.5 + p for v, s, p in zip(voxel, scale, self.grid.padding))

    def slice_probabilities(self, image: Image, index: int, clicks: list[SliceClick]) -> np.ndarray:
        """Class probabilities (C, rows, columns) of slice ``index`` after adapting to its clicks."""
        self._prepare(image)
        network, device = self.predictor.network, self.predictor.device
        x = self.slices[index : index + 1].to(device).contiguous(memory_format=torch.channels_last)
        points = [self._to_network(c.voxel) for c in clicks]
        height, width = self.grid.network_shape
        multiple = self.predictor.bundle.network.size_multiple
        window = [min(WINDOW, height), min(WINDOW, width)]
        centre = np.mean(points, axis=0)
        top = int(np.clip(round((centre[0] - window[0] / 2) / multiple) * multiple, 0, height - window[0]))
        left = int(np.clip(round((centre[1] - window[1] / 2) / multiple) * multiple, 0, width - window[1]))
        with torch.no_grad():
            full = network.encoder(x)
            features = [
                f[..., top // 2**n : (top + window[0]) // 2**n, left // 2**n : (left + window[1]) // 2**n]
                for n, f in enumerate(full)
            ]
            full_probabilities = sum(torch.softmax(d(full).float(), 1) for d in network.decoders) / len(
                network.decoders
            )
        decoders = [copy.deepcopy(d).train(False) for d in network.decoders]
        with torch.no_grad():
            pseudo = [d(features).argmax(1) for d in decoders]
        rows, cols = torch.meshgrid(torch.arange(window[0]) + top, torch.arange(window[1]) + left, indexing="ij")
        disks, keep = [], torch.ones(window, dtype=torch.bool)
        for click, (r, c) in zip(clicks, points):
            disk = ((rows - r) ** 2 + (cols - c) ** 2 <= TTA_CLICK_RADIUS_PX**2).to(device)
            disks.append((click, disk))
            keep &= ~disk.cpu()
        keep = keep.to(device)
        parameters = [p for d in decoders for p in d.parameters()]
        optimiser = torch.optim.Adam(parameters, lr=TTA_LEARNING_RATE)
        with torch.enable_grad():
            for _ in range(TTA_STEPS):
                optimiser.zero_grad(set_to_none=True)
                loss = 0.0
                for n, decoder in enumerate(decoders):
                    log_p = F.log_softmax(decoder(features).float(), 1)[0]
                    other = pseudo[1 - n] if len(decoders) == 2 else pseudo[n]
                    consistency = F.nll_loss(log_p[None], other, reduction="none")[0]
                    loss = loss + TTA_CONSISTENCY * consistency[keep].mean()
                    for click, disk in disks:
                        if click.positive:
                            loss = loss - log_p[click.label][disk].mean()
                        else:
                            loss = loss - torch.log1p(-log_p[click.label][disk].exp().clamp(max=1 - 1e-4)).mean()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            adapted = sum(torch.softmax(d(features).float(), 1) for d in decoders) / len(decoders)
        probabilities = full_probabilities.clone()
        probabilities[..., top : top + window[0], left : left + window[1]] = adapted
        volume = self.grid.network_to_volume(probabilities.cpu())  # (C, 1 along the slice axis, ...)
        return np.take(volume, 0, axis=1 + self.grid.slice_axis)
