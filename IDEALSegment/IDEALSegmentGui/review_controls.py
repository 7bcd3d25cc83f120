"""The IDEALSegment panel's review controls of issue 20 (Qt): per-structure *reviewed* ticks for Mark reviewed,
and *Add to unlabelled pool* with the pool's size. Every decision is in the Qt-free controller
(``SegmentPanelController.mark_reviewed`` / ``add_to_pool``); this only builds and binds widgets."""
from __future__ import annotations

from pathlib import Path

import qt
import slicer

from . import common


class ReviewControls:
    """A row under the Mark reviewed button: one tick per structure, the pool button and the pool count."""

    def __init__(self, widget) -> None:
        from IDEALTrain.labels import CARDIAC_LABELS  # not at module level: Slicer imports this at start-up

        self.widget = widget  # the module widget: its ``ui`` now, its ``panel`` when a button is clicked
        row = qt.QHBoxLayout()
        row.addWidget(qt.QLabel("Reviewed:"))
        self.checks = {}
        for label in CARDIAC_LABELS:
            box = qt.QCheckBox(label.name)
            box.toolTip = f"Tick if you checked the {label.name} on every slice where it is drawn (none ticked: the structures you edited)"
            row.addWidget(box)
            self.checks[label.segment_id] = box
        self.poolButton = qt.QPushButton("Add to unlabelled pool")
        self.poolButton.toolTip = "Copy the selected image (every frame of a cine) into the unlabelled pool that retraining uses"
        self.poolButton.connect("clicked(bool)", lambda _checked: self.onAddToPool())
        self.poolLabel = qt.QLabel("")
        row.addWidget(self.poolButton)
        row.addWidget(self.poolLabel)
        layout = widget.ui.markReviewedButton.parentWidget().layout()
        layout.addRow(row) if hasattr(layout, "addRow") else layout.addLayout(row)

    def structures(self) -> list | None:
        """The ticked segment IDs; None when none is ticked (then the edited structures count as reviewed)."""
        return [name for name, box in self.checks.items() if box.checked] or None

    def folder(self) -> Path:
        return Path(self.widget.ui.correctionsFolderPathLineEdit.currentPath or common.correctionsFolder())

    def onAddToPool(self) -> None:
        with slicer.util.tryWithErrorDisplay("The image could not be added to the unlabelled pool.", waitCursor=True):
            count = self.widget.panel.add_to_pool(self.folder())
            self.poolLabel.text = f"{count} in the pool"
