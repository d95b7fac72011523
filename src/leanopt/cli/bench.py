"""``leanopt bench``: the kernel benchmark. Optimizer-step speed against memory bandwidth, leanopt's modes
next to torch.optim's fused and foreach AdamW and the peers (torchao, bitsandbytes, optimi; FlashOptim on
CUDA), in one run.

For each workload (default: GPT-2 small's 148 parameter tensors, 124M parameters, and one 50M-element
tensor) and each optimizer it times ``optimizer.step()`` on fixed random gradients (the median of the
timed steps; the first step, which includes any kernel compilation, is reported apart) and derives

- persistent bytes per parameter (weights + gradient + optimizer state, read from the tensors held),
- bytes touched per parameter per step: every persistent byte but the gradient's is read and written
  once, the gradient is read once,
- achieved GB/s = touched bytes / step time, the bandwidth bound = touched bytes / the GB/s of a plain
  fp32 copy measured in the same run, and the step's ratio to that bound and to torch's fused AdamW;
- the ratio to a tighter bound: the touched bytes at the GB/s of an in-place fp32 stream (``x.mul_(-1.0)``:
  read and written in place, as an optimizer step does; a copy's writes to fresh lines also read them
  first on most CPUs, so a copy's GB/s can sit well below what a step reaches).

It prints a table and the targets of the kernel work (CPU, AdamW: leanopt exact/fp32 at most 1.0x torch's
fused fp32 AdamW, compact/int8 at most 0.8x, every leanopt mode within 1.5x of its bandwidth bound), each
marked met or missed from the measured figures, and writes every figure as JSON. Peers are optional
(``pip install 'leanopt[bench]'``); one that is missing or fails is recorded with its error.
``benchmarks/kernels.py`` is this command with ``--out benchmarks/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import CLIError, busy_note, detect_features, jsonable, loadavg, table
from .plan import OPTIMIZERS, Mode, ModelShapes, Shape, check_mode, resolve_model

EXAMPLES = """\
examples:
  leanopt bench                                  # GPT-2 small shapes + one 50M tensor, peers included
  leanopt bench --quick                          # seconds: tiny shapes, 2 steps, no peers
  leanopt bench --workloads tensor50m --steps 10
  leanopt bench --size 10M --modes exact/fp32,compact/int8 --out bench.json
  leanopt bench --size path/to/config.json --optimizer sgd
  leanopt bench --device cuda --modes all        # adds FlashOptim on CUDA
"""

#: named workloads besides the models ``resolve_model`` knows (gpt2-small, counts, config.json, ...)
SPECIAL_WORKLOADS: dict[str, tuple[str, list[Shape]]] = {
    # 2-D so that row-grouped quantised states apply to it
    "tensor50m": ("one 50M-element tensor", [(12_500, 4_000)]),
    # --quick: small enough for a test, 2-D tensors with rows of 256 plus a vector
    "tiny": ("a few small tensors (--quick)", [(256, 256), (512, 256), (256,)]),
    # per-tensor overhead: what a launch (and the Python around it) costs when tensors are small
    "many-small": ("500 tensors of 64 x 64", [(64, 64)] * 500),
}
DEFAULT_WORKLOADS = "gpt2-small,tensor50m"
TORCH_FUSED = "torch-fused"


# ------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    """One optimizer to time. ``key`` is what ``--modes`` accepts, ``name`` what the table prints."""

    key: str
    name: str
    dtype: torch.dtype
    build: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    kind: str  # baseline | leanopt | peer
    device_types: tuple[str, ...] = ("cpu", "cuda")


def _torch_cases(optimizer: str) -> list[Case]:
    """torch.optim's fused and foreach implementations on fp32 parameters (torch has no Lion)."""
    hyper = {"sgd": {"momentum": 0.9}}.get(optimizer, {})
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}.get(optimizer)
    if cls is None:
        return []
    return [
        Case(f"torch-{impl}", f"torch {cls.__name__} fp32 {impl}", torch.float32,
             lambda ps, impl=impl: cls(ps, lr=1e-4, **hyper, **{impl: True}), "baseline")
        for impl in ("fused", "foreach")
    ]  # fmt: skip


