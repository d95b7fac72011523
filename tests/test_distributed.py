"""leanopt on PyTorch's own distributed engines: FSDP2 (DTensor shards), DDP and DCP checkpoints.

Two processes (gloo, CPU) are launched once for the whole module (fixture ``cluster``); they run every
scenario in ``Worker`` and write their results to a temporary directory, which the tests below compare
with single-process runs made here. The launch has a hard timeout; the process group is destroyed in a
``finally``; the temporary directory is removed at teardown, also when something failed.

This file is also the workers' entry point: ``python tests/test_distributed.py --worker OUT STORE``.

What is compared bit for bit (``bits``: the tensors' integer views, never a tolerance):
- FSDP2 and DDP with the same batch on every rank vs one process on that batch: every optimizer, every
  weight format, every state format, uneven and empty shards. The all-reduced gradient is then exactly
  the single-process one ((g/2 + g/2) == g), so any difference would be the optimizer's.
- DCP resumes (2 ranks -> 2, 2 -> 1, 1 -> 2) against uninterrupted runs: losses, weights, master values
  and states after continuing training.
With different data per rank the reduced gradient differs from the single-process gradient by float
summation order only; that case is checked against a bound (``test_*_different_data_*``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import leanopt
from leanopt.formats import MASTER_CHOICES, STATE_FORMATS

WORLD = 2
STEPS = 3  # training steps per run in the equivalence checks
LAUNCH_TIMEOUT_S = 420
ROOT = Path(__file__).resolve().parents[1]

OPTIMIZERS: dict[str, tuple[Callable[..., leanopt.LeanOptimizer], dict[str, Any]]] = {
    "sgd": (leanopt.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    "adam": (leanopt.Adam, {"lr": 1e-2, "weight_decay": 0.01}),
    "adamw": (leanopt.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "lion": (leanopt.Lion, {"lr": 1e-3, "weight_decay": 0.1}),
}
# Every registered format is covered (formats that land later are picked up here automatically).
MASTERS = [m for m in MASTER_CHOICES if m != "auto"]
STATES = list(STATE_FORMATS)


def combos() -> list[tuple[str, str, str, torch.dtype]]:
    """(optimizer, master, states, param dtype) runs of the FSDP2 equivalence check: AdamW with every
    weight format x every state format; the other optimizers with every weight format (fp32 states) and
    every state format (exact weights)."""
    runs = [("adamw", m, s, torch.bfloat16) for m in MASTERS for s in STATES]
    for o in OPTIMIZERS:
        if o != "adamw":
            runs += [(o, m, STATES[0], torch.bfloat16) for m in MASTERS]
            runs += [(o, "exact", s, torch.bfloat16) for s in STATES[1:]]
    runs += [("adamw", "auto", "fp32", torch.float32), ("adamw", "kahan", "bf16", torch.float16)]
    return runs


#: runs of the FSDP2 check through the CUDA kernels' code (emulated on the CPU)
GPU_KERNEL_COMBOS = [
    ("adamw", "exact", "int8", torch.bfloat16),
    ("adamw", "compact", "int4", torch.bfloat16),
    ("sgd", "stochastic", "fp32", torch.bfloat16),
    ("lion", "kahan", "bf16", torch.bfloat16),
]


def combo_name(c: tuple[str, str, str, torch.dtype]) -> str:
    return f"{c[0]}-{c[1]}-{c[2]}-{str(c[3]).removeprefix('torch.')}"


# ------------------------------------------------------------------------------- shared model and data


def mlp(dtype: torch.dtype, seed: int = 0, out: int = 2) -> nn.Sequential:
    """Dims chosen for sharding on 2 ranks: dim 0 of 5 (uneven: 3 + 2 rows), 34 (17 + 17) and ``out``
    (``out=1``: 1 row + an empty shard); rows of 40 and 34 elements (>= 32: 8/4-bit states quantise
    them, in groups of 32 and a partial group)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 5), nn.Tanh(), nn.Linear(5, 34), nn.Tanh(), nn.Linear(34, out)).to(dtype)


def conv_net(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    """``mlp`` with a Conv1d first: its (5, 8, 5) weight has rows of 5 (under 32), so its int8/int4
    states are grouped in rows of in * k = 40 (formats/quantized.py ``rows_shape``); dim 0 of 5 shards
    unevenly (3 + 2 output channels)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (8, 5)), nn.Conv1d(8, 5, 5), nn.Flatten(), nn.Tanh(), nn.Linear(5, 34),
                         nn.Tanh(), nn.Linear(34, 2)).to(dtype)  # fmt: skip


def fold_train(model: nn.Module, opt: leanopt.LeanOptimizer, steps: int) -> list[torch.Tensor]:
    """Gradient release with accumulation="states": two micro-batches per step, the first folded into
    the optimizer states inside its backward."""
    handle = leanopt.release_gradients(opt, accumulation="states", micro_batches=2)
    losses = []
    for step in range(steps):
        with handle.accumulate():
            handle.backward(mlp_loss(model, *mlp_batch(2 * step)))
        loss = mlp_loss(model, *mlp_batch(2 * step + 1))
        handle.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    handle.remove()
    return losses


def fails_on_empty_rows(states: str) -> str | None:
    """The error a state format raises on a tensor with no rows (an empty FSDP2 shard), or None."""
    fmt = STATE_FORMATS[states]
    try:
        for signed in (True, False):
            stored = fmt.init("s", torch.zeros(0, 34), signed)
            fmt.encode("s", fmt.decode("s", stored, signed), stored, signed)
    except Exception as err:  # noqa: BLE001 - reported by the test
        return f"{type(err).__name__}: {err}"
    return None


def mlp_batch(step: int, part: int | None = None, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    """Batch of step ``step``: 8 rows, or rows [4*part, 4*part+4) of it (one rank's half)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 40, generator=gen)
    y = torch.stack((torch.tanh(x[:, :5].sum(1)), torch.tanh(x[:, 5:9].sum(1))), dim=1)
    if part is not None:
        x, y = x[4 * part : 4 * part + 4], y[4 * part : 4 * part + 4]
    return x.to(dtype), y


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).float() - y).pow(2).mean()


