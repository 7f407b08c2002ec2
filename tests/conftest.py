"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (gradient proofs need its precision)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
