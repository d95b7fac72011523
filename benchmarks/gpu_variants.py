"""The multi-tensor CUDA kernels' code-shape choices (``kernels.gpu.VARIANT``) timed side by side in
one run: each variant builds its own kernels (``gpu.reset()``) and runs kernel="fused" AdamW steps,
rounds interleaved, next to torch's fused AdamW. The choices change only the code's shape, not its
arithmetic (the emulated tests compare every variant's bits with the native CPU kernels).

    python benchmarks/gpu_variants.py --device cuda --out benchmarks/results/gpu-<date>/variants.json
    python benchmarks/gpu_variants.py                 # the CPU, emulated kernels, tiny: checks the script

``old``: one element at a time in the flat kernels, each lane reading its group's 32 magnitudes for the
group's maximum (the kernels before 2026-11-29); ``default``: ``gpu.VARIANT`` as it stands; ``chunks4``,
``chunks16``: each block of a flat kernel, and of the NaN/inf check, updates (checks) 4 or 16 x 1024
elements (torch's multi-tensor kernels: 64 x 1024 a block); ``vec``: each thread of a flat kernel updates 4
consecutive elements, reading and writing each array in one access; ``groups4``: each warp updates 4
consecutive int8/int4 groups together (every load of the 4 first, then the arithmetic: 4x the bytes in
flight per warp); ``search1``: every kernel finds its block's tensor by a warp's 32-way search (ballots), not a
binary search per thread (its bits are checked like every variant's; chosen with the flat family, it applies
to all kernels); ``search2``: only a block's first warp searches so, the others wait at a barrier (timed by
default: the fewest instructions by benchmarks/sass_count.py); ``groups2``: 2 groups; ``novec`` and
``groups1``: one element a thread, one group a warp (the defaults before 2026-11-30); ``table``: signed
codes decoded through a table in shared memory (the default: a constant one); ``groups2+table``,
``groups4+table``: both; ``lanes``: a lane per int8/int4 group, its states in registers, its arrays read
and written 8 elements at a time (``benchmarks/sass_count.py``: about half the instructions per element
or fewer), ``lanes+blocks2`` the same capped at 128 registers (2 blocks per multiprocessor; since
2026-12-01, not yet timed). Before it is timed, each variant's kernels are compared with the native CPU
kernels bit for bit on the device (:func:`bits_differ`, ``bits`` in the output); a variant that differs
is never chosen. On CUDA each case is also profiled once (torch.profiler): ``gpu_ms`` is the device time
of its kernels and copies per step, so a step much longer than it waits on the host; ``host_ms`` is the
time until ``step()`` returned (median of the timed steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _results import write_rows  # benchmarks/_results.py

from leanopt.cli import bench
from leanopt.kernels import gpu

MODES = ["exact/fp32@fused", "exact/fp32@fused:ignore", "compact/int8@fused", "compact/int4@fused"]
FLAT, GROUPED = MODES[:2], MODES[2:]  # the modes ``chunks`` changes; ``groups`` and ``table``
#: name -> (gpu.VARIANT settings, modes timed)
VARIANTS = {
    "old": ({"hoist": False, "warp_max": False}, MODES),
    "default": ({}, MODES),
    "chunks4": ({"chunks": 4}, FLAT),
    "chunks16": ({"chunks": 16}, FLAT),
    "vec": ({"vec": True}, FLAT),
    "novec": ({"vec": False}, FLAT),  # the flat kernels' default before 2026-11-30's H200 run chose vec
    "chunks16+vec": ({"chunks": 16, "vec": True}, FLAT),
    "search1": ({"search": 1}, FLAT),  # every kernel's search for its tensor; timed with the flat ones
    "search2": ({"search": 2}, FLAT),
    "groups1": ({"groups": 1}, GROUPED),  # the grouped kernels' default before that run chose groups2
    "groups2": ({"groups": 2}, GROUPED),
    "groups4": ({"groups": 4}, GROUPED),
    "table": ({"table": True}, GROUPED),
    "groups2+table": ({"groups": 2, "table": True}, GROUPED),
    "groups4+table": ({"groups": 4, "table": True}, GROUPED),
    "lanes": ({"lanes": True}, GROUPED),  # a lane per group (since 2026-12-01): half the instructions or less
    "lanes+blocks2": ({"lanes": True, "blocks": 2}, GROUPED),  # the same at <= 128 registers: 2 blocks an SM
}
#: timed by default (``old`` was timed on 2026-11-29; since the H200 run of 2026-11-30 the defaults are
#: ``vec`` and ``groups=2``, so every variant is timed on top of them and ``novec``/``groups1`` time the
#: shapes before; since the default decodes signed codes through a constant table (2026-11-30),
#: ``table``'s shared-memory table counts more instructions than it, benchmarks/sass_count.py: not timed)
DEFAULT_VARIANTS = [
    "default",
    "novec",
    "chunks4",
    "chunks16",
    "search2",
    "groups1",
    "groups4",
    "lanes",
    "lanes+blocks2",
]
#: bit-checked combinations (weight format, state format) with shapes that give partial groups, rows a
#: warp's groups continue into and a tensor smaller than one warp's groups
BITS_COMBOS = [("exact", "fp32"), ("compact", "int8"), ("kahan", "int4"), ("stochastic", "int8")]
BITS_SHAPES = [(3, 70), (33, 1000), (4, 33), (2, 3, 40), (130,), (64, 64)]


def _reuse_parameter_values() -> None:
    """``bench.make_params`` drawing each workload's values once on the CPU (the draw takes seconds for
    GPT-2's 124M parameters, most of a case's time) and copying them to the device for every case."""
    draw = bench.make_params
    drawn: dict[tuple, list] = {}

    def make_params(shapes, dtype, device, seed=0):  # noqa: ANN001, ANN202 - bench.make_params' own
        key = (tuple(map(tuple, shapes)), dtype, seed)
        if key not in drawn:
            drawn[key] = [(p.detach(), p.grad) for p in draw(shapes, dtype, "cpu", seed)]
        out = []
        for w, g in drawn[key]:
            p = torch.nn.Parameter(w.to(device, copy=True))
            p.grad = g.to(device, copy=True)
            out.append(p)
        return out

    bench.make_params = make_params


OUT = Path(__file__).resolve().parent / "results" / "gpu_variants.json"


def device_ms(case: bench.Case, shapes: list, device: torch.device, steps: int = 5) -> dict | None:
    """GPU time per step of ``case``: the device time of every kernel and copy in ``steps`` profiled
    steps (torch.profiler, CUPTI), without the host's part of the step, in all (``gpu_ms``) and per
    kernel or copy name (``gpu_ms_by_name``: ``lo_cuda_finite`` is the NaN/inf check, ``lo_cuda`` the
    updates); None off CUDA or where the profiler gives nothing. Set against the step time it says
    whether a case waits on the host."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    params = bench.make_params(shapes, case.dtype, device)
    opt = case.build(params)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    by_name: dict[str, float] = {}
    for e in prof.key_averages():  # microseconds
        us = getattr(e, "self_device_time_total", 0.0)
        if us > 0:
            by_name[e.key[:60]] = by_name.get(e.key[:60], 0.0) + us
    del opt, params
    torch.cuda.empty_cache()
    total = sum(by_name.values())
    if total <= 0:
        return None
    parts = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {"gpu_ms": round(total / steps / 1e3, 4), "gpu_ms_by_name": {k: round(v / steps / 1e3, 4) for k, v in parts}}


