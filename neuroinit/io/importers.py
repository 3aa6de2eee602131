"""Ready snntorch, norse and rockpool modules of a neuroinit NIR file, built with those libraries' own classes.

What each stock importer does with neuroinit's exports (versions tested: snntorch 1.0, norse 1.1, rockpool 3.1
with nir 1.0.8 and nirtorch 2.6; facts from their sources; ``docs/export.md`` has the table and the tests):

snntorch ``snntorch.import_nir.import_from_nir``
    maps no ``LI`` node (``ValueError: Unknown node type ... LI``), and rewrites every two-node cycle
    ``lif <-> w_rec`` into a sub-graph whose input feeds ``w_rec`` instead of ``lif`` (with nirtorch 2.6 the
    sub-graph is executed node by node, so the input is multiplied by ``W_rec``: thousands of spike
    mismatches). It reads ``r`` correctly (``r dt / tau = 1``; otherwise it divides the threshold by it) and
    hard-codes ``dt = 1e-4``. **Workaround in the graph** (``--nir-target stock``): the recurrent cycle has a
    third node (``rec_scale``, a diagonal ``Linear``), which its cycle detection does not match, so nirtorch
    runs the cycle itself; the readout is a separate output (below). ``import_from_nir`` then reproduces the
    spikes.
norse ``norse.torch.from_nir``
    ignores ``LIF.r`` (a generic export never spikes in norse) and ``v_reset``, and maps no ``LI`` (the node is
    dropped: the output is ``w_out``'s current). **Workaround in the graph** (``stock``): ``r`` is folded into
    the weights feeding the LIF (``r W_in``, ``r b``, ``rec_scale = r I``) and ``LIF.r = 1``; snntorch reads
    the same graph (its membrane is then ``r`` times neuroinit's and so is its threshold). Pass
    ``dt = graph.metadata["dt"]`` (:func:`load_norse` does).
both
    No stock importer maps NIR's ``LI`` readout, so the stock graph's output is ``a_t = W_out z_t + b_out``
    and the readout ``y_t = kappa y_{t-1} + a_t`` (``kappa`` in the graph's metadata) is applied by the user
    (:func:`leaky_readout`). Both return float32 modules.
rockpool ``rockpool.nn.modules.torch.nir.from_nir``
    cannot read a NIR ``LIF`` at all: it reads ``node.tau_mem`` (NIR's ``LIF`` field is ``tau``:
    ``AttributeError``); for ``CubaLIF``/``LI`` it infers ``dt`` as ``tau / (1 + r)``, casts the ``LI``'s
    ``tau`` with ``.int()`` (a ``tau`` below 1 s becomes 0: an all-zero output), and its LIF modules reset by
    subtraction and emit up to 2^16 spikes per step (``StepPWL``: ``floor(v / theta)`` when ``v >= theta``). No
    graph shape fixes that, so :func:`load_rockpool` is an **adapter**: rockpool's ``LinearTorch`` for
    ``W_in``/``b``, ``W_rec`` and ``W_out``, rockpool's ``ExpSynTorch`` for the readout and a subclass of
    rockpool's ``LIFNeuronTorch`` (its parameters, ``exp(-dt/tau_mem)`` leak, ``StepPWL`` with
    ``max_spikes_per_dt = 1``) whose only changes are the ones rockpool 3.1 has no option for: reset to zero
    instead of ``v - theta``, and the recurrent input ``W_rec z_{t-1}``. ``tau_mem = -dt / ln(alpha)`` and the
    readout's ``tau = -dt / ln(kappa)`` with ``W_out / kappa`` (``ExpSynTorch`` computes ``(s + a) beta``,
    which is ``kappa y``). ``>=`` against neuroinit's ``>`` does not matter on the tie-proof threshold.

For the generic graph (``--nir-target generic``), :func:`load_snntorch` and :func:`load_norse` use
:func:`neuroinit.io.generic_import.import_snntorch` / :func:`~neuroinit.io.generic_import.import_norse` (the same libraries'
node mappings through ``nirtorch.nir_to_torch``, with the workarounds in that module's docstring).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import nir
import numpy as np
import torch

from neuroinit.io.nir import cell_from_nir

__all__ = ["graph_target", "leaky_readout", "load_norse", "load_rockpool", "load_snntorch", "run_rockpool"]


def _graph(source: str | Path | nir.NIRGraph) -> nir.NIRGraph:
    if isinstance(source, nir.NIRGraph):
        return source
    from neuroinit.io.generic_import import _Quiet

    with _Quiet():
        return nir.read(str(source))


def _meta(graph: nir.NIRGraph, key: str, default=None):
    v = graph.metadata.get(key, default)
    v = np.asarray(v)[()] if isinstance(v, np.ndarray) else v
    return v.decode() if isinstance(v, bytes) else v


def graph_target(graph: nir.NIRGraph) -> str:
    """``generic`` or ``stock``: the shape a neuroinit NIR graph was written in (``to_nir(..., target=)``)."""
    return str(_meta(graph, "nir_target", "generic"))


def leaky_readout(currents: torch.Tensor, kappa: float) -> torch.Tensor:
    """``y_t = kappa y_{t-1} + a_t`` over time-major ``currents`` (the stock graph's output ``a_t``), y_{-1} = 0."""
    y = torch.zeros_like(currents[0])
    out = []
    for a in currents:
        y = kappa * y + a
        out.append(y)
    return torch.stack(out)


def load_snntorch(source: str | Path | nir.NIRGraph, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """snntorch module of a neuroinit NIR file: stock graphs through snntorch's own ``import_from_nir`` (its
    stdout chatter captured; float32), generic graphs through :func:`neuroinit.io.generic_import.import_snntorch`. Call
    it step by step, ``out, state = module(x_t, state)``; snntorch keeps the LIF membrane inside its ``Leaky``
    (``init_hidden``): build a new module (or ``snntorch.utils.reset``) for each new sequence."""
    graph = _graph(source)
    if graph_target(graph) == "stock":
        from neuroinit.io.generic_import import _Quiet

        with _Quiet(), contextlib.redirect_stdout(io.StringIO()):
            from snntorch.import_nir import import_from_nir

            return import_from_nir(copy.deepcopy(graph))
    from neuroinit.io.generic_import import import_snntorch

    return import_snntorch(graph, dtype=dtype)


def load_norse(source: str | Path | nir.NIRGraph, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """norse module of a neuroinit NIR file: stock graphs through norse's own ``from_nir`` with the graph's
    ``dt`` (float32), generic graphs through :func:`neuroinit.io.generic_import.import_norse`. ``out, state =
    module(x_t, state)`` step by step."""
    graph = _graph(source)
    if graph_target(graph) == "stock":
        from neuroinit.io.generic_import import _Quiet

        with _Quiet():
            import norse.torch

            return norse.torch.from_nir(copy.deepcopy(graph), ignore_warnings=True,
                                        dt=float(_meta(graph, "dt")))
    from neuroinit.io.generic_import import import_norse

    return import_norse(graph, dtype=dtype)


def _graph_threshold(graph: nir.NIRGraph) -> float:
    return float(np.asarray(graph.nodes["lif"].v_threshold, dtype=np.float64).flat[0])


def load_rockpool(source: str | Path | nir.NIRGraph):
    """A rockpool network of a neuroinit NIR file (either target), built from rockpool's classes (module
    docstring): a ``rockpool.nn.combinators.Sequential`` of ``LinearTorch`` (``W_in``, ``b``), the reset-to-zero
    recurrent ``LIFNeuronTorch`` subclass, ``LinearTorch`` (``W_out / kappa``, ``b_out / kappa``) and
    ``ExpSynTorch``; float32, batch-major ``(batch, time, features)`` like every rockpool module.
    :func:`run_rockpool` runs it and returns the hidden spikes too."""
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import ExpSynTorch, LinearTorch

    graph = _graph(source)
    cell, _ = cell_from_nir(graph)
    p = cell.params()
    dt = float(_meta(graph, "dt"))
    alpha, kappa = float(cell.alpha), float(cell.kappa)

    def f32(t) -> torch.Tensor:
        return torch.as_tensor(np.asarray(t.detach() if isinstance(t, torch.Tensor) else t, dtype=np.float32))

    n_in, n, n_out = cell.n_in, cell.n_hidden, cell.n_out
    w_in = LinearTorch((n_in, n), weight=f32(p.w_in.T), bias=f32(p.bias), has_bias=True)
    lif = _rockpool_reset_zero_lif()(
        (n,), tau_mem=torch.full((n,), -dt / math.log(alpha)), threshold=torch.full((n,), _graph_threshold(graph)),
        dt=dt, max_spikes_per_dt=torch.tensor(1.0), w_rec=f32(p.w_rec.T))
    w_out = LinearTorch((n, n_out), weight=f32(p.w_out.T / kappa), bias=f32(p.b_out / kappa), has_bias=True)
    readout = ExpSynTorch((n_out,), tau=torch.full((n_out,), -dt / math.log(kappa)), dt=dt)
    return Sequential(w_in, lif, w_out, readout)


_RESET_ZERO_LIF = None


def _rockpool_reset_zero_lif():
    """The ``LIFNeuronTorch`` subclass (defined on first use: rockpool is an optional dependency)."""
    global _RESET_ZERO_LIF
    if _RESET_ZERO_LIF is not None:
        return _RESET_ZERO_LIF
    from rockpool.nn.modules import LIFNeuronTorch
    from rockpool.parameters import Parameter

    class ResetZeroRecurrentLIFTorch(LIFNeuronTorch):
        """rockpool's ``LIFNeuronTorch`` with reset to zero and a recurrent weight ``w_rec`` (``(n, n)``,
        rockpool's ``(in, out)`` layout)::

            v <- exp(-dt/tau_mem) v + x_t + z_{t-1} w_rec + bias;  z_t = StepPWL(v, threshold) (<= 1 spike);
            v <- v (1 - z_t)
        """

        def __init__(self, shape, *args, w_rec: torch.Tensor, **kwargs):
            super().__init__(shape, *args, **kwargs)
            self.w_rec = Parameter(w_rec, family="weights", shape=(self.size_out, self.size_out))

        def forward(self, input_data: torch.Tensor) -> torch.Tensor:
            input_data, (vmem,) = self._auto_batch(input_data, (self.vmem,), ((self.size_out,),))
            n_batches, n_timesteps, _ = input_data.shape
            alpha = torch.exp(-self.dt / self.tau_mem)
            spikes = torch.zeros(n_batches, self.size_out, device=input_data.device)
            out = torch.zeros(n_batches, n_timesteps, self.size_out, device=input_data.device)
            for t in range(n_timesteps):
                vmem = vmem * alpha + input_data[:, t] + spikes @ self.w_rec + self.bias
                spikes = self.spike_generation_fn(vmem, self.threshold, self.learning_window,
                                                  self.max_spikes_per_dt)
                vmem = vmem * (spikes == 0)
                out[:, t] = spikes
            self.vmem = vmem[0].detach()
            self._record_dict["spikes"] = out
            return out

    _RESET_ZERO_LIF = ResetZeroRecurrentLIFTorch
    return _RESET_ZERO_LIF


@torch.no_grad()
def run_rockpool(net, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`load_rockpool`'s network on time-major ``inputs`` ``(steps, trials, n_in)`` from rest;
    ``(hidden spikes, outputs)``, time-major float64."""
    net.reset_state()
    x = inputs.detach().to(torch.float32).transpose(0, 1)
    w_in, lif, w_out, readout = (net[i] for i in range(4))
    a, _, _ = w_in(x)
    z, _, _ = lif(a)
    c, _, _ = w_out(z)
    y, _, _ = readout(c)
    return z.transpose(0, 1).double(), y.transpose(0, 1).double()
