"""Exposure-bias ratio: exact 1 for an input-blind model, documented masks and schedule."""

import pytest
import torch
from torch import nn

from bilevel_dlm import ModelView
from bilevel_dlm.metrics import exposure_bias
from toy import MASK_ID, VOCAB, ToyBackbone, ToyDLM, toy_batch


class InputBlind(nn.Module):
    """Position-dependent logits that ignore the tokens."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(32, 8))
        self.lm_head = nn.Linear(8, VOCAB)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.positions[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1))


@pytest.mark.parametrize("order", ["confidence", "random"])
def test_ratio_is_one_for_a_model_that_ignores_its_input(order):
    batch = toy_batch(3, 12, prompt=4)
    response = batch["labels"] != -100
    curve = exposure_bias(ModelView(ToyBackbone(), InputBlind(), MASK_ID), batch["input_ids"], response,
                          steps=4, order=order, generator=torch.Generator().manual_seed(0))
    assert len(curve.ratio) == 3
    assert all(abs(r - 1.0) < 1e-6 for r in curve.ratio)


def test_schedule_and_sensitivity_on_a_real_model():
    batch = toy_batch(3, 12, prompt=4)
    response = batch["labels"] != -100
    view = ModelView(ToyBackbone(), ToyDLM(), MASK_ID)
    curve = exposure_bias(view, batch["input_ids"], response, steps=4, order="random",
                          generator=torch.Generator().manual_seed(0))
    assert curve.mask_ratio == [0.75, 0.5, 0.25]  # 8 response tokens per row: 6, 4, 2 left
    assert any(abs(r - 1.0) > 1e-3 for r in curve.ratio), "a model that reads its input sees its own errors"
    with pytest.raises(ValueError):
        exposure_bias(view, batch["input_ids"], response, order="backwards")
