"""diagnose with batches that are objects (issue 18 item 5): "any batch with forward=" is
counted where the BatchNorm layers see it, as precise_bn counts it, and diagnoses like the same
data given as tensors."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from rethinkbn.diagnosis import diagnose


@dataclass
class GraphBatch:
    features: torch.Tensor


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(16, 3) * 2 + 1)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, generator=g) * 2 + 1 for _ in range(4)]


def test_object_batches_diagnose_like_the_same_tensors():
    objects = [GraphBatch(x) for x in data()]
    got = diagnose(make_model(), objects, num_samples=64,
                   forward=lambda model, batch: model(batch.features))
    want = diagnose(make_model(), data(), num_samples=64)
    assert {n: d.norm_batch_size for n, d in got.layers.items()} == \
        {n: d.norm_batch_size for n, d in want.layers.items()}
    assert got.batch_size == want.batch_size == 16
    assert [f.severity for f in got.findings] == [f.severity for f in want.findings]


def test_an_object_batch_no_layer_sees_is_a_clear_type_error():
    objects = [GraphBatch(x) for x in data()]
    with pytest.raises(TypeError, match="no BatchNorm layer saw a tensor"):
        diagnose(make_model(), objects, num_samples=64, forward=lambda model, batch: None)
