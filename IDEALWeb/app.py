"""``idealsegment-web --data FOLDER``: IDEALSegment in the browser, on trame-slicer.

Slicer's own MRML scene, slice view and Segment Editor (trame-slicer) with the IDEALSegment panels'
controllers behind every button (:class:`~.session.WebSession`). Model work runs in the same warm
worker processes as in Slicer. Serves on 127.0.0.1 unless ``--host`` is given; another host needs
``--token`` (browsers then open ``http://HOST:PORT/?secret=TOKEN``). Reads only under ``--data``,
writes only under ``--output``.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import sys
import tempfile
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.labels import CARDIAC_LABELS

from .security import DataFolder, OutputFolder, serve_policy

TOKEN_VARIABLE = "IDEALSEGMENT_WEB_TOKEN"
POLL_SECONDS = 0.2
STRUCTURES = [{"value": 3, "title": "LV blood pool"}, {"value": 2, "title": "LV myocardium"}, {"value": 1, "title": "RV"}]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="idealsegment-web", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder holding the studies (DICOM folders, NIfTI/NRRD files); nothing outside it can be opened")
    parser.add_argument("--output", default="idealsegment-output", help="the only folder written to: results, reviewed cases, models, training runs")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE), help=f"access token, required for a host other than loopback (or ${TOKEN_VARIABLE})")
    parser.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--models", help="folder of registered models (default: OUTPUT/models)")
    parser.add_argument("--reviewer", default="web", help="name recorded with reviewed cases")
    return parser.parse_args(argv)


class IDEALWebApp:
    """The trame application: state bound to a :class:`~.session.WebSession` and trame-slicer's views and editor."""

    def __init__(self, server, data: DataFolder, output: OutputFolder, device: str = "auto", models: Path | None = None, reviewer: str = "web") -> None:
        from IDEALSegmentLib.registry import ModelRegistry
        from IDEALSegmentLib.segmentations import register_converter_rules
        from slicer import vtkSlicerSequencesLogic
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.app.logic.segmentation import SegmentEditorLogic
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from .session import WebSession

        self.server = server
        self.server.enable_module(trame_slicer_module)
        self.slicer = SlicerApp()
        register_converter_rules()
        self.sequences_logic = self.slicer.register_module_logic(vtkSlicerSequencesLogic(), logic_name="Sequences")
        register_rca_factories(self.slicer.view_manager, server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, server)
        self.layout_manager.register_layout_dict({"Slice": LayoutManager.default_grid_configuration()["Axial Only"]})
        self.layout_manager.set_layout("Slice")
        self.editor_logic = SegmentEditorLogic(server, self.slicer)
        registry = ModelRegistry(Path(models) if models else output.models)
        self.session = WebSession(self.slicer.scene, self.sequences_logic, data, output, registry, device, reviewer)
        self.session.panel.warm_up()
        self._observed_interactor = None
        self._poller: asyncio.Task | None = None
        self._init_state()
        self._build_ui()
        self.editor_logic.set_ui(self.editor_ui)
        self._bind()

    # -- state ------------------------------------------------------------------------------------
    @property
    def state(self):
        return self.server.state

    @property
    def ctrl(self):
        return self.server.controller

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "IDEALSegment"
        s.studies = self.session.studies()
        s.study_id = None
        s.models = self.session.models()
        s.model_key = self.session.panel.p.modelKey
        from IDEALSegmentLib.trainer_panel import EncoderStart

        s.structures = STRUCTURES
        s.reviewable = [{"value": info.segment_id, "title": info.name} for info in CARDIAC_LABELS]
        # Reusing a pretrained encoder bundle needs a file chooser: the Slicer panel offers it.
        s.encoders = [{"value": e.value, "title": e.label()} for e in EncoderStart if e is not EncoderStart.REUSE]
        s.update({
            "status": "Open a study from the data folder.", "error": "", "busy": False, "fraction": 0.0,
            "can_segment": False, "can_review": False, "can_uncertainty": False, "can_next_review": False,
            "can_recompute": False, "table": [], "quality": "", "expert": "", "frames": 1, "frame": 0, "is_pair": False, "show_es": False,
            "seg_visible": True, "seg_opacity": 0.5, "unc_visible": False, "unc_opacity": 0.5, "review_text": "",
            "voxels": {}, "voxel_total": -1, "click_mode": False, "click_structure": 3, "click_positive": True,
            "can_click": False, "can_undo_click": False, "refine_text": "", "click_count": 0, "refine_busy": False,
            "corrections": "", "pool": 0, "saved": [],
            "train_encoder": "model", "train_iterations": 200, "train_budget": 0, "training": False,
            "train_fraction": 0.0, "train_line": "", "train_validation": "", "train_status": "", "comparison": [],
            "can_use_model": False, "use_model_text": "Use this model", "use_model_question": "", "ask_use_model": False,
            "dataset_text": "", "train_plan": "",
        })
        self._refresh_dataset()

    # -- UI ---------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import VAppLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v
        from trame_slicer.app.ui.segmentation import SegmentEditorUI

        with VAppLayout(self.server, template_name="main", theme="dark") as layout:
            self.layout = layout
            with v.VAppBar(density="compact"):
                v.VToolbarTitle("IDEALSegment")
                v.VProgressLinear(v_if=("busy",), model_value=("fraction * 100",), color="green", height=4, absolute=True, location="bottom", id="progress")
            with v.VNavigationDrawer(permanent=True, width=440, location="left"):
                with v.VTabs(v_model=("tab", "segment"), density="compact", grow=True):
                    v.VTab("Segment", value="segment", id="tab-segment")
                    v.VTab("Edit", value="edit", id="tab-edit")
                    v.VTab("Retrain", value="retrain", id="tab-retrain")
                html.Div("{{ status }}", id="status", classes="text-caption pa-2", style="white-space: pre-wrap;")
                html.Div("{{ error }}", v_if=("error",), id="error", classes="text-caption pa-2 text-red", style="white-space: pre-wrap;")
                with v.VWindow(v_model=("tab",)):
                    with v.VWindowItem(value="segment"):
                        self._segment_tab(html, v)
                    with v.VWindowItem(value="edit"):
                        self._edit_tab(html, v, SegmentEditorUI)
                    with v.VWindowItem(value="retrain"):
                        self._retrain_tab(html, v)
            with v.VMain(), html.Div(id="views", style="position: relative; width: 100%; height: calc(100vh - 48px);"):
                self.layout_manager.initialize_layout_grid(layout)

    def _segment_tab(self, html, v) -> None:
        with html.Div(classes="pa-2"):
            v.VSelect(label="Study", items=("studies",), v_model=("study_id",), density="compact", id="study-select", hide_details=True)
            v.VBtn("Open", click=self.open_study, disabled=("!study_id || busy",), id="open-button", classes="my-1", block=True)
            v.VSelect(label="Model", items=("models",), v_model=("model_key",), density="compact", id="model-select", hide_details=True, classes="mt-2")
            with html.Div(classes="d-flex my-2"):
                v.VBtn("Segment", click=self.segment, disabled=("!can_segment",), id="segment-button", color="primary", classes="mr-2")
                v.VBtn("Cancel", click=self.cancel, disabled=("!busy",), id="cancel-button")
            v.VSlider(v_if=("frames > 1",), v_model=("frame",), min=0, max=("frames - 1",), step=1, label="Frame", thumb_label=True, density="compact", id="frame-slider", hide_details=True)
            v.VSwitch(v_if=("is_pair",), v_model=("show_es",), label="Show end-systole (ES)", density="compact", id="es-switch", hide_details=True)
            with html.Div(classes="d-flex align-center"):
                v.VCheckbox(v_model=("seg_visible",), label="Segmentation", density="compact", hide_details=True, id="seg-visible")
                v.VSlider(v_model=("seg_opacity",), min=0, max=1, step=0.05, density="compact", hide_details=True, id="seg-opacity")
            with html.Div(classes="d-flex align-center"):
                v.VCheckbox(v_model=("unc_visible",), label="Uncertainty", density="compact", hide_details=True, disabled=("!can_uncertainty",), id="unc-visible")
                v.VSlider(v_model=("unc_opacity",), min=0, max=1, step=0.05, density="compact", hide_details=True, id="unc-opacity")
            v.VBtn("Next slice to review", click=self.next_review, disabled=("!can_next_review",), id="next-review-button", block=True)
            html.Div("{{ review_text }}", id="review-text", classes="text-caption")
            with html.Table(id="measurements", v_if=("table.length",), classes="text-body-2 my-2", style="width: 100%;"):
                with html.Tr():
                    html.Th("Measurement", style="text-align: left;")
                    html.Th("Value", style="text-align: right;")
                    html.Th("Unit", style="text-align: left; padding-left: 6px;")
                with html.Tr(v_for="row in table", key="row.key", classes="measurement-row", raw_attrs=[':data-key="row.key"', ':data-exact="row.exact"']):
                    html.Td("{{ row.Measurement }}")
                    html.Td("{{ row.shown }}", style="text-align: right;")
                    html.Td("{{ row.Unit }}", style="padding-left: 6px;")
            html.Div("{{ quality }}", v_if=("quality",), id="quality", classes="text-caption", style="white-space: pre-wrap;")
            html.Div("{{ expert }}", v_if=("expert",), classes="text-caption")
            v.VSelect(
                label="Reviewed structures (none ticked: the edited ones)", items=("reviewable",), v_model=("reviewed", []), multiple=True,
                chips=True, density="compact", hide_details=True, id="reviewed-select", classes="mt-2",
            )
            with html.Div(classes="d-flex flex-wrap"):
                v.VBtn("Recompute", click=self.recompute, disabled=("!can_recompute",), id="recompute-button", size="small", classes="ma-1")
                v.VBtn("Mark reviewed", click=self.mark_reviewed, disabled=("!can_review",), id="mark-reviewed-button", size="small", classes="ma-1")
                v.VBtn("Add to unlabelled pool", click=self.add_to_pool, disabled=("!can_segment",), id="pool-button", size="small", classes="ma-1")
                v.VBtn("Save", click=self.save, disabled=("!can_review",), id="save-button", size="small", classes="ma-1")
            html.Div("{{ corrections }}", id="corrections-text", classes="text-caption")
            html.Div("Saved: {{ saved.join(', ') }}", v_if=("saved.length",), id="saved-text", classes="text-caption")

    def _edit_tab(self, html, v, SegmentEditorUI) -> None:
        with html.Div(classes="pa-2"):
            html.Div("Click to fix", classes="text-subtitle-2")
            v.VSelect(label="Structure", items=("structures",), v_model=("click_structure",), density="compact", hide_details=True, id="click-structure")
            with v.VBtnToggle(v_model=("click_positive",), mandatory=True, density="compact", classes="my-1"):
                v.VBtn("Positive (add)", value=(True,), id="click-positive")
                v.VBtn("Negative (remove)", value=(False,), id="click-negative")
            with html.Div(classes="d-flex"):
                v.VBtn("{{ click_mode ? 'Stop clicking' : 'Place clicks' }}", click="click_mode = !click_mode", disabled=("!can_click",), id="click-mode-button", classes="mr-2", size="small")
                v.VBtn("Undo last click", click=self.undo_click, disabled=("!can_undo_click",), id="undo-click-button", size="small")
            html.Div("{{ refine_text }}", id="refine-text", classes="text-caption")
            html.Div(
                "Voxels: {{ Object.entries(voxels).map(([k, n]) => k + ' ' + n).join(', ') }}",
                id="voxel-counts", classes="text-caption", raw_attrs=[':data-total="voxel_total"', ':data-counts="JSON.stringify(voxels)"'],
            )
            v.VDivider(classes="my-2")
            html.Div("Segment Editor", classes="text-subtitle-2")
        with html.Div(style="height: 560px;"):
            self.editor_ui = SegmentEditorUI()
        with html.Div(classes="d-flex pa-2"):
            v.VBtn("Undo edit", click=self.editor_ui.undo_clicked, disabled=(f"!{self.editor_logic.name.can_undo}",), id="undo-edit-button", size="small", classes="mr-2")
            v.VBtn("Redo edit", click=self.editor_ui.redo_clicked, disabled=(f"!{self.editor_logic.name.can_redo}",), id="redo-edit-button", size="small")

    def _retrain_tab(self, html, v) -> None:
        with html.Div(classes="pa-2"):
            html.Div("{{ dataset_text }}", id="dataset-text", classes="text-caption", style="white-space: pre-wrap;")
            v.VSelect(label="Start from", items=("encoders",), v_model=("train_encoder",), density="compact", hide_details=True, id="train-encoder", classes="my-1")
            v.VTextField(label="Iterations", v_model_number=("train_iterations",), type="number", density="compact", hide_details=True, id="train-iterations", classes="my-1")
            v.VTextField(label="Labelled cases (0 = all)", v_model_number=("train_budget",), type="number", density="compact", hide_details=True, id="train-budget", classes="my-1")
            with html.Div(classes="d-flex my-1"):
                v.VBtn("Train", click=self.train, disabled=("training || busy",), id="train-button", color="primary", classes="mr-2")
                v.VBtn("Cancel training", click=self.cancel_training, disabled=("!training",), id="cancel-train-button")
            v.VProgressLinear(v_if=("training",), model_value=("train_fraction * 100",), height=6, color="green", id="train-progress")
            html.Div("Plan: {{ train_plan }}", v_if=("train_plan",), id="train-plan", classes="text-caption")
            html.Div("{{ train_line }}", id="train-line", classes="text-caption")
            html.Div("{{ train_validation }}", id="train-validation", classes="text-caption")
            html.Div("{{ train_status }}", id="train-status", classes="text-caption", style="white-space: pre-wrap;")
            with html.Table(id="comparison", v_if=("comparison.length",), classes="text-body-2 my-2", style="width: 100%;"):
                with html.Tr():
                    html.Th("{{ key }}", v_for="key in Object.keys(comparison[0])", style="text-align: left;")
                with html.Tr(v_for="(row, i) in comparison", key="i"):
                    html.Td("{{ value }}", v_for="value in Object.values(row)")
            v.VBtn("{{ use_model_text }}", click=self.use_model, disabled=("!can_use_model",), id="use-model-button", block=True)
            with v.VDialog(v_model=("ask_use_model",), max_width=480):
                with v.VCard():
                    v.VCardText("{{ use_model_question }}")
                    with v.VCardActions():
                        v.VBtn("Keep the current model", click="ask_use_model = false", id="keep-model-button")
                        v.VBtn("Use it anyway", click=self.use_model_anyway, id="use-anyway-button", color="warning")

    # -- bindings ---------------------------------------------------------------------------------
    def _bind(self) -> None:
        s = self.state
        s.change("model_key")(self._on_model)
        s.change("frame")(self._on_frame)
        s.change("show_es")(self._on_show_es)
        s.change("seg_visible", "seg_opacity", "unc_visible", "unc_opacity")(self._on_overlays)
        s.change("click_structure", "click_positive")(self._on_click_choice)
        s.change("click_mode")(self._on_click_mode)
        self.editor_logic.segmentation_editor.segmentation_modified.connect(self._on_edited)
        self.ctrl.on_server_ready.add(self._start_polling)
        self.ctrl.on_server_exited.add(lambda **_: self.session.shutdown())
        atexit.register(self.session.shutdown)
        self.server.add_protocol_to_configure(self._watch_clients)

    def _watch_clients(self, protocol) -> None:
        """Cancel every job and stop the workers when the last browser tab closes."""
        from wslink.websocket import LinkProtocol

        app = self

        class ClientWatch(LinkProtocol):
            clients: set = set()

            def onConnect(self, request, client_id):
                self.clients.add(client_id)
                app.session.panel.warm_up()

            def onClose(self, client_id):
                self.clients.discard(client_id)
                if not self.clients:
                    app.session.shutdown()

        protocol.registerLinkProtocol(ClientWatch())

    def _guard(self, action, *args):
        """Run a user action; an IdealError shows as the one-line error, never a traceback."""
        try:
            self.state.error = ""
            return action(*args)
        except IdealError as error:
            self.state.error = str(error)
        finally:
            self._refresh()
        return None

    # -- actions ----------------------------------------------------------------------------------
    def open_study(self) -> None:
        def do():
            study = self.session.open(self.state.study_id)
            self.editor_logic.segmentation_editor.deactivate_effect()
            self.state.frames, self.state.frame = study.frames, 0
            self.state.is_pair, self.state.show_es = study.es_volume is not None, False
            self.state.saved = []
            self._show()

        self._guard(do)

    def segment(self) -> None:
        self._guard(self.session.segment)

    def cancel(self) -> None:
        self._guard(self.session.panel.cancel)

    def next_review(self) -> None:
        def do():
            self.state.show_es = False
            index, ras, text = self.session.next_review_slice()
            self._show()
            slice_node = self._slice_view().get_view_node()
            slice_node.JumpSliceByCentering(*ras)
            self.state.review_text = text

        self._guard(do)

    def recompute(self) -> None:
        self._guard(self.session.recompute)

    def mark_reviewed(self) -> None:
        self._guard(self.session.mark_reviewed, list(self.state.reviewed or []))
        self._refresh_dataset()

    def add_to_pool(self) -> None:
        self._guard(self.session.add_to_pool)
        self._refresh_dataset()

    def save(self) -> None:
        written = self._guard(self.session.save)
        if written:
            self.state.saved = [str(p.relative_to(self.session.output.root)) for p in written]

    def undo_click(self) -> None:
        self._guard(self.session.undo_click)

    def train(self) -> None:
        s = self.state
        self._guard(self.session.train, s.train_encoder, int(s.train_iterations or 1), int(s.train_budget or 0))

    def cancel_training(self) -> None:
        self._guard(self.session.trainer.cancel)

    def use_model(self) -> None:
        question = self.session.trainer.use_model_question()
        if question:
            self.state.use_model_question, self.state.ask_use_model = question, True
            return
        self.use_model_anyway()

    def use_model_anyway(self) -> None:
        self.state.ask_use_model = False
        entry = self._guard(self.session.use_new_model)
        if entry is not None:
            self.state.models = self.session.models()
            self.state.model_key = self.session.panel.p.modelKey

    # -- reactions ----------------------------------------------------------------------------------
    def _on_model(self, model_key, **_) -> None:
        if model_key and model_key != self.session.panel.p.modelKey:
            self._guard(self.session.choose_model, model_key)

    def _on_frame(self, frame, **_) -> None:
        if self.session.study is not None and self.session.study.browser is not None:
            self._guard(self.session.set_frame, int(frame))
            self._show()

    def _on_show_es(self, show_es, **_) -> None:
        if self.session.showing_es != bool(show_es):
            self.session.showing_es = bool(show_es)
            self._show()

    def _on_click_choice(self, click_structure, click_positive, **_) -> None:
        self.session.click_structure, self.session.click_positive = int(click_structure), bool(click_positive)

    def _on_click_mode(self, click_mode, **_) -> None:
        if click_mode:
            self.editor_logic.segmentation_editor.deactivate_effect()

    def _on_overlays(self, seg_visible, seg_opacity, unc_visible, unc_opacity, **_) -> None:
        for segmentation in (self.session.panel.p.segmentation, self.session.panel.p.esSegmentation):
            display = segmentation.GetDisplayNode() if segmentation is not None else None
            if display is not None:
                display.SetVisibility(bool(seg_visible))
                display.SetOpacity(float(seg_opacity))
        view = self._slice_view()
        uncertainty = self.session.panel.p.uncertaintyVolume
        show = bool(unc_visible) and uncertainty is not None and not self.session.showing_es
        view.set_foreground_volume_id(uncertainty.GetID() if show else None)
        view.set_foreground_opacity(float(unc_opacity) if show else 0.0)
        view.schedule_render()

    def _on_edited(self, *_) -> None:
        self._refresh_voxels()

    # -- display ----------------------------------------------------------------------------------
    def _slice_view(self):
        return self.slicer.view_manager.get_slice_views()[0]

    def _show(self) -> None:
        """The shown volume in the slice view, its plane from the volume's own axes, its segmentation editable."""
        volume, segmentation = self.session.shown_volume(), self.session.shown_segmentation()
        view = self._slice_view()
        self._observe_clicks(view)
        if volume is None:
            return
        view.set_background_volume_id(volume.GetID())
        set_plane_from_volume(view.get_view_node(), volume)
        view.fit_view_to_content()
        for node in self.slicer.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(node is segmentation and bool(self.state.seg_visible))
        if segmentation is not None:
            if segmentation.GetDisplayNode() is None:
                segmentation.CreateDefaultDisplayNodes()
            self.editor_logic.segmentation_editor.set_active_segmentation(segmentation, volume)
        self._on_overlays(self.state.seg_visible, self.state.seg_opacity, self.state.unc_visible, self.state.unc_opacity)
        view.schedule_render()

    def _observe_clicks(self, view) -> None:
        """Left clicks on the slice view become click-to-fix points while "Place clicks" is on."""
        interactor = view.interactor()
        if self._observed_interactor is interactor:
            return
        self._observed_interactor = interactor

        def on_press(caller, _event):
            if not self.state.click_mode:
                return
            x, y = caller.GetEventPosition()
            matrix = view.get_view_node().GetXYToRAS()
            ras = [sum(matrix.GetElement(r, c) * value for c, value in enumerate((x, y, 0.0, 1.0))) for r in range(3)]
            with self.state:
                self._guard(self.session.click, tuple(ras))

        interactor.AddObserver("LeftButtonPressEvent", on_press, 10.0)

    # -- polling ----------------------------------------------------------------------------------
    def _start_polling(self, **_) -> None:
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_loop())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            session = self.session
            if not (session.busy or session.panel.polling):
                continue
            with self.state:
                try:
                    events = session.poll()
                except IdealError as error:
                    self.state.error = str(error)
                    continue
                if events.error:
                    self.state.error = events.error
                if events.segmented:
                    self.state.unc_visible = False
                    self._show()
                if events.refined:
                    self._slice_view().schedule_render()
                if events.trained:
                    self._refresh_dataset()
                self._refresh(voxels=events.segmented or events.refined)

    def _refresh_dataset(self) -> None:
        try:
            text, _ = self.session.dataset()
            self.state.dataset_text = text or "No reviewed cases yet: Mark reviewed adds the shown case to the training set."
            summary = self.session.corrections_summary()
            self.state.corrections = f"Training set: {summary.get('cases', 0)} reviewed case(s), {summary.get('unlabeled_volumes', 0)} unlabelled volume(s)"
        except IdealError as error:
            self.state.dataset_text = f"The training set cannot be read: {error}"

    def _refresh_voxels(self) -> None:
        try:
            counts = self.session.voxel_counts()
        except IdealError:
            counts = {}
        self.state.voxels = counts
        self.state.voxel_total = sum(counts.values()) if counts else -1

    def _refresh(self, voxels: bool = True) -> None:
        """Copy the controllers' state onto trame's state (what the Qt widgets do with their widgets); ``voxels``: read the
        voxel counts back too (a whole-volume export: not on every progress tick)."""
        s, session = self.state, self.session
        panel = session.panel.state()
        s.status = session.panel.p.statusText
        s.busy, s.fraction = panel.busy, panel.fraction
        s.can_segment, s.can_review = panel.segment, panel.review
        s.can_uncertainty, s.can_next_review, s.can_recompute = panel.uncertainty, panel.next_review_slice, panel.recompute
        s.table, s.expert, s.quality = session.table(), session.expert(), panel.quality
        add, undo, text = session.refine_state()
        s.can_click, s.can_undo_click, s.refine_text = add, undo, text
        s.refine_busy = session.refine.session is not None and session.refine.session.busy
        s.click_count = len(session.refine.session.clicks()) if session.refine.session is not None else 0
        trainer = session.trainer.state()
        s.training = trainer.busy
        s.train_fraction, s.train_line, s.train_validation = session.training_fraction, session.training_line, session.validation_line
        s.train_status = session.trainer.p.statusText
        s.train_plan = " then ".join(session.trainer.phases)
        s.comparison = session.comparison()
        s.can_use_model, s.use_model_text = trainer.use_model, trainer.use_model_text
        if voxels:
            self._refresh_voxels()


