"""Fixtures of the meta-RL tests."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture
def hide_modules(monkeypatch):
    """``hide(*names)``: make each named module and its submodules fail to import through
    ``importlib.import_module`` (how the optional extras are imported), as on a machine without them."""
    real = importlib.import_module

    def hide(*names: str) -> None:
        def fake(name, *args, **kwargs):
            if any(name == n or name.startswith(f"{n}.") for n in names):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return real(name, *args, **kwargs)

        monkeypatch.setattr(importlib, "import_module", fake)

    return hide
