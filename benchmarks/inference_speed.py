"""Inference speed: the predictor against a plain per-slice fp32 loop over the same network.

Both methods run on the same 10x256x256 phantom volume and the same weights, timed interleaved in
one process (median of the repeats); each then runs alone in a fresh process for its peak resident
memory. Labels must be identical. Writes JSON with a top-level ``speedup`` (loop seconds /
predictor seconds).

    python benchmarks/inference_speed.py --out benchmarks/results/inference_speed.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (10, 256, 256)


def _volume():
    """A 10x256x256 phantom and a plan that feeds its slices to the network unresized.

    The phantom is generated once and cached as a file, so a memory worker's peak is inference,
    not phantom generation.
    """
    from IDEALTrain.io.phantom import make_phantom
    from IDEALTrain.io.volume_files import read_image, write_image
    from IDEALTrain.model.preprocessing import Preprocessing

    cached = Path(tempfile.gettempdir()) / "idealsegment-benchmark-phantom-10x256x256.nii.gz"
    if not cached.exists():
        write_image(make_phantom(0, size=SHAPE[::-1])[0], cached)
    return read_image(cached), Preprocessing(inplane="size", size=SHAPE[1:])


def _bundle(model: str | None):
    import torch

    from IDEALTrain.model.bundle import Bundle, load_bundle
    from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork

    if model:
        return load_bundle(model)
    torch.manual_seed(0)
    config = NetworkConfig()
    _, plan = _volume()
    return Bundle(config, plan, SegmentationNetwork(config).state_dict())


def _plain_loop(bundle, network, image) -> np.ndarray:
    """The reference: eval-mode network, fp32, default memory format, one slice at a time."""
    import torch

    from IDEALTrain.model.preprocessing import SliceGrid

    grid = SliceGrid(image, bundle.preprocessing, bundle.network.size_multiple)
    slices = grid.image_to_network(image)
    probabilities = []
    with torch.no_grad():
        for x in slices:
            streams = [torch.softmax(logits, dim=1) for logits in network(x[None])]
            probabilities.append(sum(streams) / len(streams))
    return grid.network_to_volume(torch.cat(probabilities)).argmax(axis=0).astype(np.uint8)


def _method(name: str, model: str | None):
    """One method as a zero-argument callable returning labels (same volume and weights for both)."""
    from IDEALTrain.inference.predictor import Predictor

    image, _ = _volume()
    bundle = _bundle(model)
    if name == "predictor":
        predictor = Predictor(bundle, device="cpu")
        return lambda: predictor.predict(image).labels.array
    network = bundle.build_network()
    return lambda: _plain_loop(bundle, network, image)


def peak_memory_worker(method: str, model: str | None) -> None:
    """Run one method alone (after a warm-up) and print this process's peak resident memory."""
    run = _method(method, model)
    run()
    run()
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/inference_speed.json")
    parser.add_argument("--model", help="bundle to time (default: the default architecture, seeded random weights)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory-worker", choices=("predictor", "plain_loop"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        peak_memory_worker(args.memory_worker, args.model)
        return
    # Each method alone in a fresh process, started while this one is still small: Linux children
    # inherit the parent's peak resident size, so a late start would report the parent's peak.
    peaks = {}
    for name in ("plain_loop", "predictor"):
        command = [sys.executable, __file__, "--memory-worker", name] + (["--model", args.model] if args.model else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[name] = json.loads(output.strip().splitlines()[-1])["peak_rss_mib"]
    import torch

    methods = {name: _method(name, args.model) for name in ("plain_loop", "predictor")}
    labels = {name: run() for name, run in methods.items()}  # warm-up, and the labels to compare
    times = {name: [] for name in methods}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    results = {name: {"seconds": statistics.median(t), "min_seconds": min(t), "all_seconds": t} for name, t in times.items()}
    for name, peak in peaks.items():
        results[name]["peak_rss_mib"] = peak
    report = {
        "volume_shape": list(SHAPE),
        "model": args.model or "default architecture (base 16, 5 levels, unet+fpn decoders), seeded random weights",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "plain_loop": results["plain_loop"],
        "predictor": results["predictor"],
        "speedup": results["plain_loop"]["seconds"] / results["predictor"]["seconds"],
        "labels_identical": bool(np.array_equal(labels["plain_loop"], labels["predictor"])),
        "labels_equal_fraction": float((labels["plain_loop"] == labels["predictor"]).mean()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
