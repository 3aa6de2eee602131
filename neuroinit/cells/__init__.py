"""Rate and LIF recurrent cells behind one contract (:class:`RecurrentCell`)."""

from neuroinit.cells.base import PARAM_NAMES, CellParams, LocalFactors, RecurrentCell, TraceSpec
from neuroinit.cells.lif import LIFRNN, LIFState, lif_step, pseudo_derivative, spike
from neuroinit.cells.rate import ACTIVATIONS, RateRNN, RateState, rate_step

__all__ = ["PARAM_NAMES", "CellParams", "LocalFactors", "RecurrentCell", "TraceSpec", "LIFRNN", "LIFState",
           "lif_step", "pseudo_derivative", "spike", "ACTIVATIONS", "RateRNN", "RateState", "rate_step",
           "MODELS", "make_cell"]

MODELS = ("rate", "lif")


def make_cell(model: str, params: CellParams, **kwargs) -> RecurrentCell:
    """``RateRNN`` for ``model='rate'`` or ``LIFRNN`` for ``'lif'``; ``kwargs`` go to the cell."""
    if model == "rate":
        return RateRNN(params, **kwargs)
    if model == "lif":
        return LIFRNN(params, **kwargs)
    raise ValueError(f"Invalid model {model!r}: allowed {', '.join(MODELS)}")
