"""Hardware profiles: what a neuromorphic chip can represent, as frozen dataclasses loaded from TOML.

A profile is one TOML file in ``hardware_profiles/`` (bundled inside the wheel as ``neuroinit/hardware_profiles``)
or any path a user gives. Every value is validated on load; an unknown key, a wrong type, an out-of-range value
or a missing section raises :class:`ProfileError` naming the file, the key, the bad value and what is allowed.

Sections (``learning`` is optional, the others are required)::

    name, description                 strings
    [weights]   bits, sign, scaling, exponent_min, exponent_max
    [state]     bits, overflow
    [decay]     kind, bits
    [threshold] bits, shift
    [limits]    max_neurons, max_fan_in, max_inputs, max_outputs      (0 = no limit)
    [learning]  on_chip, trace_bits, weight_update, weight_bits
    [neuron]    synapse, decay_rounding, threshold_compare, reset, max_spikes, saturation, input, input_cap,
                readout, schedule                                     (optional; defaults: the generic integer LIF)

``bits = 0`` means float (no quantisation). The ``ideal`` profile is float everywhere and must make every
quantised code path equal the float path exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DecaySpec",
    "HardwareProfile",
    "LearningSpec",
    "LimitsSpec",
    "NeuronSpec",
    "ProfileError",
    "StateSpec",
    "ThresholdSpec",
    "WeightSpec",
    "bundled_profile_names",
    "load_profile",
    "profile_from_dict",
    "profile_to_dict",
]


class ProfileError(ValueError):
    """A hardware profile file is malformed; the message names file, key, bad value and what is allowed."""


def _int_range(lo: int, hi: int) -> dict:
    return {"type": int, "range": (lo, hi)}


def _choice(*choices: str) -> dict:
    return {"type": str, "choices": choices}


@dataclass(frozen=True)
class WeightSpec:
    """Synaptic weight representation.

    ``bits`` is the width of the integer weight code including its sign (0 = float). ``sign`` selects the code
    range: two's complement ``[-2^(b-1), 2^(b-1)-1]`` or sign-magnitude ``[-(2^(b-1)-1), 2^(b-1)-1]``.
    ``scaling``: ``pow2`` = value = code * 2^e with one exponent e in [exponent_min, exponent_max] shared by a
    matrix (and, for LIF, the threshold); ``free`` = any positive per-matrix scale; ``none`` = float weights.
    """

    bits: int = field(metadata=_int_range(0, 32))
    sign: str = field(default="twos-complement", metadata=_choice("twos-complement", "sign-magnitude"))
    scaling: str = field(default="pow2", metadata=_choice("none", "pow2", "free"))
    exponent_min: int = field(default=-16, metadata=_int_range(-64, 64))
    exponent_max: int = field(default=16, metadata=_int_range(-64, 64))

    @property
    def is_float(self) -> bool:
        return self.bits == 0

    @property
    def code_min(self) -> int:
        if self.is_float:
            raise ValueError("Invalid use of code_min: float weights have no integer code range")
        return -(2 ** (self.bits - 1)) if self.sign == "twos-complement" else -(2 ** (self.bits - 1) - 1)

    @property
    def code_max(self) -> int:
        if self.is_float:
            raise ValueError("Invalid use of code_max: float weights have no integer code range")
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class StateSpec:
    """Membrane / state variable width (0 = float) and what happens when it overflows."""

    bits: int = field(metadata=_int_range(0, 64))
    overflow: str = field(default="saturate", metadata=_choice("saturate", "wrap"))


@dataclass(frozen=True)
class DecaySpec:
    """How the membrane leak factor is stored.

    ``float``: any real alpha. ``linear``: an unsigned ``bits``-bit code d with alpha = (2^bits - d) / 2^bits
    (Loihi's dv). ``shift``: alpha = 1 - 2^-k for an integer shift k in 0..2^bits - 1 (Xylo's bit-shift decay).
    """

    kind: str = field(metadata=_choice("float", "linear", "shift"))
    bits: int = field(default=0, metadata=_int_range(0, 32))


@dataclass(frozen=True)
class ThresholdSpec:
    """Threshold as an unsigned ``bits``-bit mantissa (0 = float), shifted left by ``shift`` inside the chip."""

    bits: int = field(metadata=_int_range(0, 32))
    shift: int = field(default=0, metadata=_int_range(0, 16))


@dataclass(frozen=True)
class LimitsSpec:
    """Size limits of one core / chip; 0 means no limit."""

    max_neurons: int = field(default=0, metadata=_int_range(0, 10**9))
    max_fan_in: int = field(default=0, metadata=_int_range(0, 10**9))
    max_inputs: int = field(default=0, metadata=_int_range(0, 10**9))
    max_outputs: int = field(default=0, metadata=_int_range(0, 10**9))


@dataclass(frozen=True)
class LearningSpec:
    """On-chip learning precision: eligibility traces held in ``trace_bits`` (0 = float), weight updates
    rounded onto the weight grid by ``weight_update`` rounding, weights of ``weight_bits`` while learning
    (0 = same as inference weights)."""

    on_chip: bool = field(metadata={"type": bool})
    trace_bits: int = field(default=0, metadata=_int_range(0, 32))
    weight_update: str = field(default="stochastic", metadata=_choice("stochastic", "nearest"))
    weight_bits: int = field(default=0, metadata=_int_range(0, 32))


@dataclass(frozen=True)
class NeuronSpec:
    """The chip's neuron arithmetic, stated as rules the integer emulator composes
    (:mod:`neuroinit.emulate.integer`); the defaults are the generic integer LIF.

    ``synapse``: ``none`` (input added to the membrane) or ``current`` (a synaptic current state with its own
    decay code: ``I += input; I -= decay(I); V = V - decay(V) + I + b``, Xylo).
    ``decay_rounding``: how ``decay(x)`` rounds: ``toward-zero`` (``sign(x) (|x| f) >> B``, Lava),
    ``floor`` (arithmetic shift ``x >> dash``), ``floor-min-one`` (``x >> dash``, but at least 1 toward zero
    for x != 0: a small positive state still decays, xylosim ``decay``).
    ``threshold_compare``: spike when ``V > theta`` or ``V >= theta``.
    ``reset``: ``as-trained`` (the cell's reset, applied on the next step as in neuroinit), ``zero`` or
    ``subtract`` (applied at once after spiking, as the chip does: xylosim, Lava).
    ``max_spikes``: spikes one neuron may emit per step (1: binary; Xylo: min(floor(V/theta), 31), subtracting
    n theta, the recurrent input multiplied by the count).
    ``saturation``: ``state`` (the new membrane clips once) or ``every-add`` (every synaptic add into ``I``,
    the membrane change and the membrane clip, xylosim ``safe_add``).
    ``input``: ``graded`` (real inputs sent as ``round(u 2^f)``) or ``counts`` (integer spike counts per step,
    clipped at ``input_cap``; 0 = no cap).
    ``readout``: ``host`` (the leaky readout in float64 on the host from the chip's spikes) or ``chip-lif``
    (integer output neurons with the hidden neurons' rules, one spike per step at most; the output is their
    membrane).
    ``schedule``: ``same-step`` (input of step t acts at step t) or ``dense-delay`` (Lava's Dense sends at step t
    what it accumulated at t-1, and the emulator primes one step: Lava's u, v and 12-bit linear decay).
    """

    synapse: str = field(default="none", metadata=_choice("none", "current"))
    decay_rounding: str = field(default="floor", metadata=_choice("toward-zero", "floor", "floor-min-one"))
    threshold_compare: str = field(default=">", metadata=_choice(">", ">="))
    reset: str = field(default="as-trained", metadata=_choice("as-trained", "zero", "subtract"))
    max_spikes: int = field(default=1, metadata=_int_range(1, 255))
    saturation: str = field(default="state", metadata=_choice("state", "every-add"))
    input: str = field(default="graded", metadata=_choice("graded", "counts"))
    input_cap: int = field(default=0, metadata=_int_range(0, 2**16))
    readout: str = field(default="host", metadata=_choice("host", "chip-lif"))
    schedule: str = field(default="same-step", metadata=_choice("same-step", "dense-delay"))


_SECTIONS: dict[str, type] = {
    "weights": WeightSpec, "state": StateSpec, "decay": DecaySpec, "threshold": ThresholdSpec,
    "limits": LimitsSpec, "learning": LearningSpec, "neuron": NeuronSpec,
}
_OPTIONAL_SECTIONS = {"learning", "neuron"}


@dataclass(frozen=True)
class HardwareProfile:
    """A chip family's numeric limits. Construct with :func:`load_profile`."""

    name: str
    description: str
    weights: WeightSpec
    state: StateSpec
    decay: DecaySpec
    threshold: ThresholdSpec
    limits: LimitsSpec
    learning: LearningSpec | None = None
    neuron: NeuronSpec = field(default_factory=NeuronSpec)
    # Where the profile came from and its TOML text verbatim (for run files). Neither is part of the profile's
    # content: two profiles with the same values compare equal wherever they were read from.
    source: str = dataclasses.field(default="", compare=False)
    text: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def is_ideal(self) -> bool:
        """True when nothing is quantised: the float path is the chip path (weights, state, decay, threshold
        and, when the profile learns, its traces and learning weights are all float)."""
        learning_float = self.learning is None or (self.learning.trace_bits == 0 and self.learning.weight_bits == 0)
        return (self.weights.is_float and self.state.bits == 0 and self.decay.kind == "float"
                and self.threshold.bits == 0 and learning_float)

    @property
    def learns_on_chip(self) -> bool:
        return self.learning is not None and self.learning.on_chip


# --------------------------------------------------------------------------------------------- loading

def _bundled_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "hardware_profiles", here.parent / "hardware_profiles"]


def bundled_profile_names() -> list[str]:
    """Names of the profiles shipped with neuroinit, sorted."""
    names: set[str] = set()
    for d in _bundled_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.parent != Path("."):
        if not p.is_file():
            bundled = p.stem if p.stem in bundled_profile_names() else None
            dym = f" (did you mean the bundled profile '{bundled}'?)" if bundled else ""
            raise ProfileError(f"{p}: no such profile file{dym}")
        return p
    for d in _bundled_dirs():
        cand = d / f"{name_or_path}.toml"
        if cand.is_file():
            return cand
    names = bundled_profile_names()
    hint = difflib.get_close_matches(str(name_or_path), names, n=1)
    dym = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ProfileError(f"unknown profile '{name_or_path}'{dym}; bundled profiles: {', '.join(names)}; "
                       "or pass a path to a .toml file")


def load_profile(name_or_path: str | Path | HardwareProfile) -> HardwareProfile:
    """Load a bundled profile by name (``"loihi-like"``) or a user profile by path; validate every value."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    path = _resolve(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile file: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    return profile_from_dict(data, where=str(path), text=text)


def _allowed(meta: dict) -> str:
    if "range" in meta:
        return f"integer {meta['range'][0]}..{meta['range'][1]}"
    if "choices" in meta:
        return ", ".join(meta["choices"])
    return meta["type"].__name__


def _check_value(where: str, key: str, value: Any, meta: dict) -> Any:
    typ = meta["type"]
    ok_type = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok_type:
        raise ProfileError(f"{where}: key '{key}' = {value!r} has the wrong type; allowed: {typ.__name__}"
                           + (f" in {meta['range'][0]}..{meta['range'][1]}" if "range" in meta else ""))
    if "range" in meta:
        lo, hi = meta["range"]
        if not lo <= value <= hi:
            raise ProfileError(f"{where}: key '{key}' = {value!r} is out of range; allowed: integer {lo}..{hi}")
    if "choices" in meta and value not in meta["choices"]:
        hint = difflib.get_close_matches(value, meta["choices"], n=1)
        dym = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ProfileError(f"{where}: key '{key}' = {value!r} is not allowed{dym}; allowed: "
                           + ", ".join(meta["choices"]))
    return value


def _unknown_key(where: str, key: str, allowed: list[str], prefix: str = "") -> ProfileError:
    hint = difflib.get_close_matches(key, allowed, n=1)
    dym = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
    return ProfileError(f"{where}: unknown key '{prefix}{key}'{dym}; allowed: "
                        + ", ".join(prefix + a for a in allowed))


def _section(where: str, name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: key '{name}' = {data!r} has the wrong type; allowed: a table [{name}]")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(where, key, list(fields), prefix=f"{name}.")
    kwargs = {}
    for fname, f in fields.items():
        if fname in data:
            kwargs[fname] = _check_value(where, f"{name}.{fname}", data[fname], f.metadata)
        elif f.default is dataclasses.MISSING:
            raise ProfileError(f"{where}: missing key '{name}.{fname}'; allowed: {_allowed(f.metadata)}")
    return cls(**kwargs)


def profile_from_dict(data: dict, *, where: str = "<dict>", text: str = "") -> HardwareProfile:
    """Build and validate a profile from a parsed TOML mapping (inverse of :func:`profile_to_dict`)."""
    top_keys = ["name", "description", *_SECTIONS]
    for key in data:
        if key not in top_keys:
            raise _unknown_key(where, key, top_keys)
    for key in ("name", "description"):
        if key not in data:
            raise ProfileError(f"{where}: missing key '{key}'; allowed: a non-empty string")
        if not isinstance(data[key], str) or not data[key]:
            raise ProfileError(f"{where}: key '{key}' = {data[key]!r} has the wrong type or is empty; "
                               "allowed: a non-empty string")
    sections = {}
    for name, cls in _SECTIONS.items():
        if name not in data:
            if name in _OPTIONAL_SECTIONS:
                continue
            raise ProfileError(f"{where}: missing section [{name}]; required sections: "
                               + ", ".join(s for s in _SECTIONS if s not in _OPTIONAL_SECTIONS))
        sections[name] = _section(where, name, cls, data[name])
    w = sections["weights"]
    if w.exponent_min > w.exponent_max:
        raise ProfileError(f"{where}: key 'weights.exponent_min' = {w.exponent_min} exceeds "
                           f"'weights.exponent_max' = {w.exponent_max}; allowed: exponent_min <= exponent_max")
    if (w.bits == 0) != (w.scaling == "none"):
        raise ProfileError(f"{where}: key 'weights.scaling' = {w.scaling!r} does not fit weights.bits = {w.bits};"
                           " allowed: scaling = 'none' exactly when bits = 0 (float weights)")
    if w.bits == 1:  # two's complement {-1, 0} or sign-magnitude {0}: no positive weight either way
        raise ProfileError(f"{where}: key 'weights.bits' = 1 leaves no magnitude bit; allowed: 0 (float) or 2..32")
    d = sections["decay"]
    if (d.kind == "float") != (d.bits == 0):
        raise ProfileError(f"{where}: key 'decay.bits' = {d.bits} does not fit decay.kind = {d.kind!r}; "
                           "allowed: bits = 0 exactly when kind = 'float'")
    nrn = sections.get("neuron")
    if nrn is not None:
        if nrn.schedule == "dense-delay" and (d.kind != "linear" or d.bits != 12 or sections["threshold"].shift != 6
                                              or nrn.synapse != "none" or nrn.max_spikes != 1):
            raise ProfileError(f"{where}: key 'neuron.schedule' = 'dense-delay' (Lava's LIF) needs decay.kind = "
                               "'linear', decay.bits = 12, threshold.shift = 6, neuron.synapse = 'none' and "
                               "neuron.max_spikes = 1; allowed otherwise: 'same-step'")
        if nrn.readout == "chip-lif" and d.kind == "float":
            raise ProfileError(f"{where}: key 'neuron.readout' = 'chip-lif' needs an integer decay (decay.kind "
                               "'shift' or 'linear'), got 'float'; allowed: 'host'")
        if nrn.synapse == "current" and d.kind != "shift":
            raise ProfileError(f"{where}: key 'neuron.synapse' = 'current' needs decay.kind = 'shift' (the emulator "
                               f"decays the current by a bit shift), got {d.kind!r}; allowed: 'none'")
    return HardwareProfile(name=data["name"], description=data["description"], source=where, text=text,
                           **sections)


def profile_to_dict(profile: HardwareProfile) -> dict:
    """The TOML mapping of a profile (sections as dicts; ``learning`` omitted when absent)."""
    out: dict[str, Any] = {"name": profile.name, "description": profile.description}
    for name in _SECTIONS:
        spec = getattr(profile, name)
        if spec is not None:
            out[name] = dataclasses.asdict(spec)
    return out
