"""memory_report measures the tensors an optimizer actually holds."""

import gc

import pytest
import torch
from torch import nn

import leanopt
from leanopt.models import GPT, GPT2_SMALL


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).float().pow(2).mean().backward()
    opt.step()


def test_bf16_exact_adamw_holds_14_bytes_per_param_on_a_small_model():
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).bfloat16()
    n = sum(p.numel() for p in net.parameters())
    opt = leanopt.AdamW(net.parameters())
    before = leanopt.memory_report(opt)
    assert before.num_params == n and before.by_category == {"weights": 2 * n, "master": 0, "gradients": 0}
    one_step(net, opt, torch.randn(8, 64).bfloat16())
    r = leanopt.memory_report(opt)
    assert r.by_category["weights"] == 2 * n and r.by_category["master"] == 2 * n
    assert r.by_category["gradients"] == 2 * n
    assert r.by_category["exp_avg"] == 4 * n and r.by_category["exp_avg_sq"] == 4 * n
    assert r.by_category["other"] == 4 * 4  # one fp32 step counter per tensor
    assert r.total_bytes == 14 * n + 16 and r.bytes_per_param == pytest.approx(14 + 16 / n)
    # Gradients set to None are not counted; bf16 states halve the state bytes.
    opt.zero_grad(set_to_none=True)
    assert leanopt.memory_report(opt).by_category["gradients"] == 0
    opt2 = leanopt.AdamW(net.parameters(), states="bf16")
    one_step(net, opt2, torch.randn(8, 64).bfloat16())
    r2 = leanopt.memory_report(opt2)
    assert r2.by_category["exp_avg"] == 2 * n and r2.by_category["exp_avg_sq"] == 2 * n


def test_report_counts_real_storage_not_formulas():
    # A parameter that is a view of a larger storage counts the whole storage; a shared one counts once.
    base = torch.zeros(100, dtype=torch.bfloat16)
    a = nn.Parameter(base[:10])
    b = nn.Parameter(base[10:20])
    opt = leanopt.SGD([a, b], lr=0.1)
    r = leanopt.memory_report(opt)
    assert r.num_params == 20 and r.by_category["weights"] == 200
    # Tied weights (one tensor in two modules) count once.
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    params = list({id(p): p for p in [*emb.parameters(), *head.parameters()]}.values())
    assert leanopt.memory_report(torch.optim.SGD(params)).by_category["weights"] == 50 * 8 * 4


def test_report_accepts_any_torch_optimizer_and_prints_a_table():
    net = nn.Linear(32, 32)
    opt = torch.optim.AdamW(net.parameters())
    one_step(net, opt, torch.randn(4, 32))
    r = leanopt.memory_report(opt)
    n = 32 * 32 + 32
    assert r.by_category["weights"] == 4 * n and r.by_category["gradients"] == 4 * n
    assert r.by_category["exp_avg"] == 4 * n and r.by_category["exp_avg_sq"] == 4 * n
    assert r.by_category["master"] == 0
    text = str(r)
    assert f"memory for {n:,} parameters" in text
    assert "exp_avg_sq" in text and "total" in text and f"{r.bytes_per_param:.3f}" in text


def test_kahan_compensation_counts_as_master_bits():
    net = nn.Linear(16, 16).bfloat16()
    opt = leanopt.SGD(net.parameters(), lr=0.1, master="kahan")
    one_step(net, opt, torch.randn(2, 16).bfloat16())
    n = 16 * 16 + 16
    assert leanopt.memory_report(opt).by_category["master"] == 2 * n


@pytest.mark.slow
def test_gpt2_small_adamw_exact_is_14_bytes_per_param_against_16_for_the_standard_recipe():
    """GPT-2 small shape (124M, tied embeddings, random init), one real forward/backward and step."""
    if True:
        torch.manual_seed(0)
        idx = torch.randint(0, GPT2_SMALL.vocab_size, (1, 8))
        model = GPT(GPT2_SMALL).bfloat16()
        n = sum(p.numel() for p in model.parameters())
        assert 124_000_000 < n < 125_000_000
        opt = leanopt.AdamW(model.parameters(), lr=1e-4, master="exact", states="fp32")
        model(idx, idx)[1].backward()
        opt.step()
        lean = leanopt.memory_report(opt)
        assert lean.num_params == n
        assert lean.by_category["weights"] == 2 * n and lean.by_category["master"] == 2 * n
        assert lean.by_category["gradients"] == 2 * n
        assert lean.by_category["exp_avg"] == 4 * n and lean.by_category["exp_avg_sq"] == 4 * n
        assert round(lean.bytes_per_param, 3) == 14.0
        del model, opt
        gc.collect()
        # The standard recipe: fp32 params + torch.optim.AdamW.
        torch.manual_seed(0)
        model = GPT(GPT2_SMALL)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model(idx, idx)[1].backward()
        opt.step()
        std = leanopt.memory_report(opt)
        assert std.num_params == n
        assert std.by_category["weights"] == 4 * n and std.by_category["gradients"] == 4 * n
        assert std.by_category["exp_avg"] == 4 * n and std.by_category["exp_avg_sq"] == 4 * n
        assert round(std.bytes_per_param, 3) == 16.0
        assert std.total_bytes - lean.total_bytes == 2 * n  # the fp32 master copy, minus the remainder
