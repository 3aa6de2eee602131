"""Export a trained LIF network as a lava-dl netx HDF5 file (what ``lava.lib.dl.netx.hdf5.Network`` loads), for
the Loihi profiles.

Layout (hardware.md section 2.2; lava-dl ``netx/hdf5.py``, ``netx/utils.py``)::

    /layer/0   the recurrent LIF layer
        type        b"dense_rec" (fixed-length ASCII, shape (1,))
        shape       [N]
        inFeatures  n_in,  outFeatures N
        weight      (N, n_in)  integer-valued float64: 2 c_in, the 8-bit mixed-sign mantissas on step 2
                               (<< (e_in - e_min) when the input scale is folded in, below)
        weight_rec  (N, N)     integer-valued float64: 2 c_rec << (e_rec - e_min)
        bias        (N,)       integer-valued float64: bias in a_in units (netx sets bias_exp = 6)
        neuron/     type b"CUBA", iDecay 4096 (netx: du = iDecay - 1 = 4095, the current is this step's
                    input only), vDecay = round(4096 (1 - alpha)), vThMant = v_th / a_in unit,
                    refDelay 1 (no refractory period), gradedSpike 0
    /layer/1   the readout: type b"dense", shape [O], inFeatures N, outFeatures O, weight 2 c_out (O, N),
               bias b_out in readout a_in units, neuron CUBA with iDecay 4096, vDecay = round(4096 (1 - kappa)),
               vThMant 131071 (the largest 17-bit mantissa: a non-spiking integrator read through its voltage)

No version field (netx has none). neuroinit's own description lives in root attributes, which netx ignores:
``format``, ``format_version``, ``profile``, ``profile_toml``, ``cell_config``, ``dt_ms``, ``alpha``,
``kappa``, ``a_in_unit`` (value of one a_in unit in neuroinit's units, threshold = v_th), ``readout_unit``
(value of one readout voltage LSB: ``2^(e_out - 1) / 64``), ``input_scale`` and ``input_frac_bits``, the
weight exponents, and what netx takes only as ``Network(...)`` arguments or never reads:
``netx_input_message_bits`` (graded input), ``netx_reset_offset`` (netx's reset zeroes layer i at Lava time
step ``reset_offset + 1 + i``: each layer starts its first real step from 0, which replaces holding the bias
at 0 in the priming step) and ``readout`` (outputs = layer 1 voltage x ``readout_unit``, chip step t + 2).
:mod:`neuroinit.io.lava_loader` applies them; :func:`netx_reference` is what Lava computes, :func:`verify_netx`
runs the file in Lava and compares.

Units: one a_in unit is ``2^(e_min - 1)`` with ``e_min`` the finer of the input and recurrent exponents, as
in :mod:`neuroinit.emulate.integer`. netx stores weights in ``[-256, 254]`` and finds the Dense weight exponent
itself (``optimize_weight_bits``, one exponent for ``weight`` and ``weight_rec`` together), so a matrix coarser than ``e_min`` cannot carry its shift in the weights:
for the input matrix the shift moves into the input, sent as graded spikes ``round(u * input_scale)`` with
``input_scale = 2^(e_in - e_min)`` (for integer inputs it is folded into the weights where they still fit,
``integer_inputs``); a recurrent matrix coarser than the input one must still fit ``[-256, 254]`` after its shift, or the export is refused. netx's bias is in a_in units
(bias_exp 6). ``emulate(deploy(cell, input_frac_bits=e_in - e_min, bias_exp=6), inputs)`` reproduces exactly
what this file computes on Loihi for those inputs.
The readout runs on the chip here, with integer decay, whereas the emulator's accuracy report computes it on
the host in float.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from neuroinit.cells.base import RecurrentCell
from neuroinit.emulate.integer import (
    LAVA_BIAS_BITS,
    LAVA_BIAS_EXP,
    LAVA_VTH_MAX,
    Deployment,
    deploy,
    emulate,
    lava_dense,
    lava_lif_step,
)
from neuroinit.io.atomic import atomic_write_path
from neuroinit.profiles import HardwareProfile, load_profile

__all__ = ["NETX_FORMAT", "NetxExport", "find_lava_python", "netx_reference", "read_netx", "run_in_lava", "verify_netx",
           "write_netx"]

NETX_FORMAT = "neuroinit-netx"
FORMAT_VERSION = 1
NETX_W_MIN, NETX_W_MAX = -256, 254     # lava-dl netx optimize_weight_bits clips mixed-sign weights here
NETX_INPUT_MESSAGE_BITS = 16           # graded input spikes (a_in is 16-bit in Lava)
NETX_RESET_OFFSET = 1                  # netx resets layer i at Lava time step reset_offset + 1 + i (chip step 1 + i)


@dataclass(frozen=True)
class NetxExport:
    path: Path
    input_scale: float
    input_frac_bits: int
    a_in_unit: float
    notes: tuple[str, ...]


def _type(ds_name: str) -> np.ndarray:
    return np.array([ds_name.encode("ascii")], dtype="S10")


def _neuron(g: h5py.Group, *, v_decay: int, vth: int) -> None:
    n = g.create_group("neuron")
    n.create_dataset("type", data=_type("CUBA"))
    n.create_dataset("iDecay", data=4096)
    n.create_dataset("vDecay", data=int(v_decay))
    n.create_dataset("vThMant", data=int(vth))
    n.create_dataset("refDelay", data=1)
    n.create_dataset("gradedSpike", data=0)


def _readout(dep: Deployment) -> tuple[np.ndarray, np.ndarray, int, float, list[str]]:
    """Layer 1 as the file holds it: ``(weight 2 c_out, bias in readout a_in units, vDecay, a_in unit, notes)``."""
    kappa_dv = int(min(max(round(4096 * (1.0 - dep.kappa)), 0), 4095))
    out_unit = 2.0 ** (dep.grids["w_out"].exponent - 1)
    b_out = np.rint(dep.cell.b_out.detach().double().numpy() / out_unit).astype(np.int64)
    bmax = 2 ** (LAVA_BIAS_BITS - 1)
    notes = []
    if ((b_out > bmax - 1) | (b_out < -bmax)).any():
        notes.append("readout bias saturates the 13-bit bias mantissa")
        b_out = np.clip(b_out, -bmax, bmax - 1)
    return 2 * dep.codes["w_out"].astype(np.int64), b_out, kappa_dv, out_unit, notes


def _netx_deploy(cell: RecurrentCell, profile: HardwareProfile | str | None, integer_inputs: bool
                 ) -> tuple[Deployment, int, bool]:
    """The deployment a netx file describes: ``(dep, frac, folded)`` with ``frac`` the input's graded bits
    (``input_scale = 2^frac``) and ``folded`` whether the input shift is in the layer-0 weights instead."""
    profile = load_profile(profile if profile is not None else cell.profile)
    probe = deploy(cell, profile, input_frac_bits=0)
    if probe.arithmetic != "lava":
        raise ValueError(f"Invalid profile '{profile.name}' for --format netx: netx is lava-dl's format for Loihi; "
                         "allowed: loihi-like, loihi2-like (use --format nir for other chips)")
    g_in = probe.grids["w_in"]
    e_min = probe.e_min
    if probe.unit != 2.0 ** (e_min - 1):
        raise ValueError(f"Invalid network for --format netx on '{profile.name}': the threshold needs "
                         f"{round(float(probe.cell.v_th) / 2.0 ** (e_min - 1))} a_in units, beyond netx's 17-bit "
                         f"vThMant ({LAVA_VTH_MAX}); allowed: weight exponents > {e_min} (use --format nir)")
    frac = max(g_in.exponent - e_min, 0)
    # integer inputs: round(u 2^frac) = 2^frac u, so the shift can sit in the weights when they still fit
    folded = bool(integer_inputs and frac > 0
                  and np.abs(2 * probe.codes["w_in"].astype(np.int64) << frac).max(initial=0) <= NETX_W_MAX)
    if folded:
        frac = 0
    # exp_in = 0 (or the folded shift): the rest is in the graded input; bias_exp 6: netx's bias is in a_in units
    dep = deploy(cell, profile, input_frac_bits=frac, bias_exp=LAVA_BIAS_EXP)
    return dep, frac, folded


def write_netx(path: str | Path, cell: RecurrentCell, profile: HardwareProfile | str | None = None, *,
               integer_inputs: bool = False) -> NetxExport:
    """Write ``cell`` deployed on a Loihi ``profile`` (default: the cell's own) as lava-dl netx HDF5, atomically.

    ``integer_inputs``: the task's inputs are integers (spike counts); the input scale is then folded into the
    layer-0 weights where they still fit ``[-256, 254]`` (``input_scale`` 1). Raises ``ValueError`` (one line)
    for non-Loihi profiles, rate networks, networks that do not fit or saturate, and recurrent weights that
    netx's ``[-256, 254]`` cannot hold."""
    profile = load_profile(profile if profile is not None else cell.profile)
    dep, frac, folded = _netx_deploy(cell, profile, integer_inputs)
    g_in, g_rec, g_out = (dep.grids[n] for n in ("w_in", "w_rec", "w_out"))
    w_in = (dep.w_in << dep.exp_in).astype(np.float64)
    w_rec = (dep.w_rec << dep.exp_rec).astype(np.float64)
    if w_rec.max(initial=0) > NETX_W_MAX or w_rec.min(initial=0) < NETX_W_MIN:
        raise ValueError(f"Invalid network for --format netx on '{profile.name}': recurrent weights need "
                         f"exponent {g_rec.exponent} but the input weights {g_in.exponent}; netx holds one "
                         f"weight range [{NETX_W_MIN}, {NETX_W_MAX}] per layer and recurrent spikes are binary, "
                         f"so the recurrent weights ({w_rec.min():.0f}..{w_rec.max():.0f}) do not fit; "
                         "allowed: recurrent exponent <= input exponent (use --format nir)")
    dc = dep.cell
    ro_w, b_out, kappa_dv, out_unit, ro_notes = _readout(dep)
    notes = list(dep.notes) + ro_notes
    if folded:
        notes.append(f"input scale 2^{g_in.exponent - dep.e_min} folded into the layer-0 weights (integer inputs)")
    over = dep.bias > dep.threshold
    if over.any():
        notes.append(f"{int(over.sum())} neurons' bias alone crosses the threshold: they spike in Lava's priming "
                     "step, which the reset does not undo (not bit-exact to the emulation)")
    cfg = dict(dc.config())
    cfg["profile"] = profile.name
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Invalid output path {path}: is a directory; allowed: a file path")
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = NETX_FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["profile"] = profile.name
        f.attrs["profile_toml"] = profile.text
        f.attrs["cell_config"] = json.dumps(cfg, sort_keys=True)
        f.attrs["dt_ms"] = dc.dt
        f.attrs["alpha"] = dep.alpha
        f.attrs["kappa"] = dep.kappa
        f.attrs["a_in_unit"] = dep.unit
        f.attrs["readout_unit"] = out_unit / 64
        f.attrs["input_scale"] = 2.0 ** frac
        f.attrs["input_frac_bits"] = frac
        f.attrs["netx_input_message_bits"] = NETX_INPUT_MESSAGE_BITS
        f.attrs["netx_reset_offset"] = NETX_RESET_OFFSET
        f.attrs["readout"] = ("layer 1 never spikes: outputs = layer 1 voltage v * readout_unit; neuroinit step t "
                              "is chip step t + 2 (run with neuroinit/io/lava_loader.py)")
        f.attrs["weight_exponent_in"] = g_in.exponent
        f.attrs["weight_exponent_rec"] = g_rec.exponent
        f.attrs["weight_exponent_out"] = g_out.exponent
        f.attrs["notes"] = "\n".join(notes)
        layers = f.create_group("layer")
        rec = layers.create_group("0")
        rec.create_dataset("type", data=_type("dense_rec"))
        rec.create_dataset("shape", data=np.array([dc.n_hidden]))
        rec.create_dataset("inFeatures", data=dc.n_in)
        rec.create_dataset("outFeatures", data=dc.n_hidden)
        rec.create_dataset("weight", data=w_in)
        rec.create_dataset("weight_rec", data=w_rec)
        rec.create_dataset("bias", data=dep.bias.astype(np.float64))
        _neuron(rec, v_decay=dep.decay, vth=dep.threshold)
        ro = layers.create_group("1")
        ro.create_dataset("type", data=_type("dense"))
        ro.create_dataset("shape", data=np.array([dc.n_out]))
        ro.create_dataset("inFeatures", data=dc.n_hidden)
        ro.create_dataset("outFeatures", data=dc.n_out)
        ro.create_dataset("weight", data=ro_w.astype(np.float64))
        ro.create_dataset("bias", data=b_out.astype(np.float64))
        _neuron(ro, v_decay=kappa_dv, vth=LAVA_VTH_MAX)
    return NetxExport(path=path, input_scale=2.0 ** frac, input_frac_bits=frac, a_in_unit=dep.unit,
                      notes=tuple(notes))


def netx_reference(cell: RecurrentCell, inputs: torch.Tensor, profile: HardwareProfile | str | None = None, *,
                   integer_inputs: bool = False) -> dict:
    """What the netx file of ``cell`` computes in Lava for time-major ``inputs`` ``(T, B, I)`` in task units, run
    by :mod:`neuroinit.io.lava_loader`: the integer emulation of layer 0 (:func:`~neuroinit.emulate.integer.emulate`
    of the file's deployment) and of the on-chip readout (layer 1, Lava's LIF with ``vThMant`` 131071, reset at
    its first step), all on neuroinit's time axis.

    Returns numpy arrays: ``spikes`` (T, B, N) bool, ``v`` (T, B, N) layer 0's voltage after its spike reset,
    ``readout_v`` (T, B, O) int, ``outputs`` = ``readout_v * readout_unit``, and ``host_outputs`` (the emulator's
    float readout, what ``compare_on_task`` scores)."""
    dep, _, _ = _netx_deploy(cell, profile, integer_inputs)
    em = emulate(dep, inputs)
    spikes = em.spikes.numpy() > 0
    ro_w, b_out, kappa_dv, out_unit, _ = _readout(dep)
    n_steps, batch = spikes.shape[:2]
    u = np.zeros((batch, ro_w.shape[0]), np.int64)
    v = np.zeros_like(u)
    readout_v = np.zeros((n_steps, batch, ro_w.shape[0]), np.int64)
    for t in range(n_steps):
        a_in = lava_dense(ro_w, spikes[t].astype(np.int64), 0)
        u, v, _ = lava_lif_step(u, v, a_in, du=4095, dv=kappa_dv, bias_mant=b_out, bias_exp=LAVA_BIAS_EXP,
                                vth=LAVA_VTH_MAX)
        readout_v[t] = v
    return {"spikes": spikes, "v": np.where(spikes, 0, em.v.numpy()), "readout_v": readout_v,
            "outputs": readout_v * (out_unit / 64), "host_outputs": em.outputs.numpy()}


def read_netx(path: str | Path) -> dict:
    """The file as nested dicts of numpy values (strings decoded), with root attributes under ``"attrs"``."""
    def walk(g: h5py.Group) -> dict:
        out = {}
        for k, v in g.items():
            if isinstance(v, h5py.Group):
                out[k] = walk(v)
            else:
                x = v[()]
                if isinstance(x, np.ndarray) and x.dtype.kind == "S":
                    x = x[0].decode("ascii")
                out[k] = x
        return out

    with h5py.File(path, "r") as f:
        d = walk(f)
        d["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return d


LAVA_PYTHON_ENV = "NEUROINIT_LAVA_PYTHON"


def find_lava_python() -> tuple[str | None, str]:
    """The Python that runs Lava: ``$NEUROINIT_LAVA_PYTHON`` if set, else this interpreter when lava-dl imports.
    Returns ``(executable or None, reason)`` (the reason says where it came from, or why there is none)."""
    import importlib.util
    import os
    import sys

    env = os.environ.get(LAVA_PYTHON_ENV)
    if env:
        if not Path(env).is_file():
            raise ValueError(f"Invalid {LAVA_PYTHON_ENV}={env}: no such file; allowed: the python of an "
                             "environment with lava-nc and lava-dl (docs/export.md)")
        return env, f"{LAVA_PYTHON_ENV}={env}"
    try:
        found = importlib.util.find_spec("lava.lib.dl.netx") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return sys.executable, "lava-dl importable here"
    return None, (f"lava-dl not importable here and {LAVA_PYTHON_ENV} not set (Lava needs Python < 3.11; "
                  "docs/export.md says how to make its environment)")


def run_in_lava(path: str | Path, inputs: torch.Tensor, python: str) -> dict:
    """Run the netx file in Lava through :mod:`neuroinit.io.lava_loader` (a subprocess of ``python``) on
    time-major ``inputs`` (T, B, I); returns its arrays (``spikes``, ``v``, ``readout_v``, ``outputs``)."""
    import os
    import shutil
    import subprocess
    import tempfile

    loader = Path(__file__).with_name("lava_loader.py")
    with tempfile.TemporaryDirectory(prefix="neuroinit-lava-") as d:
        np.save(Path(d) / "inputs.npy", inputs.detach().to(device="cpu", dtype=torch.float64).numpy())
        cmd = [python, str(loader), str(path), "--inputs", str(Path(d) / "inputs.npy"), "--out",
               str(Path(d) / "out.npz")]
        if shutil.which("nice"):
            cmd = ["nice", "-n", "10", *cmd]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"Lava run failed (exit {proc.returncode}, {python}): {tail[0]}")
        with np.load(Path(d) / "out.npz") as z:
            return {k: z[k] for k in z.files}


def verify_netx(path: str | Path, cell: RecurrentCell, inputs: torch.Tensor, *, task=None, batch=None,
                profile: HardwareProfile | str | None = None, integer_inputs: bool = False,
                python: str | None = None) -> dict:
    """Run the netx file as lava-dl loads it (:mod:`neuroinit.io.lava_loader`, ``Loihi2SimCfg`` fixed point) and
    count mismatches against :func:`netx_reference` (the integer emulation): ``spike_mismatches``,
    ``v_mismatches`` (layer 0 voltage), ``readout_v_mismatches``; with ``task`` and ``batch`` also the task
    accuracy of Lava's outputs and of the emulation's. ``ok`` is True when all three counts are 0.
    ``python``: the Lava interpreter (default :func:`find_lava_python`; ``ValueError`` when there is none)."""
    if python is None:
        python, why = find_lava_python()
        if python is None:
            raise ValueError(f"No Lava to verify in: {why}")
    ref = netx_reference(cell, inputs, profile, integer_inputs=integer_inputs)
    lava = run_in_lava(path, inputs, python)
    rep = {"python": python, "steps": int(inputs.shape[0]), "trials": int(inputs.shape[1]),
           "spikes_lava": int(lava["spikes"].sum()), "spikes_emulation": int(ref["spikes"].sum())}
    for k in ("spikes", "v", "readout_v"):
        if lava[k].shape != ref[k].shape:
            raise RuntimeError(f"Lava returned {k} of shape {lava[k].shape}, expected {ref[k].shape}")
        name = "spike_mismatches" if k == "spikes" else f"{k}_mismatches"
        rep[name] = int((lava[k] != ref[k]).sum())
    if task is not None and batch is not None:
        rep["lava_accuracy"] = task.accuracy(torch.from_numpy(lava["outputs"]), batch)
        rep["emulation_accuracy"] = task.accuracy(torch.from_numpy(ref["outputs"]), batch)
        rep["emulation_host_readout_accuracy"] = task.accuracy(torch.from_numpy(ref["host_outputs"]), batch)
    rep["ok"] = rep["spike_mismatches"] == 0 and rep["v_mismatches"] == 0 and rep["readout_v_mismatches"] == 0
    return rep
