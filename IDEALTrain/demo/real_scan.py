"""The README's first run: segment the shipped real cine MRI with the shipped model and compare with the expert.

Reads the sample's DICOM folder as a user would (one series, two cardiac phases, the whole 12-slice
stack of each), segments both phases and measures the whole heart as the Slicer module does
(IDEALTrain's SCMR convention, which also picks ED and ES, and its QC flags), and compares with the
expert's contours: LV EDV, ESV, EF and myocardial mass, and the LV Dice on the 9 slices the expert
drew. Writes the segmentations (``.seg.nrrd``, for Slicer), the expert's labels the same way, and
overlay PNGs (expert | model) of a mid-ventricular and a basal slice at ED and ES. Seconds on a CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import IdealError
from ..evaluation.function import measure_function
from ..evaluation.metrics import cardiac_function, dice
from ..evaluation.overlay import overlay_rgb, save_png
from ..inference.predictor import Predictor
from ..io.atomic import atomic_path
from ..io.image import Image
from ..io.sample_data import Sample, default_model_dir, load_sample
from ..io.sunnybrook import LV_BLOOD_POOL, LV_MYOCARDIUM, read_sunnybrook_patient
from ..io.volume_files import read_frames, write_image
from ..labels import CARDIAC_LABELS

RESULTS_FILE = "results.json"
FIGURES = (("lv_edv_ml", "LV EDV (ml)"), ("lv_esv_ml", "LV ESV (ml)"), ("lv_ef_percent", "LV EF (%)"),
           ("myocardial_mass_g", "LV mass (g)"))
EXPERT_LABELS = tuple(label for label in CARDIAC_LABELS if label.value in (LV_MYOCARDIUM, LV_BLOOD_POOL))
CROP_MARGIN = 24  # pixels around the expert's LV in the overlay crops
ZOOM = 2  # overlay pixels per image pixel


def check_output_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse a non-empty folder that is not a previous demo's output, and a previous demo's output without
    ``overwrite``: the demo never overwrites files unasked."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RESULTS_FILE).is_file())):
        raise IdealError(f"{out} exists and is not a previous demo's output folder: choose another --out")
    if (out / RESULTS_FILE).is_file() and not overwrite:
        raise IdealError(f"{out} holds a previous demo's results: pass --overwrite to replace them, or choose another --out")


def run_sample_demo(
    out: Path, model: Path | None = None, sample_root: Path | None = None, device: str = "auto", overwrite: bool = False
) -> dict:
    """Segment the sample, write segmentations, overlays and ``results.json``, print the comparison; return the results."""
    started = time.perf_counter()
    out = Path(out)
    check_output_folder(out, overwrite)
    sample = load_sample(sample_root)
    predictor = Predictor(Path(model) if model else default_model_dir(), device=device)
    frames = read_frames(sample.dicom_dir)  # the folder as a user loads it: one volume per cardiac phase
    predictions = [predictor.predict(frame) for frame in frames]
    report = measure_function([p.labels for p in predictions], [p.uncertainty for p in predictions])
    phases = {"ED": int(report.measurements["ed_frame"]), "ES": int(report.measurements["es_frame"])}
    experts = {phase.phase: phase for phase in read_sunnybrook_patient(sample.root, sample.patient)}

    results: dict = {"sample": sample.patient, "description": sample.description, "device": predictions[0].device,
                     "model": {"id": predictor.bundle.model_id, "version": predictor.bundle.version},
                     "seconds_per_volume": [round(p.seconds, 2) for p in predictions], "phases": {}}
    labels: dict[str, tuple[Image, Image]] = {}
    for name, index in phases.items():
        expert = experts[name]
        rows = _expert_rows(frames[index], expert.image, name, sample)
        predicted = expert.image.with_array(np.take(predictions[index].labels.array, rows, axis=frames[index].slice_axis))
        labels[name] = (predicted, expert.label)  # the model on the expert's slices
        # "frame": the phase's number in the patient's full cine (what a viewer of that cine shows); "sample_frame":
        # its place among the sample's two phases
        cine_frame = (sample.cine_frames or {}).get(name, index)
        results["phases"][name] = {"frame": cine_frame, "sample_frame": index, "expert_slices": rows, **_dice_scores(predicted, expert)}
    for name, index in phases.items():  # written only once every check has passed
        write_image(predictions[index].labels, out / f"{sample.patient}_{name}.seg.nrrd", predictor.bundle.labels)
        write_image(labels[name][1], out / f"{sample.patient}_{name}_expert.seg.nrrd", EXPERT_LABELS)
        # the model on the expert's slices and grid: `idealtrain score` on this pair gives the demo's Dice
        write_image(labels[name][0], out / f"{sample.patient}_{name}_on_expert_slices.seg.nrrd", predictor.bundle.labels)
    results["model_figures"] = {key: report.measurements[key] for key, _ in FIGURES}
    on_expert_slices = cardiac_function(labels["ED"][0], labels["ES"][0])
    results["model_figures_expert_slices"] = {key: on_expert_slices[key] for key, _ in FIGURES}
    results["expert_figures"] = sample.expert
    results["convention"] = report.convention
    results["quality_flags"] = [flag.to_json() for flag in report.flags]
    results["whole_heart"] = report.to_json()
    results["overlays"] = [str(p) for p in write_overlays({n: experts[n].image for n in phases}, labels, out / "overlays")]
    results["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_path(out / RESULTS_FILE) as temp:
        temp.write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results, sample, out))
    return results


def _expert_rows(frame: Image, expert: Image, name: str, sample: Sample) -> list[int]:
    """The slice index in ``frame`` of each of the expert's slices (the same DICOM images); refuses another frame."""
    stack = np.moveaxis(frame.array, frame.slice_axis, 0)
    rows = []
    for drawn in np.moveaxis(expert.array, expert.slice_axis, 0):
        found = [k for k, image in enumerate(stack) if image.shape == drawn.shape and np.array_equal(image, drawn)]
        if not found:
            raise IdealError(f"the model's {name} frame is not the expert's {name} phase in {sample.dicom_dir}")
        rows.append(found[0])
    return rows


