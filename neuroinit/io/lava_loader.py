"""Run a neuroinit netx export in Lava with lava-dl's own classes, and read its outputs in task units.

This file is self-contained (numpy and h5py; Lava imported only inside the functions that need it), so it runs
in the Python 3.10 environment Lava needs without installing neuroinit there::

    python neuroinit/io/lava_loader.py net_netx.h5 --inputs inputs.npy --out lava_out.npz

What the file carries in the form netx reads (``/layer/...``) and what it cannot, with how this loader applies
the rest (docs/export.md, "Running the netx file in Lava"):

* **Graded input.** netx's ``Network(input_message_bits=0)`` default is unary input; neuroinit's inputs are
  graded spikes ``k = round(u * input_scale)``. netx reads no input message width from a file (only an
  ``input`` layer with its own neurons sets one), so the loader passes ``input_message_bits`` (root attribute
  ``netx_input_message_bits``) and :func:`encode_inputs` computes ``k``. Where the task's inputs are integers
  (spike counts) and the shifted weights fit netx's ``[-256, 254]``, the export folds ``input_scale`` into the
  layer-0 weights and ``input_scale`` is 1.
* **First-step bias.** Lava's Dense delivers step t's input at step t + 1, so chip step 0 is a priming step: the
  input for neuroinit step 0 is in flight while layer 0 integrates its bias alone. neuroinit's step starts from
  ``v = 0``. netx's own reset does the rest: ``Network(reset_interval=R, reset_offset=1)`` zeroes layer ``i``'s
  ``u`` and ``v`` at time step ``2 + i`` (Lava counts from 1) before it integrates, i.e. chip step 1 for layer 0
  and chip step 2 for the readout: each then starts exactly where neuroinit's step 0 starts. ``R`` is any
  interval longer than the run (:func:`network_kwargs` takes the next power of two). Exact as long as no
  neuron's bias alone crosses its threshold in the priming step (the export notes it otherwise).
* **Readout.** Layer 1 never spikes (``vThMant`` 131071): it is a leaky integrator whose voltage ``v`` (24-bit,
  LSB = root attribute ``readout_unit``) is neuroinit's readout ``y`` on neuroinit step ``t`` at chip step
  ``t + 2``. :func:`run_trial` probes it and returns ``outputs = v * readout_unit`` on neuroinit's time axis.

A trial of ``T`` neuroinit steps runs ``T + 2`` chip steps (the input is padded with two zero steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

__all__ = ["encode_inputs", "load_network", "network_kwargs", "read_attrs", "run_trial", "run_trials"]

CHIP_LAG = 2   # neuroinit step t is layer 0's chip step t + 1 and the readout's chip step t + 2


def read_attrs(path: str | Path) -> dict:
    """Root attributes of a neuroinit netx file (``format`` must be ``"neuroinit-netx"``)."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if attrs.get("format") != "neuroinit-netx":
        raise ValueError(f"Invalid file {path}: format {attrs.get('format')!r}; allowed: a neuroinit netx export "
                         "(format 'neuroinit-netx', written by `neuroinit export --format netx`)")
    return attrs


def network_kwargs(path: str | Path, n_steps: int) -> dict:
    """Keyword arguments for ``lava.lib.dl.netx.hdf5.Network`` that a run of ``n_steps`` neuroinit steps needs:
    ``net_config``, ``input_message_bits``, ``reset_interval`` (the next power of two above the run's
    ``n_steps + 2`` chip steps: one reset per run) and ``reset_offset`` (module docstring)."""
    attrs = read_attrs(path)
    if not (isinstance(n_steps, (int, np.integer)) and n_steps >= 1):
        raise ValueError(f"Invalid n_steps {n_steps!r}: allowed integers >= 1")
    interval = 1 << int(n_steps + CHIP_LAG + 1).bit_length()
    return {"net_config": str(path), "input_message_bits": int(attrs["netx_input_message_bits"]),
            "reset_interval": interval, "reset_offset": int(attrs["netx_reset_offset"])}


