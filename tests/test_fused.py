"""The fused online step (neuroinit.learning.fused) equals the plain PyTorch step, and falls back to it."""

from __future__ import annotations

import pytest
import torch
from _synthetic import random_trials

from neuroinit.cells import PARAM_NAMES, make_cell
from neuroinit.init import hardware_init
from neuroinit.learning import fused
from neuroinit.learning.chip import make_trace_quantiser
from neuroinit.learning.online import OnlineEprop
from neuroinit.tasks.base import Batch, Task

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"fused step unavailable: "
                                f"{fused.unavailable_reason()}")


def _setup(model: str, *, form: str = "voltage", kind: str = "mse", n: int = 20, b: int = 3, t_len: int = 25,
           dtype=torch.float32, profile: str = "ideal", seed: int = 0, drive: float = 3.0, **cell_kw):
    g = torch.Generator().manual_seed(seed)
    p, _ = hardware_init(model, 3, n, 2, 1.3, profile, generator=g, out_of_range="clamp", dtype=dtype)
    kw = {"form": form, "alpha": 0.3, **cell_kw} if model == "rate" else {"v_th": 0.5, **cell_kw}
    cell = make_cell(model, p, profile=profile, **kw)
    batch, task = random_trials(t_len, b, kind, g, dtype=dtype, drive=drive if model == "lif" else 1.0)
    return cell, batch, task


def _slices(threads: int) -> int:
    """Batch slices ni_run makes at ``threads``: one where the library was built without an OpenMP runtime
    (the loader's -fopenmp-simd fallback: its loops run on one thread)."""
    return threads if "-fopenmp" in fused.LIBRARY.flags else 1


def _grads(cell) -> dict[str, torch.Tensor]:
    out = {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}
    for n in PARAM_NAMES:
        getattr(cell, n).grad = None
    return out


def _assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    for n in PARAM_NAMES:
        scale = max(1.0, float(b[n].abs().max()))
        assert float((a[n] - b[n]).abs().max()) <= tol * scale, n


def _stepwise(rule: OnlineEprop, batch: Batch, task: Task):
    """Step by step through the batch; returns the outputs (T, B, O) and the final state."""
    st = rule.start(batch.inputs.shape[1])
    ys = []
    for t, u in enumerate(batch.inputs):
        y, st = rule.step(st, u, lambda y_t, t=t: task.output_error(y_t, batch, t))
        ys.append(y)
    rule.flush()
    return torch.stack(ys), st


CASES = [("rate", {"form": "voltage"}), ("rate", {"form": "rate"}), ("rate", {"form": "voltage", "activation":
         "softplus"}), ("rate", {"form": "rate", "activation": "relu"}), ("lif", {}), ("lif", {"reset": "zero"}),
         ("lif", {"n_refractory": 2}), ("rate", {"form": "voltage", "n": 40, "b": 16}),
         ("lif", {"n": 70, "b": 6}), ("lif", {"n": 116, "b": 5}),  # 116: panel groups of 4, 2, 1 and 4 columns
         ("lif", {"v_th": 0.7, "n_refractory": 1})]  # a threshold that is not a power of two: divided by


@pytest.mark.parametrize("model,kw", CASES)
@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_fused_step_equals_plain_step(model, kw, kind):
    form = kw.pop("form", "voltage")
    cell, batch, task = _setup(model, form=form, kind=kind, **kw)
    plain = OnlineEprop(cell, fast=False)
    y_plain, _ = _stepwise(plain, batch, task)
    g_plain = _grads(cell)
    fast = OnlineEprop(cell, fast=True)
    y_fast, _ = _stepwise(fast, batch, task)
    assert fast.uses_fast_path and not plain.uses_fast_path
    _assert_close(_grads(cell), g_plain)
    assert float((y_fast - y_plain).abs().max()) <= 1e-6
    # whole trials: one native call
    trial = fast.backward(batch, task)
    _assert_close(_grads(cell), g_plain)
    assert float((trial.outputs - y_plain).abs().max()) <= 1e-6


