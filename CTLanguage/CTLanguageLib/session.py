"""Per-scene state of the module, free of Qt and of the Slicer application.

The widget reaches it only through ``logic.Logic`` (its single front); the trame web demo and the
pytest suite use :class:`CTLanguageSession` directly on a ``vtkMRMLScene`` from ``slicer-core``.

A session holds: the loaded engine (per model id + device), one encoding per input volume node,
and the list of current results (finding + segment id). The engine answers every prompt with its
mask; a finding judged absent at the probability threshold (the engine's rule,
``Finding.judged_absent``) is drawn and exported with an empty mask unless ``absent_masks`` is on
(:meth:`CTLanguageSession.shown`), so the scene, the table and every export agree. A new
mask or probability threshold re-thresholds each finding's stored logits
(``Finding.with_threshold``: no query, no re-encoding) and replaces the segments' masks in place. Errors that a user can cause are
raised as ``ValueError`` with one specific sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import mrml_glue
from .background import EncodingJob
from .results_table import findings_to_table

DEFAULT_MASK_THRESHOLD = 0.5
DEFAULT_PROBABILITY_THRESHOLD = 0.5
HISTORY_LENGTH = 50


@dataclass
class Result:
    prompt: str
    finding: object
    segment_id: str
    visible: bool = True
    answer: object = None         # the engine's answer with its mask; ``finding`` is it as drawn


@dataclass
class SessionState:
    volume_node_id: str | None = None
    encoding: object | None = None
    segmentation_node_id: str | None = None
    table_node_id: str | None = None
    heatmap_node_id: str | None = None
    results: list = field(default_factory=list)


class CTLanguageSession:
    def __init__(self, scene, engine_loader=None):
        self.scene = scene
        self._engine_loader = engine_loader  # injectable for tests: (model, device) -> engine
        self._engines: dict = {}
        self.model_id = "default"
        self.device: str | None = None
        self.mask_threshold = DEFAULT_MASK_THRESHOLD
        self.probability_threshold = DEFAULT_PROBABILITY_THRESHOLD
        self.absent_masks = False   # True: findings judged absent keep their masks
        self.history: list[str] = []
        self.states: dict[str, SessionState] = {}
        self.job: EncodingJob | None = None

    # ---- engine --------------------------------------------------------------------------------
    def set_model(self, model_id: str, device: str | None = None) -> None:
        """Select the model and device. Encodings made with another model are dropped (their
        segments and table rows stay until the next prompt), so prompts ask for a new Encode."""
        model_id = str(model_id or "default")
        device = None if device in (None, "", "auto") else str(device).lower()
        if (model_id, device) != (self.model_id, self.device):
            for state in self.states.values():
                state.encoding = None
        self.model_id, self.device = model_id, device

    def engine(self):
        key = (self.model_id, self.device)
        if key not in self._engines:
            if self._engine_loader is not None:
                self._engines[key] = self._engine_loader(self.model_id, self.device)
            else:
                from ctlanguage.engine import Engine  # heavy (torch): only here

                try:
                    self._engines[key] = Engine.load(model=self.model_id, device=self.device)
                except Exception as exc:
                    raise ValueError(str(exc)) from exc
        return self._engines[key]

    def model_label(self) -> str:
        """'research use only — model: <id> <version>' (the spec until the model is loaded)."""
        record = self.model_record()
        return f"research use only — model: {record['id']} {record['version'] or ''}".strip()

    def model_record(self) -> dict:
        """id / version / sha256 of the selected model (the engine's ``describe()`` once loaded)."""
        engine = self._engines.get((self.model_id, self.device))
        d = engine.describe() if engine is not None else {}
        return {"id": d.get("id", self.model_id), "version": d.get("version"), "sha256": d.get("sha256")}

    # ---- encoding ------------------------------------------------------------------------------
    def state_for(self, volume_node) -> SessionState:
        if volume_node is None:
            raise ValueError("Select an input CT volume.")
        vid = volume_node.GetID()
        if vid not in self.states:
            self.states[vid] = SessionState(volume_node_id=vid)
        return self.states[vid]

    def is_encoded(self, volume_node) -> bool:
        return volume_node is not None and self.state_for(volume_node).encoding is not None

    def encode_inline(self, volume_node, progress=None, cancel=None):
        """Encode in this process (batch use, tests). The scene is not modified."""
        volume = mrml_glue.volume_node_to_ctvolume(volume_node)
        try:
            encoding = self.engine().encode(volume, progress=progress, cancel=cancel)
        except Exception as exc:
            raise ValueError(str(exc)) from exc
        self.state_for(volume_node).encoding = encoding
        return encoding

    def start_encoding(self, volume_node, waitForCompletion: bool = False, process_factory=None,
                       on_progress=None, on_done=None, worker_script=None) -> EncodingJob:
        """Encode in a separate process. ``on_done(state, message)`` is called once with
        state 'finished' | 'failed' | 'cancelled'. With ``waitForCompletion`` this blocks."""
        if self.job is not None and self.job.running:
            raise ValueError("An encoding is already running; cancel it first.")
        volume = mrml_glue.volume_node_to_ctvolume(volume_node)
        vid = volume_node.GetID()
        kwargs = {"model": self.model_id, "device": self.device}
        if process_factory is not None:
            kwargs["process_factory"] = process_factory
        if worker_script is not None:
            kwargs["worker_script"] = worker_script
        job = EncodingJob(volume, **kwargs)
        if on_progress is not None:
            job.progress.connect(on_progress)

        def _finished(path):
            try:
                from ctlanguage.engine import Encoding

                encoding = Encoding.load(path, self.engine(), volume=volume)
            except Exception as exc:
                job.state = "failed"
                job.error = f"The encoding could not be loaded: {exc}"
                if on_done is not None:
                    on_done("failed", job.error)
                return
            finally:
                job.discard()
            node = self.scene.GetNodeByID(vid)
            if node is not None:
                self.state_for(node).encoding = encoding
            if on_done is not None:
                on_done("finished", "")

        job.finished.connect(_finished)
        if on_done is not None:
            job.failed.connect(lambda message: on_done("failed", message))
            job.cancelled.connect(lambda: on_done("cancelled", "Encoding cancelled."))
        self.job = job
        job.start(waitForCompletion=False)
        if waitForCompletion:
            job.wait()
            if job.state == "failed":
                raise ValueError(job.error or "Encoding failed.")
        return job

    # ---- prompts -------------------------------------------------------------------------------
    def _remember(self, prompts: list[str]) -> None:
        for p in reversed(prompts):  # most recent run first, in typed order
            if p in self.history:
                self.history.remove(p)
            self.history.insert(0, p)
        del self.history[HISTORY_LENGTH:]

    def run_prompts(self, volume_node, text: str) -> list:
        """Run the prompts in ``text`` (the engine splits them: ';', '|' or new lines); add or
        replace one segment per prompt and refresh the findings table. Returns the session's
        results for this volume."""
        state = self.state_for(volume_node)
        if state.encoding is None:
            raise ValueError("Encode the volume first (press Encode).")
        try:  # every mask is computed and kept; shown() empties those judged absent
            findings = self.engine().query(state.encoding, text, mask_threshold=self.mask_threshold,
                                           absent_masks=True)
        except Exception as exc:
            raise ValueError(str(exc)) from exc
        seg = self.segmentation_node(volume_node, create=True)
        by_prompt = {r.prompt: r for r in state.results}
        for f in findings:
            old = by_prompt.get(f.prompt)
            visible = mrml_glue.finding_visible(f, self.probability_threshold)
            drawn = self.shown(f)
            if old is not None:
                mrml_glue.add_finding_segment(seg, drawn, volume_node, segment_id=old.segment_id,
                                              visible=visible and old.visible)
                old.finding, old.answer = drawn, f
            else:
                sid = mrml_glue.add_finding_segment(seg, drawn, volume_node, visible=visible)
                by_prompt[f.prompt] = Result(prompt=f.prompt, finding=drawn, segment_id=sid, answer=f)
                state.results.append(by_prompt[f.prompt])
        self._remember([f.prompt for f in findings])
        self.update_table(volume_node)
        return state.results

    def shown(self, finding):
        """The finding as drawn, listed and exported: one judged absent at the probability
        threshold gets an empty mask (marked ``mask_suppressed``) unless ``absent_masks``."""
        if not self.absent_masks and finding.judged_absent(self.probability_threshold):
            return finding.without_mask()
        return finding

    def set_absent_masks(self, volume_node, on: bool) -> None:
        """Draw (and export) the masks of findings judged absent, or leave them empty (default)."""
        self.absent_masks = bool(on)
        self.set_thresholds(volume_node)

    def set_thresholds(self, volume_node, mask_threshold: float | None = None,
                       probability_threshold: float | None = None) -> None:
        """Apply new thresholds to the current results without re-encoding."""
        if mask_threshold is not None:
            if not 0.0 < float(mask_threshold) < 1.0:
                raise ValueError("The mask threshold must be between 0 and 1.")
        if probability_threshold is not None and not 0.0 <= float(probability_threshold) <= 1.0:
            raise ValueError("The probability threshold must be between 0 and 1.")
        mask_changed = mask_threshold is not None and float(mask_threshold) != self.mask_threshold
        if mask_threshold is not None:
            self.mask_threshold = float(mask_threshold)
        if probability_threshold is not None:
            self.probability_threshold = float(probability_threshold)
        if volume_node is None or volume_node.GetID() not in self.states:
            return
        state = self.state_for(volume_node)
        seg = self.segmentation_node(volume_node)
        if seg is None or not state.results:
            return
        for r in state.results:  # each answer keeps its logits: a new mask without another query
            try:
                if mask_changed:
                    r.answer = r.answer.with_threshold(self.mask_threshold)
                drawn = self.shown(r.answer)
            except Exception as exc:
                raise ValueError(str(exc)) from exc
            if mask_changed or drawn.mask_suppressed != r.finding.mask_suppressed:
                mrml_glue.set_segment_mask(seg, r.segment_id, drawn.mask, volume_node)
            r.finding = drawn
        display = seg.GetDisplayNode()
        for r in state.results:
            if display is not None and seg.GetSegmentation().GetSegment(r.segment_id) is not None:
                display.SetSegmentVisibility(
                    r.segment_id, r.visible and mrml_glue.finding_visible(r.finding, self.probability_threshold))
        self.update_table(volume_node)

    def set_result_visible(self, volume_node, row: int, visible: bool) -> None:
        state = self.state_for(volume_node)
        r = state.results[row]
        r.visible = bool(visible)
        seg = self.segmentation_node(volume_node)
        if seg is not None and seg.GetDisplayNode() is not None:
            seg.GetDisplayNode().SetSegmentVisibility(
                r.segment_id, r.visible and mrml_glue.finding_visible(r.finding, self.probability_threshold))

    def remove_result(self, volume_node, row: int) -> None:
        state = self.state_for(volume_node)
        r = state.results.pop(row)
        seg = self.segmentation_node(volume_node)
        if seg is not None:
            seg.GetSegmentation().RemoveSegment(r.segment_id)
        self.update_table(volume_node)

    def results(self, volume_node) -> list:
        if volume_node is None or volume_node.GetID() not in self.states:
            return []
        return self.state_for(volume_node).results

    # ---- MRML outputs --------------------------------------------------------------------------
    def segmentation_node(self, volume_node, create: bool = False):
        state = self.state_for(volume_node)
        node = self.scene.GetNodeByID(state.segmentation_node_id) if state.segmentation_node_id else None
        if node is None and create:
            node = mrml_glue.new_segmentation_node(self.scene, volume_node, f"{volume_node.GetName()} findings")
            node.SetAttribute(mrml_glue.ATTRIBUTE_PREFIX + "ModelId", self.model_id)
            state.segmentation_node_id = node.GetID()
        return node

    def table_node(self, volume_node, create: bool = False):
        state = self.state_for(volume_node)
        node = self.scene.GetNodeByID(state.table_node_id) if state.table_node_id else None
        if node is None and create:
            node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{volume_node.GetName()} findings table")
            state.table_node_id = node.GetID()
        return node

    def update_table(self, volume_node):
        state = self.state_for(volume_node)
        table = self.table_node(volume_node, create=True)
        findings_to_table(self.scene, [r.finding for r in state.results],
                                    [r.segment_id for r in state.results], table_node=table,
                                    model_id=self.model_id)
        table.SetAttribute(mrml_glue.ATTRIBUTE_PREFIX + "MaskThreshold", f"{self.mask_threshold:g}")
        table.SetAttribute(mrml_glue.ATTRIBUTE_PREFIX + "ProbabilityThreshold", f"{self.probability_threshold:g}")
        return table

    def show_heatmap(self, volume_node, row: int):
        """Heat map of result ``row`` as a scalar volume (reused across rows)."""
        state = self.state_for(volume_node)
        finding = state.results[row].finding
        heat = finding.heatmap()
        if heat is None:
            raise ValueError("This model gives no heat map for that prompt.")
        existing = self.scene.GetNodeByID(state.heatmap_node_id) if state.heatmap_node_id else None
        node = mrml_glue.heatmap_to_volume(self.scene, heat, volume_node,
                                           name=f"{volume_node.GetName()} heat map", node=existing)
        node.SetAttribute(mrml_glue.ATTRIBUTE_PREFIX + "Prompt", state.results[row].prompt)
        state.heatmap_node_id = node.GetID()
        return node

    def jump_target_ras(self, volume_node, row: int):
        state = self.state_for(volume_node)
        r = state.results[row]
        seg = self.segmentation_node(volume_node)
        center = mrml_glue.segment_center_ras(seg, r.segment_id) if seg is not None else None
        if center is None:
            return None
        parent = seg.GetParentTransformNode()
        if parent is not None:  # segment coordinates are local; slice views want world RAS
            import vtk

            m = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(m)
            center = list(m.MultiplyPoint(list(center) + [1.0])[:3])
        return center