def _dice_scores(predicted: Image, expert) -> dict[str, float | None]:
    """LV blood-pool Dice, and myocardium Dice on the slices where the expert drew an epicardial contour."""
    axis = expert.image.slice_axis
    rows = np.array(expert.myocardium_slices)
    pred, ref = np.moveaxis(predicted.array, axis, 0), np.moveaxis(expert.label.array, axis, 0)
    myocardium = dice(pred[rows] == LV_MYOCARDIUM, ref[rows] == LV_MYOCARDIUM) if rows.any() else None
    return {"lv_dice": dice(pred == LV_BLOOD_POOL, ref == LV_BLOOD_POOL), "myocardium_dice": myocardium}


def overlay_slices(expert: Image) -> dict[str, int]:
    """Mid-ventricular and basal slice indices along the slice axis, from the expert's LV.

    The LV is contoured from base to apex; the base is the end of that range with the larger LV
    cross-section (the apex tapers), mid-ventricular the slice halfway between the two ends.
    """
    axis = expert.slice_axis
    area = (np.moveaxis(expert.array, axis, 0) == LV_BLOOD_POOL).sum(axis=(1, 2))
    drawn = np.flatnonzero(area)
    if drawn.size == 0:
        raise IdealError("the expert labels hold no LV blood pool")
    first, last = int(drawn[0]), int(drawn[-1])
    basal = first if area[first:first + 2].sum() >= area[max(last - 1, 0):last + 1].sum() else last
    return {"mid": (first + last) // 2, "basal": basal}


def write_overlays(images: dict[str, Image], labels: dict[str, tuple[Image, Image]], folder: Path) -> list[Path]:
    """``<phase>_<level>.png`` (expert | model, cropped to the heart) for ED/ES x mid/basal, and ``overview.png`` of all four.

    ``images`` are the expert's slices of each phase, ``labels`` (model, expert) on them.
    """
    written, rows = [], []
    crop = _heart_crop(labels["ED"][1])  # one window for both phases: the heart at its largest
    for name, image_of_phase in images.items():
        predicted, expert = labels[name]
        row = []
        for level, k in overlay_slices(expert).items():
            pair = np.concatenate([_zoom(overlay_rgb(image_of_phase, image, k)[crop]) for image in (expert, predicted)], axis=1)
            written.append(save_png(pair, folder / f"{name}_{level}.png"))
            row.append(np.pad(pair, ((4, 4), (4, 4), (0, 0)), constant_values=255))
        rows.append(np.concatenate(row, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    overview = np.concatenate(rows, axis=0)
    halves = [(f"expert, {level}", f"model, {level}") for level in overlay_slices(labels["ED"][1])]
    written.append(save_png(np.concatenate([_header(overview.shape[1], halves), overview], axis=0), folder / "overview.png"))
    return written


def _header(width: int, pairs: list[tuple[str, str]], height: int = 22) -> np.ndarray:
    """A white strip naming each half of each column pair ("expert, mid" | "model, mid" ...), black text (Pillow)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    strip = PILImage.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: one fixed size
        font = ImageFont.load_default()
    column = width / len(pairs)
    for n, names in enumerate(pairs):
        for half, text in enumerate(names):
            centre = column * n + column * (2 * half + 1) / 4
            draw.text((centre, height / 2), text, fill="black", font=font, anchor="mm")
    return np.asarray(strip, dtype=np.uint8)


def _heart_crop(expert: Image) -> tuple[slice, slice]:
    """A square in-plane window around the expert's LV (over all slices), with a margin."""
    axis = expert.slice_axis
    footprint = (np.moveaxis(expert.array, axis, 0) > 0).any(axis=0)
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    centre = ((rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2)
    half = max(rows[-1] - rows[0], cols[-1] - cols[0]) // 2 + CROP_MARGIN
    bounds = []
    for c, size in zip(centre, footprint.shape):
        low = int(min(max(c - half, 0), max(size - 2 * half, 0)))
        bounds.append(slice(low, min(low + 2 * half, size)))
    return bounds[0], bounds[1]


def _zoom(rgb: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement, so a 100-pixel crop is readable in a README."""
    return rgb.repeat(ZOOM, axis=0).repeat(ZOOM, axis=1)


def format_report(results: dict, sample: Sample, out: Path) -> str:
    """The printed comparison: figures of the model next to the expert's, Dice, where the files are."""
    model = results["model"]
    lines = [
        f"{sample.description}",
        f"model {model['id']} {model['version']} on {results['device']}: "
        f"{', '.join(f'{s:.1f}' for s in results['seconds_per_volume'])} s per volume",
        "",
        f"{'':16}{'model':>9}{'expert':>9}",
    ]
    for key, title in FIGURES:
        lines.append(f"{title:16}{results['model_figures'][key]:9.1f}{results['expert_figures'][key]:9.1f}")
    contoured = results["model_figures_expert_slices"]
    lines.append(f"(model: whole stack, {results['convention'].split(':')[0]}; on the expert's 9 slices its LV EF is "
                 f"{contoured['lv_ef_percent']:.1f})")
    ed, es = results["phases"]["ED"], results["phases"]["ES"]
    flags = results["quality_flags"]
    lines += ["", f"LV Dice: ED {ed['lv_dice']:.3f}, ES {es['lv_dice']:.3f}"
              + (f"; myocardium Dice (ED) {ed['myocardium_dice']:.3f}" if ed["myocardium_dice"] is not None else "")
              + " (on the expert's slices)", "", f"QC flags: {len(flags) or 'none'}"]
    lines += [f"  {flag['name']}: {flag['message']}" for flag in flags]
    lines += ["",
              f"segmentations (open in 3D Slicer): {out}/{sample.patient}_ED.seg.nrrd, _ES.seg.nrrd (expert: *_expert.seg.nrrd; "
              "the model on the expert's slices: *_on_expert_slices.seg.nrrd)",
              f"overlays (expert | model): {out / 'overlays'}; all figures: {out / RESULTS_FILE}",
              f"done in {results['seconds']:.0f} s"]
    return "\n".join(lines)
