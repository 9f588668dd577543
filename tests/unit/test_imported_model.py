"""A user's own model by import path or object: the config it makes, the module it builds,
the contract's defaults, and the code that would be shipped with it. No Ray here: the same
module under every strategy is tests/strategies/test_user_models.py."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.contract import CuttableUserModel, UserModel, adapt
from pipelines import config, imported_model
from pipelines.errors import ConfigError
from pipelines.training.loop import ModelShape, build_model

NETS = '''
import math
from typing import Literal, Optional

import torch
from torch import nn

from unit_helpers_{tag} import hidden


class Net(nn.Module):
    def __init__(self, input_shape, num_classes, width: int = 8, act: Literal["relu", "tanh"] = "relu",
                 scale: Optional[float] = None):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                  nn.ReLU() if act == "relu" else nn.Tanh(), nn.Linear(width, num_classes))
        self.scale = scale

    def forward(self, x):
        return self.body(x)


def sequential(input_shape, num_classes, width=hidden()):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


class OwnLoss(Net):
    def loss(self, batch):
        return self(batch[0]).sum() * 0 + 42.0

    def evaluate(self, batch):
        return {{"loss": torch.tensor(1.0), "count": torch.tensor(float(len(batch[1])))}}
'''


@pytest.fixture
def code(tmp_path, request):
    """A user's code directory outside the repository, with module names of this test's own
    (imports are cached per process)."""
    import zlib

    tag = str(zlib.crc32(request.node.nodeid.encode()))
    (tmp_path / f"unit_nets_{tag}.py").write_text(NETS.format(tag=tag))
    (tmp_path / f"unit_helpers_{tag}.py").write_text("def hidden():\n    return 6\n")
    (tmp_path / "pkg_of_mine").mkdir()
    (tmp_path / "pkg_of_mine" / "__init__.py").write_text("")
    (tmp_path / "data").mkdir()  # not a package: not shipped
    (tmp_path / "models").mkdir()  # raydeep's own name: never shipped
    (tmp_path / "models" / "__init__.py").write_text("")
    yield tmp_path, f"unit_nets_{tag}"
    for name in (f"unit_nets_{tag}", f"unit_helpers_{tag}"):
        sys.modules.pop(name, None)


def load(*sets: str, **overrides) -> config.RunConfig:
    return config.load(overrides={"strategy.name": "local", **overrides}, sets=list(sets))


def test_an_import_path_makes_a_checked_section_that_round_trips(code):
    root, nets = code
    for spelled in (f"{nets}:Net", f"{nets}.Net"):
        run = load("model.init_args.width=16", "model.init_args.act=tanh", "model.init_args.scale=null",
                   **{"model.name": spelled, "model.code_dir": str(root)})
        assert run.model.name == "Net"
        assert run.model.params.init_args == {"width": 16, "act": "tanh", "scale": None}
        assert type(run.model.params.init_args["width"]) is int  # the hint, not the text "16"
        flat = run.flat()
        assert flat["model.class_path"] == spelled and flat["model.init_args.width"] == 16
        again = config.from_dict(run.to_dict())
        assert again.model.params.to_dict() == run.model.params.to_dict()


def test_the_code_directory_is_recorded_where_the_module_was_found(code, monkeypatch):
    root, nets = code
    monkeypatch.chdir(root)
    run = load(**{"model.name": f"{nets}:Net"})
    assert run.model.params.code_dir == str(root)
    installed = load(**{"model.name": "torch.nn:Identity"})
    assert installed.model.params.code_dir is None and imported_model.code_paths(installed) == []


def test_a_relative_code_dir_is_kept_absolute(code, monkeypatch):
    root, nets = code
    monkeypatch.chdir(root.parent)
    run = load(**{"model.name": f"{nets}:Net", "model.code_dir": root.name})
    assert run.model.params.code_dir == str(root)


def test_the_data_gives_input_shape_and_num_classes_and_the_seed_gives_the_weights(code):
    root, nets = code
    run = load(**{"model.name": f"{nets}:sequential", "model.code_dir": str(root)})
    model = build_model(run, ModelShape((1, 8, 8), 10))
    assert isinstance(model, CuttableUserModel)
    assert [tuple(p.shape) for p in model.parameters()] == [(6, 64), (6,), (10, 6), (10,)]
    again = build_model(run, ModelShape((1, 8, 8), 10))
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_a_plain_module_gets_cross_entropy_and_accuracy(code):
    root, nets = code
    model = build_model(load(**{"model.name": f"{nets}:Net", "model.code_dir": str(root)}), ModelShape((1, 8, 8), 10))
    assert type(model) is UserModel and not hasattr(model, "pipeline_layers")
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    logits = model(x)
    assert torch.equal(model.loss((x, y)), F.cross_entropy(logits, y))
    sums = model.evaluate((x, y))
    assert float(sums["count"]) == 5.0
    assert float(sums["accuracy"]) == float((logits.argmax(1) == y).sum())
    torch.testing.assert_close(sums["loss"], F.cross_entropy(logits, y, reduction="sum"))
    assert torch.equal(model.predict(x), logits.argmax(1))
    assert model.unwrapped() is model.module


def test_a_modules_own_loss_and_metrics_are_used(code):
    root, nets = code
    model = build_model(load(**{"model.name": f"{nets}:OwnLoss", "model.code_dir": str(root)}), ModelShape((1, 8, 8), 10))
    batch = (torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert float(model.loss(batch).detach()) == 42.0
    assert model.evaluate(batch) == {"loss": torch.tensor(1.0), "count": torch.tensor(3.0)}


def test_evaluate_without_count_is_refused_in_one_line():
    class Means(nn.Linear):
        def evaluate(self, batch):
            return {"accuracy": torch.tensor(0.5)}

    with pytest.raises(ValueError, match=r"Means.evaluate\(batch\) must return .* with 'count'"):
        adapt(Means(2, 2)).evaluate((torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))


def test_a_sequential_and_a_module_with_pipeline_layers_can_be_cut():
    seq = adapt(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert [type(m) for m in seq.pipeline_layers()] == [nn.Linear, nn.ReLU, nn.Linear]
    out, batch = torch.randn(4, 2), (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(seq.output_loss(out, batch), F.cross_entropy(out, batch[1]))

    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x))

        def pipeline_layers(self):
            return [self.a, self.b]

    listed = adapt(Listed())
    assert isinstance(listed, CuttableUserModel) and listed.pipeline_layers() == [listed.module.a, listed.module.b]


def test_the_python_api_takes_an_instance_or_a_factory():
    instance = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    name, section = imported_model.from_object(instance)
    assert name == "Sequential" and section.class_path == "torch.nn.modules.container:Sequential"
    built = section.build((1, 8, 8), 10)
    assert built.module is not instance  # a copy: the caller's module is left as it was
    assert torch.equal(built.module[1].weight, instance[1].weight)

    def factory(input_shape, num_classes, width: int = 4):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Linear(width, num_classes))

    name, section = imported_model.from_object(factory)
    assert name.endswith("factory") and [p.shape[0] for p in section.build((1, 8, 8), 3).parameters()] == [4, 4, 3, 3]
    with pytest.raises(ConfigError, match="model= takes an nn.Module, a module class or a factory"):
        imported_model.from_object(42)


def test_what_is_shipped_is_the_top_level_code_of_where_the_module_was_found(code):
    root, nets = code
    run = load(**{"model.name": f"{nets}:Net", "model.code_dir": str(root)})
    shipped = sorted(p.rsplit("/", 1)[-1] for p in imported_model.code_paths(run))
    assert shipped == sorted([f"{nets}.py", nets.replace("nets", "helpers") + ".py", "pkg_of_mine"])
    assert imported_model.runtime_env(run) == {"py_modules": imported_model.code_paths(run)}
    assert imported_model.runtime_env(load()) == {}  # a family: nothing to ship


@pytest.mark.parametrize("sets, message", [
    (["model.init_args.depth=2"], "unknown config key 'model.init_args.depth': {nets}:Net takes no "
                                  "argument 'depth' (it takes: input_shape, num_classes, width, act, scale)"),
    (["model.init_args.width=wide"], "config key 'model.init_args.width' expects int, got 'wide'"),
    (["model.init_args.act=sigmoid"], "config key 'model.init_args.act' must be one of 'relu', 'tanh'"),
    (["model.init_args.scale=big"], "config key 'model.init_args.scale' expects float, got 'big'"),
    (["model.width=3"], "unknown config key 'model.width' for a model given by import path"),
    (["model.init_args=[1]"], "config key 'model.init_args' must be a mapping"),
    (["model.class_path=other:Net"], "model.name '{nets}:Net' and model.class_path 'other:Net' are both set"),
])
def test_init_args_are_checked_against_the_signature(code, sets, message):
    root, nets = code
    with pytest.raises(ConfigError) as refused:
        load(*sets, **{"model.name": f"{nets}:Net", "model.code_dir": str(root)})
    assert message.format(nets=nets) in str(refused.value)


def test_a_module_that_cannot_be_imported_is_named_with_the_reason(code):
    root, nets = code
    (root / "raising_on_import.py").write_text("1 / 0\n")
    cases = {"no_such_module_here:Net": "cannot import 'no_such_module_here' (No module named",
             f"{nets}:Absent": f"module '{nets}' has no attribute 'Absent'",
             f"{nets}:math": "is a module, not an nn.Module class or a function that returns one",
             "raising_on_import:Net": "importing 'raising_on_import' failed: ZeroDivisionError: division by zero",
             "collections:OrderedDict": "is a class that is not an nn.Module",
             "models.mine:Net": "'models' is the name of one of raydeep's own packages",
             "trailing.": "is not an import path"}
    for path, message in cases.items():
        with pytest.raises(ConfigError) as refused:
            load(**{"model.name": path, "model.code_dir": str(root)})
        assert message in str(refused.value), path
    sys.modules.pop("raising_on_import", None)


@pytest.mark.parametrize("path, metrics", [("examples.plain_mlp:PlainMLP", {"loss", "accuracy", "count"}),
                                           ("examples.smoothed_cnn:make_cnn",
                                            {"loss", "accuracy", "top2_accuracy", "count"})])
def test_the_readmes_example_modules_build_and_keep_the_contract(path, metrics, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # as the README runs them
    run = load("model.init_args.channels=4" if "cnn" in path else "model.init_args.width=16",
               **{"model.name": path})
    model = build_model(run, ModelShape((1, 8, 8), 10))
    batch = (torch.rand(6, 1, 8, 8), torch.arange(6))
    loss = model.loss(batch)
    assert loss.ndim == 0 and loss.requires_grad
    assert set(model.evaluate(batch)) == metrics
    assert hasattr(model, "pipeline_layers") == ("plain" in path)  # an nn.Sequential can be cut
