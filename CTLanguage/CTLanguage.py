"""CTLanguage: free-text prompts on a CT -> 3D masks and calibrated zero-shot finding probabilities.

Thin Slicer module. The widget only wires the panel (Resources/UI/CTLanguage.ui); the logic
delegates to CTLanguageLib (MRML glue, background encoding, dependencies, catalog helpers), which
uses the pure-Python engine package ``ctlanguage``. Nothing heavy (torch, the engine) is imported
at file scope or in the module constructor.
"""

import logging
import os
import pathlib
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DOCS_URL = "https://github.com/ctlanguage/SlicerCTLanguage/blob/main/docs/user_guide.md"
QUICK_PROMPT_BUTTONS = (
    "quickLungNoduleButton",
    "quickPleuralEffusionButton",
    "quickEmphysemaButton",
    "quickLiverLesionButton",
    "quickKidneyCystButton",
    "quickCardiomegalyButton",
)
RESULT_COLUMNS = ("Prompt", "Anatomy", "Probability", "Prompt confidence", "Volume (ml)", "Show", "Colour")
SHOW_COLUMN = 5
COLOR_COLUMN = 6
SETTINGS_MODEL_KEY = "CTLanguage/ModelSpec"


#
# CTLanguage
#


class CTLanguage(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CT Language"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CTLanguage developers"]
        self.parent.helpText = (
            "Type free-text prompts on a CT (\"liver lesion\", \"fluid around the left lung\") to get a 3D "
            "segment and a calibrated zero-shot probability that the finding is present. Encode once, then "
            "each prompt answers in well under a second. Research use only, not a medical device. "
            f'See the <a href="{DOCS_URL}">user guide</a>.'
        )
        self.parent.acknowledgementText = (
            "CTLanguage builds on ideas from fVLM, CT-GLIP, M3FM and GTGM (organ-grounded vision-language "
            "learning for CT), on MONAI, PyTorch and 3D Slicer. The embedded default model is trained on "
            "synthetic phantoms only."
        )


#
# Parameters
#


