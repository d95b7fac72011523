"""Host time of a planned kernel="fused" CUDA step (``optimizer.step()`` repeating the last step's launches
by its plan, ``gpu.run_plan``) for this revision against another git revision's leanopt, stepped
alternately in one process: the ratio of the two, side by side, where separate runs on a noisy 2-core VM
differ by up to 2x between processes.

The other revision's package is unpacked next to this one under another name (``leanopt_at_<rev>``;
leanopt's own modules import each other relatively) and each revision steps its own optimizer over its
own copies of the same tensors. On a machine without a GPU (default ``--device cpu``) the CUDA path runs
emulated with the kernels replaced by no-ops: only the host's work is timed. With ``--device cuda`` the
real kernels are queued, and each timing ends with a synchronise.

    python benchmarks/gpu_plan_host.py --against 855b674      # -> benchmarks/results/gpu_plan_host.json
    python benchmarks/gpu_plan_host.py --against 855b674 --device cuda --out /tmp/p.json
    python benchmarks/gpu_plan_host.py --against .ab/src   # another revision's src (git archive REV src)
"""

from __future__ import annotations

import argparse
import importlib
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _results import write_rows  # benchmarks/_results.py

import leanopt

OUT = Path(__file__).resolve().parent / "results" / "gpu_plan_host.json"
ROOT = Path(__file__).resolve().parent.parent


def package_at(against: str, folder: Path):  # noqa: ANN201 - a module
    """leanopt as ``against`` has it (a git revision of this repository, or a src folder), imported as
    ``leanopt_at_<name>`` from a copy in ``folder``."""
    name = "leanopt_at_" + "".join(c if c.isalnum() else "_" for c in against)
    there = Path(against)
    if there.is_dir():
        if not (there / "leanopt" / "__init__.py").is_file():
            raise SystemExit(f"--against {against!r}: no leanopt/__init__.py in that folder; give a src folder")
        shutil.copytree(there / "leanopt", folder / name)
    else:
        out = subprocess.run(["git", "archive", against, "src/leanopt"], cwd=ROOT, capture_output=True)
        if out.returncode != 0:
            why = out.stderr.decode().strip()
            raise SystemExit(f"--against {against!r}: git cannot archive src/leanopt there ({why}); "
                             "give a commit of this repository or a src folder")  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
            try:
                tar.extractall(folder / "x", filter="data")
            except TypeError:  # a Python without extraction filters (git's own archive: trusted)
                tar.extractall(folder / "x")
        shutil.move(folder / "x" / "src" / "leanopt", folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def planned(pkg, device: str, tensors: int, states: str, nonfinite: str):  # noqa: ANN001, ANN201
    """compact/``states`` AdamW of package ``pkg`` over ``tensors`` 64 x 64 bf16 tensors after 3 steps:
    its next step is planned."""
    gpu = importlib.import_module(pkg.__name__ + ".kernels.gpu")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=gen).bfloat16().to(device)) for _ in range(tensors)]
    opt = pkg.AdamW(params, lr=1e-3, master="compact", states=states, kernel="fused", nonfinite=nonfinite)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    if not isinstance(opt._step_plan, gpu.GpuStepPlan):
        raise SystemExit(f"{pkg.__name__}: the step was not planned ({device}, {states}, {nonfinite})")
    if device == "cpu":  # the host's work alone: kernels replaced by no-ops (all gradients read as finite)
        for k in gpu.compile_stats():
            k.fn = lambda *a: None
        gpu._FINITE[torch.device("cpu"), gpu.VARIANT["chunks"]] = lambda *a: None
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--against", metavar="REV", required=True,
        help="the git revision to compare with, or its src folder (git archive REV src | tar -x -C DIR)",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tensors", default="1,8,64", help="comma-separated tensor counts (default 1,8,64)")
    ap.add_argument("--calls", type=int, default=500, help="steps per timing (default 500)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    try:
        counts = [int(n) for n in args.tensors.split(",")]
    except ValueError:
        raise SystemExit(f"--tensors: comma-separated whole numbers, got {args.tensors!r}") from None
    if args.calls < 1 or args.rounds < 1 or min(counts) < 1:
        raise SystemExit("--calls, --rounds and each of --tensors must be at least 1")
    folder = Path(tempfile.mkdtemp(prefix="leanopt-against-"))
    try:
        old = package_at(args.against, folder)
        packages = {"this revision": leanopt, f"at {args.against}": old}
        if args.device == "cpu":
            for pkg in packages.values():
                importlib.import_module(pkg.__name__ + ".kernels.gpu").EMULATE = True
        rows = []
        for states in ("int8", "fp32"):
            for nonfinite in ("skip", "ignore"):
                for count in counts:
                    opts = {name: planned(pkg, args.device, count, states, nonfinite) for name, pkg in packages.items()}

                    def timed(opt) -> float:  # noqa: ANN001
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            opt.step()
                        opt.last_skipped  # noqa: B018 - the last step's verdicts read, as the next step would
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        return (time.perf_counter() - start) / args.calls * 1e6

                    for opt in opts.values():
                        timed(opt)  # warm-up
                    per: dict[str, list[float]] = {name: [] for name in opts}
                    for r in range(args.rounds):  # alternately, the order swapped each round
                        for name in list(opts)[:: 1 if r % 2 == 0 else -1]:
                            per[name].append(timed(opts[name]))
                    for name, opt in opts.items():
                        if opt._step_plan is None:
                            raise SystemExit(f"{name}: the steps were not planned")
                    this, then = (statistics.median(v) for v in per.values())
                    ratios = [a / b for a, b in zip(*per.values(), strict=True)]
                    row = {"states": states, "nonfinite": nonfinite, "tensors": count,
                           "us_per_step": round(this, 2), "us_per_step_against": round(then, 2),
                           "ratio_median": round(statistics.median(ratios), 3),
                           "ratios": [round(x, 3) for x in ratios]}  # fmt: skip
                    rows.append(row)
                    print(f"compact/{states:4} {nonfinite:6} {count:3} tensors: {this:8.1f} us per step, at "
                          f"{args.against} {then:8.1f} us: {row['ratio_median']:.3f}x")  # fmt: skip
                    del opts
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_rows(args.out, "python benchmarks/gpu_plan_host.py " + " ".join(sys.argv[1:]), rows,
               against=args.against, device=args.device, emulated_no_op_kernels=args.device == "cpu")  # fmt: skip


if __name__ == "__main__":
    main()
