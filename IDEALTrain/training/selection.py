"""Which training cases are labelled and which train without labels (semi-supervised finetuning).

One :class:`LabelSelection` option picks the labelled cases of the labelled spec, following the
SSL4MIS protocol (first N slices or patients) or IDEAL's (a fraction of patients). Unlabelled cases
leave here with ``label=None``, so no later step can train on their labels by mistake.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import IdealError
from ..io.datasets import Case, load_cases, parse_spec

TRAIN_LIST = "train_slices.list"
OPTION_NAMES = {
    "slices": "--labeled-slices",
    "patients": "--labeled-patients",
    "fraction": "--labeled-fraction",
    "names_file": "--labeled-list",
}
_SSL4MIS_PATIENT = re.compile(r"(patient\d+)_frame\d+")


def patient_of(name: str) -> str:
    """The patient of a case: ``patientXXX`` for SSL4MIS ``patientXXX_frameYY...`` names, else the name."""
    match = _SSL4MIS_PATIENT.match(name)
    return match.group(1) if match else name


@dataclass(frozen=True)
class LabelSelection:
    """At most one way of choosing the labelled cases of a spec; none set labels every case."""

    slices: int | None = None
    patients: int | None = None
    fraction: float | None = None
    names_file: Path | None = None

    def __post_init__(self) -> None:
        chosen = [OPTION_NAMES[f.name] for f in fields(self) if getattr(self, f.name) is not None]
        if len(chosen) > 1:
            raise IdealError(f"choose the labelled cases one way only, got {' and '.join(chosen)}")
        for name in ("slices", "patients"):
            count = getattr(self, name)
            if count is not None and count < 1:
                raise IdealError(f"{OPTION_NAMES[name]} must be at least 1, got {count}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise IdealError(f"--labeled-fraction must be above 0 and at most 1 (e.g. 0.025), got {self.fraction}")

    def describe(self) -> str:
        """A short human phrase for logs and model cards, e.g. "first 3 patients"."""
        if self.slices is not None:
            return f"first {self.slices} cases"
        if self.patients is not None:
            return f"first {self.patients} patients"
        if self.fraction is not None:
            return f"first {self.fraction:g} of the patients"
        if self.names_file is not None:
            return f"cases named in {self.names_file}"
        return "every case"


def _read_names(path: Path) -> set[str]:
    """Names of a --labeled-list file: one per line, blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise IdealError(f"cannot read the --labeled-list file {path}: {error.strerror or error}") from None
    names = {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
    if not names:
        raise IdealError(f"the --labeled-list file {path} names no case; write one case or patient name per line")
    return names


def _check_count(option: str, asked: int, available: int, what: str) -> None:
    """Refuse a count above what the labelled data holds, naming both numbers."""
    if asked > available:
        raise IdealError(f"{option} {asked} asks for more than the {available} {what} of the labelled data; use at most {available}")


def _is_labeled(names: list[str], selection: LabelSelection) -> list[bool]:
    """Per case (in list order), whether the selection labels it."""
    patients = [patient_of(name) for name in names]
    if selection.slices is not None:
        _check_count("--labeled-slices", selection.slices, len(names), "cases")
        return [index < selection.slices for index in range(len(names))]
    if selection.names_file is not None:
        wanted = _read_names(selection.names_file)
        unknown = sorted(wanted - set(names) - set(patients))
        if unknown:
            raise IdealError(
                f"{selection.names_file}: {len(unknown)} name(s) match no case or patient of the labelled data, "
                f"e.g. {', '.join(unknown[:3])}; check the spelling (case names have no file suffix)"
            )
        return [name in wanted or patient in wanted for name, patient in zip(names, patients)]
    order = list(dict.fromkeys(patients))
    count = len(order)
    if selection.patients is not None:
        _check_count("--labeled-patients", selection.patients, len(order), "patients")
        count = selection.patients
    elif selection.fraction is not None:
        # IDEAL's protocol: the nearest whole number of patients (halves round up), at least one.
        count = max(1, math.floor(selection.fraction * len(order) + 0.5))
    first = set(order[:count])
    return [patient in first for patient in patients]


def split_labeled(cases: list[Case], selection: LabelSelection) -> tuple[list[Case], list[Case]]:
    """The cases the selection labels and the others, both in list order (labels left untouched)."""
    flags = _is_labeled([case.name for case in cases], selection)
    return [c for c, keep in zip(cases, flags) if keep], [c for c, keep in zip(cases, flags) if not keep]


def _data_key(spec: str) -> tuple[str, Path, str | None]:
    """What a spec reads, so that ``ssl4mis:D`` and ``ssl4mis:D/:train_slices.list`` compare equal."""
    kind, path, list_name = parse_spec(spec)
    if kind != "ssl4mis":
        return kind, path.resolve(), None
    list_name = list_name or TRAIN_LIST
    return kind, path.resolve(), list_name[: -len(".list")] if list_name.endswith(".list") else list_name


def select_training_cases(
    labeled_spec: str,
    unlabeled_spec: str | None,
    selection: LabelSelection,
    *,
    require_unlabeled: bool,
    keep_labeled: bool = False,
) -> tuple[list[Case], list[Case]]:
    """Labelled and unlabelled training cases; unlabelled ones never carry a label.

    The unlabelled set is the unlabelled spec minus every case named like a labelled one (unless
    ``keep_labeled``) or, with no unlabelled spec, the cases of the labelled spec that the
    selection leaves out (all of them with ``keep_labeled``).
    """
    labeled_key = _data_key(labeled_spec)
    same_data = unlabeled_spec is not None and _data_key(unlabeled_spec) == labeled_key
    cases = load_cases(labeled_spec, default_list=TRAIN_LIST)
    labeled, rest = split_labeled(cases, selection)
    if not labeled:
        raise IdealError(f"{labeled_spec}: no case is selected as labelled ({selection.describe()})")
    missing = [case.name for case in labeled if case.label is None]
    if missing:
        raise IdealError(f"{labeled_spec}: {len(missing)} labelled case(s) have no label, e.g. {', '.join(missing[:3])}")
    if unlabeled_spec is None:
        pool = cases if keep_labeled else rest
    else:
        pool = cases if same_data else load_cases(unlabeled_spec, default_list=TRAIN_LIST)
    labeled_names = set() if keep_labeled else {case.name for case in labeled}
    unlabeled = [Case(case.name, case.image, None) for case in pool if case.name not in labeled_names]
    if require_unlabeled and not unlabeled:
        source = unlabeled_spec or labeled_spec
        raise IdealError(
            f"no unlabelled cases: every case of {source} is labelled; "
            "pass --unlabeled SPEC with other cases, or use --supervised-only"
        )
    return labeled, unlabeled


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mutually exclusive --labeled-slices/-patients/-fraction/-list options to a command."""
    group = parser.add_argument_group(
        "labelled cases (choose at most one)",
        "Default: every case of --labeled is labelled. Cases of --labeled left out train unlabelled "
        "unless --unlabeled is given (then its cases, minus the labelled ones, are the unlabelled set).",
    ).add_mutually_exclusive_group()
    group.add_argument(
        "--labeled-slices", type=int, metavar="N",
        help="label the first N cases of --labeled in list order (SSL4MIS ACDC protocol: 68 or 136 slices)",
    )
    group.add_argument(
        "--labeled-patients", type=int, metavar="N",
        help="label every case of the first N distinct patients in list order (ACDC: 3 = 68 slices, 7 = 136)",
    )
    group.add_argument(
        "--labeled-fraction", type=float, metavar="F",
        help="label the first F x (number of patients) patients, rounded, at least one "
        "(IDEAL protocol: 0.0125, 0.025, 0.10); a volume that is no SSL4MIS patientXXX case is its own patient",
    )
    group.add_argument(
        "--labeled-list", type=Path, metavar="FILE",
        help="label the cases or whole patients named in FILE, one name per line (e.g. patient001)",
    )


def selection_from_args(args: argparse.Namespace) -> LabelSelection:
    """The :class:`LabelSelection` of parsed command-line arguments."""
    return LabelSelection(args.labeled_slices, args.labeled_patients, args.labeled_fraction, args.labeled_list)
