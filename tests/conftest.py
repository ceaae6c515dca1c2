"""Suite-wide settings: the zoo of small models is importable, and torch uses one thread per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interrupt_ema(monkeypatch: pytest.MonkeyPatch):
    """``interrupt_ema(n)``: the n-th EMA update of the training runs that follow raises ``KeyboardInterrupt`` (a kill
    after n - 1 completed optimiser steps); ``interrupt_ema(None)``: training runs normally again."""
    from gradconflict.train import loop

    original = loop.EMA.update

    def arm(n):
        if n is None:
            monkeypatch.setattr(loop.EMA, "update", original)
            return
        calls = {"n": 0}

        def update(self, model):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            original(self, model)

        monkeypatch.setattr(loop.EMA, "update", update)

    return arm
