"""Xylo export: the integer specification SynSense's toolchain takes, checked against the profile's limits,
written as HDF5, and run in SynSense's bit-accurate simulator ``xylosim`` for verification.

The specification uses the argument names of rockpool's ``XyloSim.from_specification`` (rockpool 3.1,
``devices/xylo/syns61201/xylo_sim.py``)::

    weights_in (I, N) int8      weights_rec (N, N) int8      weights_out (N, O) int8
    weight_shift_in, weight_shift_rec, weight_shift_out        left shifts of those weights
    dash_mem (N), dash_syn (N), threshold (N), bias (N)       hidden neurons (bit-shift decays, int16)
    dash_mem_out (O), dash_syn_out (O), threshold_out (O), bias_out (O)
    dt                                                         seconds

so ``XyloSim.from_specification(**spec)`` loads it (rockpool's Xylo package imports ``samna`` at import time;
:func:`xylosim_layer` builds the same ``xylosim.v2.XyloLayer`` directly, as ``from_specification`` does:
one ``XyloSynapse(post, 0, w)`` per nonzero weight, in presynaptic order).

The package's integer emulation (:func:`neuroinit.emulate.integer.emulate` on the ``xylo-like`` profile, whose
``[neuron]`` section states Xylo's arithmetic) must give the same spike counts, synaptic currents and membranes
as ``xylosim``; :func:`verify_xylo` counts the differences. Schema of the file: ``docs/export.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroinit.emulate.integer import Deployment, chip_inputs, deploy, emulate
from neuroinit.io.atomic import atomic_write_path
from neuroinit.profiles import HardwareProfile, load_profile

__all__ = [
    "XYLO_FORMAT_VERSION",
    "XYLO_RULES",
    "XyloExport",
    "export_xylo",
    "input_frac_bits_for",
    "raster",
    "read_xylo",
    "run_xylosim",
    "verify_xylo",
    "write_xylo",
    "xylo_spec",
    "xylosim_layer",
]

XYLO_FORMAT_VERSION = 1

# What xylosim 0.1.3 computes (src/v2/cpp), as [neuron] rules; a profile that states anything else cannot be
# exported to Xylo. Fixed widths from XyloIAFNeuron.h: BITS_STATE 16, BITS_WEIGHT 8.
XYLO_RULES = {"synapse": "current", "decay_rounding": "floor-min-one", "threshold_compare": ">=",
              "reset": "subtract", "max_spikes": 31, "saturation": "every-add", "input": "counts",
              "input_cap": 15, "readout": "chip-lif", "schedule": "same-step"}
XYLO_STATE_BITS = 16
XYLO_WEIGHT_SHIFT_MAX = 7    # left shift of int8 weights that stays inside int16 with margin (profile: 0..7)
XYLO_DASH_MAX = 15           # 4-bit dash registers (hardware.md: width not confirmed; the profile's decay.bits)
SPEC_ARRAYS = ("weights_in", "weights_rec", "weights_out", "dash_mem", "dash_syn", "threshold", "bias",
               "dash_mem_out", "dash_syn_out", "threshold_out", "bias_out")
SPEC_SCALARS = ("weight_shift_in", "weight_shift_rec", "weight_shift_out")


@dataclass(frozen=True)
class XyloExport:
    """What :func:`write_xylo` wrote: the file, the specification, the deployment and the input encoding
    (``counts = clip(round(u 2^input_frac_bits), 0, 15)``)."""

    path: Path
    spec: dict
    deployment: Deployment
    input_frac_bits: int


def _check_rules(profile: HardwareProfile) -> None:
    rules = profile.neuron
    for key, want in XYLO_RULES.items():
        if getattr(rules, key) != want:
            raise ValueError(f"Invalid profile '{profile.name}' for --format xylo: neuron.{key} = "
                             f"{getattr(rules, key)!r} is not Xylo's arithmetic; allowed: {want!r} (xylosim)")
    if profile.state.bits != XYLO_STATE_BITS or profile.state.overflow != "saturate":
        raise ValueError(f"Invalid profile '{profile.name}' for --format xylo: state {profile.state.bits}-bit "
                         f"{profile.state.overflow}; allowed: 16-bit saturate (xylosim BITS_STATE)")
    if profile.decay.kind != "shift" or profile.threshold.shift != 0 or profile.weights.bits != 8:
        raise ValueError(f"Invalid profile '{profile.name}' for --format xylo: needs decay.kind = 'shift', "
                         "threshold.shift = 0 and weights.bits = 8 (Xylo's bit-shift decay, int16 threshold, "
                         "int8 weights)")


def xylo_spec(dep: Deployment, *, dt: float = 1e-3) -> dict:
    """The Xylo specification of a ``fixed`` deployment (module docstring), every limit checked.

    Raises ``ValueError`` with one line per violated limit (the first found): weights outside int8, a weight
    shift outside 0..7, a dash outside 0..15 (dash_syn at least 1), a threshold outside 1..32767, a bias
    outside int16, too many inputs, neurons, outputs or a fan-in above the profile's.
    """
    profile = dep.profile
    _check_rules(profile)
    if dep.arithmetic != "fixed" or dep.readout is None:
        raise ValueError(f"Invalid deployment for --format xylo: arithmetic {dep.arithmetic!r}; allowed: 'fixed' "
                         "with readout 'chip-lif'")
    ro = dep.readout
    n, n_in, n_out = dep.w_rec.shape[0], dep.w_in.shape[1], ro["w_out"].shape[0]
    spec = {
        "weights_in": dep.w_in.T, "weights_rec": dep.w_rec.T, "weights_out": ro["w_out"].T,
        "weight_shift_in": int(dep.exp_in), "weight_shift_rec": int(dep.exp_rec),
        "weight_shift_out": int(ro["exp_out"]),
        "dash_mem": np.full(n, dep.decay), "dash_syn": np.full(n, dep.syn_decay),
        "threshold": np.full(n, dep.threshold), "bias": np.asarray(dep.bias).reshape(n),
        "dash_mem_out": np.full(n_out, ro["decay"]), "dash_syn_out": np.full(n_out, ro["syn_decay"]),
        "threshold_out": np.full(n_out, ro["threshold"]), "bias_out": np.asarray(ro["bias"]).reshape(n_out),
        "dt": float(dt),
    }
    spec = {k: (v.astype(np.int64) if isinstance(v, np.ndarray) else v) for k, v in spec.items()}
    lim = profile.limits
    checks = [
        (lim.max_inputs and n_in > lim.max_inputs, f"{n_in} inputs; allowed: <= {lim.max_inputs} (limits.max_inputs)"),
        (lim.max_neurons and n > lim.max_neurons, f"{n} hidden neurons; allowed: <= {lim.max_neurons}"),
        (lim.max_outputs and n_out > lim.max_outputs, f"{n_out} outputs; allowed: <= {lim.max_outputs}"),
    ]
    fan_in = int(((spec["weights_in"] != 0).sum(0) + (spec["weights_rec"] != 0).sum(0)).max(initial=0))
    checks.append((lim.max_fan_in and fan_in > lim.max_fan_in,
                   f"fan-in {fan_in}; allowed: <= {lim.max_fan_in} (limits.max_fan_in)"))
    for name in ("weights_in", "weights_rec", "weights_out"):
        w = spec[name]
        checks.append((w.size and (w.min() < -128 or w.max() > 127),
                       f"{name} outside int8 ({w.min()}..{w.max()}); allowed: -128..127"))
    for name in SPEC_SCALARS:
        checks.append((not 0 <= spec[name] <= XYLO_WEIGHT_SHIFT_MAX,
                       (f"{name} = {spec[name]}; allowed: 0..{XYLO_WEIGHT_SHIFT_MAX} (the matrices' weight "
                       "exponents are too far apart: retrain with closer input/recurrent scales)")))
    for name, lo in (("dash_mem", 0), ("dash_syn", 1), ("dash_mem_out", 0), ("dash_syn_out", 1)):
        d = spec[name]
        checks.append((d.size and (d.min() < lo or d.max() > XYLO_DASH_MAX),
                       f"{name} {d.min()}..{d.max()}; allowed: {lo}..{XYLO_DASH_MAX}"))
    for name in ("threshold", "threshold_out"):
        t = spec[name]
        checks.append((t.size and (t.min() < 1 or t.max() > 2 ** 15 - 1),
                       f"{name} {t.min()}..{t.max()}; allowed: 1..32767 (int16, positive)"))
    for name in ("bias", "bias_out"):
        b = spec[name]
        checks.append((b.size and (b.min() < -2 ** 15 or b.max() > 2 ** 15 - 1),
                       f"{name} outside int16; allowed: -32768..32767"))
    for bad, what in checks:
        if bad:
            raise ValueError(f"Invalid network for --format xylo on profile '{profile.name}': {what}")
    return spec


def write_xylo(path: str | Path, cell, profile: HardwareProfile | str | None = None, *,
               input_frac_bits: int = 0, dt: float = 1e-3) -> XyloExport:
    """Deploy ``cell`` on ``profile`` (default: the cell's own; it must state Xylo's arithmetic), check every
    limit and write the specification to ``path`` (HDF5, atomically). ``input_frac_bits``: fractional bits of
    the input counts (real input u is sent as ``clip(round(u 2^f), 0, 15)``; 0 for 0/1 rasters)."""
    import h5py

    profile = load_profile(profile if profile is not None else cell.profile)
    _check_rules(profile)
    dep = deploy(cell, profile, input_frac_bits=input_frac_bits)
    spec = xylo_spec(dep, dt=dt)
    path = Path(path)
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = "neuroinit-xylo"
        f.attrs["format_version"] = XYLO_FORMAT_VERSION
        f.attrs["profile"] = profile.name
        f.attrs["profile_toml"] = profile.text
        f.attrs["input_frac_bits"] = dep.input_frac_bits
        f.attrs["input_cap"] = profile.neuron.input_cap
        f.attrs["unit"] = dep.unit
        f.attrs["out_unit"] = dep.readout["unit"]
        f.attrs["dt"] = spec["dt"]
        f.attrs["notes"] = "\n".join(dep.notes)
        for name in SPEC_ARRAYS:
            dtype = np.int8 if name.startswith("weights") else np.int16
            f.create_dataset(name, data=spec[name].astype(dtype))
        for name in SPEC_SCALARS:
            f.attrs[name] = spec[name]
    return XyloExport(path=path, spec=spec, deployment=dep, input_frac_bits=dep.input_frac_bits)


def read_xylo(path: str | Path) -> tuple[dict, dict]:
    """``(spec, attrs)`` of a file written by :func:`write_xylo` (arrays as int64)."""
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != "neuroinit-xylo":
            raise ValueError(f"Invalid file {path}: not a neuroinit Xylo export (format attribute "
                             f"{f.attrs.get('format')!r}; allowed: 'neuroinit-xylo')")
        spec = {name: f[name][()].astype(np.int64) for name in SPEC_ARRAYS}
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    for name in SPEC_SCALARS:
        spec[name] = int(attrs[name])
    spec["dt"] = float(attrs["dt"])
    return spec, attrs


def xylosim_layer(spec: dict):
    """``(layer, synapses)``: a ``xylosim.v2.XyloLayer`` built from ``spec`` as rockpool's ``XyloSim.from_specification`` builds it
    (one synapse id; the second synaptic current unused with dash 1). Needs ``pip install xylosim``."""
    from xylosim.v2 import XyloLayer, XyloSynapse

    def synapses(w: np.ndarray) -> list:
        return [[XyloSynapse(int(post), 0, int(row[post])) for post in np.flatnonzero(row)] for row in w]

    n = spec["weights_rec"].shape[0]
    ints = lambda a: [int(x) for x in a]
    # the layer holds raw pointers to the synapse objects: they must live as long as the layer (rockpool keeps
    # them in _xylo_sim_params), so they are returned with it
    keep = (synapses(spec["weights_in"]), synapses(spec["weights_rec"]), synapses(spec["weights_out"]))
    layer = XyloLayer(
        synapses_in=keep[0], synapses_rec=keep[1], synapses_out=keep[2], aliases=[[] for _ in range(n)],
        threshold=ints(spec["threshold"]), threshold_out=ints(spec["threshold_out"]),
        has_bias=bool(np.any(spec["bias"]) or np.any(spec["bias_out"])), bias=ints(spec["bias"]),
        bias_out=ints(spec["bias_out"]), weight_shift_inp=spec["weight_shift_in"],
        weight_shift_rec=spec["weight_shift_rec"], weight_shift_out=spec["weight_shift_out"],
        dash_mem=ints(spec["dash_mem"]), dash_mem_out=ints(spec["dash_mem_out"]),
        dash_syns=[[int(d), 1] for d in spec["dash_syn"]], dash_syns_out=[[int(d)] for d in spec["dash_syn_out"]],
        name="neuroinit")
    return layer, keep


def run_xylosim(spec: dict, counts: np.ndarray) -> dict:
    """Run ``spec`` in xylosim on integer input ``counts`` (T, I) of one trial: hidden spike counts, synaptic
    currents and membranes (T, N), output spikes, currents and membranes (T, O), all int64."""
    layer, _keep = xylosim_layer(spec)
    out = layer.evolve(np.asarray(counts, dtype=np.int64).tolist())
    as_tn = lambda rec: np.array([list(r) for r in rec], dtype=np.int64).T
    return {"spikes": np.array(layer.rec_recurrent_spikes, dtype=np.int64), "i": as_tn(layer.rec_i_syn),
            "v": as_tn(layer.rec_v_mem), "out_spikes": np.array(out, dtype=np.int64),
            "i_out": as_tn(layer.rec_i_syn_out), "v_out": as_tn(layer.rec_v_mem_out)}


def verify_xylo(spec: dict, dep: Deployment, inputs: torch.Tensor) -> dict:
    """Mismatches between xylosim and the package's integer emulation on time-major ``inputs`` (T, B, I): per
    trial the inputs are encoded as the chip's counts (:func:`~neuroinit.emulate.integer.chip_inputs`), run in
    both, and every hidden spike count, current, membrane and output membrane compared. Returns a dict with
    ``spike_mismatches``, ``i_mismatches``, ``v_mismatches``, ``v_out_mismatches``, ``spikes`` (xylosim's total)
    and ``steps``, ``trials``."""
    em = emulate(dep, inputs)
    counts = chip_inputs(dep, inputs.detach().cpu().double().numpy())
    rep = {"spike_mismatches": 0, "i_mismatches": 0, "v_mismatches": 0, "v_out_mismatches": 0, "spikes": 0,
           "multi_spike_entries": 0, "steps": int(inputs.shape[0]), "trials": int(inputs.shape[1])}
    for b in range(inputs.shape[1]):
        xs = run_xylosim(spec, counts[:, b])
        rep["spike_mismatches"] += int((xs["spikes"] != em.spikes[:, b].numpy()).sum())
        rep["i_mismatches"] += int((xs["i"] != em.i[:, b].numpy()).sum())
        rep["v_mismatches"] += int((xs["v"] != em.v[:, b].numpy()).sum())
        rep["v_out_mismatches"] += int((xs["v_out"] != em.v_out[:, b].numpy()).sum())
        rep["spikes"] += int(xs["spikes"].sum())
        rep["multi_spike_entries"] += int((xs["spikes"] > 1).sum())
    return rep


def input_frac_bits_for(inputs: torch.Tensor | None, cap: int = 15, max_bits: int = 8) -> int:
    """The finest input encoding whose counts stay within ``cap``: the largest ``f`` (0..max_bits) with
    ``round(max|u| 2^f) <= cap`` (0 without inputs or when even ``f = 0`` clips)."""
    if inputs is None:
        return 0
    top = float(inputs.detach().abs().max()) if inputs.numel() else 0.0
    f = 0
    while f < max_bits and round(top * 2.0 ** (f + 1)) <= cap:
        f += 1
    return f


def raster(n_steps: int, trials: int, n_in: int, *, rate: float = 0.3, seed: int = 0) -> torch.Tensor:
    """A 0/1 input raster (T, B, I), float64, Bernoulli(``rate``) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_steps, trials, n_in, generator=g, dtype=torch.float64) < rate).double()


