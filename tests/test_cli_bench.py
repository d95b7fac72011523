"""``leanopt bench`` (the kernel benchmark): cases, measuring, derived figures, targets, and short runs
through the command line and through benchmarks/kernels.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanopt
from leanopt.cli import main
from leanopt.cli.bench import (
    PEERS,
    Case,
    Result,
    _peer,
    back_to_back,
    held_bytes,
    make_params,
    merge_rounds,
    relate,
    results_table,
    run_case,
    select_cases,
    targets,
    time_steps,
)

ROOT = Path(__file__).resolve().parents[1]


def test_make_params_gives_the_same_values_in_every_dtype():
    fp32 = make_params([(3, 5), (7,)], torch.float32, "cpu", seed=1)
    bf16 = make_params([(3, 5), (7,)], torch.bfloat16, "cpu", seed=1)
    for a, b in zip(fp32, bf16, strict=True):
        assert torch.equal(a.detach().bfloat16(), b.detach()) and torch.equal(a.grad.bfloat16(), b.grad)


def test_time_steps_runs_warmup_plus_timed_steps_and_changes_the_lr():
    params = make_params([(4, 4)], torch.bfloat16, "cpu")
    opt = leanopt.AdamW(params, lr=1e-3)
    host: list[float] = []
    times = time_steps(opt, steps=3, warmup=2, host=host)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(host) == 3 and all(0 < h <= t for h, t in zip(host, times, strict=True))  # until step() returned
    assert int(opt.state[params[0]]["step"].item()) == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(1.02e-4)  # set before each timed step


def test_default_cases_are_the_kernel_benchmark_and_quick_leaves_the_peers_out():
    keys = [c.key for c in select_cases("adamw")]
    assert keys == ["torch-fused", "torch-foreach", "exact/fp32", "exact/fp32:ignore", "compact/int8", "compact/int4",
                    "torchao-8bit", "torchao-4bit", "bnb-8bit", "optimi-kahan", "flashoptim"]  # fmt: skip
    assert [c.key for c in select_cases("adamw", quick=True)] == keys[:6]
    every = [c.key for c in select_cases("adamw", "all")]
    assert "exact/fp32@reference" in every and "exact/bf16" in every and "flashoptim" in every


def test_named_cases_get_torch_fused_first_and_accept_the_old_long_names():
    assert [c.key for c in select_cases("adamw", "exact/fp32,torchao-8bit")] == [
        "torch-fused", "exact/fp32", "torchao-8bit"
    ]  # fmt: skip
    old = select_cases("adamw", "torch AdamW fp32 fused,leanopt exact/fp32,leanopt exact/fp32 reference")
    assert [c.key for c in old] == ["torch-fused", "exact/fp32", "exact/fp32@reference"]
    assert [c.key for c in select_cases("sgd", "compact/int8")] == ["torch-fused", "compact/int8"]
    lion = ["exact/fp32", "exact/fp32:ignore", "compact/int8", "compact/int4"]
    assert [c.key for c in select_cases("lion", "default")] == lion


def test_bytes_touched_and_held_come_from_the_tensors():
    shapes, n = [(64, 32), (32,)], 64 * 32 + 32
    cases = {c.key: c for c in select_cases("adamw", "torch-fused,exact/fp32,compact/int8")}
    fused = run_case("w", shapes, cases["torch-fused"], torch.device("cpu"), steps=2)
    exact = run_case("w", shapes, cases["exact/fp32"], torch.device("cpu"), steps=2)
    assert fused.status == exact.status == "ok" and fused.params == exact.params == n
    assert fused.bytes_per_param == pytest.approx(16.0 + 8 / n)  # + two fp32 step counters
    assert exact.bytes_per_param == pytest.approx(14.0 + 8 / n)
    assert fused.touched_bytes_per_param == pytest.approx(28.0 + 16 / n)  # fp32 AdamW reads + writes 28 B/param
    assert exact.touched_bytes_per_param == pytest.approx(26.0 + 16 / n)
    assert exact.bytes_by_category == {"weights": 2 * n, "gradients": 2 * n, "state": 10 * n + 8}
    assert len(exact.step_ms_all) == 2 and exact.step_ms > 0 and exact.first_step_s > 0
    reference = run_case("w", shapes, select_cases("adamw", "exact/fp32@reference")[1], torch.device("cpu"), steps=1)
    assert reference.status == "ok" and reference.kernels_used == [] == fused.kernels_used  # no compiled kernel ran


def test_kernels_used_names_the_cuda_multi_tensor_kernels(monkeypatch):
    """A case that ran on the multi-tensor CUDA kernels lists them (here emulated on the CPU), so a
    GPU run's JSON shows which path each leanopt figure timed."""
    from leanopt.kernels import gpu, native

    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setattr(gpu, "EMULATE", True)
    gpu.reset()
    case = select_cases("adamw", "exact/fp32@fused")[1]
    res = run_case("w", [(64, 32)], case, torch.device("cpu"), steps=1)
    gpu.reset()
    assert res.status == "ok", res.error
    assert any(k.startswith("gpu multi-tensor ") for k in res.kernels_used), res.kernels_used


