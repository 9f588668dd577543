"""Bad input through the command line as a user types it: one line on stderr naming the
problem, exit code 2, no traceback, nothing written, no Ray started, and an answer within
seconds (every case is checked before Ray would start, so all run in this process).

The table covers `raydeep run`, `tune` and `ui`: each flag with a wrong type, range or
choice, each config section's keys through --set, run and sweep YAML files, data files of
every kind, synthetic sizes, seeds, storage paths and URIs, tracking URIs, names, strategy
options the model cannot meet, and --resume. (`submit`, `jobs` and Ray addresses have
tests/system/test_bad_addresses.py.)
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, run_cli

SECONDS_PER_CASE = 5.0
"""A refusal is said at once: the slowest case here (a GCS bucket without credentials, whose
client would look for them for minutes) answers in about 1.5 s."""

MLP = str(REPO / "tune_configs" / "mlp.yaml")
BASE = "base: {strategy: {name: local}, optim: {epochs: 2}, tracking: {log_model: false}}\n"
SPACE = "space: {optim.lr: {choice: [0.1, 0.2]}}\n"
METRIC = "metric: val_accuracy\nmode: max\n"
SWEEPS = {
    "s-unknown": BASE + SPACE + METRIC + "bogus: 1\n",
    "s-nospace": BASE + METRIC,
    "s-spacelist": BASE + "space: [1, 2]\n" + METRIC,
    "s-baddist": BASE + "space: {optim.lr: {normal: [0, 1]}}\n" + METRIC,
    "s-twodist": BASE + "space: {optim.lr: {choice: [1], grid: [2]}}\n" + METRIC,
    "s-emptychoice": BASE + "space: {optim.lr: {choice: []}}\n" + METRIC,
    "s-uniform3": BASE + "space: {optim.lr: {uniform: [0.1, 0.2, 0.3]}}\n" + METRIC,
    "s-uniformtext": BASE + "space: {optim.lr: {uniform: [a, b]}}\n" + METRIC,
    "s-lowhigh": BASE + "space: {optim.lr: {uniform: [0.5, 0.1]}}\n" + METRIC,
    "s-logzero": BASE + "space: {optim.lr: {loguniform: [0, 0.1]}}\n" + METRIC,
    "s-inf": BASE + "space: {optim.lr: {uniform: [0.1, .inf]}}\n" + METRIC,
    "s-randfloat": BASE + "space: {optim.epochs: {randint: [1.5, 3]}}\n" + METRIC,
    "s-randequal": BASE + "space: {optim.epochs: {randint: [2, 2]}}\n" + METRIC,
    "s-badkey": BASE + "space: {optim.bogus: {choice: [1, 2]}}\n" + METRIC,
    "s-badvalue": BASE + "space: {optim.lr: {choice: [-1, 0.1]}}\n" + METRIC,
    "s-badmodel": BASE + "space: {model.name: {choice: [mlp, nosuch]}}\n" + METRIC,
    "s-nometric": BASE + SPACE + "mode: max\n",
    "s-badmetric": BASE + SPACE + "metric: bogus\nmode: max\n",
    "s-badmode": BASE + SPACE + "metric: val_accuracy\nmode: up\n",
    "s-samples0": BASE + SPACE + METRIC + "samples: 0\n",
    "s-samplestext": BASE + SPACE + METRIC + "samples: two\n",
    "s-scheduler": BASE + SPACE + METRIC + "scheduler: hyperband\n",
    "s-schedulerlist": BASE + SPACE + METRIC + "scheduler: [asha]\n",
    "s-grace0": BASE + SPACE + METRIC + "scheduler: {name: asha, grace_period: 0}\n",
    "s-gracetext": BASE + SPACE + METRIC + "scheduler: {name: asha, grace_period: two}\n",
    "s-reduction1": BASE + SPACE + METRIC + "scheduler: {name: asha, reduction_factor: 1}\n",
    "s-maxt": BASE + SPACE + METRIC + "scheduler: {name: asha, grace_period: 5, max_t: 2}\n",
    "s-ashaextra": BASE + SPACE + METRIC + "scheduler: {name: asha, bogus: 1}\n",
    "s-quantile": BASE + SPACE + METRIC + "scheduler: {name: pbt, quantile_fraction: 0.9}\n",
    "s-interval0": BASE + SPACE + METRIC + "scheduler: {name: pbt, perturbation_interval: 0}\n",
    "s-synch": BASE + SPACE + METRIC + "scheduler: {name: pbt, synch: maybe}\n",
    "s-mutate": BASE + SPACE + METRIC + "scheduler: {name: pbt, mutate: [optim.momentum]}\n",
    "s-search": BASE + SPACE + METRIC + "search: bayes\n",
    "s-seedtext": BASE + SPACE + METRIC + "search: {name: optuna, seed: abc}\n",
    "s-seedneg": BASE + SPACE + METRIC + "search: {name: random, seed: -1}\n",
    "s-optunagrid": BASE + "space: {optim.lr: {grid: [0.1, 0.2]}}\n" + METRIC + "search: optuna\n",
    "s-seedsone": BASE + SPACE + METRIC + "seeds: [3]\n",
    "s-seedsasha": BASE + SPACE + METRIC + "seeds: [0, 1]\nscheduler: asha\n",
    "s-trialcpus": BASE + SPACE + METRIC + "trial: {cpus: 0}\n",
    "s-trialkey": BASE + SPACE + METRIC + "trial: {memory: 1}\n",
    "s-concurrent": BASE + SPACE + METRIC + "max_concurrent: 0\n",
    "s-basebad": "base: {optim: {lr: -1}}\n" + SPACE + METRIC,
    "s-baselist": "base: [1]\n" + SPACE + METRIC,
    "s-escape": BASE + SPACE + METRIC + "name: ../outside\n",
}
RUN_FILES = {
    "empty.yaml": "",
    "list.yaml": "- a\n- b\n",
    "scalar.yaml": "42\n",
    "unknown.yaml": "bogus: {a: 1}\n",
    "badtype.yaml": "optim: {lr: fast}\n",
    "section.yaml": "optim: 3\n",
    "sectionlist.yaml": "data: [1, 2]\n",
    "seedtext.yaml": "seed: abc\n",
    "unclosed.yaml": "optim: {lr: [\n",
    "tabs.yaml": "optim:\n\tlr: 0.1\n",
    "python.yaml": "optim: !!python/object/apply:os.system ['echo planted']\n",
    "modelname.yaml": "model: {name: nosuch}\n",
    "modelparam.yaml": "model: {name: mlp, bogus: 1}\n",
    "infinite.yaml": "optim: {lr: .inf}\n",
    "twice.yaml": "optim:\n  lr: 0.1\n  lr: 0.2\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file a case names, real ones: Parquet written by pyarrow, CSV, YAML, markers."""
    root = tmp_path_factory.mktemp("bad-input")
    for name, text in {**RUN_FILES, **{f"{k}.yaml": v for k, v in SWEEPS.items()}}.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (root / "latin1.yaml").write_bytes("optim: {name: caf\xe9}\n".encode("latin-1"))
    (root / "adir.yaml").mkdir()
    (root / "adir").mkdir()
    for name in ("twoschemas", "twoformats"):  # tables split over files that do not agree
        (root / name).mkdir()
        pq.write_table(pa.table({"a": [1.0, 2.0] * 20, "b": [0.5, 0.1] * 20, "label": [0, 1] * 20}),
                       root / name / "a.parquet")
    pq.write_table(pa.table({"a": [1.0, 2.0] * 20, "label": [0, 1] * 20}), root / "twoschemas" / "b.parquet")
    (root / "twoformats" / "b.csv").write_text("a,b,label\n1.0,2.0,0\n")
    rows = "1.0,2.0,0\n3.0,0.5,1\n" * 20
    csv = {
        "empty.csv": "", "header.csv": "a,b,label\n", "text.csv": "a,b,label\n" + "x,1,0\ny,2,1\n" * 20,
        "nan.csv": "a,b,label\n" + "1.0,nan,0\n2.0,0.5,1\n" * 10,
        "inf.csv": "a,b,label\n" + "1.0,inf,0\n2.0,0.5,1\n" * 10,
        "oneclass.csv": "a,b,label\n" + "1.0,2.0,7\n" * 40, "nolabel.csv": "a,b,c\n" + rows,
        "onlylabel.csv": "label\n" + "0\n1\n" * 20, "ragged.csv": "a,b,label\n1,2,0\n1,2\n",
        "nulllabel.csv": "a,b,label\n" + "1,2,0\n3,4,\n" * 20, "good.csv": "a,b,label\n" + rows,
        "data.json": '{"a": 1}', "data.xlsx": "not a spreadsheet", "corrupt.parquet": "not parquet",
    }
    for name, text in csv.items():
        (root / name).write_text(text)
    (root / "empty.parquet").write_bytes(b"")
    n = 40
    tables = {
        "listlabel": {"a": [1.0, 2.0] * 20, "label": [[1, 2], [3]] * 20},
        "structlabel": {"a": [1.0, 2.0] * 20, "label": [{"x": 1}, {"x": 2}] * 20},
        "textfeature": {"a": ["x", "y"] * 20, "label": [0, 1] * 20},
        "inf": {"a": [1.0, float("inf")] * 20, "label": [0, 1] * 20},
        "null": {"a": [1.0, None] * 20, "label": [0, 1] * 20},
        "norows": {"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())},
        "oneclass": {"a": [1.0] * n, "label": [3] * n},
        "raggedlist": {"x": [[1.0, 2.0], [3.0]] * 20, "label": [0, 1] * 20},
        "nanlist": {"x": [[1.0, float("nan")], [3.0, 1.0]] * 20, "label": [0, 1] * 20},
        "mixedlist": {"a": [1.0, 2.0] * 20, "b": [[1.0], [2.0]] * 20, "label": [0, 1] * 20},
        "beyondfloat32": {"a": [1e300, 2.0] * 20, "label": [0, 1] * 20},
        "nulllabel": {"a": [1.0, 2.0] * 20, "label": [0, None] * 20},
        "nanlabel": {"a": [1.0, 2.0] * 20, "label": [0.0, float("nan")] * 20},
        "singletons": {"a": [float(i) for i in range(n)], "label": [0, 1] * 18 + [2, 3, 4, 5]},
        "good": {"a": [1.0, 2.0] * 20, "label": [0, 1] * 20},
        "textlabel": {"a": [1.0, 2.0] * 20, "label": ["x", "y"] * 20},
        "target": {"a": [1.0, 2.0] * 20, "label": [0.5, 3.25] * 20},
        "onetarget": {"a": [1.0, 2.0] * 20, "label": [2.5] * 40},
        "inftarget": {"a": [1.0, 2.0] * 20, "label": [0.5, float("inf")] * 20},
    }
    for name, columns in tables.items():
        pq.write_table(pa.table(columns), root / f"{name}.parquet")
    store = root / "store"
    for name, marker in {"broken": "{not json", "noconfig": '{"mlflow_run_id": "abc"}', "listed": "[1, 2]",
                         "saved": _marker(), "savedps": _marker("ps")}.items():
        (store / name).mkdir(parents=True)
        (store / name / "raydeep_run.json").write_text(marker)
    code = root / "code"  # a user's model modules (USER_MODELS)
    code.mkdir()
    for name, text in USER_CODE.items():
        (code / name).write_text(text)
    # Root may write anywhere a permission says no: sysfs refuses it a new directory too.
    unwritable = Path("/sys") if os.geteuid() == 0 else root / "readonly"
    if unwritable != Path("/sys"):
        unwritable.mkdir()
        unwritable.chmod(0o500)
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{root / 'other.db'}").search_experiments()  # a store without the run
    import pipelines.run  # noqa: F401 - imported once here: a case's bound is its checks, not torch's import
    import pipelines.sweep.runner  # noqa: F401
    return root, unwritable


@pytest.fixture(autouse=True, scope="module")
def no_cluster_here():
    """The machine's other Rays stay out of these cases: a live `ray start` recorded in Ray's
    temp folder adds a line naming it to a run that starts its own (the addresses' tests
    hold that line), and RAY_ADDRESS would be joined. The folder is short: a Ray started
    here (the slow case) puts its sockets in it, and a socket's path has 107 characters."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp", ignore_cleanup_errors=True) as short, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", short)
        patch.delenv("RAY_ADDRESS", raising=False)
        yield


def _marker(strategy: str = "local") -> str:
    """A marker as a run writes it (the resume cases change what it trained); the MLflow
    run it names is in no store."""
    import json

    from pipelines import config

    saved = config.load(overrides={"strategy.name": strategy, "optim.epochs": 1, "recipe": False})
    return json.dumps({"mlflow_run_id": "0" * 32, "tracking_uri": "sqlite:///mlflow.db",
                       "config": saved.to_dict()})


RUN_FLAGS = [
    (["--model", "nosuch"], "unknown model 'nosuch' (known: autoencoder, cnn"),
    (["--model", "MLP"], "unknown model 'MLP'"),
    (["--model"], "argument --model: expected one argument"),
    (["--strategy", "nosuch"], "unknown strategy 'nosuch' (known: allreduce, diloco, lbfgs, local, pipeline, ps)"),
    (["--workers", "0"], "resources.workers must be >= 1, got 0"),
    (["--workers", "two"], "config key 'resources.workers' expects int, got 'two'"),
    (["--workers", "1.5"], "config key 'resources.workers' expects int, got '1.5'"),
    (["--workers", "3"], "data.batch_size (64) must be divisible by resources.workers (3)"),
    (["--gpus-per-worker", "-1"], "resources.gpus_per_worker must be >= 0, got -1.0"),
    (["--gpus-per-worker", "inf"], "config key 'resources.gpus_per_worker' must be a finite number"),
    (["--cpus-per-worker", "0"], "resources.cpus_per_worker must be > 0, got 0.0"),
    (["--cpus-per-worker", "nan"], "config key 'resources.cpus_per_worker' must be a finite number"),
    (["--num-cpus", "0"], "resources.num_cpus must be >= 1, got 0"),
    (["--num-cpus", "1.5"], "config key 'resources.num_cpus' expects int, got '1.5'"),
    (["--pack", "maybe"], "config key 'resources.pack' expects bool, got 'maybe'"),
    (["--epochs", "0"], "optim.epochs must be >= 1, got 0"),
    (["--epochs", "ten"], "config key 'optim.epochs' expects int, got 'ten'"),
    (["--epochs", "1e12"], "config key 'optim.epochs' expects int, got '1e12'"),
    (["--lr", "0"], "optim.lr must be > 0, got 0.0"),
    (["--lr", "abc"], "config key 'optim.lr' expects float, got 'abc'"),
    (["--lr", "inf"], "config key 'optim.lr' must be a finite number, got 'inf'"),
    (["--lr", "nan"], "config key 'optim.lr' must be a finite number"),
    (["--lr", "1e999"], "config key 'optim.lr' must be a finite number, got '1e999'"),
    (["--optimizer", "rmsprop"], "optim.name must be one of sgd, adam, adamw, adagrad, got 'rmsprop'"),
    (["--batch-size", "0"], "data.batch_size must be >= 1, got 0"),
    (["--batch-size", "100000"], "data.batch_size (100000) exceeds the training split"),
    (["--label", "nope", "--data", "{root}/good.csv"], "has no label column 'nope' (columns: a, b, label)"),
    (["--input-shape", "0,8,8"], "data.input_shape must hold positive sizes, got [0, 8, 8]"),
    (["--input-shape", "3,3"], "data.input_shape [3, 3] holds 9 values but each example of digits has 64"),
    (["--input-shape", "a,b"], "config key 'data.input_shape[0]' expects int, got 'a'"),
    (["--input-shape", "[]"], "data.input_shape must hold at least one size"),
    # np.prod of these sizes wraps around to 0 in int64: the message once said "holds 0 values"
    (["--input-shape=4294967296,4294967296"], "holds 18446744073709551616 values but each example"),
    (["--seed", "-1"], "seed must be an integer in 0..4294967295, got -1"),
    (["--seed", "4294967296"], "seed must be an integer in 0..4294967295, got 4294967296"),
    (["--seed", "99999999999999999999"], "seed must be an integer in 0..4294967295"),
    (["--seed", "1.5"], "config key 'seed' expects int, got '1.5'"),
    (["--shards", "0", "--strategy", "lbfgs"], "strategy.shards must be >= 1, got 0"),
    (["--shards", "100000000", "--strategy", "ps"], "strategy.shards (100000000) exceeds the 85,002"),
    (["--shards", "2", "--strategy", "local"], "unknown config key 'strategy.shards'"),
    (["--staleness", "-1", "--strategy", "ps"], "strategy.staleness must be >= 0"),
    (["--ps-device", "tpu", "--strategy", "ps"], "strategy.device must be cpu or cuda, got 'tpu'"),
    (["--ps-device", "cuda", "--strategy", "ps"], "strategy.device cuda needs strategy.shard_gpus > 0"),
    (["--stages", "0", "--strategy", "pipeline"], "strategy.stages must be >= 1, got 0"),
    (["--stages", "5", "--strategy", "pipeline"], "strategy.stages (5) exceeds the 3 cuttable blocks of model mlp"),
    (["--stages", "2", "--strategy", "ps"], "unknown config key 'strategy.stages'"),
    (["--microbatches", "3", "--strategy", "pipeline"], "data.batch_size (64) must be divisible by microbatches"),
    (["--microbatches", "128", "--strategy", "pipeline"], "strategy.microbatches x replicas (128 x 1) exceeds"),
    (["--schedule", "zigzag", "--strategy", "pipeline"], "strategy.schedule: unknown schedule 'zigzag' (known: gpipe"),
    (["--replicas", "0", "--strategy", "pipeline"], "strategy.replicas must be >= 1, got 0"),
    (["--print-schedule", "--strategy", "local"], "--print-schedule needs a strategy with a schedule"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--verbose=3"], "argument --verbose: ignored explicit argument '3'"),
]

SET_KEYS = [
    (["--set", "optim.lr"], "--set 'optim.lr' needs the form key=value"),
    (["--set", "optim..lr=1"], "bad config key 'optim..lr'"),
    (["--set", "bogus=1"], "unknown config key 'bogus' (known here: model, data, optim"),
    (["--set", "optim=3"], "config key 'optim' must be a mapping, got '3'"),
    (["--set", "recipe=flase"], "recipe must be true or false (false: the schema's defaults, as --no-recipe), "
                                "got 'flase'"),
    (["--set", "seed.x=1"], "config key 'seed' expects int"),
    (["--set", "optim.bogus=1"], "unknown config key 'optim.bogus'"),
    (["--set", "optim.momentum=nan"], "config key 'optim.momentum' must be a finite number"),
    (["--set", "optim.momentum=-0.5"], "optim.momentum must be in [0, 1), got -0.5"),
    (["--set", "optim.momentum=1"], "optim.momentum must be in [0, 1), got 1.0"),
    (["--set", "optim.weight_decay=-1"], "optim.weight_decay must be >= 0, got -1.0"),
    (["--set", "optim.grad_clip=0"], "optim.grad_clip must be > 0, got 0.0"),
    (["--set", "optim.grad_clip=inf"], "config key 'optim.grad_clip' must be a finite number"),
    (["--set", "optim.steps_per_epoch=0"], "optim.steps_per_epoch must be >= 1, got 0"),
    (["--set", "data.bogus=1"], "unknown config key 'data.bogus'"),
    (["--set", "data.source="], "data.source must not be empty"),
    (["--set", "data.test_fraction=0"], "data.test_fraction must be in (0, 1), got 0.0"),
    (["--set", "data.test_fraction=nan"], "config key 'data.test_fraction' must be a finite number"),
    (["--set", "data.val_fraction=1"], "data.val_fraction must be in [0, 1), got 1.0"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_samples=5"],
     "data.synthetic_samples must be >= 10, got 5"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_classes=1"],
     "data.synthetic_classes must be >= 2, got 1"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_shape=[0]"],
     "data.synthetic_shape must hold positive sizes, got [0]"),
    # numpy would raise a MemoryError, or 'array is too big', halfway through drawing these
    (["--set", "data.source=synthetic", "--set", "data.synthetic_samples=100000000000"],
     "synthetic data of 100,000,000,000 examples and 10 class prototypes of shape [1, 8, 8]"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_shape=[100000,100000,100000]"],
     "GiB while drawn, and this machine has"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_shape=[4294967296,4294967296]"],
     "is 75,742,331,166,651,418,935,296 values"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_classes=1000000000000"],
     "1,000,000,000,000 class prototypes"),
    (["--set", "data.source=synthetic", "--set", "data.synthetic_classes=100000"],
     "classes have a single example (first: "),
    (["--set", "data.source=synthetic", "--seed", "-5"], "seed must be an integer in 0..4294967295, got -5"),
    (["--set", "model.bogus=1"], "unknown config key 'model.bogus' (known here: depth, width"),
    (["--set", "model.depth=-1"], "mlp needs depth >= 0 and width >= 1, got depth=-1"),
    (["--set", "model.dropout=inf"], "config key 'model.dropout' must be a finite number"),
    (["--set", "model.dropout=1.5"], "mlp dropout must be in [0, 1), got 1.5"),
    (["--set", "model.activation=nosuch"], "unknown activation 'nosuch'"),
    (["--set", "model.projection=nosuch"], "unknown projection 'nosuch'"),
    (["--model", "cnn", "--set", "model.kernel_size=0"], "cnn needs kernel_size >= 1, pool_size >= 1"),
    (["--model", "cnn", "--set", "model.pool_size=0"], "got 3, 0 and [32, 64]"),
    (["--model", "cnn", "--set", "model.channels=[0]"], "positive channels, got 3, 2 and [0]"),
    (["--model", "cnn", "--set", "model.dropout=1"], "cnn dropout must be in [0, 1), got 1.0"),
    (["--model", "cnn", "--set", "model.batch_norm=maybe"], "config key 'model.batch_norm' expects bool"),
    (["--model", "rnn", "--set", "model.cell=transformer"], "rnn cell must be one of rnn, lstm, gru"),
    (["--model", "rnn", "--set", "model.dropout=1"], "rnn dropout must be in [0, 1), got 1.0"),
    (["--model", "rbm", "--set", "model.cd_k=0"], "rbm cd_k must be >= 1, got 0"),
    (["--model", "vae", "--set", "model.latent=0"], "vae latent must hold positive sizes"),
    (["--model", "ssvae", "--set", "model.labelled_fraction=2"], "ssvae labelled_fraction must be in [0, 1]"),
    (["--model", "dae", "--set", "model.corruption=nosuch"], "dae corruption must be one of mask, gaussian"),
    (["--model", "dbn", "--set", "model.layers=[]"], "dbn layers must name at least one RBM"),
    (["--model", "dbn", "--set", "model.dropout=1"], "dbn dropout must be in [0, 1), got 1.0"),
    (["--set", "strategy.bogus=1"], "unknown config key 'strategy.bogus'"),
    (["--strategy", "ps", "--set", "strategy.push_dtype=float16"], "strategy.push_dtype must be float32"),
    (["--strategy", "ps", "--set", "strategy.on_worker_failure=ignore"], "strategy.on_worker_failure must be"),
    (["--strategy", "ps", "--set", "strategy.max_worker_restarts=-2"], "strategy.max_worker_restarts must be >= -1"),
    (["--strategy", "lbfgs", "--set", "strategy.line_search=backtracking"], "strategy.line_search must be strong_wolfe"),
    (["--strategy", "lbfgs", "--set", "strategy.portions=1"], "strategy.portions (1) must be >= resources.workers"),
    (["--strategy", "lbfgs", "--set", "strategy.batch_size=100000"], "strategy.batch_size (100000) exceeds"),
    (["--strategy", "lbfgs", "--set", "optim.grad_clip=1"], "optim.grad_clip (1.0) does not apply to lbfgs"),
    (["--strategy", "lbfgs", "--set", "model.dropout=0.5"], "model mlp has a stochastic loss"),
    (["--strategy", "lbfgs", "--model", "rbm"], "model rbm has a stochastic loss"),
    (["--strategy", "pipeline", "--model", "rbm"], "model rbm cannot be cut into pipeline stages"),
    (["--strategy", "pipeline", "--model", "cnn", "--stages", "20"], "strategy.stages (20) exceeds the 6 cuttable"),
    (["--strategy", "pipeline", "--set", "strategy.split=[100]"], "strategy.split [100] must hold 1 increasing"),
    (["--strategy", "allreduce", "--set", "strategy.backend=mpi"], "strategy.backend must be gloo or nccl"),
    (["--strategy", "allreduce", "--set", "strategy.backend=nccl"], "strategy.backend nccl needs"),
    # Ray Train's FailureConfig would refuse it once the run was up
    (["--strategy", "allreduce", "--set", "strategy.max_failures=-2"], "strategy.max_failures must be >= -1"),
    (["--lr-schedule", "plateau", "--set", "optim.plateau_metric=val_acc"],
     "optim.plateau_metric val_acc is not reported by this run; it reports train_loss, val_loss, val_accuracy"),
    (["--strategy", "ps", "--lr-schedule", "plateau"], "ps shards apply pushes on the workers' own clocks"),
    (["--set", "resources.bogus=1"], "unknown config key 'resources.bogus'"),
    (["--set", "resources.keep_checkpoints=0"], "resources.keep_checkpoints must be >= 1, got 0"),
    (["--link-mbps", "-1"], "resources.link_mbps must be >= 0 (0: no throttle), got -1.0"),
    (["--strategy", "lbfgs", "--link-mbps", "10"],
     "resources.link_mbps throttles the workers' exchanges of allreduce, diloco and ps; lbfgs has none"),
    (["--set", "resources.shared_storage=maybe"], "config key 'resources.shared_storage' expects bool"),
    (["--set", "tracking.bogus=1"], "unknown config key 'tracking.bogus'"),
    (["--set", "tracking.log_model=maybe"], "config key 'tracking.log_model' expects bool, got 'maybe'"),
    (["--set", "tracking.experiment= "], "tracking.experiment must not be empty"),
]

RUN_FILES_CASES = [
    (["{root}/missing.yaml"], "config file '{root}/missing.yaml' does not exist"),
    (["{root}/adir.yaml"], "does not exist (it is a directory)"),
    (["{root}/binary.yaml"], "is not text (not UTF-8)"),
    (["{root}/latin1.yaml"], "is not text (not UTF-8)"),
    (["{root}/twice.yaml"], "is not valid YAML (line 3): key 'lr' is given twice"),
    (["{root}/unclosed.yaml"], "is not valid YAML (line 2)"),
    (["{root}/tabs.yaml"], "is not valid YAML (line 2): found character '\\t'"),
    (["{root}/python.yaml"], "could not determine a constructor for the tag"),
    (["{root}/list.yaml"], "must hold a mapping, got list"),
    (["{root}/scalar.yaml"], "must hold a mapping, got int"),
    (["{root}/good.csv"], "config file '{root}/good.csv' must hold a mapping, got str"),
    (["{root}/empty.yaml", "--strategy", "nosuch"], "unknown strategy 'nosuch'"),
    (["{root}/unknown.yaml"], "unknown config key 'bogus'"),
    (["{root}/badtype.yaml"], "config key 'optim.lr' expects float, got 'fast'"),
    (["{root}/section.yaml"], "config key 'optim' must be a mapping, got 3"),
    (["{root}/sectionlist.yaml"], "config key 'data' must be a mapping, got [1, 2]"),
    (["{root}/seedtext.yaml"], "config key 'seed' expects int, got 'abc'"),
    (["{root}/modelname.yaml"], "unknown model 'nosuch'"),
    (["{root}/modelparam.yaml"], "unknown config key 'model.bogus'"),
    (["{root}/infinite.yaml"], "config key 'optim.lr' must be a finite number, got inf"),
    (["one.yaml", "two.yaml"], "unrecognized arguments: two.yaml"),
]

DATA = [
    (["--data", "{root}/missing.csv"], "data file '{root}/missing.csv' does not exist"),
    (["--data", "{root}/adir"], "data directory '{root}/adir' holds no Parquet (.parquet) or CSV (.csv) files"),
    (["--data", "{root}/nomatch*.parquet"], "data.source '{root}/nomatch*.parquet' matches no Parquet or CSV"),
    (["--data", "{root}/good.csv/x.csv"], "data file '{root}/good.csv/x.csv' does not exist"),
    (["--data", "{root}/twoschemas"], "data file '{root}/twoschemas/b.parquet' lacks column(s) b (unlike"),
    (["--data", "{root}/twoformats"], "data.source '{root}/twoformats' mixes Parquet and CSV files"),
    (["--data", "s3://raydeep-absent/data/?endpoint_override=127.0.0.1:9&scheme=http"],
     "data.source 's3://raydeep-absent/data/?endpoint_override=127.0.0.1:9&scheme=http' cannot be reached"),
    (["--data", "gs://raydeep-absent/data/"], "data.source 'gs://raydeep-absent/data/' cannot be reached: no Google"),
    (["--data", "nosuch://x/data/"], "data.source 'nosuch://x/data/' cannot be opened: Unrecognized filesystem"),
    (["--data", "s3://"], "data.source 's3://' names no bucket (e.g. s3://BUCKET/data/)"),
    (["--set", "data.standardize=maybe"], "config key 'data.standardize' expects bool, got 'maybe'"),
    (["--set", "tracking.figures=2"], "config key 'tracking.figures' expects bool, got 2"),
    (["--data", "{root}/data.json"], "is not Parquet (.parquet) or CSV (.csv)"),
    (["--data", "{root}/data.xlsx"], "is not Parquet (.parquet) or CSV (.csv)"),
    (["--data", "{root}/empty.csv"], "is not a readable CSV file: Empty CSV file"),
    (["--data", "{root}/header.csv"], "has no rows (only a header: a, b, label)"),
    (["--data", "{root}/ragged.csv"], "is not a readable CSV file: CSV parse error"),
    (["--data", "{root}/text.csv"], "has non-numeric feature columns: a"),
    (["--data", "{root}/nan.csv"], "has missing or NaN feature values"),
    (["--val-data", "{root}/good.csv"], "data.val_source needs data.source to be a table too: digits is"),
    (["--data", "{root}/good.csv", "--test-data", "{root}/adir"], "data directory '{root}/adir' holds no Parquet"),
    (["--data", "{root}/good.csv", "--test-data", "{root}/nomatch*.parquet"],
     "data.test_source '{root}/nomatch*.parquet' matches no Parquet or CSV file"),
    (["--data", "{root}/good.csv", "--val-data", "{root}/text.csv"], "has non-numeric feature columns: a"),
    (["--data", "{root}/good.csv", "--val-data", "{root}/oneclass.csv"],
     "data.val_source '{root}/oneclass.csv': label column 'label' holds 7, which the training data"),
    (["--data", "{root}/good.csv", "--test-data", "{root}/nolabel.csv"], "has no label column 'label'"),
    (["--data", "{root}/inf.csv"], "has infinite feature values"),
    (["--data", "{root}/oneclass.csv"], "label column 'label' holds fewer than 2 classes (only 7)"),
    (["--data", "{root}/nolabel.csv"], "has no label column 'label' (columns: a, b, c); set --label"),
    (["--data", "{root}/onlylabel.csv"], "has no feature columns beside 'label'"),
    (["--data", "{root}/nulllabel.csv"], "has missing values in label column 'label'"),
    (["--data", "{root}/good.csv", "--set", "data.label="], "has no label column ''"),
    (["--data", "{root}/corrupt.parquet"], "is not a readable Parquet file"),
    (["--data", "{root}/empty.parquet"], "is not a readable Parquet file"),
    (["--data", "{root}/norows.parquet"], "has no rows"),
    (["--data", "{root}/listlabel.parquet"], "label column 'label' holds list<element: int64> values"),
    (["--data", "{root}/structlabel.parquet"], "label column 'label' holds struct<x: int64> values"),
    (["--data", "{root}/textfeature.parquet"], "has non-numeric feature columns: a"),
    (["--data", "{root}/mixedlist.parquet"], "has non-numeric feature columns: b"),
    (["--data", "{root}/inf.parquet"], "has infinite feature values"),
    (["--data", "{root}/beyondfloat32.parquet"], "values beyond float32's range"),
    (["--data", "{root}/null.parquet"], "has missing or NaN feature values"),
    (["--data", "{root}/nanlist.parquet"], "has missing or NaN feature values"),
    (["--data", "{root}/raggedlist.parquet"], "list column 'x' must hold numeric lists of one length"),
    (["--data", "{root}/nulllabel.parquet"], "has missing values in label column 'label'"),
    (["--data", "{root}/nanlabel.parquet"], "has missing values in label column 'label'"),
    (["--data", "{root}/oneclass.parquet"], "holds fewer than 2 classes (only 3)"),
    (["--data", "{root}/singletons.parquet"], "4 of its 6 classes have a single example"),
    (["--data", "{root}/good.parquet", "--input-shape", "3"], "data.input_shape [3] holds 3 values"),
    (["--data", "{root}/good.parquet", "--model", "cnn"], "data.batch_size (64) exceeds the training split"),
    (["--model", "cnn", "--input-shape", "64"], "cnn needs image input (channels, height, width)"),
    (["--task", "sideways"], "data.task must be classification or regression, got 'sideways'"),
    (["--strategy", "diloco", "--sync-every", "0"], "strategy.sync_every must be >= 1, got 0"),
    (["--strategy", "diloco", "--workers", "3"], "data.batch_size (64) must be divisible by resources.workers (3)"),
    (["--strategy", "diloco", "--outer-momentum", "1"], "strategy.outer_momentum must be in [0, 1), got 1.0"),
    (["--strategy", "diloco", "--set", "strategy.push_dtype=int8"],
     "strategy.push_dtype must be float32 or bfloat16, got 'int8'"),
    (["--task", "regression"], "data.task regression needs a table with a numeric label column: digits holds"),
    (["--data", "{root}/textlabel.parquet", "--task", "regression"],
     "data.task regression needs a numeric label column, but 'label' holds string values"),
    (["--data", "{root}/target.parquet", "--model", "vae", "--batch-size", "8"],
     "model vae cannot regress a target (data.task regression): it is not a supervised predictor; these are: cnn,"),
    (["--data", "{root}/onetarget.parquet"], "label column 'label' holds one value (2.5): there is nothing to regress"),
    (["--data", "{root}/inftarget.parquet"], "label column 'label' holds infinite values"),
    (["--stream"], "data.stream needs data.source to be a table (Parquet or CSV files): digits is generated"),
    (["--stream", "maybe"], "config key 'data.stream' expects bool, got 'maybe'"),
    (["--data", "{root}/good.parquet", "--stream", "--strategy", "lbfgs", "--set", "strategy.batch_size=32"],
     "lbfgs on a streamed table (data.stream) takes every training row as its objective"),
    (["--data", "{root}/norows.parquet", "--stream"], "has no rows"),
    (["--data", "{root}/twoschemas", "--stream"], "data file '{root}/twoschemas/b.parquet' lacks column(s) b (unlike"),
    (["--data", "{root}/nanlabel.parquet", "--stream"], "has missing values in label column 'label'"),
    (["--data", "{root}/good.parquet", "--val-data", "{root}/textlabel.parquet"],
     "label column 'label' holds 'x', 'y', which the training data"),
]

STORES_AND_NAMES = [
    (["--storage-path", ""], "resources.storage_path must not be empty"),
    (["--storage-path", "{root}/good.csv"], "'{root}/good.csv' is a file, not a directory"),
    (["--storage-path", "{root}/good.csv/runs"], "'{root}/good.csv' is a file, not a directory"),
    (["--storage-path", "{unwritable}/runs"], "resources.storage_path '{unwritable}/runs' cannot be written"),
    (["--storage-path", "file://elsewhere/runs"], "a file URI names a directory of this machine"),
    (["--storage-path", "nosuch://x/y"], "'nosuch://x/y' cannot be opened: Unrecognized filesystem type"),
    (["--storage-path", "s3://"], "resources.storage_path 's3://' names no bucket"),
    (["--storage-path", "s3:///runs"], "cannot be opened: Missing bucket name in S3 URI"),
    (["--storage-path", "s3://raydeep-absent/runs?endpoint_override=127.0.0.1:9&scheme=http"],
     "cannot be reached: When getting information for bucket 'raydeep-absent'"),
    (["--storage-path", "s3://raydeep-absent/runs?bogus_option=1"], "Unexpected query parameter in S3 URI"),
    # a GCS client without credentials looks for a metadata server for minutes
    (["--storage-path", "gs://raydeep-absent/runs"], "cannot be reached: no Google Cloud credentials"),
    (["--tracking-uri", "mlflow.db"], "tracking.uri 'mlflow.db' is not a URI"),
    (["--set", "tracking.uri="], "tracking.uri '' is not a URI"),
    (["--tracking-uri", "file:///tmp/mlruns"], "MLflow 3 refuses file stores; use a SQLite file"),
    (["--tracking-uri", "sqlite:////no/such/dir/m.db"], "the directory '/no/such/dir' does not exist"),
    (["--tracking-uri", "sqlite:///{root}/good.csv/m.db"], "the directory '{root}/good.csv' does not exist"),
    (["--tracking-uri", "sqlite:///{root}"], "'{root}' is a directory; name a file in it"),
    (["--tracking-uri", "sqlite://m.db"], "a SQLite URI has three slashes"),
    (["--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers at http://127.0.0.1:9"),
    (["--tracking-uri", "http://no-such-host.invalid:5000"], "no MLflow server answers at http://no-such-host"),
    (["--tracking-uri", "htp://127.0.0.1:5000"], "'htp' is not a store MLflow opens"),
    (["--tracking-uri", "postgresql://u:secret@127.0.0.1/db"], "needs the psycopg2-binary package"),
    (["--tracking-uri", "mysql://u:secret@127.0.0.1/db"], "'mysql://u:***@127.0.0.1/db' needs the pymysql"),
    (["--experiment", ""], "tracking.experiment must not be empty"),
    (["--run-name", "../escape"], "tracking.run_name '../escape' must be a plain name"),
    (["--run-name", ".."], "tracking.run_name '..' must be a plain name"),
    (["--run-name", "."], "tracking.run_name '.' must be a plain name"),
    (["--run-name", "a/b"], "tracking.run_name 'a/b' must be a plain name"),
    (["--run-name", "a\\b"], "must be a plain name"),
    (["--run-name", " padded"], "tracking.run_name ' padded' must be a plain name"),
    (["--resume", "nosuch"], "--resume 'nosuch': no run of that name under {cwd}/raydeep_runs"),
    (["--resume"], "--resume: no earlier run under {cwd}/raydeep_runs"),
    (["--storage-path", "{root}/store", "--resume", ".."], "--resume '..': no run of that name"),
    (["--storage-path", "{root}/store", "--resume", "broken"], "broken: its raydeep_run.json is missing or damaged"),
    (["--storage-path", "{root}/store", "--resume", "noconfig"], "noconfig: its raydeep_run.json holds no run config"),
    (["--storage-path", "{root}/store", "--resume", "listed"], "listed: its raydeep_run.json is damaged"),
    (["--storage-path", "{root}/store", "--resume", "saved", "--model", "cnn"],
     "--resume saved: the run was trained with model.name=mlp, this command asks for model.name=cnn"),
    (["--storage-path", "{root}/store", "--resume", "saved", "--lr", "0.5"],
     "the run was trained with optim.lr=0.05, this command asks for optim.lr=0.5"),
    (["--storage-path", "{root}/store", "--resume", "saved", "--strategy", "ps"],
     "the run was trained with strategy.name=local"),
    # the MLflow run the marker names is looked up before Ray starts (a `ps` run starts it)
    (["--storage-path", "{root}/store", "--resume", "savedps"],
     f"--resume: the run's MLflow run {'0' * 32} is not in the tracking store sqlite:///{{cwd}}/mlflow.db, "
     "which does not exist"),
    (["--storage-path", "{root}/store", "--resume", "savedps", "--tracking-uri", "sqlite:///{root}/other.db"],
     f"--resume: the run's MLflow run {'0' * 32} is not in the tracking store sqlite:///{{root}}/other.db "
     "(pass the --tracking-uri it was recorded in)"),
]

USER_CODE = {
    "badnets.py": (
        "import math\nfrom torch import nn\nWIDTH = 3\n\n"
        "class NotAModule:\n    pass\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, input_shape, num_classes, width: int = 8):\n"
        "        super().__init__()\n        self.f = nn.Linear(math.prod(input_shape), num_classes)\n"
        "    def forward(self, x):\n        return self.f(x.flatten(1))\n\n"
        "class Wrong(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.f = nn.Linear(10, 2)\n    def forward(self, x):\n        return self.f(x)\n\n"
        "def needs_hidden(input_shape, num_classes, hidden):\n    return Net(input_shape, num_classes)\n\n"
        "def not_a_module(input_shape, num_classes):\n    return 42\n"),
    "raisesnets.py": "raise RuntimeError('no GPU driver here')\n",
    "twomodels.yaml": "model: {name: mlp, class_path: 'badnets:Net'}\n",
    "initlist.yaml": "model: {class_path: 'badnets:Net', init_args: [1]}\n",
}
CODE = ["--code-dir", "{root}/code"]
USER_MODELS = [  # a user's model by import path: refused before Ray, as the families are
    (["--model", "nosuchnets:Net", *CODE], "model.class_path 'nosuchnets:Net': cannot import 'nosuchnets'"),
    (["--model", "badnets:Missing", *CODE], "module 'badnets' has no attribute 'Missing'"),
    (["--model", "badnets:WIDTH", *CODE], "'badnets:WIDTH' is an int, not an nn.Module class"),
    (["--model", "badnets:NotAModule", *CODE], "'badnets:NotAModule' is a class that is not an nn.Module"),
    (["--model", "raisesnets:Net", *CODE],
     "importing 'raisesnets' failed: RuntimeError: no GPU driver here"),
    (["--model", "badnets:Net", *CODE, "--set", "model.init_args.depth=2"],
     "unknown config key 'model.init_args.depth': badnets:Net takes no argument 'depth' "
     "(it takes: input_shape, num_classes, width)"),
    (["--model", "badnets:Net", *CODE, "--set", "model.init_args.width=wide"],
     "config key 'model.init_args.width' expects int, got 'wide'"),
    (["--model", "badnets:needs_hidden", *CODE], "badnets:needs_hidden needs model.init_args.hidden"),
    (["--model", "badnets:not_a_module", *CODE],
     "model not_a_module (input shape [1, 8, 8]): badnets:not_a_module returned an int, not an nn.Module"),
    (["--model", "badnets:Wrong", *CODE], "model Wrong (input shape [1, 8, 8]): mat1 and mat2 shapes cannot"),
    (["--model", "badnets:Net", *CODE, "--strategy", "pipeline"],
     "model Net cannot be cut into pipeline stages: it has no pipeline_layers()"),
    (["--model", "badnets:Net", *CODE, "--set", "model.width=3"],
     "unknown config key 'model.width' for a model given by import path"),
    (["--model", "models.mine:Net"], "'models' is the name of one of raydeep's own packages"),
    (["--model", "badnets:Net", "--code-dir", "{root}/nosuchdir"], "model.code_dir '{root}/nosuchdir' is not a directory"),
    (["{root}/code/twomodels.yaml", *CODE], "model.name 'mlp' and model.class_path 'badnets:Net' are both set"),
    (["{root}/code/initlist.yaml", *CODE], "config key 'model.init_args' must be a mapping, got [1]"),
]

TUNE = [
    ([], "the following arguments are required: config"),
    (["{root}/missing.yaml"], "config file '{root}/missing.yaml' does not exist"),
    (["{root}/adir.yaml"], "does not exist (it is a directory)"),
    (["{root}/binary.yaml"], "is not text (not UTF-8)"),
    (["{root}/list.yaml"], "must hold a mapping, got list"),
    (["{root}/empty.yaml"], "space must map run-config keys to distributions"),
    (["{root}/s-unknown.yaml"], "unknown key 'bogus' (known: base, space, metric"),
    (["{root}/s-nospace.yaml"], "space must map run-config keys to distributions"),
    (["{root}/s-spacelist.yaml"], "space must map run-config keys to distributions"),
    (["{root}/s-baddist.yaml"], "space.optim.lr: unknown distribution 'normal'"),
    (["{root}/s-twodist.yaml"], "space.optim.lr must be one of {choice, grid"),
    (["{root}/s-emptychoice.yaml"], "space.optim.lr: choice needs a non-empty list, got []"),
    (["{root}/s-uniform3.yaml"], "space.optim.lr: uniform needs [low, high] numbers, got [0.1, 0.2, 0.3]"),
    (["{root}/s-uniformtext.yaml"], "uniform needs [low, high] numbers, got ['a', 'b']"),
    (["{root}/s-lowhigh.yaml"], "space.optim.lr: low (0.5) > high (0.1)"),
    (["{root}/s-logzero.yaml"], "space.optim.lr: loguniform needs low > 0, got 0"),
    (["{root}/s-inf.yaml"], "uniform needs [low, high] numbers, got [0.1, inf]"),
    (["{root}/s-randfloat.yaml"], "space.optim.epochs: randint needs integers, got [1.5, 3]"),
    (["{root}/s-randequal.yaml"], "space.optim.epochs: low (2) >= high (2)"),
    (["{root}/s-badkey.yaml"], "space.optim.bogus = 1: unknown config key 'optim.bogus'"),
    (["{root}/s-badvalue.yaml"], "space.optim.lr = -1: optim.lr must be > 0, got -1.0"),
    (["{root}/s-badmodel.yaml"], "space.model.name = 'nosuch': unknown model 'nosuch'"),
    (["{root}/s-nometric.yaml"], "metric '' is not reported per epoch here (reported: train_loss"),
    (["{root}/s-badmetric.yaml"], "metric 'bogus' is not reported per epoch here"),
    (["{root}/s-badmode.yaml"], "mode must be min or max, got 'up'"),
    (["{root}/s-samples0.yaml"], "samples must be an integer >= 1, got 0"),
    (["{root}/s-samplestext.yaml"], "samples must be an integer >= 1, got 'two'"),
    (["{root}/s-scheduler.yaml"], "scheduler 'hyperband' is unknown (known: fifo, asha, pbt)"),
    (["{root}/s-schedulerlist.yaml"], "scheduler must be a name (fifo, asha, pbt) or a mapping with one"),
    (["{root}/s-grace0.yaml"], "scheduler.grace_period must be an integer >= 1, got 0"),
    (["{root}/s-gracetext.yaml"], "scheduler.grace_period must be an integer >= 1, got 'two'"),
    (["{root}/s-reduction1.yaml"], "scheduler.reduction_factor must be a number > 1, got 1"),
    (["{root}/s-maxt.yaml"], "scheduler.grace_period (5) exceeds scheduler.max_t (2)"),
    (["{root}/s-ashaextra.yaml"], "scheduler.bogus is not a setting of asha"),
    (["{root}/s-quantile.yaml"], "scheduler.quantile_fraction must be in (0, 0.5]"),
    (["{root}/s-interval0.yaml"], "scheduler.perturbation_interval must be an integer >= 1, got 0"),
    (["{root}/s-synch.yaml"], "scheduler.synch must be true or false, got 'maybe'"),
    (["{root}/s-mutate.yaml"], "scheduler.mutate names keys outside the space: ['optim.momentum']"),
    (["{root}/s-search.yaml"], "search 'bayes' is unknown (known: random, optuna)"),
    (["{root}/s-seedtext.yaml"], "search.seed must be an integer >= 0, got 'abc'"),
    (["{root}/s-seedneg.yaml"], "search.seed must be an integer >= 0, got -1"),
    (["{root}/s-optunagrid.yaml"], "grid axes need search random"),
    (["{root}/s-seedsone.yaml"], "seeds must list two or more different integers >= 0, got [3]"),
    (["{root}/s-seedsasha.yaml"], "seeds need scheduler fifo: asha stops or copies trials"),
    (["{root}/s-trialcpus.yaml"], "trial.cpus must be > 0 and trial.gpus >= 0"),
    (["{root}/s-trialkey.yaml"], "trial must be a mapping with cpus and/or gpus"),
    (["{root}/s-concurrent.yaml"], "max_concurrent must be an integer >= 1, got 0"),
    (["{root}/s-basebad.yaml"], "base: optim.lr must be > 0, got -1.0"),
    (["{root}/s-baselist.yaml"], "base must be a run config mapping, got [1]"),
    (["{root}/s-escape.yaml"], "name '../outside' must be a plain name"),
    ([MLP, "--samples", "0"], "samples must be an integer >= 1, got 0"),
    ([MLP, "--samples", "abc"], "argument --samples: invalid int value: 'abc'"),
    ([MLP, "--scheduler", "hyperband"], "scheduler 'hyperband' is unknown"),
    ([MLP, "--search", "bayes"], "search 'bayes' is unknown"),
    ([MLP, "--search", "optuna"], "grid axes need search random"),
    ([MLP, "--max-concurrent", "0"], "max_concurrent must be an integer >= 1, got 0"),
    ([MLP, "--max-concurrent", "x"], "argument --max-concurrent: invalid int value: 'x'"),
    ([MLP, "--resume", "nosuch"], "--resume 'nosuch': no sweep of that name"),
    ([MLP, "--resume"], "--resume: no earlier sweep under"),
    ([MLP, "--lr", "inf"], "base: config key 'optim.lr' must be a finite number"),
    ([MLP, "--model", "nosuch"], "base: unknown model 'nosuch'"),
    ([MLP, "--set", "optim.momentum=2"], "base: optim.momentum must be in [0, 1), got 2.0"),
    ([MLP, "--seed", "-1"], "base: seed must be an integer in 0..4294967295, got -1"),
    ([MLP, "--run-name", "a/b"], "base: tracking.run_name 'a/b' must be a plain name"),
    ([MLP, "--data", "{root}/header.csv"], "has no rows (only a header: a, b, label)"),
    ([MLP, "--data", "{root}/adir"], "data directory '{root}/adir' holds no Parquet"),
    ([MLP, "--storage-path", "{root}/good.csv"], "'{root}/good.csv' is a file, not a directory"),
    ([MLP, "--storage-path", "gs://raydeep-absent/runs"], "no Google Cloud credentials"),
    ([MLP, "--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers at http://127.0.0.1:9"),
    ([MLP, "--print-schedule"], "unrecognized arguments: --print-schedule"),
]

UI = [
    (["--port", "70000"], "--port must be in 1..65535, got 70000"),
    (["--port", "0"], "--port must be in 1..65535, got 0"),
    (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
    (["--host", ""], "--host must not be empty"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 would let other machines read and write the runs"),
    (["--host", "no-such-host.invalid", "--allow-remote"], "is not an address of this machine"),
    (["--host", "10.255.255.1", "--allow-remote"], "cannot listen on 10.255.255.1:5000"),
    (["--allow-remote=yes"], "argument --allow-remote: ignored explicit argument 'yes'"),
    (["--tracking-uri", "mlflow.db"], "tracking.uri 'mlflow.db' is not a URI"),
    (["--tracking-uri", "file:///tmp/mlruns"], "MLflow 3 refuses file stores"),
    (["--tracking-uri", "htp://x"], "'htp' is not a store MLflow opens"),
    (["--tracking-uri", "sqlite:////no/such/dir/m.db"], "the directory '/no/such/dir' does not exist"),
    # mlflow server would take a server's address for a store and fail after its start-up
    (["--tracking-uri", "http://127.0.0.1:9"], "'http://127.0.0.1:9' is an MLflow server, not a store to serve"),
]

OTHER = [
    (["nosuch"], "argument command: invalid choice: 'nosuch'"),
    (["models", "extra"], "unrecognized arguments: extra"),
    (["strategies", "--x"], "unrecognized arguments: --x"),
]

CASES = ([(["run", *a], m) for a, m in RUN_FLAGS + SET_KEYS + RUN_FILES_CASES + DATA + STORES_AND_NAMES
          + USER_MODELS]
         + [(["tune", *a], m) for a, m in TUNE] + [(["ui", *a], m) for a, m in UI] + OTHER)


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a).replace(f"{REPO}/", "")[:80] for a, _ in CASES])
def test_bad_input_is_one_line_before_ray(files, tmp_path, args, message):
    _refused(files, tmp_path, args, message)


def test_the_table_is_wide():
    """At least 125 distinct bad inputs, each command and each kind of input among them."""
    assert len({tuple(a) for a, _ in CASES}) == len(CASES) >= 125
    assert {a[0] for a, _ in CASES} >= {"run", "tune", "ui"}


@pytest.fixture
def taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_port_in_use_is_refused(files, tmp_path, taken_port):
    _refused(files, tmp_path, ["ui", "--port", str(taken_port)], f"cannot listen on 127.0.0.1:{taken_port}")


def test_a_file_uri_is_a_local_store(files, tmp_path):
    """`file:///dir` is the directory /dir (it once read as an object store with bucket ''):
    the store is opened and searched as that directory."""
    from pipelines import config

    store = tmp_path / "runs"
    loaded = config.load(overrides={"resources.storage_path": f"file://{store}"})
    assert loaded.resources.storage_path == str(store)
    _refused(files, tmp_path, ["run", "--storage-path", f"file://{store}", "--resume", "nosuch"],
             "--resume 'nosuch': no run of that name under {cwd}/runs")


def _refused(files, cwd, args, message):
    """Run `raydeep ARGS` in the empty directory `cwd` ({root}: the files, {cwd}: it)."""
    root, unwritable = files

    def fill(text: str) -> str:  # not str.format: messages hold braces of their own
        return (text.replace("{root}", str(root)).replace("{cwd}", str(cwd))
                .replace("{unwritable}", str(unwritable)))

    args = [fill(a) for a in args]
    # A check that regressed into a hang (a store client retrying for minutes, a server
    # started) ends the session with every thread's stack instead of waiting without end.
    faulthandler.dump_traceback_later(60 * SECONDS_PER_CASE, exit=True)
    ray_before = _ray_running()  # the session's Ray may be up already (tests/strategies ran first)
    started = time.monotonic()
    try:
        result = run_cli(*args, cwd=cwd)
    finally:
        faulthandler.cancel_dump_traceback_later()
    took = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
    assert lines[0].startswith("raydeep: error: ") and fill(message) in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    assert took < SECONDS_PER_CASE, f"{args} took {took:.1f} s"
    assert not list(cwd.iterdir()), "a refused command wrote into its working directory"
    assert not list(root.glob("**/.raydeep-probe-*"))  # the storage check leaves nothing behind
    assert _ray_running() == ray_before, "a bad input started Ray"


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
