"""Click-conditioned correction network (experiment, issue 19): a DeepEdit-style refinement engine.

A compact 2D U-Net takes, per short-axis slice, the normalised image, the shipped model's class
probabilities (the draft prior, 4 channels) and click guidance (a positive and a negative map per
structure: a Gaussian of sigma ``GUIDE_SIGMA`` px at each click, 6 channels) and predicts corrected
4-class logits as a residual on the log prior (its last layer starts at zero: it starts as the draft).

It is trained on ACDC training slices (``train_slices.list``, never ``val.list``) with simulated
clicks: the draft is the shipped model's prediction or a corrupted one (eroded / dilated / removed /
shifted structures, false blobs), and 1-3 clicks follow the click simulator's rule (interior point of
the largest 2D error region; positive on a miss, negative on a false region), each click's region then
counting as fixed for the next one, plus occasional random interior clicks.

As an engine (:class:`GuidedEngine`, the ``refine_engines`` signature) it runs on a window around the
slice's clicks and keeps the draft outside the click disks; every clicked voxel ends as its click says.
Not shipped: ``benchmarks/interactive.py --engine guided --guided-weights PATH`` registers it.

    IDEAL_DATA=../shared/data python benchmarks/guided_refiner.py prepare --cache /tmp/h19g
    IDEAL_DATA=../shared/data python benchmarks/guided_refiner.py train --cache /tmp/h19g --minutes 35
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from IDEALTrain.inference.refine_engines import (  # noqa: E402
    LEVEL_BLOB_DEPTH,
    SliceClick,
    _component_at,
    _depth_inside,
    _finish,
    click_region,
    draft_prior,
)
from IDEALTrain.model.networks import ConvBlock  # noqa: E402

NUM_CLASSES = 4
GUIDE_SIGMA = 2.0  # px: a click's guidance blob
BASE, DEPTH = 16, 4
CONTEXT_PX = 24  # the engine's window: the click disks' box plus this much context on each side
STORED, CROP = 128, 96  # training: slices are stored as 128 px crops around the heart, drawn as 96 px crops
RADIUS_PX = 20  # the benchmark's ACDC reach (voxel units)
LOG_FLOOR = 1e-3


class GuidedNet(nn.Module):
    """Compact U-Net: image (1) + prior (4) + guidance (6) in, logits = log prior + a learnt correction out."""

    def __init__(self, base: int = BASE, depth: int = DEPTH) -> None:
        super().__init__()
        channels = [base * 2**level for level in range(depth)]
        self.down = nn.ModuleList([ConvBlock(1 + NUM_CLASSES + 6, channels[0])])
        self.down.extend(ConvBlock(channels[n - 1], channels[n]) for n in range(1, depth))
        self.reduce = nn.ModuleList(nn.Conv2d(channels[n], channels[n - 1], 1) for n in range(depth - 1, 0, -1))
        self.up = nn.ModuleList(ConvBlock(2 * channels[n - 1], channels[n - 1]) for n in range(depth - 1, 0, -1))
        self.head = nn.Conv2d(channels[0], NUM_CLASSES, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, image: torch.Tensor, prior: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        features = [self.down[0](torch.cat([image, prior, guidance], dim=1))]
        for level in self.down[1:]:
            features.append(level(F.max_pool2d(features[-1], 2)))
        x = features[-1]
        for reduce, block, skip in zip(self.reduce, self.up, reversed(features[:-1])):
            x = F.interpolate(reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return torch.log(prior.clamp_min(LOG_FLOOR)) + self.head(x).float()


def guidance_maps(shape: tuple[int, int], clicks: list[SliceClick], offset=(0, 0)) -> np.ndarray:
    """(6, H, W): for structures 1-3 a positive then a negative map, the max of a Gaussian at each click."""
    maps = np.zeros((6, *shape), np.float32)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    for click in clicks:
        r, c = click.voxel[0] - offset[0], click.voxel[1] - offset[1]
        blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * GUIDE_SIGMA**2)).astype(np.float32)
        channel = 2 * (click.label - 1) + (0 if click.positive else 1)
        np.maximum(maps[channel], blob, out=maps[channel])
    return maps


class GuidedEngine:
    """The network as a refinement engine (``refine_engines`` signature)."""

    def __init__(self, weights: str | Path, blob: bool = False) -> None:
        """``blob``: also the shipped levelset's blob deletion (a negative click deep in a blob deletes it)."""
        from safetensors.torch import load_file

        self.blob = blob
        self.network = GuidedNet()
        self.network.load_state_dict(load_file(str(weights)))
        self.network.eval()

    @torch.inference_mode()
    def __call__(self, image, probabilities, draft, clicks, spacing, radius_mm) -> np.ndarray:
        box, near = click_region(draft.shape, clicks, spacing, radius_mm)
        m = self.network.multiple
        window = []
        for axis, part in enumerate(box):
            start, stop = max(0, part.start - CONTEXT_PX), min(draft.shape[axis], part.stop + CONTEXT_PX)
            window.append(slice(start, stop))
        window = tuple(window)
        prior = draft_prior(probabilities[(slice(None), *window)], draft[window])
        guide = guidance_maps(prior.shape[1:], clicks, (window[0].start, window[1].start))
        height, width = prior.shape[1:]
        pad = (0, -width % m, 0, -height % m)
        tensors = [torch.from_numpy(a)[None] for a in (image[window][None].astype(np.float32), prior, guide)]
        tensors = [F.pad(t, pad, mode="replicate") for t in tensors]
        logits = self.network(*tensors)[0, :, :height, :width]
        probs = torch.softmax(logits, 0).numpy()
        inner = (slice(None), *(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, window)))
        if not (self.blob and any(not c.positive for c in clicks)):
            return _finish(draft, box, near, probs.argmax(axis=0)[inner[1:]], probs[inner], clicks)
        # levelset's rule: a negative click at least LEVEL_BLOB_DEPTH as deep as its blob's deepest point deletes it
        whole = draft_prior(probabilities, draft)
        whole[(slice(None), *box)] = probs[inner]
        labels, reach = draft.copy(), np.zeros(draft.shape, bool)
        labels[box] = np.where(near, probs.argmax(axis=0)[inner[1:]], draft[box])
        reach[box] = near
        for click in clicks:
            if click.positive or draft[click.voxel] != click.label:
                continue
            blob = _component_at(draft == click.label, click.voxel)
            depth = _depth_inside(blob, spacing)
            if depth[click.voxel] >= LEVEL_BLOB_DEPTH * depth.max():
                others = whole.copy()
                others[click.label] = -1.0
                labels[blob] = others.argmax(axis=0)[blob]
                reach |= blob
        everywhere = (slice(0, draft.shape[0]), slice(0, draft.shape[1]))
        return _finish(draft, everywhere, reach, labels, whole, clicks)


