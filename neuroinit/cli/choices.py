"""Choices the CLI reads from the library's registries when they are shown or checked, not when a module is
imported, so a model registered later (a plugin, a test) is offered like the bundled ones."""

from __future__ import annotations

import click

__all__ = ["ModelChoice"]


class ModelChoice(click.Choice):
    """``click.Choice`` over the registered models (:func:`neuroinit.cells.model_names`) plus ``extra`` values
    (e.g. ``"both"``)."""

    def __init__(self, *extra: str) -> None:
        self._extra = tuple(extra)
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from neuroinit.cells import model_names  # imports torch: only when the choices are needed

        return (*model_names(), *self._extra)

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns it; the registry is the source
        pass
