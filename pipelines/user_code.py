"""Shipping a user's model code to where it runs: Ray's workers and the MLflow model.

A user's module is imported on the driver from the current directory (or `model.code_dir`)
or from what is installed. Code that is installed, or is raydeep's own, is already where
raydeep runs; anything else goes with the run: every top-level module and package of the
directory the user's module was imported from, as Ray's `py_modules` (each actor's,
worker's and the job's `runtime_env`: the same on the embedded Ray, a cluster and a Ray the
caller started) and as the logged model's `code_paths` (so that `mlflow.pytorch.load_model`
works in another directory, on another machine). Shipping the whole directory, not the one
file, keeps `from helpers import block` in the user's module working there too.
Only the standard library is imported here: `raydeep submit` uses it without torch.
"""
from __future__ import annotations

import importlib
import site
import sys
import sysconfig
from pathlib import Path

RAYDEEP_PACKAGES = ("cluster", "pipelines", "models")
"""raydeep's own top-level packages: never shipped, and a user's package of the same name
would never be found (raydeep's come first)."""


def code_root(module_name: str) -> Path | None:
    """The directory on `sys.path` that the user's top-level module was imported from, or
    None where it needs no shipping (installed, raydeep's own, or `__main__`)."""
    top = module_name.split(".")[0]
    if top in ("__main__", "__mp_main__"):  # cloudpickle carries a script's classes by value
        return None
    module = sys.modules.get(top) or importlib.import_module(top)
    file = getattr(module, "__file__", None)
    if file:
        path = Path(file).resolve()
        root = path.parent.parent if path.name == "__init__.py" else path.parent
    else:  # a namespace package
        root = Path(next(iter(module.__path__))).resolve().parent
    return None if _installed(root) else root


def _installed(root: Path) -> bool:
    paths = sysconfig.get_paths()
    places = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages(),
                                          *(paths[k] for k in ("purelib", "platlib", "stdlib", "platstdlib"))]}
    return any(root == p or p in root.parents for p in places)


def shipped(root: Path, module_name: str) -> list[str]:
    """What goes: the top-level `.py` files and packages of `root` (the imported one even if
    it is a namespace package), raydeep's own names left out."""
    top = module_name.split(".")[0]
    out = []
    for entry in sorted(root.iterdir()):
        name = entry.stem if entry.suffix == ".py" else entry.name
        if not name.isidentifier() or name in RAYDEEP_PACKAGES:
            continue
        if (entry.is_file() and entry.suffix == ".py") or (entry.is_dir() and (
                (entry / "__init__.py").is_file() or entry.name == top)):
            out.append(str(entry))
    return out


def uploaded(paths: list[str]) -> dict:
    """A `runtime_env` for one actor or worker group holding `paths`, uploaded first: Ray
    takes local paths only at `ray.init`, and the Ray a run joins may have been started
    without them (a notebook's `ray.init()`). Packages are content-addressed, so what the
    job uploaded already is not sent again."""
    if not paths:
        return {}
    import tempfile

    import ray

    # Ray's own upload step of ray.init: a private API, so test_user_models.py exercises it.
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    if not ray.is_initialized():
        ray.init()  # as the run's first actor would: the upload needs the cluster
    with tempfile.TemporaryDirectory(prefix="raydeep-code-") as scratch:
        ours = upload_py_modules_if_needed({"py_modules": list(paths)}, include_gitignore=True,
                                           scratch_dir=scratch)["py_modules"]
    # An actor's py_modules replace the job's, not add to them: a submitted job's (raydeep's
    # own packages, say) must stay.
    jobs = list(ray.get_runtime_context().runtime_env.get("py_modules") or [])
    return {"py_modules": jobs + [uri for uri in ours if uri not in jobs]}