@parameterNodeWrapper
class CTLanguageParameterNode:
    """Panel state saved with the scene (every field is bound to a widget of CTLanguage.ui).

    inputVolume - CT to encode and query.
    device - auto / cpu / cuda.
    probabilityThreshold - findings below it are hidden (still listed).
    maskThreshold - voxel probability above which a voxel is in the mask.
    showHeatmap - show the selected finding's heat map as foreground.
    outputDirectory - where exports go.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    probabilityThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    maskThreshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    showHeatmap: bool = False
    outputDirectory: pathlib.Path = pathlib.Path.home()


#
# CTLanguageWidget
#


class CTLanguageWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pollTimer = None
        self._updatingTable = False
        self._completerModel = None
        self._manageMenu = None
        self._thresholdTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTLanguage.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CTLanguageLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # model selector + "Manage models…"
        self.populateModels()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        from CTLanguageLib import catalog_ui

        self._manageMenu = catalog_ui.build_manage_models_menu(
            self.ui.manageModelsButton, self.onModelsChanged, current_model=self.currentModelSpec)
        self.ui.manageModelsButton.setMenu(self._manageMenu)

        # thresholds: applied shortly after the last slider move
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(150)
        self._thresholdTimer.connect("timeout()", self.applyThresholds)

        # encode / cancel
        self.ui.encodeButton.connect("clicked(bool)", self.onEncodeButton)

        # prompts: Enter runs, completion from vocabulary + history, quick buttons
        self.ui.promptLineEdit.connect("returnPressed()", self.onRunPrompt)
        self.ui.runPromptButton.connect("clicked(bool)", self.onRunPrompt)
        self._completerModel = qt.QStringListModel()
        completer = qt.QCompleter(self._completerModel, self.ui.promptLineEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        completer.setFilterMode(qt.Qt.MatchContains)
        self.ui.promptLineEdit.setCompleter(completer)
        self.updateCompletion()
        for name in QUICK_PROMPT_BUTTONS:
            button = getattr(self.ui, name)
            button.connect("clicked(bool)", lambda checked=False, b=button: self.runPromptText(b.text))

        # results table
        table = self.ui.resultsTable
        table.setHorizontalHeaderLabels(list(RESULT_COLUMNS))
        table.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        table.connect("itemSelectionChanged()", self.onResultSelected)
        table.connect("itemChanged(QTableWidgetItem*)", self.onResultItemChanged)
        table.connect("cellDoubleClicked(int,int)", self.onResultDoubleClicked)
        self.ui.removeResultButton.connect("clicked(bool)", self.onRemoveResult)
        self.ui.clearHistoryButton.connect("clicked(bool)", self.onClearHistory)

        # exports
        self.ui.exportDicomSegButton.connect("clicked(bool)", lambda: self.onExport("dicomseg"))
        self.ui.exportSegNrrdButton.connect("clicked(bool)", lambda: self.onExport("segnrrd"))
        self.ui.exportCsvButton.connect("clicked(bool)", lambda: self.onExport("csv"))
        self.ui.exportJsonButton.connect("clicked(bool)", lambda: self.onExport("json"))
        self.ui.exportHtmlButton.connect("clicked(bool)", lambda: self.onExport("html"))

        self.initializeParameterNode()
        self.updateGUIFromState()

    def cleanup(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._thresholdTimer is not None:
            self._thresholdTimer.stop()
        self.removeObservers()
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
        self.setParameterNode(None)
        self.logic.resetSession()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    # ---- state -> GUI ---------------------------------------------------------------------------
    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        session = self.logic.session
        if (abs(self._parameterNode.maskThreshold - session.mask_threshold) > 1e-9
                or abs(self._parameterNode.probabilityThreshold - session.probability_threshold) > 1e-9):
            self._thresholdTimer.start()  # debounce: sliders emit many values while dragged
        self.updateGUIFromState()

    def applyThresholds(self) -> None:
        """Re-threshold the current findings (no re-encoding) with the sliders' values."""
        if self._parameterNode is None or self._parameterNode.inputVolume is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not apply the thresholds.", waitCursor=True):
            self.logic.setThresholds(self._parameterNode.inputVolume, self._parameterNode.maskThreshold,
                                     self._parameterNode.probabilityThreshold)
        self.updateResultsTable()

    def updateGUIFromState(self) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        running = self._job is not None and self._job.running
        encoded = volume is not None and self.logic.session.is_encoded(volume)
        self.ui.encodeButton.text = "Cancel" if running else ("Re-encode" if encoded else "Encode")
        self.ui.encodeButton.enabled = running or volume is not None
        self.ui.encodeButton.toolTip = ("Stop the encoder process." if running else
                                        "Encode the volume once in a separate process; prompts then answer quickly.")
        for name in ("runPromptButton",) + QUICK_PROMPT_BUTTONS:
            getattr(self.ui, name).enabled = encoded and not running
        hasResults = bool(volume is not None and self.logic.session.results(volume))
        for name in ("exportDicomSegButton", "exportSegNrrdButton", "exportCsvButton", "exportJsonButton",
                     "exportHtmlButton", "removeResultButton"):
            getattr(self.ui, name).enabled = hasResults
        self.ui.researchUseLabel.text = self.logic.session.model_label()
        self.updateResultsTable()

    def updateResultsTable(self) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        results = self.logic.session.results(volume) if volume is not None else []
        seg = self.logic.session.segmentation_node(volume) if results else None
        table = self.ui.resultsTable
        self._updatingTable = True
        try:
            table.setRowCount(len(results))
            for row, r in enumerate(results):
                f = r.finding
                prob = getattr(f, "probability", None)
                values = (
                    r.prompt,
                    str(getattr(f, "anatomy", "") or ""),
                    "—" if prob is None else f"{prob:.2f}",
                    f"{getattr(f, 'prompt_confidence', 0.0) or 0.0:.2f}",
                    f"{getattr(f, 'volume_ml', 0.0) or 0.0:.1f}",
                )
                for col, text in enumerate(values):
                    item = qt.QTableWidgetItem(text)
                    item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                    table.setItem(row, col, item)
                show = qt.QTableWidgetItem()
                show.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
                show.setCheckState(qt.Qt.Checked if r.visible else qt.Qt.Unchecked)
                table.setItem(row, SHOW_COLUMN, show)
                colour = qt.QTableWidgetItem()
                colour.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                segment = seg.GetSegmentation().GetSegment(r.segment_id) if seg is not None else None
                if segment is not None:
                    rgb = segment.GetColor()
                    colour.setBackground(qt.QBrush(qt.QColor.fromRgbF(rgb[0], rgb[1], rgb[2])))
                colour.setToolTip("Double-click to change the colour")
                table.setItem(row, COLOR_COLUMN, colour)
        finally:
            self._updatingTable = False

    def updateCompletion(self) -> None:
        self._completerModel.setStringList(self.logic.completionPhrases())

    # ---- model ----------------------------------------------------------------------------------
    def populateModels(self, select=None) -> None:
        from CTLanguageLib import catalog_ui

        combo = self.ui.modelComboBox
        wanted = select or qt.QSettings().value(SETTINGS_MODEL_KEY) or None
        combo.blockSignals(True)
        combo.clear()
        try:
            choices = catalog_ui.model_choices()
        except Exception as exc:  # engine package missing: still show the panel
            logging.warning(f"CTLanguage: model catalog unavailable: {exc}")
            choices = []
        for c in choices:
            combo.addItem(c.label, c.spec)
            combo.setItemData(combo.count - 1, c.description or c.spec, qt.Qt.ToolTipRole)
        index = combo.findData(wanted) if wanted else -1
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(False)
        self.onModelChanged()

    def currentModelSpec(self) -> str:
        spec = self.ui.modelComboBox.currentData
        return str(spec) if spec else "default"

    def onModelChanged(self, index=None) -> None:
        spec = self.currentModelSpec()
        qt.QSettings().setValue(SETTINGS_MODEL_KEY, spec)
        device = self._parameterNode.device if self._parameterNode else "auto"
        self.logic.setModel(spec, device)
        self.ui.researchUseLabel.text = self.logic.session.model_label()

    def onModelsChanged(self, select=None) -> None:
        self.populateModels(select=select)

    # ---- encode ---------------------------------------------------------------------------------
    def onEncodeButton(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling…"
            return
        volume = self._parameterNode.inputVolume
        with slicer.util.tryWithErrorDisplay("Could not start the encoding.", waitCursor=True):
            self.logic.setupPythonRequirements()
            self.logic.setModel(self.currentModelSpec(), self._parameterNode.device)
            self.ui.encodeProgressBar.value = 0
            self._job = self.logic.encode(volume, onProgress=self.onEncodeProgress, onDone=self.onEncodeDone)
            from CTLanguageLib import background

            self._pollTimer = background.start_qt_polling(self._job)
        self.updateGUIFromState()

    def onEncodeProgress(self, fraction, message) -> None:
        self.ui.encodeProgressBar.value = int(round(100 * fraction))
        if message:
            self.ui.statusLabel.text = message

    def onEncodeDone(self, state, message) -> None:
        if state == "finished":
            self.ui.statusLabel.text = "Encoded. Type a prompt and press Enter."
            self.ui.encodeProgressBar.value = 100
        elif state == "cancelled":
            self.ui.statusLabel.text = "Encoding cancelled; nothing was changed."
            self.ui.encodeProgressBar.value = 0
        else:
            self.ui.statusLabel.text = "Encoding failed."
            slicer.util.errorDisplay(message or "Encoding failed.")
        self.updateGUIFromState()

    # ---- prompts --------------------------------------------------------------------------------
    def onRunPrompt(self) -> None:
        self.runPromptText(self.ui.promptLineEdit.text)

    def runPromptText(self, text) -> None:
        volume = self._parameterNode.inputVolume
        with slicer.util.tryWithErrorDisplay("The prompt could not be run.", waitCursor=True):
            self.logic.runPrompts(volume, text)
            self.ui.promptLineEdit.clear()
            self.updateCompletion()
        self.updateGUIFromState()
        results = self.logic.session.results(volume) if volume is not None else []
        if results:
            self.ui.resultsTable.selectRow(len(results) - 1)

    def selectedRow(self):
        rows = {index.row() for index in self.ui.resultsTable.selectedIndexes()}
        return min(rows) if rows else None

    def onResultSelected(self) -> None:
        row = self.selectedRow()
        volume = self._parameterNode.inputVolume
        if row is None or volume is None:
            return
        ras = self.logic.session.jump_target_ras(volume, row)
        if ras is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
        if self._parameterNode.showHeatmap:
            with slicer.util.tryWithErrorDisplay("No heat map for this finding."):
                heat = self.logic.session.show_heatmap(volume, row)
                slicer.util.setSliceViewerLayers(background=volume, foreground=heat, foregroundOpacity=0.5)

    def onResultItemChanged(self, item) -> None:
        if self._updatingTable or item.column() != SHOW_COLUMN:
            return
        volume = self._parameterNode.inputVolume
        self.logic.session.set_result_visible(volume, item.row(), item.checkState() == qt.Qt.Checked)

    def onResultDoubleClicked(self, row, column) -> None:
        if column != COLOR_COLUMN:
            return
        volume = self._parameterNode.inputVolume
        seg = self.logic.session.segmentation_node(volume)
        segmentId = self.logic.session.results(volume)[row].segment_id
        segment = seg.GetSegmentation().GetSegment(segmentId)
        rgb = segment.GetColor()
        color = qt.QColorDialog.getColor(qt.QColor.fromRgbF(*rgb), self.parent, "Finding colour")
        if color.isValid():
            segment.SetColor(color.redF(), color.greenF(), color.blueF())
            self.updateResultsTable()

    def onRemoveResult(self) -> None:
        row = self.selectedRow()
        if row is None:
            return
        self.logic.session.remove_result(self._parameterNode.inputVolume, row)
        self.updateGUIFromState()

    def onClearHistory(self) -> None:
        self.logic.session.history.clear()
        self.updateCompletion()

    # ---- export ---------------------------------------------------------------------------------
    def onExport(self, kind) -> None:
        volume = self._parameterNode.inputVolume
        folder = str(self._parameterNode.outputDirectory)
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            path = self.logic.export(volume, folder, kind)
            self.ui.statusLabel.text = f"Exported: {path}"


#
# CTLanguageLogic
#


class CTLanguageLogic(ScriptedLoadableModuleLogic):
    """Never touches widgets; raises ValueError for anything a user can cause. Everything that does
    not need the Slicer application lives in CTLanguageLib.session.CTLanguageSession (tested with
    pytest on a real vtkMRMLScene)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # Embedded model + catalog installed next to the module (see the top-level CMakeLists.txt).
        resources = os.path.join(os.path.dirname(os.path.abspath(__file__)), "CTLanguageResources")
        if os.path.isdir(resources):
            os.environ.setdefault("CTLANGUAGE_RESOURCES", resources)
        from CTLanguageLib.session import CTLanguageSession  # light: numpy + vtk, no torch

        self.session = CTLanguageSession(slicer.mrmlScene)
        self._requirementsChecked = False

    def getParameterNode(self):
        return CTLanguageParameterNode(super().getParameterNode())

    def resetSession(self) -> None:
        from CTLanguageLib.session import CTLanguageSession

        model, device, history = self.session.model_id, self.session.device, list(self.session.history)
        self.session = CTLanguageSession(slicer.mrmlScene)
        self.session.set_model(model, device)
        self.session.history = history

    def setupPythonRequirements(self, ask: bool = True) -> None:
        """torch through the PyTorch extension, the rest through pip after asking (see dependencies.py)."""
        if self._requirementsChecked:
            return
        from CTLanguageLib import dependencies

        dependencies.ensure_dependencies(ask=ask)
        self._requirementsChecked = True

    def setModel(self, modelSpec: str, device: str = "auto") -> None:
        self.session.set_model(modelSpec, device)

    def encode(self, volumeNode, waitForCompletion: bool = False, onProgress=None, onDone=None):
        """Encode ``volumeNode`` in a separate process. In the GUI the caller polls the returned
        job with a QTimer; scripts pass ``waitForCompletion=True``."""
        if volumeNode is None:
            raise ValueError("Select an input CT volume.")
        return self.session.start_encoding(volumeNode, waitForCompletion=waitForCompletion,
                                           on_progress=onProgress, on_done=onDone)

    def runPrompts(self, volumeNode, text: str):
        results = self.session.run_prompts(volumeNode, text)
        seg = self.session.segmentation_node(volumeNode)
        if seg is not None and seg.GetDisplayNode() is not None:
            seg.GetDisplayNode().SetAllSegmentsOpacity2DFill(0.35) if hasattr(
                seg.GetDisplayNode(), "SetAllSegmentsOpacity2DFill") else None
        return results

    def setThresholds(self, volumeNode, maskThreshold: float, probabilityThreshold: float) -> None:
        self.session.set_thresholds(volumeNode, maskThreshold, probabilityThreshold)

    def completionPhrases(self) -> list:
        phrases = list(self.session.history)
        try:
            from ctlanguage import vocabulary

            fn = getattr(vocabulary, "vocabulary_phrases", None) or getattr(vocabulary, "all_training_phrases")
            known = {item[0] if isinstance(item, tuple) else str(item) for item in fn()}
            phrases += sorted(known - set(phrases))
        except Exception as exc:
            logging.debug(f"CTLanguage: no vocabulary completion: {exc}")
        return phrases

    def export(self, volumeNode, folder: str, kind: str) -> str:
        if volumeNode is None:
            raise ValueError("Select the input CT volume.")
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"Output folder '{folder}' does not exist.")
        base = os.path.join(folder, f"{volumeNode.GetName()}_ctlanguage")
        if kind == "segnrrd":
            return self.session.export_seg_nrrd(volumeNode, base + ".seg.nrrd")
        if kind == "csv":
            return self.session.export_findings(volumeNode, base + ".csv")
        if kind == "json":
            return self.session.export_findings(volumeNode, base + ".json")
        if kind == "html":
            return self.session.export_html_report(volumeNode, base + ".html")
        if kind == "dicomseg":
            return self.exportDicomSeg(volumeNode, folder)
        raise ValueError(f"Unknown export '{kind}'.")

    def exportDicomSeg(self, volumeNode, folder: str) -> str:
        """DICOM SEG through Slicer's own DICOM export (DICOMSegmentationPlugin). The segments
        carry terminology (SNOMED category/type/region) and the segmentation's reference geometry
        is the input volume, which must have been loaded from DICOM."""
        seg = self.session.segmentation_node(volumeNode)
        if seg is None:
            raise ValueError("Nothing to export yet: run a prompt first.")
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        volumeItem = shNode.GetItemByDataNode(volumeNode)
        if not shNode.GetItemUID(volumeItem, "DICOM"):
            raise ValueError("DICOM SEG needs a CT loaded through the DICOM module (it must reference a DICOM "
                             "series); for other inputs export .seg.nrrd.")
        segItem = shNode.GetItemByDataNode(seg)
        shNode.SetItemParent(segItem, shNode.GetItemParent(volumeItem))  # same study as the CT
        try:
            import DICOMSegmentationPlugin
        except ImportError:
            raise ValueError("Slicer's DICOM segmentation export plugin is not available in this Slicer "
                             "(install the QuantitativeReporting extension on older Slicer versions).") from None
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(segItem)
        if not exportables:
            raise ValueError("Slicer's DICOM exporter did not accept the segmentation.")
        for exportable in exportables:
            exportable.directory = folder
        message = exporter.export(exportables)
        if message:
            raise ValueError(f"DICOM SEG export failed: {message}")
        return folder


#
# CTLanguageTest
#


class CTLanguageTest(ScriptedLoadableModuleTest):
    """Runs the whole flow inside a real Slicer on a synthetic phantom CT with the embedded default
    model: volume node -> encode (separate process, waitForCompletion) -> prompts -> segments
    equal the engine masks -> table -> .seg.nrrd round trip. See docs/developer_guide.md for how
    to run it (Slicer's Reload & Test, or ``Slicer --no-main-window --python-code ...``)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CTLanguage_prompt_flow()

    def test_CTLanguage_prompt_flow(self):
        import tempfile
        from types import SimpleNamespace

        import numpy as np
        from ctlanguage.phantom import generate_case

        from CTLanguageLib import mrml_glue

        self.delayDisplay("Making a synthetic CT")
        case = generate_case(3)  # PhantomCase: .volume (HU, [k,j,i]) + .ijk_to_ras
        volume = mrml_glue.ctvolume_to_volume_node(
            slicer.mrmlScene, SimpleNamespace(array=case.volume, ijk_to_ras=case.ijk_to_ras), "CTLanguagePhantom")

        logic = CTLanguageLogic()
        logic.setupPythonRequirements(ask=False)
        logic.setModel("default", "auto")

        self.delayDisplay("Encoding (separate process)")
        job = logic.encode(volume, waitForCompletion=True)
        self.assertEqual(job.state, "finished")
        self.assertTrue(logic.session.is_encoded(volume))

        self.delayDisplay("Prompting")
        results = logic.runPrompts(volume, "liver; fluid around the left lung")
        self.assertEqual(len(results), 2)
        seg = logic.session.segmentation_node(volume)
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 2)
        for r in results:
            back = mrml_glue.segment_mask_on_reference(slicer.mrmlScene, seg, r.segment_id, volume)
            self.assertTrue(np.array_equal(back, r.finding.mask), r.prompt)
        self.assertGreater(int(results[0].finding.mask.sum()), 0)
        rows = mrml_glue.table_rows(logic.session.table_node(volume))
        self.assertEqual([row["prompt"] for row in rows], [r.prompt for r in results])

        self.delayDisplay("Exporting .seg.nrrd")
        with tempfile.TemporaryDirectory() as folder:
            path = logic.export(volume, folder, "segnrrd")
            loaded = mrml_glue.load_segmentation(slicer.mrmlScene, path)
            self.assertEqual(loaded.GetSegmentation().GetNumberOfSegments(), 2)
        self.delayDisplay("CTLanguage test passed")