def make_optimizer(model: nn.Module, combo: tuple[str, str, str, torch.dtype], **extra: Any) -> leanopt.LeanOptimizer:
    cls, hyper = OPTIMIZERS[combo[0]]
    return cls(model.parameters(), master=combo[1], states=combo[2], seed=1234, **hyper, **extra)


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: range, part: int | None = None, dtype=torch.bfloat16
) -> list[torch.Tensor]:
    """Plain training loop; returns each step's loss (fp32, this process's batch)."""
    losses = []
    for step in steps:
        x, y = mlp_batch(step, part, dtype)
        y = y[:, : getattr(model, "module", model)[-1].out_features]
        loss = mlp_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return losses


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), a copy of any other tensor."""
    return leanopt.distributed.full_tensor(t) if leanopt.distributed.is_dtensor(t) else t.detach().clone()


def snapshot(model: nn.Module, opt: leanopt.LeanOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"param", "master", "state.<key>" ...}: whole tensors (collectives under FSDP2)."""
    out = {}
    for name, p in model.named_parameters():
        entry = {"param": whole(p.detach()), "master": whole(opt.master_value(p))}
        for key, value in opt.state[p].items():
            entry[f"state.{key}"] = whole(value)
        out[name] = entry
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (for bit-for-bit comparisons)."""
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(views[t.element_size()])


def assert_same_bits(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
    for name in want:
        a, b = got[name], want[name]
        if isinstance(b, dict):
            assert_same_bits(a, b, f"{what}/{name}")
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{what}/{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(bits(a), bits(b)), (
            f"{what}/{name}: bits differ (max abs diff {(a.double() - b.double()).abs().max()})"
        )


def gpt_config():
    from leanopt.models import GPTConfig

    # dims not divisible by 2 ranks in places: wpe 17 rows, attn 3*24=72, vocab 256 (tied)
    return GPTConfig(vocab_size=256, block_size=17, n_layer=1, n_head=2, n_embd=24)


def gpt(seed: int = 0):
    from leanopt.models import GPT

    torch.manual_seed(seed)
    return GPT(gpt_config()).to(torch.bfloat16)


def gpt_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    data = torch.randint(0, 256, (4, gpt_config().block_size + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


def gpt_train(model: nn.Module, opt, sched, steps: range) -> list[torch.Tensor]:
    losses = []
    for step in steps:
        _, loss = model(*gpt_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.detach().float().clone())
    return losses


GPT_RUNS = {  # DCP resume runs: (master, states)
    "exact-fp32": ("exact", "fp32"),
    "stochastic-bf16": ("stochastic", "bf16"),
    **({"compact-int8": ("compact", "int8")} if "compact" in MASTERS and "int8" in STATES else {}),
}


def gpt_optimizer(model: nn.Module, master: str, states: str):
    opt = leanopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, master=master, states=states, seed=7)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


# ------------------------------------------------------------------------------- the workers (2 ranks)


class Worker:
    """Scenarios run on every rank; each writes ``OUT/<name>.pt`` (rank 0) or ``OUT/<name>.error``."""

    def __init__(self, out: Path) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.out = out
        self.rank = dist.get_rank()

    def save(self, name: str, obj: Any) -> None:
        if self.rank == 0:
            torch.save(obj, self.out / f"{name}.pt")

    SCENARIOS = (
        "fsdp_same_batch", "fsdp_empty_shard", "fsdp_release", "fsdp_nonfinite_on_one_rank", "fsdp_different_data",
        "fsdp_errors", "fsdp_fp32_export", "ddp_same_batch", "ddp_different_data", "dcp_resume_2_to_2",
        "dcp_resume_1_to_2", "example_script", "fsdp_gpu_kernels", "fsdp_conv", "fsdp_release_gpu_kernels",
    )  # fmt: skip

    def run_all(self) -> None:
        for name in self.SCENARIOS:
            t0 = time.perf_counter()
            try:
                getattr(self, f"scenario_{name}")()
            except BaseException:  # DCP's CheckpointException is a BaseException
                # The other rank may now wait in a collective that will never come: record the error and
                # leave at once, so that its collective fails fast (connection closed) instead of hanging.
                (self.out / f"{name}.rank{self.rank}.error").write_text(traceback.format_exc())
                sys.stdout.flush()
                os._exit(3)
            print(f"rank {self.rank} {name} {time.perf_counter() - t0:.1f}s", flush=True)

    @staticmethod
    def fsdp(model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        inner = model.blocks if hasattr(model, "blocks") else [m for m in model if isinstance(m, nn.Linear)]
        for m in inner:  # GPT: each block (its tied embedding stays with the root); MLP: each Linear
            fully_shard(m)
        return fully_shard(model)

    def scenario_fsdp_same_batch(self) -> None:
        """Every optimizer x weight format x state format, FSDP2, the same batch on both ranks; how each
        step's updates ran: native calls of all prepared updates (their sizes) and one-tensor updates."""
        from leanopt.kernels import native, step_plan

        results = {}
        for c in combos():
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c)
            with _counting(native, "run_many", lambda jobs: len(jobs)) as batches, \
                    _counting(native, "native_step", lambda *a, **k: 1) as singles, \
                    _counting(leanopt.distributed, "all_ranks_min", lambda flags, mesh: flags.numel()) as reduced, \
                    _planned(step_plan, "run") as planned:  # fmt: skip
                losses = train(model, opt, range(1), dtype=c[3])
                # later steps: by the plan of the step before (one native call for all, after the
                # all-reduce of the shards' verdicts), nothing prepared again, no torch reduction per shard
                with _counting(native, "_plan", lambda *a, **k: 1) as plans, \
                        _counting(leanopt.distributed, "finite_flag", lambda t: 1) as flags:  # fmt: skip
                    losses += train(model, opt, range(1, STEPS), dtype=c[3])
            placements = {
                n: {
                    k: str(v.placements) if leanopt.distributed.is_dtensor(v) else "plain"
                    for k, v in opt.state[p].items()
                }
                for n, p in model.named_parameters()
            }  # how each state tensor is placed, for test_fsdp2_states_are_sharded_like_their_params
            results[combo_name(c)] = {"losses": losses, "snapshot": snapshot(model, opt), "placements": placements,
                                      "native_batches": batches, "native_singles": len(singles),
                                      "plans_after_first": len(plans), "shard_flags": len(flags),
                                      "reduced": reduced, "planned": planned}  # fmt: skip
            if c == ("adamw", "exact", "fp32", torch.bfloat16):
                report = leanopt.memory_report(opt)
                reports = [None] * WORLD
                self.dist.all_gather_object(reports, (report.num_params, dict(report.by_category)))
                results["memory_reports"] = reports
        self.save("fsdp_same_batch", results)

    def scenario_fsdp_gpu_kernels(self) -> None:
        """kernel="fused" with the CUDA kernels' code emulated on the CPU (kernels/gpu.py): FSDP2 shards
        go through it one tensor per launch, on their local rows."""
        from leanopt.kernels import gpu

        results = {}
        gpu.EMULATE = True
        try:
            for c in GPU_KERNEL_COMBOS:
                model = self.fsdp(mlp(c[3]))
                opt = make_optimizer(model, c, kernel="fused")
                before = {id(k): (k.tensors, k.launches) for k in gpu.compile_stats()}
                with _counting(leanopt.distributed, "finite_checks", lambda *a: 1) as waited, \
                        _counting(gpu, "finite_flags", lambda grads: len(grads)) as checked, \
                        _counting(leanopt.distributed, "all_ranks_min", lambda flags, mesh: flags.numel()) as reduced, \
                        _planned(gpu) as planned:  # fmt: skip
                    losses = train(model, opt, range(STEPS), dtype=c[3])
                used = [(k.tensors - before.get(id(k), (0, 0))[0], k.launches - before.get(id(k), (0, 0))[1])
                        for k in gpu.compile_stats() if k.tensors != before.get(id(k), (0, 0))[0]]  # fmt: skip
                results[combo_name(c)] = {
                    "losses": losses,
                    "snapshot": snapshot(model, opt),
                    "updates": sum(u[0] for u in used),
                    "launches": [u[1] for u in used],
                    "waited": len(waited),
                    "checked": checked,
                    "reduced": reduced,
                    "planned": planned,
                }
            # a (1, 34) weight and a (1,) bias: rank 1 holds no rows of them, its verdicts (1) still meet
            # rank 0's in the step's all-reduce
            c = ("adamw", "compact", "int8", torch.bfloat16)
            model = self.fsdp(mlp(c[3], out=1))
            opt = make_optimizer(model, c, kernel="fused")
            with _planned(gpu) as planned:
                losses = train(model, opt, range(STEPS))
            results["empty-shard"] = {"losses": losses, "snapshot": snapshot(model, opt), "planned": planned}
            # one rank without its plan for a step (prepared anew), the other by its plan: both all-reduce
            # the same 6 verdicts, so the collectives stay in step, and the bits are one process's
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c, kernel="fused")
            losses = train(model, opt, range(1))
            if self.rank == 1:
                opt._step_plan = None
            with _planned(gpu) as planned:
                losses += train(model, opt, range(1, STEPS))
            every = [None] * WORLD
            self.dist.all_gather_object(every, planned)
            results["one-rank-unplanned"] = {"losses": losses, "snapshot": snapshot(model, opt), "planned": every}
            # an update the kernels do not cover (gpu.launch answers None for one tensor): the step counts of
            # the updates prepared before it are put back and the general path runs the whole step
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c, kernel="fused")
            target, original = model[2].weight, gpu.launch

            def refuse(rule, wfmt, sfmt, param, *args, **kwargs):
                if param is target._local_tensor:
                    return None
                return original(rule, wfmt, sfmt, param, *args, **kwargs)

            gpu.launch = refuse
            try:
                losses = train(model, opt, range(STEPS))
            finally:
                gpu.launch = original
            results["not-covered"] = {"losses": losses, "snapshot": snapshot(model, opt),
                                      "steps": sorted({float(st["step"]) for st in opt.state.values()})}  # fmt: skip
            # nonfinite="ignore": nothing to check, so nothing checked (before: a check, an all-reduce and a wait)
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c, kernel="fused", nonfinite="ignore")
            with _counting(leanopt.distributed, "finite_checks", lambda *a: 1) as waited, \
                    _counting(gpu, "finite_flags", lambda grads: len(grads)) as checked, \
                    _counting(leanopt.distributed, "all_ranks_min", lambda *a: 1) as reduced, \
                    _planned(gpu) as planned:  # fmt: skip
                train(model, opt, range(2))
            results["ignore"] = {"waited": len(waited), "checked": len(checked), "reduced": len(reduced),
                                 "planned": planned}  # fmt: skip
            # an inf in one rank's rows of one tensor, in the first step (its state is new) and in a later one
            for first in (True, False):
                model = self.fsdp(mlp(c[3]))
                opt = make_optimizer(model, c, kernel="fused")
                if not first:
                    train(model, opt, range(1))
                before = snapshot(model, opt)
                loss = mlp_loss(model, *mlp_batch(1))
                loss.backward()
                if self.rank == 1:
                    model[2].weight.grad._local_tensor[3, 1] = float("inf")
                with _planned(gpu) as planned:
                    opt.step()
                pending = opt._step_verdicts is not None  # not read yet: the host did not wait for them
                skipped = opt.last_skipped
                opt.zero_grad()
                results["inf-first" if first else "inf"] = {
                    "before": before, "after": snapshot(model, opt), "pending": pending, "skipped": skipped,
                    "counted": opt.nonfinite_skipped, "has_state": bool(opt.state.get(model[2].weight)),
                    "step": float(opt.state[model[0].weight]["step"]),
                    "skipped_step": float(opt.state[model[2].weight]["step"]) if not first else None,
                    "planned": planned,
                }  # fmt: skip
        finally:
            gpu.EMULATE = False
        self.save("fsdp_gpu_kernels", results)

    def scenario_fsdp_release_gpu_kernels(self) -> None:
        """Gradient release under FSDP2 through the CUDA kernels' code (emulated): each hook checks its
        shard on the device, the ranks' verdicts meet in an all-reduce there, and the update reads it, so
        no hook waits for a verdict (all_finite is never asked). Then an inf in one rank's rows of one
        tensor: that tensor is skipped on both ranks, counted once each, the others updated."""
        from leanopt.kernels import gpu

        results = {}
        gpu.EMULATE = True
        try:
            for c in [("adamw", "exact", "int8", torch.bfloat16), ("sgd", "stochastic", "fp32", torch.bfloat16)]:
                model = self.fsdp(mlp(c[3]))
                opt = make_optimizer(model, c, kernel="fused")
                handle = leanopt.release_gradients(opt)
                with _counting(leanopt.distributed, "all_finite", lambda t: 1) as asked:
                    losses = train(model, opt, range(STEPS), dtype=c[3])
                handle.remove()
                results[combo_name(c)] = {"losses": losses, "snapshot": snapshot(model, opt), "asked": len(asked)}
            # a (1, 34) weight and a (1,) bias: rank 1 holds no rows of them, but its verdicts must still
            # meet rank 0's in every all-reduce (else the ranks' collectives fall out of step)
            c = ("adamw", "compact", "int8", torch.bfloat16)
            model = self.fsdp(mlp(c[3], out=1))
            opt = make_optimizer(model, c, kernel="fused")
            handle = leanopt.release_gradients(opt)
            losses = train(model, opt, range(STEPS), dtype=c[3])
            handle.remove()
            results["empty-shard"] = {"losses": losses, "snapshot": snapshot(model, opt)}
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c, kernel="fused")
            handle = leanopt.release_gradients(opt)
            train(model, opt, range(1))
            before = snapshot(model, opt)
            target = model[2].weight  # 34 rows: 17 on each rank
            original = leanopt.distributed.local_grad

            def poisoned(param, grad, where):
                rows = original(param, grad, where)
                if param is target and self.rank == 1:
                    rows[3, 1] = float("inf")
                return rows

            leanopt.distributed.local_grad = poisoned
            try:
                train(model, opt, range(1, 2))
            finally:
                leanopt.distributed.local_grad = original
            handle.remove()
            after = snapshot(model, opt)
            skipped = torch.tensor([opt.nonfinite_skipped])
            gathered = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
            self.dist.all_gather(gathered, skipped)
            results["inf"] = {"before": before, "after": after, "skipped": [int(g) for g in gathered]}
        finally:
            gpu.EMULATE = False
        self.save("fsdp_release_gpu_kernels", results)

    def scenario_fsdp_conv(self) -> None:
        """A conv weight's grouped int8/int4 states (rows of in * k) under FSDP2, the same batch on both ranks."""
        results = {}
        for states in ("int8", "int4"):
            c = ("adamw", "compact", states, torch.bfloat16)
            model = self.fsdp(conv_net(c[3]))
            opt = make_optimizer(model, c)
            losses = train(model, opt, range(STEPS), dtype=c[3])
            placements = {k: str(v.placements) if leanopt.distributed.is_dtensor(v) else "plain"
                          for k, v in opt.state[model[1].weight].items()}  # fmt: skip
            results[states] = {"losses": losses, "snapshot": snapshot(model, opt), "placements": placements}
        model = self.fsdp(conv_net(torch.bfloat16))  # the fold decodes and encodes the sharded rows
        opt = make_optimizer(model, ("adamw", "compact", "int8", torch.bfloat16))
        results["fold"] = {"losses": fold_train(model, opt, STEPS), "snapshot": snapshot(model, opt)}
        self.save("fsdp_conv", results)

    def scenario_fsdp_empty_shard(self) -> None:
        """A (1, 34) weight on 2 ranks: rank 1 holds no rows. Formats failing on 0 rows are skipped here
        (the test reports them) because one rank raising would leave the other in a collective."""
        results = {}
        for states in STATES:
            if fails_on_empty_rows(states):
                continue
            c = ("adamw", "exact", states, torch.bfloat16)
            model = self.fsdp(mlp(torch.bfloat16, out=1))
            opt = make_optimizer(model, c)
            losses = train(model, opt, range(STEPS))
            results[states] = {"losses": losses, "snapshot": snapshot(model, opt)}
        self.save("fsdp_empty_shard", results)

    def scenario_fsdp_release(self) -> None:
        """Gradient release under FSDP2: its hooks see the reduce-scattered shard; same bits as no release."""
        from leanopt.kernels import native

        results = {}
        for c in [("adamw", "exact", "fp32", torch.bfloat16), ("sgd", "stochastic", STATES[-1], torch.bfloat16)]:
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c)
            handle = leanopt.release_gradients(opt)
            losses = train(model, opt, range(1))
            with _counting(native, "_plan", lambda *a, **k: 1) as plans:  # each hook's launch kept from step 1
                losses += train(model, opt, range(1, STEPS))
            handle.remove()
            results[combo_name(c)] = {"losses": losses, "snapshot": snapshot(model, opt), "plans": len(plans)}
        # with exact global-norm clipping, against clip_grad_norm_ + step() on the same 2 ranks
        c = ("adamw", "exact", "fp32", torch.bfloat16)
        for release in (False, True):
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c)
            handle = leanopt.release_gradients(opt, max_norm=0.05) if release else None
            for step in range(STEPS):
                loss = mlp_loss(model, *mlp_batch(step))
                if release:
                    handle.backward(loss)  # a measuring pass for the norm, then the updating pass
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                opt.zero_grad(set_to_none=True)
            results[f"clip-release={release}"] = snapshot(model, opt)
        self.save("fsdp_release", results)

    def scenario_fsdp_different_data(self) -> None:
        """Real data parallelism: each rank its half of the global batch."""
        results = {}
        for c in [("adamw", "exact", "fp32", torch.bfloat16), ("adamw", "exact", "fp32", torch.float32)]:
            model = self.fsdp(mlp(c[3]))
            opt = make_optimizer(model, c)
            losses = train(model, opt, range(10), part=self.rank, dtype=c[3])
            global_losses = [self._mean(loss) for loss in losses]
            results[combo_name(c)] = {"losses": global_losses, "snapshot": snapshot(model, opt)}
        self.save("fsdp_different_data", results)

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self.dist.all_reduce(t)
        return t / self.dist.get_world_size()

    def scenario_fsdp_nonfinite_on_one_rank(self) -> None:
        """An inf in one rank's shard: every rank skips that whole tensor (no half-updated tensor)."""
        model = self.fsdp(mlp(torch.bfloat16))
        opt = make_optimizer(model, ("adamw", "exact", "fp32", torch.bfloat16))
        train(model, opt, range(1))
        before = snapshot(model, opt)
        loss = mlp_loss(model, *mlp_batch(1))
        loss.backward()
        target = model[2].weight  # 34 rows: 17 on each rank
        if self.rank == 1:
            target.grad._local_tensor[3, 1] = float("inf")
        from leanopt.kernels import step_plan

        with _planned(step_plan, "run") as planned:  # the step before left a plan: the skip is the plan's
            opt.step()
        opt.zero_grad()
        after = snapshot(model, opt)
        steps = [float(opt.state[p]["step"]) for p in model.parameters()]
        skipped = [torch.tensor(opt.nonfinite_skipped)]
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
        self.dist.all_gather(gathered, skipped[0].reshape(1))
        results = {"before": before, "after": after, "skipped": [int(g) for g in gathered], "planned": planned,
                   "steps": steps}  # fmt: skip
        # the same with rank 1 without its plan (prepared anew) and the inf on rank 0: the ranks' paths
        # differ, their collectives (one all-reduce of the 6 verdicts) and decisions do not
        model = self.fsdp(mlp(torch.bfloat16))
        opt = make_optimizer(model, ("adamw", "exact", "fp32", torch.bfloat16))
        train(model, opt, range(1))
        if self.rank == 1:
            opt._step_plan = None
        before = snapshot(model, opt)
        mlp_loss(model, *mlp_batch(1)).backward()
        if self.rank == 0:
            model[2].weight.grad._local_tensor[3, 1] = float("inf")
        with _planned(step_plan, "run") as planned:
            opt.step()
        opt.zero_grad()
        train(model, opt, range(2, 4))  # and on: the next collectives still meet
        every = [None] * WORLD
        self.dist.all_gather_object(every, (planned, opt.nonfinite_skipped))
        results["one-rank-unplanned"] = {"before": before, "after": snapshot(model, opt), "every": every}
        # nonfinite="raise" by a plan: the error on every rank, from the all-reduced verdicts, nothing changed
        model = self.fsdp(mlp(torch.bfloat16))
        opt = make_optimizer(model, ("adamw", "compact", "int8", torch.bfloat16), nonfinite="raise")
        train(model, opt, range(1))
        before = snapshot(model, opt)
        mlp_loss(model, *mlp_batch(1)).backward()
        if self.rank == 1:
            model[2].weight.grad._local_tensor[3, 1] = float("nan")
        with _counting(step_plan, "run", lambda *a: 1) as entered, \
                _counting(leanopt.distributed, "all_ranks_min", lambda *a: 1) as reduced:  # fmt: skip
            try:
                opt.step()
                error = None
            except FloatingPointError as err:
                error = str(err)
        every = [None] * WORLD
        self.dist.all_gather_object(every, (error, len(entered), len(reduced)))
        results["raise"] = {"before": before, "after": snapshot(model, opt), "every": every}
        self.save("fsdp_nonfinite", results)

    def scenario_fsdp_fp32_export(self) -> None:
        """fp32_state_dict / load_fp32_state_dict with sharded params: whole fp32 weights out and back in."""
        c = ("adamw", "exact", "fp32", torch.bfloat16)
        model = self.fsdp(mlp(c[3]))
        opt = make_optimizer(model, c)
        train(model, opt, range(STEPS))
        exported = {k: whole(v) for k, v in leanopt.fp32_state_dict(model, opt).items()}
        model2 = self.fsdp(mlp(c[3], seed=3))
        opt2 = make_optimizer(model2, c)
        leanopt.load_fp32_state_dict(model2, opt2, exported)  # whole tensors: each rank keeps its rows
        masters = {n: whole(opt2.master_value(p)) for n, p in model2.named_parameters()}
        # a single-process optimizer state dict (whole tensors) loaded into the sharded optimizer
        single = mlp(c[3])
        single_opt = make_optimizer(single, c)
        train(single, single_opt, range(STEPS))
        opt2.load_state_dict(single_opt.state_dict())
        names = dict(enumerate(n for n, _ in model2.named_parameters()))
        loaded = {names[i]: {k: whole(v) for k, v in opt2.state[p].items()} for i, p in enumerate(model2.parameters())}
        wanted = {names[i]: dict(single_opt.state[p]) for i, p in enumerate(single.parameters())}
        self.save(
            "fsdp_fp32_export", {"exported": exported, "reloaded_masters": masters, "loaded": loaded, "wanted": wanted}
        )

    def scenario_ddp_same_batch(self) -> None:
        """DDP (no release): replicated weights; stochastic rounding with per-rank seeds made equal."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        results = {}
        for c in [("adamw", "exact", "fp32", torch.bfloat16), ("sgd", "stochastic", "bf16", torch.bfloat16)]:
            raw = mlp(c[3])
            model = DDP(raw)
            cls, hyper = OPTIMIZERS[c[0]]
            opt = cls(raw.parameters(), master=c[1], states=c[2], seed=1234 + 99 * self.rank, **hyper)
            assert leanopt.distributed.sync_seed(opt) == 1234
            losses = train(model, opt, range(STEPS))
            results[combo_name(c)] = {"losses": losses, "snapshot": snapshot(raw, opt)}
        # DDP with gradient release (updates in DDP's communication hook, from the all-reduced gradient)
        c = ("adamw", "exact", "fp32", torch.bfloat16)
        raw = mlp(c[3])
        model = DDP(raw)
        opt = make_optimizer(raw, c)
        handle = leanopt.release_gradients(opt, ddp=model)
        losses = train(model, opt, range(STEPS))
        handle.remove()
        results[combo_name(c) + "-release"] = {"losses": losses, "snapshot": snapshot(raw, opt)}
        self.save("ddp_same_batch", results)

    def scenario_ddp_different_data(self) -> None:
        """DDP with each rank its half: replicas stay bit-identical (stochastic rounding included)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        results = {}
        for c in [("adamw", "exact", "fp32", torch.bfloat16), ("adamw", "stochastic", "bf16", torch.bfloat16)]:
            raw = mlp(c[3])
            model = DDP(raw)
            opt = make_optimizer(raw, c)
            losses = train(model, opt, range(10), part=self.rank)
            snap = snapshot(raw, opt)
            gathered = [None] * WORLD
            self.dist.all_gather_object(gathered, snap)
            results[combo_name(c)] = {"losses": [self._mean(x) for x in losses], "ranks": gathered}
        self.save("ddp_different_data", results)

    def scenario_fsdp_errors(self) -> None:
        """Clear errors: Shard(1) placements; a state format whose tensors do not follow the rows."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        errors = {}
        model = fully_shard(nn.Linear(4, 6), shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        try:
            leanopt.AdamW(model.parameters())
        except ValueError as err:
            errors["shard1"] = str(err)
        STATE_FORMATS["flat-test"] = FlatStates()
        try:
            model = self.fsdp(mlp(torch.bfloat16))
            leanopt.AdamW(model.parameters(), states="flat-test")
        except ValueError as err:
            errors["flat"] = str(err)
        finally:
            del STATE_FORMATS["flat-test"]
        # a plain gradient on a DTensor parameter (the last one): refused before any update is prepared
        model = self.fsdp(mlp(torch.bfloat16))
        opt = make_optimizer(model, ("adamw", "compact", "int8", torch.bfloat16))
        train(model, opt, range(1))
        x, y = mlp_batch(1)
        mlp_loss(model, x, y[:, : model[-1].out_features]).backward()
        params = list(model.parameters())
        try:
            params[-1].grad = whole(params[-1].grad)  # the whole gradient, as a plain tensor
        except (RuntimeError, TypeError) as err:  # torch itself may refuse it
            errors["plain_grad"] = f"torch refused: {err}"
        else:
            before = snapshot(model, opt)
            try:
                opt.step()
            except TypeError as err:
                errors["plain_grad"] = str(err)
            after = snapshot(model, opt)
            errors["plain_grad_unchanged"] = all(
                torch.equal(bits(a), bits(after[k][key])) for k, st in before.items() for key, a in st.items()
            )
        self.save("fsdp_errors", errors)

    def scenario_dcp_resume_2_to_2(self) -> None:
        """Save on 2 ranks at step 3; resume in a fresh model on 2 ranks; continue to step 6."""
        from leanopt.distributed import load_checkpoint, save_checkpoint

        results = {}
        for run, (master, states) in GPT_RUNS.items():
            ckpt = str(self.out / f"ckpt2-{run}")
            model = self.fsdp(gpt())
            opt, sched = gpt_optimizer(model, master, states)
            first = gpt_train(model, opt, sched, range(3))
            save_checkpoint(ckpt, model, opt, extra={"scheduler": sched.state_dict(), "step": 3})
            at_save = snapshot(model, opt)
            uninterrupted = gpt_train(model, opt, sched, range(3, 6))
            final = snapshot(model, opt)

            model2 = self.fsdp(gpt(seed=5))  # other initial weights: the load must replace them
            opt2, sched2 = gpt_optimizer(model2, master, states)
            extra = load_checkpoint(ckpt, model2, opt2, extra={"scheduler": sched2.state_dict(), "step": 0})
            sched2.load_state_dict(extra["scheduler"])
            loaded = snapshot(model2, opt2)
            resumed = gpt_train(model2, opt2, sched2, range(3, 6))
            results[run] = {
                "first": first, "at_save": at_save, "uninterrupted": uninterrupted, "final": final,
                "loaded": loaded, "resumed": resumed, "resumed_final": snapshot(model2, opt2), "step": extra["step"],
                "lr": opt2.param_groups[0]["lr"], "lr_uninterrupted": opt.param_groups[0]["lr"],
            }  # fmt: skip
        self.save("dcp_2_to_2", results)

    def scenario_dcp_resume_1_to_2(self) -> None:
        """Load checkpoints the single-process test saved (``OUT/ckpt1-*``) onto 2 ranks; continue."""
        from leanopt.distributed import load_checkpoint

        results = {}
        for run, (master, states) in GPT_RUNS.items():
            model = self.fsdp(gpt(seed=5))
            opt, sched = gpt_optimizer(model, master, states)
            extra = load_checkpoint(str(self.out / f"ckpt1-{run}"), model, opt, extra={"scheduler": sched.state_dict()})
            sched.load_state_dict(extra["scheduler"])
            loaded = snapshot(model, opt)
            resumed = gpt_train(model, opt, sched, range(3, 6))
            results[run] = {
                "loaded": loaded, "resumed": resumed, "resumed_final": snapshot(model, opt),
                "nonfinite_skipped": opt.nonfinite_skipped,
            }  # fmt: skip
        self.save("dcp_1_to_2", results)

    def scenario_example_script(self) -> None:
        """examples/train.py with --parallel fsdp2 and ddp, with a DCP checkpoint and a resume."""
        example = _load_example()
        results = {}
        for parallel in ("fsdp2", "ddp"):
            ckpt = str(self.out / f"example-{parallel}")
            common = ["--parallel", parallel, *EXAMPLE_ARGS]
            full = example.main([*common, "--ckpt", ckpt, "--save-at", "2"])
            resumed = example.main([*common, "--ckpt", ckpt, "--resume"])
            results[parallel] = {"full": full, "resumed": resumed}
        self.save("example_script", results)


class FlatStates(leanopt.formats.StateFormat):
    """A test-only state format storing a state flattened (so it does not follow dim-0 shards)."""

    name = "flat-test"

    def init(self, name, like, signed):
        return {name: torch.zeros(like.numel(), dtype=torch.float32)}

    def decode(self, name, stored, signed, shape=None):
        return stored[name]

    def encode(self, name, value, stored, signed):
        stored[name].copy_(value.reshape(-1))


EXAMPLE_ARGS = ["--steps", "4", "--batch", "2", "--eval-batches", "1", "--n-layer", "1", "--n-embd", "32",
                "--block-size", "32", "--data-bytes", "300000", "--quiet"]  # fmt: skip


@contextlib.contextmanager
def _counting(module: Any, name: str, measure: Callable[..., Any]):
    """Within the block, record ``measure(*args)`` of every call of ``module.name`` (which still runs)."""
    original, seen = getattr(module, name), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(measure(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield seen
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _planned(module: Any, name: str = "run_plan"):
    """Within the block, record for every call of ``module.name`` (``gpu.run_plan``, ``step_plan.run``)
    whether the step ran by its plan."""
    original, seen = getattr(module, name), []

    def wrapper(plan: Any, opt: Any) -> Any:
        ran = original(plan, opt)
        seen.append(ran is not None)
        return ran

    setattr(module, name, wrapper)
    try:
        yield seen
    finally:
        setattr(module, name, original)


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("leanopt_example_train", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_main(out: Path, store: Path) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        Worker(out).run_all()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- launch (pytest side)


def single_process_checkpoints(out: Path) -> dict[str, Any]:
    """Before the launch: train one process to step 3, save with DCP (no process group), continue to 6."""
    from leanopt.distributed import save_checkpoint

    results = {}
    for run, (master, states) in GPT_RUNS.items():
        model = gpt()
        opt, sched = gpt_optimizer(model, master, states)
        gpt_train(model, opt, sched, range(3))
        opt.nonfinite_skipped = 2  # a counter DCP's optimizer state dict alone would drop
        save_checkpoint(str(out / f"ckpt1-{run}"), model, opt, extra={"scheduler": sched.state_dict()})
        at_save = snapshot(model, opt)
        continued = gpt_train(model, opt, sched, range(3, 6))
        results[run] = {"at_save": at_save, "continued": continued, "final": snapshot(model, opt)}
    return results


@pytest.fixture(autouse=True)
def one_thread():
    """The workers compute with one intra-op thread; CPU kernels may split a reduction differently with
    another thread count, so the single-process side of each bit-for-bit comparison uses one too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    """Launch the 2 workers once; yield (out dir, single-process checkpoint results)."""
    tmp = Path(tempfile.mkdtemp(prefix="leanopt-dist-"))
    procs: list[subprocess.Popen] = []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the workers (see one_thread)
        with _quiet_dcp_warnings():
            single = single_process_checkpoints(tmp)
        torch.set_num_threads(threads)
        env = {**os.environ, "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        logs = []
        for rank in range(WORLD):
            log = open(tmp / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(tmp), str(tmp / "store")],
                    env={**env, "RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )  # fmt: skip
            )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        for log in logs:
            log.close()
        yield tmp, single, codes
    finally:
        torch.set_num_threads(threads)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_dcp_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def result(cluster, scenario: str) -> Any:
    """What the workers' scenario saved; fails the test with the workers' tracebacks if it did not finish."""
    out, _, codes = cluster
    errors = sorted(out.glob("*.rank*.error"))
    path = out / f"{scenario}.pt"
    if not path.exists() or any(e.name.startswith(scenario + ".") for e in errors):
        logs = "\n".join(
            f"--- rank {r} log (tail)\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD)
        )
        tracebacks = "\n".join(f"--- {e.name}\n{e.read_text()}" for e in errors)
        pytest.fail(f"scenario {scenario} did not finish (worker exit codes {codes}):\n{tracebacks}\n{logs}")
    return torch.load(path, weights_only=False)


def single_run(c: tuple[str, str, str, torch.dtype], steps: int = STEPS, release: bool = False, out: int = 2) -> dict:
    model = mlp(c[3], out=out)
    opt = make_optimizer(model, c)
    handle = leanopt.release_gradients(opt) if release else None
    losses = train(model, opt, range(steps), dtype=c[3])
    if handle is not None:
        handle.remove()
    return {"losses": losses, "snapshot": snapshot(model, opt)}


# ------------------------------------------------------------------------------- the tests

multiprocess = pytest.mark.multiprocess


@multiprocess
@pytest.mark.parametrize("combo", combos(), ids=combo_name)
def test_fsdp2_same_batch_is_bit_identical_to_one_process(cluster, combo):
    got = result(cluster, "fsdp_same_batch")[combo_name(combo)]
    want = single_run(combo)
    # the first step's 6 updates (3 weights, 3 biases: their local rows) in one native call, none alone
    # (until 2026-11-30 each FSDP2 tensor was updated by a native call of its own); since 2026-12-01 the
    # later steps by its plan (kernels/step_plan.py): one native call, no update prepared again, after
    # one all-reduce of the 6 verdicts per step, as the first step's
    assert got["native_batches"] == [6] and got["native_singles"] == 0, got["native_batches"]
    assert got["planned"] == [True] * (STEPS - 1) and got["reduced"] == [6] * STEPS, (got["planned"], got["reduced"])
    assert got["plans_after_first"] == 0 and got["shard_flags"] == 0, (got["plans_after_first"], got["shard_flags"])
    assert_same_bits({"losses": dict(enumerate(got["losses"]))}, {"losses": dict(enumerate(want["losses"]))}, "loss")
    assert_same_bits(got["snapshot"], want["snapshot"], combo_name(combo))


@multiprocess
@pytest.mark.parametrize("combo", GPU_KERNEL_COMBOS, ids=combo_name)
def test_fsdp2_through_the_gpu_kernels_emulated_is_bit_identical_to_one_process(cluster, combo):
    got = result(cluster, "fsdp_gpu_kernels")[combo_name(combo)]
    want = single_run(combo)  # one process, the native CPU kernels
    assert got["updates"] == STEPS * 6  # 3 weights + 3 biases per step, through the CUDA kernels' code
    # in one launch per kernel per step (until 2026-11-30 one launch per tensor: 6 per step)
    assert got["launches"] == [STEPS] * len(got["launches"]) and len(got["launches"]) <= 2, got["launches"]
    # the shards' NaN/inf check: one launch per step for all 6, its verdicts all-reduced and read by the
    # update kernels on the device; the host never waited for them (finite_checks: .tolist() before launching)
    assert got["reduced"] == [6] * STEPS and got["waited"] == 0, (got["reduced"], got["waited"])
    # every step after the first repeats the one before from its plan (kernels/gpu.py, FSDP2 plans): the
    # check, all-reduce and launches without preparing each update (the first step's check: finite_flags)
    assert got["planned"] == [True] * (STEPS - 1) and got["checked"] == [6], (got["planned"], got["checked"])
    assert_same_bits({"losses": dict(enumerate(got["losses"]))}, {"losses": dict(enumerate(want["losses"]))}, "loss")
    assert_same_bits(got["snapshot"], want["snapshot"], combo_name(combo))


@multiprocess
def test_fsdp2_steps_through_the_gpu_kernels_emulated_skip_a_nonfinite_tensor_on_every_rank(cluster):
    """An inf in rank 1's rows of one weight, the verdicts all-reduced on the device: that tensor is left
    alone on both ranks (its step count put back; in the first step its new state removed) and counted
    once each, when the verdicts are read (after the step, not during it); the others are updated. A
    (1, 34) weight rank 1 holds no rows of: the same bits as one process (its verdicts still meet). With
    nonfinite="ignore" no gradient is checked at all (before: a check, an all-reduce and a wait)."""
    results = result(cluster, "fsdp_gpu_kernels")
    got = results["empty-shard"]
    want = single_run(("adamw", "compact", "int8", torch.bfloat16), out=1)
    assert_same_bits(got["snapshot"], want["snapshot"], "empty shard")
    assert got["planned"] == [True] * (STEPS - 1), got["planned"]  # rank 0's (rank 1's empty rows: checked alike)
    got = results["one-rank-unplanned"]  # rank 1 without its plan in step 2: the same collectives, the same bits
    assert got["planned"] == [[True] * (STEPS - 1), [True] * (STEPS - 2)], got["planned"]
    assert_same_bits(got["snapshot"], single_run(("adamw", "compact", "int8", torch.bfloat16))["snapshot"], "unplanned")
    assert results["ignore"] == {"waited": 0, "checked": 0, "reduced": 0, "planned": [True]}, results["ignore"]
    got = results["not-covered"]  # one tensor refused by the kernels: the general path, the same bits
    assert got["steps"] == [float(STEPS)], got["steps"]
    assert_same_bits(got["snapshot"], single_run(("adamw", "compact", "int8", torch.bfloat16))["snapshot"], "fallback")
    for name, first in (("inf-first", True), ("inf", False)):
        got = results[name]
        assert got["pending"] and got["skipped"] == [2] and got["counted"] == 1, (name, got["skipped"])
        assert got["planned"] == ([] if first else [True]), (name, got["planned"])  # a later step: by its plan
        assert got["has_state"] is not first, name  # a skipped first step leaves no state behind
        assert got["step"] == (1.0 if first else 2.0), (name, got["step"])
        if not first:  # its step count put back: 1, as before the step that skipped it
            assert got["skipped_step"] == 1.0, got["skipped_step"]
            assert_same_bits(got["after"]["2.weight"], got["before"]["2.weight"], "skipped tensor")
        assert not torch.equal(bits(got["after"]["0.weight"]["param"]), bits(got["before"]["0.weight"]["param"]))


@multiprocess
@pytest.mark.parametrize("states", STATES)
def test_fsdp2_empty_shard_is_bit_identical_to_one_process(cluster, states):
    """A (1, 34) weight and a (1,) bias on 2 ranks: rank 1 holds no rows of them."""
    reason = fails_on_empty_rows(states)
    if reason:
        pytest.xfail(f"states={states!r} fails on a tensor with no rows (an FSDP2 rank with no rows of it): {reason}")
    got = result(cluster, "fsdp_empty_shard")[states]
    want = single_run(("adamw", "exact", states, torch.bfloat16), out=1)
    assert_same_bits(got["snapshot"], want["snapshot"], f"empty shard, states={states}")


@multiprocess
@pytest.mark.parametrize("states", ["int8", "int4"])
def test_fsdp2_conv_weight_grouped_states_are_bit_identical_to_one_process(cluster, states):
    got = result(cluster, "fsdp_conv")[states]
    model = conv_net(torch.bfloat16)
    opt = make_optimizer(model, ("adamw", "compact", states, torch.bfloat16))
    losses = train(model, opt, range(STEPS))
    assert "exp_avg.codes" in opt.state[model[1].weight]  # the conv weight's states are quantised
    assert set(got["placements"]) == {"step", "residual", "exp_avg.codes", "exp_avg.scales", "exp_avg_sq.codes",
                                      "exp_avg_sq.scales"}  # fmt: skip
    assert {v for k, v in got["placements"].items() if k != "step"} == {"(Shard(dim=0),)"}
    assert_same_bits({"losses": dict(enumerate(got["losses"]))}, {"losses": dict(enumerate(losses))}, "loss")
    assert_same_bits(got["snapshot"], snapshot(model, opt), f"conv, states={states}")


@multiprocess
def test_fsdp2_conv_weight_with_states_accumulation_is_bit_identical_to_one_process(cluster):
    """Release with accumulation="states" under FSDP2: the fold works on the rank's rows of the conv
    weight's grouped int8 states, with the bits of one process."""
    got = result(cluster, "fsdp_conv")["fold"]
    model = conv_net(torch.bfloat16)
    opt = make_optimizer(model, ("adamw", "compact", "int8", torch.bfloat16))
    losses = fold_train(model, opt, STEPS)
    assert_same_bits({"losses": dict(enumerate(got["losses"]))}, {"losses": dict(enumerate(losses))}, "loss")
    assert_same_bits(got["snapshot"], snapshot(model, opt), "conv, accumulation='states'")


@multiprocess
def test_memory_report_under_fsdp2_counts_this_ranks_shard(cluster):
    """AdamW, exact split: 2 (remainder) + 4 + 4 (fp32 moments) bytes per element of this rank's rows;
    the bf16 weights' storage is FSDP2's, padded on every rank to the largest shard (rank 0's)."""
    reports = result(cluster, "fsdp_same_batch")["memory_reports"]
    assert sum(n for n, _ in reports) == sum(p.numel() for p in mlp(torch.bfloat16).parameters())
    assert reports[0][0] > reports[1][0]  # uneven shards
    for n, by in reports:
        assert (by["master"], by["exp_avg"], by["exp_avg_sq"]) == (2 * n, 4 * n, 4 * n)
        assert by["weights"] == 2 * reports[0][0]
    # `leanopt plan --shards 2` gives rank 0's figures (the rank with the most rows); no gradients are held
    # after zero_grad(set_to_none=True), as in a plan with release
    from leanopt.cli.plan import Mode, leanopt_layout, shapes_from_module, shard_shapes

    shapes = shard_shapes(shapes_from_module(mlp(torch.bfloat16)), WORLD)
    planned = leanopt_layout(shapes, "adamw", Mode("exact", "fp32", release=True)).by_category
    assert planned == reports[0][1], (planned, reports[0][1])


@multiprocess
def test_fsdp2_states_are_sharded_like_their_params(cluster):
    """Every state tensor is a DTensor placed like its parameter (Shard(0)); only ``step`` is plain;
    the int8/int4 runs hold quantised codes and scales for the 40- and 34-wide rows."""
    got = result(cluster, "fsdp_same_batch")
    for c in combos():
        for pname, states in got[combo_name(c)]["placements"].items():
            assert states.pop("step") == "plain", (combo_name(c), pname)
            assert states and set(states.values()) == {"(Shard(dim=0),)"}, (combo_name(c), pname, states)
    for states in [s for s in STATES if s in ("int8", "int4")]:
        keys = got[combo_name(("adamw", "exact", states, torch.bfloat16))]["placements"]["0.weight"]
        assert {"exp_avg.codes", "exp_avg.scales", "exp_avg_sq.codes", "exp_avg_sq.scales"} <= set(keys), keys


@multiprocess
def test_gradient_release_under_fsdp2_is_bit_identical_to_one_process(cluster):
    got = result(cluster, "fsdp_release")
    assert_same_bits(got.pop("clip-release=True"), got.pop("clip-release=False"), "release + exact clipping")
    assert len(got) == 2
    for name, run in got.items():
        o, m, s, d = name.split("-")
        combo = (o, m, s, getattr(torch, d))
        want = single_run(combo)
        assert_same_bits(run["snapshot"], want["snapshot"], name)
        assert run["plans"] == 0  # after step 1 each hook's native launch is kept (its local views are new each time)


@multiprocess
def test_gradient_release_under_fsdp2_through_the_gpu_kernels_emulated_never_asks_for_a_verdict(cluster):
    got = result(cluster, "fsdp_release_gpu_kernels")
    inf = got.pop("inf")
    empty = got.pop("empty-shard")
    assert_same_bits(empty["snapshot"], single_run(("adamw", "compact", "int8", torch.bfloat16), out=1)["snapshot"],
                     "a shard with no rows")  # fmt: skip
    for name, run in got.items():
        o, m, s, d = name.split("-")
        want = single_run((o, m, s, getattr(torch, d)))  # one process, no release, the native CPU kernels
        assert_same_bits(run["snapshot"], want["snapshot"], name)
        assert run["asked"] == 0  # no hook waited for an all-reduced verdict: it stayed on the device
    assert inf["skipped"] == [1, 1]  # the inf in rank 1's rows skipped the tensor on both ranks
    assert_same_bits(inf["after"]["2.weight"], inf["before"]["2.weight"], "the skipped tensor")
    for name in inf["before"]:
        if name != "2.weight":
            assert not torch.equal(bits(inf["after"][name]["param"]), bits(inf["before"][name]["param"])), name


@multiprocess
def test_plain_fp32_and_optimizer_state_dicts_move_onto_fsdp2_shards(cluster):
    got = result(cluster, "fsdp_fp32_export")
    model = mlp(torch.bfloat16)
    opt = make_optimizer(model, ("adamw", "exact", "fp32", torch.bfloat16))
    train(model, opt, range(STEPS))
    assert_same_bits(got["exported"], leanopt.fp32_state_dict(model, opt), "fp32_state_dict")
    assert_same_bits(got["reloaded_masters"], {k: v for k, v in got["exported"].items()}, "masters after import")
    assert_same_bits(got["loaded"], got["wanted"], "a whole-tensor optimizer state dict loaded onto shards")


@multiprocess
def test_nonfinite_gradient_on_one_rank_skips_the_tensor_on_every_rank(cluster):
    got = result(cluster, "fsdp_nonfinite")
    assert got["skipped"] == [1, 1]
    assert got["planned"] == [True], got["planned"]  # by the plan of the step before (since 2026-12-01)
    assert got["steps"] == [2.0, 2.0, 1.0, 2.0, 2.0, 2.0], got["steps"]  # 2.weight's count not advanced
    assert_same_bits(got["after"]["2.weight"], got["before"]["2.weight"], "skipped tensor")
    assert not torch.equal(bits(got["after"]["0.weight"]["param"]), bits(got["before"]["0.weight"]["param"]))
    # rank 0 by its plan, rank 1 prepared anew, the inf in rank 0's rows: skipped on both, trained on after
    got = result(cluster, "fsdp_nonfinite")["one-rank-unplanned"]
    assert got["every"] == [([True], 1), ([], 1)], got["every"]
    assert not torch.equal(bits(got["after"]["2.weight"]["param"]), bits(got["before"]["2.weight"]["param"]))
    # nonfinite="raise": the plan raises on both ranks (a NaN in rank 1's rows of parameter 2) after its one
    # all-reduce (the general path would make a second), nothing changed
    got = result(cluster, "fsdp_nonfinite")["raise"]
    assert got["every"] == [("non-finite gradient for parameter 2", 1, 1)] * 2, got["every"]
    assert_same_bits(got["after"], got["before"], "raise")


@multiprocess
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fsdp2_different_data_per_rank_stays_within_bound_of_one_process(cluster, dtype):
    """Each rank its half of the global batch vs one process on the whole batch (10 AdamW steps).

    The reduced gradient equals the single-process one up to summation order (and, for bf16 params,
    bf16 rounding of the two half-batch gradients); the resulting weight difference is bounded here."""
    name = combo_name(("adamw", "exact", "fp32", getattr(torch, dtype)))
    got = result(cluster, "fsdp_different_data")[name]
    model = mlp(getattr(torch, dtype))
    opt = make_optimizer(model, ("adamw", "exact", "fp32", getattr(torch, dtype)))
    losses = train(model, opt, range(10), dtype=getattr(torch, dtype))
    want = snapshot(model, opt)
    # measured (torch 2.13 CPU): bf16 1.8e-3 relative loss, 9.5e-3 weights; fp32 1.6e-7 and 6e-8
    loss_bound, weight_bound = {"bfloat16": (1e-2, 2.5e-2), "float32": (1e-5, 1e-6)}[dtype]
    for a, b in zip(got["losses"], losses, strict=True):
        assert abs(a.item() - b.item()) <= loss_bound * abs(b.item()), (a.item(), b.item())
    for pname, entry in want.items():
        diff = (got["snapshot"][pname]["master"] - entry["master"]).abs().max().item()
        assert diff <= weight_bound, (pname, diff)  # bf16: a quarter of AdamW's largest move (lr * steps)


@multiprocess
def test_ddp_with_and_without_release_same_batch_is_bit_identical_to_one_process(cluster):
    got = result(cluster, "ddp_same_batch")
    assert len(got) == 3  # two optimizers / formats, and DDP with gradient release
    for name, run in got.items():
        o, m, s, d = name.split("-")[:4]
        want = single_run((o, m, s, getattr(torch, d)))
        assert_same_bits(run["snapshot"], want["snapshot"], name)


@multiprocess
def test_ddp_replicas_stay_bit_identical_with_different_data(cluster):
    got = result(cluster, "ddp_different_data")
    for name, run in got.items():
        rank0, rank1 = run["ranks"]
        assert_same_bits(rank1, rank0, name)
        assert not torch.equal(bits(rank0["0.weight"]["param"]), bits(mlp(torch.bfloat16)[0].weight.detach()))


@multiprocess
def test_unsupported_sharding_is_refused_when_the_optimizer_is_built(cluster):
    got = result(cluster, "fsdp_errors")
    assert "params[0]" in got["shard1"] and "Shard(dim=1)" in got["shard1"] and "dim 0" in got["shard1"]
    assert "params[0]" in got["flat"] and "'exp_avg'" in got["flat"] and "not split by rows" in got["flat"]


@multiprocess
def test_a_plain_gradient_on_an_fsdp2_parameter_is_refused_before_anything_changes(cluster):
    """Checked with the other gradients, before any update is prepared: since 2026-11-30 FSDP2 updates
    are launched together, so a refusal midway would leave the earlier ones' step counts advanced."""
    got = result(cluster, "fsdp_errors")
    if got["plain_grad"].startswith("torch refused"):
        pytest.skip(got["plain_grad"])
    assert "parameter 5 is a DTensor (FSDP2) but its gradient is a plain Tensor" in got["plain_grad"]
    assert got["plain_grad_unchanged"]


@multiprocess
@pytest.mark.parametrize("run", list(GPT_RUNS))
def test_dcp_save_on_2_ranks_resume_on_2_continues_bit_identically(cluster, run):
    got = result(cluster, "dcp_2_to_2")[run]
    assert_same_bits(got["loaded"], got["at_save"], "state after load")
    assert_same_bits(dict(enumerate(got["resumed"])), dict(enumerate(got["uninterrupted"])), "losses after resume")
    assert_same_bits(got["resumed_final"], got["final"], "after 3 more steps")
    assert got["step"] == 3 and got["lr"] == got["lr_uninterrupted"]


@multiprocess
@pytest.mark.parametrize("run", list(GPT_RUNS))
def test_dcp_save_on_2_ranks_reload_on_1_continues_bit_identically(cluster, run):
    """The 2-rank run used the same batch on both ranks, so one process continuing it must match."""
    from leanopt.distributed import load_checkpoint

    got = result(cluster, "dcp_2_to_2")[run]
    model = gpt(seed=5)
    opt, sched = gpt_optimizer(model, *GPT_RUNS[run])
    with _quiet_dcp_warnings():
        extra = load_checkpoint(str(cluster[0] / f"ckpt2-{run}"), model, opt, extra={"scheduler": sched.state_dict()})
    sched.load_state_dict(extra["scheduler"])
    assert_same_bits(snapshot(model, opt), got["at_save"], "state loaded on 1 rank")
    losses = gpt_train(model, opt, sched, range(3, 6))
    assert_same_bits(dict(enumerate(losses)), dict(enumerate(got["uninterrupted"])), "losses")
    assert_same_bits(snapshot(model, opt), got["final"], "after 3 more steps on 1 rank")


@multiprocess
@pytest.mark.parametrize("run", list(GPT_RUNS))
def test_dcp_save_on_1_rank_resume_on_2_continues_bit_identically(cluster, run):
    got = result(cluster, "dcp_1_to_2")[run]
    single = cluster[1][run]
    assert_same_bits(got["loaded"], single["at_save"], "state loaded on 2 ranks")
    assert_same_bits(dict(enumerate(got["resumed"])), dict(enumerate(single["continued"])), "losses")
    assert_same_bits(got["resumed_final"], single["final"], "after 3 more steps on 2 ranks")
    assert got["nonfinite_skipped"] == 2


@multiprocess
def test_example_script_runs_and_resumes_under_fsdp2_and_ddp(cluster):
    got = result(cluster, "example_script")
    for parallel, run in got.items():
        full, resumed = run["full"], run["resumed"]
        assert resumed["start_step"] == 2 and full["start_step"] == 0, parallel
        assert resumed["losses"] == full["losses"][2:], parallel  # same floats after a resume
        assert resumed["val_loss"] == full["val_loss"], parallel
        assert math.isfinite(full["val_loss"])


# ------------------------------------------------------------------------------- single process


def test_example_script_runs_in_one_process(tmp_path):
    example = _load_example()
    common = EXAMPLE_ARGS
    with _quiet_dcp_warnings():
        full = example.main([*common, "--ckpt", str(tmp_path / "ck"), "--save-at", "2"])
        resumed = example.main([*common, "--ckpt", str(tmp_path / "ck"), "--resume"])
    assert resumed["start_step"] == 2 and resumed["losses"] == full["losses"][2:]
    assert resumed["val_loss"] == full["val_loss"]


def test_plain_tensors_bypass_the_shard_adapter():
    """Without DTensors the adapter hands back the very same objects (no copies, no wrapping)."""
    from leanopt import distributed as shards

    p, g, state = torch.zeros(3), torch.ones(3), {"step": torch.tensor(0.0), "exp_avg": torch.zeros(3)}
    with shards.local_views(p, g, state, "parameter 0") as (lp, lg, ls):
        assert lp is p and lg is g and ls is state
    assert not shards.is_dtensor(p) and shards.local(p) is p and shards.all_finite(g)
    assert not shards.all_finite(torch.tensor([1.0, float("nan")]))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_main(Path(sys.argv[2]), Path(sys.argv[3]))


@pytest.mark.slow
def test_the_fsdp2_step_benchmark_runs_on_one_gloo_rank(tmp_path):
    """benchmarks/fsdp_step.py (its figures are in docs/distributed.md; gpu_check.sh runs it on a GPU): a
    tiny run gives both CPU paths' host, synchronised and back-to-back times, and torch's fused AdamW's."""
    import json

    out = tmp_path / "fsdp.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_step.py"
    subprocess.run([sys.executable, str(script), "--layers", "2", "--width", "40", "--steps", "2", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["native", "cuda-emulated", "torch-fused"], rows
    assert all(r["tensors"] == 4 for r in rows)
    assert all(r["step_ms"] > 0 and r["host_ms"] > 0 and r["pipelined_ms"] > 0 for r in rows)
