"""A Qt form for chosen fields of a pydantic config model.

Booleans become check boxes, ints and floats spin boxes, ``Literal`` choices combo boxes.

Defaults, bounds (``ge``/``gt``/``le``/``lt``) and tooltips (``description``) come from
the model itself, so the widget, the CLI and the API share one definition of every
parameter. ``values()`` returns a dict to build the model with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QProgressBar, QPushButton, QSpinBox, QWidget)

_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Row:
    """How to show one field: its label, decimals (floats), step and optional upper bound."""

    label: str
    decimals: int = 2
    step: float | None = None
    maximum: float | None = None


def _bounds(field, decimals: int) -> tuple[float | None, float | None]:
    lo = hi = None
    eps = 10.0**-decimals
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo = m.gt + eps
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi = m.lt - eps
    return lo, hi


class ModelForm(QWidget):
    """Rows of spin boxes and check boxes for ``rows`` (field name -> :class:`Row`) of ``model``."""

    def __init__(self, model: type, rows: dict[str, Row], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.widgets: dict[str, QWidget] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for name, row in rows.items():
            field = model.model_fields[name]
            w = self._make(field, row)
            w.setToolTip(field.description or "")
            w.setObjectName(name)
            self.widgets[name] = w
            layout.addRow(row.label, w)
        self.set_values(**{n: model.model_fields[n].default for n in rows})

    @staticmethod
    def _make(field, row: Row) -> QWidget:
        kind = field.annotation
        if kind is bool:
            return QCheckBox()
        if get_origin(kind) is Literal:
            w = QComboBox()
            w.addItems([str(v) for v in get_args(kind)])
            return w
        if kind is int:
            w = QSpinBox()
            lo, hi = _bounds(field, 0)
            w.setRange(int(lo if lo is not None else -_INT_MAX), int(min(hi or _INT_MAX, row.maximum or _INT_MAX)))
            w.setSingleStep(int(row.step or 1))
            return w
        if kind is float:
            w = QDoubleSpinBox()
            w.setDecimals(row.decimals)
            lo, hi = _bounds(field, row.decimals)
            top = min(hi if hi is not None else 1e9, row.maximum if row.maximum is not None else 1e9)
            w.setRange(lo if lo is not None else -1e9, top)
            w.setSingleStep(row.step or 10.0**-row.decimals)
            return w
        raise TypeError(f"ModelForm cannot show a field of type {kind!r}.")

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, w in self.widgets.items():
            if isinstance(w, QCheckBox):
                out[name] = w.isChecked()
            elif isinstance(w, QComboBox):
                out[name] = w.currentText()
            else:
                out[name] = w.value()
        return out

    def set_values(self, **values: Any) -> None:
        for name, v in values.items():
            w = self.widgets[name]
            if isinstance(w, QCheckBox):
                w.setChecked(bool(v))
            elif isinstance(w, QComboBox):
                w.setCurrentText(str(v))
            else:
                w.setValue(v)


# -- rows every dock widget has ------------------------------------------------------------
def path_row(layout, placeholder: str, on_pick) -> QLineEdit:
    """A path field with a "…" browse button (calling ``on_pick``), added to ``layout``; returns the field."""
    row = QHBoxLayout()
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    browse = QPushButton("…")
    browse.setMaximumWidth(32)
    browse.clicked.connect(on_pick)
    row.addWidget(edit, 1)
    row.addWidget(browse)
    layout.addLayout(row)
    return edit


def cancel_button(on_cancel, enabled: bool = False):
    """The Cancel button of a widget's job (disabled until a job runs)."""
    button = QPushButton("Cancel")
    button.setEnabled(enabled)
    button.clicked.connect(on_cancel)
    return button


def progress_and_status(layout):
    """An idle progress bar and a selectable, wrapping status line, added to ``layout``."""
    bar = QProgressBar()
    bar.setRange(0, 1)
    bar.setValue(0)
    layout.addWidget(bar)
    label = QLabel("")
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    layout.addWidget(label)
    return bar, label
