"""Gradient release: what the per-parameter hooks cost the host, side by side in one process.

For each workload, every round times in turn (median of the timed iterations, forward + backward +
``optimizer.step()`` + ``zero_grad()``):

- ``no release``: ``loss.backward(); optimizer.step()`` (one native call for the whole step);
- ``release``: ``leanopt.release_gradients(optimizer)``, each parameter updated in its hook (the hooks'
  per-parameter plans on, the default);
- ``release, no plans``: the same with the hooks' plans turned off (``leanopt.release.PLANS = False``,
  env ``LEANOPT_RELEASE_PLANS=0``): every hook takes the general path;
- ``backward only``: no optimizer at all (the floor).

"per hook" is (a mode's time - backward only) / parameters: the host time one parameter's update costs
there, the kernel included. Workloads: ``mlp`` (128 bf16 Linear(64, 64) layers, batch 16: 256 small
tensors, where the hooks' Python shows), ``gpt`` (a 4-layer GPT, 50 tensors), ``gpt2-small``
(124M params, batch 1 x 32; slow).

    python benchmarks/release_overhead.py                       # mlp, 5 rounds
    python benchmarks/release_overhead.py --workloads gpt2-small --iters 3 --rounds 3 \\
        --out benchmarks/results/release_overhead_gpt2.json
    python benchmarks/release_overhead.py --path cuda-emulated --out benchmarks/results/release_overhead_cuda_path.json

``--path cuda-emulated``: the CUDA kernels' path (kernels/gpu.py, ``kernel="fused"``) on the CPU, its
kernels (and NaN/inf check) replaced by no-ops after a first iteration built them: what each hook
costs the host before a GPU does anything (there the launches are asynchronous), as
benchmarks/gpu_host_overhead.py does for ``step()``. ``--path cuda``: the model on a GPU (the CUDA
kernels, ``kernel="auto"``), each iteration ended by a synchronise (benchmarks/gpu_check.sh, FULL=1).

Writes benchmarks/results/release_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import leanopt
from leanopt import release as _release
from leanopt.kernels import gpu
from leanopt.models import GPT, GPT2_SMALL, GPTConfig

OUT = Path(__file__).resolve().parent / "results" / "release_overhead.json"
MODES = ("backward only", "no release", "release", "release, no plans")


def workload(name: str, device: str = "cpu") -> tuple[torch.nn.Module, callable]:
    torch.manual_seed(0)
    if name == "mlp":
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(128)]).to(device, torch.bfloat16)
        x = torch.randn(16, 64, device=device).bfloat16()
        return model, lambda: model(x).float().square().mean()
    cfg = GPT2_SMALL if name == "gpt2-small" else GPTConfig(vocab_size=4096, block_size=64, n_layer=4, n_head=4,
                                                            n_embd=256)  # fmt: skip
    batch, seq = (1, 32) if name == "gpt2-small" else (4, 64)
    model = GPT(cfg).to(device, torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    return model, lambda: model(idx[:, :-1], idx[:, 1:])[1]


def run(name: str, iters: int, rounds: int, warmup: int, path: str = "native") -> dict:
    model, loss_fn = workload(name, "cuda" if path == "cuda" else "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = leanopt.AdamW(params, lr=1e-4, kernel="fused" if path == "cuda-emulated" else "auto")
    handle = leanopt.release_gradients(opt)

    def iteration(mode: str) -> None:
        loss = loss_fn()
        loss.backward()
        if mode != "backward only":
            opt.step()
        opt.zero_grad(set_to_none=True)
        if path == "cuda":  # the GPU's work included
            torch.cuda.synchronize()

    if path == "cuda-emulated":  # build the kernels (released and not), then make them no-ops
        iteration("release")
        handle.remove()
        iteration("no release")
        for k in gpu.compile_stats():
            k.fn = lambda *a: None
        for key in list(gpu._FINITE):
            gpu._FINITE[key] = lambda *a: None
    else:
        handle.remove()

    def timed(mode: str) -> float:
        nonlocal handle
        if mode.startswith("release"):
            _release.PLANS = mode == "release"
            handle = leanopt.release_gradients(opt)
        try:
            for _ in range(warmup):
                iteration(mode)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                iteration(mode)
                times.append(time.perf_counter() - start)
        finally:
            if mode.startswith("release"):
                handle.remove()
            _release.PLANS = True
        return statistics.median(times) * 1e3

    per_round = []
    for r in range(rounds):
        per_round.append({m: timed(m) for m in MODES})
        print(f"{name} round {r + 1}: " + ", ".join(f"{m} {v:.2f} ms" for m, v in per_round[-1].items()))
    ms = {m: statistics.median(r[m] for r in per_round) for m in MODES}
    # per round, then the median: the rounds' common noise cancels in each difference
    per_hook = {
        m: statistics.median((r[m] - r["backward only"]) / len(params) * 1e3 for r in per_round) for m in MODES[1:]
    }
    ratio = statistics.median(r["release"] / r["no release"] for r in per_round)
    return {"workload": name, "path": path, "parameters": len(params), "elements": sum(p.numel() for p in params),
            "ms": ms, "rounds_ms": per_round, "per_param_us": per_hook, "release_over_no_release": ratio}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp", help="comma list of mlp, gpt, gpt2-small")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", default="native", choices=["native", "cuda-emulated", "cuda"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.path == "cuda-emulated":
        gpu.EMULATE = True
    results = [run(w, args.iters, args.rounds, args.warmup, args.path) for w in args.workloads.split(",")]
    print()
    print(f"{'workload':<11} {'params':>6}  " + "  ".join(f"{m:>17}" for m in MODES) + "   release/no release")
    for r in results:
        print(f"{r['workload']:<11} {r['parameters']:>6}  " + "  ".join(f"{r['ms'][m]:>14.2f} ms" for m in MODES)
              + f"   {r['release_over_no_release']:.2f}x")  # fmt: skip
        print(f"{'  per param':<19} {'':>17}  " + "  ".join(f"{r['per_param_us'][m]:>14.1f} us" for m in MODES[1:]))
    out = {
        "command": "python benchmarks/release_overhead.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
