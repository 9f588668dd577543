"""What is trained: model families as pure PyTorch modules, registered by name.

Every module of this package that registers a `ModelSpec` is imported here, so adding a
family is a matter of one new file.
"""
import importlib
import pkgutil

from models.registry import ModelSpec, get, names, register

_SUPPORT = {"registry", "base"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ModelSpec", "get", "names", "register"]
