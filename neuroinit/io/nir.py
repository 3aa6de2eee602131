"""Export a trained LIF network to NIR (the Neuromorphic Intermediate Representation), with conformance vectors.

Graph (flat, one recurrent cycle; see ``docs/export.md``)::

    input (Input) -> w_in (Affine: W_in, b) -> lif (LIF) -> w_out (Affine: W_out, b_out) -> readout (LI) -> output
                                              lif -> w_rec (Linear: W_rec, no bias) -> lif

With ``target="stock"`` (``--nir-target stock``) the same network is written in the shape snntorch's
``import_from_nir`` and norse's ``from_nir`` read as they are (:mod:`neuroinit.io.importers` says why)::

    input -> w_in (Affine: r W_in, r b) -> lif (LIF, r = 1) -> w_out (Affine: W_out, b_out) -> output
             lif -> w_rec (Linear: W_rec) -> rec_scale (Linear: r I) -> lif

its output is the readout current ``a_t``; ``y_t = kappa y_{t-1} + a_t`` with ``kappa`` in the metadata.

neuroinit's step (reset to zero)::

    v_t = alpha v_{t-1} (1 - z_{t-1}) + W_rec z_{t-1} + W_in u_t + b,   z_t = H(v_t - v_th)
    y_t = kappa y_{t-1} + W_out z_t + b_out

NIR's LIF ``tau dv/dt = (v_leak - v) + r I`` integrated with Euler at step ``dt`` is
``v <- (1 - dt/tau) v + (r dt/tau) I``. With ``dt = NIR_DT`` (1e-4 s, the step snntorch hard-codes and norse is
given), ``tau = dt / (1 - alpha)`` (nudged by ulps so that ``1 - dt/tau == alpha`` in float64), ``r = tau/dt``,
``v_leak = 0``, ``v_reset = 0`` and ``v_threshold = theta`` (``v_th``, tie-proofed below), the importers
compute exactly neuroinit's step: the leak, the input scaling (``r dt / tau = 1``), the spike on the new
membrane, the reset to zero; the recurrent ``Linear`` is evaluated from the previous step's spikes (nirtorch keeps the cycle's output as state),
which is neuroinit's ``W_rec z_{t-1}``. The graph's time base is therefore one neuroinit step = ``NIR_DT``
seconds: ``tau`` values are in seconds of that time base; the physical ``dt`` and ``tau_m`` are in metadata.

Tie-proofing (the graph's threshold and the conformance trials): :mod:`neuroinit.io.nir_conformance`.

What NIR cannot express (``docs/export.md``): reset by subtraction (exported with a warning, not exact),
refractoriness (exported with a warning), rate nonlinearities (rate networks are refused here; see
:func:`write_weights_h5`). Weights in the graph are floats, ``code * scale``; integer codes, scale, exponent,
bit width and sign mode are in each node's metadata; profile name and TOML text, dt, reset mode and the
discretisation in the graph's metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import h5py
import nir
import numpy as np
import torch

from neuroinit.cells.base import QUANTISED_PARAMS, CellParams, RecurrentCell
from neuroinit.emulate.integer import (
    Deployment,
    check_saturation,
    deploy,
    deployed_cell,
    weight_codes,
)
from neuroinit.init import check_fits
from neuroinit.io.atomic import atomic_write_path
from neuroinit.io.nir_conformance import (  # the conformance names stay importable from here
    NIR_DT,
    TIE_MARGIN,
    conformance_data,
    conformance_path,
    default_conformance_input,
    graph_cell,
    membrane_grid,
    read_conformance,
    tie_free_raster,
    tie_free_trials,
    tie_margins,
    tie_proof_threshold,
)
from neuroinit.profiles import HardwareProfile, load_profile, profile_from_dict
from neuroinit.quantize import Grid

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "NIR_DT",
    "STOCK_EDGES",
    "STOCK_NODE_NAMES",
    "TARGETS",
    "TIE_MARGIN",
    "WEIGHTS_FORMAT",
    "NirExport",
    "cell_from_nir",
    "conformance_data",
    "conformance_path",
    "default_conformance_input",
    "euler_tau",
    "graph_cell",
    "membrane_grid",
    "nir_equal",
    "read_conformance",
    "tie_free_raster",
    "tie_free_trials",
    "tie_margins",
    "tie_proof_threshold",
    "to_nir",
    "write_nir",
    "write_weights_h5",
]

FORMAT = "neuroinit-nir"
FORMAT_VERSION = 1
WEIGHTS_FORMAT = "neuroinit-weights"
NODE_NAMES = ("input", "w_in", "lif", "w_rec", "w_out", "readout", "output")
EDGES = [("input", "w_in"), ("w_in", "lif"), ("lif", "w_rec"), ("w_rec", "lif"), ("lif", "w_out"),
         ("w_out", "readout"), ("readout", "output")]
TARGETS = ("generic", "stock")
STOCK_NODE_NAMES = ("input", "w_in", "lif", "w_rec", "rec_scale", "w_out", "output")
STOCK_EDGES = [("input", "w_in"), ("w_in", "lif"), ("lif", "w_rec"), ("w_rec", "rec_scale"), ("rec_scale", "lif"),
               ("lif", "w_out"), ("w_out", "output")]


def _neuroinit_version() -> str:
    try:
        return version("neuroinit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def euler_tau(decay: float, dt: float = NIR_DT) -> float:
    """``tau`` with ``1 - dt/tau == decay`` in float64 (the importers' Euler factor), starting from
    ``dt / (1 - decay)`` and nudging by ulps; the closest value when no float hits it exactly."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"Invalid decay {decay!r}: a leaky neuron needs 0 <= decay < 1")
    tau = dt / (1.0 - decay)
    best, best_err = tau, abs((1.0 - dt / tau) - decay)
    for _ in range(64):
        got = 1.0 - dt / tau
        err = abs(got - decay)
        if err < best_err:
            best, best_err = tau, err
        if got == decay:
            return tau
        tau = float(np.nextafter(tau, math.inf if got < decay else -math.inf))
    return best


def _code_dtype(bits: int):
    return np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32 if bits <= 32 else np.int64


def _weight_meta(dep: Deployment, name: str) -> dict:
    grid, codes = dep.grids[name], dep.codes[name]
    w = dep.profile.weights
    if grid is None:
        return {"quantised": False}
    meta = {"quantised": True, "codes": codes.astype(_code_dtype(w.bits)), "scale": float(grid.scale),
            "bits": int(w.bits), "sign": w.sign, "scaling": w.scaling, "code_min": int(grid.code_min),
            "code_max": int(grid.code_max)}
    if grid.exponent is not None:
        meta["exponent"] = int(grid.exponent)
    return meta


@dataclass(frozen=True)
class NirExport:
    """What :func:`write_nir` wrote: paths, the graph, the conformance data, warnings and whether the graph
    reproduces neuroinit's dynamics exactly (``exact``)."""

    path: Path
    conformance: Path | None
    graph: nir.NIRGraph
    exact: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    steps: int = 0
    trials: int = 0
    spikes: int = 0
    dropped_trials: int = 0      # conformance trials dropped for a near-tie (module docstring)
    margin: float = math.inf     # smallest |v - theta| / v_th in the conformance trials


def _graph_warnings(cell: RecurrentCell) -> list[str]:
    out = []
    if cell.reset != "zero":
        out.append("NIR's LIF has no reset by subtraction: the graph resets to zero (v_reset = 0) while the "
                   "network was trained with reset='subtract'; importers will not reproduce it (train with "
                   "--reset zero, in Python LIFRNN(reset='zero'), for an exact export)")
    if cell.n_refractory:
        out.append(f"NIR has no refractory period: n_refractory = {cell.n_refractory} is dropped from the graph")
    if getattr(cell, "tau_syn", None):
        out.append(f"NIR's LIF has no synaptic current: tau_syn = {cell.tau_syn} ms is dropped from the graph "
                   "(train without a synaptic current for an exact NIR export)")
    return out


def to_nir(cell: RecurrentCell, profile: HardwareProfile | str | None = None, *, dt: float = NIR_DT,
           target: str = "generic") -> tuple[nir.NIRGraph, Deployment, list[str]]:
    """The NIR graph of ``cell`` deployed on ``profile`` (default: the cell's own), the deployment, and
    warnings about what the graph does not reproduce. ``target``: ``generic`` (the graph above) or ``stock``
    (:data:`STOCK_EDGES`: the shape snntorch's ``import_from_nir`` and norse's ``from_nir`` read as they are;
    ``docs/export.md``). Raises ``ValueError`` for rate networks, networks that do not fit the profile,
    saturating weights and an unknown target."""
    if target not in TARGETS:
        raise ValueError(f"Invalid NIR target {target!r}: allowed {', '.join(TARGETS)}")
    if getattr(cell, "model", None) == "rate":
        raise ValueError("Invalid model 'rate' for NIR export: NIR has no rate nonlinearity (tanh/relu units "
                         "with a leak); export rate networks with --format h5 (neuroinit weights schema)")
    if not (isinstance(dt, float) and dt > 0 and math.isfinite(dt)):
        raise ValueError(f"Invalid dt {dt!r}: must be a positive float (seconds per step)")
    if target == "stock" and dt != NIR_DT:
        raise ValueError(f"Invalid dt {dt!r} for target 'stock': snntorch's import_from_nir hard-codes "
                         f"dt = {NIR_DT:g}; allowed: dt = {NIR_DT:g}")
    dep = deploy(cell, profile)
    dc = dep.cell
    p = CellParams(*(t.detach().double().numpy().copy() for t in dc.params()))
    n_in, n, n_out = dc.n_in, dc.n_hidden, dc.n_out
    tau_m = euler_tau(dep.alpha, dt)
    tau_o = euler_tau(dep.kappa, dt)
    warnings = _graph_warnings(dc)
    q = membrane_grid(dep)
    compare = getattr(dc, "threshold_compare", ">")
    theta = tie_proof_threshold(float(dc.v_th), q, compare)
    lif_meta = {"model": "neuroinit.cells.LIFRNN", "alpha": dep.alpha, "reset": dc.reset,
                "n_refractory": int(dc.n_refractory), "v_th": float(dc.v_th), "dt_ms": dc.dt, "tau_m_ms": dc.tau_m,
                "membrane_grid": float(q) if q is not None else 0.0, "v_threshold_offset": theta - float(dc.v_th),
                "threshold_compare": compare, "tau_syn_ms": float(getattr(dc, "tau_syn", None) or 0.0),
                "discretisation": "euler: v <- (1 - dt/tau) v + (r dt/tau) I with r dt/tau = 1, spike v > v_th, "
                                  "v <- v_reset = 0; v_threshold = v_th moved off the grid q (tie-proof)"}
    nodes = {
        "input": nir.Input(input_type={"input": np.array([n_in])}),
        "w_in": nir.Affine(weight=p.w_in, bias=p.bias, metadata=_weight_meta(dep, "w_in")),
        "lif": nir.LIF(tau=np.full(n, tau_m), r=np.full(n, tau_m / dt), v_leak=np.zeros(n),
                       v_threshold=np.full(n, theta), v_reset=np.zeros(n), metadata=lif_meta),
        "w_rec": nir.Linear(weight=p.w_rec, metadata=_weight_meta(dep, "w_rec")),
        "w_out": nir.Affine(weight=p.w_out, bias=p.b_out, metadata=_weight_meta(dep, "w_out")),
        "readout": nir.LI(tau=np.full(n_out, tau_o), r=np.full(n_out, tau_o / dt), v_leak=np.zeros(n_out),
                          metadata={"kappa": dep.kappa, "tau_out_ms": dc.tau_out}),
        "output": nir.Output(output_type={"output": np.array([n_out])}),
    }
    edges = list(EDGES)
    if target == "stock":
        nodes, edges = _stock_shape(nodes, n, tau_m / dt)
    cfg = dict(dc.config())
    cfg["profile"] = dep.profile.name
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "neuroinit_version": _neuroinit_version(),
        "nir_target": target, "kappa": dep.kappa, "tau_out_ms": dc.tau_out,
        "readout": ("y_t = kappa y_{t-1} + a_t on the graph's output a_t (w_out's current)" if target == "stock"
                    else "the LI node 'readout'"),
        "model": "lif", "profile": dep.profile.name, "profile_toml": dep.profile.text,
        "dt": dt, "time_base": f"one neuroinit step = {dt:g} s; tau = dt / (1 - alpha) (Euler)",
        "dt_physical_s": dc.dt / 1000.0, "reset": dc.reset, "discretisation": "euler",
        "exact": not warnings, "warnings": "\n".join(warnings), "cell_config": json.dumps(cfg, sort_keys=True),
        "notes": "\n".join(dep.notes),
    }
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta), dep, warnings


