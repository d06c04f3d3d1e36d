"""A minimal pure-Python signal (``connect``, ``disconnect``, ``emit``): lets the background
encoding report to the GUI, the web demo and pytest alike, without Qt."""

from __future__ import annotations


class Signal:
    def __init__(self, name: str = ""):
        self.name = name
        self._slots: list = []

    def connect(self, slot) -> None:
        if slot not in self._slots:
            self._slots.append(slot)

    def disconnect(self, slot=None) -> None:
        if slot is None:
            self._slots.clear()
        elif slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            slot(*args)
