"""Batch segmentation through real MRML: every input volume becomes a Slicer .seg.nrrd (and .mrb).

Run it inside Slicer or in plain Python with slicer-core installed::

    Slicer --no-main-window --python-script IDEALSegment/IDEALSegmentBatch/batch.py --model BUNDLE --input IN --output OUT
    python IDEALSegment/IDEALSegmentBatch/batch.py --model BUNDLE --input IN --output OUT

IN is a volume file, a DICOM folder, or a folder of volume files (or of DICOM sub-folders). Each
case is loaded into a fresh scene, segmented with IDEALSegmentLib.inference.segment_volume and
written to OUT/<case>.seg.nrrd. A failing case is reported and skipped; the exit status is the
number of failed cases (at most 125; at least 1 when the measurements CSV is not written), 2 for
unusable arguments (a bad --output or existing CSV is found before any case is segmented). A case
is written whole or not at all.

A cine case (a 4D NIfTI/NRRD file, or a DICOM series with several cardiac phases) becomes a volume
sequence segmented frame by frame with IDEALSegmentLib.cine (as ``segment_sequence`` does) and is
written as OUT/<case>_frameNN.seg.nrrd, one per frame, named as ``idealtrain segment --all-frames``
names them; the .mrb holds the whole scene (cine, segmentation sequence, browser, measurements
table). The measurements CSV (one schema with a ``row_type`` column: IDEALTrain's
``write_function_csv``) gets the cine's whole-heart measurements by IDEALTrain's convention
(``docs/measurements.md``): summary rows (EDV, ESV, SV, EF, mass, ED/ES frames), per-frame and
per-slice volumes and its QC flags, which the summary printed at the end repeats. Where ED/ES cannot be found (e.g. no LV in any frame) the per-frame segmentations are
still written, but no .mrb and no ED/ES row; the summary says why. Existing outputs (every frame
file included) are checked before anything is written and never replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Slicer's --python-script may not set __file__ or put this folder on sys.path. This file sits one folder
# below the modules, where Slicer does not look for modules: IDEALSegment/IDEALSegmentBatch/ in the source
# tree, qt-scripted-modules/IDEALSegmentBatch/ installed; IDEALSegmentPackages is one folder up in both.
sys.path.insert(0, str(Path(globals().get("__file__") or sys.argv[0]).resolve().parents[1]))
import IDEALSegmentPackages  # noqa: E402,F401  registers IDEALTrain and IDEALSegmentLib by name

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.volume_files import (  # noqa: E402
    SEGMENTATION_SUFFIX,
    VOLUME_SUFFIXES,
    frame_path,
    has_volume_suffix,
    strip_volume_suffix,
)

MAX_EXIT_STATUS = 125  # higher statuses mean "killed by a signal" or "command not found" to shells
VTK_LOG_NAME = "batch-vtk.log"  # VTK/MRML messages, in --output


def case_name(path: Path) -> str:
    """A case's name: the file name without its volume suffix (``a.nii.gz`` -> ``a``), or the folder name."""
    return strip_volume_suffix(path.name)


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
    """The frames of a DICOM folder or a 4D file (IDEALTrain's readers); None for a 3D file.

    3D files are left to MRML storage (:func:`load_case`), so single volumes stay voxel-exact to
    ``idealtrain segment``. A file is checked whole once (a truncated or corrupt file is refused,
    which ITK would otherwise read with zeros for the missing voxels); a 4D one is then read with
    the same header reader.
    """
    from IDEALTrain.io.volume_files import read_cine_file, read_frames

    return read_cine_file(path) if path.is_file() else read_frames(path)


def load_case(scene: object, path: Path, frames: list | None = None) -> object:
    """A new volume node for one single-frame case: a file through MRML storage, else ``frames[0]``."""
    from IDEALSegmentLib.scene_files import load_volume
    from IDEALSegmentLib.volumes import volume_from_image

    if frames is None:
        return load_volume(scene, path, case_name(path))
    return volume_from_image(frames[0], scene, case_name(path))


def frame_file_name(case: str, frame: int) -> str:
    """``<case>_frameNN.seg.nrrd``: as ``idealtrain segment --all-frames`` names frame outputs (one rule)."""
    return frame_path(case + SEGMENTATION_SUFFIX, frame).name


