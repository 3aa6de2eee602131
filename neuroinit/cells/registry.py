"""The registry of cell classes: the one place that knows which neuron models exist.

Everything that offers a choice of model (the CLI's ``--model``, the train config, init, bench, export) reads it,
so a new model is one file in ``neuroinit/cells/`` that defines a :class:`~neuroinit.cells.base.RecurrentCell`
subclass and calls :func:`register` on it. Classes are registered, never live instances.
"""

from __future__ import annotations

from neuroinit.cells.base import CellParams, RecurrentCell

__all__ = ["cell_class", "make_cell", "model_names", "register", "unregister"]

_CLASSES: dict[str, type[RecurrentCell]] = {}


def register(cls: type[RecurrentCell]) -> type[RecurrentCell]:
    """Register ``cls`` under ``cls.model`` (usable as a class decorator); returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, RecurrentCell)):
        raise ValueError(  # noqa: TRY004  (the project's one error type for bad input)
            f"Invalid cell class {cls!r}: allowed subclasses of RecurrentCell")
    name = getattr(cls, "model", "")
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"Invalid model name {name!r} of {cls.__name__}: allowed lower-case identifiers")
    if name in _CLASSES and _CLASSES[name] is not cls:
        raise ValueError(f"Invalid model name {name!r}: already registered by {_CLASSES[name].__name__}")
    _CLASSES[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered model (tests that register a toy cell clean up with it)."""
    cell_class(name)
    del _CLASSES[name]


def model_names() -> tuple[str, ...]:
    """Registered model names, sorted (the order does not depend on which module was imported first)."""
    return tuple(sorted(_CLASSES))


def cell_class(name: str) -> type[RecurrentCell]:
    """The class registered as ``name``; ``ValueError`` naming the allowed models otherwise."""
    try:
        return _CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Invalid model {name!r}: allowed {', '.join(model_names())}") from None


def make_cell(model: str, params: CellParams, **kwargs) -> RecurrentCell:
    """``cell_class(model)(params, **kwargs)``: the cell of a registered model; ``kwargs`` go to the cell."""
    return cell_class(model)(params, **kwargs)
