"""Pipeline schedules as data, checked without any process."""
import pytest

from pipelines.strategies.pipeline_parallel import actions, schedules
from pipelines.strategies.pipeline_parallel import simulation as sim
from pipelines.strategies.pipeline_parallel.actions import BACKWARD, FORWARD, V_SHAPE, WEIGHT, Action

SIZES = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 4, 8)]
PLANS = [(name, p, m, v) for name in sorted(schedules.SCHEDULES) for p, m in SIZES
         for v in ((2, 3) if name in schedules.INTERLEAVED else (schedules.FIXED_CHUNKS.get(name, 1),))
         if name not in schedules.INTERLEAVED or m % p == 0]
"""Every schedule at every size it takes: interleaving with 2 and 3 chunks per actor, where
the micro-batches come in whole groups of P; ZB-V with its 2."""


@pytest.mark.parametrize("name, stages, microbatches, virtual", PLANS)
def test_every_schedule_is_complete_ordered_and_runs_without_deadlock(name, stages, microbatches, virtual):
    schedule = schedules.build(name, stages, microbatches, virtual)
    assert len(schedule) == stages and actions.chunks(schedule) == virtual
    schedules.validate(schedule, microbatches)
    slots = sim.simulate(schedule)
    assert len(slots) == (3 if actions.splits(schedule) else 2) * stages * microbatches * virtual
    placement = actions.placement_of(schedule)

    def stage(slot) -> int:  # the model stage: chunk c of actor a is stage c*P + a, or in a V's
        return actions.stage_of(slot.stage, slot.action.chunk, stages, placement)  # odd chunks P-1-a

    end = {(stage(s), s.action.kind, s.action.microbatch): s.end for s in slots}
    assert sorted({stage(s) for s in slots}) == list(range(stages * virtual))  # every stage held once
    last = stages * virtual - 1
    for s in slots:  # the data each action needs was produced before it started
        i, here = s.action.microbatch, stage(s)
        if s.action.kind == FORWARD and here > 0:
            assert s.start >= end[(here - 1, FORWARD, i)]
        if s.action.kind == BACKWARD:
            assert s.start >= end[(here, FORWARD, i)]
            if here < last:
                assert s.start >= end[(here + 1, BACKWARD, i)]
        if s.action.kind == WEIGHT:  # after the same stage's input gradient of its micro-batch
            assert s.start >= end[(here, BACKWARD, i)]


@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_1f1b_holds_at_most_p_microbatches_where_gpipe_holds_m(stages, microbatches):
    gpipe = schedules.gpipe(stages, microbatches)
    one_f_one_b = schedules.one_f_one_b(stages, microbatches)
    for stage in range(stages):
        assert sim.peak_activations(gpipe[stage]) == microbatches
        assert sim.peak_activations(one_f_one_b[stage]) == min(stages - stage, microbatches)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, microbatches", [(2, 4), (3, 4), (4, 8)])
def test_bubble_with_equal_costs_is_the_textbook_one(name, stages, microbatches):
    slots = sim.simulate(schedules.build(name, stages, microbatches), 1.0, 1.0)
    expected = sim.theoretical_bubble(stages, microbatches)
    for fraction in sim.bubble_fraction(slots, stages):
        assert fraction == pytest.approx(expected)


def test_a_schedule_that_waits_on_itself_is_refused():
    # Stage 1 wants micro-batch 1's forward before 0's backward could ever come back to it.
    broken = [[Action(FORWARD, 0), Action(BACKWARD, 0)],
              [Action(BACKWARD, 0), Action(FORWARD, 0)]]
    with pytest.raises(ValueError, match="before its forward"):
        schedules.validate(broken, 1)
    with pytest.raises(ValueError, match="deadlocks"):
        sim.simulate(broken)


def test_unknown_schedule_and_bad_sizes_name_the_problem():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        schedules.build("zigzag", 2, 4)
    with pytest.raises(ValueError, match="microbatches >= 1"):
        schedules.gpipe(2, 0)


def test_render_draws_one_row_per_stage():
    slots = sim.simulate(schedules.one_f_one_b(2, 4), 1.0, 1.0)
    text = sim.render(slots, 2)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].split()[1:3] == ["F0", "F1"]
    assert lines[2].split()[1:3] == [".", "F0"]