def _stock_shape(nodes: dict, n: int, r: float) -> tuple[dict, list]:
    """The generic nodes rewritten for the stock importers (module docstring of :mod:`neuroinit.io.importers`):
    ``r`` folded into what feeds the LIF (``w_in``: ``r W_in``, ``r b``; a diagonal ``rec_scale = r I`` after
    ``w_rec``, so the recurrent cycle has three nodes), ``LIF.r = 1``, no LI (the output is ``w_out``'s current).
    The unscaled ``W_in`` and ``b`` stay in ``w_in``'s metadata (``grid_weight``, ``grid_bias``)."""
    out = dict(nodes)
    w_in, lif = nodes["w_in"], nodes["lif"]
    meta = dict(w_in.metadata)
    meta.update(grid_weight=np.asarray(w_in.weight), grid_bias=np.asarray(w_in.bias), r=r)
    out["w_in"] = nir.Affine(weight=r * np.asarray(w_in.weight), bias=r * np.asarray(w_in.bias), metadata=meta)
    out["lif"] = nir.LIF(tau=lif.tau, r=np.ones(n), v_leak=lif.v_leak, v_threshold=lif.v_threshold,
                         v_reset=lif.v_reset, metadata=lif.metadata)
    out["rec_scale"] = nir.Linear(weight=np.diag(np.full(n, r)), metadata={"r": r})
    del out["readout"]
    return out, list(STOCK_EDGES)