def _progress(total: int):
    """A tqdm bar on stderr, or plain lines where tqdm is not installed (e.g. Slicer's Python)."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, desc="segmenting", unit="case", file=sys.stderr, dynamic_ncols=True)


def segment_case(path: Path, args: argparse.Namespace, predictor: object) -> dict:
    """Segment one case (a volume or a cine) into its own scene and write its files; a row of the summary.

    The case's files go through IDEALTrain's output guard: checked before any is written (existing ones are
    refused without --overwrite, none may replace an input), locked while written, and committed together
    when the case is done: a case is written whole or not at all, whatever stops it (an error, Ctrl-C,
    SIGTERM; after a SIGKILL the next run removes the hidden leftovers).
    """
    import slicer

    from IDEALTrain.io.output_guard import OutputSet

    frames = read_case_frames(path)
    outputs = _outputs(path, args, len(frames) if frames is not None and len(frames) > 1 else 0)
    paths = [p for value in outputs.values() for p in (value if isinstance(value, list) else [value])]
    inputs = [path, args.model, args.clicks / f"{case_name(path)}.clicks.json" if args.clicks else None]
    scene = slicer.vtkMRMLScene()
    try:
        with OutputSet(paths, args.overwrite, inputs=inputs) as run:
            if "frames" in outputs:
                return _segment_cine(scene, path, frames, args, predictor, outputs, run)
            return _segment_volume(scene, path, frames, args, predictor, outputs, run)
    finally:
        scene.Clear(True)


def _segment_volume(scene, path: Path, frames, args, predictor, outputs: dict, run) -> dict:
    """One 3D volume: IDEALSegmentLib.inference.segment_volume, as the module's Segment button."""
    from IDEALSegmentLib.inference import segment_volume
    from IDEALSegmentLib.scene_files import save_scene_bundle
    from IDEALSegmentLib.segmentations import labels_from_segmentation

    volume = load_case(scene, path, frames)
    result = segment_volume(volume, predictor, with_uncertainty=args.mrb is not None or args.measurements_csv is not None)
    refined = None
    if getattr(args, "clicks", None) is not None:  # scripted review: <case>.clicks.json refines the draft in place
        from IDEALSegmentLib.refinement import refine_with_clicks_file

        refined = refine_with_clicks_file(volume, result.segmentation, args.clicks / f"{case_name(path)}.clicks.json", predictor)
    labels = labels_from_segmentation(result.segmentation, volume, predictor.bundle.labels)
    write_segmentation(result.segmentation, labels, run.staged(outputs["segmentation"]), predictor.bundle.labels)
    if "mrb" in outputs:
        save_scene_bundle(scene, run.staged(outputs["mrb"]))
    row = {"case": case_name(path), "status": "ok", "seconds": result.seconds,
           "summary": result.summary() + (f"; {refined}" if refined else "")}
    if args.measurements_csv is not None:
        row["labels"] = labels
        if result.uncertainty is not None:
            from IDEALSegmentLib.volumes import image_from_volume

            row["uncertainty"] = image_from_volume(result.uncertainty)
    return row


def _segment_cine(scene, path: Path, frames: list, args, predictor, outputs: dict, run) -> dict:
    """A cine: IDEALSegmentLib.cine.segment_sequence, as the module does, writing one .seg.nrrd per frame.

    A cine whose ED/ES cannot be found (no LV in any frame, the same LV volume in all) still gets its
    per-frame segmentations: the case is "ok" with a note, and no .mrb and no ED/ES row are written.
    """
    from IDEALSegmentLib.cine import segment_sequence, sequence_from_images
    from IDEALSegmentLib.scene_files import save_scene_bundle
    from IDEALSegmentLib.segmentations import labels_from_segmentation

    name = case_name(path)
    start = time.perf_counter()
    cine = sequence_from_images(scene, frames, name)
    if "mrb" in outputs:  # the scene holds the uncertainty too: one map per frame, browsed with the cine
        from IDEALSegmentLib.cine import add_sequence_to_scene, frame_images
        from IDEALSegmentLib.inference import predict_volume

        predictions = [predict_volume(image, predictor) for image in frame_images(cine)]
        result = add_sequence_to_scene(cine, predictions, predictor.bundle, require_ed_es=False)
        _add_uncertainty_sequence(scene, result, [p.uncertainty for p in predictions], f"{name} segmentation uncertainty")
    else:
        result = segment_sequence(cine, predictor, require_ed_es=False)
    for index, target in enumerate(outputs["frames"]):
        segmentation = result.segmentation_sequence.GetNthDataNode(index)
        labels = labels_from_segmentation(segmentation, cine.GetNthDataNode(index), predictor.bundle.labels)
        write_segmentation(segmentation, labels, run.staged(target), predictor.bundle.labels)
    if "mrb" in outputs and not result.note:
        save_scene_bundle(scene, run.staged(outputs["mrb"]))
    row = {"case": name, "status": "ok", "seconds": time.perf_counter() - start, "frames": len(frames),
           "frame_ml": result.frame_labels_ml, "report": result.report}
    if not result.note:
        row["summary"] = f"cine of {len(frames)} frames, ED frame {result.ed_index}, ES frame {result.es_index}"
        row["measurements"] = result.measurements
    else:
        row["summary"] = f"cine of {len(frames)} frames, segmented; no ED/ES (see note)"
        row["note"] = f"{name}: no ED/ES measurements{' and no .mrb' if 'mrb' in outputs else ''} ({result.note})"
    return row


