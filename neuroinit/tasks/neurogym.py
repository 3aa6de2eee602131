"""Adapter from neurogym trial environments to seeded, time-major :class:`~neuroinit.tasks.base.Batch` es.

Tested with **neurogym 2.3.1** (gymnasium 1.x). In neurogym >= 2.1 the PerceptualDecisionMaking fixation cue
(observation channel 0) is on during the fixation period only; the tests check it.

How batches are built (why not ``neurogym.Dataset``: it has no seed and cuts windows at arbitrary points):

* One environment is built at construction and kept as a pristine template. Each call to :meth:`batch` draws
  one 32-bit seed from the torch generator, deep-copies the template and seeds the copy (``env.seed(seed)``:
  the env's ``RandomState``, its action space and its timing samplers), then generates whole trials with
  ``env.new_trial()`` and reads ``env.ob`` / ``env.gt``. Same generator state -> same batch, bit for bit,
  independent of earlier calls (no state carries over between batches).
* ``seq_len=None`` (default): each sequence is one trial, starting at the trial start; shorter trials are padded
  to the longest trial of the batch. ``seq_len=N``: each sequence is filled with whole consecutive trials while
  the next one still fits in ``N`` steps (a trial that does not fit starts the next sequence), then padded to
  ``N``. A single trial longer than ``N`` is an error.
* Padding: inputs 0, label 0, mask 0.
* Targets: ``env.gt`` class labels (0 = fixate), int64 ``(T, B)``; loss: masked cross-entropy over the
  ``action_space.n`` outputs (logits).
* ``mask="all"`` (default): every real (non-padded) step counts, fixation included (the network must learn to
  fixate). ``mask="decision"``: only the steps of each trial's ``"decision"`` period count (the env must have
  one).

Accuracy (ours): a trial's decision is a maximal run of consecutive counted steps (mask 1) with the same
non-fixation label (label != 0); it is correct when the argmax over outputs of the output summed over that run
equals the label. This reads the trial structure from the batch alone and matches neurogym tasks whose ground
truth is 0 outside the decision period (PerceptualDecisionMaking, DelayMatchSample and most supervised tasks);
for tasks that label other periods too, each labelled run counts as one decision.

Only discrete-action trial environments that define ``env.gt`` are supported (clear ``ValueError`` otherwise).
``import neurogym`` is slow (seconds), so it happens on first use, not when :mod:`neuroinit.tasks` is imported.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from typing import Any, Final, final

import numpy as np
import torch

from neuroinit.tasks.base import Batch, Task, _check_batch_size

__all__ = ["MASK_MODES", "TASK_ALIASES", "NeurogymTask", "neurogym_ids", "unknown_task_error"]

TESTED_NEUROGYM_VERSION: Final = "2.3.1"
TASK_ALIASES: Final[dict[str, str]] = {"2af": "PerceptualDecisionMaking-v0", "dms": "DelayMatchSample-v0"}
MASK_MODES: Final = ("all", "decision")
LIST_HINT: Final = (
    "list valid ids with `neuroinit.tasks.available_tasks()` or `neurogym.envs.registration.all_envs()`"
)
# gymnasium's registry warns (UserWarning via its logger) that neurogym envs declare no render_modes.
_RENDER_MODES_WARNING: Final = r".*environment creator metadata doesn't include .render_modes"


def _neurogym():
    import neurogym  # deferred on purpose: importing neurogym takes seconds

    return neurogym


def neurogym_ids() -> list[str]:
    """All environment ids neurogym registers (native and collections), sorted."""
    from neurogym.envs.registration import all_envs

    return all_envs(collections=True)


def unknown_task_error(name: str) -> ValueError:
    """The one-line error for an unknown task name, with a did-you-mean when one is close."""
    candidates = ["romo", *TASK_ALIASES, *neurogym_ids()]
    # Compare without the shared "-vN" suffix, case-insensitively, so the suffix alone never makes a match.
    by_key = {re.sub(r"-v\d+$", "", c.lower()): c for c in candidates}
    key = re.sub(r"-v\d+$", "", str(name).lower())
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.75)
    hint = f"; did you mean {by_key[close[0]]!r}?" if close else ""
    return ValueError(
        f"Unknown task {name!r}: not 'romo', an alias {tuple(TASK_ALIASES)} or a registered neurogym id "
        f"({LIST_HINT}){hint}"
    )


def _resolve_env_id(env_id: str) -> str:
    if not isinstance(env_id, str):
        raise TypeError(f"Invalid task id {env_id!r}: must be a string")
    env_id = TASK_ALIASES.get(env_id.lower(), env_id)
    _neurogym()  # registers the neurogym ids with gymnasium
    import gymnasium

    if env_id not in gymnasium.envs.registry:
        raise unknown_task_error(env_id)
    return env_id


@final
class NeurogymTask(Task):
    """A neurogym trial environment as a :class:`Task` (cross-entropy over class labels, 0 = fixate).

    Args:
        env_id: neurogym id (``"PerceptualDecisionMaking-v0"``, ``"DelayMatchSample-v0"``, ...) or an alias
            (``"2af"``, ``"dms"``).
        dt_ms: the model's time step in ms, passed to the env as ``dt`` (default 100; neurogym floors every
            period duration to a multiple of it).
        seq_len: ``None`` (one trial per sequence, padded to the batch's longest) or a fixed length filled with
            whole trials; see the module docstring.
        mask: ``"all"`` (every real step counts) or ``"decision"`` (only the decision period counts).
        **env_kwargs: passed to the env constructor (``timing``, ``sigma``, ``cohs``, ...; not ``dt``).
    """

    def __init__(
        self,
        env_id: str,
        dt_ms: float = 100,
        seq_len: int | None = None,
        *,
        mask: str = "all",
        **env_kwargs: Any,
    ) -> None:
        if isinstance(dt_ms, bool) or not isinstance(dt_ms, int | float) or not 0 < dt_ms < float("inf"):
            raise ValueError(f"Invalid dt_ms {dt_ms!r}: must be a finite number > 0")
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"Invalid seq_len {seq_len!r}: must be None or a positive int")
        if mask not in MASK_MODES:
            raise ValueError(f"Invalid mask {mask!r}: allowed {MASK_MODES}")
        if "dt" in env_kwargs:
            raise ValueError("Invalid keyword 'dt': give the step as dt_ms")
        self.env_id = _resolve_env_id(env_id)
        self.name = self.env_id
        self.dt_ms = float(dt_ms)
        self.seq_len = seq_len
        self.mask_mode = mask
        self.env_kwargs = dict(env_kwargs)
        self.loss_kind = "ce"

        ngym = _neurogym()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_RENDER_MODES_WARNING, category=UserWarning)
            try:
                env = ngym.make(self.env_id, dt=dt_ms, **env_kwargs)
            except TypeError as err:
                raise ValueError(f"Invalid settings for {self.env_id}: {err}") from err
        self._template = env
        unwrapped = env.unwrapped
        if not isinstance(unwrapped, ngym.core.TrialEnv):
            raise ValueError(  # noqa: TRY004  (a wrong id, not a wrong argument type)
                f"Invalid task {self.env_id!r}: not a neurogym trial environment (TrialEnv)"
            )
        n_actions = getattr(env.action_space, "n", None)
        if n_actions is None:
            raise ValueError(
                f"Invalid task {self.env_id!r}: action space {env.action_space} is not discrete; "
                "NeurogymTask trains class labels with cross-entropy"
            )
        obs_shape = env.observation_space.shape
        if obs_shape is None or len(obs_shape) != 1:
            raise ValueError(f"Invalid task {self.env_id!r}: observation shape {obs_shape} is not 1-D")
        self.n_in = int(obs_shape[0])
        self.n_out = int(n_actions)

        # Probe one trial on a throwaway copy: the env must produce ob and gt (some neurogym envs are RL-only).
        probe = copy.deepcopy(env).unwrapped
        probe.seed(0)
        probe._top.new_trial()
        if not hasattr(probe, "ob") or not hasattr(probe, "gt"):
            raise ValueError(f"Invalid task {self.env_id!r}: it defines no supervised ground truth (env.gt)")
        if mask == "decision" and "decision" not in probe.start_ind:
            periods = tuple(probe.start_ind)
            raise ValueError(
                f"Invalid mask 'decision' for {self.env_id!r}: it has no 'decision' period {periods}"
            )

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.env_kwargs.items())
        return (
            f"NeurogymTask({self.env_id!r}, dt_ms={self.dt_ms}, seq_len={self.seq_len}, "
            f"mask={self.mask_mode!r}{extra})"
        )

    def _trial(self, env) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One new trial: ``(ob (T, n_in), gt (T,), mask (T,))`` as fresh numpy arrays."""
        env._top.new_trial()  # through any trial wrappers
        ob = np.asarray(env.ob)
        gt = np.asarray(env.gt)
        if ob.ndim != 2 or gt.shape != ob.shape[:1]:
            raise ValueError(
                f"Invalid trial from {self.env_id!r}: ob {ob.shape} and gt {gt.shape} do not line up"
            )
        if self.mask_mode == "all":
            mask = np.ones(ob.shape[0], dtype=np.float64)
        else:
            mask = np.zeros(ob.shape[0], dtype=np.float64)
            mask[env.start_ind["decision"] : env.end_ind["decision"]] = 1.0
        return ob, gt.astype(np.int64), mask

    def batch(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """``batch_size`` sequences starting at trial starts; see the module docstring."""
        _check_batch_size(batch_size)
        seed = int(torch.randint(0, 2**32 - 1, (1,), generator=generator, device=generator.device).item())
        env = copy.deepcopy(self._template).unwrapped
        env.seed(seed)

        sequences: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        if self.seq_len is None:
            sequences = [[self._trial(env)] for _ in range(batch_size)]
            n_steps = max(trial[0].shape[0] for (trial,) in sequences)
        else:
            n_steps = self.seq_len
            carry = None
            for _ in range(batch_size):
                seq, used = [], 0
                while True:
                    trial = carry if carry is not None else self._trial(env)
                    carry = None
                    length = trial[0].shape[0]
                    if length > n_steps:
                        raise ValueError(
                            f"Invalid seq_len {n_steps}: a {self.env_id} trial has {length} steps at "
                            f"dt_ms={self.dt_ms}; use a longer seq_len or seq_len=None"
                        )
                    if used + length > n_steps:
                        carry = trial  # starts the next sequence
                        break
                    seq.append(trial)
                    used += length
                sequences.append(seq)

        inputs = np.zeros((n_steps, batch_size, self.n_in), dtype=np.float64)
        labels = np.zeros((n_steps, batch_size), dtype=np.int64)
        mask = np.zeros((n_steps, batch_size), dtype=np.float64)
        for b, seq in enumerate(sequences):
            start = 0
            for ob, gt, m in seq:
                stop = start + ob.shape[0]
                inputs[start:stop, b] = ob
                labels[start:stop, b] = gt
                mask[start:stop, b] = m
                start = stop
        return Batch(
            inputs=torch.from_numpy(inputs).to(device=device, dtype=dtype),
            targets=torch.from_numpy(labels).to(device=device),
            mask=torch.from_numpy(mask).to(device=device, dtype=dtype),
        )

    def accuracy(self, y: torch.Tensor, batch: Batch) -> float:
        """Fraction of decisions whose summed-output argmax equals the label (decisions: see module docstring).

        Returns ``nan`` when the batch holds no decision (no counted step with a non-fixation label).
        """
        if y.dim() != 3 or y.shape[:2] != batch.targets.shape or y.shape[-1] != self.n_out:
            raise ValueError(
                f"Invalid output shape {tuple(y.shape)}: expected {(*batch.targets.shape, self.n_out)}"
            )
        labels = batch.targets.detach().cpu().numpy()
        counted = (batch.mask.detach().cpu().numpy() != 0) & (labels != 0)
        y_np = y.detach().to("cpu", torch.float64).numpy()
        n_steps, batch_size = labels.shape
        n_correct = n_total = 0
        for b in range(batch_size):
            t = 0
            while t < n_steps:
                if not counted[t, b]:
                    t += 1
                    continue
                label = labels[t, b]
                stop = t + 1
                while stop < n_steps and counted[stop, b] and labels[stop, b] == label:
                    stop += 1
                n_total += 1
                n_correct += int(np.argmax(y_np[t:stop, b].sum(axis=0)) == label)
                t = stop
        return float(n_correct / n_total) if n_total else float("nan")
