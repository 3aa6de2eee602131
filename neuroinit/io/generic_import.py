"""Importers of generic NIR graphs (``nir_target = "generic"``: a neuroinit LIF export with its leaky readout)
into snntorch and norse, through ``nirtorch.nir_to_torch`` with each library's own node mapping: the libraries'
stock entry points fail on these graphs (:mod:`neuroinit.io.importers` runs stock graphs as a user does).

Workarounds for generic graphs, in neuroinit's code without patching the libraries (hardware.md section 2.1):

snntorch (1.0)
    ``import_from_nir`` maps no ``LI`` and miswires the two-node recurrent cycle, so we call
    ``nirtorch.nir_to_torch`` with snntorch's own node mapping (``_nir_to_snntorch_module(node,
    init_hidden=True)``, as ``import_from_nir`` builds it). The readout uses ``snn.Leaky(reset_mechanism=
    "none")``, whose membrane ``beta mem + x`` is the Euler LI. snntorch hard-codes ``dt = 1e-4``: a graph
    written with another ``dt`` is rescaled (``tau`` and ``r`` by ``1e-4 / dt``, the same dynamics per step).
    ``snn.Leaky`` returns float32 spikes whatever the module dtype: a forward hook casts them (0/1, exact) so a
    float64 run stays float64; and the mapping builds weights with ``torch.Tensor(...)`` (float32): with
    ``dtype=float64`` they are restored from the graph.
norse (1.1)
    ``norse.torch.from_nir`` ignores ``LIF.r``/``LI.r`` and ``v_reset`` and maps no ``LI``: ``r`` is folded into
    the weights and bias feeding each LIF/LI node (``r W``, ``r b``; then ``r = 1``), the node mapping is norse's
    ``_import_norse_module`` with the graph's ``dt``, and the readout is norse's ``LIBoxCell``. norse's mapping
    casts parameters to float32 (``.float()``); with ``dtype=float64`` the parameters are restored from the graph
    in float64 so that the check measures the graph, not float32 rounding.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import nir
import numpy as np
import torch

__all__ = ["SNNTORCH_DT", "import_norse", "import_snntorch"]

SNNTORCH_DT = 1e-4  # snntorch.import_nir hard-codes this step


@contextlib.contextmanager
def _Quiet():  # named like the class it was: callers write ``with _Quiet():``
    """Suppress the import-time and deprecation warnings snntorch, norse and nirtorch emit (torch.jit.script
    FutureWarning at norse import, deprecation notices), and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(norse|snntorch|nirtorch|torch).*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(norse|snntorch|nirtorch).*")
        yield


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