def set_plane_from_volume(slice_node: object, volume: object) -> None:
    """Slice in the volume's own acquisition plane (its i and j axes), through its middle slice.

    Slicer's default axial view reformats an oblique short-axis stack into a long-axis cut.
    """
    import numpy as np
    from IDEALSegmentLib.volumes import world_ijk_to_ras

    matrix = world_ijk_to_ras(volume)
    normal, transverse = matrix[:3, 2], matrix[:3, 0]
    dims = volume.GetImageData().GetDimensions()
    centre = matrix @ np.array([(dims[0] - 1) / 2, (dims[1] - 1) / 2, (dims[2] - 1) // 2, 1.0])
    normal, transverse = normal / np.linalg.norm(normal), transverse / np.linalg.norm(transverse)
    slice_node.SetSliceToRASByNTP(*normal, *transverse, *centre[:3], 0)


def main(argv: list[str] | None = None) -> int:
    """Start the web app; a bad option is one line on stderr and exit status 2."""
    args = parse_arguments(argv)
    try:
        policy = serve_policy(args.host, args.port, args.token)
        data = DataFolder(args.data)
        output = OutputFolder(args.output)
    except IdealError as error:
        print(f"idealsegment-web: error: {error}", file=sys.stderr)
        return 2
    # Temporary files of this process and its workers go into the output folder too.
    os.environ["TMPDIR"] = str(output.scratch)
    tempfile.tempdir = str(output.scratch)
    from trame.app import get_server

    server = get_server("idealsegment-web", client_type="vue3")
    sys.argv = sys.argv[:1]  # trame parses sys.argv too: these options are ours
    server.cli.set_defaults(authKey=policy.token or "wslink-secret")
    app = IDEALWebApp(server, data, output, args.device, args.models, args.reviewer)
    server.controller.on_server_ready.add(lambda **_: print(policy.banner(server.port), flush=True))
    try:
        server.start(host=policy.host, port=policy.port, open_browser=False, show_connection_info=False, disable_logging=True, timeout=0)
    finally:
        app.session.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