class _Wrapped(torch.Tensor):
    """A tensor subclass that keeps its data in two inner tensors, as torchao's quantised states do."""

    def __tensor_flatten__(self):
        return ["codes", "scales"], None


def test_held_bytes_looks_inside_tensor_subclasses_and_counts_shared_storage_once():
    params = make_params([(8, 8)], torch.bfloat16, "cpu")
    wrapped = torch.Tensor._make_subclass(_Wrapped, torch.empty(0))
    wrapped.codes, wrapped.scales = torch.zeros(64, dtype=torch.uint8), torch.zeros(2, dtype=torch.float32)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.state[params[0]] = {"q": wrapped, "alias": params[0].detach()}  # the weight again: counted once
    assert held_bytes(params, opt) == {"weights": 128, "gradients": 128, "state": 64 + 8}


def test_a_missing_peer_is_recorded_as_not_installed_and_a_cuda_only_one_is_skipped_on_cpu():
    missing = Case("nope", "nope AdamW", torch.bfloat16, _peer("no_such_module_xyz", "AdamW"), "peer")
    res = run_case("w", [(4, 4)], missing, torch.device("cpu"))
    assert res.status == "not installed" and "no_such_module_xyz" in res.error
    flash = next(c for c in PEERS if c.key == "flashoptim")
    assert run_case("w", [(4, 4)], flash, torch.device("cpu")).status == "skipped"

    def broken(ps):
        raise RuntimeError("kernel exploded")

    res = run_case("w", [(4, 4)], Case("b", "broken", torch.bfloat16, broken, "peer"), torch.device("cpu"))
    assert res.status == "error" and res.error == "RuntimeError: kernel exploded"


def _result(workload, key, kind, step_ms, touched=10.0, params=10**6):
    return Result(workload, key, key, kind, params=params, step_ms=step_ms, touched_bytes_per_param=touched)


def test_ratios_and_targets_follow_the_measured_figures():
    results = [
        _result("w", "torch-fused", "baseline", 10.0, touched=28.0),
        _result("w", "exact/fp32", "leanopt", 9.0, touched=26.0),
        _result("w", "compact/int8", "leanopt", 9.0, touched=12.0),
        _result("w", "exact/fp32@reference", "leanopt", 90.0, touched=26.0),
    ]
    relate(results, gbps=2.0)  # 1e6 params x 26 B at 2 GB/s = 13 ms
    assert results[1].bound_ms == pytest.approx(13.0) and results[1].ratio_to_bound == pytest.approx(9 / 13)
    assert results[2].ratio_to_torch_fused == pytest.approx(0.9) and results[2].ratio_to_bound == pytest.approx(1.5)
    met = {c["check"]: c["met"] for c in targets(results)}
    assert met == {
        "exact/fp32 <= 1.0x torch fused": True,
        "exact/fp32 <= 1.5x its bandwidth bound": True,
        "compact/int8 <= 0.8x torch fused": False,  # 0.9x
        "compact/int8 <= 1.5x its bandwidth bound": True,  # exactly 1.5x
    }  # the reference executor has no target
    assert targets(results, "sgd") == []


