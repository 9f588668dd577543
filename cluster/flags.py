"""The flags of `raydeep run` and `raydeep tune` and the config keys they set (values are
parsed as the key's type)."""

RUN_FLAGS = {
    "--model": "model.name",
    "--code-dir": "model.code_dir",
    "--strategy": "strategy.name",
    "--workers": "resources.workers",
    "--gpus-per-worker": "resources.gpus_per_worker",
    "--cpus-per-worker": "resources.cpus_per_worker",
    "--num-cpus": "resources.num_cpus",
    "--address": "resources.address",
    "--storage-path": "resources.storage_path",
    "--pack": "resources.pack", "--link-mbps": "resources.link_mbps",
    "--epochs": "optim.epochs",
    "--lr": "optim.lr", "--lr-schedule": "optim.schedule",
    "--optimizer": "optim.name", "--warmup-epochs": "optim.warmup_epochs",
    "--batch-size": "data.batch_size",
    "--data": "data.source",
    "--label": "data.label", "--task": "data.task",
    "--val-data": "data.val_source", "--test-data": "data.test_source",
    "--input-shape": "data.input_shape",
    "--stream": "data.stream",
    "--tracking-uri": "tracking.uri",
    "--experiment": "tracking.experiment",
    "--run-name": "tracking.run_name",
    "--seed": "seed",
    "--shards": "strategy.shards",
    "--staleness": "strategy.staleness",
    "--ps-device": "strategy.device",
    "--stages": "strategy.stages",
    "--microbatches": "strategy.microbatches", "--virtual-stages": "strategy.virtual_stages",
    "--schedule": "strategy.schedule", "--replicas": "strategy.replicas",
    "--sync-every": "strategy.sync_every", "--outer-lr": "strategy.outer_lr",
    "--outer-momentum": "strategy.outer_momentum",
}
FLAG_ALIASES = {"--shards": ["--ps-shards"]}
"""Older spellings still taken: `--ps-shards` named `ps`'s shards before `lbfgs` had them too."""
