"""The default recipes reach the references with no flags but `--model` (under `local`):
a user's first command gets what the families can do, not the schema's one set of defaults.
The goals are the issue's (#19), not figures copied from a run: a CNN at 0.99 on digits (an
RBF SVC's 0.992), a GRU at 0.97, an RBM's pseudo-likelihood at scikit-learn's BernoulliRBM
with 100 units (-14.2 nats), a VAE's ELBO at -60 nats. The MLP's recipe is held to its 0.98
(less two standard errors of one split's accuracy) under every strategy, allreduce by the main
job (tests/system/test_cli.py); the SAE's and DBN's 0.98, which their recipes reach on the mean
over seeds but not on every split, are in the README's table (benchmarks/recipes.py), not here."""
import math

import pytest
from mlflow.tracking import MlflowClient

import pipelines
from pipelines import config, data

pytestmark = pytest.mark.slow  # four families and five strategies: about a minute

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


def test_the_mlps_defaults_reach_its_goal_under_every_strategy(ray_session, store):
    """Issue 19's 0.98 for the MLP, under each strategy's recipe (allreduce's is the main
    job's, tests/system/test_cli.py). One seed's test split is 360 images, whose accuracy has
    a binomial standard error of sqrt(p(1-p)/n) = 0.0074 at p = 0.98: the bar is the goal less
    two of them, so that a split that is harder by chance does not fail a recipe whose mean
    over seeds meets the goal (benchmarks/recipes.py measures that mean)."""
    goal = 0.98
    for strategy in ("local", "pipeline", "diloco", "lbfgs", "ps"):
        run = config.load(overrides={"model.name": "mlp", "strategy.name": strategy, "tracking.uri": store,
                                     "tracking.figures": False, "tracking.log_model": False})
        assert run.recipe == f"mlp/{strategy}"
        result = pipelines.train(run)
        tested = MlflowClient(store).get_run(result.run_id).data.metrics
        n = len(data.load(run.data, run.seed).y_test)
        bar = goal - 2 * math.sqrt(goal * (1 - goal) / n)
        assert result.metrics["test_accuracy"] >= bar, (strategy, result.metrics["test_accuracy"], bar)
        assert tested["test_accuracy"] == result.metrics["test_accuracy"]
