"""The *Refine* section of the IDEALSegment panel: humble widgets bound to IDEALSegmentLib.refinement.

A structure selector, an engine selector, *Add positive* / *Add negative* (one point placed in a slice
view each) and *Undo last click*. Every decision is in :class:`~IDEALSegmentLib.refinement.RefineController`; this
file only builds widgets, enters Slicer's markups place mode and polls from a timer.

The IDEALSegment widget adds it at the end of ``setup()`` with one line (the section reads the
widget's parameter node, chosen model and device, and cleans up when the scene closes)::

    self.refineSection = refine.RefineSection.attach(self)  # IDEALSegment.py, end of setup()

``cleanup()`` stops its timer, removes its scene and point-list observers and cancels a refinement in
flight; the widget's ``cleanup()`` calls it (Slicer exits, or the module is reloaded).
"""
from __future__ import annotations

import ctk
import qt
import slicer
from IDEALSegmentLib.refinement import RefineController
from IDEALSegmentLib.registry import entry_key

from IDEALSegmentGui import common

#: The section of IDEALSegment.ui that the Refine section follows (in the .ui's own layout, above its closing spacer).
ANCHOR = "resultsCollapsibleButton"


class RefineSection:
    """Widgets and bindings of the Refine section; ``inputs()`` gives (volume, segmentation, model, device)."""

    def __init__(self, parentLayout, inputs, index: int = -1) -> None:
        """Build the section into ``parentLayout`` at ``index`` (-1: at the end)."""
        self.inputs = inputs
        self.controller = RefineController()
        self._observed = None
        self._observer = None
        self._sceneObserver = None
        box = ctk.ctkCollapsibleButton()
        box.text = "Refine (click to fix)"
        box.collapsed = True
        parentLayout.insertWidget(index, box)
        form = qt.QFormLayout(box)
        self.structureComboBox = qt.QComboBox()
        for value, name in self.controller.structures():
            self.structureComboBox.addItem(name, value)
        form.addRow("Structure:", self.structureComboBox)
        self.engineComboBox = qt.QComboBox()
        for key, name in self.controller.engines():
            self.engineComboBox.addItem(name, key)
        self.engineComboBox.toolTip = "How a click edits the segmentation (the correction network is the default)"
        form.addRow("Engine:", self.engineComboBox)
        buttons = qt.QHBoxLayout()
        self.positiveButton = qt.QPushButton("Add positive")
        self.positiveButton.toolTip = "Place a point inside the structure where it is missing"
        self.negativeButton = qt.QPushButton("Add negative")
        self.negativeButton.toolTip = "Place a point where the structure is wrongly marked"
        self.undoButton = qt.QPushButton("Undo last click")
        for button in (self.positiveButton, self.negativeButton, self.undoButton):
            buttons.addWidget(button)
        form.addRow(buttons)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        self.positiveButton.connect("clicked(bool)", lambda _checked: self.onAdd(True))
        self.negativeButton.connect("clicked(bool)", lambda _checked: self.onAdd(False))
        self.undoButton.connect("clicked(bool)", lambda _checked: self.onUndo())
        self.engineComboBox.connect("currentIndexChanged(int)", lambda _index: self.onEngine())
        self.timer = qt.QTimer()
        self.timer.setInterval(common.POLL_MILLISECONDS)
        self.timer.timeout.connect(self.onPoll)
        self.timer.start()

    @classmethod
    def attach(cls, widget) -> RefineSection:
        """The section of an IDEALSegment module widget, fed from its parameter node and model choice.

        It goes right after the review section (:data:`ANCHOR`) in the .ui's layout: added to the
        module's layout instead, it would land below Settings and the .ui's closing spacer.
        """

        def inputs():
            p = widget._parameterNode
            volume, segmentation = (p.inputVolume, p.segmentation) if p is not None else (None, None)
            entry = next((e for e in widget.panel.entries if entry_key(e) == getattr(p, "modelKey", "")), None)
            model = str(entry.path) if entry is not None else None
            return volume, segmentation, model, common.comboData(widget.ui.deviceComboBox)

        anchor = getattr(widget.ui, ANCHOR)
        layout = anchor.parentWidget().layout()
        section = cls(layout, inputs, layout.indexOf(anchor) + 1)
        section._sceneObserver = slicer.mrmlScene.AddObserver(
            slicer.mrmlScene.StartCloseEvent, lambda _caller, _event: section.controller.close()
        )
        return section

    def update(self) -> None:
        """Copy the controller's state onto the widgets."""
        volume, segmentation, model, _device = self.inputs()
        add, undo, text = self.controller.state(volume, segmentation, model)
        self.positiveButton.enabled = self.negativeButton.enabled = add
        self.undoButton.enabled = undo
        self.statusLabel.text = text

    def onAdd(self, positive: bool) -> None:
        volume, segmentation, model, device = self.inputs()
        label = self.structureComboBox.currentData
        with slicer.util.tryWithErrorDisplay("Cannot add the click", waitCursor=True):
            markups = self.controller.start_placing(volume, segmentation, model, device, label, positive)
            self._watch(markups)
            selection = slicer.app.applicationLogic().GetSelectionNode()
            selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
            selection.SetActivePlaceNodeID(markups.GetID())
            slicer.app.applicationLogic().GetInteractionNode().SetPlaceModePersistence(0)
            slicer.app.applicationLogic().GetInteractionNode().SetCurrentInteractionMode(
                slicer.vtkMRMLInteractionNode.Place
            )

    def _watch(self, markups) -> None:
        if self._observed is markups:
            return
        if self._observed is not None:
            self._observed.RemoveObserver(self._observer)
        self._observed = markups
        self._observer = markups.AddObserver(markups.PointPositionDefinedEvent, self.onPointPlaced)

    def onPointPlaced(self, caller, _event) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot refine", waitCursor=True):
            self.controller.point_placed(caller.GetNumberOfControlPoints() - 1)
        self.update()

    def onEngine(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot choose the engine"):
            self.controller.choose_engine(self.engineComboBox.currentData)

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot undo", waitCursor=True):
            self.controller.undo(*self.inputs())
        self.update()

    def onPoll(self) -> None:
        with slicer.util.tryWithErrorDisplay("Refinement failed"):
            self.controller.poll()
        self.update()

    def cleanup(self) -> None:
        """The panel goes away or the scene closes."""
        self.timer.stop()
        if self._sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None
        if self._observed is not None:
            self._observed.RemoveObserver(self._observer)
            self._observed = None
        self.controller.close()
