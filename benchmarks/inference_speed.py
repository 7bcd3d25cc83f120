"""Inference speed: the predictor against a plain per-slice fp32 loop over the same network.

Each method runs in its own subprocess (so peak memory is its own) on the same 10x256x256 volume
and the same weights; labels must be identical. Writes JSON with a top-level ``speedup``
(loop seconds / predictor seconds).

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
    """A 10x256x256 phantom and a plan that feeds its slices to the network unresized."""
    from IDEALTrain.phantom import make_phantom
    from IDEALTrain.preprocessing import Preprocessing

    image, _ = make_phantom(0, size=SHAPE[::-1])
    return image, Preprocessing(inplane="size", size=SHAPE[1:])


def _bundle(model: str | None):
    import torch

    from IDEALTrain.bundle import Bundle, load_bundle
    from IDEALTrain.networks import NetworkConfig, SegmentationNetwork

    if model:
        return load_bundle(model)
    torch.manual_seed(0)
    config = NetworkConfig()
    _, plan = _volume()
    return Bundle(config, plan, SegmentationNetwork(config).state_dict())


def _plain_loop(bundle, network, image) -> np.ndarray:
    """The reference: eval-mode network, fp32, default memory format, one slice at a time."""
    import torch

    from IDEALTrain.preprocessing import SliceGrid

    grid = SliceGrid(image, bundle.preprocessing, bundle.network.size_multiple)
    slices = grid.image_to_network(image)
    labels = []
    with torch.no_grad():
        for x in slices:
            streams = [torch.softmax(logits, dim=1) for logits in network(x[None])]
            labels.append((sum(streams) / len(streams)).argmax(dim=1))
    return torch.cat(labels).numpy().astype(np.uint8)


def worker(method: str, model: str | None, repeats: int, labels_out: str) -> None:
    import torch

    from IDEALTrain.predictor import Predictor

    image, _ = _volume()
    bundle = _bundle(model)
    if method == "predictor":
        predictor = Predictor(bundle, device="cpu")
        run = lambda: predictor.predict(image).labels.array  # noqa: E731
    else:
        network = bundle.build_network()
        run = lambda: _plain_loop(bundle, network, image)  # noqa: E731
    labels = run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        labels = run()
        times.append(time.perf_counter() - start)
    np.save(labels_out, labels)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": statistics.median(times), "all_seconds": times, "peak_rss_mib": peak_mib, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/inference_speed.json")
    parser.add_argument("--model", help="bundle to time (default: the default architecture, seeded random weights)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=("predictor", "loop"), help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.repeats, args.labels_out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for method in ("loop", "predictor"):
            labels_path = str(Path(scratch) / f"{method}.npy")
            command = [sys.executable, __file__, "--worker", method, "--repeats", str(args.repeats), "--labels-out", labels_path]
            command += ["--model", args.model] if args.model else []
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(output.strip().splitlines()[-1])
            results[method]["labels"] = np.load(labels_path)
        loop_labels, predictor_labels = results["loop"].pop("labels"), results["predictor"].pop("labels")
    report = {
        "volume_shape": list(SHAPE),
        "model": args.model or "default architecture (base 16, 5 levels, unet+fpn decoders), seeded random weights",
        "device": "cpu",
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "plain_loop": results["loop"],
        "predictor": results["predictor"],
        "speedup": results["loop"]["seconds"] / results["predictor"]["seconds"],
        "labels_identical": bool(np.array_equal(loop_labels, predictor_labels)),
        "labels_equal_fraction": float((loop_labels == predictor_labels).mean()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
