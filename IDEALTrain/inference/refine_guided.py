"""The ``guided`` refinement engine: the click-conditioned correction network of a ``refinement`` bundle.

The network (:mod:`IDEALTrain.model.refinement_network`) runs on a window around the slice's clicks (their
reach plus the network's context); its labels are taken only within ``radius_mm`` of a click, the draft
stays everywhere else, and every clicked voxel ends as its click says. With ``blob_deletion`` a negative
click deep inside a blob deletes all of it, the level-set engine's rule (:func:`.refine_engines.levelset`).
A network with adjacent guidance also runs on the slices next to a clicked one, with that click as a soft
click (:func:`.refine_propagation.adjacent_clicks`): it changes them only where it sees the same error.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model.bundle import Bundle
from ..model.refinement_network import slice_guidance
from .refine_engines import SliceClick, _finish, click_region, deleted_blob, draft_prior


class GuidedEngine:
    """A refinement bundle's network as an engine (the ``refine_engines`` signature)."""

    def __init__(self, bundle: Bundle, blob_deletion: bool = True) -> None:
        self.network = bundle.build_refinement_network()
        self.config = bundle.network
        self.blob_deletion = blob_deletion

    @torch.inference_mode()
    def __call__(
        self,
        image: np.ndarray,
        probabilities: np.ndarray,
        draft: np.ndarray,
        clicks: list[SliceClick],
        spacing: tuple[float, float],
        radius_mm: float,
    ) -> np.ndarray:
        box, near = click_region(draft.shape, clicks, spacing, radius_mm)
        context = self.config.context_px
        window = tuple(
            slice(max(0, part.start - context), min(draft.shape[axis], part.stop + context))
            for axis, part in enumerate(box)
        )
        probs = self._probabilities(image[window], draft_prior(probabilities[(slice(None), *window)], draft[window]),
                                    clicks, (window[0].start, window[1].start))
        inner = (slice(None), *(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, window)))
        proposed = probs.argmax(axis=0)[inner[1:]]
        deletions = [
            c for c in clicks if self.blob_deletion and not (c.positive or c.soft) and draft[c.voxel] == c.label
        ]
        if not deletions:
            return _finish(draft, box, near, proposed, probs[inner], clicks)
        whole = draft_prior(probabilities, draft)
        whole[(slice(None), *box)] = probs[inner]
        labels, reach = draft.copy(), np.zeros(draft.shape, bool)
        labels[box] = np.where(near, proposed, draft[box])
        reach[box] = near
        for click in deletions:
            blob = deleted_blob(draft, click.voxel, click.label, spacing)
            if blob is not None:
                others = whole.copy()
                others[click.label] = -1.0
                labels[blob] = others.argmax(axis=0)[blob]
                reach |= blob
        everywhere = (slice(0, draft.shape[0]), slice(0, draft.shape[1]))
        return _finish(draft, everywhere, reach, labels, whole, clicks)

    def _probabilities(self, image: np.ndarray, prior: np.ndarray, clicks: list[SliceClick], corner) -> np.ndarray:
        """The network's class probabilities (C, H, W) on a window whose top-left voxel is ``corner``."""
        guide = slice_guidance(prior.shape[1:], clicks, self.config, corner)
        height, width = prior.shape[1:]
        multiple = self.config.size_multiple
        pad = (0, -width % multiple, 0, -height % multiple)
        inputs = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None] for a in (image[None], prior, guide)]
        inputs = [F.pad(t, pad, mode="replicate") for t in inputs]
        logits = self.network(*inputs)[0, :, :height, :width]
        return torch.softmax(logits, 0).numpy()
