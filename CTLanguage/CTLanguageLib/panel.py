"""Qt pieces of the module panel that are built in code: the prompt completer, the debounce timer
and the results table (columns from ``results_table``). Imported by the widget only (needs Qt).
"""

from __future__ import annotations

import qt

from . import results_table


def prompt_completer(line_edit):
    """A case-insensitive, match-anywhere completer on ``line_edit``; returns its string list
    model (fill it with ``setStringList``)."""
    model = qt.QStringListModel()
    completer = qt.QCompleter(model, line_edit)
    completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
    completer.setFilterMode(qt.Qt.MatchContains)
    line_edit.setCompleter(completer)
    return model


def debounce_timer(interval_ms: int, slot):
    """A single-shot timer running ``slot`` ``interval_ms`` after its last ``start()``."""
    timer = qt.QTimer()
    timer.setSingleShot(True)
    timer.setInterval(int(interval_ms))
    timer.connect("timeout()", slot)
    return timer


def setup_results_table(table, on_selected, on_item_changed, on_double_clicked) -> None:
    """Column titles and the three signals the widget handles."""
    table.setHorizontalHeaderLabels(list(results_table.PANEL_COLUMNS))
    table.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
    table.connect("itemSelectionChanged()", on_selected)
    table.connect("itemChanged(QTableWidgetItem*)", on_item_changed)
    table.connect("cellDoubleClicked(int,int)", on_double_clicked)


def fill_results_table(table, results, segmentation_node) -> None:
    """Fill the panel's QTableWidget with one row per result (texts, Show check box, colour)."""
    table.setRowCount(len(results))
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    for row, r in enumerate(results):
        for col, text in enumerate(results_table.panel_texts(r.finding)):
            item = qt.QTableWidgetItem(text)
            item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
            if col == results_table.SCORE_COLUMN and r.finding.score_label:
                item.setToolTip(f"{r.finding.score_label}, by {r.finding.score_model}")
            table.setItem(row, col, item)
        show = qt.QTableWidgetItem()
        show.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
        show.setCheckState(qt.Qt.Checked if r.visible else qt.Qt.Unchecked)
        table.setItem(row, results_table.SHOW_COLUMN, show)
        colour = qt.QTableWidgetItem()
        colour.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
        segment = segmentation.GetSegment(r.segment_id) if segmentation is not None else None
        if segment is not None:
            rgb = segment.GetColor()
            colour.setBackground(qt.QBrush(qt.QColor.fromRgbF(rgb[0], rgb[1], rgb[2])))
        colour.setToolTip("Double-click to change the colour")
        table.setItem(row, results_table.COLOR_COLUMN, colour)
