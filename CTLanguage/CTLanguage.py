"""CTLanguage: free-text prompts on a CT -> 3D masks and calibrated zero-shot finding probabilities.

Thin Slicer module: the widget only wires the panel (Resources/UI/CTLanguage.ui) to the logic,
whose single front is ``CTLanguageLib.logic.Logic`` (Qt-free; MRML glue, background encoding,
exports and the catalog helpers live beside it in CTLanguageLib). Nothing heavy (torch, the
engine) is imported at file scope or in the module constructor.
"""

import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from CTLanguageLib import background, catalog_ui, panel
from CTLanguageLib.logic import Logic
from CTLanguageLib.results_table import COLOR_COLUMN, SHOW_COLUMN

DOCS_URL = "https://github.com/ctlanguage/SlicerCTLanguage/blob/main/docs/user_guide.md"
QUICK_PROMPT_BUTTONS = ("quickLungNoduleButton", "quickPleuralEffusionButton", "quickEmphysemaButton",
                        "quickLiverLesionButton", "quickKidneyCystButton", "quickCardiomegalyButton")
EXPORT_BUTTONS = {"exportDicomSegButton": "dicomseg", "exportSegNrrdButton": "segnrrd", "exportCsvButton": "csv",
                  "exportJsonButton": "json", "exportHtmlButton": "html"}
ENCODE_TIP = "Encode the volume once in a separate process; prompts then answer quickly."


class CTLanguage(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CT Language"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CTLanguage developers"]
        self.parent.helpText = (
            "Type free-text prompts on a CT (\"liver lesion\", \"fluid around the left lung\") to get a 3D "
            "segment and a score that the finding is present (a probability where the model is calibrated). "
            "Encode once, then each prompt answers in well under a second. The model menu says what each "
            "model can do. Research use only, not a medical device. "
            f'See the <a href="{DOCS_URL}">user guide</a>.'
        )
        self.parent.acknowledgementText = (
            "CTLanguage builds on ideas from fVLM, CT-GLIP, M3FM and GTGM (organ-grounded vision-language "
            "learning for CT), on MONAI, PyTorch and 3D Slicer. The embedded default model is trained on "
            "synthetic phantoms only."
        )


@parameterNodeWrapper
class CTLanguageParameterNode:
    """Panel state saved with the scene (every field is bound to a widget of CTLanguage.ui)."""

    inputVolume: vtkMRMLScalarVolumeNode                                  # the CT to encode and query
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    probabilityThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5   # below: hidden (still listed)
    maskThreshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5        # voxel probability -> mask
    showHeatmap: bool = False                                             # selected finding's heat map
    showAbsentMasks: bool = False                                         # draw masks of absent findings
    outputDirectory: pathlib.Path = pathlib.Path.home()                   # where exports go


class CTLanguageWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = self._thresholdTimer = None
        self._updatingTable = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTLanguage.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTLanguageLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # model menu: what each model can do, licence, size, CPU/GPU need, on disk; "Manage models…"
        self.models = catalog_ui.ModelSelector(self.ui.modelComboBox, self.ui.modelInfoLabel,
                                               self.ui.manageModelsButton, self.onModelChanged)
        self._thresholdTimer = panel.debounce_timer(150, self.applyThresholds)  # after the last slider move
        self.ui.encodeButton.connect("clicked(bool)", self.onEncodeButton)
        # prompts: Enter runs, completion from history + vocabulary, quick buttons
        self.ui.promptLineEdit.connect("returnPressed()", lambda: self.runPromptText(self.ui.promptLineEdit.text))
        self.ui.runPromptButton.connect("clicked(bool)", lambda: self.runPromptText(self.ui.promptLineEdit.text))
        self._completerModel = panel.prompt_completer(self.ui.promptLineEdit)
        self.updateCompletion()
        for name in QUICK_PROMPT_BUTTONS:
            button = getattr(self.ui, name)
            button.connect("clicked(bool)", lambda checked=False, b=button: self.runPromptText(b.text))
        panel.setup_results_table(self.ui.resultsTable, self.onResultSelected, self.onResultItemChanged,
                                  self.onResultDoubleClicked)
        self.ui.removeResultButton.connect("clicked(bool)", self.onRemoveResult)
        self.ui.clearHistoryButton.connect("clicked(bool)", self.onClearHistory)
        for name, kind in EXPORT_BUTTONS.items():
            getattr(self.ui, name).connect("clicked(bool)", lambda checked=False, k=kind: self.onExport(k))
        self.initializeParameterNode()
        self.updateGUIFromState()

    def cleanup(self) -> None:
        self.logic.cancelEncoding()
        for timer in (self._pollTimer, self._thresholdTimer):
            if timer is not None:
                timer.stop()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancelEncoding()
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

    def volume(self):
        return self._parameterNode.inputVolume if self._parameterNode else None

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        if self.logic.thresholdsDiffer(*self.logic.thresholdValues(self._parameterNode)):
            self._thresholdTimer.start()  # debounce: sliders emit many values while dragged
        self.updateGUIFromState()

    def applyThresholds(self) -> None:
        if self.volume() is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not apply the thresholds.", waitCursor=True):
            self.logic.setThresholds(self.volume(), *self.logic.thresholdValues(self._parameterNode))
        self.updateResultsTable()

    def updateGUIFromState(self) -> None:
        volume, running = self.volume(), self.logic.isEncoding()
        encoded = volume is not None and self.logic.isEncoded(volume)
        self.ui.encodeButton.text = "Cancel" if running else ("Re-encode" if encoded else "Encode")
        self.ui.encodeButton.enabled = running or volume is not None
        self.ui.encodeButton.toolTip = "Stop the encoder process." if running else ENCODE_TIP
        for name in ("runPromptButton",) + QUICK_PROMPT_BUTTONS:
            getattr(self.ui, name).enabled = encoded and not running
        for name in tuple(EXPORT_BUTTONS) + ("removeResultButton",):
            getattr(self.ui, name).enabled = bool(self.logic.results(volume))
        self.ui.researchUseLabel.text = self.logic.modelLabel()
        self.updateResultsTable()

    def updateResultsTable(self) -> None:
        self._updatingTable = True
        try:
            panel.fill_results_table(self.ui.resultsTable, self.logic.results(self.volume()),
                                     self.logic.segmentationNode(self.volume()))
        finally:
            self._updatingTable = False

    def updateCompletion(self) -> None:
        self._completerModel.setStringList(self.logic.completionPhrases())

    def onModelChanged(self, spec) -> None:
        self.logic.setModel(spec, self._parameterNode.device if self._parameterNode else "auto")
        self.ui.researchUseLabel.text = self.logic.modelLabel()

    def onEncodeButton(self) -> None:
        if self.logic.isEncoding():
            self.logic.cancelEncoding()
            self.ui.statusLabel.text = "Cancelling…"
            return
        with slicer.util.tryWithErrorDisplay("Could not start the encoding.", waitCursor=True):
            self.logic.setupPythonRequirements()
            self.logic.setModel(self.models.spec(), self._parameterNode.device)
            self.ui.encodeProgressBar.value = 0
            job = self.logic.encode(self.volume(), onProgress=self.onEncodeProgress, onDone=self.onEncodeDone)
            self._pollTimer = background.start_qt_polling(job)
        self.updateGUIFromState()

    def onEncodeProgress(self, fraction, message) -> None:
        self.ui.encodeProgressBar.value = int(round(100 * fraction))
        if message:
            self.ui.statusLabel.text = message

    def onEncodeDone(self, state, message) -> None:
        self.ui.statusLabel.text = {"finished": "Encoded. Type a prompt and press Enter.",
                                    "cancelled": "Encoding cancelled; nothing was changed."}.get(state, "Encoding failed.")
        self.ui.encodeProgressBar.value = 100 if state == "finished" else 0
        if state not in ("finished", "cancelled"):
            slicer.util.errorDisplay(message or "Encoding failed.")
        self.updateGUIFromState()

    def runPromptText(self, text) -> None:
        with slicer.util.tryWithErrorDisplay("The prompt could not be run.", waitCursor=True):
            self.logic.runPrompts(self.volume(), text)
            self.ui.promptLineEdit.clear()
            self.updateCompletion()
        self.updateGUIFromState()
        if self.logic.results(self.volume()):
            self.ui.resultsTable.selectRow(len(self.logic.results(self.volume())) - 1)

    def selectedRow(self):
        rows = {index.row() for index in self.ui.resultsTable.selectedIndexes()}
        return min(rows) if rows else None

    def onResultSelected(self) -> None:
        row, volume = self.selectedRow(), self.volume()
        if row is None or volume is None:
            return
        ras = self.logic.jumpTarget(volume, row)
        if ras is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
        if self._parameterNode.showHeatmap:
            with slicer.util.tryWithErrorDisplay("No heat map for this finding."):
                heat = self.logic.showHeatmap(volume, row)
                slicer.util.setSliceViewerLayers(background=volume, foreground=heat, foregroundOpacity=0.5)

    def onResultItemChanged(self, item) -> None:
        if not self._updatingTable and item.column() == SHOW_COLUMN:
            self.logic.setResultVisible(self.volume(), item.row(), item.checkState() == qt.Qt.Checked)

    def onResultDoubleClicked(self, row, column) -> None:
        if column != COLOR_COLUMN:
            return
        rgb = self.logic.segmentColor(self.volume(), row)
        color = qt.QColorDialog.getColor(qt.QColor.fromRgbF(*rgb), self.parent, "Finding colour")
        if color.isValid():
            self.logic.setSegmentColor(self.volume(), row, (color.redF(), color.greenF(), color.blueF()))
            self.updateResultsTable()

    def onRemoveResult(self) -> None:
        if self.selectedRow() is not None:
            self.logic.removeResult(self.volume(), self.selectedRow())
            self.updateGUIFromState()

    def onClearHistory(self) -> None:
        self.logic.clearHistory()
        self.updateCompletion()

    def onExport(self, kind) -> None:
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            path = self.logic.export(self.volume(), str(self._parameterNode.outputDirectory), kind)
            self.ui.statusLabel.text = f"Exported: {path}"


class CTLanguageLogic(ScriptedLoadableModuleLogic, Logic):
    """Slicer's logic object; everything it does is CTLanguageLib.logic.Logic (Qt-free, tested with
    pytest on a real vtkMRMLScene). Never touches widgets."""

    def __init__(self, engineLoader=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        Logic.__init__(self, slicer.mrmlScene, engineLoader=engineLoader)

    def getParameterNode(self):
        return CTLanguageParameterNode(super().getParameterNode())


class CTLanguageTest(ScriptedLoadableModuleTest):
    """The whole flow inside a real Slicer on a synthetic phantom CT with the embedded default model:
    volume node -> encode (separate process) -> prompts -> segments equal the engine masks -> table
    -> .seg.nrrd round trip (docs/developer_guide.md: Reload & Test, or Slicer --python-code)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CTLanguage_prompt_flow()

    def test_CTLanguage_prompt_flow(self):
        from CTLanguageLib import self_test

        self_test.prompt_flow(self, CTLanguageLogic())
