"""Instructions a warp issues in leanopt's CUDA kernels, counted without a GPU: each kernel compiled by
NVRTC for one architecture (as a step compiles it, ``gpu.nvrtc_compile``), disassembled by NVIDIA's
``nvdisasm``, and its main function walked along the common path: every division's and square root's
fast path (the calls to CUDA's slow-path routines, for operands near the ends of the range, skipped),
the search for a block's tensor run its rounds for ``--tensors`` (148: GPT-2's), a flat kernel's
chunk loop ``chunks`` times, an element that exists (no early exit), 16-byte loads where there are
(an aligned tensor), and for int8/int4 states rows of whole groups of 32 (the test for it set to 1 in
the source before compiling; ``per_element_ragged_rows``: set to 0). Printed per element: the walked
instructions of a block's warps (the first, which may search for the block's tensor, and 7 others) over
the elements they update (a warp: 32 x groups per warp for int8/int4 states, 32 x 4 x chunks for the
flat ones, 32 x 16 bf16 values x chunks for the NaN/inf check).

Why count: on an H200 the int8/int4 kernels ran at 0.4-0.5 TB/s where a copy moves 3.6, and an estimate
from the code put them at the GPU's instruction issue rate (docs/kernels.md, "On an H200"). Where that
holds, fewer instructions per element is a faster kernel; this script measures the count, a GPU run
(``FULL=1 bash benchmarks/gpu_check.sh``) the time. A static count is not a time: it ignores memory
latency, occupancy and how instructions pair; use it to compare code shapes of the same kernel.

Needs NVRTC (``pip install 'leanopt[nvrtc]'``) and nvdisasm (``pip install nvidia-cuda-nvdisasm``, or
``$LEANOPT_NVDISASM``).

    python benchmarks/sass_count.py                           # -> benchmarks/results/sass_count.json
    python benchmarks/sass_count.py --variants "" groups=4,table=1 --modes compact/int8
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from _results import write_rows  # benchmarks/_results.py
from _revision import kernels_module_at  # benchmarks/_revision.py

import leanopt
from leanopt.kernels import gpu, native

OUT = Path(__file__).resolve().parent / "results" / "sass_count.json"
MODES = ["exact/fp32", "compact/int8", "compact/int4", "stochastic/int8"]
VARIANTS = [
    "",
    "search=1",
    "search=2",
    "table=1",
    "groups=2",
    "groups=4",
    "groups=4,search=2",
    "chunks=4",
    "chunks=4,search=2",
]
#: calls on a division's or square root's slow path, a 64-bit division's (taken when operands need it), or
#: the NaN/inf check's element-by-element code (a tensor's last values, or a misaligned tensor)
SLOW_CALLS = ("slowpath", "div_s64", "div_u64", "rem_s64", "rem_u64", "lo_check_rest")
#: the most instructions a branch around such a call skips (its arguments, the call, the result's moves)
SLOW_BLOCK = 16


#: the grouped kernels' test for rows of whole groups (since 2026-11-30): set to 1 (0) to count that path
#: alone (the compiler lays it out as a branch target, which the walk would not follow)
WHOLE_ROWS = "(n & 31) == 0"


def find_nvdisasm() -> str | None:
    """``$LEANOPT_NVDISASM``, else the one the ``nvidia-cuda-nvdisasm`` wheel installs, else on PATH."""
    if os.environ.get("LEANOPT_NVDISASM"):
        return os.environ["LEANOPT_NVDISASM"]
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        for root in nvidia.__path__:
            found = sorted(glob.glob(os.path.join(root, "*", "bin", "nvdisasm")))
            if found:
                return found[-1]
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def parse(sass: str, function: str = "lo_cuda") -> tuple[list[str], dict[str, int]]:
    """The instructions of ``function`` (without the routines nvdisasm prints after it) and its labels'
    positions among them."""
    head = f".text.{function}:"
    if head not in sass:
        raise ValueError(f"no function {function!r} in the disassembly")
    body = re.split(r"\n\$__internal", sass.split(head, 1)[1])[0]
    body = re.split(r"\n\s*//-+ \.text\.", body)[0]
    ins: list[str] = []
    labels: dict[str, int] = {}
    for line in body.split("\n"):
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ins)
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;?\s*$", line)
        if m:
            ins.append(m.group(1))
    return ins, labels


def _wide(ins: list[str], start: int, span: int = 48) -> bool:
    """Whether the code from ``start``, falling through conditional branches, loads 16 bytes at once
    within ``span`` instructions (before an unconditional branch or exit)."""
    for x in ins[start : start + span]:
        if ".128" in x and re.search(r"\bLDG?\.", x):
            return True
        if re.match(r"^(BRA|EXIT)\b", x):
            return False
    return False


def walk(
    ins: list[str],
    labels: dict[str, int],
    loops: list[int],
    limit: int = 1_000_000,
    trace: list[str] | None = None,
    searcher: bool = True,
) -> int:
    """Instructions issued along the common path from the first instruction to an unpredicated EXIT:
    a conditional branch over a short block (SLOW_BLOCK) that calls a slow-path routine is taken, one
    to 16-byte loads from code without them is taken (aligned tensors, whole loads), one around the
    search for the block's tensor (a ballot) taken unless ``searcher`` (the warp that searches for the
    block since 2026-11-30; before, every warp did), other conditional
    branches and exits fall through, and the k-th loop met (a backward branch) runs ``loops[k]`` times
    (1 past the list's end)."""
    pc = count = 0
    seen: dict[int, int] = {}  # backward branch -> its loop's number
    taken: dict[int, int] = {}
    while pc < len(ins):
        count += 1
        if trace is not None:
            trace.append(ins[pc])
        if count > limit:
            raise RuntimeError("the walk does not end (a loop without an exit?)")
        m = re.match(r"^(@!?U?P\w+\s+)?(BRA|EXIT)\b(.*)", ins[pc])
        if not m:
            pc += 1
            continue
        pred, op, rest = m.groups()
        if op == "EXIT":
            if not pred:
                return count
            pc += 1
            continue
        target = re.search(r"\((\.L_x_\d+)\)", rest)
        if target is None:  # an indirect branch: not in these kernels
            raise ValueError(f"cannot follow {ins[pc]!r}")
        to = labels[target.group(1)]
        if not pred:
            pc = to
        elif to <= pc:  # a loop's backward branch
            k = seen.setdefault(pc, len(seen))
            runs = loops[k] if k < len(loops) else 1
            taken[pc] = taken.get(pc, 0) + 1
            if taken[pc] < runs:
                pc = to
            else:
                taken[pc] = 0
                pc += 1
        elif to - pc <= SLOW_BLOCK and any("CALL" in x and any(s in x for s in SLOW_CALLS) for x in ins[pc + 1 : to]):
            pc = to  # around a slow path
        elif not searcher and any(x.startswith("VOTE") for x in ins[pc + 1 : to]):
            pc = to  # around the search for the block's tensor: another warp than the block's first
        elif _wide(ins, to) and not _wide(ins, pc + 1):
            pc = to  # to the 16-byte loads (an aligned tensor), not the element-by-element code
        else:
            pc += 1
    return count


def gpu_at(rev: str) -> types.ModuleType:
    """leanopt.kernels.gpu as it was at git revision ``rev`` (the rest of the package as it is now)."""
    return kernels_module_at(rev, "gpu")


def search_rounds(module, tensors: int) -> int:  # noqa: ANN001 - a gpu module
    """Rounds of ``module``'s search for a block's tensor among ``tensors``: a warp's 32-way search
    (since 2026-11-30) or a binary search (before, and ``search=0``)."""
    source = getattr(module, "_FIND_BODY", getattr(module, "_FIND", ""))
    ballot = "__ballot_sync" in source and module.VARIANT.get("search", 1) > 0
    rounds, span = 0, tensors
    while span > 1:
        span = -(-span // 32) if ballot else span - span // 2
        rounds += 1
    return max(rounds, 1)


def kernel_source(mode: str, gpu=gpu) -> tuple[str, bool]:  # noqa: ANN001 - a gpu module (gpu_at)
    """The CUDA source of AdamW's kernel in ``mode`` ("master/states", bf16 weights and gradients, the
    benchmark's settings) under ``gpu.VARIANT``, and whether it is a grouped kernel."""
    master, states = mode.split("/")
    p = torch.nn.Parameter(torch.randn(4, 64).bfloat16())
    opt = leanopt.AdamW([p], lr=1e-3, master=master, states=states)
    group = opt.param_groups[0]
    spec, _ = native.plan(opt.rule, *opt.formats(p, group), p, torch.bfloat16, opt._init_state(p, group), group)
    spec = getattr(gpu, "for_gpu", lambda s: s)(spec)  # (revisions before 2026-11-30 evening: fp16 twins)
    if spec is None:
        raise SystemExit(f"{mode}: no CUDA kernel for it")
    return gpu.generate(spec, gpu.scalar_count(spec)), spec.grouped


def count(nvrtc, nvdisasm: str, source: str, name: str, arch: str, loops: list[int]) -> dict:
    cubin, _, log = gpu.nvrtc_compile(nvrtc, source, name, arch, ("--ptxas-options=-v",))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"nvdisasm failed: {out.stderr.strip()}")
    ins, labels = parse(out.stdout, name)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    first = walk(ins, labels, loops)
    # the other warps of a block skip the search only where the block's first warp searches for them all
    # (``#define LO_SEARCH 2``); else every warp walks the same path (the ballot of ``search=1`` is in a
    # branch over the search too - its loop's - which the rule for the shared search must not take)
    other = walk(ins, labels, loops, searcher=False) if "#define LO_SEARCH 2" in source else first
    return {"static": len(ins), "walked": first, "walked_other_warps": other,
            "registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None}  # fmt: skip


def measure(module, label: str, args: argparse.Namespace, nvrtc, nvdisasm: str) -> list[dict]:  # noqa: ANN001
    """Rows of ``module``'s kernels (leanopt.kernels.gpu, or gpu_at a revision) for each variant and mode."""
    base = dict(module.VARIANT)
    rows = []
    try:
        for variant in args.variants:
            try:
                chosen = module.parse_variant(variant)
            except ValueError:  # a key this revision's gpu.py does not have
                print(f"{variant}{label}: not in that revision's variants, skipped")
                continue
            module.VARIANT.clear()
            module.VARIANT.update(base, **chosen)
            for mode in [*args.modes, "nan check"]:
                if mode == "nan check":
                    source, name, grouped = module._finite_source(module.VARIANT["chunks"]), "lo_cuda_finite", False
                else:
                    (source, grouped), name = kernel_source(mode, module), "lo_cuda"
                chunks = 1 if grouped else module.VARIANT["chunks"]
                per_group = getattr(module, "groups_per_warp", lambda: module.VARIANT["groups"])()  # (lanes: 32)
                per_warp = 32 * per_group if grouped else 32 * module.ITEMS * chunks
                if mode == "nan check" and hasattr(module, "CHECK_BYTES"):  # (since 2026-11-30)
                    loads = module.CHECK_BYTES // module.THREADS // 16  # 16-byte loads a thread, per chunk
                    chunks, per_warp = loads * chunks, 32 * loads * 8 * chunks  # bf16: 8 values a load
                loops = [search_rounds(module, args.tensors), chunks]
                whole = source.replace(WHOLE_ROWS, "1")  # the path of rows of whole groups, known
                row = {"variant": (variant or "default") + label, "mode": mode, "elements_per_warp": per_warp,
                       **count(nvrtc, nvdisasm, whole, name, args.arch, loops)}  # fmt: skip
                warps = module.WARPS  # a block's: the first may search for the block's tensor, the others not
                row["walked_block"] = row["walked"] + (warps - 1) * row["walked_other_warps"]
                row["per_element"] = round(row["walked_block"] / (warps * per_warp), 2)
                if WHOLE_ROWS in source:  # rows ending in a partial group (the warp's row by a division)
                    ragged = count(nvrtc, nvdisasm, source.replace(WHOLE_ROWS, "0"), name, args.arch, loops)
                    block = ragged["walked"] + (warps - 1) * ragged["walked_other_warps"]
                    row["per_element_ragged_rows"] = round(block / (warps * per_warp), 2)
                rows.append(row)
                print(
                    f"{row['variant']:>24} {mode:>16}: {row['walked_block']:5d} instructions per block,"
                    f" {row['per_element']:6.2f} per element ({row['static']} static, {row['registers']} registers)"
                )
    finally:
        module.VARIANT.clear()
        module.VARIANT.update(base)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--modes", nargs="+", default=MODES, help="master/states of AdamW, e.g. compact/int8")
    parser.add_argument("--variants", nargs="+", default=VARIANTS,
                        help='LEANOPT_GPU_VARIANT strings ("" = gpu.VARIANT as it stands)')  # fmt: skip
    parser.add_argument(
        "--tensors",
        type=int,
        default=148,
        help="tensors in the launch, for the rounds of the search for a block's tensor (GPT-2: 148)",
    )
    parser.add_argument("--against", metavar="REV", help="also count the kernels gpu.py at git revision REV makes")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    nvrtc, nvdisasm = gpu.find_nvrtc(), find_nvdisasm()
    if nvrtc is None or nvdisasm is None:
        print("needs NVRTC (pip install 'leanopt[nvrtc]') and nvdisasm (pip install nvidia-cuda-nvdisasm)",
              file=sys.stderr)  # fmt: skip
        return 2
    rows = []
    for label, module in [("", gpu), *([(f" at {args.against}", gpu_at(args.against))] if args.against else [])]:
        rows += measure(module, label, args, nvrtc, nvdisasm)
    write_rows(args.out, "python benchmarks/sass_count.py " + " ".join(sys.argv[1:]), rows, arch=args.arch,
               tensors=args.tensors, nvrtc_options=list(gpu.NVRTC_OPTIONS))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