def encode_inputs(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Graded input spikes for Lava: ``k = round(u * input_scale)`` (int32) for ``inputs`` ``(T, n_in)`` in task
    units, padded with ``CHIP_LAG`` zero steps, laid out ``(n_in, T + 2)`` as Lava's ``RingBuffer`` wants."""
    attrs = read_attrs(path)
    u = np.asarray(inputs, dtype=np.float64)
    if u.ndim != 2:
        raise ValueError(f"Invalid input shape {u.shape}: expected (T, n_in) for one trial")
    k = np.rint(u * float(attrs["input_scale"]))
    lim = 2 ** (int(attrs["netx_input_message_bits"]) - 1)
    if np.abs(k).max(initial=0) >= lim:
        raise ValueError(f"Invalid inputs: graded spikes up to {np.abs(k).max():.0f} exceed the file's "
                         f"{attrs['netx_input_message_bits']}-bit messages; allowed |u| < {lim / attrs['input_scale']:g}")
    pad = np.zeros((CHIP_LAG, u.shape[1]))
    return np.concatenate([k, pad]).T.astype(np.int32)


def load_network(path: str | Path, n_steps: int):
    """``lava.lib.dl.netx.hdf5.Network`` for the file, built by lava-dl with :func:`network_kwargs`."""
    from lava.lib.dl import netx

    return netx.hdf5.Network(**network_kwargs(path, n_steps))


def run_trial(path: str | Path, inputs: np.ndarray) -> dict:
    """Run one trial ``inputs`` ``(T, n_in)`` (task units) through the file in Lava's bit-accurate fixed-point
    simulation (``Loihi2SimCfg(select_tag="fixed_pt")``).

    Returns numpy arrays on neuroinit's time axis: ``spikes`` ``(T, N)`` bool (layer 0), ``v`` ``(T, N)`` int
    (layer 0's voltage after its reset, 24-bit units), ``readout_v`` ``(T, O)`` int (layer 1's voltage) and
    ``outputs`` ``(T, O)`` float (``readout_v * readout_unit``, neuroinit's readout ``y``)."""
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.io.source import RingBuffer
    from lava.proc.monitor.process import Monitor

    attrs = read_attrs(path)
    data = encode_inputs(path, inputs)
    n_steps, chip_steps = int(np.asarray(inputs).shape[0]), data.shape[1]
    net = load_network(path, n_steps)
    src = RingBuffer(data=data)
    src.s_out.connect(net.inp)
    hidden, readout = net.layers[0].neuron, net.layers[-1].neuron
    probes = {"spikes": hidden.s_out, "v": hidden.v, "readout_v": readout.v}
    monitors = {}
    for name, target in probes.items():
        monitors[name] = Monitor()
        monitors[name].probe(target, chip_steps)
    try:
        net.run(condition=RunSteps(num_steps=chip_steps), run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
        rec = {}
        for name, target in probes.items():
            d = monitors[name].get_data()
            rec[name] = np.asarray(d[target.process.name][target.name])   # (chip_steps, n)
    finally:
        net.stop()
    out = {"spikes": rec["spikes"][1:n_steps + 1] > 0,
           "v": rec["v"][1:n_steps + 1].astype(np.int64),
           "readout_v": rec["readout_v"][CHIP_LAG:n_steps + CHIP_LAG].astype(np.int64)}
    out["outputs"] = out["readout_v"] * float(attrs["readout_unit"])
    return out


def run_trials(path: str | Path, inputs: np.ndarray) -> dict:
    """:func:`run_trial` for each trial of a time-major batch ``(T, B, n_in)``; arrays stacked ``(T, B, ...)``."""
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"Invalid input shape {x.shape}: expected (T, B, n_in)")
    runs = [run_trial(path, x[:, b]) for b in range(x.shape[1])]
    return {k: np.stack([r[k] for r in runs], axis=1) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a neuroinit netx export in Lava (Loihi2SimCfg, fixed point).")
    p.add_argument("net", help="the netx file written by `neuroinit export --format netx`")
    p.add_argument("--inputs", required=True, help=".npy of shape (T, n_in) or (T, B, n_in), task units")
    p.add_argument("--out", required=True, help=".npz written with spikes, v, readout_v, outputs (T, B, ...)")
    args = p.parse_args(argv)
    x = np.load(args.inputs)
    res = run_trials(args.net, x if x.ndim == 3 else x[:, None])
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp.npz")
    np.savez(tmp, **res)
    tmp.replace(args.out)
    print(f"wrote {args.out}: {res['spikes'].shape[1]} trials x {res['spikes'].shape[0]} steps, "
          f"{int(res['spikes'].sum())} spikes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