# ---------------------------------------------------------------- training data


def prepare(data: Path, cache: Path) -> None:
    """Shipped model's probabilities and labels for every training slice, as 128 px crops around the heart."""
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.ssl4mis import list_cases, read_case
    from IDEALTrain.model.preprocessing import normalise_slices

    predictor = Predictor(ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0", "cpu")
    val = {n.strip() for n in (data / "acdc" / "val.list").read_text().split()}
    images, priors, drafts, labels = [], [], [], []
    start = time.perf_counter()
    for n, case in enumerate(list_cases(data / "acdc", "train_slices.list")):
        assert case.name.rsplit("_slice", 1)[0] not in val, case.name  # never a validation volume
        image, label = read_case(case)
        prediction = predictor.predict(image)
        normalised = normalise_slices(image.array, predictor.bundle.preprocessing.percentiles)[0]
        reference = label.array[0]
        heart = np.argwhere(reference > 0)
        centre = heart.mean(axis=0).astype(int) if len(heart) else np.array(reference.shape) // 2
        half = STORED // 2
        crops = []
        for array in (normalised[None], prediction.probabilities[:, 0], prediction.labels.array, reference[None]):
            padded = np.pad(array, ((0, 0), (half, half), (half, half)))
            crops.append(padded[:, centre[0] : centre[0] + STORED, centre[1] : centre[1] + STORED])
        images.append(crops[0][0].astype(np.float16))
        priors.append(crops[1].astype(np.float16))
        drafts.append(crops[2][0].astype(np.uint8))
        labels.append(crops[3][0].astype(np.uint8))
        if n % 200 == 0:
            print(n, case.name, f"{time.perf_counter() - start:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / "train.npz", image=np.stack(images), prior=np.stack(priors), draft=np.stack(drafts),
             label=np.stack(labels))


def _disk(shape, centre, radius) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def corrupt(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A harder draft: one structure eroded / dilated / removed / shifted, or a false blob."""
    out = labels.copy()
    present = [s for s in (1, 2, 3) if (labels == s).any()]
    kind = rng.choice(["erode", "dilate", "remove", "shift", "blob"], p=[0.25, 0.25, 0.15, 0.15, 0.2])
    if kind == "blob" or not present:
        heart = np.argwhere(labels > 0)
        centre = heart[rng.integers(len(heart))] if len(heart) else np.array(labels.shape) // 2
        centre = centre + rng.integers(-15, 16, 2)
        blob = _disk(labels.shape, centre, rng.uniform(3, 10))
        if rng.random() < 0.5:  # over the background only
            blob &= out == 0
        out[blob] = rng.integers(1, 4)
        return out
    s = int(rng.choice(present))
    mask = labels == s
    steps = int(rng.integers(1, 5))
    if kind == "erode":
        lost = mask & ~ndimage.binary_erosion(mask, iterations=steps)
        if rng.random() < 0.5 and lost.any():  # only part of the rim
            lost &= _disk(labels.shape, np.argwhere(lost)[rng.integers(lost.sum())], rng.uniform(6, 20))
        around = ndimage.grey_dilation(np.where(mask, 0, labels), size=2 * steps + 3)
        out[lost] = around[lost]
    elif kind == "dilate":
        grown = ndimage.binary_dilation(mask, iterations=steps) & ~mask
        if rng.random() < 0.5 and grown.any():
            grown &= _disk(labels.shape, np.argwhere(grown)[rng.integers(grown.sum())], rng.uniform(6, 20))
        out[grown] = s
    elif kind == "remove":
        out[mask] = 2 if s == 3 and rng.random() < 0.5 else 0
    else:
        shift = rng.integers(-4, 5, 2)
        moved = np.roll(mask, tuple(shift), axis=(0, 1))
        out[mask & ~moved] = 0
        out[moved] = s
    return out


def simulate_clicks(draft, reference, rng, radius=RADIUS_PX) -> list[SliceClick]:
    """1-3 clicks by the benchmark's rule on the 2D errors; each clicked region then counts as fixed."""
    current, clicks = draft.copy(), []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.35, 0.35, 0.3]))):
        structures = [s for s in (1, 2, 3) if ((current == s) != (reference == s)).any()]
        if not structures or rng.random() < 0.08:  # a random interior click where nothing is wrong
            s = int(rng.integers(1, 4))
            inside = ndimage.binary_erosion(reference == s, iterations=2)
            if inside.any():
                at = tuple(np.argwhere(inside)[rng.integers(inside.sum())])
                clicks.append(SliceClick(at, s, True))
            continue
        s = int(rng.choice(structures))
        best = None
        for positive, error in ((True, (reference == s) & (current != s)), (False, (current == s) & (reference != s))):
            components, count = ndimage.label(error)
            if count:
                sizes = np.bincount(components.ravel())[1:]
                k = int(np.argmax(sizes)) if rng.random() < 0.85 else int(rng.integers(count))
                if best is None or sizes[k] > best[0]:
                    best = (sizes[k], components == k + 1, positive)
        _, region, positive = best
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        at = np.unravel_index(int(np.argmax(depth)), depth.shape) if rng.random() < 0.85 else tuple(
            np.argwhere(region)[rng.integers(region.sum())]
        )
        clicks.append(SliceClick(tuple(int(v) for v in at), s, positive))
        fixed = region & _disk(current.shape, at, radius)
        current[fixed] = reference[fixed]
    return clicks


