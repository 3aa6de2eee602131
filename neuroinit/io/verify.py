"""Verify a NIR export: re-simulate it in snntorch and in norse, and count spike mismatches against neuroinit's
float simulation and its integer emulation of the profile.

Both imports go through ``nirtorch.nir_to_torch`` (the graph executor that handles the recurrent cycle: the
recurrent ``Linear``'s output is carried to the next step as state, i.e. ``W_rec z_{t-1}``). Known importer
problems are worked around here, in neuroinit's code, without patching the libraries (hardware.md section 2.1):

snntorch (1.0)
    ``snntorch.import_nir.import_from_nir`` fails on recurrent graphs with nirtorch 2.6 (it wraps the cycle in
    a subgraph nirtorch cannot execute), so we call ``nirtorch.nir_to_torch`` with snntorch's own node mapping
    (``_nir_to_snntorch_module(node, init_hidden=True)``, as ``import_from_nir`` builds it). snntorch maps no
    ``LI`` node: the readout uses ``snn.Leaky(reset_mechanism="none")``, whose membrane ``beta mem + x`` is the
    Euler LI. snntorch hard-codes ``dt = 1e-4``: a graph written with another ``dt`` is rescaled (``tau`` and
    ``r`` by ``1e-4 / dt``, the same dynamics per step). ``snn.Leaky`` returns float32 spikes whatever the
    module dtype: a forward hook casts them (0/1, exact) so a float64 run stays float64; and the mapping builds
    weights with ``torch.Tensor(...)`` (float32): with ``dtype=float64`` they are restored from the graph.
norse (1.1)
    ``norse.torch.from_nir`` ignores ``LIF.r``/``LI.r`` and ``v_reset`` and maps no ``LI``: ``r`` is folded into
    the weights and bias feeding each LIF/LI node (``r W``, ``r b``; then ``r = 1``), the node mapping is norse's
    ``_import_norse_module`` with the graph's ``dt``, and the readout is norse's ``LIBoxCell``. norse's mapping
    casts parameters to float32 (``.float()``); with ``dtype=float64`` the parameters are restored from the graph
    in float64 so that the check measures the graph, not float32 rounding.

The comparison runs in float64 by default (``dtype``); float32 works too, where single-ulp differences of the
importers' arithmetic (``v + dt/tau (I - v)`` in norse vs ``alpha v + I``) can flip a spike that sits exactly
at threshold.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nir
import numpy as np
import torch

from neuroinit.emulate.integer import deploy, emulate, run_cell, spike_mismatches
from neuroinit.io.nir import (
    NODE_NAMES,
    cell_from_nir,
    conformance_path,
    default_conformance_input,
    read_conformance,
)

__all__ = [
    "SNNTORCH_DT",
    "VerifyReport",
    "check_verifiable",
    "import_norse",
    "import_snntorch",
    "simulate_imported",
    "verify_nir",
]

SNNTORCH_DT = 1e-4  # snntorch.import_nir hard-codes this step


def _quiet():
    """Suppress the import-time and deprecation warnings snntorch, norse and nirtorch emit (torch.jit.script
    FutureWarning at norse import, deprecation notices), and nothing else."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(norse|snntorch|nirtorch|torch).*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(norse|snntorch|nirtorch).*")
    return ctx


class _Quiet:
    def __enter__(self):
        self._ctx = _quiet()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def check_verifiable(graph: nir.NIRGraph) -> None:
    """Raise ``ValueError`` unless ``graph`` is a neuroinit LIF export the importers can reproduce exactly."""
    missing = [n for n in NODE_NAMES if n not in graph.nodes]
    if missing:
        raise ValueError(f"Invalid NIR graph for verification: missing nodes {missing}; allowed: graphs written "
                         "by neuroinit export (nodes " + ", ".join(NODE_NAMES) + ")")
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
    if not (np.allclose(lif.v_leak, 0) and np.allclose(lif.v_reset, 0)):
        raise ValueError("Invalid NIR graph for verification: v_leak and v_reset must be 0")


def _graph_dt(graph: nir.NIRGraph) -> float:
    dt = graph.metadata.get("dt", SNNTORCH_DT)
    return float(np.asarray(dt))


# ------------------------------------------------------------------------------------------ snntorch