# ------------------------------------------------------------------------------------------ writing

def write_nir(path: str | Path, cell: RecurrentCell, profile: HardwareProfile | str | None = None, *,
              inputs: torch.Tensor | None = None, dt: float = NIR_DT, conformance: bool = True,
              target: str = "generic") -> NirExport:
    """Write ``cell`` deployed on ``profile`` to ``path`` with ``nir.write`` and, with ``conformance``, its
    conformance vectors (the tie-free trials of ``inputs``, default a tie-free 0/1 raster, and the graph's
    float spikes and outputs as neuroinit computes them; module docstring) with ``nir.write_data`` to
    :func:`conformance_path`. Both files are written atomically: on any
    error neither is left behind (an existing file is left as it was)."""
    graph, dep, warnings = to_nir(cell, profile, dt=dt, target=target)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Invalid output path {path}: is a directory; allowed: a file path")
    data = None
    dropped, margin = 0, math.inf
    if conformance:
        gcell = graph_cell(dep.cell, float(np.asarray(graph.nodes["lif"].v_threshold)[0]))
        if inputs is None:
            inputs, dropped, margin = tie_free_raster(gcell)
        else:
            inputs = inputs.detach().to(device="cpu", dtype=torch.float64)
            if inputs.dim() != 3 or inputs.shape[-1] != dep.cell.n_in:
                raise ValueError(f"Invalid conformance input shape {tuple(inputs.shape)}: expected "
                                 f"(steps, trials, {dep.cell.n_in})")
            inputs, dropped, margin = tie_free_trials(gcell, inputs)
        data = conformance_data(gcell, inputs, dt)
    cpath = conformance_path(path) if conformance else None
    with atomic_write_path(path) as tmp:
        nir.write(tmp, graph)
        if data is not None:
            with atomic_write_path(cpath) as ctmp:
                nir.write_data(ctmp, data)
    spikes = int(data.nodes["lif"].observables["spikes"].data.sum()) if data is not None else 0
    return NirExport(path=path, conformance=cpath, graph=graph, exact=not warnings, warnings=tuple(warnings),
                     steps=int(inputs.shape[0]) if data is not None else 0,
                     trials=int(inputs.shape[1]) if data is not None else 0, spikes=spikes,
                     dropped_trials=dropped, margin=margin)