def make_sample(data: dict, index: int, rng: np.random.Generator):
    """Image, prior, guidance, reference and loss weight of one augmented training crop."""
    r0, c0 = rng.integers(0, STORED - CROP + 1, 2)
    crop = (slice(r0, r0 + CROP), slice(c0, c0 + CROP))
    image = data["image"][index][crop].astype(np.float32)
    prior = data["prior"][index][(slice(None), *crop)].astype(np.float32)
    draft, reference = data["draft"][index][crop], data["label"][index][crop]
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    image, draft, reference = (np.rot90(a, k) for a in (image, draft, reference))
    prior = np.rot90(prior, k, axes=(1, 2))
    if flip:
        image, draft, reference, prior = image[:, ::-1], draft[:, ::-1], reference[:, ::-1], prior[:, :, ::-1]
    image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.6:  # a harder draft, with softened probabilities that agree with it
        base = reference if rng.random() < 0.5 else draft
        bad = corrupt(base, rng)
        if rng.random() < 0.3:
            bad = corrupt(bad, rng)
        onehot = np.eye(NUM_CLASSES, dtype=np.float32)[bad].transpose(2, 0, 1)
        onehot = ndimage.gaussian_filter(onehot, (0, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)))
        w = rng.uniform(0.1, 0.45)
        prior = (1 - w) * onehot + w * prior
        draft = prior.argmax(axis=0).astype(np.uint8)
    prior = draft_prior(np.ascontiguousarray(prior), np.ascontiguousarray(draft))
    clicks = simulate_clicks(np.ascontiguousarray(draft), np.ascontiguousarray(reference), rng)
    guide = guidance_maps(draft.shape, clicks)
    weight = np.ones(draft.shape, np.float32)
    if clicks:
        _, near = click_region(draft.shape, clicks, (1.0, 1.0), RADIUS_PX)
        full = np.zeros(draft.shape, bool)
        box, _ = click_region(draft.shape, clicks, (1.0, 1.0), RADIUS_PX)
        full[box] = near
        weight += 3.0 * full
    return image[None].copy(), prior, guide, reference.astype(np.int64).copy(), weight