def test_fused_traces_equal_plain_traces_after_every_step():
    # membrane potentials of order 1: float32 rounding of v (summation order) stays at 1e-7 relative
    cell, batch, task = _setup("lif", n=10, b=2, t_len=8, drive=0.7, v_th=1.0)
    plain, fast = OnlineEprop(cell), OnlineEprop(cell, fast=True)
    sp, sf = plain.start(2), fast.start(2)
    for t, u in enumerate(batch.inputs):
        err = lambda y_t, t=t: task.output_error(y_t, batch, t)
        _, sp = plain.step(sp, u, err)
        _, sf = fast.step(sf, u, err)
        for a, b in [*zip(sf.traces, sp.traces), *zip(sf.cell, sp.cell)]:  # to 1e-6 relative (float32)
            assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))


def test_fused_random_feedback_and_learning_epochs_match():
    cell, batch, task = _setup("rate", form="rate", t_len=12)
    fb = torch.randn(2, 20, generator=torch.Generator().manual_seed(5))
    results = []
    for fast in (False, True):
        c = make_cell("rate", cell.float_params(), **cell.config())
        rule = OnlineEprop(c, feedback=fb, fast=fast)
        opt = torch.optim.SGD(c.parameters(), lr=0.5)
        trial = rule.backward(batch, task, optimizer=opt, apply_every=5)
        results.append((trial.outputs, [getattr(c, n).detach().clone() for n in PARAM_NAMES]))
    assert float((results[0][0] - results[1][0]).abs().max()) <= 1e-5
    for a, b in zip(results[0][1], results[1][1]):
        assert float((a - b).abs().max()) <= 1e-5


def test_float64_falls_back_to_pytorch_with_the_same_gradient():
    cell, batch, task = _setup("lif", dtype=torch.float64)
    rule = OnlineEprop(cell, fast=True)
    rule.backward(batch, task)
    assert not rule.uses_fast_path
    g_fast = _grads(cell)
    OnlineEprop(cell).backward(batch, task)
    _assert_close(g_fast, _grads(cell), tol=0.0)


def test_unavailable_library_falls_back_with_the_same_gradient(monkeypatch, reset_native):
    cell, batch, task = _setup("rate", form="rate")
    rule = OnlineEprop(cell, fast=True)
    rule.backward(batch, task)
    assert rule.uses_fast_path
    g_fast = _grads(cell)
    reset_native()
    monkeypatch.setenv("NEUROINIT_NO_FUSED", "1")
    assert not fused.available() and fused.unavailable_reason() == "disabled by NEUROINIT_NO_FUSED"
    rule = OnlineEprop(cell, fast=True)
    rule.backward(batch, task)
    assert not rule.uses_fast_path
    _assert_close(g_fast, _grads(cell))


def test_chip_precision_traces_stay_on_their_grids_and_auto_declines_them():
    cell, batch, task = _setup("lif", profile="loihi-like", seed=2)
    quantiser = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(0))
    auto = OnlineEprop(cell, trace_quantiser=quantiser, fast="auto")
    auto.start(3)
    assert not auto.uses_fast_path  # its random draws would differ from the PyTorch path's
    rule = OnlineEprop(cell, trace_quantiser=quantiser, generator=torch.Generator().manual_seed(1), fast=True)
    st = rule.start(3)
    assert rule.uses_fast_path
    for t, u in enumerate(batch.inputs):
        _, st = rule.step(st, u, lambda y_t, t=t: task.output_error(y_t, batch, t))
    for name, tr in zip(("pre_rec", "pre_in", "pre_bias", "elig_rec", "elig_in", "elig_bias", "readout",
                         "readout_bias"), st.traces):
        grid = quantiser.grids[name]
        codes = tr / grid.scale
        assert torch.equal(codes, codes.round()), name
        assert float(codes.min()) >= grid.code_min and float(codes.max()) <= grid.code_max, name
    assert float(st.traces.elig_rec.abs().max()) > 0