def _add_uncertainty_sequence(scene: object, result: object, maps: list, name: str) -> None:
    """The decoders' disagreement of every frame as a volume sequence, synchronised with the cine's browser."""
    from IDEALSegmentLib.cine import sequence_from_images

    if not maps or any(m is None for m in maps):
        return
    sequence = sequence_from_images(scene, maps, name)
    if result.browser is not None:
        result.browser.AddSynchronizedSequenceNodeID(sequence.GetID())


def write_segmentation(segmentation: object, labels: object, path: Path, label_map: tuple) -> Path:
    """A case's .seg.nrrd through IDEALTrain's one writer (as ``idealtrain segment``), tagged with the node's provenance."""
    from IDEALSegmentLib.segmentations import read_provenance

    from IDEALTrain.io.volume_files import write_image

    provenance = read_provenance(segmentation)
    return write_image(labels, path, tuple(label_map), dict(provenance.items()) if provenance else None)


def _outputs(path: Path, args: argparse.Namespace, frames: int = 0) -> dict:
    """Output files of one case (``frames`` > 0: a cine's per-frame files)."""
    name = case_name(path)
    if frames:
        outputs = {"frames": [args.output / frame_file_name(name, n) for n in range(frames)]}
    else:
        outputs = {"segmentation": args.output / f"{name}{SEGMENTATION_SUFFIX}"}
    if args.mrb is not None:
        outputs["mrb"] = args.mrb / f"{name}.mrb"
    return outputs


def write_measurements(rows: list[dict], path: Path, label_map: tuple, overwrite: bool) -> str:
    """The measurements CSV (IDEALTrain's one schema, a ``row_type`` column); a note for the summary.

    Each 3D case gives a ``frame`` row of its label volumes (ml, every labelled voxel). Cases named
    ``<name>_ED`` and ``<name>_ES`` (ACDC and phantom naming) form a pair, and each cine is measured
    whole, by IDEALTrain's whole-heart convention: ``summary`` rows (EDV, ESV, SV, EF, mass, ED/ES
    frames), ``frame`` and ``slice`` rows of the counted volumes, and one ``flag`` row per QC flag,
    under the case name ``<name> (ED/ES)`` / ``<case> (cine)``. A cine without ED/ES gets its frame rows only.
    """
    from IDEALSegmentLib.measurements import pair_report

    from IDEALTrain.evaluation.function import STRUCTURES, report_rows, write_function_csv
    from IDEALTrain.evaluation.metrics import label_volume_ml
    from IDEALTrain.io.atomic import check_outputs

    check_outputs([path], overwrite)
    done = [row for row in rows if row["status"] == "ok"]
    table = []
    for row in done:
        if "frame_ml" in row:  # a cine
            if row.get("report") is not None:
                table += report_rows(f"{row['case']} (cine)", row["report"])
            else:
                table += [{"row_type": "frame", "case": f"{row['case']} (cine)", "frame": index,
                           **{f"{name}_ml": volumes[name] for name in STRUCTURES}} for index, volumes in enumerate(row["frame_ml"])]
        else:
            table.append({"row_type": "frame", "case": row["case"], "frame": 0,
                          **{f"{name}_ml": label_volume_ml(row["labels"], value) for name, value in STRUCTURES.items()}})
    note = ""
    by_name = {row["case"]: row for row in done if "labels" in row}
    for name in sorted(by_name):
        if name.upper().endswith("_ED") and f"{name[:-3]}_ES" in by_name:
            try:
                report = pair_report(by_name[name]["labels"], by_name[f"{name[:-3]}_ES"]["labels"], by_name[name].get("uncertainty"))
            except IdealError as error:
                note += f"{name[:-3]}: no ED/ES measurements ({error}); "
                continue
            by_name[name]["report"] = report  # for the summary
            table += report_rows(f"{name[:-3]} (ED/ES)", report)
    write_function_csv(table, path)
    return note.rstrip("; ")


