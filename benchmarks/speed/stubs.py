"""Import-time stand-ins for ``torchvision`` and ``gym``, used only by the speed benchmark.

``import learn2learn`` imports its vision and gym sub-packages, which import torchvision and gym
at module level, although its MAML (``learn2learn.algorithms.MAML``) uses neither. Neither is
installed in the benchmark environment (torchvision would pull another torch build), so
:func:`install` makes any ``gym.*`` / ``torchvision.*`` import succeed with placeholder objects.
A placeholder is an empty class (calls at import time, such as gym's ``register(...)``, succeed
and do nothing); MAML's code path never touches one.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

STUBBED = ("gym", "torchvision")


class _Meta(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")


def _placeholder(name: str) -> type:
    def init(self: object, *args: object, **kwargs: object) -> None:
        pass

    # A class, so that ``class Env(gym.Env)`` and calls at import time still work.
    return _Meta(name.rsplit(".", 1)[-1], (), {"__init__": init, "__stub__": name})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0-stub"
        return module

    def exec_module(self, module):
        pass


def install() -> list[str]:
    """Stub whichever of ``gym`` / ``torchvision`` is not importable; returns the names stubbed."""
    missing = [name for name in STUBBED if importlib.util.find_spec(name) is None]
    if missing and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
    return missing