def test_chip_precision_rounding_is_unbiased():
    """Stochastic rounding in the fused loop: the mean over many draws approaches the float trace."""
    cell, batch, _task = _setup("rate", form="rate", profile="loihi-like", n=8, b=1, t_len=1)
    quantiser = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(0))
    float_rule = OnlineEprop(cell, fast=True)
    sf = float_rule.start(1)
    _, sf = float_rule.step(sf, batch.inputs[0], lambda y: torch.zeros_like(y))
    exact = sf.traces.elig_rec.clone()
    acc = torch.zeros_like(exact)
    reps = 400
    rule = OnlineEprop(cell, trace_quantiser=quantiser, generator=torch.Generator().manual_seed(3), fast=True)
    for _ in range(reps):
        st = rule.start(1)
        _, st = rule.step(st, batch.inputs[0], lambda y: torch.zeros_like(y))
        acc += st.traces.elig_rec
    step = quantiser.grids["elig_rec"].scale
    assert float((acc / reps - exact).abs().max()) <= 4 * step / reps ** 0.5


def test_invalid_fast_value():
    cell, _, _ = _setup("lif", n=4)
    with pytest.raises(ValueError, match="Invalid fast"):
        OnlineEprop(cell, fast="yes")


def test_supports_names_the_reason():
    cell, _, _ = _setup("lif", n=4, dtype=torch.float64)
    assert "float32" in fused.supports(cell)
    with pytest.raises(ValueError, match="Invalid fused step"):
        fused.FusedOnline(cell, cell.params(), 1, {n: torch.zeros_like(getattr(cell, n)) for n in PARAM_NAMES})


@pytest.mark.parametrize("model,form,kw", [("lif", "voltage", {}), ("rate", "rate", {}),
                                           ("rate", "voltage", {"activation": "softplus"}),
                                           ("rate", "voltage", {"n": 40, "b": 16})])
def test_chunked_update_across_chunk_boundaries_equals_plain_step(monkeypatch, model, form, kw):
    # chunks of 4 steps over 25 steps: the full traces are carried across six chunk boundaries. n = 40, b = 16:
    # the forward product's blocks of 6 and 4 rows, 16-column panels and the 8 remaining columns
    monkeypatch.setattr(fused, "chunk_steps", lambda n, i, full: 4)
    cell, batch, task = _setup(model, form=form, **kw)
    y_plain, st = _stepwise(OnlineEprop(cell, fast=False), batch, task)
    g_plain = _grads(cell)
    fast = OnlineEprop(cell, fast=True)
    trial = fast.backward(batch, task)
    assert fast.uses_fast_path
    _assert_close(_grads(cell), g_plain)
    assert float((trial.outputs - y_plain).abs().max()) <= 1e-6
    # the traces at the end of the run (full ones brought up to date on request) equal the stepwise ones, to
    # float32 rounding accumulated over 25 steps (decay powers ed^k taken at once, not step by step)
    for a, b in zip(fast.native_backend.traces(), st.traces):
        if b is not None:
            assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("model,form,kind", [("lif", "voltage", "mse"), ("lif", "voltage", "ce"),
                                             ("rate", "rate", "mse")])
def test_batch_split_over_threads_equals_plain_step(monkeypatch, model, form, kind):
    # the recorded run split over 3 threads (batch slices of 1, 2 and 2 elements; chunks of 4 steps; the chunk's
    # B N = 350 filtered elements in blocks of 256 and 94 over the threads): the same outputs, gradients and final
    # traces as the plain step
    monkeypatch.setattr(fused, "chunk_steps", lambda n, i, full: 4)
    monkeypatch.setattr(fused, "PAR_WORK", 1)
    cell, batch, task = _setup(model, form=form, kind=kind, n=70, b=5)
    y_plain, st = _stepwise(OnlineEprop(cell, fast=False), batch, task)
    g_plain = _grads(cell)
    fast = OnlineEprop(cell, fast=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        trial = fast.backward(batch, task)
    finally:
        torch.set_num_threads(saved)
    assert fast.native_backend.batch_slices == _slices(3)
    _assert_close(_grads(cell), g_plain)
    assert float((trial.outputs - y_plain).abs().max()) <= 1e-6
    for a, b in zip(fast.native_backend.traces(), st.traces):
        if b is not None:
            assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("r,m,n", [(1, 8, 32), (37, 19, 70), (300, 64, 96), (50, 3, 208), (20, 9, 90)])
def test_gemm_tn_adds_the_product_to_float32_rounding_for_any_thread_count(r, m, n):
    # ni_gemm_tn: C += A^T B (the chunk's weight gradient); shapes with and without whole 8 x 32 blocks (the rest by
    # the plain loop); every entry is summed by one thread in one order, so the thread count changes nothing
    lib = fused._load()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(r, m, generator=g), torch.randn(r, n, generator=g), torch.randn(m, n, generator=g))
    want = c.double() + a.double().T @ b.double()
    bound = (r + 1) * 2.0**-24 * (c.double().abs() + a.double().abs().T @ b.double().abs())  # gamma_(r+1)
    got = {}
    for threads in (1, 3):
        out = c.clone()
        lib.ni_gemm_tn(a.data_ptr(), b.data_ptr(), r, m, n, out.data_ptr(), threads)
        got[threads] = out
        assert bool(((out.double() - want).abs() <= bound).all())
    assert torch.equal(got[1], got[3])


