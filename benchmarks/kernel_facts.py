"""The measured facts behind the fused-kernel design (docs/kernels.md), reproducible in one run.

    python benchmarks/kernel_facts.py           # about a minute on CPU; writes benchmarks/results/kernel_facts.json

1. Eager CPU ``torch.sqrt`` on fp32 is not correctly rounded (compiled code is): why Adam's fused master
   is within a bound of the reference rather than bit-identical.
2. Compiling ``Rule.update`` with Python-float hyper-parameters recompiles when the LR changes (torch
   2.13 specialises ``addcdiv_``'s ``value=``): why rules have a tensor-only fused form.
3. The eager finiteness check ``torch.isfinite(g).all()`` against ``torch.aminmax`` (same answer: NaN and
   inf reach the min or max) on a 20M-element bf16 gradient.
4. Where an AdamW exact/fp32 step on a 50M-element tensor spends its time: fused kernel vs the
   optimizer's eager finiteness check, next to torch's fused fp32 AdamW.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "kernel_facts.json"


def sqrt_rounding(n: int = 100_000) -> dict:
    torch.manual_seed(0)
    v = torch.rand(n) * 1e-3
    eager = v.sqrt()
    exact = v.double().sqrt().float()  # correctly rounded fp32 square root
    compiled = torch.compile(lambda x: x.sqrt(), dynamic=True)(v)
    return {
        "elements": n,
        "eager_differs_from_correctly_rounded": int((eager != exact).sum()),
        "compiled_differs_from_correctly_rounded": int((compiled != exact).sum()),
    }


def rule_recompiles(steps: int = 4) -> dict:
    from torch._dynamo.utils import counters

    from leanopt.rules import AdamWRule

    rule = AdamWRule()
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "maximize": False}

    def update(p, g, m, v, lr, beta1, step):
        rule.update(p, g, {"exp_avg": m, "exp_avg_sq": v}, step, {**group, "lr": lr, "betas": (beta1, 0.999)})

    out = {}
    for what, beta1 in (("lr_and_step_change", lambda i: 0.9), ("beta1_changes_too", lambda i: 0.9 + 0.001 * i)):
        fn = torch.compile(lambda *a: update(*a), dynamic=True)
        p, g, m, v = torch.randn(4096), torch.randn(4096), torch.zeros(4096), torch.zeros(4096)
        before = counters["stats"]["unique_graphs"]
        for i in range(1, steps + 1):
            fn(p, g, m, v, 1e-3 * (1 + 0.1 * i), beta1(i), float(i))
        out[what] = {"steps": steps, "graphs_compiled": int(counters["stats"]["unique_graphs"] - before)}
    return out


def finite_check(n: int = 20_000_000, reps: int = 5) -> dict:
    g = torch.randn(n, dtype=torch.bfloat16)

    def ms(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return round(statistics.median(times) * 1e3, 1)

    return {
        "elements": n,
        "isfinite_all_ms": ms(lambda: bool(torch.isfinite(g).all())),
        "aminmax_ms": ms(lambda: all(bool(torch.isfinite(x)) for x in torch.aminmax(g))),
        "copy_ms": ms(lambda: g.clone()),
    }


def step_breakdown(shape: tuple[int, int] = (12_500, 4_000), reps: int = 3) -> dict:
    """One AdamW exact/fp32 step on a 50M-element tensor: the whole optimizer step, the fused kernel
    alone (``fused.dispatch_step``), the optimizer's eager finiteness check alone, and torch's fused
    fp32 AdamW, in the same run."""
    import leanopt
    from leanopt.kernels import fused

    def ms(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return round(statistics.median(times) * 1e3, 1)

    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16) * 0.02)
    p.grad = torch.randn(shape, dtype=torch.bfloat16) * 1e-3
    opt = leanopt.AdamW([p], lr=1e-4, master="exact", states="fp32", kernel="fused")
    opt.step()  # compiles
    group = opt.param_groups[0]
    wfmt, sfmt = opt.formats(p, group)
    out = {
        "elements": p.numel(),
        "optimizer_step_ms": ms(opt.step),
        "fused_kernel_only_ms": ms(
            lambda: fused.dispatch_step("fused", opt.rule, wfmt, sfmt, p, p.grad, opt.state[p], group)
        ),
        "isfinite_check_ms": ms(lambda: bool(torch.isfinite(p.grad).all())),
    }
    q = torch.nn.Parameter(torch.randn(shape) * 0.02)
    q.grad = torch.randn(shape) * 1e-3
    ref = torch.optim.AdamW([q], lr=1e-4, fused=True)
    out["torch_fused_adamw_fp32_ms"] = ms(ref.step)
    return out


def main() -> None:
    facts = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sqrt_rounding": sqrt_rounding(),
        "rule_recompiles": rule_recompiles(),
        "finite_check": finite_check(),
        "step_breakdown": step_breakdown(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
