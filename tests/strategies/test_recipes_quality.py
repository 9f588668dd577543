"""The default recipes reach the references with no flags but `--model` (under `local`):
a user's first command gets what the families can do, not the schema's one set of defaults.
The goals are the issue's (#19), not figures copied from a run: a CNN at 0.99 on digits (an
RBF SVC's 0.992), a GRU at 0.97, an RBM's pseudo-likelihood at scikit-learn's BernoulliRBM
with 100 units (-14.2 nats), a VAE's ELBO at -60 nats. The MLP's recipe is exercised by the
main job (tests/system/test_cli.py); the recipes whose goals the sweeps did not reach on
every split (the MLP's and SAE's 0.98, the DBN's) are in the README's table, not here."""
import pytest
from mlflow.tracking import MlflowClient

import pipelines
from pipelines import config

pytestmark = pytest.mark.slow  # trains four families: about 45 s

GOALS = {"cnn": ("test_accuracy", 0.99), "rnn": ("test_accuracy", 0.97),
         "rbm": ("test_pseudo_likelihood", -14.2), "vae": ("test_elbo", -60.0)}


def test_each_familys_defaults_reach_its_goal_and_the_run_records_its_recipe(store):
    client = MlflowClient(store)
    for family, (metric, goal) in GOALS.items():
        run = config.load(overrides={"model.name": family, "strategy.name": "local", "tracking.uri": store,
                                     "tracking.figures": False, "tracking.log_model": False})
        result = pipelines.train(run)
        assert result.metrics[metric] >= goal, (family, metric, result.metrics[metric])
        params = client.get_run(result.run_id).data.params
        assert params["recipe"] == (f"{family}/local" if run.recipe else "None"), (family, params["recipe"])
    assert {family for family in GOALS if config.load(overrides={"model.name": family}).recipe} == {
        "cnn", "rnn", "rbm"}  # the VAE meets its goal with the schema's defaults: it has no recipe
