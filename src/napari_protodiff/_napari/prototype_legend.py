"""The legend of a prototype map: one row per prototype with its colour, counts and a show/hide tick."""

from __future__ import annotations

from typing import Iterable

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

COLUMNS = ("Prototype", "Patches", "Share", "In store")


def _swatch(rgb) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*(int(v) for v in rgb)))
    return QIcon(pix)


class PrototypeLegend(QTableWidget):
    """Rows ``prototype j`` (colour swatch and tick), its patches and share in the slide, its patches in the store.

    ``picked(j)`` is emitted when the user selects row ``j``; ``visibility_changed`` when a
    tick changes (read :attr:`hidden`).
    """

    picked = Signal(int)
    visibility_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.verticalHeader().setVisible(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in range(1, len(COLUMNS)):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.setMinimumHeight(160)
        self.itemSelectionChanged.connect(self._on_selection)
        self.itemChanged.connect(self._on_item)

    def fill(self, features, colors) -> None:
        """One row per row of a prototype map's ``features`` (prototype, count, share, store_count)."""
        self.blockSignals(True)
        self.clearSelection()
        self.setRowCount(len(features))
        for j in range(len(features)):
            item = QTableWidgetItem(f"prototype {j}")
            item.setIcon(_swatch(colors[j]))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked)
            self.setItem(j, 0, item)
            cells = (f"{int(features['count'][j]):,}", f"{features['share'][j]:.1%}",
                     f"{int(features['store_count'][j]):,}")
            for c, text in enumerate(cells, start=1):
                it = QTableWidgetItem(text)
                it.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(j, c, it)
        self.blockSignals(False)

    def select(self, prototype: int) -> None:
        """Select a row without emitting :attr:`picked`."""
        self.blockSignals(True)
        self.selectRow(prototype)
        self.blockSignals(False)

    @property
    def hidden(self) -> list[int]:
        """The prototypes whose tick is off."""
        return [j for j in range(self.rowCount()) if self.item(j, 0).checkState() != Qt.CheckState.Checked]

    def set_hidden(self, prototypes: Iterable[int]) -> None:
        """Untick these prototypes and tick all others (emits :attr:`visibility_changed` once)."""
        off = set(prototypes)
        self.blockSignals(True)
        for j in range(self.rowCount()):
            self.item(j, 0).setCheckState(Qt.CheckState.Unchecked if j in off else Qt.CheckState.Checked)
        self.blockSignals(False)
        self.visibility_changed.emit()

    def _on_item(self, item) -> None:
        if item.column() == 0:
            self.visibility_changed.emit()

    def _on_selection(self) -> None:
        rows = {i.row() for i in self.selectedIndexes()}
        if len(rows) == 1:
            self.picked.emit(rows.pop())