def test_rounds_pair_each_case_with_torch_fused_of_the_same_round():
    """A machine whose speed changes between rounds (here 3x slower in round 2 for torch, round 3 for
    the case) must not fake a speed-up: the ratio is the median of the per-round ratios, not the ratio of
    pooled medians; a failed round is left out of both."""
    fused = [10.0, 30.0, 10.0]
    case = [12.0, 36.0, 36.0]
    rounds = [
        [
            _result("w", "torch-fused", "baseline", f, touched=28.0),
            _result("w", "compact/int8", "leanopt", c, touched=12.0),
        ]
        for f, c in zip(fused, case, strict=True)
    ]
    rounds.append([_result("w", "torch-fused", "baseline", 10.0, touched=28.0),
                   _result("w", "compact/int8", "leanopt", 0.0, touched=12.0)])  # fmt: skip
    rounds[-1][1].status = "error"
    for r in (r for this in rounds for r in this):
        r.step_ms_all, r.min_ms = [r.step_ms, r.step_ms], r.step_ms
    merged = merge_rounds(rounds)
    relate(merged, gbps=2.0)
    by_key = {r.key: r for r in merged}
    int8 = by_key["compact/int8"]
    assert int8.round_ms == [12.0, 36.0, 36.0, None]
    assert int8.step_ms == 36.0  # median of its rounds
    assert int8.round_ratios == pytest.approx([1.2, 1.2, 3.6])
    assert int8.ratio_to_torch_fused == pytest.approx(1.2)  # pooled medians would say 36 / 10 = 3.6
    assert by_key["torch-fused"].step_ms == 10.0 and by_key["torch-fused"].ratio_to_torch_fused == pytest.approx(1.0)
    assert int8.step_ms_all == [12.0, 12.0, 36.0, 36.0, 36.0, 36.0] and int8.min_ms == 12.0
    printed = results_table(merged)
    assert "rounds (vs fused)" in printed and "1.20-3.60x" in printed  # the spread is shown


def test_bench_quick_prints_table_and_targets_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--quick", "--modes", "exact/fp32,compact/int8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vs torch fused" in text and "vs bound" in text and "vs in-place" in text and "targets" in text
    assert "in-place fp32 stream" in text and "wrote" in text
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["steps"] == 2 and doc["copy_gbps"] > 0 and doc["copy_gbps_end"] > 0
    assert doc["inplace_gbps"] > 0 and doc["inplace_gbps_end"] > 0
    assert list(doc["workloads"]) == ["tiny"]
    assert [r["key"] for r in doc["results"]] == ["torch-fused", "exact/fp32", "compact/int8"]
    assert all(r["status"] == "ok" and r["ratio_to_bound"] > 0 for r in doc["results"])
    assert all(r["ratio_to_inplace_bound"] > 0 and r["inplace_gbps"] > 0 for r in doc["results"])
    assert {t["check"] for t in doc["targets"]} >= {
        "exact/fp32 <= 1.0x torch fused",
        "compact/int8 <= 0.8x torch fused",
    }
    for t in doc["targets"]:  # printed as measured, marked as measured
        assert ("MISSED" if not t["met"] else "met") in text


def test_size_adds_a_workload_from_a_model_spec(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--size", "20000", "--steps", "1", "--modes", "exact/fp32", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert (
        doc["workloads"]["20000"]["num_params"] == 20000 and doc["workloads"]["20000"]["source"] == "a parameter count"
    )
    assert [r["mode"] for r in doc["results"]] == ["torch AdamW fp32 fused", "leanopt exact/fp32"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--workloads", "nope"], "--workloads: unknown model 'nope'"),
        (["--modes", "frobnicate"], "--modes: unknown mode 'frobnicate'; accepted: default, all, torch-fused"),
        (["--optimizer", "lion", "--modes", "torchao-8bit"], "does not exist for --optimizer lion"),
        (["--modes", "default,exact/bf16"], "'default' and 'all' stand alone"),
        (["--warmup", "0"], "--warmup must be at least 1"),
        (["--out", "/no/such/folder/b.json"], "folder '/no/such/folder' does not exist"),
        (["--kernel", "warp"], "--modes/--kernel"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ],
)
def test_bad_bench_arguments_give_one_line_and_exit_2(args, needle, capsys):
    assert main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("leanopt bench: error:")


def test_benchmarks_kernels_py_is_leanopt_bench_with_its_own_output(tmp_path):
    out = tmp_path / "k.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/kernels.py"), "--quick", "--modes", "exact/fp32", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "LEANOPT_DEBUG": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["command"] == f"leanopt bench --quick --modes exact/fp32 --out {out}"  # its default --out not added
    assert [r["key"] for r in doc["results"]] == ["torch-fused", "exact/fp32"]