@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_zb_h1_is_never_longer_than_1f1b_and_holds_what_it_holds(stages, microbatches):
    """With F = B = W = 1 unit (a fused backward 2), ZB-H1's stages hold 1F1B's micro-batches
    at most, and its makespan lies between the zero-bubble bound and 1F1B's less P-1."""
    zb, one = schedules.zb_h1(stages, microbatches), schedules.one_f_one_b(stages, microbatches)
    assert [sim.peak_activations(a) for a in zb] == [sim.peak_activations(a) for a in one]
    makespan = {name: max(s.end for s in sim.simulate(plan)) for name, plan in (("zb", zb), ("1f1b", one))}
    # No schedule beats a stage's own 3M units plus the P-1 it must wait for its first input;
    # each of the P-1 hops back through the stages waits for a B of 1 unit instead of a fused
    # backward of 2, so ZB-H1 ends at least P-1 units before 1F1B's 3(M+P-1).
    assert 3 * microbatches + stages - 1 <= makespan["zb"] <= makespan["1f1b"] - (stages - 1)
    assert makespan["1f1b"] == 3 * (microbatches + stages - 1)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_a_schedule_round_trips_through_its_text(name):
    virtual = 2 if name in schedules.INTERLEAVED else schedules.FIXED_CHUNKS.get(name, 1)
    plan = schedules.build(name, 3, 6 if virtual > 1 else 4, virtual)
    text = actions.to_text(plan)
    assert text.splitlines()[0].split()[0] == "0F0"
    assert actions.from_text("# saved\n" + text + "\n\n") == plan
    with pytest.raises(ValueError, match="'0X1' is not an action like 0F1, 1B0 or 2W3"):
        actions.from_text("0F0 0X1")
    with pytest.raises(ValueError, match="'1F0' names stage 1, but line 1 holds stage 0's actions"):
        actions.from_text("1F0")
    assert str(Action(WEIGHT, 3)) == "W3"


def test_a_split_schedule_needs_every_weight_gradient_after_its_input_gradient():
    with pytest.raises(ValueError, match="stage 0: weight gradient of micro-batch 0 before its backward"):
        schedules.validate([[Action(FORWARD, 0), Action(WEIGHT, 0), Action(BACKWARD, 0)]], 1)
    with pytest.raises(ValueError, match=r"stage 0: W of micro-batches \[0\], want 0..1"):
        schedules.validate([[Action(FORWARD, 0), Action(BACKWARD, 0), Action(WEIGHT, 0),
                             Action(FORWARD, 1), Action(BACKWARD, 1)]], 2)


def test_the_executors_split_backward_gives_the_fused_backwards_gradients():
    """B (torch's stage_backward_input, as a stage calls it) gives the input's gradient,
    W (stage_backward_weight) the weights' afterwards: the same as one fused backward."""
    import torch

    from pipelines.strategies.pipeline_parallel import stage

    split = stage._torch_backward_split()
    assert split is not None, "this torch cannot split backwards"
    stage_backward_input, stage_backward_weight = split
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, grad = torch.randn(4, 6), torch.randn(4, 3)
    fused_x = x.clone().requires_grad_()
    block(fused_x).backward(grad)
    fused = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    split_x = x.clone().requires_grad_()
    params = list(block.parameters())
    _, groups = stage_backward_input([block(split_x)], [grad], [split_x], params)
    assert all(p.grad is None for p in params)  # B computed no weight gradient
    # the same products of the same saved gradients: equal to within a float32 rounding of
    # these O(1) values (an ulp at 1 is 1.2e-7); a missing or doubled term is off by O(1)
    torch.testing.assert_close(split_x.grad, fused_x.grad, rtol=0, atol=1e-7)
    stage_backward_weight(params, groups)
    for p, expected in zip(params, fused):
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("stages, microbatches, virtual", [(2, 4, 2), (2, 8, 2), (3, 6, 2), (4, 8, 2), (4, 8, 4)])
def test_interleaving_fills_the_pipeline_v_times_faster(stages, microbatches, virtual):
    """With a chunk's forward 1/v and its backward 2/v of a stage's (a chunk holds 1/v of the
    layers), interleaved 1F1B's bubble is the paper's (P-1)/(vM + P-1) on every actor,
    1F1B's (P-1)/(M + P-1) shrunk v-fold in the pipeline's fill, for the activations of
    up to (P - a - 1) x 2 + (v - 1) x P + 1 chunks on actor a, each 1/v of a stage's."""
    plan = schedules.interleaved_1f1b(stages, microbatches, virtual)
    slots = sim.simulate(plan, 1.0 / virtual, 2.0 / virtual)
    expected = (stages - 1) / (virtual * microbatches + stages - 1)
    assert sim.theoretical_bubble(stages, microbatches, virtual) == pytest.approx(expected)
    for fraction in sim.bubble_fraction(slots, stages):
        assert fraction == pytest.approx(expected)
    one = sim.bubble_fraction(sim.simulate(schedules.one_f_one_b(stages, microbatches)), stages)
    assert max(one) > expected
    for actor, order in enumerate(plan):
        warmup = min((stages - actor - 1) * 2 + (virtual - 1) * stages, microbatches * virtual)
        assert sim.peak_activations(order) == min(warmup + 1, microbatches * virtual)