class _SnnLI(torch.nn.Module):
    """NIR ``LI`` with snntorch's ``Leaky`` (no reset): ``mem <- (1 - dt/tau) mem + (r dt/tau) x``."""

    def __init__(self, node: nir.LI, dt: float):
        super().__init__()
        import snntorch as snn

        self.register_buffer("scale", torch.as_tensor(np.asarray(node.r) * dt / np.asarray(node.tau)))
        self.leaky = snn.Leaky(beta=torch.as_tensor(1.0 - dt / np.asarray(node.tau)), reset_mechanism="none",
                               init_hidden=True, output=True, reset_delay=False)

    def forward(self, x):
        _, mem = self.leaky(x * self.scale)
        return mem


def _cast_spikes(module, _inputs, output):
    return output.to(module._neuroinit_dtype)


def import_snntorch(graph: nir.NIRGraph, *, dtype: torch.dtype = torch.float64) -> torch.fx.GraphModule:
    """snntorch module of a neuroinit NIR graph (module docstring for the workarounds)."""
    with _Quiet():
        import nirtorch
        from snntorch.import_nir import _nir_to_snntorch_module

        g = copy.deepcopy(graph)
        dt = _graph_dt(g)
        if dt != SNNTORCH_DT:  # snntorch assumes dt = 1e-4: same per-step dynamics in its time base
            f = SNNTORCH_DT / dt
            for node in g.nodes.values():
                if isinstance(node, (nir.LIF, nir.LI)):
                    node.tau = np.asarray(node.tau) * f
                    node.r = np.asarray(node.r) * f
        def snn_node(n: nir.NIRNode) -> torch.nn.Module:
            m = _nir_to_snntorch_module(n, init_hidden=True)
            if dtype == torch.float64 and isinstance(n, (nir.Linear, nir.Affine)):
                # snntorch builds weights with torch.Tensor(...) (float32); restore the graph's values
                m.weight.data = torch.as_tensor(np.asarray(n.weight, dtype=np.float64), dtype=dtype)
                if isinstance(n, nir.Affine):
                    m.bias.data = torch.as_tensor(np.asarray(n.bias, dtype=np.float64), dtype=dtype)
            return m

        node_map = {t: snn_node for t in (nir.Affine, nir.Linear, nir.LIF)}
        node_map[nir.LI] = lambda n: _SnnLI(n, SNNTORCH_DT)
        module = nirtorch.nir_to_torch(g, node_map, dtype=dtype)
    lif = module.get_submodule("lif")
    lif._neuroinit_dtype = dtype
    lif.register_forward_hook(_cast_spikes)
    return module


# ------------------------------------------------------------------------------------------ norse

def _fold_r(graph: nir.NIRGraph) -> nir.NIRGraph:
    """Copy of ``graph`` with each LIF/LI node's ``r`` folded into the Linear/Affine nodes feeding it."""
    g = copy.deepcopy(graph)
    for src, dst in g.edges:
        a, b = g.nodes[src], g.nodes[dst]
        if isinstance(b, (nir.LIF, nir.LI)) and isinstance(a, (nir.Linear, nir.Affine)):
            r = np.asarray(b.r, dtype=np.float64)
            a.weight = np.asarray(a.weight, dtype=np.float64) * r[:, None]
            if isinstance(a, nir.Affine):
                a.bias = np.asarray(a.bias, dtype=np.float64) * r
    for node in g.nodes.values():
        if isinstance(node, (nir.LIF, nir.LI)):
            node.r = np.ones_like(np.asarray(node.r, dtype=np.float64))
    return g


