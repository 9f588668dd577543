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
