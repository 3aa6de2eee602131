"""Conformance vectors of a NIR export, and the tie-proofing that keeps importers' spikes equal to neuroinit's.

The graph's time base (:mod:`neuroinit.io.nir`): one neuroinit step is ``NIR_DT`` seconds.

Tie-proofing (the graph's threshold and the conformance trials). The importers compute the same step in a
different operation order (norse: ``v + dt (1/tau) (r I - v)``), so their membranes differ from neuroinit's by
rounding; that can only flip a spike where neuroinit's membrane lies within that rounding of the threshold.
Two constructions keep every membrane away from it:

1. *Threshold off the reachable grid values.* When ``W_in`` and ``W_rec`` are on power-of-two grids (every
   quantised profile), a membrane that starts from 0 (at t = 0 and after every reset) under 0/1 input is a
   sum of grid weights plus the bias: a multiple of ``q``, the finer of the two steps (plus ``b``). A
   threshold on that grid (``v_th = 1`` is) is *reached exactly*, and then neuroinit's ``1.0 > 1.0`` and
   norse's ``1.0000000000000002 > 1.0`` disagree. The graph's threshold ``theta`` is ``v_th`` moved up to
   ``eps = 2 TIE_MARGIN v_th`` (2^-15, at most ``q / 4``) off the grid, within the same grid interval
   (:func:`tie_proof_threshold`): for every membrane on the grid ``v > theta`` iff ``v > v_th`` (the trained
   network's decision, and an integer chip's), now with margin ``eps`` instead of 0. Only off-grid membranes
   (after a leak, or from analog input) in ``(v_th, theta]`` decide differently: a band of width 3e-5 x v_th,
   rarely hit (2 of 65536 membranes of a trained 32-neuron network's 0/1 raster; a half-grid-step shift,
   1/128 there, was hit 67 times and, the network being chaotic, changed 70% of the later spikes). The graph, its
   conformance vectors and ``--verify``'s float reference use ``theta``; the trained ``v_th`` stays in the
   metadata (``cell_config``, LIF ``v_th``) and is what the integer emulation deploys. Float weights
   (``ideal``) or incommensurable grid scales: ``theta = v_th``.
2. *Conformance trials with margin.* Off the grid, membranes are continuous and a near-tie is a coincidence,
   not a structure; the conformance trials are those whose every membrane (neuroinit's float64 run against
   ``theta``) is at least ``TIE_MARGIN * v_th`` (2^-16, about 1.5e-5) from it, as on-grid membranes are by
   construction (1.); others are dropped and counted (:func:`tie_free_trials`). Importer rounding stays far
   below that margin: spikes agree up to step t, so both membranes restart from exactly 0 after each reset
   and differ by at most a few rounding errors per step summed over the leak, ``~ (n_in + n) u max|v| / (1 - alpha)`` with ``u = 2^-53`` (float64: ~1e-13); with
   float32 importers (``u = 2^-24``, the stock importers' default) the margin is an empirical bound, not a
   proof: on the trained 32-neuron test network norse's float32 membranes differ from neuroinit's by at most
   1.6e-6 within 0.2 of the threshold (6e-6 anywhere, |v| up to 50 v_th), 10x below the margin; the error
   grows with max|v| and fan-in, which ``--verify`` checks (0 mismatches in float32 in the tests).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import nir
import numpy as np
import torch

from neuroinit.cells.base import RecurrentCell
from neuroinit.emulate.integer import Deployment, run_cell

__all__ = ["NIR_DT", "TIE_MARGIN", "conformance_data", "conformance_path", "default_conformance_input",
           "graph_cell", "membrane_grid", "read_conformance", "tie_free_raster", "tie_free_trials", "tie_margins",
           "tie_proof_threshold"]

NIR_DT = 1e-4            # seconds per neuroinit step in the exported graph's time base
TIE_MARGIN = 2.0 ** -16  # conformance trials keep every membrane this far (x v_th) from the threshold


# ------------------------------------------------------------------------------------------ tie-proofing

def membrane_grid(dep: Deployment) -> float | None:
    """Step ``q`` of the grid every sum of ``W_in`` and ``W_rec`` entries lies on: the finer grid step when both
    matrices are quantised and the coarser step is an integer multiple of it (power-of-two grids); else None."""
    grids = [dep.grids.get(name) for name in ("w_in", "w_rec")]
    if any(g is None for g in grids):
        return None
    q = min(float(g.scale) for g in grids)
    if not all(float(g.scale) / q == round(float(g.scale) / q) for g in grids):
        return None
    return q


def tie_proof_threshold(v_th: float, q: float | None, compare: str = ">") -> float:
    """The graph's threshold (NIR spikes at ``v > theta``): ``v_th`` moved, where needed, to at least
    ``eps = min(2 TIE_MARGIN v_th, q / 4)`` from every value on the grid ``q``, inside the grid interval that
    keeps the trained decision for every membrane on the grid: ``(g0, g0 + q)`` with ``g0 = floor(v_th / q) q``
    for ``compare = ">"``, ``(g1 - q, g1)`` with ``g1 = ceil(v_th / q) q`` for ``">="`` (a cell that spikes
    at the threshold, as Xylo). ``v_th`` itself when ``q`` is None."""
    v_th = float(v_th)
    if compare not in (">", ">="):
        raise ValueError(f"Invalid threshold comparison {compare!r}: allowed '>', '>='")
    if q is None:
        return v_th
    eps = min(2.0 * TIE_MARGIN * v_th, q / 4.0)
    lo = math.floor(v_th / q) * q if compare == ">" else math.ceil(v_th / q) * q - q
    return min(max(v_th, lo + eps), lo + q - eps)


def graph_cell(cell: RecurrentCell, v_threshold: float) -> RecurrentCell:
    """Copy of a deployed LIF ``cell`` with the graph's threshold (what the exported graph computes)."""
    out = copy.deepcopy(cell)
    with torch.no_grad():
        out.v_th.fill_(float(v_threshold))
    return out