def _peer(module: str, path: str, **kwargs: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """A builder for ``module.path(params, lr=1e-4, **kwargs)``, importing ``module`` only when called."""

    def build(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        import importlib

        obj: Any = importlib.import_module(module)
        for name in path.split("."):
            obj = getattr(obj, name)
        return obj(ps, lr=1e-4, **kwargs)

    return build


#: the peers, all AdamW on bf16 parameters (installed by ``pip install 'leanopt[bench]'``)
PEERS: list[Case] = [
    Case("torchao-8bit", "torchao AdamW8bit", torch.bfloat16, _peer("torchao.optim", "AdamW8bit"), "peer"),
    Case("torchao-4bit", "torchao AdamW4bit", torch.bfloat16, _peer("torchao.optim", "AdamW4bit"), "peer"),
    Case("bnb-8bit", "bitsandbytes AdamW8bit", torch.bfloat16, _peer("bitsandbytes", "optim.AdamW8bit"), "peer"),
    Case("optimi-kahan", "optimi AdamW kahan", torch.bfloat16, _peer("optimi", "AdamW", kahan_sum=True), "peer"),
    Case("flashoptim", "FlashOptim AdamW", torch.bfloat16, _peer("flashoptim", "FlashAdamW"), "peer", ("cuda",)),
]  # fmt: skip
DEFAULT_LEANOPT = ["exact/fp32", "exact/fp32:ignore", "compact/int8", "compact/int4"]
MORE_LEANOPT = ["exact/bf16", "exact/fp32@reference"]  # in --modes all


def leanopt_case(optimizer: str, spec: str, **options: Any) -> Case:
    """leanopt in mode ``MASTER/STATES``, optionally ``@KERNEL`` (``exact/fp32@reference``) and
    ``:NONFINITE`` (``exact/fp32:ignore``: no per-tensor finiteness check, like torch.optim), bf16 params."""
    import leanopt

    spec, _, nonfinite = spec.partition(":")
    text, _, kernel = spec.partition("@")
    mode = Mode.parse(text)
    if mode.release:
        raise CLIError(f"--modes {spec!r}: bench times optimizer.step() alone; drop '+release'")
    check_mode(mode, detect_features())
    cls_name, hyper = OPTIMIZERS[optimizer]
    cls = getattr(leanopt, cls_name)
    opts = {**options, **({"kernel": kernel} if kernel else {}), **({"nonfinite": nonfinite} if nonfinite else {})}
    if opts:  # check kernel= now, on a meta parameter, so that a bad one is a one-line error
        try:
            cls([nn.Parameter(torch.empty(2, dtype=torch.bfloat16, device="meta"))], **opts)
        except (ValueError, TypeError) as err:
            raise CLIError(f"--modes/--kernel {text!r}: {err}") from None
    return Case(
        mode.name + (f"@{kernel}" if kernel else "") + (f":{nonfinite}" if nonfinite else ""),
        f"leanopt {mode.name}" + (f" {kernel}" if kernel else "") + (f" nonfinite={nonfinite}" if nonfinite else ""),
        torch.bfloat16,
        lambda ps: cls(ps, lr=1e-4, master=mode.master, states=mode.states, **hyper, **opts),
        "leanopt",
    )


def select_cases(optimizer: str = "adamw", modes: str = "default", quick: bool = False, **options: Any) -> list[Case]:
    """The cases ``--modes`` names: ``default``, ``all``, or a comma list of keys or names (``torch-fused``,
    ``exact/fp32``, ``torchao-8bit``, ``"torch AdamW fp32 fused"``, ...). torch's fused step is added first
    when the list lacks it, since every ratio is taken against it. ``quick`` leaves the peers out of
    ``default`` (their first steps compile for up to a minute). ``options`` go to the leanopt optimizers."""
    features = detect_features()
    torch_cases = _torch_cases(optimizer)
    peers = PEERS if optimizer == "adamw" else []

    def installed(spec: str) -> bool:
        m = Mode.parse(spec.partition(":")[0].partition("@")[0])
        return features.has_master(m.master) and features.has_states(m.states)

    tokens = [t.strip() for t in modes.split(",") if t.strip()]
    if tokens in (["default"], ["all"]):
        lean = DEFAULT_LEANOPT + (MORE_LEANOPT if tokens == ["all"] else [])
        cases = torch_cases + [leanopt_case(optimizer, s, **options) for s in lean if installed(s)]
        return cases + ([] if quick and tokens == ["default"] else peers)
    if {"default", "all"} & set(tokens):
        raise CLIError(f"--modes {modes!r}: 'default' and 'all' stand alone; otherwise give a comma list of modes")
    known = {c.key: c for c in torch_cases + peers} | {c.name.lower(): c for c in torch_cases + peers}
    cases = []
    for token in tokens:
        if token.lower() in known:
            cases.append(known[token.lower()])
        elif any(token.lower() in (c.key, c.name.lower()) for c in _torch_cases("adamw") + PEERS):
            raise CLIError(f"--modes {token!r} does not exist for --optimizer {optimizer}; drop it")
        elif "/" in token:
            cases.append(leanopt_case(optimizer, token.removeprefix("leanopt ").replace(" ", "@"), **options))
        else:
            keys = [c.key for c in torch_cases + peers]
            accepted = ", ".join(["default", "all", *keys, "MASTER/STATES[@KERNEL][:NONFINITE]"])
            raise CLIError(f"--modes: unknown mode {token!r}; accepted: {accepted}")
    if not cases:
        raise CLIError("--modes is empty; accepted: default, all or a comma list such as exact/fp32,torchao-8bit")
    if torch_cases and not any(c.kind == "baseline" for c in cases):
        cases.insert(0, torch_cases[0])  # the ratios need torch's fused step
    return list({c.key: c for c in cases}.values())


# ------------------------------------------------------------------------------------ measuring


def make_params(
    shapes: list[Shape], dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> list[nn.Parameter]:
    """Parameters of ``shapes`` with fixed random values and gradients (the same for every dtype)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    opt: torch.optim.Optimizer, steps: int, warmup: int = 1, host: list[float] | None = None
) -> list[float]:  # fmt: skip
    """Seconds per ``opt.step()`` for ``steps`` steps after ``warmup`` untimed ones (gradients stay set),
    each to the end of its GPU work (synchronised); ``host``, if given, gets each step's time until
    ``step()`` returned (on CUDA the host's part: launches are asynchronous). The learning rate
    changes before every timed step: a step that recompiles for it shows up here."""
    device = next(p.device for g in opt.param_groups for p in g["params"])
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for i in range(steps):
        _vary_lr(opt, i)
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if host is not None:
            host.append(t1 - t0)
    return times


def back_to_back(opt: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per ``opt.step()`` over ``steps`` steps run back to back with one synchronise at the end
    (the learning rate changing before each, as in :func:`time_steps`): on CUDA the host's and the
    GPU's work overlap, as in a training loop that does not wait after each step."""
    device = next(p.device for g in opt.param_groups for p in g["params"])
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        _vary_lr(opt, i)
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _vary_lr(opt: torch.optim.Optimizer, i: int) -> None:
    """A new (float) learning rate before timed step ``i``: a path that rebuilds for one shows up."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = 1e-4 * (1 + 0.01 * i)


def _best_gbps(device: torch.device, fn: Callable[[], Any], nbytes: int, reps: int) -> float:
    """GB/s of ``fn`` moving ``nbytes``: the best of ``reps`` runs after one untimed, i.e. the attainable
    bandwidth (on a shared machine the median moves with the load)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return nbytes / min(times) / 1e9


def copy_gbps(device: torch.device, n: int = 50_000_000, reps: int = 7) -> float:
    """Plain fp32 copy bandwidth (read + write bytes per second, GB/s), best of ``reps``."""
    src = torch.full((n,), 1.5, device=device)  # a copy does not care about the values; drawing them is slow
    dst = torch.empty_like(src)
    return _best_gbps(device, lambda: dst.copy_(src), 8 * n, reps)


def inplace_gbps(device: torch.device, n: int = 50_000_000, reps: int = 7) -> float:
    """In-place fp32 stream bandwidth (``x.mul_(-1.0)``: read + write bytes per second, GB/s), best of
    ``reps``: the access pattern of an optimizer step, whose writes go to lines it has just read."""
    x = torch.full((n,), 1.5, device=device)
    return _best_gbps(device, lambda: x.mul_(-1.0), 8 * n, reps)


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a tensor subclass (torchao keeps codes and scales in one)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) in (torch.Tensor, nn.Parameter) or flatten is None:
        return [t]
    return [inner for name in flatten()[0] for inner in _plain_tensors(getattr(t, name))]


def held_bytes(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held by weights, gradients and optimizer state (leanopt's master bits included), counting each
    storage once. Works for any optimizer, tensor-subclass states included."""
    seen: set[tuple[torch.device, int]] = set()
    out = {"weights": 0, "gradients": 0, "state": 0}

    def add(category: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            return
        for t in _plain_tensors(value):
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                out[category] += storage.nbytes()

    for p in params:
        add("weights", p)
        add("gradients", p.grad)
    for state in opt.state.values():
        for value in state.values():
            add("state", value)
    return out


@dataclass
class Result:
    """One (workload, case) measurement. Times in ms except ``first_step_s``; bytes per parameter."""

    workload: str
    mode: str
    key: str
    kind: str
    params: int = 0
    status: str = "ok"  # ok | not installed | skipped | error
    error: str = ""
    first_step_s: float = 0.0
    step_ms: float = 0.0
    min_ms: float = 0.0
    step_ms_all: list[float] = field(default_factory=list)
    #: median time until ``step()`` returned: on CUDA the host's part of a step (the rest is the GPU's)
    host_ms: float = 0.0
    host_ms_all: list[float] = field(default_factory=list)
    #: CUDA: ms per step of as many steps back to back, one wait at the end (as in training, where the
    #: host prepares a step while the GPU still runs the work before it); 0 elsewhere (the same as step_ms)
    pipelined_ms: float = 0.0
    bytes_by_category: dict[str, int] = field(default_factory=dict)
    bytes_per_param: float = 0.0
    touched_bytes_per_param: float = 0.0
    achieved_gbps: float = 0.0
    bound_ms: float = 0.0
    ratio_to_bound: float = 0.0
    ratio_to_torch_fused: float = 0.0
    kernels_used: list[str] = field(default_factory=list)
    round_ms: list[float | None] = field(default_factory=list)  # --rounds: each round's median (None: failed)
    round_ratios: list[float] = field(default_factory=list)  # each round's step_ms / torch fused's
    #: the plain copy's GB/s measured just before this case ran (0: not measured), and per round
    copy_gbps: float = 0.0
    round_copy_gbps: list[float | None] = field(default_factory=list)
    #: the same for the in-place stream (``inplace_gbps``), and the step against that tighter bound
    inplace_gbps: float = 0.0
    round_inplace_gbps: list[float | None] = field(default_factory=list)
    inplace_bound_ms: float = 0.0
    ratio_to_inplace_bound: float = 0.0


def _kernel_records() -> dict[tuple[str, Any], Any]:
    """leanopt's compiled kernels so far, from the executors that report them (``compile_stats()`` of
    ``leanopt.kernels.native``, ``.fused`` and ``.gpu``: records with ``key`` and ``calls``)."""
    import importlib

    records = {}
    for name in ("native", "fused", "gpu"):
        try:
            stats = getattr(importlib.import_module(f"leanopt.kernels.{name}"), "compile_stats", None)
        except ImportError:
            continue
        if callable(stats):
            records.update({(name, r.key): r for r in stats()})
    return records


def run_case(
    workload: str, shapes: list[Shape], case: Case, device: torch.device, steps: int = 3, warmup: int = 1
) -> Result:
    """Time ``case`` on fresh parameters of ``shapes``. Never raises for the optimizer's own failures:
    a peer that is missing or cannot run is a result too (``status``, ``error``)."""
    res = Result(workload, case.name, case.key, case.kind)
    if device.type not in case.device_types:
        res.status, res.error = "skipped", f"runs on {'/'.join(case.device_types)} only"
        return res
    params: list[nn.Parameter] = []
    opt = None
    before = {k: r.calls for k, r in _kernel_records().items()} if case.kind == "leanopt" else {}
    try:
        params = make_params(shapes, case.dtype, device)
        res.params = sum(p.numel() for p in params)
        opt = case.build(params)
        _sync(device)
        t = time.perf_counter()
        opt.step()
        _sync(device)
        res.first_step_s = time.perf_counter() - t
        host: list[float] = []
        times = time_steps(opt, steps, max(warmup - 1, 0), host)
        res.host_ms, res.host_ms_all = 1e3 * statistics.median(host), [round(1e3 * x, 3) for x in host]
        res.step_ms_all = [round(1e3 * x, 3) for x in times]
        res.step_ms, res.min_ms = 1e3 * statistics.median(times), 1e3 * min(times)
        if device.type == "cuda":
            res.pipelined_ms = 1e3 * back_to_back(opt, steps)
        res.bytes_by_category = held_bytes(params, opt)
        held = res.bytes_by_category
        res.bytes_per_param = sum(held.values()) / res.params
        res.touched_bytes_per_param = (2 * (held["weights"] + held["state"]) + held["gradients"]) / res.params
        res.achieved_gbps = res.touched_bytes_per_param * res.params / (res.step_ms / 1e3) / 1e9
        res.kernels_used = [  # which compiled kernels this case's steps called (none: the eager path)
            f"{k[0]} {k[1]} (built in {getattr(r, 'compile_seconds', getattr(r, 'seconds', 0.0)):.1f} s)"
            for k, r in _kernel_records().items()
            if case.kind == "leanopt" and r.calls > before.get(k, 0)
        ]
    except ImportError as err:
        res.status, res.error = "not installed", f"{type(err).__name__}: {err}"[:600]
    except Exception as err:  # record the exact error; a peer that cannot run is a result too
        res.status, res.error = "error", f"{type(err).__name__}: {err}".strip()[:600]
        if os.environ.get("LEANOPT_DEBUG"):
            traceback.print_exc()
    finally:
        del params, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _bound(r: Result, nbytes: float, round_gbps: list[float | None], gbps: float) -> tuple[float, float]:
    """(bound ms, step / bound) for ``nbytes`` at the GB/s measured next to the case in each round (the
    median of the rounds' ratios), else at ``gbps`` (0: not measured, (0, 0))."""
    pairs = [(t, c) for t, c in zip(r.round_ms, round_gbps, strict=False) if t is not None and c]
    if pairs:
        bound = nbytes / (statistics.median(c for _, c in pairs) * 1e9) * 1e3
        return bound, statistics.median(t / (nbytes / (c * 1e9) * 1e3) for t, c in pairs)
    if not gbps:
        return 0.0, 0.0
    bound = nbytes / (gbps * 1e9) * 1e3
    return bound, r.step_ms / bound


def relate(results: list[Result], gbps: float, in_place: float = 0.0) -> None:
    """Fill in the bandwidth bounds and the ratio to torch's fused step per workload: with several
    rounds, the median of the per-round ratios (each case against torch's fused step of the same round,
    so a machine that speeds up or slows down between rounds cancels out). The bound: the touched bytes
    at the copy GB/s measured next to the case in each round (``round_copy_gbps``; the median of the
    rounds' ratios), else at ``gbps``; the in-place bound alike (``round_inplace_gbps``, ``in_place``)."""
    fused = {r.workload: r for r in results if r.key == TORCH_FUSED and r.status == "ok"}
    for r in results:
        if r.status != "ok":
            continue
        nbytes = r.touched_bytes_per_param * r.params
        r.bound_ms, r.ratio_to_bound = _bound(r, nbytes, r.round_copy_gbps, gbps)
        r.inplace_bound_ms, r.ratio_to_inplace_bound = _bound(r, nbytes, r.round_inplace_gbps, in_place)
        base = fused.get(r.workload)
        if base is None:
            r.ratio_to_torch_fused, r.round_ratios = 0.0, []
            continue
        pairs = zip(r.round_ms or [r.step_ms], base.round_ms or [base.step_ms], strict=False)
        r.round_ratios = [a / b for a, b in pairs if a is not None and b is not None and b > 0]
        r.ratio_to_torch_fused = statistics.median(r.round_ratios) if r.round_ratios else r.step_ms / base.step_ms


def merge_rounds(rounds: list[list[Result]]) -> list[Result]:
    """One result per (workload, case) from several rounds of the same cases: the median of the rounds'
    medians, every timed step kept, each round's median in ``round_ms`` (aligned by round)."""
    merged: dict[tuple[str, str], list[Result | None]] = {}
    for i, results in enumerate(rounds):
        for r in results:
            merged.setdefault((r.workload, r.key), [None] * len(rounds))[i] = r
    out = []
    for runs in merged.values():
        ok = [r for r in runs if r is not None and r.status == "ok"]
        first = next(r for r in runs if r is not None)
        if not ok:
            out.append(first)
            continue
        m = replace(ok[0])
        m.round_ms = [r.step_ms if r is not None and r.status == "ok" else None for r in runs]
        m.round_copy_gbps = [r.copy_gbps if r is not None and r.status == "ok" else None for r in runs]
        m.copy_gbps = statistics.median(c for c in m.round_copy_gbps if c is not None)
        m.round_inplace_gbps = [r.inplace_gbps if r is not None and r.status == "ok" else None for r in runs]
        m.inplace_gbps = statistics.median(c for c in m.round_inplace_gbps if c is not None)
        m.step_ms = statistics.median(r.step_ms for r in ok)
        m.pipelined_ms = statistics.median(r.pipelined_ms for r in ok)
        m.min_ms = min(r.min_ms for r in ok)
        m.step_ms_all = [t for r in ok for t in r.step_ms_all]
        m.first_step_s = ok[0].first_step_s  # the first round's: it includes building the kernels
        m.achieved_gbps = m.touched_bytes_per_param * m.params / (m.step_ms / 1e3) / 1e9
        out.append(m)
    return out


#: (case key, target ratio to torch's fused fp32 AdamW) from the kernel issue; CPU, AdamW
SPEED_TARGETS = {"exact/fp32": 1.0, "exact/fp32:ignore": 1.0, "compact/int8": 0.8}
BOUND_TARGET = 1.5


def targets(results: list[Result], optimizer: str = "adamw") -> list[dict[str, Any]]:
    """The kernel work's targets, each with the measured value and whether it is met (AdamW only)."""
    if optimizer != "adamw":
        return []
    checks = []
    for r in results:
        if r.status != "ok" or r.kind != "leanopt" or "@" in r.key:  # forced kernels: no target
            continue
        if r.key in SPEED_TARGETS and r.ratio_to_torch_fused:
            goal = SPEED_TARGETS[r.key]
            checks.append({"workload": r.workload, "check": f"{r.key} <= {goal:.1f}x torch fused",
                           "value": r.ratio_to_torch_fused, "met": r.ratio_to_torch_fused <= goal})  # fmt: skip
        checks.append({"workload": r.workload, "check": f"{r.key} <= {BOUND_TARGET}x its bandwidth bound",
                       "value": r.ratio_to_bound, "met": r.ratio_to_bound <= BOUND_TARGET})  # fmt: skip
    return checks


def results_table(results: list[Result]) -> str:
    """The measured rows as a table, then one line per case that was not measured (and why)."""
    rows = [
        [
            r.workload, r.mode, f"{r.step_ms:.1f}", f"{r.first_step_s:.1f}",
            f"{r.ratio_to_torch_fused:.2f}x" if r.ratio_to_torch_fused else "-", f"{r.achieved_gbps:.1f}",
            f"{r.bound_ms:.1f}", f"{r.ratio_to_bound:.2f}x",
            f"{r.ratio_to_inplace_bound:.2f}x" if r.ratio_to_inplace_bound else "-", f"{r.touched_bytes_per_param:.2f}",
            f"{r.bytes_per_param:.2f}",
        ]
        for r in results
        if r.status == "ok"
    ]  # fmt: skip
    header = ["workload", "mode", "step ms", "first s", "vs torch fused", "GB/s", "bound ms", "vs bound",
              "vs in-place", "touched B/p", "memory B/p"]  # fmt: skip
    measured = [r for r in results if r.status == "ok"]
    if any(r.pipelined_ms for r in measured):  # CUDA: steps back to back, one wait at the end
        header.append("back to back ms")
        for row, r in zip(rows, measured, strict=True):
            row.append(f"{r.pipelined_ms:.2f}" if r.pipelined_ms else "-")
    if any(len(r.round_ratios) > 1 for r in measured):  # --rounds: the spread of the per-round ratios
        header.append("rounds (vs fused)")
        for row, r in zip(rows, measured, strict=True):
            spread = r.round_ratios
            row.append(f"{min(spread):.2f}-{max(spread):.2f}x" if len(spread) > 1 else "-")
    lines = [table(rows, header, right=set(range(2, len(header))))]
    lines += [f"{r.workload}  {r.mode}: {r.status}: {r.error[:200]}" for r in results if r.status != "ok"]
    return "\n".join(lines)


def targets_table(checks: list[dict[str, Any]]) -> str:
    rows = [[c["workload"], c["check"], f"{c['value']:.2f}x", "met" if c["met"] else "MISSED"] for c in checks]
    return table(rows, ["workload", "target", "measured", ""], right={2})


# ------------------------------------------------------------------------------------ command line


def build_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="the kernel benchmark: optimizer step time vs bandwidth, leanopt vs torch.optim and peers",
        description=__doc__.split("\n\n")[0].replace("``", "'"),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workloads", help=f"comma list: {', '.join(SPECIAL_WORKLOADS)} or any model --size takes "
                   f"(default {DEFAULT_WORKLOADS}; --quick: tiny)")  # fmt: skip
    p.add_argument("--size", help="one more workload: a model as for 'leanopt plan' (a count such as 10M, "
                   "gpt2-small, config.json, module:factory); alone it replaces the default workloads")  # fmt: skip
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS),
                   help="default adamw (the peers are AdamW only)")  # fmt: skip
    p.add_argument("--modes", default="default", help="'default', 'all', or a comma list: torch-fused, torch-foreach, "
                   "MASTER/STATES[@KERNEL][:NONFINITE] (exact/fp32, compact/int8, exact/fp32@reference, "
                   "exact/fp32:ignore), torchao-8bit, "
                   "torchao-4bit, bnb-8bit, optimi-kahan, flashoptim")  # fmt: skip
    p.add_argument("--steps", type=int, help="timed steps per case, median reported (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, the first one timed apart (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every case this many times in turn; step time: median of the rounds, ratio to "
                        "torch fused: median of each round's ratio (default 1)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="seconds: tiny workload, 2 steps, no peers unless named")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--kernel", help="kernel= for every leanopt mode (auto, fused, reference)")
    p.add_argument("--out", default="leanopt-bench.json", help="JSON file to write (default leanopt-bench.json)")
    p.set_defaults(func=run)
    return p


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: accepted: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def resolve_workloads(spec: str | None, size: str | None, quick: bool) -> dict[str, ModelShapes]:
    """Workload name -> shapes, from ``--workloads`` and ``--size``."""
    if spec is None:
        spec = "" if size else ("tiny" if quick else DEFAULT_WORKLOADS)
    names = [t.strip() for t in spec.split(",") if t.strip()] + ([size.strip()] if size else [])
    if not names:
        raise CLIError(f"--workloads is empty; accepted: {', '.join(SPECIAL_WORKLOADS)} or a model (gpt2-small, 10M)")
    out = {}
    for name in names:
        if name in SPECIAL_WORKLOADS:
            source, shapes = SPECIAL_WORKLOADS[name]
            out[name] = ModelShapes(source, shapes)
            continue
        try:
            out[name] = resolve_model(name)
        except CLIError as err:
            flag = "--size" if name == (size or "").strip() else "--workloads"
            raise CLIError(f"{flag}: {err} (or a workload: {', '.join(SPECIAL_WORKLOADS)})") from None
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _gpu_variant() -> dict[str, Any]:
    """The multi-tensor CUDA kernels' code shapes this run used (``kernels.gpu.VARIANT``, which
    ``LEANOPT_GPU_VARIANT`` sets)."""
    from ..kernels import gpu

    return dict(gpu.VARIANT)


def _native_vector_width() -> int | None:
    try:
        from ..kernels import native
    except ImportError:
        return None
    return native.vector_width()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``leanopt bench``."""
    steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    if steps < 1:
        raise CLIError(f"--steps must be at least 1, got {steps}")
    if args.warmup < 1:
        raise CLIError(f"--warmup must be at least 1 (the first step is timed apart), got {args.warmup}")
    rounds = getattr(args, "rounds", 1)
    if rounds < 1:
        raise CLIError(f"--rounds must be at least 1, got {rounds}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    workloads = resolve_workloads(args.workloads, args.size, args.quick)
    options = {} if args.kernel is None else {"kernel": args.kernel}
    cases = select_cases(args.optimizer, args.modes, args.quick, **options)

    started = time.time()
    copy_n = 4_000_000 if args.quick else 50_000_000
    gbps = copy_gbps(device, copy_n)
    in_place = inplace_gbps(device, copy_n)
    threads = torch.get_num_threads()
    where = f"{device} ({_device_name(device)}), torch {torch.__version__}, {threads} threads"
    print(f"bench: {args.optimizer} on {where}, {steps} timed steps after {args.warmup} warm-up", flush=True)
    for name, model in workloads.items():
        print(f"  workload {name}: {model.source}, {model.num_params:,} parameters in {len(model.shapes)} tensors")
    print(f"plain fp32 copy: {gbps:.1f} GB/s (read + write); in-place fp32 stream: {in_place:.1f} GB/s", flush=True)
    native_vector = _native_vector_width() if device.type == "cpu" else None
    if native_vector is not None:
        kind = {16: "AVX-512, 16 per register", 8: "AVX2, 16 per register pair"}.get(native_vector, "portable C")
        print(f"leanopt native int8/int4 kernels: {kind}", flush=True)
    busy = busy_note()
    if busy:
        print(busy, flush=True)
    doc: dict[str, Any] = {
        "command": " ".join(["leanopt", *getattr(args, "argv", ["bench"])]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
        "threads": threads, "platform": platform.platform(), "optimizer": args.optimizer,
        "steps": steps, "warmup": args.warmup, "rounds": rounds,
        "workloads": {n: {"source": m.source, "num_params": m.num_params, "num_tensors": len(m.shapes)}
                      for n, m in workloads.items()},
        "native_vector_width": native_vector,
        "gpu_variant": _gpu_variant() if device.type == "cuda" else None,
        "copy_gbps": gbps, "copy_gbps_end": None, "inplace_gbps": in_place, "inplace_gbps_end": None,
        "loadavg_start": loadavg(), "loadavg_end": None,
        "touched_bytes_rule": "2 x (weights + optimizer state) + gradients, per parameter",
    }  # fmt: skip
    per_round: list[list[Result]] = []
    results: list[Result] = []

    def write(complete: bool) -> None:  # after every case: an interrupted run keeps what it measured
        nonlocal results
        results = merge_rounds(per_round)
        relate(results, gbps, in_place)
        doc.update(wall_s=time.time() - started, results=[asdict(r) for r in results],
                   targets=targets(results, args.optimizer), complete=complete)  # fmt: skip
        out.write_text(json.dumps(jsonable(doc), indent=1))

    for index in range(rounds):
        per_round.append([])
        if rounds > 1:
            print(f"round {index + 1} of {rounds}", flush=True)
        for name, model in workloads.items():
            for case in cases:
                # the copy's speed next to each case: on a shared machine it changes by the minute
                near, near_in_place = copy_gbps(device, copy_n, reps=3), inplace_gbps(device, copy_n, reps=3)
                r = run_case(name, model.shapes, case, device, steps, args.warmup)
                r.copy_gbps, r.inplace_gbps = near, near_in_place
                per_round[-1].append(r)
                ok = r.status == "ok"
                note = f"{r.step_ms:.1f} ms/step, first step {r.first_step_s:.1f} s" if ok else r.status
                print(f"  {name:<12} {case.name:<28} {note}", flush=True)
                write(False)
    doc["copy_gbps_end"], doc["loadavg_end"] = copy_gbps(device, copy_n), loadavg()
    doc["inplace_gbps_end"] = inplace_gbps(device, copy_n)
    write(True)
    near = [r.copy_gbps for r in results if r.status == "ok" and r.copy_gbps]
    spread = f"; before the cases {min(near):.1f}-{max(near):.1f}, each case's bound uses its own" if near else ""
    print(f"plain fp32 copy at the end: {doc['copy_gbps_end']:.1f} GB/s (at the start {gbps:.1f}{spread})")
    near = [r.inplace_gbps for r in results if r.status == "ok" and r.inplace_gbps]
    spread = f"; before the cases {min(near):.1f}-{max(near):.1f}" if near else ""
    print(
        f"in-place fp32 stream at the end: {doc['inplace_gbps_end']:.1f} GB/s (at the start {in_place:.1f}{spread})\n"
    )
    print(results_table(results))
    print("\nstep ms: median of the timed steps; first s: the first step (includes kernel compilation); touched:")
    print("bytes read + written per parameter per step; bound: touched bytes at the plain-copy GB/s measured")
    print("just before the case (vs bound: the median over rounds of each round's ratio); vs in-place: the same")
    print("at the in-place stream's GB/s (x *= -1: read and written in place, as a step does; a tighter bound than")
    print("the copy's where the copy's writes also read their lines); memory: weights + gradient + optimizer")
    print("state per parameter, from the tensors held.")
    if any(r.pipelined_ms for r in results):
        print("back to back: ms per step of as many steps run without waiting in between (one wait at the end).")
    checks = targets(results, args.optimizer)
    if checks:
        where = "" if device.type == "cpu" else f" (set for CPU; this run is on {device})"
        print(f"\ntargets{where}:\n{targets_table(checks)}")
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")
    broken = [r for r in results if r.status == "error" and r.kind != "peer"]
    return 1 if broken or any(not math.isfinite(r.step_ms) for r in results) else 0