def profile_once(found: dict, key: tuple, case: bench.Case, shapes: list, device: torch.device) -> None:
    """``found[key]``: :func:`device_ms` of the case, measured once (the first round), or its error."""
    if key not in found:
        try:
            found[key] = device_ms(case, shapes, device)
        except Exception as err:  # noqa: BLE001 - recorded; the step timings stand
            found[key] = {"gpu_ms": f"{type(err).__name__}: {err}"[:300]}


def bits_differ(device: torch.device, steps: int = 3) -> str | None:
    """Whether the kernels of ``gpu.VARIANT`` as it stands give the native CPU kernels' bits on
    ``device`` (AdamW, :data:`BITS_COMBOS` on :data:`BITS_SHAPES`, ``steps`` steps): None if every
    weight and state tensor is bit-identical, else what differs (or why it could not be checked)."""
    import leanopt
    from leanopt.kernels import native

    if native.compiler() is None:
        return "not checked: no C compiler for the native CPU kernels"
    for master, states in BITS_COMBOS:
        trained = []
        for kernel, where in (("auto", torch.device("cpu")), ("fused", device)):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).bfloat16().to(where))
                      for s in BITS_SHAPES]  # fmt: skip
            opt = leanopt.AdamW(params, lr=1e-2, weight_decay=0.1, master=master, states=states, kernel=kernel)
            for i in range(steps):
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=gen) * 10.0**-i).bfloat16().to(where)
                opt.step()
            tensors = []
            for p in params:
                tensors.append(p.detach())
                tensors += [v for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
            trained.append([t.cpu().contiguous().reshape(-1).view(torch.uint8) for t in tensors])
        ref, ours = trained
        if len(ref) != len(ours):
            return f"{master}/{states}: {len(ours)} tensors, the native kernels {len(ref)}"
        for k, (a, b) in enumerate(zip(ref, ours, strict=True)):
            if a.shape != b.shape or not torch.equal(a, b):
                return f"{master}/{states}: tensor {k} differs from the native kernels'"
    return None


#: a variant is chosen over "default" only if it is this much faster (geometric mean of its ratios to
#: default over the workloads and modes it changes) and no case is slower than WORST x default's
MARGIN, WORST = 0.97, 1.10


def choose(rows: list[dict]) -> dict:
    """For the flat kernels (the variants timed on FLAT modes) and the grouped ones (GROUPED modes):
    the variant that beats ``default`` by MARGIN without a case worse than WORST, else none; compared
    on the kernels' device time (``gpu_ms``: the variants change only the kernels' code) where every
    compared case has it, else on the step time. ``env`` is the ``LEANOPT_GPU_VARIANT`` value of both
    winners (empty: keep the defaults): benchmarks/gpu_check.sh runs the kernel benchmark with it."""
    ok = {(r["workload"], r["variant"], r["mode"]): r for r in rows if "step_ms" in r and not r.get("bits_differ")}
    out: dict = {"margin": MARGIN, "worst": WORST, "families": {}}
    settings: dict = {}
    for family, modes in (("flat", FLAT), ("grouped", GROUPED)):
        names = [v for v, (_, m) in VARIANTS.items() if m == modes and any(k[1] == v for k in ok)]
        base = {(w, m): r for (w, v, m), r in ok.items() if v == "default" and m in modes}
        both = {v: [(w, m) for w, m in base if (w, v, m) in ok] for v in ["default", *names]}  # cases both have
        metric = "gpu_ms" if all(isinstance(ok[w, v, m].get("gpu_ms"), float) for v, cases in both.items()
                                 for w, m in cases) else "step_ms"  # fmt: skip
        scores = {}
        for v in names:
            ratios = [ok[w, v, m][metric] / base[w, m][metric] for w, m in both[v]]
            if ratios and len(ratios) == len(base):
                scores[v] = {"score": round(statistics.geometric_mean(ratios), 4), "worst": round(max(ratios), 4)}
        good = [v for v, x in scores.items() if x["score"] <= MARGIN and x["worst"] <= WORST]
        best = min(good, key=lambda v: scores[v]["score"]) if good else None
        out["families"][family] = {"metric": metric, "scores": scores, "chosen": best}
        if best:
            settings.update(VARIANTS[best][0])
    out["settings"] = settings
    out["env"] = ",".join(f"{k}={int(x)}" for k, x in settings.items())
    return out


def report(runs: dict, gpu_ms: dict, out: Path, extra: dict, printing: bool, bits: dict | None = None) -> None:
    """Write what has been measured so far to ``out`` (after every round: a run cut short keeps its
    finished rounds), and print it at the end. ``bits``: variant -> :func:`bits_differ`'s answer; a
    variant whose bits differ is marked in its rows (``bits_differ``) and never chosen."""
    bits = bits or {}
    rows = []
    for (wname, vname, mode), results in runs.items():
        bad = [r for r in results if r.status != "ok"]
        base_runs = runs.get((wname, "-", "torch-fused"), [])
        if bad or not base_runs:
            error = bad[0].error if bad else "no torch fused baseline"
            rows.append({"workload": wname, "variant": vname, "mode": mode, "error": error})
            if printing:
                print(f"{wname:11s} {vname:13s} {mode:24s} {error}")
            continue
        ms = statistics.median(x for r in results for x in r.step_ms_all)
        base = statistics.median(x for r in base_runs for x in r.step_ms_all)
        gbps = results[0].touched_bytes_per_param * results[0].params / (ms / 1e3) / 1e9
        profiled = gpu_ms.get((wname, vname, mode)) or {}
        dev = profiled.get("gpu_ms")
        host = round(statistics.median(x for r in results for x in r.host_ms_all), 4)  # until step() returned
        rows.append({"workload": wname, "variant": vname, "mode": mode, "step_ms": round(ms, 4), "host_ms": host,
                     **profiled, "vs_torch_fused": round(ms / base, 3), "achieved_gbps": round(gbps, 1),
                     "touched_bytes_per_param": results[0].touched_bytes_per_param, "rounds": len(results),
                     "step_ms_all": [x for r in results for x in r.step_ms_all]})  # fmt: skip
        differs = bits.get(vname)
        if differs and not differs.startswith("not checked"):
            rows[-1]["bits_differ"] = differs
        if printing:
            check = profiled.get("gpu_ms_by_name", {}).get("lo_cuda_finite")
            kernels = f"  kernels {dev:.3f} ms" if isinstance(dev, float) else ""
            kernels += f" (NaN check {check:.3f})" if check else ""
            print(f"{wname:11s} {vname:13s} {mode:24s} {ms:8.3f} ms  {ms / base:6.2f}x torch fused", end="")
            print(f"  {gbps:7.1f} GB/s{kernels}")
    chosen = choose(rows)
    if printing:
        for vname, differs in bits.items():
            print(f"bits of {vname}: {differs or 'those of the native kernels, every tensor'}")
        for family, x in chosen["families"].items():
            print(f"{family} kernels: chosen {x['chosen'] or 'default'} (by {x['metric']}; scores {x['scores']})")
        print(f"LEANOPT_GPU_VARIANT={chosen['env']!r}")
    write_rows(out, "python benchmarks/gpu_variants.py " + " ".join(sys.argv[1:]), rows, **extra, chosen=chosen,
               bits={v: d or "same" for v, d in bits.items()})  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cuda, or cpu (emulated kernels: checks the script)")
    ap.add_argument("--workloads", default=None, help="default: tensor50m,gpt2-small,many-small on cuda, tiny on cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        gpu.EMULATE = True
    _reuse_parameter_values()
    on_gpu = "tensor50m,gpt2-small,many-small"
    workloads = bench.resolve_workloads(args.workloads or (on_gpu if device.type == "cuda" else "tiny"), None, False)
    torch_fused = [c for c in bench._torch_cases("adamw") if c.key == "torch-fused"]
    cases = {m: bench.leanopt_case("adamw", m) for m in MODES}
    default = dict(gpu.VARIANT)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        ap.error(f"--variants: unknown {unknown or 'empty'}; accepted: {', '.join(VARIANTS)}")
    runs: dict[tuple, list[bench.Result]] = {}
    gpu_ms: dict[tuple, dict | None] = {}
    bits: dict[str, str | None] = {}
    extra = {"device": bench._device_name(device), "default_variant": default,
             "variants": {v: VARIANTS[v][0] for v in chosen}}  # fmt: skip
    try:
        for done in range(1, args.rounds + 1):
            for wname, ws in workloads.items():
                for case in torch_fused:
                    runs.setdefault((wname, "-", case.key), []).append(
                        bench.run_case(wname, ws.shapes, case, device, args.steps, 3)
                    )
                    profile_once(gpu_ms, (wname, "-", case.key), case, ws.shapes, device)
                for vname in chosen:
                    variant, modes = VARIANTS[vname]
                    gpu.VARIANT.update(default)
                    gpu.VARIANT.update(variant)
                    gpu.reset()
                    if vname not in bits:  # once, before it is timed: are its bits the native kernels'?
                        try:
                            bits[vname] = bits_differ(device)
                        except Exception as err:  # noqa: BLE001 - recorded: the variant is not chosen
                            bits[vname] = f"{type(err).__name__}: {err}"[:300]
                        gpu.reset()
                    for mode in modes:
                        case = cases[mode]
                        runs.setdefault((wname, vname, mode), []).append(
                            bench.run_case(wname, ws.shapes, case, device, args.steps, 3)
                        )
                        profile_once(gpu_ms, (wname, vname, mode), case, ws.shapes, device)
            report(runs, gpu_ms, args.out, extra | {"rounds_done": done}, printing=done == args.rounds, bits=bits)
    finally:
        gpu.VARIANT.update(default)
        gpu.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
