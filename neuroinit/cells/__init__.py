"""Recurrent cells behind one contract (:class:`RecurrentCell`) and the registry of their classes.

Every module of this package is imported here and registers its cell classes (:func:`register`), so a new
neuron model is one new file in ``neuroinit/cells/``: nothing else lists the models.
"""

import importlib
import pkgutil

from neuroinit.cells.base import (
    PARAM_NAMES,
    CellParams,
    LocalDerivatives,
    LocalFactors,
    RecurrentCell,
    TraceSpec,
)
from neuroinit.cells.lif import LIFRNN, LIFState, lif_step, pseudo_derivative, spike
from neuroinit.cells.rate import ACTIVATIONS, RateRNN, RateState, rate_step
from neuroinit.cells.registry import cell_class, make_cell, model_names, register, unregister

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# the models this package ships; cells registered later (plugins, tests) are in model_names()
MODELS = model_names()

__all__ = [
    "ACTIVATIONS",
    "LIFRNN",
    "MODELS",
    "PARAM_NAMES",
    "CellParams",
    "LIFState",
    "LocalDerivatives",
    "LocalFactors",
    "RateRNN",
    "RateState",
    "RecurrentCell",
    "TraceSpec",
    "cell_class",
    "lif_step",
    "make_cell",
    "model_names",
    "pseudo_derivative",
    "rate_step",
    "register",
    "spike",
    "unregister",
]