def export_xylo(out: str | Path, cell, profile: HardwareProfile | str | None, inputs: torch.Tensor | None, *,
                verify: bool = False, seed: int = 0) -> dict:
    """``neuroinit export --format xylo``: write the specification (:func:`write_xylo`, input encoding from the
    task's ``inputs``) and, with ``verify``, read the file back and run it in xylosim on a 0/1 raster and on
    the task's inputs, counting mismatches against the package's emulation (:func:`verify_xylo`). Returns the
    report entries (``input_frac_bits``, ``notes``, ``verify``: ``{"raster": ..., "task": ...}``, ``ok``)."""
    frac = input_frac_bits_for(inputs)
    ex = write_xylo(out, cell, profile, input_frac_bits=frac)
    rep: dict = {"input_frac_bits": ex.input_frac_bits, "notes": list(ex.deployment.notes), "ok": True}
    if inputs is not None and bool((inputs < 0).any()):
        rep["notes"].append("negative task inputs are sent as 0 counts (Xylo's inputs are spike counts)")
    if not verify:
        return rep
    try:
        import xylosim  # noqa: F401
    except ImportError:
        raise ValueError("Invalid --verify for --format xylo: xylosim is not installed; allowed after "
                         "pip install 'neuroinit[verify]' (or pip install xylosim)") from None
    spec, _ = read_xylo(out)
    steps = int(inputs.shape[0]) if inputs is not None else 100
    checks = {"raster": raster(max(steps, 100), 8, cell.n_in, seed=seed)}
    if inputs is not None:
        checks["task"] = inputs.detach().to(device="cpu", dtype=torch.float64)
    rep["verify"] = {name: verify_xylo(spec, ex.deployment, x) for name, x in checks.items()}
    rep["ok"] = all(r["spike_mismatches"] == r["i_mismatches"] == r["v_mismatches"] == r["v_out_mismatches"] == 0
                    for r in rep["verify"].values())
    return rep