# ------------------------------------------------------------------------------------------ reading back

def _meta_equal(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_meta_equal(a[k], b[k]) for k in a))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    a, b = (x.decode("utf8") if isinstance(x, bytes) else x.item() if isinstance(x, np.generic) else x
            for x in (a, b))
    return type(a) is type(b) and a == b


def nir_equal(a: nir.NIRNode, b: nir.NIRNode) -> bool:
    """Structural equality of two NIR nodes or graphs: types, every array (values, shape and dtype), edges and
    metadata (nir's dataclasses compare by identity)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, nir.NIRGraph):
        return (a.nodes.keys() == b.nodes.keys() and all(nir_equal(a.nodes[k], b.nodes[k]) for k in a.nodes)
                and sorted(map(tuple, a.edges)) == sorted(map(tuple, b.edges))
                and _meta_equal(a.metadata, b.metadata))
    da, db = a.to_dict(), b.to_dict()
    if da.keys() != db.keys():
        return False
    return all(_meta_equal(da[k], db[k]) for k in da)


def _meta_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf8")
    if isinstance(x, np.ndarray) and x.shape == ():
        return _meta_str(x[()])
    return str(x)


def cell_from_nir(graph: nir.NIRGraph) -> tuple[RecurrentCell, HardwareProfile]:
    """Rebuild the deployed float network (and its profile) from a graph written by :func:`write_nir`."""
    import tomllib

    from neuroinit.cells import make_cell

    meta = meta_graph = graph.metadata
    if _meta_str(meta.get("format", "")) != FORMAT:
        raise ValueError(f"Invalid NIR file: not written by neuroinit (metadata format = "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    text = _meta_str(meta.get("profile_toml", ""))
    name = _meta_str(meta.get("profile", "ideal"))
    profile = (profile_from_dict(tomllib.loads(text), where=f"<profile '{name}' in NIR metadata>", text=text)
               if text else load_profile(name))
    cfg = json.loads(_meta_str(meta["cell_config"]))
    cfg["profile"] = profile
    nodes = graph.nodes
    w_in_meta = nodes["w_in"].metadata or {}
    w_in = w_in_meta.get("grid_weight", nodes["w_in"].weight)   # stock target: r folded into the graph's w_in
    bias = w_in_meta.get("grid_bias", nodes["w_in"].bias)
    params = CellParams(*(torch.from_numpy(np.asarray(a, dtype=np.float64).copy()) for a in (
        w_in, nodes["w_rec"].weight, bias, nodes["w_out"].weight, nodes["w_out"].bias)))
    cell = deployed_cell(make_cell("lif", params, **cfg), profile)
    for name in QUANTISED_PARAMS:  # the exported grids, not ones re-chosen from the weights (a weight at
        meta = nodes[name].metadata or {}   # code_min = -128 would make choose_grid pick a coarser exponent)
        if bool(np.asarray(meta.get("quantised", False))):
            exp = int(np.asarray(meta["exponent"])) if "exponent" in meta else None
            cell.grids[name] = Grid(float(np.asarray(meta["scale"])), int(np.asarray(meta["code_min"])),
                                    int(np.asarray(meta["code_max"])), exp)
    with torch.no_grad():  # the leak factors as exported (a float32 cell's alpha is not exp(-dt/tau) in float64)
        cell.alpha.fill_(float(np.asarray(nodes["lif"].metadata["alpha"])))
        kappa = nodes["readout"].metadata["kappa"] if "readout" in nodes else meta_graph["kappa"]
        cell.kappa.fill_(float(np.asarray(kappa)))
    return cell, profile


# ------------------------------------------------------------------------------------------ rate networks

def write_weights_h5(path: str | Path, cell: RecurrentCell, profile: HardwareProfile | str | None = None) -> Path:
    """neuroinit's own deployment schema (any model; the only export for rate networks, which NIR cannot
    express). Layout (``docs/export.md``)::

        attrs: format = "neuroinit-weights", format_version, model, profile, profile_toml, cell_config (JSON),
               neuroinit_version
        /<name> for name in w_in, w_rec, bias, w_out, b_out: float64 values the deployed network computes with
        /codes/<name> for the chip matrices: integer codes; attrs scale, exponent (pow2), bits, sign,
               code_min, code_max
    """
    profile = load_profile(profile if profile is not None else cell.profile)
    check_fits(profile, cell.n_in, cell.n_hidden, cell.n_out)
    dc = deployed_cell(cell, profile)
    check_saturation(dc, profile)
    codes = weight_codes(dc)
    p = dc.params()
    cfg = dict(dc.config())
    cfg["profile"] = profile.name
    path = Path(path)
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = WEIGHTS_FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["model"] = dc.model
        f.attrs["profile"] = profile.name
        f.attrs["profile_toml"] = profile.text
        f.attrs["cell_config"] = json.dumps(cfg, sort_keys=True)
        f.attrs["neuroinit_version"] = _neuroinit_version()
        for name, t in zip(p._fields, p):
            f.create_dataset(name, data=t.detach().double().numpy())
        g = f.create_group("codes")
        for name in QUANTISED_PARAMS:
            grid = dc.grids[name]
            if grid is None:
                continue
            d = g.create_dataset(name, data=codes[name].astype(_code_dtype(profile.weights.bits)))
            d.attrs["scale"] = float(grid.scale)
            if grid.exponent is not None:
                d.attrs["exponent"] = int(grid.exponent)
            d.attrs["bits"] = int(profile.weights.bits)
            d.attrs["sign"] = profile.weights.sign
            d.attrs["code_min"] = int(grid.code_min)
            d.attrs["code_max"] = int(grid.code_max)
    return path