def test_own_gemm_only_where_torchs_blas_would_not_run_avx512(monkeypatch):
    from neuroinit.learning import fused_bptt_native
    from neuroinit.learning.native import loader

    monkeypatch.setattr(loader, "cpu_fields", lambda: {"vendor_id": "GenuineIntel"})
    assert loader.blas_runs_avx512.__wrapped__() == torch.backends.mkl.is_available()
    monkeypatch.setattr(loader, "cpu_fields", lambda: {"vendor_id": "AuthenticAMD"})
    assert not loader.blas_runs_avx512.__wrapped__()
    monkeypatch.setattr(loader, "cpu_fields", lambda: None)  # vendor unknown: MKL keeps its GEMMs
    assert loader.blas_runs_avx512.__wrapped__() == torch.backends.mkl.is_available()
    wide = bool(fused._load().ni_wide())
    for blas_avx512 in (True, False):
        monkeypatch.setattr(loader, "blas_runs_avx512", lambda v=blas_avx512: v)
        assert fused.own_gemm() == (wide and not blas_avx512)
        if fused_bptt_native.available():
            want = ("avx512",) if fused_bptt_native._load().nb_wide() and not blas_avx512 else ("blas", "portable")
            assert fused_bptt_native.dense_products(64) in want
            assert fused_bptt_native.dense_products(37) in ("blas", "portable")  # the kernel needs 32 | N
        # the result is the product either way
        a, b, c = torch.randn(50, 40), torch.randn(50, 64), torch.zeros(40, 64)
        assert torch.allclose(fused.add_at_b(c, a, b), a.T @ b, atol=1e-4)


def test_reused_buffers_start_from_zero(monkeypatch):
    # a second trial on the same rule reuses the fused buffers: same gradient as a fresh rule
    monkeypatch.setattr(fused, "chunk_steps", lambda n, i, full: 7)
    cell, batch, task = _setup("lif")
    rule = OnlineEprop(cell, fast=True)
    rule.backward(batch, task)
    first = _grads(cell)
    buffers = rule.native_backend
    rule.backward(batch, task)
    assert rule.native_backend is buffers
    _assert_close(_grads(cell), first, tol=0.0)


def test_reused_buffers_see_weights_changed_in_place():
    # buffers are reused across runs; weights written in place between runs (even through .data, which leaves
    # the version counter alone) must reach the forward product
    cell, batch, task = _setup("rate", form="voltage", n=40, b=6)
    fast, plain = OnlineEprop(cell, fast=True), OnlineEprop(cell, fast=False)
    fast.backward(batch, task)
    _grads(cell)
    with torch.no_grad():
        cell.w_rec.data.mul_(0.5)
        cell.w_in.data.add_(0.1)
    trial = fast.backward(batch, task)
    g_fast = _grads(cell)
    ref = plain.backward(batch, task)
    _assert_close(g_fast, _grads(cell))
    assert float((trial.outputs - ref.outputs).abs().max()) <= 1e-6


def test_buffers_are_not_reused_for_another_batch_size_or_quantiser():
    cell, _batch, _task = _setup("rate", form="rate", profile="loihi-like", n=8, b=3, t_len=4)
    g = torch.Generator().manual_seed(0)
    rule = OnlineEprop(cell, fast=True, trace_quantiser=make_trace_quantiser(cell, generator=g))
    rule.start(3)
    first = rule.native_backend
    rule.start(3)
    assert rule.native_backend is first
    rule.start(2)
    assert rule.native_backend is not first
    second = rule.native_backend
    rule.trace_quantiser = make_trace_quantiser(cell, generator=g)
    rule.start(2)
    assert rule.native_backend is not second


