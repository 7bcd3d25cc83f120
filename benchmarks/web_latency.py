"""How long the clinician waits in the browser: the web app (IDEALWeb) driven by headless Chromium through Playwright.

The shipped sample (an ED/ES pair, 12x256x256 each) and the shipped model on CPU, the app in a child process on
loopback, as ``idealsegment-web`` serves it. Each time runs from the browser event to the page showing
its result (waits are for page conditions, never fixed sleeps):

- Segment -> table: click *Segment* until the measurements table is on the page (a fresh *Open* each time);
- paint stroke -> Python voxel count: a brush stroke on the slice view until the page shows the voxel
  counts the Python side read back from the MRML segmentation (then *Undo edit*, which must restore them);
- click -> refined on screen: a positive LV click until the page says the refinement was applied
  (the correction network in the warm worker; the slice view re-renders in the same state flush),
  then *Undo last click*.

Median and max of each, with the load average before and after (other programs on these 2 cores slow
every figure).

    OMP_NUM_THREADS=1 python benchmarks/web_latency.py --out benchmarks/results/web_latency.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "IDEALSegment" / "Logic"), str(ROOT)]


def summary(times: list[float]) -> dict:
    return {"n": len(times), "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "all_s": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web_latency.json"))
    parser.add_argument("--segments", type=int, default=3, help="Segment -> table repeats")
    parser.add_argument("--strokes", type=int, default=5, help="paint stroke repeats")
    parser.add_argument("--clicks", type=int, default=5, help="click-to-fix repeats")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from playwright.sync_api import sync_playwright

    from IDEALWeb.testing import Server, browser_problem, launch_chromium

    problem = browser_problem()
    if problem:
        raise SystemExit(f"web_latency: {problem}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="web-latency-") as folder:
        (Path(folder) / "data").mkdir()
        server = Server(Path(folder) / "data", Path(folder) / "out")
        server.wait_ready()
        try:
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(server.url)
                page.click("#study-select", force=True)
                page.get_by_role("option").filter(has_text="Sample").first.click()

                segment = []
                for _ in range(args.segments):
                    page.click("#open-button")
                    page.wait_for_function("() => document.querySelector('#status').textContent.includes('Opened')", timeout=120_000)
                    start = time.perf_counter()
                    page.click("#segment-button")
                    page.wait_for_selector("#measurements .measurement-row", timeout=300_000)
                    segment.append(time.perf_counter() - start)

                page.click("#tab-edit")
                page.wait_for_function("() => Number(document.querySelector('#voxel-counts').dataset.total) > 0", timeout=60_000)
                box = page.locator("#views").bounding_box()
                cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                original = page.get_attribute("#voxel-counts", "data-counts")
                page.click("button:has(.mdi-brush)")
                stroke = []
                for index in range(args.strokes):
                    x, y = cx - 220 + 10 * index, cy + 120
                    page.mouse.move(x, y)
                    start = time.perf_counter()
                    page.mouse.down()
                    page.mouse.move(x + 80, y + 30, steps=12)
                    page.mouse.up()
                    page.wait_for_function(f"() => document.querySelector('#voxel-counts').dataset.counts !== {json.dumps(original)}", timeout=60_000)
                    stroke.append(time.perf_counter() - start)
                    page.click("#undo-edit-button")
                    page.wait_for_function(f"() => document.querySelector('#voxel-counts').dataset.counts === {json.dumps(original)}", timeout=60_000)

                page.click("button:has(.mdi-cursor-default)")
                page.click("#click-mode-button")
                click = []
                for _ in range(args.clicks):
                    start = time.perf_counter()
                    page.mouse.click(cx, cy + 30)
                    page.wait_for_function("() => document.querySelector('#refine-text').textContent.includes('refined with 1 click')", timeout=120_000)
                    click.append(time.perf_counter() - start)
                    page.click("#undo-click-button")
                    page.wait_for_function("() => document.querySelector('#refine-text').textContent.includes('undid click')", timeout=60_000)
                browser_version = browser.version
                browser.close()
        finally:
            server.stop()
    result = {
        "benchmark": "web_latency",
        "what": "browser event -> result on the page, headless Chromium via Playwright on loopback; shipped sample and model on CPU",
        "segment_to_table": summary(segment),
        "paint_stroke_to_python_voxel_count": summary(stroke),
        "click_to_refined_on_screen": summary(click),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "chromium": browser_version,
        "python": platform.python_version(),
        "command": "OMP_NUM_THREADS=1 python benchmarks/web_latency.py",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("segment_to_table", "paint_stroke_to_python_voxel_count", "click_to_refined_on_screen", "load_average_before")}, indent=1))


if __name__ == "__main__":
    main()
