"""The Lightning callbacks with a real Trainer on CPU, for a couple of steps."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from rethinkbn.integrations.lightning import FreezeBN, PreciseBN  # noqa: E402
from rethinkbn.layers import FrozenBatchNorm  # noqa: E402
from rethinkbn.population import precise_bn  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def fit(callback, epochs=2, ckpt_path=None, extra_callbacks=(), root=None):
    module = Tiny()
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=2, limit_val_batches=1,
        callbacks=[callback, *extra_callbacks], enable_progress_bar=False, logger=False,
        enable_checkpointing=bool(extra_callbacks), enable_model_summary=False,
        accelerator="cpu", devices=1, num_sanity_val_steps=0, default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers etc.
        trainer.fit(module, loader(), loader(), ckpt_path=ckpt_path)
    return module, trainer


def test_the_callbacks_are_lightning_pytorch_callbacks():
    import lightning

    assert isinstance(PreciseBN(), lightning.pytorch.Callback)
    assert isinstance(FreezeBN(), lightning.pytorch.Callback)
    assert issubclass(lightning.Trainer, pl.Trainer)


def test_precise_bn_callback_leaves_the_final_model_with_precise_statistics():
    module, _ = fit(PreciseBN(num_batches=4))
    reference = copy.deepcopy(module)
    precise_bn(reference, loader(), num_batches=4)
    bn, ref = module.net[1], reference.net[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)


def test_precise_bn_callback_runs_once_per_epoch():
    callback = PreciseBN(num_batches=4)
    fit(callback)
    assert sorted(callback.reports) == [0, 1]
    assert all(r.num_batches == 4 for r in callback.reports.values())


def test_freeze_bn_callback_freezes_for_the_last_fraction_and_keeps_the_optimizer():
    callback = FreezeBN(fraction=0.5, num_batches=4)
    module, trainer = fit(callback)
    bn = module.net[1]
    assert isinstance(bn, FrozenBatchNorm) and callback.frozen
    assert not torch.equal(bn.running_var, torch.ones(4))  # precise, not the initial statistics
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(bn.weight) in optimized and id(bn.bias) in optimized


def test_freeze_bn_callback_refuses_a_misspelt_argument_when_built():
    with pytest.raises(TypeError, match=r"FreezeBN: unknown arguments \['num_sample'\]"):
        FreezeBN(num_sample=10)


def test_freeze_bn_refreezes_after_resume_and_the_statistics_stay_put(tmp_path):
    # freeze at epoch 1 of 4, save after epoch 2, resume a fresh module and callback from there
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                         filename="{epoch}")
    first = FreezeBN(freeze_epoch=1, num_batches=4)
    fit(first, epochs=2, extra_callbacks=[saver], root=tmp_path)
    assert first.frozen
    ckpt = tmp_path / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]

    resumed = FreezeBN(freeze_epoch=1, num_batches=4)
    module, _ = fit(resumed, epochs=4, ckpt_path=ckpt, root=tmp_path)
    bn = module.net[1]
    assert resumed.frozen and isinstance(bn, FrozenBatchNorm)
    assert torch.equal(bn.running_mean, saved["net.1.running_mean"])
    assert torch.equal(bn.running_var, saved["net.1.running_var"])
    assert not torch.equal(bn.weight, saved["net.1.weight"])  # it did train the remaining epochs


def test_the_callbacks_take_the_options_of_precise_bn_as_one_object_or_keywords():
    from rethinkbn.population import PreciseBNOptions

    callback = PreciseBN(options=PreciseBNOptions(num_batches=4))
    fit(callback, epochs=1)
    assert callback.reports[0].num_batches == 4
    with pytest.raises(TypeError, match="num_samples"):
        PreciseBN(num_samples=True)
    with pytest.raises(ValueError, match="not both"):
        FreezeBN(num_samples=8, num_batches=2)
