"""Batch segmentation through real MRML: every input volume becomes a Slicer .seg.nrrd (and .mrb).

Run it inside Slicer or in plain Python with slicer-core installed::

    Slicer --no-main-window --python-script IDEALSegment/batch.py --model BUNDLE --input IN --output OUT
    python IDEALSegment/batch.py --model BUNDLE --input IN --output OUT

IN is a volume file, a DICOM folder, or a folder of volume files (or of DICOM sub-folders). Each
case is loaded into a fresh scene, segmented with IDEALSegmentLib.inference.segment_volume and
written to OUT/<case>.seg.nrrd. A failing case is reported and skipped; the exit status is the
number of failed cases (at most 125), 2 for unusable arguments.

A cine case (a 4D NIfTI/NRRD file, or a DICOM series with several cardiac phases) becomes a volume
sequence segmented frame by frame with IDEALSegmentLib.cine (as ``segment_sequence`` does) and is
written as OUT/<case>_frameNN.seg.nrrd, one per frame, named as ``idealtrain segment --all-frames``
names them; the .mrb holds the whole scene (cine, segmentation sequence, browser, measurements
table). The measurements CSV gets a ``<case>_frameNN`` volume row per frame and a ``<case> (cine
ED/ES)`` row with EDV, ESV, SV, EF, mass and the ED/ES frames (ED = largest LV blood pool, ES =
smallest). Where ED/ES cannot be found (e.g. no LV in any frame) the per-frame segmentations are
still written, but no .mrb and no ED/ES row; the summary says why. Existing outputs (every frame
file included) are checked before anything is written and never replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path


# Slicer's --python-script may not set __file__ or put this folder on sys.path. Installed, this file
# sits one folder below the modules (qt-scripted-modules/IDEALSegmentBatch/), in the source tree beside them.
_here = Path(globals().get("__file__") or sys.argv[0]).resolve().parent
sys.path.insert(0, str(next((d for d in (_here, _here.parent) if (d / "IDEALSegmentPackages").is_dir()), _here)))
import IDEALSegmentPackages  # noqa: E402,F401  registers IDEALTrain and IDEALSegmentLib by name

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.volume_files import VOLUME_SUFFIXES, has_volume_suffix  # noqa: E402

MAX_EXIT_STATUS = 125  # higher statuses mean "killed by a signal" or "command not found" to shells
SEGMENTATION_SUFFIX = ".seg.nrrd"


def case_name(path: Path) -> str:
    """A case's name: the file name without its volume suffix (``a.nii.gz`` -> ``a``), or the folder name."""
    name = path.name
    for suffix in (SEGMENTATION_SUFFIX,) + VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(source: Path) -> list[Path]:
    """The inputs in ``source``: a file; a folder's volume files; else the folder (DICOM) or its sub-folders."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise IdealError(f"{source}: no such file or folder")
    entries = sorted(p for p in source.iterdir() if not p.name.startswith("."))
    volumes = [p for p in entries if p.is_file() and has_volume_suffix(p) and not p.name.lower().endswith(SEGMENTATION_SUFFIX)]
    if volumes:
        return volumes
    if any(p.is_file() for p in entries):
        return [source]  # one DICOM series
    folders = [p for p in entries if p.is_dir()]
    if not folders:
        raise IdealError(f"{source}: holds no volume files ({', '.join(VOLUME_SUFFIXES)}) and no DICOM files")
    return folders


def read_case_frames(path: Path) -> list | None:
    """The frames of a DICOM folder or a 4D file (IDEALTrain.read_frames); None for a 3D file.

    3D files are left to MRML storage (:func:`load_case`), so single volumes stay voxel-exact to
    ``idealtrain segment``; only the header is read to tell them apart.
    """
    import SimpleITK as sitk
    from IDEALTrain.io.volume_files import read_frames

    if path.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None  # unreadable: MRML storage reports it as it does for any bad file
        if reader.GetDimension() != 4:
            return None
    return read_frames(path)


def load_case(scene: object, path: Path, frames: list | None = None) -> object:
    """A new volume node for one single-frame case: a file through MRML storage, else ``frames[0]``."""
    from IDEALSegmentLib.scene_files import load_volume
    from IDEALSegmentLib.volumes import volume_from_image

    if frames is None:
        return load_volume(scene, path, case_name(path))
    return volume_from_image(frames[0], scene, case_name(path))


def frame_file_name(case: str, frame: int) -> str:
    """``<case>_frameNN.seg.nrrd``: as ``idealtrain segment --all-frames`` names frame outputs."""
    return f"{case}_frame{frame:02d}{SEGMENTATION_SUFFIX}"


def _progress(total: int):
    """A tqdm bar on stderr, or plain lines where tqdm is not installed (e.g. Slicer's Python)."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, desc="segmenting", unit="case", file=sys.stderr, dynamic_ncols=True)


def segment_case(path: Path, args: argparse.Namespace, predictor: object) -> dict:
    """Segment one case (a volume or a cine) into its own scene and write its files; a row of the summary.

    Every output file is checked before any is written: existing ones are refused without --overwrite.
    """
    import slicer

    from IDEALSegmentLib.inference import segment_volume
    from IDEALSegmentLib.scene_files import save_node, save_scene_bundle
    from IDEALSegmentLib.segmentations import labels_from_segmentation

    frames = read_case_frames(path)
    outputs = _outputs(path, args, len(frames) if frames is not None and len(frames) > 1 else 0)
    if "frames" in outputs:
        return segment_cine(path, frames, args, predictor, outputs)
    scene = slicer.vtkMRMLScene()
    try:
        volume = load_case(scene, path, frames)
        result = segment_volume(volume, predictor, with_uncertainty=args.mrb is not None)
        save_node(result.segmentation, outputs["segmentation"], overwrite=args.overwrite)
        if "mrb" in outputs:
            save_scene_bundle(scene, outputs["mrb"], overwrite=args.overwrite)
        row = {"case": case_name(path), "status": "ok", "seconds": result.seconds, "summary": result.summary()}
        if args.measurements_csv is not None:
            row["labels"] = labels_from_segmentation(result.segmentation, volume, predictor.bundle.labels)
        return row
    finally:
        scene.Clear(True)


def segment_cine(path: Path, frames: list, args: argparse.Namespace, predictor: object, outputs: dict) -> dict:
    """Segment every frame of a cine as IDEALSegmentLib.cine does and write one .seg.nrrd per frame.

    The steps of ``cine.segment_sequence`` are run one by one so that a cine whose ED/ES cannot be
    found (no LV in any frame, the same LV volume in all) still gets its per-frame segmentations:
    then the case is "ok" with a note, and no .mrb and no ED/ES measurements are written.
    """
    import slicer

    from IDEALSegmentLib.cine import add_sequence_to_scene, frame_images, predict_sequence, sequence_from_images
    from IDEALSegmentLib.scene_files import save_node, save_scene_bundle
    from IDEALSegmentLib.segmentations import Provenance, segmentation_from_labels
    from IDEALSegmentLib.volumes import volume_from_image

    name = case_name(path)
    start = time.perf_counter()
    scene = slicer.vtkMRMLScene()
    try:
        sequence = sequence_from_images(scene, frames, name)
        predictions = predict_sequence(frame_images(sequence), predictor)
        try:
            result = add_sequence_to_scene(sequence, predictions, predictor.bundle)
        except IdealError as error:  # the scene is as before: the cine alone
            result, problem = None, str(error)
        if result is not None:
            segmentations = [result.segmentation_sequence.GetNthDataNode(n) for n in range(len(frames))]
        else:
            provenance = Provenance.now(predictor.bundle.model_id, predictor.bundle.version)
            segmentations = []
            for index, prediction in enumerate(predictions):
                reference = volume_from_image(prediction.labels, scene, f"{name} frame {index}")
                segmentations.append(segmentation_from_labels(
                    prediction.labels, reference, predictor.bundle.labels, provenance, name=f"{name} frame {index} segmentation"))
        for segmentation, target in zip(segmentations, outputs["frames"]):
            save_node(segmentation, target, overwrite=args.overwrite)
        if "mrb" in outputs and result is not None:
            save_scene_bundle(scene, outputs["mrb"], overwrite=args.overwrite)
        seconds = time.perf_counter() - start
        row = {"case": name, "status": "ok", "seconds": seconds, "frames": len(frames)}
        if result is not None:
            row["ed_frame"], row["es_frame"] = result.ed_index, result.es_index
            row["summary"] = f"cine of {len(frames)} frames, ED frame {result.ed_index}, ES frame {result.es_index}"
            row["measurements"] = result.measurements
        else:
            row["summary"] = f"cine of {len(frames)} frames, segmented; no ED/ES (see note)"
            row["note"] = f"{name}: no ED/ES measurements{' and no .mrb' if 'mrb' in outputs else ''} ({problem})"
        if args.measurements_csv is not None:
            row["frame_labels"] = [prediction.labels for prediction in predictions]
        return row
    finally:
        scene.Clear(True)


def _outputs(path: Path, args: argparse.Namespace, frames: int = 0) -> dict:
    """Output files of one case (``frames`` > 0: a cine's per-frame files), refused up front when any exists."""
    name = case_name(path)
    if frames:
        outputs = {"frames": [args.output / frame_file_name(name, n) for n in range(frames)]}
    else:
        outputs = {"segmentation": args.output / f"{name}{SEGMENTATION_SUFFIX}"}
    if args.mrb is not None:
        outputs["mrb"] = args.mrb / f"{name}.mrb"
    paths = [p for value in outputs.values() for p in (value if isinstance(value, list) else [value])]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise IdealError(f"output already exists: {', '.join(existing)}; pass --overwrite to replace it")
    return outputs


def write_measurements(rows: list[dict], path: Path, label_map: tuple, overwrite: bool) -> str:
    """Per-case label volumes (ml); with IDEALSegmentLib.measurements, ED/ES function per case pair.

    Cases named ``<name>_ED`` and ``<name>_ES`` (ACDC and phantom naming) form a pair whose row gets
    ejection fractions and mass from ``measurements.cardiac_measurements``. A cine case gives a
    ``<case>_frameNN`` volume row per frame and a ``<case> (cine ED/ES)`` row with its measurements
    (none where ED/ES could not be found). Returns a note for the summary.
    """
    from IDEALTrain.io.atomic import atomic_path
    from IDEALTrain.evaluation.metrics import label_volume_ml

    if path.exists() and not overwrite:
        raise IdealError(f"{path}: already exists; pass --overwrite to replace it")
    try:
        from IDEALSegmentLib import measurements
    except ImportError:  # written by another part of the project; optional here
        measurements = None
    done = [row for row in rows if row["status"] == "ok"]
    def volumes(case: str, labels: object) -> dict:
        return {"case": case, **{f"{label.name} (ml)": round(label_volume_ml(labels, label.value), 3) for label in label_map}}

    table = []
    for row in done:
        if "frame_labels" in row:
            table += [volumes(frame_file_name(row["case"], n)[: -len(SEGMENTATION_SUFFIX)], labels) for n, labels in enumerate(row["frame_labels"])]
            if "measurements" in row:
                table.append({"case": f"{row['case']} (cine ED/ES)", **row["measurements"]})
        else:
            table.append(volumes(row["case"], row["labels"]))
    note = "ED/ES measurements skipped (IDEALSegmentLib.measurements is not available)" if measurements is None else ""
    if measurements is not None:
        by_name = {row["case"]: row["labels"] for row in done if "labels" in row}
        for name in sorted(by_name):
            if name.upper().endswith("_ED") and f"{name[:-3]}_ES" in by_name:
                try:
                    values = measurements.cardiac_measurements(by_name[name], by_name[f"{name[:-3]}_ES"])
                except IdealError as error:
                    note += f"{name[:-3]}: no ED/ES measurements ({error}); "
                    continue
                table.append({"case": f"{name[:-3]} (ED/ES)", **values})
    columns = list(dict.fromkeys(key for row in table for key in row))
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(table)
    return note.rstrip("; ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch.py",
        description="Segment volumes with an IDEALSegment model through Slicer MRML. A cine (4D file or cine DICOM "
        "series) is segmented frame by frame into <case>_frameNN.seg.nrrd, with ED/ES found from the LV volume.",
    )
    parser.add_argument("--model", required=True, help="model bundle (folder or .zip)")
    parser.add_argument("--input", required=True, type=Path, help="volume file, DICOM folder, or folder of volume files / DICOM folders")
    parser.add_argument("--output", required=True, type=Path, help="folder for <case>.seg.nrrd, or <case>_frameNN.seg.nrrd per cine frame (created if missing)")
    parser.add_argument("--mrb", nargs="?", const=True, default=None, help="also write <case>.mrb scenes (with the uncertainty map) to this folder (default: --output)")
    parser.add_argument("--measurements-csv", type=Path, help="write per-case volumes (per frame for a cine) and ED/ES function (for <name>_ED/_ES pairs and each cine) here")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Segment every case; the exit status is the number of failed cases (capped at 125), 2 for bad arguments."""
    args = build_parser().parse_args(argv)
    _vtk_messages_to_stderr()
    args.mrb = args.output if args.mrb is True else (Path(args.mrb) if args.mrb else None)
    try:
        cases = find_cases(args.input)
        for folder in (args.output, args.mrb):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        from IDEALSegmentLib.inference import load_predictor

        predictor = load_predictor(args.model, args.device)
    except IdealError as error:
        print(f"batch: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # e.g. PyTorch not yet installed into Slicer's Python
        print(f"batch: error: Python package '{error.name}' is not installed; install it first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = []
    bar = _progress(len(cases))
    for path in cases:
        try:
            rows.append(segment_case(path, args, predictor))
        except Exception as error:  # one bad case must not stop the batch
            message = str(error) if isinstance(error, IdealError) else f"{type(error).__name__}: {error}"
            rows.append({"case": case_name(path), "status": "failed", "error": message})
            _say(bar, f"FAILED {path}: {message}")
        if bar is not None:
            bar.update(1)
        else:
            print(f"[{len(rows)}/{len(cases)}] {rows[-1]['case']}: {rows[-1]['status']}"
                  + (f" ({rows[-1]['summary']})" if "frames" in rows[-1] else ""), file=sys.stderr)
    if bar is not None:
        bar.close()
    failed = [row for row in rows if row["status"] == "failed"]
    note = ""
    if args.measurements_csv is not None:
        try:
            note = write_measurements(rows, args.measurements_csv, predictor.bundle.labels, args.overwrite)
        except (IdealError, OSError) as error:
            print(f"batch: error: measurements not written: {error}", file=sys.stderr)
    print(f"segmented {len(rows) - len(failed)} of {len(rows)} case(s) with {predictor.bundle.model_id} "
          f"{predictor.bundle.version} on {predictor.device} in {time.perf_counter() - start:.1f} s -> {args.output}")
    for row in rows:
        if row["status"] == "ok" and "frames" in row:
            print(f"  cine: {row['case']}: {row['summary']}")
    for row in failed:
        print(f"  failed: {row['case']}: {row['error']}")
    notes = [row["note"] for row in rows if "note" in row] + ([note] if note else [])
    note = "; ".join(notes)
    if note:
        print(f"  note: {note}")
    return min(len(failed), MAX_EXIT_STATUS)


def _vtk_messages_to_stderr() -> None:
    """Keep stdout for the summary: VTK/MRML messages (e.g. .mrb zip notes) go to stderr."""
    import vtk

    vtk.vtkOutputWindow.GetInstance().SetDisplayModeToAlwaysStdErr()


def _say(bar: object, text: str) -> None:
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr)


def _exit(status: int) -> None:
    """Exit with ``status``: through the Slicer application when running inside Slicer."""
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except ImportError:
        app = None
    if app is not None:
        slicer.util.exit(status)  # ends Slicer's event loop with this status (--python-script keeps it running otherwise)
    else:
        sys.exit(status)


if __name__ == "__main__":
    _exit(main())