def import_norse(graph: nir.NIRGraph, *, dtype: torch.dtype = torch.float64) -> torch.fx.GraphModule:
    """norse module of a neuroinit NIR graph (module docstring for the workarounds)."""
    with _Quiet():
        import nirtorch
        import norse.torch.module.leaky_integrator_box as li_box
        from norse.torch.utils.import_nir import _import_norse_module

        g = _fold_r(graph)
        dt = _graph_dt(g)

        def as_t(x) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype)

        def norse_node(n: nir.NIRNode) -> torch.nn.Module:
            m = _import_norse_module(n, ignore_warnings=True, dt=dt)
            if dtype == torch.float64:  # norse casts to float32; restore the graph's values
                if isinstance(n, (nir.Linear, nir.Affine)):
                    m.weight.data = as_t(n.weight)
                    if isinstance(n, nir.Affine):
                        m.bias.data = as_t(n.bias)
                elif isinstance(n, nir.LIF):
                    m.p = m.p._replace(tau_mem_inv=1.0 / as_t(n.tau), v_th=as_t(n.v_threshold),
                                       v_leak=as_t(n.v_leak))
            return m

        def norse_li(n: nir.LI) -> torch.nn.Module:
            return li_box.LIBoxCell(li_box.LIBoxParameters(tau_mem_inv=1.0 / as_t(n.tau), v_leak=as_t(n.v_leak)),
                                    dt=dt)

        node_map = {t: norse_node for t in (nir.Affine, nir.Linear, nir.LIF)}
        node_map[nir.LI] = norse_li
        module = nirtorch.nir_to_torch(g, node_map, dtype=dtype)
    lif = module.get_submodule("lif")
    lif._neuroinit_dtype = dtype
    lif.register_forward_hook(lambda m, i, o: (o[0].to(dtype), o[1]))
    return module


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
    """Spike mismatches of each simulator against neuroinit's float simulation of the export."""

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

    @property
    def ok(self) -> bool:
        """snntorch and norse reproduce neuroinit's spikes exactly, as do the conformance vectors."""
        return self.conformance_match and all(self.mismatches.get(k, 1) == 0 for k in ("snntorch", "norse"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify_nir(path: str | Path, *, inputs: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
               simulators: tuple[str, ...] = ("snntorch", "norse", "integer"),
               input_frac_bits: int = 8) -> VerifyReport:
    """Load ``path`` with ``nir.read``, import it into snntorch and norse, run the conformance input (from the
    conformance file beside it, else ``inputs``, else :func:`~neuroinit.io.nir.default_conformance_input`)
    through them and through neuroinit's float simulation and integer emulation of the profile in the file's
    metadata, and count spike mismatches (``integer``: chip vs float; nonzero where the chip's arithmetic
    differs, e.g. truncating decays)."""
    path = Path(path)
    with _Quiet():
        graph = nir.read(str(path))
    check_verifiable(graph)
    cell, profile = cell_from_nir(graph)
    expected = None
    cpath = conformance_path(path)
    if inputs is None and cpath.is_file():
        inputs, expected, _ = read_conformance(cpath)
    if inputs is None:
        inputs = default_conformance_input(cell.n_in)
    inputs = inputs.detach().to(device="cpu", dtype=torch.float64)
    z_ref, y_ref, _ = run_cell(cell, inputs)
    report = VerifyReport(path=str(path), steps=int(inputs.shape[0]), trials=int(inputs.shape[1]),
                          neurons=int(cell.n_hidden), spikes_float=int(z_ref.sum()), dtype=str(dtype).split(".")[-1])
    if expected is not None:
        report.conformance_match = spike_mismatches(expected, z_ref) == 0
        report.mismatches["conformance_file"] = spike_mismatches(expected, z_ref)
    importers = {"snntorch": import_snntorch, "norse": import_norse}
    for name in simulators:
        if name in importers:
            module = importers[name](graph, dtype=dtype)
            z, y = simulate_imported(module, inputs, dtype=dtype)
            report.mismatches[name] = spike_mismatches(z, z_ref)
            report.output_max_abs_diff[name] = float((y - y_ref).abs().max()) if y.numel() else 0.0
        elif name == "integer":
            dep = deploy(cell, profile, input_frac_bits=input_frac_bits)
            em = emulate(dep, inputs)
            n_mis = spike_mismatches(em.spikes, z_ref)
            report.mismatches["integer"] = n_mis
            report.output_max_abs_diff["integer"] = float((em.outputs - y_ref).abs().max())
            report.integer = {"profile": profile.name, "arithmetic": dep.arithmetic, "spikes": int(em.spikes.sum()),
                              "mismatches": n_mis, "chip_steps": em.chip_steps, "events": dict(em.events),
                              "notes": list(dep.notes)}
        else:
            raise ValueError(f"Invalid simulator {name!r}: allowed snntorch, norse, integer")
    if not math.isfinite(report.output_max_abs_diff.get("snntorch", 0.0)):
        report.output_max_abs_diff["snntorch"] = float("nan")
    return report
