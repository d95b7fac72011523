"""Fast end-to-end checks that the public optimizers train and account memory."""

import pytest
import torch
from torch import nn

import leanopt


@pytest.mark.parametrize("cls", [leanopt.SGD, leanopt.Adam, leanopt.AdamW, leanopt.Lion])
@pytest.mark.parametrize("master", ["exact", "none", "stochastic", "kahan"])
def test_every_optimizer_and_master_format_lowers_a_regression_loss(cls, master):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).bfloat16()
    x = torch.randn(64, 8).bfloat16()
    y = x.sum(1, keepdim=True) * 0.3
    lr = 1e-3 if cls is leanopt.Lion else 1e-2
    opt = cls(net.parameters(), lr=lr, master=master)
    first = None
    for _ in range(60):
        loss = ((net(x) - y) ** 2).float().mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.7 * first
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
