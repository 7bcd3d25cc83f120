"""Whole-volume inference driven by a bundle: volume in, labels on exactly the input's grid out.

The bundle's preprocessing plan decides normalisation and in-plane resampling, its postprocessing
plan what is done to the label map; the caller only chooses a device. With two decoders the prediction is their mean and their disagreement (total
variation distance between the two class distributions, 0-1) is a per-voxel uncertainty map.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import IdealError
from ..io.image import Image
from ..model.bundle import Bundle, load_bundle
from ..model.networks import fold_batch_norm
from ..model.preprocessing import SliceGrid, check_volume

ProgressCallback = Callable[[int, int], None]


@dataclass
class Prediction:
    """The predictor's output, all on the input image's grid."""

    labels: Image  # argmax of the probabilities, then the bundle's postprocessing
    probabilities: np.ndarray  # (C, k, j, i) float32, mean over decoders
    uncertainty: Image | None  # float32 in [0, 1]; None with a single decoder
    device: str
    seconds: float


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable CUDA request is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IdealError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IdealError(f"device {name} requested but no CUDA GPU is available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise IdealError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


class Predictor:
    """Segments volumes with one bundle; keeps the network on its device between calls."""

    def __init__(self, bundle: Bundle | str | Path, device: str = "auto", batch_size: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.source = None if isinstance(bundle, Bundle) else Path(bundle)  # the bundle's file or folder
        self.device = resolve_device(device)
        # One slice at a time keeps activations in cache on CPU; GPUs want big batches.
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 1)
        self.network = fold_batch_norm(self.bundle.build_network())
        self._place(self.device)

    def _place(self, device: torch.device) -> None:
        self.device = device
        self.network.to(device=device, memory_format=torch.channels_last)

    def predict(self, image: Image, progress: ProgressCallback | None = None) -> Prediction:
        """Segment one 3D volume; see :class:`Prediction`."""
        check_volume(image)
        start = time.perf_counter()
        grid = SliceGrid(image, self.bundle.preprocessing, self.bundle.network.size_multiple)
        slices = grid.image_to_network(image)
        mean, disagreement = self._run_with_fallback(slices, progress)
        probabilities = grid.network_to_volume(mean)
        labels = image.with_array(self.bundle.postprocessing.apply(probabilities.argmax(axis=0).astype(np.uint8)))
        uncertainty = None
        if disagreement is not None:
            uncertainty = image.with_array(grid.network_to_volume(disagreement[:, None])[0].astype(np.float32))
        return Prediction(labels, probabilities.astype(np.float32, copy=False), uncertainty, str(self.device), time.perf_counter() - start)

    def _run_with_fallback(self, slices: torch.Tensor, progress: ProgressCallback | None):
        while True:
            try:
                return self._run(slices, progress)
            except torch.OutOfMemoryError:
                if self.device.type != "cuda":
                    raise
                torch.cuda.empty_cache()
                if self.batch_size > 1:
                    self.batch_size //= 2
                    warnings.warn(f"CUDA out of memory: retrying with batch size {self.batch_size}")
                else:
                    warnings.warn("CUDA out of memory even one slice at a time: continuing on the CPU")
                    self._place(torch.device("cpu"))

    def _run(self, slices: torch.Tensor, progress: ProgressCallback | None):
        """Mean class probabilities (S, C, H, W) and decoder disagreement (S, H, W) or None."""
        batches = torch.split(slices, self.batch_size)
        means, disagreements = [], []
        with _slice_workers(self.device) as run_all:
            for done, (mean, disagreement) in enumerate(run_all(self._infer, batches), start=1):
                means.append(mean)
                if disagreement is not None:
                    disagreements.append(disagreement)
                if progress is not None:
                    progress(min(done * self.batch_size, len(slices)), len(slices))
        return torch.cat(means), (torch.cat(disagreements) if disagreements else None)

    @torch.inference_mode()
    def _infer(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = self.device.type == "cuda"
        batch = batch.to(self.device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            logits = self.network(batch)
        streams = [torch.softmax(stream.float(), dim=1) for stream in logits]
        mean = (sum(streams) / len(streams)).cpu()
        if len(streams) == 1:
            return mean, None
        return mean, (0.5 * (streams[0] - streams[1]).abs().sum(dim=1)).cpu()


@contextlib.contextmanager
def _slice_workers(device: torch.device) -> Iterator[Callable]:
    """How batches are mapped: in order on a GPU; on a CPU one single-threaded worker per core.

    Small 2D convolutions are memory-bound and scale poorly across threads, so running
    different slices side by side is faster than splitting each convolution; the process's
    torch thread count is restored afterwards.
    """
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers < 2:
        yield map
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(workers)