def test_a_mode_can_turn_the_finiteness_check_off_and_a_bad_choice_is_one_line():
    case = select_cases("adamw", "exact/fp32:ignore")[-1]
    assert case.key == "exact/fp32:ignore"
    p = torch.nn.Parameter(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert case.build([p]).nonfinite == "ignore"
    from leanopt.cli.common import CLIError

    with pytest.raises(CLIError, match=r"nonfinite must be one of \['skip', 'raise', 'ignore'\]"):
        select_cases("adamw", "exact/fp32:never")


def test_the_bound_follows_the_copy_speed_measured_next_to_each_round():
    """A copy that runs twice as fast in round 2 halves that round's bound: the ratio to the bound is
    the median of the rounds' own ratios, not the pooled step time over one copy speed."""
    copies = [10.0, 20.0, 20.0]  # GB/s next to the case in each round
    times = [2.6, 2.6, 5.2]  # 1e6 params x 26 B = 26 MB: bounds 2.6, 1.3, 1.3 ms
    rounds = []
    for t, c in zip(times, copies, strict=True):
        r = _result("w", "exact/fp32", "leanopt", t, touched=26.0)
        r.step_ms_all, r.min_ms, r.copy_gbps = [t], t, c
        rounds.append([r])
    (merged,) = merge_rounds(rounds)
    relate([merged], gbps=1.0)  # the start's copy speed is not used when each round has its own
    assert merged.round_copy_gbps == [10.0, 20.0, 20.0] and merged.copy_gbps == 20.0
    assert merged.bound_ms == pytest.approx(1.3)  # at the median copy speed
    assert merged.ratio_to_bound == pytest.approx(2.0)  # rounds: 1.0, 2.0, 4.0


def test_the_in_place_bound_follows_the_in_place_stream_measured_next_to_each_round():
    """The tighter bound (an in-place stream's GB/s, as a step reads and writes) is related round by round
    like the copy's; with no measurement at all it stays 0 ("-" in the table), never a made-up figure."""
    streams = [40.0, 20.0, 26.0]  # GB/s next to the case in each round
    times = [1.3, 1.3, 1.3]  # 26 MB: in-place bounds 0.65, 1.3, 1.0 ms
    rounds = []
    for t, c in zip(times, streams, strict=True):
        r = _result("w", "exact/fp32", "leanopt", t, touched=26.0)
        r.step_ms_all, r.min_ms, r.copy_gbps, r.inplace_gbps = [t], t, 10.0, c
        rounds.append([r])
    (merged,) = merge_rounds(rounds)
    relate([merged], gbps=1.0, in_place=1.0)
    assert merged.round_inplace_gbps == streams and merged.inplace_gbps == 26.0
    assert merged.inplace_bound_ms == pytest.approx(1.0)  # at the median stream speed
    assert merged.ratio_to_inplace_bound == pytest.approx(1.3)  # rounds: 2.0, 1.0, 1.3
    assert merged.ratio_to_bound == pytest.approx(0.5)  # the copy's 10 GB/s: 2.6 ms
    single = _result("w", "exact/fp32", "leanopt", 2.6, touched=26.0)
    relate([single], gbps=10.0)
    assert single.ratio_to_bound == pytest.approx(1.0) and single.ratio_to_inplace_bound == 0.0
    assert results_table([single]).splitlines()[2].split()[8] == "-"
    relate([single], gbps=10.0, in_place=20.0)
    assert single.inplace_bound_ms == pytest.approx(1.3) and single.ratio_to_inplace_bound == pytest.approx(2.0)


def test_back_to_back_steps_change_the_lr_like_timed_ones_and_show_as_a_column_when_measured():
    """``pipelined_ms`` (CUDA only, by ``back_to_back``): steps without a wait in between, the learning
    rate changed before each as in time_steps (a path that rebuilt for a new LR would show); the table
    gets a "back to back ms" column only when a result has the figure, and merged rounds take its median."""
    params = make_params([(4, 4)], torch.bfloat16, "cpu")
    opt = leanopt.AdamW(params, lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    assert back_to_back(opt, 3) > 0
    assert seen == pytest.approx([1e-4, 1.01e-4, 1.02e-4])
    plain = [_result("w", "torch-fused", "baseline", 10.0, touched=28.0)]
    assert "back to back" not in results_table(plain)
    rounds = []
    for ms in (3.0, 1.0, 2.0):
        r = _result("w", "torch-fused", "baseline", 10.0, touched=28.0)
        r.step_ms_all, r.min_ms, r.pipelined_ms = [10.0], 10.0, ms
        rounds.append([r])
    merged = merge_rounds(rounds)
    assert merged[0].pipelined_ms == 2.0
    header, _, row = results_table(merged).splitlines()[:3]
    assert "back to back ms" in header and "2.00" in row.split()
