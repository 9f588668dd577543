"""Tier 1: the run config, without processes."""
import pytest

from pipelines import config
from pipelines.config import ConfigError


def test_defaults_and_flat_keys():
    cfg = config.load()
    assert cfg.model.name == "mlp" and cfg.strategy.name == "allreduce"
    assert cfg.resources.workers == 2 and cfg.data.source == "digits"
    flat = cfg.flat()
    assert flat["model.width"] == 256 and flat["optim.lr"] == cfg.optim.lr
    assert flat["strategy.max_failures"] == 3


def test_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: cnn\n  channels: [8, 16]\noptim:\n  lr: 0.2\n  epochs: 3\n")
    cfg = config.load(path, {"optim.epochs": config.Text("5")},
                      ["optim.lr=0.05", "model.pool=avg", "data.input_shape=1,8,8"])
    assert cfg.model.name == "cnn" and cfg.model.params.channels == [8, 16]
    assert cfg.model.params.pool == "avg"
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 5
    assert cfg.data.input_shape == [1, 8, 8]


def test_exponents_read_as_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")
    assert config.load(path).optim.lr == 1e-3
    assert config.load(sets=["optim.lr=2e-4"]).optim.lr == 2e-4


def test_round_trip_through_dict():
    cfg = config.load(sets=["model.name=cnn", "model.channels=[4]", "optim.grad_clip=1.5"])
    again = config.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("sets, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["bogus.x=1"], "unknown config key 'bogus'"),
    (["model.depth=1", "model.name=cnn"], "unknown config key 'model.depth'"),
    (["optim.lr=fast"], "config key 'optim.lr' expects float, got 'fast'"),
    (["resources.workers=1.5"], "config key 'resources.workers' expects int, got '1.5'"),
    (["tracking.log_model=maybe"], "config key 'tracking.log_model' expects bool"),
    (["resources.workers=0"], "resources.workers must be >= 1, got 0"),
    (["data.batch_size=65"], "data.batch_size (65) must be divisible by resources.workers (2)"),
    (["model.name=resnet"], "unknown model 'resnet' (known: "),
    (["strategy.name=magic"], "unknown strategy 'magic'"),
    (["optim.name=lion"], "optim.name must be one of"),
    (["data.test_fraction=1.5"], "data.test_fraction must be in (0, 1), got 1.5"),
    (["optim.lr"], "--set 'optim.lr' needs the form key=value"),
])
def test_bad_values_name_key_and_value(sets, message):
    with pytest.raises(ConfigError) as error:
        config.load(sets=sets)
    assert message in str(error.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "broken.yaml")
