"""fold_batchnorm below a forward that does not trace (issue 18 item 4): never silently wrong.

The pairs found there are folded with a warning that names them; given ``example_inputs``, the
folded copy is checked against the model and untraced pairs that change the outputs stay unfolded.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from rethinkbn.convert import fold_batchnorm


class CallsTheConvDirectly(nn.Module):
    """Untraceable (data-dependent branch) and it also uses ``body[0]`` outside ``body``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        with torch.no_grad():
            self.body[1].running_mean.normal_()
            self.body[1].running_var.uniform_(0.2, 3)
            self.body[1].weight.normal_()

    def forward(self, x):
        y = self.body(x) + self.body[0](x)
        return y if y.sum() > 0 else -y


def expected(model, x):
    return copy.deepcopy(model).eval()(x)


def test_folding_by_adjacency_warns_and_names_the_pairs():
    model = CallsTheConvDirectly()
    with pytest.warns(UserWarning, match=r"body\.0 -> body\.1.*example_inputs"):
        fold_batchnorm(model)


def test_with_example_inputs_a_fold_that_changes_the_outputs_is_refused():
    model, x = CallsTheConvDirectly(), torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"left unfolded"):
        folded = fold_batchnorm(model, example_inputs=(x,))
    assert isinstance(folded.body[1], nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), expected(model, x))


def test_with_example_inputs_a_correct_untraced_fold_is_kept_without_warning():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.body(x)
            return y if y.sum() > 0 else -y

    model, x = Untraceable(), torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(model, example_inputs=(x,))
    assert isinstance(folded.body[1], nn.Identity)
    torch.testing.assert_close(folded(x), expected(model, x), rtol=1e-5, atol=1e-5)


def test_a_traced_model_folds_without_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_batchnorm(model)


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(TypeError, match="tuple"):
        fold_batchnorm(CallsTheConvDirectly(), example_inputs=torch.randn(2, 3, 4, 4))
