"""Verify a NIR export: re-simulate it in snntorch, norse and rockpool, and count spike mismatches against
neuroinit's float simulation of the graph, on two input sets (the conformance input, i.e. the task's analog
input when written by ``neuroinit export``, and a seeded tie-free 0/1 raster); and the profile's integer
emulation against the trained float network.

Which module runs each importer depends on the graph's target (``neuroinit.io.nir.to_nir``):

- ``stock`` graphs run through the libraries' own entry points as a user calls them (snntorch's
  ``import_from_nir``, norse's ``from_nir``; float32), see :mod:`neuroinit.io.importers`;
- ``generic`` graphs run through ``nirtorch.nir_to_torch`` with each library's node mapping and the
  workarounds below (the stock entry points fail on them: :mod:`neuroinit.io.importers`);
- rockpool always through :func:`neuroinit.io.importers.load_rockpool` (an adapter of rockpool's classes:
  rockpool 3.1's ``from_nir`` cannot read a NIR ``LIF``).

Workarounds for generic graphs: :mod:`neuroinit.io.generic_import`.

The generic comparison runs in float64 by default (``dtype``); float32 works too. The importers' different
operation order (``v + dt/tau (r I - v)`` in norse vs ``alpha v + I``) cannot flip a spike on the conformance
trials, whose membranes all keep a margin from the graph's threshold (tie-proofing, :mod:`neuroinit.io.nir`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nir
import numpy as np
import torch

from neuroinit.emulate.integer import deploy, emulate, run_cell, spike_mismatches
from neuroinit.io.generic_import import SNNTORCH_DT, _Quiet, import_norse, import_snntorch
from neuroinit.io.nir import (
    NODE_NAMES,
    STOCK_NODE_NAMES,
    cell_from_nir,
    conformance_path,
    graph_cell,
    read_conformance,
    tie_free_raster,
    tie_free_trials,
    tie_margins,
)

__all__ = [
    "SNNTORCH_DT",
    "VerifyReport",
    "check_verifiable",
    "default_simulators",
    "import_norse",
    "import_snntorch",
    "simulate_imported",
    "verify_nir",
]

def check_verifiable(graph: nir.NIRGraph) -> None:
    """Raise ``ValueError`` unless ``graph`` is a neuroinit LIF export the importers can reproduce exactly."""
    stock = str(np.asarray(graph.metadata.get("nir_target", "generic"))) == "stock"
    names = STOCK_NODE_NAMES if stock else NODE_NAMES
    missing = [n for n in names if n not in graph.nodes]
    if missing:
        raise ValueError(f"Invalid NIR graph for verification: missing nodes {missing}; allowed: graphs written "
                         "by neuroinit export (nodes " + ", ".join(names) + ")")
    meta = graph.metadata
    reset = meta.get("reset", "zero")
    reset = reset.decode() if isinstance(reset, bytes) else str(reset)
    if reset != "zero":
        raise ValueError(f"Invalid network for --verify: reset='{reset}' cannot be expressed in NIR (its LIF only "
                         "resets to v_reset); allowed: reset='zero' (train with --reset zero; in Python "
                         "LIFRNN(reset='zero'))")
    lif = graph.nodes["lif"]
    n_ref = int(np.asarray(lif.metadata.get("n_refractory", 0))) if lif.metadata else 0
    if n_ref:
        raise ValueError(f"Invalid network for --verify: n_refractory = {n_ref} cannot be expressed in NIR; "
                         "allowed: n_refractory = 0")
    tau_syn = float(np.asarray(lif.metadata.get("tau_syn_ms", 0.0))) if lif.metadata else 0.0
    if tau_syn:
        raise ValueError(f"Invalid network for --verify: a synaptic current (tau_syn = {tau_syn:g} ms) cannot be "
                         "expressed in NIR's LIF; allowed: networks without tau_syn")
    if not (np.allclose(lif.v_leak, 0) and np.allclose(lif.v_reset, 0)):
        raise ValueError("Invalid NIR graph for verification: v_leak and v_reset must be 0")


# ------------------------------------------------------------------------------------------ running

@torch.no_grad()
def simulate_imported(module: torch.fx.GraphModule, inputs: torch.Tensor, *, dtype: torch.dtype = torch.float64
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an imported graph step by step on time-major ``inputs``; ``(spikes of lif, outputs)``."""
    spikes: list[torch.Tensor] = []

    def record(_m, _i, o):
        spikes.append((o[0] if isinstance(o, tuple) else o).detach().to(torch.float64))

    handle = module.get_submodule("lif").register_forward_hook(record)
    try:
        with _Quiet():
            state = None
            outs = []
            for u in inputs.to(dtype):
                y, state = module(u, state)
                outs.append(y.detach().to(torch.float64))
    finally:
        handle.remove()
    return torch.stack(spikes), torch.stack(outs)


