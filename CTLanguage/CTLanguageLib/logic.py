"""The module widget's single front: every call the Qt widget (CTLanguage.py) makes goes here.

:class:`Logic` is free of Qt and of the Slicer application (``CTLanguageLogic`` in CTLanguage.py
mixes it into a ``ScriptedLoadableModuleLogic``), so pytest drives it on a real ``vtkMRMLScene``.
It holds one :class:`~CTLanguageLib.session.CTLanguageSession` per scene and raises
``ValueError`` with one specific sentence for anything a user can cause.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import exports
from .session import CTLanguageSession

RESOURCES_DIR = Path(__file__).resolve().parents[1] / "CTLanguageResources"  # embedded model + catalog


class Logic:
    def __init__(self, scene, engineLoader=None) -> None:
        if RESOURCES_DIR.is_dir():  # installed extension: the engine finds its resources here
            os.environ.setdefault("CTLANGUAGE_RESOURCES", str(RESOURCES_DIR))
        self.scene = scene
        self._engineLoader = engineLoader  # (model, device) -> engine; tests inject one
        self._session = CTLanguageSession(scene, engine_loader=engineLoader)
        self._requirementsChecked = False

    def resetSession(self) -> None:
        """After a scene close: forget volumes and results, keep model, device and history."""
        old = self._session
        self._session = CTLanguageSession(self.scene, engine_loader=self._engineLoader)
        self._session.set_model(old.model_id, old.device)
        self._session.history = list(old.history)

    def setupPythonRequirements(self, ask: bool = True) -> None:
        """torch through the PyTorch extension, the rest through pip after asking (dependencies.py)."""
        if self._requirementsChecked:
            return
        from . import dependencies

        dependencies.ensure_dependencies(ask=ask)
        self._requirementsChecked = True

    # ---- model ---------------------------------------------------------------------------------
    def setModel(self, modelSpec: str, device: str = "auto") -> None:
        self._session.set_model(modelSpec, device)

    def modelLabel(self) -> str:
        return self._session.model_label()

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, volumeNode, waitForCompletion: bool = False, onProgress=None, onDone=None):
        """Encode ``volumeNode`` in a separate process. The GUI polls the returned job with a
        QTimer (``background.start_qt_polling``); scripts pass ``waitForCompletion=True``."""
        if volumeNode is None:
            raise ValueError("Select an input CT volume.")
        return self._session.start_encoding(volumeNode, waitForCompletion=waitForCompletion,
                                            on_progress=onProgress, on_done=onDone)

    def encodeInline(self, volumeNode):
        """Encode in this process (scripts, tests); the scene is not modified."""
        return self._session.encode_inline(volumeNode)

    def isEncoding(self) -> bool:
        job = self._session.job
        return job is not None and job.running

    def cancelEncoding(self) -> None:
        if self.isEncoding():
            self._session.job.cancel()

    def isEncoded(self, volumeNode) -> bool:
        return self._session.is_encoded(volumeNode)

    # ---- prompts and results -------------------------------------------------------------------
    def runPrompts(self, volumeNode, text: str) -> list:
        results = self._session.run_prompts(volumeNode, text)
        display = self._session.segmentation_node(volumeNode).GetDisplayNode()
        if display is not None:
            display.SetAllSegmentsOpacity2DFill(0.35)
        return results

    @staticmethod
    def thresholdValues(params) -> tuple:
        """(mask threshold, probability threshold, draw absent masks) of the parameter node."""
        return params.maskThreshold, params.probabilityThreshold, params.showAbsentMasks

    def thresholdsDiffer(self, maskThreshold: float, probabilityThreshold: float, absentMasks=None) -> bool:
        s = self._session
        return (abs(maskThreshold - s.mask_threshold) > 1e-9
                or abs(probabilityThreshold - s.probability_threshold) > 1e-9
                or (absentMasks is not None and bool(absentMasks) != s.absent_masks))

    def setThresholds(self, volumeNode, maskThreshold: float, probabilityThreshold: float,
                      absentMasks=None) -> None:
        """Re-threshold the current findings (no re-encoding, no query); ``absentMasks`` (the
        "Draw masks of findings judged absent" checkbox) as in :meth:`setAbsentMasks`."""
        if absentMasks is not None and bool(absentMasks) != self._session.absent_masks:
            self._session.set_absent_masks(volumeNode, bool(absentMasks))
        self._session.set_thresholds(volumeNode, maskThreshold, probabilityThreshold)

    def setAbsentMasks(self, volumeNode, on: bool) -> None:
        """Draw and export the masks of findings judged absent too (default: empty)."""
        self._session.set_absent_masks(volumeNode, on)

    def results(self, volumeNode) -> list:
        return self._session.results(volumeNode) if volumeNode is not None else []

    def segmentationNode(self, volumeNode):
        return self._session.segmentation_node(volumeNode) if volumeNode is not None else None

    def tableNode(self, volumeNode):
        return self._session.table_node(volumeNode)

    def segmentColor(self, volumeNode, row: int) -> tuple:
        return self._segment(volumeNode, row).GetColor()

    def setSegmentColor(self, volumeNode, row: int, rgb) -> None:
        self._segment(volumeNode, row).SetColor(*[float(c) for c in rgb[:3]])

    def _segment(self, volumeNode, row: int):
        seg = self.segmentationNode(volumeNode)
        return seg.GetSegmentation().GetSegment(self.results(volumeNode)[row].segment_id)

    def setResultVisible(self, volumeNode, row: int, visible: bool) -> None:
        self._session.set_result_visible(volumeNode, row, visible)

    def removeResult(self, volumeNode, row: int) -> None:
        self._session.remove_result(volumeNode, row)

    def jumpTarget(self, volumeNode, row: int):
        """World RAS centre of result ``row`` (None when its mask is empty)."""
        return self._session.jump_target_ras(volumeNode, row)

    def showHeatmap(self, volumeNode, row: int):
        return self._session.show_heatmap(volumeNode, row)

    # ---- prompt completion ---------------------------------------------------------------------
    def completionPhrases(self) -> list:
        """Recent prompts first, then every vocabulary phrase."""
        phrases = list(self._session.history)
        try:
            from ctlanguage import vocabulary

            phrases += sorted(vocabulary.all_training_phrases() - set(phrases))
        except Exception as exc:  # engine package missing: history only
            logging.debug(f"CTLanguage: no vocabulary completion: {exc}")
        return phrases

    def clearHistory(self) -> None:
        self._session.history.clear()

    # ---- exports -------------------------------------------------------------------------------
    def export(self, volumeNode, folder: str, kind: str) -> str:
        """``kind``: segnrrd | csv | json | html | dicomseg (see exports.KINDS)."""
        return exports.export(self._session, volumeNode, folder, kind)
