"""A user's own model, named by import path or given as an object.

`--model my_pkg.nets:Net` (or `my_pkg.nets.Net`), or in YAML::

    model:
      class_path: my_pkg.nets.Net
      init_args: {width: 256}

The target is an `nn.Module` class or a function that returns a module. Its `init_args`
are checked against its signature and type hints when the config is built, before any
process starts; `input_shape` and `num_classes`, when the target takes them and the config
does not set them, come from the data. What the module must offer is `models.contract`.
The module is imported from the current directory (or `model.code_dir`) as well as from
what is installed; `pipelines.user_code` ships it to Ray's workers.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from models.contract import UserModel, adapt
from pipelines.errors import ConfigError, first_line
from pipelines.user_code import RAYDEEP_PACKAGES, code_root, shipped, uploaded
from pipelines.values import Text, coerce

SUPPLIED = ("input_shape", "num_classes")
"""Arguments raydeep passes from the data when the target takes them and init_args lacks them."""


@dataclass
class ImportedModel:
    """`model.*` of a user's model: what to import, with which arguments, from where."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    code_dir: Optional[str] = None
    """Directory the module is imported from besides what is installed (default: the
    current directory); its top-level modules and packages are shipped to Ray's workers."""
    target: Any = field(default=None, repr=False, compare=False)
    """The class, factory or module instance itself, when given through the Python API."""

    @property
    def module_name(self) -> str:
        return split_path(self.class_path)[0]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class_path": self.class_path, "init_args": dict(self.init_args)}
        if self.code_dir is not None:
            out["code_dir"] = self.code_dir
        return out

    def code_paths(self) -> list[str]:
        """The user's files and packages that must go where the model is built or loaded
        (`pipelines.user_code`); empty for installed code."""
        module = self.module_name
        if self.target is not None:
            module = getattr(self.target, "__module__", None) or type(self.target).__module__
        root = code_root(module)
        return shipped(root, module) if root else []

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> UserModel:
        """The module behind raydeep's seams (`models.contract.adapt`)."""
        if isinstance(self.target, nn.Module):  # an instance: its own weights, every time
            return adapt(copy.deepcopy(self.target))
        target = self.target if self.target is not None else resolve(self.class_path, self.code_dir)
        kwargs = dict(self.init_args)
        accepted = _parameters(target)
        for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
            if name in accepted and name not in kwargs:
                kwargs[name] = value
        module = target(**kwargs)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{self.class_path} returned {_a(type(module).__name__)}, not an nn.Module")
        return adapt(module)


def short_name(class_path: str) -> str:
    """What a run of this model is called: the class or function's own name."""
    return class_path.replace(":", ".").rsplit(".", 1)[-1]


def looks_like_path(name: str) -> bool:
    """Family names are plain words; an import path has a module part."""
    return ":" in name or "." in name


def split_path(class_path: str) -> tuple[str, str]:
    """('pkg.mod', 'Attr') of 'pkg.mod:Attr'; a dotted path's split is found by importing."""
    if ":" in class_path:
        module, _, attr = class_path.partition(":")
        return module, attr
    return class_path.rsplit(".", 1)[0] if "." in class_path else class_path, class_path.rsplit(".", 1)[-1]


def from_section(raw: dict[str, Any]) -> tuple[str, ImportedModel]:
    """(display name, checked section) from the `model` mapping of a user's model."""
    raw = dict(raw)
    path, name = raw.pop("class_path", None), raw.pop("name", None)
    if path is not None and name is not None:
        raise ConfigError(f"model.name {name!r} and model.class_path {path!r} are both set: give one "
                          "(a family's name, or an import path)")
    path = coerce(path if path is not None else name, str, "model.class_path").strip()
    init_args = raw.pop("init_args", None) or {}
    code_dir = raw.pop("code_dir", None)
    if raw:
        raise ConfigError(f"unknown config key 'model.{sorted(raw)[0]}' for a model given by import "
                          "path (known here: class_path, init_args, code_dir)")
    if not isinstance(init_args, dict):
        raise ConfigError(f"config key 'model.init_args' must be a mapping, got {init_args!r}")
    code_dir = None if code_dir is None else coerce(code_dir, str, "model.code_dir")
    if code_dir is not None and not os.path.isdir(code_dir):
        raise ConfigError(f"model.code_dir {code_dir!r} is not a directory")
    if code_dir is not None:  # kept absolute: a trial or a resume looks from elsewhere
        code_dir = os.path.abspath(code_dir)
    target = resolve(path, code_dir)
    if code_dir is None:  # where it was found: a Tune trial or a resume elsewhere looks there too
        root = code_root(getattr(target, "__module__", None) or split_path(path)[0])
        code_dir = str(root) if root else None
    return short_name(path), ImportedModel(path, check_init_args(target, path, init_args), code_dir)


