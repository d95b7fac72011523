"""``leanopt bench``: the reusable timing pieces and a short run that writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch

import leanopt
from leanopt.cli import main
from leanopt.cli.bench import bench_cases, make_params, run_bench, time_steps
from leanopt.cli.plan import Mode


def test_make_params_gives_the_same_values_in_every_dtype():
    fp32 = make_params([(3, 5), (7,)], torch.float32, "cpu", seed=1)
    bf16 = make_params([(3, 5), (7,)], torch.bfloat16, "cpu", seed=1)
    for a, b in zip(fp32, bf16, strict=True):
        assert torch.equal(a.detach().bfloat16(), b.detach()) and torch.equal(a.grad.bfloat16(), b.grad)


def test_time_steps_runs_warmup_plus_timed_steps():
    params = make_params([(4, 4)], torch.bfloat16, "cpu")
    opt = leanopt.AdamW(params, lr=1e-3)
    times = time_steps(opt, steps=3, warmup=2)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert int(opt.state[params[0]]["step"].item()) == 5


def test_cases_cover_torch_baselines_and_requested_modes():
    names = [c.name for c in bench_cases("adamw", [Mode("exact", "fp32"), Mode("exact", "bf16")])]
    assert names == ["torch-fused", "torch-foreach", "exact/fp32", "exact/bf16"]
    assert [c.name for c in bench_cases("lion", [Mode("exact", "fp32")])] == ["exact/fp32"]  # no torch Lion


def test_run_bench_reports_bytes_from_memory_report():
    cases = bench_cases("adamw", [Mode("exact", "fp32")])
    results = run_bench([(64, 32), (32,)], cases, steps=2, warmup=1)
    by_name = {r["name"]: r for r in results}
    assert by_name["torch-fused"]["bytes_per_param"] == pytest.approx(16.0 + 8 / (64 * 32 + 32))  # + 2 step counters
    assert by_name["exact/fp32"]["bytes_per_param"] == pytest.approx(14.0 + 8 / (64 * 32 + 32))
    assert all(len(r["times_ms"]) == 2 and len(r["warmup_ms"]) == 1 and r["median_ms"] > 0 for r in results)


def test_bench_command_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--size", "20000", "--steps", "2", "--modes", "exact/fp32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torch-fused" in text and "exact/fp32" in text and "vs torch fused" in text
    doc = json.loads(out.read_text())
    assert doc["model"]["num_params"] == 20000
    assert [r["name"] for r in doc["results"]] == ["torch-fused", "torch-foreach", "exact/fp32"]
