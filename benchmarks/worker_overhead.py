"""What running the network in a child process costs the Slicer panel, against predicting in Slicer's process.

A 10x256x256 short-axis phantom as a real MRML volume node (slicer-core), the shipped default model, CPU:

- in-process, warm: ``segment_volume`` with an already loaded predictor (the best case of the old
  in-process design: prediction plus adding the nodes);
- out-of-process, as the panel does on Segment: ``SegmentationJob`` start -> poll every 50 ms ->
  ``add_results`` (writing the input, the warm worker process -- started when the panel opened,
  torch already imported -- loading the model and predicting, writing and reading the label and
  uncertainty files, adding the nodes);
- overhead = out-of-process - in-process warm, per repeat; the median is reported against the
  2 s target. For reference, the same with a fresh ``python -m IDEALTrain segment`` process per
  click (no warm worker: Python start and the torch import are paid on every click).

    OMP_NUM_THREADS=1 IDEAL_DATA=../shared/data python benchmarks/worker_overhead.py --out benchmarks/results/worker_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "IDEALSegment"), str(ROOT)]
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"
TARGET_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "worker_overhead.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import slicer
    import torch
    from IDEALSegmentLib.inference import segment_volume
    from IDEALSegmentLib.jobs import TrainingJob
    from IDEALSegmentLib.registry import ModelRegistry
    from IDEALSegmentLib.segment_job import SegmentationJob, SegmentInputs
    from IDEALSegmentLib.volumes import volume_from_image
    from IDEALSegmentLib.worker import WorkerJob, acquire

    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.phantom import make_phantom

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    entry = ModelRegistry(user_dir=ROOT / "no-user-models").find("idealsegment-acdc")
    image, _ = make_phantom(3, size=(256, 256, 10), spacing=(1.4, 1.4, 8.0))
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(image, scene, "phantom 10x256x256")
    predictor = Predictor(DEFAULT_MODEL, device="cpu")
    segment_volume(volume, predictor)  # warm-up (first-call allocations)

    worker = acquire()  # the panel starts it when it opens; wait until torch is imported there
    while worker.lines.get(timeout=120).get("event") != "ready":
        pass
    worker.busy = False

    def out_of_process(fresh_process: bool) -> tuple[float, float]:
        start = time.perf_counter()
        job = SegmentationJob(SegmentInputs(volume), entry, device="cpu", with_uncertainty=True)
        job.start(job_class=TrainingJob if fresh_process else WorkerJob)
        while job.poll() == "running":
            time.sleep(0.05)
        if job.state != "done":
            raise SystemExit(f"the child failed: {job.error}")
        outcome = job.add_results()
        return time.perf_counter() - start, outcome.seconds

    rows = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        segment_volume(volume, predictor, with_uncertainty=True)
        in_process = time.perf_counter() - start
        warm, child_predict = out_of_process(fresh_process=False)
        fresh, _ = out_of_process(fresh_process=True)
        rows.append({
            "repeat": repeat, "in_process_warm_s": round(in_process, 3), "out_of_process_s": round(warm, 3),
            "child_predict_s": round(child_predict, 3), "overhead_s": round(warm - in_process, 3),
            "fresh_process_s": round(fresh, 3), "fresh_process_overhead_s": round(fresh - in_process, 3),
        })
        print(rows[-1], flush=True)

    overhead = statistics.median(row["overhead_s"] for row in rows)
    result = {
        "what": "out-of-process segmentation (panel path) vs in-process prediction with a loaded predictor",
        "volume": "phantom 10x256x256 (k, j, i), 1.4x1.4x8 mm, MRML volume node on slicer-core",
        "model": f"{entry.model_id} {entry.version}",
        "device": "cpu",
        "threads": int(os.environ["OMP_NUM_THREADS"]),
        "repeats": rows,
        "median_in_process_warm_s": statistics.median(row["in_process_warm_s"] for row in rows),
        "median_out_of_process_s": statistics.median(row["out_of_process_s"] for row in rows),
        "median_overhead_s": round(overhead, 3),
        "median_fresh_process_overhead_s": statistics.median(row["fresh_process_overhead_s"] for row in rows),
        "target_s": TARGET_S,
        "meets_target": overhead < TARGET_S,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()]},
        "command": "OMP_NUM_THREADS=1 python benchmarks/worker_overhead.py --out benchmarks/results/worker_overhead.json",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in (
        "median_in_process_warm_s", "median_out_of_process_s", "median_overhead_s", "median_fresh_process_overhead_s", "meets_target",
    )}))


if __name__ == "__main__":
    main()