def test_loader_reports_the_compilers_first_line_and_keeps_all_of_it(tmp_path, monkeypatch):
    from neuroinit.learning.native import NativeLibrary

    monkeypatch.setenv("NEUROINIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NEUROINIT_NO_FUSED", raising=False)
    src = tmp_path / "broken.c"
    src.write_text("int f(void) { return undeclared_a; }\nint g(void) { return undeclared_b; }\n")
    lib = NativeLibrary(src, {"f": (None, [])})
    assert lib.load() is None and not lib.available()
    reason = lib.unavailable_reason()
    assert reason.startswith("compiling broken.c with ") and "\n" not in reason
    assert "undeclared_a" in lib.diagnostics and "undeclared_b" in lib.diagnostics  # the whole output
    good = tmp_path / "good.c"
    good.write_text("int twice(int x) { return 2 * x; }\n")
    import ctypes

    ok = NativeLibrary(good, {"twice": (ctypes.c_int, [ctypes.c_int])})
    assert ok.load().twice(21) == 42 and ok.unavailable_reason() is None
    assert ok.path().parent == tmp_path / "cache" / "native"  # cached per source, compiler and CPU


def test_loader_builds_several_sources_with_their_header_and_keys_on_all_of_them(tmp_path, monkeypatch):
    import ctypes

    from neuroinit.learning.native import NativeLibrary

    monkeypatch.setenv("NEUROINIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NEUROINIT_NO_FUSED", raising=False)
    (tmp_path / "k.h").write_text("#define K 3\nint helper(int x);\n")
    (tmp_path / "main.c").write_text('#include "k.h"\nint api(int x) { return helper(x) + K; }\n')
    (tmp_path / "helper.c").write_text('#include "k.h"\nint helper(int x) { return K * x; }\n')

    def build():
        return NativeLibrary(tmp_path / "main.c", {"api": (ctypes.c_int, [ctypes.c_int])},
                             extra_sources=("helper.c",), headers=("k.h",))

    first = build()
    assert first.load().api(2) == 9 and first.unavailable_reason() is None
    (tmp_path / "k.h").write_text("#define K 4\nint helper(int x);\n")   # a header edit is a new library
    second = build()
    assert second.path() != first.path() and second.load().api(2) == 12


def test_loader_builds_serial_loops_where_the_compiler_has_no_openmp(tmp_path, monkeypatch):
    # Apple's clang rejects -fopenmp: the library is built with -fopenmp-simd (one thread) instead of not at all
    import ctypes
    import shutil

    from neuroinit.learning.native import NativeLibrary

    monkeypatch.setenv("NEUROINIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NEUROINIT_NO_FUSED", raising=False)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    fake = tmp_path / "clang-no-openmp"
    fake.write_text(f"""#!/bin/sh
for a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; }}; done
exec {cc} "$@"
""")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    src = tmp_path / "par.c"
    src.write_text("#ifdef _OPENMP\n#include <omp.h>\n#endif\n"
                   "int threads(void) { int n = 0;\n#pragma omp parallel reduction(+ : n)\n n += 1;\n return n; }\n")
    lib = NativeLibrary(src, {"threads": (ctypes.c_int, [])})
    assert lib.load().threads() == 1 and lib.unavailable_reason() is None
    assert "-fopenmp-simd" in lib.flags and "-fopenmp" not in lib.flags
    assert "unsupported option '-fopenmp'" in lib.diagnostics  # why it is serial
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undeclared; }\n")
    bad = NativeLibrary(broken, {"f": (None, [])})  # a failure of the serial build is the reason
    assert bad.load() is None and "undeclared" in bad.unavailable_reason() + bad.diagnostics


def test_the_native_backend_does_not_import_the_rule():
    # online.py dispatches to fused.py; fused.py never imports online.py (no import circle)
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(fused))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "neuroinit.learning.online" not in imported and imported, imported