def test_interleaving_names_what_it_needs_in_one_line():
    with pytest.raises(ValueError, match=r"strategy.microbatches \(3\) must be a multiple of 2"):
        schedules.build("interleaved-1f1b", 2, 3, 2)
    with pytest.raises(ValueError, match="1f1b holds one chunk per actor: strategy.virtual_stages 2 needs"):
        schedules.build("1f1b", 2, 4, 2)
    text = actions.to_text(schedules.interleaved_1f1b(2, 4, 2))
    assert text.splitlines()[1].split()[:3] == ["1F0", "1F1", "3F0"]  # actor 1's chunk 1 is stage 3
    with pytest.raises(ValueError, match="holds 2 chunk"):
        schedules.build(text, 2, 4, 1)
    assert schedules.build(text, 2, 4, 2) == schedules.interleaved_1f1b(2, 4, 2)


@pytest.mark.parametrize("stages, microbatches", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
def test_zb_v_all_but_closes_the_bubble_at_1f1bs_memory(stages, microbatches):
    """ZB-V with F = B = W (each half a stage's, a chunk holding half its layers): an actor
    idles only while the first micro-batch comes down the V and its last gradient goes
    back up, under 1F1B's (P-1)/(M+P-1) and ZB-H1's; each actor holds at most 2P
    chunk-activations, P stages' worth, 1F1B's peak on its first stage; the model's first
    and last stages on actor 0, and actor P-1 turning the V (stages P-1 and P)."""
    plan = schedules.zb_v(stages, microbatches)
    assert actions.placement_of(plan) == V_SHAPE
    assert [actions.holder(s, stages, V_SHAPE) for s in (0, 2 * stages - 1, stages - 1, stages)] == [
        (0, 0), (0, 1), (stages - 1, 0), (stages - 1, 1)]
    slots = sim.simulate(plan, 0.5, 1.0)
    makespan = max(s.end for s in slots)
    busy = 3 * 0.5 * 2 * microbatches  # F, B, W of each micro-batch on each of 2 chunks
    # the first micro-batch reaches the V's turn after P - 1 chunk forwards, its last
    # gradient returns in as many steps: at most 2(P - 1) half-units besides the work
    assert busy <= makespan <= busy + (stages - 1) * 0.5 * 2
    zb_h1 = sim.bubble_fraction(sim.simulate(schedules.zb_h1(stages, microbatches), 1.0, 2.0), stages)
    for fraction in sim.bubble_fraction(slots, stages):
        assert fraction < min(sim.theoretical_bubble(stages, microbatches), max(zb_h1))
    for actions_of_actor in plan:
        assert sim.peak_activations(actions_of_actor) <= 2 * stages


def test_zb_v_names_what_it_needs_in_one_line_and_reads_back_from_text():
    with pytest.raises(ValueError, match=r"zb-v gives each stage 2 chunks of the model, in a V .* got 1"):
        schedules.build("zb-v", 2, 4, 1)
    text = actions.to_text(schedules.zb_v(2, 4))
    assert text.splitlines()[0].split()[:4] == ["0F0", "0F1", "0F2", "3F0"]  # actor 0: stages 0 and 3
    assert text.splitlines()[1].split()[:2] == ["1F0", "2F0"]  # actor 1 turns the V: stage 1, then 2
    assert schedules.build(text, 2, 4, 2) == schedules.zb_v(2, 4)
    assert actions.from_text(text).placement == V_SHAPE
    with pytest.raises(ValueError, match=r"'3F0' names stage 3, but line 1 holds stage 0's actions \(and its "
                                         r"chunks': stages 0, 2, 4, 6, ... in a loop, or 0, 3, 4, 7, ... in a V\)"):
        actions.from_text("0F0 2F0 3F0\n1F0")  # stage 2 is actor 0's in a loop, 3 in a V: not both


def test_a_runs_expected_bubble_is_the_formula_or_a_vs_simulation():
    """What the driver logs as `bubble_theoretical` and `--print-schedule` prints: the closed
    form where there is one; ZB-V at P = 2, M = 4 with F = B = W = 1/2: each actor idles half a
    unit (actor 1 waits for the first forward, actor 0 for the last weight gradient's turn)
    in a makespan of 12 units of work + 1/2."""
    assert sim.expected_bubble(schedules.one_f_one_b(3, 4), 4) == sim.theoretical_bubble(3, 4)
    interleaved = schedules.interleaved_1f1b(2, 4, 2)
    assert sim.expected_bubble(interleaved, 4) == sim.theoretical_bubble(2, 4, 2)
    assert sim.expected_bubble(schedules.zb_v(2, 4), 4) == pytest.approx(0.5 / 12.5)
    assert schedules.zb_v(2, 4) != 3 and schedules.zb_v(2, 4) != schedules.zb_v(2, 4)[:1]
