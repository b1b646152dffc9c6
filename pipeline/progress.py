"""How library loops report progress without knowing about terminals: the stages pass a Rich-backed reporter."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None, unit: str = "items") -> None: ...

    def advance(self, n: int = 1) -> None: ...


class Silent:
    """The default reporter: says nothing (tests, library use)."""

    def start(self, description: str, total: int | None, unit: str = "items") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass
