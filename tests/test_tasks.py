"""Tests for neuroinit.tasks: Romo layout and statistics, losses, exact per-step output errors, neurogym adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroinit.tasks import (
    Batch,
    NeurogymTask,
    RomoTask,
    Task,
    available_tasks,
    make_task,
    masked_cross_entropy,
    masked_mse,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Romo helpers: read the per-trial structure back out of a batch
# ----------------------------------------------------------------------------------------------------------------
FIX, STIM, DELAY, DEC = 6, 2, 10, 20  # steps at dt = 0.5 tau


def romo_structure(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a1, a2, gap_steps) per trial from the inputs of a dt = 0.5 tau batch."""
    u = batch.inputs[..., 0].numpy()
    a1 = u[FIX]
    f2_start = np.array([FIX + STIM + np.flatnonzero(u[FIX + STIM :, b])[0] for b in range(u.shape[1])])
    a2 = u[f2_start, np.arange(u.shape[1])]
    return a1, a2, f2_start - (FIX + STIM)


@pytest.fixture(scope="module")
def romo_big() -> Batch:
    return RomoTask().batch(4000, generator=gen(1), dtype=F64)


def test_romo_shapes_and_dtypes():
    task = RomoTask()
    b = task.batch(8, generator=gen(0))
    assert (task.n_in, task.n_out, task.loss_kind, task.n_steps) == (1, 2, "mse", 56)
    assert task.dt_ms == 50.0
    assert b.inputs.shape == (56, 8, 1) and b.targets.shape == (56, 8, 2) and b.mask.shape == (56, 8)
    assert b.inputs.dtype == b.targets.dtype == b.mask.dtype == torch.float32
    b64 = task.batch(8, generator=gen(0), dtype=F64)
    assert b64.inputs.dtype == b64.targets.dtype == b64.mask.dtype == F64
    # Same draws whatever the dtype (drawn in float64, then cast).
    assert torch.equal(b64.inputs.to(torch.float32), b.inputs)
    assert torch.equal(b64.mask.to(torch.float32), b.mask)


@pytest.mark.parametrize(("dt_tau", "n_steps"), [(1.0, 28), (0.5, 56), (0.25, 112), (0.1, 280)])
def test_romo_other_dt(dt_tau, n_steps):
    task = RomoTask(dt_tau=dt_tau)
    assert task.n_steps == n_steps
    b = task.batch(16, generator=gen(2), dtype=F64)
    assert b.inputs.shape == (n_steps, 16, 1)
    assert torch.equal((b.inputs[..., 0] != 0).sum(0), torch.full((16,), 2 * round(1 / dt_tau)))
    assert torch.equal((b.targets != 0).sum((0, 2)), torch.full((16,), round(10 / dt_tau)))


def test_romo_step_rounding_halves_up():
    task = RomoTask(dt_tau=0.4)  # 1 / 0.4 = 2.5 -> 3, 3 / 0.4 = 7.5 -> 8, 5 / 0.4 = 12.5 -> 13
    assert (task.stimulus_steps, task.fixation_steps, task.delay_steps) == (3, 8, 13)
    assert task.n_steps == 8 + 3 + 20 + 3 + 13 + 25


def test_make_task_romo_dt_ms():
    task = make_task("romo", dt_ms=25.0)
    assert isinstance(task, RomoTask) and task.dt_tau == 0.25 and task.n_steps == 112 and task.dt_ms == 25.0
    task = make_task("Romo", dt_ms=10.0, tau_ms=20.0, variant="test")
    assert task.dt_tau == 0.5 and task.variant == "test"
    with pytest.raises(ValueError, match="not both"):
        make_task("romo", dt_ms=25.0, dt_tau=0.5)
    with pytest.raises(ValueError, match="Invalid settings"):
        make_task("romo", gap=3)


@pytest.mark.parametrize("kwargs", [{"dt_tau": 0.0}, {"dt_tau": 1.5}, {"tau_ms": -1.0}, {"variant": "eval"}])
def test_romo_invalid_settings(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        RomoTask(**kwargs)


def test_romo_amplitudes(romo_big):
    a1, a2, _ = romo_structure(romo_big)
    for a in (a1, a2):
        assert a.min() >= 0.5 and a.max() < 1.5
        assert a.min() < 0.52 and a.max() > 1.48  # the whole range is used
    assert np.abs(a1 - a2).min() >= 0.2
    assert abs(np.mean(a2 > a1) - 0.5) < 0.05
    # each stimulus is a constant pulse of the right length, and nothing else is on
    u = romo_big.inputs[..., 0].numpy()
    assert np.array_equal(u[FIX : FIX + STIM], np.broadcast_to(a1, (STIM, a1.size)))
    assert np.count_nonzero(u) == 2 * STIM * u.shape[1]


def test_romo_gap_statistics(romo_big):
    _, _, gap = romo_structure(romo_big)
    assert gap.min() == 4 and gap.max() == 16
    counts = np.bincount(gap, minlength=17)[4:]
    n, k = gap.size, 13
    expected = n / k
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))  # uniform over the 13 step values
    assert abs(gap.mean() - 10.0) < 5 * math.sqrt((k * k - 1) / 12 / n)


def test_romo_targets_and_mask_layout(romo_big):
    a1, a2, gap = romo_structure(romo_big)
    tgt = romo_big.targets.numpy()
    mask = romo_big.mask.numpy()
    for b in range(tgt.shape[1]):
        f2_end = FIX + STIM + gap[b] + STIM
        dec = slice(f2_end + DELAY, f2_end + DELAY + DEC)
        right = int(a2[b] > a1[b])
        expected = np.zeros((56, 2))
        expected[dec, right] = 0.5
        assert np.array_equal(tgt[:, b], expected)
        expected_mask = np.zeros(56)
        expected_mask[:f2_end] = 1.0
        expected_mask[dec] = 1.0
        assert np.array_equal(mask[:, b], expected_mask)


def test_romo_reproducible():
    task = RomoTask()
    b1, b2 = task.batch(32, generator=gen(7)), task.batch(32, generator=gen(7))
    b3 = task.batch(32, generator=gen(8))
    assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
    assert not torch.equal(b1.inputs, b3.inputs)


def test_romo_test_variant_deterministic():
    task = RomoTask(variant="test")
    n = len(RomoTask.TEST_PAIRS)
    assert n == 30
    b1 = task.batch(2 * n, generator=gen(0), dtype=F64)
    b2 = task.batch(2 * n, generator=gen(123), dtype=F64)
    assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
    a1, a2, gap = romo_structure(b1)
    assert np.all(gap == 10)  # 5 tau
    pairs = np.array(RomoTask.TEST_PAIRS * 2)
    assert np.array_equal(a1, pairs[:, 0]) and np.array_equal(a2, pairs[:, 1])
    assert np.abs(a1 - a2).min() >= 0.2 - 1e-12
    assert np.mean(a2 > a1) == 0.5
    assert b1.inputs.shape[0] == 56 and b1.mask[50:].sum() == 0  # trial ends at step 50, tail unmasked


def test_romo_accuracy():
    task = RomoTask()
    b = task.batch(64, generator=gen(3), dtype=F64)
    assert task.accuracy(b.targets, b) == 1.0
    assert task.accuracy(b.targets.flip(-1), b) == 0.0
    # Only the decision-window average matters: a large wrong output outside it changes nothing.
    y = b.targets.clone()
    y[:20] = torch.tensor([5.0, -5.0], dtype=F64)
    assert task.accuracy(y, b) == 1.0
    # Half the trials made wrong.
    y = b.targets.clone()
    y[:, :32] = y[:, :32].flip(-1)
    assert task.accuracy(y, b) == 0.5


# ----------------------------------------------------------------------------------------------------------------
# Losses and exact per-step output errors
# ----------------------------------------------------------------------------------------------------------------
def test_masked_mse_hand_computed():
    y = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, -1.0], [2.0, 2.0]]], dtype=F64)  # (T=2, B=2, 2)
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]], dtype=F64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    # counted: (t0,b0): 1 + 4 = 5; (t1,b0): 4 + 4 = 8; (t1,b1): 4 + 4 = 8  -> 0.5 * 21 / 3
    assert masked_mse(y, target, mask).item() == 0.5 * 21.0 / 3.0
    assert masked_mse(y, target, torch.zeros_like(mask)).item() == 0.0


def test_masked_cross_entropy_hand_computed():
    logits = torch.tensor(
        [[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], [[-1.0, 3.0, 2.0], [4.0, 1.0, 1.0]]], dtype=F64
    )
    labels = torch.tensor([[2, 0], [1, 0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64)

    def ce(z, k):
        return math.log(sum(math.exp(v) for v in z)) - z[k]

    expected = (ce([1.0, 2.0, 0.5], 2) + ce([0.0, 0.0, 0.0], 0) + ce([4.0, 1.0, 1.0], 0)) / 3.0
    assert abs(masked_cross_entropy(logits, labels, mask).item() - expected) < 1e-14


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="Invalid output shape"):
        masked_mse(torch.zeros(3, 2, 2), torch.zeros(3, 2, 1), torch.ones(3, 2))
    with pytest.raises(ValueError, match="Invalid mask shape"):
        masked_mse(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), torch.ones(2, 3))


def assert_output_error_exact(task: Task, batch: Batch, y: torch.Tensor) -> None:
    y = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(task.loss(y, batch), y)
    stepwise = torch.stack([task.output_error(y[t].detach(), batch, t) for t in range(y.shape[0])])
    assert stepwise.shape == grad.shape
    assert (stepwise - grad).abs().max().item() < 1e-12
    assert grad.abs().max().item() > 0


def test_output_error_matches_autograd_romo():
    task = RomoTask()
    b = task.batch(16, generator=gen(4), dtype=F64)
    y = torch.randn(56, 16, 2, generator=gen(5), dtype=F64)
    assert_output_error_exact(task, b, y)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    t=st.integers(1, 6),
    b=st.integers(1, 5),
    c=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["mse", "ce"]),
)
def test_output_error_matches_autograd_property(t, b, c, seed, kind):
    g = gen(seed)

    class _Probe(Task):  # a minimal concrete task to exercise the shared loss code
        name, n_in, n_out, loss_kind, dt_ms = "probe", 1, c, kind, 1.0

        def batch(self, batch_size, *, generator, dtype=torch.float32, device="cpu"):
            raise NotImplementedError

        def accuracy(self, y, batch):
            raise NotImplementedError

    mask = (torch.rand(t, b, generator=g, dtype=F64) < 0.6).to(F64)
    if kind == "mse":
        targets = torch.randn(t, b, c, generator=g, dtype=F64)
    else:
        targets = torch.randint(0, c, (t, b), generator=g)
    y = 3 * torch.randn(t, b, c, generator=g, dtype=F64)
    batch = Batch(torch.zeros(t, b, 1, dtype=F64), targets, mask)
    task = _Probe()
    yg = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(task.loss(yg, batch), yg)
    stepwise = torch.stack([task.output_error(y[i], batch, i) for i in range(t)])
    assert (stepwise - grad).abs().max().item() < 1e-12


def test_task_is_abstract():
    with pytest.raises(TypeError):
        Task()  # type: ignore[abstract]


# ----------------------------------------------------------------------------------------------------------------
# neurogym adapter
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pdm() -> NeurogymTask:
    return make_task("PerceptualDecisionMaking-v0")


@pytest.fixture(scope="module")
def dms() -> NeurogymTask:
    return make_task("dms")


def one_hot_logits(task: Task, batch: Batch) -> torch.Tensor:
    return torch.nn.functional.one_hot(batch.targets, task.n_out).to(F64)


def test_pdm_shapes_labels_accuracy(pdm):
    assert isinstance(pdm, NeurogymTask) and pdm.name == "PerceptualDecisionMaking-v0"
    assert (pdm.n_in, pdm.n_out, pdm.loss_kind, pdm.dt_ms) == (3, 3, "ce", 100)
    b = pdm.batch(32, generator=gen(0), dtype=F64)
    # default timing: fixation 100, stimulus 2000, delay 0, decision 100 ms -> 22 steps, all real
    assert b.inputs.shape == (22, 32, 3) and b.targets.shape == (22, 32) and b.mask.shape == (22, 32)
    assert b.targets.dtype == torch.int64 and b.inputs.dtype == F64 and b.mask.dtype == F64
    assert torch.all(b.mask == 1)
    assert torch.all(b.targets[:21] == 0)
    assert set(b.targets[21].tolist()) == {1, 2}
    assert pdm.accuracy(one_hot_logits(pdm, b), b) == 1.0
    wrong = one_hot_logits(pdm, b)[..., [0, 2, 1]]
    assert pdm.accuracy(wrong, b) == 0.0


def test_dms_shapes_labels_accuracy(dms):
    assert dms.name == "DelayMatchSample-v0" and (dms.n_in, dms.n_out) == (3, 3)
    b = dms.batch(32, generator=gen(0), dtype=F64)
    # fixation 300, sample 500, delay 1000, test 500, decision 900 ms -> 32 steps; decision = last 9
    assert b.inputs.shape == (32, 32, 3) and b.targets.shape == (32, 32)
    assert torch.all(b.targets[:23] == 0)
    dec = b.targets[23:]
    assert torch.all((dec == dec[0]) & (dec >= 1))
    assert set(dec[0].tolist()) == {1, 2}  # match / non-match
    assert dms.accuracy(one_hot_logits(dms, b), b) == 1.0


def test_pdm_fixation_cue(pdm):
    """neurogym >= 2.1: PDM's fixation cue (channel 0) is on during fixation only, off from stimulus onwards."""
    b = pdm.batch(16, generator=gen(1), dtype=F64)
    assert torch.all(b.inputs[0, :, 0] == 1.0)
    assert torch.all(b.inputs[1:, :, 0] == 0.0)
    fine = NeurogymTask("PerceptualDecisionMaking-v0", dt_ms=20)
    bf = fine.batch(8, generator=gen(1), dtype=F64)
    assert bf.inputs.shape[0] == 110  # 2200 ms / 20 ms
    assert torch.all(bf.inputs[:5, :, 0] == 1.0) and torch.all(bf.inputs[5:, :, 0] == 0.0)
    assert torch.all(bf.targets[:105] == 0) and torch.all(bf.targets[105:] >= 1)


def test_neurogym_reproducible(pdm, dms):
    for task in (pdm, dms):
        b1 = task.batch(16, generator=gen(11), dtype=F64)
        _ = task.batch(16, generator=gen(99), dtype=F64)  # an interleaved call changes nothing
        b2 = task.batch(16, generator=gen(11), dtype=F64)
        b3 = task.batch(16, generator=gen(12), dtype=F64)
        assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
        assert not torch.equal(b1.inputs, b3.inputs)
    # consecutive draws from one generator differ
    g = gen(5)
    assert not torch.equal(pdm.batch(8, generator=g).inputs, pdm.batch(8, generator=g).inputs)


def test_neurogym_float32_equals_float64_cast(pdm):
    b32, b64 = pdm.batch(8, generator=gen(2)), pdm.batch(8, generator=gen(2), dtype=F64)
    assert b32.inputs.dtype == torch.float32 and torch.equal(b64.inputs.to(torch.float32), b32.inputs)
    assert torch.equal(b32.targets, b64.targets)


def test_output_error_matches_autograd_neurogym(dms):
    b = dms.batch(8, generator=gen(6), dtype=F64)
    y = 2 * torch.randn(*b.targets.shape, dms.n_out, generator=gen(7), dtype=F64)
    assert_output_error_exact(dms, b, y)


def test_neurogym_seq_len_packs_whole_trials(pdm):
    task = NeurogymTask("PerceptualDecisionMaking-v0", seq_len=50)
    b = task.batch(6, generator=gen(3), dtype=F64)
    assert b.inputs.shape == (50, 6, 3)
    # two whole 22-step trials fit, then 6 padded steps with zero input, label 0 and mask 0
    for start in (0, 22):
        assert torch.all(b.inputs[start, :, 0] == 1.0)
        assert torch.all(b.targets[start + 21] >= 1)
    assert torch.all(b.mask[:44] == 1) and torch.all(b.mask[44:] == 0)
    assert torch.all(b.inputs[44:] == 0) and torch.all(b.targets[44:] == 0)
    assert task.accuracy(one_hot_logits(task, b), b) == 1.0
    y = 2 * torch.randn(50, 6, 3, generator=gen(8), dtype=F64)
    assert_output_error_exact(task, b, y)
    with pytest.raises(ValueError, match="Invalid seq_len 10"):
        NeurogymTask("PerceptualDecisionMaking-v0", seq_len=10).batch(2, generator=gen(0))


def test_neurogym_variable_length_trials_are_padded():
    # stimulus duration drawn per trial: sequences start at trial starts and are padded to the longest
    task = NeurogymTask("PerceptualDecisionMaking-v0", timing={"stimulus": [500, 1000, 1500]})
    b = task.batch(32, generator=gen(4), dtype=F64)
    lengths = b.mask.sum(0)
    assert set(lengths.tolist()) <= {7.0, 12.0, 17.0} and len(set(lengths.tolist())) > 1
    assert b.inputs.shape[0] == int(lengths.max())
    assert torch.all(b.inputs[0, :, 0] == 1.0)
    for col, n in enumerate(lengths.long().tolist()):
        assert torch.all(b.mask[:n, col] == 1) and torch.all(b.mask[n:, col] == 0)
        assert b.targets[n - 1, col] >= 1 and torch.all(b.targets[n:, col] == 0)
    assert task.accuracy(one_hot_logits(task, b), b) == 1.0


def test_neurogym_decision_mask(dms):
    task = NeurogymTask("DelayMatchSample-v0", mask="decision")
    b = task.batch(8, generator=gen(0), dtype=F64)
    assert torch.all(b.mask[:23] == 0) and torch.all(b.mask[23:] == 1)
    ref = dms.batch(8, generator=gen(0), dtype=F64)
    assert torch.equal(b.inputs, ref.inputs) and torch.equal(b.targets, ref.targets)
    assert task.accuracy(one_hot_logits(task, b), b) == 1.0
    with pytest.raises(ValueError, match="no 'decision' period"):
        NeurogymTask("DelayMatchCategory-v0", mask="decision")


def test_aliases_and_listing():
    assert make_task("2af").name == "PerceptualDecisionMaking-v0"
    names = available_tasks()
    assert names[:3] == ["romo", "2af", "dms"]
    assert "PerceptualDecisionMaking-v0" in names and "DelayMatchSample-v0" in names


def test_unknown_task_error():
    with pytest.raises(ValueError, match=r"Unknown task 'nonexistent-v0'.*all_envs\(\)") as info:
        make_task("nonexistent-v0")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'PerceptualDecisionMaking-v0'"):
        make_task("PerceptualDecisionMakng-v0")


@pytest.mark.parametrize(
    ("env_id", "kwargs", "match"),
    [
        ("ReachingDelayResponse-v0", {}, "not discrete"),
        ("Bandit-v0", {}, "no supervised ground truth"),
        ("PerceptualDecisionMaking-v0", {"dt": 20}, "dt_ms"),
        ("PerceptualDecisionMaking-v0", {"bogus": 1}, "Invalid settings"),
        ("PerceptualDecisionMaking-v0", {"mask": "fixation"}, "Invalid mask"),
        ("PerceptualDecisionMaking-v0", {"seq_len": 0}, "Invalid seq_len"),
    ],
)
def test_neurogym_invalid(env_id, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeurogymTask(env_id, **kwargs)


def test_invalid_batch_size(pdm):
    for task in (RomoTask(), pdm):
        with pytest.raises(ValueError, match="Invalid batch_size"):
            task.batch(0, generator=gen(0))
