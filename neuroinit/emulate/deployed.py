"""What a deployed network is: a LIF network as a profile's chip holds it (:class:`Deployment`), the data that
:mod:`neuroinit.emulate.steps` runs and :func:`neuroinit.emulate.deployment.deploy` builds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neuroinit.cells.base import CellParams, RecurrentCell
from neuroinit.profiles import HardwareProfile, NeuronSpec
from neuroinit.quantize import Grid

__all__ = ["Deployment"]


@dataclass(frozen=True, eq=False)
class Deployment:
    """A LIF network as a profile's chip holds it. Integer fields are numpy ``int64`` (None for ``float``).

    ``unit``: value (in neuroinit's units, threshold = ``v_th``) of one accumulator unit: Lava's ``a_in`` unit
    or the fixed arithmetic's weight unit ``2^e_min``. ``w_in``/``w_rec`` are the chip's stored weights
    (Lava: ``2c``; fixed: ``c``), ``exp_in``/``exp_rec`` the shifts applied to their accumulated sums.
    """

    profile: HardwareProfile
    arithmetic: str
    cell: RecurrentCell                    # the deployed float network (weights on the grid, float64)
    codes: dict[str, np.ndarray | None]    # integer weight codes per chip matrix (None: float weights)
    grids: dict[str, Grid | None]
    reset: str                             # as trained
    chip_reset: str                        # as the chip does it
    n_refractory: int
    alpha: float
    kappa: float
    alpha_chip: float                      # leak factor the decay code realises
    input_frac_bits: int = 0
    w_in: np.ndarray | None = None
    w_rec: np.ndarray | None = None
    exp_in: int = 0
    exp_rec: int = 0
    threshold: int = 0
    threshold_shift: int = 0
    decay: int = 0
    decay_kind: str = "float"
    decay_bits: int = 0
    bias: np.ndarray | None = None
    bias_exp: int = 0
    state_bits: int = 0
    overflow: str = "saturate"
    spike_compare: str = ">"
    unit: float = 1.0
    e_min: int = 0                         # the finer weight exponent (of nonzero matrices) setting the unit
    notes: tuple[str, ...] = field(default_factory=tuple)
    rules: NeuronSpec = field(default_factory=NeuronSpec)  # the profile's neuron arithmetic (fixed)
    syn_decay: int = 0                     # decay code of the synaptic current (rules.synapse = "current")
    alpha_syn_chip: float = 0.0            # the current's factor that code realises
    readout: dict | None = None            # rules.readout = "chip-lif": the output neurons (see deploy)

    @property
    def params(self) -> CellParams:
        """The deployed float parameters (grid values)."""
        return self.cell.params()
