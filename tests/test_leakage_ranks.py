"""Virtual devices and real gloo ranks normalize the leakage study's RoI batch the same way.

A fixed step of 8 images is run once in one process (virtual devices) and once on 2 real gloo
processes holding 4 images each (SyncBatchNorm across ranks, the real shuffle); the logits of
every RoI and the averaged gradients must match.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo_world import GlooWorld
from rethinkbn_studies.studies import leakage
from rethinkbn_studies.toolkit.roi import RoiTaskConfig

SCALE = leakage.LeakageScale(num_train_images=16, num_test_images=8, epochs=1,
                             precise_batches=2, task=RoiTaskConfig(rois_per_image=4))
DEVICE_VARIANTS = ["bn-1img", "bn-2img", "bn-shuffle-1img", "syncbn"]


def one_step(name, rank=0, world=1):
    """Logits and (averaged) gradients of the first training step, on this rank's share."""
    torch.manual_seed(0)
    train, _, _ = leakage.task_images(SCALE, seed=0)
    model = leakage.build_model(leakage.VARIANTS[name], SCALE, seed=0, distributed=world > 1)
    model.train()
    x, rois = next(leakage.step_batches(train, SCALE, seed=0, epoch=0, rank=rank, world=world))
    logits = model(x, rois)
    F.cross_entropy(logits, rois.labels).backward()
    grads = {}
    for n, p in model.named_parameters():
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        grads[n] = p.grad.clone()
    return logits.detach(), grads


def rank_step(name):
    return one_step(name, dist.get_rank(), dist.get_world_size())


@pytest.fixture(scope="module")
def world():
    with GlooWorld(2, timeout_s=30.0, run_timeout_s=60.0) as w:
        yield w


@pytest.mark.parametrize("name", DEVICE_VARIANTS)
def test_real_ranks_give_the_virtual_normalization(world, name):
    virtual_logits, virtual_grads = one_step(name)
    (logits0, grads0), (logits1, _) = world.run(rank_step, name)
    torch.testing.assert_close(torch.cat([logits0, logits1]), virtual_logits,
                               rtol=1e-5, atol=1e-5)
    for n, g in virtual_grads.items():
        torch.testing.assert_close(grads0[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_per_device_bn_differs_from_sync_bn_on_the_same_step():
    """The comparison above is not vacuous: the normalization really depends on the devices."""
    per_device, _ = one_step("bn-1img")
    sync, _ = one_step("syncbn")
    assert not torch.allclose(per_device, sync, atol=1e-3)


def test_torchrun_training_matches_virtual_training():
    real = leakage.train_on_ranks("syncbn", SCALE, seed=0, ranks=2, timeout_s=120.0)
    virtual = leakage.run_variant("syncbn", SCALE, seed=0)
    one_roi = 100.0 / (SCALE.num_test_images * SCALE.task.rois_per_image)
    assert abs(real["pop"] - virtual["pop"]) <= one_roi
    assert abs(real["train_loss"] - virtual["train_loss"]) < 1e-4


def population(name, rank=0, world=1):
    """The head's population statistics after leakage.recompute_roi_population on this rank's
    share."""
    train, _, _ = leakage.task_images(SCALE, seed=0)
    variant = leakage.VARIANTS[name]
    model = leakage.build_model(variant, SCALE, seed=0, distributed=world > 1)
    leakage.recompute_roi_population(model, variant, train, SCALE, seed=0, rank=rank, world=world)
    return {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean",
                                                                       "running_var"))}


def rank_population(name):
    return population(name, dist.get_rank(), dist.get_world_size())


@pytest.mark.parametrize("name", ["bn-1img", "bn-2img", "bn-shuffle-1img"])
def test_real_ranks_estimate_the_virtual_population_statistics(world, name):
    """PreciseBN pooled across 2 ranks, each normalizing its devices as in training, installs
    the statistics of the virtual devices' pass (SyncBN: estimated on whole steps in one
    process by train_on_ranks, since precise_bn's pass normalizes each rank's share alone)."""
    virtual = population(name)
    stats0, stats1 = world.run(rank_population, name)
    for k, v in virtual.items():
        torch.testing.assert_close(stats0[k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(stats1[k], v, rtol=1e-5, atol=1e-6, msg=k)
