"""Shared test settings: one intra-op thread (tiny tensors; avoids oversubscription on a 2-core CI box); the
``reset_native`` fixture."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def reset_native(monkeypatch):
    """``reset_native(cache=None)``: both native libraries (the fused step's and the fused BPTT loops') load afresh
    at their next use, with ``NEUROINIT_NO_FUSED`` unset and, given ``cache``, from that (empty: a build is needed)
    cache directory; the loaded ones come back after the test."""
    from neuroinit.learning import fused, fused_bptt_native

    def reset(cache=None) -> None:
        monkeypatch.delenv("NEUROINIT_NO_FUSED", raising=False)
        if cache is not None:
            monkeypatch.setenv("NEUROINIT_CACHE", str(cache))
        monkeypatch.setattr(fused, "LIBRARY", fused.new_library())
        monkeypatch.setattr(fused_bptt_native, "LIBRARY", fused_bptt_native.new_library())

    return reset