def report_lines(rows: list[dict]) -> list[str]:
    """The summary's measurement lines: each measured case's LV EF and its QC flags (what to check)."""
    lines = []
    for row in rows:
        report = row.get("report")
        if report is None:
            continue
        name = row["case"][:-3] if row["case"].upper().endswith("_ED") else row["case"]
        lines.append(f"  measured: {name}: {report.summary()}")
        lines += [f"    QC {flag.name}: {flag.message}" for flag in report.flags]
    return lines


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
    parser.add_argument("--clicks", type=Path, help="folder of <case>.clicks.json files (idealtrain refine's format): "
                        "a 3D case with one is refined with its clicks before it is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Segment every case; the exit status is the number of failed cases (capped at 125; at least 1 when the
    measurements CSV could not be written), 2 for bad arguments (checked before any case is segmented)."""
    from IDEALTrain.io.output_guard import sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    missing = _missing_mrml()
    if missing:
        print(f"batch: error: {missing}", file=sys.stderr)
        return 2
    with sigterm_as_interrupt():  # SIGTERM stops the batch as Ctrl-C does: the case being written is dropped whole
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from IDEALTrain.io.output_guard import exit_status

    args.mrb = args.output if args.mrb is True else (Path(args.mrb) if args.mrb else None)
    try:
        cases = _check_arguments(args)
        vtk_log = _vtk_messages_to_file(args.output / VTK_LOG_NAME)
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
        except KeyboardInterrupt as interruption:
            if bar is not None:
                bar.close()
            print(f"batch: interrupted at {path}: {len(rows)} of {len(cases)} case(s) were written whole, "
                  "the one in progress not at all; no measurements CSV", file=sys.stderr)
            return exit_status(interruption)
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
    note, csv_failed = "", False
    if args.measurements_csv is not None:
        try:
            note = write_measurements(rows, args.measurements_csv, predictor.bundle.labels, args.overwrite)
        except IdealError as error:
            print(f"batch: error: measurements not written: {error}", file=sys.stderr)
            csv_failed = True
    print(f"segmented {len(rows) - len(failed)} of {len(rows)} case(s) with {predictor.bundle.model_id} "
          f"{predictor.bundle.version} on {predictor.device} in {time.perf_counter() - start:.1f} s -> {args.output}")
    for row in rows:
        if row["status"] == "ok" and "frames" in row:
            print(f"  cine: {row['case']}: {row['summary']}")
    for line in report_lines(rows):
        print(line)
    for row in failed:
        print(f"  failed: {row['case']}: {row['error']}")
    notes = [row["note"] for row in rows if "note" in row] + ([note] if note else [])
    note = "; ".join(notes)
    if note:
        print(f"  note: {note}")
    if vtk_log.is_file() and vtk_log.stat().st_size:
        print(f"  VTK/MRML messages: {vtk_log}")
    return max(min(len(failed), MAX_EXIT_STATUS), int(csv_failed))


def _check_arguments(args: argparse.Namespace) -> list[Path]:
    """The cases, after the checks that need no model: output folders usable (made absolute, as MRML's
    .mrb writer needs), and no existing measurements CSV without --overwrite."""
    from IDEALTrain.io.atomic import check_outputs, check_writable_folder, os_error_message

    cases = find_cases(args.input)
    for name in ("output", "mrb"):
        folder = getattr(args, name)
        if folder is None:
            continue
        folder = Path(os.path.abspath(folder))
        check_writable_folder(folder)  # refuses a file, or a folder beneath a file, or a read-only place
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IdealError(os_error_message(folder, error)) from None
        setattr(args, name, folder)
    if args.measurements_csv is not None:
        args.measurements_csv = check_outputs([args.measurements_csv], args.overwrite, inputs=cases)[0]
    if args.clicks is not None:
        _check_clicks_folder(args.clicks, cases)
    return cases


def _check_clicks_folder(folder: Path, cases: list[Path]) -> None:
    """--clicks must be a folder holding a ``<case>.clicks.json`` for at least one case: a wrong path
    would otherwise refine nothing and report success."""
    if not folder.exists():
        raise IdealError(f"--clicks {folder}: no such folder")
    if not folder.is_dir():
        raise IdealError(f"--clicks {folder}: is a file; give the folder of <case>.clicks.json files")
    names = [f"{case_name(path)}.clicks.json" for path in cases]
    if not any((folder / name).is_file() for name in names):
        raise IdealError(f"--clicks {folder}: holds none of the cases' clicks files (e.g. {names[0]}); check the folder")


def _missing_mrml() -> str:
    """'' when Slicer's MRML is importable (Slicer, or slicer-core in plain Python); else one line saying what to do."""
    try:
        import slicer

        if hasattr(slicer, "vtkMRMLScene"):
            return ""
    except ImportError:
        pass
    return ("batch.py needs Slicer's MRML: run it with Slicer (Slicer --no-main-window --python-script batch.py ...), "
            "or pip install slicer-core==5.11.0.6 (pip install 'idealsegment[slicer]'); without either, "
            "idealtrain segment --all-frames writes the same .seg.nrrd files and prints the measurements")


def _vtk_messages_to_file(path: Path) -> Path:
    """Keep the terminal for the summary: VTK/MRML messages (e.g. hundreds of .mrb zip lines) go to ``path``."""
    import vtk

    window = vtk.vtkFileOutputWindow()
    window.SetFileName(str(path))
    window.AppendOff()
    window.FlushOn()
    vtk.vtkOutputWindow.SetInstance(window)
    return path


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