def train(cache: Path, minutes: float, batch: int, seed: int, lr: float, resume: Path | None = None) -> None:
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    loaded = np.load(cache / "train.npz")
    data = {k: loaded[k] for k in loaded.files}
    network = GuidedNet()
    if resume is not None:  # continue from saved weights (a fresh optimiser)
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(resume)))
    print("parameters", sum(p.numel() for p in network.parameters()), "slices", len(data["image"]), flush=True)
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    start, step, log = time.perf_counter(), 0, []
    budget = minutes * 60
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimiser.param_groups:  # cosine over the time budget
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(1.0, elapsed / budget)))
        samples = [make_sample(data, int(rng.integers(len(data["image"]))), rng) for _ in range(batch)]
        image, prior, guide, reference, weight = (torch.from_numpy(np.stack(parts)) for parts in zip(*samples))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = network(image, prior, guide)
        loss = (F.cross_entropy(logits.float(), reference, reduction="none") * weight).sum() / weight.sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        log.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"step {step} {elapsed:.0f}s loss {np.mean(log[-50:]):.4f}", flush=True)
        if step % 200 == 0:
            save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(cache / "guided.safetensors"))
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(cache / "guided.safetensors"))
    summary = {"steps": step, "batch": batch, "seconds": round(time.perf_counter() - start)}
    summary["loss_last200"] = float(np.mean(log[-200:]))
    (cache / "train_log.json").write_text(json.dumps({**summary, "loss": log}))
    print(summary, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "train"))
    default_data = Path(os.environ.get("IDEAL_DATA", ROOT.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "guided_refiner", help="cached probabilities and weights")
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, default=None, help="train: start from these weights")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.command == "prepare":
        prepare(args.data, args.cache)
    else:
        train(args.cache, args.minutes, args.batch, args.seed, args.lr, args.resume)


if __name__ == "__main__":
    main()