def from_object(model: Any) -> tuple[str, ImportedModel]:
    """The section of a module instance, class or factory handed to `pipelines.train`; its
    import path and directory are recorded, so that `--resume` from the command line finds it."""
    if isinstance(model, nn.Module):
        cls = type(model)
        path, init_args = f"{cls.__module__}:{cls.__qualname__}", {}
    elif callable(model):
        path = f"{model.__module__}:{getattr(model, '__qualname__', type(model).__name__)}"
        _check_target(model, path)
        init_args = check_init_args(model, path, {})
    else:
        raise ConfigError(f"model= takes an nn.Module, a module class or a factory function, "
                          f"got {_a(type(model).__name__)}")
    root = code_root(split_path(path)[0])
    return short_name(path), ImportedModel(path, init_args, str(root) if root else None, target=model)


def resolve(class_path: str, code_dir: str | None = None) -> Callable[..., nn.Module]:
    """The class or factory `class_path` names; `ConfigError` in one line if there is none."""
    where = os.path.abspath(code_dir or os.getcwd())
    if where not in sys.path:
        # Appended, not prepended: the user's files must not shadow installed packages.
        sys.path.append(where)
    module_name, attr = _locate(class_path)
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model.class_path {class_path!r}: module {module_name!r} has no "
                              f"attribute {attr!r}")
        target = getattr(target, part)
    _check_target(target, class_path)
    return target


def _locate(class_path: str) -> tuple[str, str]:
    """Import the module part of `class_path`: the longest dotted prefix that imports."""
    if not class_path or class_path.startswith((".", ":")) or class_path.endswith((".", ":")):
        raise ConfigError(f"model.class_path {class_path!r} is not an import path (my_pkg.nets:Net)")
    if ":" in class_path:
        candidates = [split_path(class_path)]
    else:
        parts = class_path.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    missing = None
    for module_name, attr in candidates:
        _refuse_raydeeps_own(class_path, module_name)
        try:
            importlib.import_module(module_name)
            return module_name, attr
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise ConfigError(f"model.class_path {class_path!r}: importing {module_name!r} "
                                  f"failed: {first_line(e)}") from None
            missing = missing or e
        except Exception as e:  # the user's module itself raised: its own line, no traceback
            raise ConfigError(f"model.class_path {class_path!r}: importing {module_name!r} failed: "
                              f"{type(e).__name__}: {first_line(e)}") from None
    raise ConfigError(f"model.class_path {class_path!r}: cannot import {candidates[-1][0]!r} "
                      f"({first_line(missing)}; looked in the current directory or model.code_dir "
                      "and in what is installed)")


def _refuse_raydeeps_own(class_path: str, module_name: str) -> None:
    top = module_name.split(".")[0]
    if top in RAYDEEP_PACKAGES:
        raise ConfigError(f"model.class_path {class_path!r}: {top!r} is the name of one of raydeep's "
                          "own packages (a family of models/ is --model NAME); rename your package")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _check_target(target: Any, class_path: str) -> None:
    if inspect.isclass(target):
        if not issubclass(target, nn.Module):
            raise ConfigError(f"model.class_path {class_path!r} is a class that is not an nn.Module")
    elif not callable(target):
        raise ConfigError(f"model.class_path {class_path!r} is {_a(type(target).__name__)}, not an "
                          "nn.Module class or a function that returns one")


def check_init_args(target: Callable, class_path: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """`init_args` coerced to the target's type hints; `ConfigError` for an unknown, missing
    or mistyped argument."""
    params = _parameters(target)
    hints = _hints(target)
    checked: dict[str, Any] = {}
    for name, value in init_args.items():
        key = f"model.init_args.{name}"
        if name not in params and not _takes_any_keyword(target):
            known = ", ".join(params) or "none"
            raise ConfigError(f"unknown config key {key!r}: {class_path} takes no argument {name!r} "
                              f"(it takes: {known})")
        if name in hints:
            checked[name] = coerce(value, hints[name], key)
        elif isinstance(value, Text):  # typed on a command line, no hint: read as YAML
            checked[name] = _yaml(value, key)
        else:
            checked[name] = value
    missing = [name for name, p in params.items() if p.default is inspect.Parameter.empty
               and name not in checked and name not in SUPPLIED]
    if missing:
        raise ConfigError(f"{class_path} needs model.init_args.{missing[0]} (it has no default)")
    return checked


def _yaml(value: str, key: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"config key {key!r}: cannot parse {value!r}") from None


def _signature(target: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return None


def _parameters(target: Callable) -> dict[str, inspect.Parameter]:
    """The arguments a keyword can set."""
    sig = _signature(target)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in sig.parameters.items() if p.kind in kinds} if sig else {}


def _takes_any_keyword(target: Callable) -> bool:
    sig = _signature(target)
    return sig is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _hints(target: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # a forward reference it cannot resolve: checked by the call instead
        return {}


def code_paths(run) -> list[str]:
    """What `run` (a `RunConfig`) must carry of a user's code; empty for raydeep's families."""
    params = run.model.params
    return params.code_paths() if isinstance(params, ImportedModel) else []


def runtime_env(run) -> dict:
    """The job's `runtime_env` (`ray.init`): every worker of the job can import the user's
    module, Tune's trials and Ray Train's controller included."""
    paths = code_paths(run)
    return {"py_modules": paths} if paths else {}


def actor_runtime_env(run) -> dict:
    """The same for one actor or worker group, whatever Ray the run joined."""
    return uploaded(code_paths(run))
