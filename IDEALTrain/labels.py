"""The cardiac label map: label values, segment IDs, names, colours and SNOMED CT terminology."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import IdealError

#: Slicer's DICOM and General Anatomy lists file the left (87878005) and right (53085002) ventricle
#: under this category; myocardium (74281007) is in neither, so the extension ships a list of its
#: own (IDEALSegment/Resources/Terminology/IDEALSegmentCardiac.term.json) holding it, loaded at start-up.
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
IDEALSEGMENT_CONTEXT = "Segmentation category and type - IDEALSegment cardiac"
GENERAL_ANATOMY_CODES = frozenset({"87878005", "53085002"})


@dataclass(frozen=True)
class LabelInfo:
    """One structure the model segments; ``segment_id`` is fixed so corrections can be read back."""

    value: int
    segment_id: str
    name: str
    color: tuple[float, float, float]
    snomed_code: str
    snomed_meaning: str

    @property
    def terminology_context(self) -> str:
        """The Slicer terminology list holding this structure: Slicer's General Anatomy list, else IDEALSegment's own."""
        return GENERAL_ANATOMY_CONTEXT if self.snomed_code in GENERAL_ANATOMY_CODES else IDEALSEGMENT_CONTEXT

    @property
    def terminology_entry(self) -> str:
        """Slicer's terminology string (context ~ category ~ type ~ modifier ~ anatomic context ~ region ~ modifier)."""
        return (
            f"{self.terminology_context}~{ANATOMICAL_STRUCTURE}"
            f"~SCT^{self.snomed_code}^{self.snomed_meaning}"
            "~^^~Anatomic codes - DICOM master list~^^~^^"
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LabelInfo:
        try:
            return cls(
                value=int(data["value"]),
                segment_id=str(data["segment_id"]),
                name=str(data["name"]),
                color=tuple(float(c) for c in data["color"]),
                snomed_code=str(data.get("snomed_code", "")),
                snomed_meaning=str(data.get("snomed_meaning", data["name"])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise IdealError(f"invalid label map entry {data!r}: {error}") from None


#: ACDC convention (also SSL4MIS): 0 background, 1 RV, 2 LV myocardium, 3 LV blood pool.
CARDIAC_LABELS: tuple[LabelInfo, ...] = (
    LabelInfo(1, "RV", "Right ventricle", (0.31, 0.51, 0.86), "53085002", "Right ventricle"),
    LabelInfo(2, "LV_Myocardium", "Left ventricle myocardium", (0.44, 0.75, 0.36), "74281007", "Myocardium"),
    LabelInfo(3, "LV", "Left ventricle blood pool", (0.89, 0.27, 0.24), "87878005", "Left ventricle"),
)


def check_label_map(labels: tuple[LabelInfo, ...] | list[LabelInfo], num_classes: int) -> None:
    """Refuse a label map that does not cover exactly the model's foreground classes 1..C-1."""
    values = sorted(label.value for label in labels)
    if values != list(range(1, num_classes)):
        raise IdealError(
            f"label map values {values} do not match a model with {num_classes} classes "
            f"(expected {list(range(1, num_classes))}); the bundle's card and weights disagree"
        )
    ids = [label.segment_id for label in labels]
    if len(set(ids)) != len(ids):
        raise IdealError(f"label map has duplicate segment IDs {ids}")