@dataclass
class VerifyReport:
    """Spike mismatches of each simulator against neuroinit's float simulation of the export, summed over the
    input sets (``by_input``: ``conformance`` or ``given``, and ``raster01``, a tie-free 0/1 raster, each with
    its own steps, trials, spikes, dropped trials, margin and mismatches). ``steps`` and ``trials`` are the
    first set's; ``spikes_float`` is summed."""

    path: str
    steps: int
    trials: int
    neurons: int
    spikes_float: int
    mismatches: dict[str, int] = field(default_factory=dict)
    output_max_abs_diff: dict[str, float] = field(default_factory=dict)
    integer: dict = field(default_factory=dict)
    conformance_match: bool = True
    dtype: str = "float64"
    by_input: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every importer run reproduces neuroinit's spikes exactly on every input set, as do the conformance
        vectors."""
        names = [k for k in self.mismatches if k not in ("integer", "conformance_file")]
        return self.conformance_match and bool(names) and all(self.mismatches[k] == 0 for k in names)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _graph_threshold(graph: nir.NIRGraph) -> float:
    th = np.asarray(graph.nodes["lif"].v_threshold, dtype=np.float64)
    if th.size == 0 or not np.all(th == th.flat[0]):
        raise ValueError("Invalid NIR graph for verification: v_threshold must be the same for all neurons")
    return float(th.flat[0])


def verify_nir(path: str | Path, *, inputs: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
               simulators: tuple[str, ...] | None = None,
               input_frac_bits: int = 8) -> VerifyReport:
    """Load ``path`` with ``nir.read``, import it into the importers named in ``simulators`` and run two input
    sets through them and through neuroinit's float simulation of the graph: the conformance input (from the
    conformance file beside it, else the tie-free trials of ``inputs``) and a tie-free seeded 0/1 raster
    (:func:`~neuroinit.io.nir.tie_free_raster`); count spike mismatches. ``integer`` runs the profile's integer
    emulation of the trained network (trained ``v_th``) against its float simulation on the same inputs
    (nonzero where the chip's arithmetic differs, e.g. truncating decays)."""
    path = Path(path)
    simulators = default_simulators() if simulators is None else tuple(simulators)
    with _Quiet():
        graph = nir.read(str(path))
    check_verifiable(graph)
    cell, profile = cell_from_nir(graph)
    gcell = graph_cell(cell, _graph_threshold(graph))
    sets: dict[str, tuple[torch.Tensor, torch.Tensor | None, int, float]] = {}
    cpath = conformance_path(path)
    if inputs is not None:
        x, dropped, margin = tie_free_trials(gcell, inputs.detach().to(device="cpu", dtype=torch.float64))
        sets["given"] = (x, None, dropped, margin)
    elif cpath.is_file():
        x, expected, _ = read_conformance(cpath)
        sets["conformance"] = (x, expected, 0, float(tie_margins(gcell, x).min()))
    x, dropped, margin = tie_free_raster(gcell)
    sets["raster01"] = (x, None, dropped, margin)
    first = next(iter(sets.values()))[0]
    report = VerifyReport(path=str(path), steps=int(first.shape[0]), trials=int(first.shape[1]),
                          neurons=int(cell.n_hidden), spikes_float=0, dtype=str(dtype).split(".")[-1])
    for name in simulators:
        if name not in (*IMPORTERS, "integer"):
            raise ValueError(f"Invalid simulator {name!r}: allowed {', '.join(IMPORTERS)}, integer")
    for set_name, (x, expected, dropped, margin) in sets.items():
        z_ref, y_ref, _ = run_cell(gcell, x)
        rep = {"steps": int(x.shape[0]), "trials": int(x.shape[1]), "spikes_float": int(z_ref.sum()),
               "dropped_trials": dropped, "margin": margin, "mismatches": {}, "output_max_abs_diff": {}}
        report.spikes_float += rep["spikes_float"]
        if expected is not None:
            n_conf = spike_mismatches(expected, z_ref)
            report.conformance_match = n_conf == 0
            rep["mismatches"]["conformance_file"] = n_conf
        for name in simulators:
            if name not in IMPORTERS:
                continue
            z, y = _simulate(name, graph, x, dtype)
            rep["mismatches"][name] = spike_mismatches(z, z_ref)
            diff = float((y - y_ref).abs().max()) if y.numel() else 0.0
            rep["output_max_abs_diff"][name] = diff if math.isfinite(diff) else float("nan")
        if "integer" in simulators:
            z_tr, y_tr, _ = run_cell(cell, x)
            dep = deploy(cell, profile, input_frac_bits=input_frac_bits)
            em = emulate(dep, x)
            rep["mismatches"]["integer"] = spike_mismatches(em.spikes, z_tr)
            rep["output_max_abs_diff"]["integer"] = float((em.outputs - y_tr).abs().max())
            report.integer.setdefault("profile", profile.name)
            report.integer.setdefault("arithmetic", dep.arithmetic)
            report.integer.setdefault("notes", list(dep.notes))
            report.integer.setdefault("chip_steps", em.chip_steps)
            report.integer[set_name] = {"spikes": int(em.spikes.sum()), "mismatches": rep["mismatches"]["integer"],
                                        "events": dict(em.events)}
        for k, n in rep["mismatches"].items():
            report.mismatches[k] = report.mismatches.get(k, 0) + n
        for k, d in rep["output_max_abs_diff"].items():
            report.output_max_abs_diff[k] = max(report.output_max_abs_diff.get(k, 0.0), d)
        report.by_input[set_name] = rep
    return report


IMPORTERS = ("snntorch", "norse", "rockpool")


def _simulate(name: str, graph: nir.NIRGraph, x: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes and outputs of importer ``name`` on ``x``, from a fresh module (snntorch keeps its state inside):
    rockpool through :func:`~neuroinit.io.importers.load_rockpool` (float32); a stock graph through the stock
    importer (float32), its output current through the leaky readout; a generic graph through
    :func:`import_snntorch` / :func:`import_norse` in ``dtype``."""
    from neuroinit.io.importers import (
        graph_target,
        leaky_readout,
        load_norse,
        load_rockpool,
        load_snntorch,
        run_rockpool,
    )

    if name == "rockpool":
        return run_rockpool(load_rockpool(graph), x)
    if graph_target(graph) == "stock":
        module = {"snntorch": load_snntorch, "norse": load_norse}[name](graph)
        z, a = simulate_imported(module, x, dtype=torch.float32)
        return z, leaky_readout(a, float(np.asarray(graph.metadata["kappa"])))
    module = {"snntorch": import_snntorch, "norse": import_norse}[name](graph, dtype=dtype)
    return simulate_imported(module, x, dtype=dtype)


def default_simulators() -> tuple[str, ...]:
    """snntorch, norse, rockpool where installed (the ``importers`` extra), and the integer emulation."""
    import importlib.util

    rock = ("rockpool",) if importlib.util.find_spec("rockpool") is not None else ()
    return ("snntorch", "norse", *rock, "integer")
