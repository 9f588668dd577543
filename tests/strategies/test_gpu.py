"""GPU paths (NCCL allreduce, CUDA workers): run where a CUDA device exists, skipped elsewhere."""
import pytest
import torch
from helpers import small_run

import pipelines

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_nccl_allreduce_equals_the_cpu_reference(ray_session, store):
    workers = min(2, torch.cuda.device_count())
    common = {"tracking.uri": store, "optim.epochs": 2, "optim.steps_per_epoch": 5,
              "data.batch_size": 32, "model.width": 32}
    reference = pipelines.train(small_run(**common))
    on_gpu = pipelines.train(small_run(**common, **{
        "strategy.name": "allreduce", "resources.workers": workers,
        "resources.gpus_per_worker": 1.0}))
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(on_gpu.model.state_dict()[key], value, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad"])
def test_a_cuda_shards_optimizer_follows_torchs_on_the_same_device(name):
    # On CUDA torch takes its foreach path, which orders the same float32 operations
    # differently from the single-tensor path a shard writes out: each step may differ by a
    # few roundings of 2^-24 relative, and 12 steps of a contracting update keep that within
    # 1e-5 relative (and 1e-6 absolute near zero), far from any step's own size (~lr).
    from pipelines.optim_config import OptimSection
    from pipelines.strategies.ps.shard_optimizer import ShardOptimizer
    from pipelines.training.loop import make_optimizer

    section = OptimSection(name=name, lr=0.05, epochs=3, schedule="cosine", warmup_epochs=1,
                           weight_decay=1e-3, **({"momentum": 0.9} if name == "sgd" else {}))
    start = torch.randn(4096, generator=torch.Generator().manual_seed(0)).cuda()
    reference = torch.nn.Parameter(start.clone())
    theirs = make_optimizer(section, [reference], 4)
    mine = ShardOptimizer(section, start.clone(), 4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        grad = torch.randn(4096, generator=generator).cuda()
        reference.grad = grad.clone()
        theirs.step()
        mine.step(grad.clone())
    torch.testing.assert_close(mine.param, reference.detach(), rtol=1e-5, atol=1e-6)
