"""The optimizer's settings: learning-rate schedules (every step's lr equals torch's own
schedulers for the same settings, and an optimizer's saved state carries its place in the
schedule) and mixed precision (bf16 autocast, what each strategy refuses)."""
import pytest
import torch
from torch.optim import lr_scheduler

from pipelines.config import ConfigError, from_dict, validate
from pipelines.optim_config import OptimSection
from pipelines.training.loop import make_optimizer, restore_optimizer

PER_EPOCH, EPOCHS = 5, 6


def torch_reference(section: OptimSection, optimizer):
    """torch's schedulers for the same settings, chained as users would chain them."""
    total, warmup = EPOCHS * PER_EPOCH, round(section.warmup_epochs * PER_EPOCH)
    main = {"cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=section.min_lr),
            "step": lambda: lr_scheduler.StepLR(optimizer, step_size=section.lr_step_epochs * PER_EPOCH,
                                                gamma=section.lr_gamma),
            "constant": lambda: lr_scheduler.ConstantLR(optimizer, factor=1.0)}[section.schedule]
    if not warmup:
        return main()
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main()], milestones=[warmup])


def rates(optimizer, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps ran with (read after the step: ours sets it before)."""
    param = optimizer.param_groups[0]["params"][0]
    seen = []
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        optimizer.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


@pytest.mark.parametrize("settings", [
    {"schedule": "cosine"},
    {"schedule": "cosine", "warmup_epochs": 2, "min_lr": 0.001},
    {"schedule": "step", "lr_step_epochs": 2, "lr_gamma": 0.5},
    {"schedule": "step", "warmup_epochs": 1.4, "lr_step_epochs": 1},
    {"schedule": "constant", "warmup_epochs": 1},
])
def test_every_steps_lr_is_torchs(settings):
    section = OptimSection(lr=0.1, epochs=EPOCHS, **settings)
    ours = make_optimizer(section, [torch.nn.Parameter(torch.zeros(3))], updates_per_epoch=PER_EPOCH)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    scheduler = torch_reference(section, reference_opt)
    expected = []
    for _ in range(EPOCHS * PER_EPOCH):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        scheduler.step()
    # torch's chainable forms multiply factors step by step (30 float64 roundings); the
    # closed forms here agree to a few ulps of 0.1 per step: 1e-12 is thousands of ulps
    assert rates(ours, EPOCHS * PER_EPOCH) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_a_restored_optimizer_goes_on_where_it_stopped_and_takes_its_own_lr():
    section = OptimSection(lr=0.1, epochs=EPOCHS, schedule="cosine", warmup_epochs=1)
    whole = rates(make_optimizer(section, [torch.nn.Parameter(torch.zeros(2))], PER_EPOCH), 20)
    first = make_optimizer(section, [torch.nn.Parameter(torch.zeros(2))], PER_EPOCH)
    rates(first, 8)
    resumed = make_optimizer(section, [torch.nn.Parameter(torch.zeros(2))], PER_EPOCH)
    restore_optimizer(resumed, first.state_dict(), section)
    assert rates(resumed, 12) == whole[8:]
    # a PBT trial restored from another's checkpoint keeps the count but follows its own lr
    perturbed = OptimSection(lr=0.2, epochs=EPOCHS, schedule="cosine", warmup_epochs=1)
    other = make_optimizer(perturbed, [torch.nn.Parameter(torch.zeros(2))], PER_EPOCH)
    restore_optimizer(other, first.state_dict(), perturbed)
    assert rates(other, 1) == [pytest.approx(2 * whole[8])]


def test_a_staleness_scale_multiplies_the_scheduled_rate_and_no_count_means_constant():
    section = OptimSection(lr=0.1, epochs=2, schedule="step", lr_step_epochs=1, lr_gamma=0.5)
    optimizer = make_optimizer(section, [torch.nn.Parameter(torch.zeros(2))], updates_per_epoch=2)
    optimizer.param_groups[0]["lr_scale"] = 0.25  # a ps shard's push of staleness 3
    assert rates(optimizer, 3) == pytest.approx([0.025, 0.025, 0.0125])
    phase = make_optimizer(section, [torch.nn.Parameter(torch.zeros(2))])  # pre-training: no schedule
    assert rates(phase, 5) == [0.1] * 5


@pytest.mark.parametrize("optim, message", [
    ({"schedule": "linear"}, "optim.schedule must be one of constant, cosine, step, plateau, got 'linear'"),
    ({"schedule": "plateau", "lr_patience": -1}, "optim.lr_patience must be >= 0, got -1"),
    ({"schedule": "plateau", "plateau_threshold": 1}, r"optim.plateau_threshold must be in \[0, 1\), got 1"),
    ({"warmup_epochs": 10}, r"optim.warmup_epochs must be in \[0, optim.epochs = 10\), got 10"),
    ({"min_lr": 1.0}, r"optim.min_lr must be in \[0, optim.lr\], got 1.0"),
    ({"lr_gamma": 0}, r"optim.lr_gamma must be in \(0, 1\], got 0"),
])
def test_bad_schedules_are_one_line(optim, message):
    with pytest.raises(ConfigError, match=message):
        validate(from_dict({"optim": optim}))


@pytest.mark.parametrize("metric, values, settings", [
    # down, flat, back up, nan (never better), a new best: every branch of torch's step
    ("val_loss", [1.0, 0.9, 0.95, 0.95, 0.94, 0.8, float("nan"), 0.9, 0.9, 0.7, 0.71, 0.72], {}),
    ("val_accuracy", [0.5, 0.6, 0.6, 0.59, 0.61, 0.61, 0.62, 0.62, 0.62], {"lr_patience": 1}),
    # patience 0, a floor reached after two cuts, then held there
    ("val_loss", [1.0] * 7, {"lr_patience": 0, "lr_gamma": 0.5, "min_lr": 0.02}),
    ("val_loss", [3.0, 2.9999, 2.9999, 2.9, 2.8999], {"lr_patience": 0, "plateau_threshold": 0.01}),
])
def test_plateau_lowers_the_rate_as_torchs_reduce_lr_on_plateau_and_resumes_where_it_was(metric, values, settings):
    from pipelines.training.schedule import observe

    section = OptimSection(lr=0.1, epochs=len(values) + 1, schedule="plateau", plateau_metric=metric, **settings)
    ours = make_optimizer(section, [torch.nn.Parameter(torch.zeros(3))], updates_per_epoch=PER_EPOCH)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    scheduler = lr_scheduler.ReduceLROnPlateau(
        reference_opt, mode="max" if "accuracy" in metric else "min", factor=section.lr_gamma,
        patience=section.lr_patience, threshold=section.plateau_threshold, min_lr=section.min_lr)
    expected, seen, half = [], [], len(values) // 2
    for epoch, value in enumerate(values):
        if epoch == half:  # resumed from this epoch's checkpoint: the judgement goes on
            resumed = make_optimizer(section, [torch.nn.Parameter(torch.zeros(3))], updates_per_epoch=PER_EPOCH)
            restore_optimizer(resumed, ours.state_dict(), section)
            ours = resumed
        seen += rates(ours, PER_EPOCH)
        expected += [reference_opt.param_groups[0]["lr"]] * PER_EPOCH
        observe(ours.param_groups, section, {metric: value})
        scheduler.step(value)
    assert len(set(expected)) > 1, "the reference never lowered the rate: the test would prove nothing"
    # torch multiplies the lr by the factor; ours multiplies a factor and then the lr: each
    # cut one float64 rounding more, a few ulps after the handful of cuts here
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)


def test_plateau_is_refused_where_no_epoch_end_judges_it():
    for strategy, message in (("ps", "ps shards apply pushes on the workers' own clocks"),
                              ("diloco", "diloco validates only where a round ends with an epoch")):
        with pytest.raises(ConfigError, match=message):
            from_dict({"strategy": {"name": strategy}, "optim": {"schedule": "plateau"}})


def test_lbfgs_refuses_a_schedule():
    with pytest.raises(ConfigError, match="lbfgs takes its step lengths from its line search"):
        from_dict({"strategy": {"name": "lbfgs"}, "optim": {"schedule": "cosine"}})


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_weights():
    from pipelines.training.loop import Objective, train_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    section = OptimSection(lr=0.1, epochs=1)
    optimizer = make_optimizer(section, model.parameters())

    class Loss(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def loss(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

    batches = [(torch.randn(16, 8), torch.randint(0, 4, (16,)))]
    train_epoch(Objective(Loss(model)), optimizer, batches, precision="bf16")
    assert seen == [torch.bfloat16] and model[0].weight.dtype == torch.float32
    assert model[0].weight.grad is None or model[0].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("raw, message", [
    ({"optim": {"precision": "fp16"}}, "optim.precision fp16 needs a GPU"),
    ({"optim": {"precision": "fp8"}}, "optim.precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"optim": {"precision": "bf16"}, "strategy": {"name": "lbfgs"}}, "optim.precision bf16 does not apply"),
    ({"optim": {"precision": "fp16"}, "resources": {"gpus_per_worker": 1}, "strategy": {"name": "ps"}},
     "optim.precision fp16 is refused under ps, use bf16"),
    ({"optim": {"precision": "fp16"}, "resources": {"gpus_per_worker": 1}, "strategy": {"name": "pipeline"}},
     "optim.precision fp16 is refused under pipeline, use bf16"),
])
def test_precisions_a_strategy_cannot_take_are_one_line(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_accumulated_batches_take_the_step_of_their_union():
    """Two batches of 16 added up (each loss halved) give the step one batch of 32 gives,
    and a short last group steps on the mean of its own batches."""
    from pipelines.training.loop import Objective, train_epoch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(5, 3)

        def loss(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.linear(x), y)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(80, 5, generator=g), torch.randint(0, 3, (80,), generator=g)
    section = OptimSection(lr=0.1, momentum=0.0, epochs=1)

    def train(batches, accumulate):
        net = Net()
        optimizer = make_optimizer(section, net.parameters())
        train_epoch(Objective(net), optimizer, batches, accumulate=accumulate)
        return net.linear.weight.detach(), optimizer.param_groups[0]["update"]

    halves = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 80, 16)]  # 5 batches: 2 + 2 + 1
    whole = [(x[0:32], y[0:32]), (x[32:64], y[32:64]), (x[64:80], y[64:80])]
    accumulated, steps = train(halves, 2)
    reference, reference_steps = train(whole, 1)
    assert steps == reference_steps == 3
    # the mean of two half-batch means against one mean over 32: another summation order in
    # float32, a few ulps of weights of size ~0.5 (1e-6 is ten of them); a missing half is off by O(lr)
    torch.testing.assert_close(accumulated, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy, message", [
    ("ps", "accumulate them with strategy.n_push"), ("pipeline", "a pipeline step already accumulates"),
    ("diloco", "diloco's rounds count inner steps"), ("lbfgs", "optim.accumulate does not apply"),
])
def test_strategies_with_their_own_accumulation_refuse_it(strategy, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"strategy": {"name": strategy}, "optim": {"accumulate": 2}})


def test_a_long_epoch_says_how_far_it_is_at_most_every_interval():
    from pipelines.training.progress import EpochProgress

    lines, now = [], [0.0]
    progress = EpochProgress(lines.append, epoch=2, epochs=10, steps=200, world=2, every_s=20.0,
                             clock=lambda: now[0])
    for step, t in enumerate([5.0, 19.9, 20.0, 30.0, 41.0], start=1):
        now[0] = t
        progress(step * 10, step * 640)
    # lines at 20 s (30 of 200 steps, 1,920 rows a worker) and 41 s (20 s after it)
    assert lines == ["epoch 3/10  15% (30 of 200 steps)  rows/s 192", "epoch 3/10  25% (50 of 200 steps)  rows/s 156"]
    silent = EpochProgress(None, 0, 1, 10)
    silent(1, 1)  # another rank's: says nothing