def tie_margins(cell: RecurrentCell, inputs: torch.Tensor) -> torch.Tensor:
    """Per trial, the smallest ``|v - v_th| / v_th`` of neuroinit's float run of ``cell`` on ``inputs``."""
    _, _, v = run_cell(cell, inputs)
    return ((v.double() - float(cell.v_th)).abs() / float(cell.v_th)).amin(dim=(0, 2))


def tie_free_trials(cell: RecurrentCell, inputs: torch.Tensor, margin: float = TIE_MARGIN
                    ) -> tuple[torch.Tensor, int, float]:
    """The trials of ``inputs`` whose every membrane stays ``margin * v_th`` from the threshold (module
    docstring), how many were dropped, and the smallest relative margin kept. Raises ``ValueError`` when no
    trial qualifies."""
    m = tie_margins(cell, inputs)
    keep = m >= margin
    if not bool(keep.any()):
        raise ValueError(f"Invalid conformance input: every one of its {inputs.shape[1]} trials has a membrane "
                         f"within {margin:g} x v_th of the threshold (smallest margin {float(m.min()):.3g}); "
                         "allowed: inputs with at least one tie-free trial (e.g. more trials)")
    return inputs[:, keep], int((~keep).sum()), float(m[keep].min())


def tie_free_raster(cell: RecurrentCell, *, steps: int = 256, trials: int = 4, rate: float = 0.3, seed: int = 0,
                    margin: float = TIE_MARGIN) -> tuple[torch.Tensor, int, float]:
    """``trials`` tie-free trials of :func:`default_conformance_input` (drawn from 4x as many seeded
    candidates, in order), the number of candidates dropped before them, and the smallest margin kept."""
    cand = default_conformance_input(cell.n_in, steps=steps, trials=4 * trials, rate=rate, seed=seed)
    m = tie_margins(cell, cand)
    idx = torch.nonzero(m >= margin).flatten()[:trials]
    if idx.numel() == 0:
        raise ValueError(f"Invalid network for a 0/1 conformance raster: all {cand.shape[1]} candidate trials have "
                         f"a membrane within {margin:g} x v_th of the threshold")
    return cand[:, idx], int(idx[-1]) + 1 - idx.numel(), float(m[idx].min())


# ------------------------------------------------------------------------------------------ conformance

def conformance_path(path: str | Path) -> Path:
    """Where :func:`write_nir` puts the conformance vectors of ``path``: ``<stem>.conformance.h5`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.conformance.h5")


def default_conformance_input(n_in: int, *, steps: int = 256, trials: int = 4, rate: float = 0.3,
                              seed: int = 0) -> torch.Tensor:
    """Seeded 0/1 input spikes ``(steps, trials, n_in)``, float64 (spike inputs are exact on every chip)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, trials, n_in, generator=g, dtype=torch.float64) < rate).to(torch.float64)


def conformance_data(cell: RecurrentCell, inputs: torch.Tensor, dt: float = NIR_DT) -> nir.NIRGraphData:
    """Inputs and neuroinit's float simulation (spikes of ``lif``, outputs of ``readout``) of a deployed
    cell, as ``nir.NIRGraphData`` (``TimeGriddedData``, batch-major ``(trials, steps, features)``)."""
    z, y, _ = run_cell(cell, inputs)
    def tg(x: torch.Tensor, boolean: bool = False) -> nir.TimeGriddedData:
        a = x.detach().cpu().transpose(0, 1).numpy()
        return nir.TimeGriddedData(a.astype(bool) if boolean else a.astype(np.float64), dt)
    return nir.NIRGraphData(nodes={
        "input": nir.NIRNodeData(observables={"input": tg(inputs)}),
        "lif": nir.NIRNodeData(observables={"spikes": tg(z, boolean=True)}),
        "readout": nir.NIRNodeData(observables={"v": tg(y)}),
    })


def read_conformance(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, spikes, outputs)`` time-major float64 tensors from a conformance file."""
    data = nir.read_data(str(path))
    def tm(node: str, obs: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(data.nodes[node].observables[obs].data, dtype=np.float64)).transpose(0, 1)
    return tm("input", "input"), tm("lif", "spikes"), tm("readout", "v")
