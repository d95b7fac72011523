"""``leanopt demo``: configuration choice, the worker's figures, the table, the PNG and an end-to-end run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from io import StringIO

import pytest

from leanopt.cli import main
from leanopt.cli.common import Features, ProgressBar, detect_features
from leanopt.cli.demo import MODELS, available_configs, plot, select_configs, summarize
from leanopt.cli.worker import train

FEATURES = detect_features()
CORE_ONLY = Features(release=False, masters=("exact", "none", "stochastic", "kahan"), states=("fp32", "bf16"))
EVERYTHING = Features(release=True, masters=("exact", "compact", "stochastic"), states=("fp32", "bf16", "int8", "int4"))


def test_default_configs_grow_with_what_is_installed():
    default, every = available_configs(CORE_ONLY)
    assert [c.name for c in default] == ["standard", "exact/fp32", "exact/bf16"]
    assert all(not c.release for c in every)
    default, every = available_configs(EVERYTHING)
    assert [c.name for c in default] == [
        "standard", "exact/fp32", "exact/fp32+release", "compact/int8+release", "compact/int4+release",
        "stochastic/int8+release",
    ]  # fmt: skip
    assert "compact/int8" in [c.name for c in every]


def test_selected_configs_always_start_with_the_standard_baseline():
    chosen = select_configs("exact/bf16,exact/fp32", CORE_ONLY)
    assert [c.name for c in chosen] == ["standard", "exact/bf16", "exact/fp32"]
    assert [c.name for c in select_configs("all", CORE_ONLY)][:1] == ["standard"]


def test_progress_bar_off_a_terminal_prints_quarters_only():
    stream = StringIO()
    bar = ProgressBar("run", 8, stream=stream, width=8)
    for i in range(1, 9):
        bar.update(i, f"loss {i}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "run  [#.......] 1/8 loss 1", "run  [##......] 2/8 loss 2", "run  [####....] 4/8 loss 4",
        "run  [######..] 6/8 loss 6", "run  [########] 8/8 loss 8",
    ]  # fmt: skip


def _fake(name, bpp, peak, step, train_loss, val):
    n = 1000
    return {
        "name": name, "num_params": n, "bytes_per_param": bpp,
        "bytes_by_category": {"weights": 2 * n, "master": 2 * n, "gradients": 0, "exp_avg": int((bpp - 4) / 2 * n),
                              "exp_avg_sq": int((bpp - 4) / 2 * n)},
        "peak_rss_above_start_bytes": peak, "cuda_peak_allocated_bytes": None, "median_step_s": step,
        "final_train_loss": train_loss, "val_loss": val, "train_losses": [3.0, 2.5, train_loss],
    }  # fmt: skip


def test_summary_gives_every_figure_as_a_ratio_against_standard():
    results = [
        _fake("standard", 16.0, 400 * 2**20, 0.2, 2.0, 2.2),
        _fake("exact/fp32+release", 12.0, 300 * 2**20, 0.1, 2.2, 2.2),
    ]
    text, ratios = summarize(results, cuda=False)
    assert ratios[0] == {"bytes_per_param": 1.0, "peak_memory": 1.0, "median_step_time": 1.0,
                         "final_train_loss": 1.0, "val_loss": 1.0}  # fmt: skip
    assert ratios[1] == pytest.approx(
        {
            "bytes_per_param": 0.75,
            "peak_memory": 0.75,
            "median_step_time": 0.5,
            "final_train_loss": 1.1,
            "val_loss": 1.0,
        }
    )
    assert "0.75x" in text and "0.50x" in text and "1.10x" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    results = [_fake("standard", 16.0, 4e8, 0.2, 2.0, 2.2), _fake("exact/fp32", 14.0, 3e8, 0.1, 2.2, 2.2)]
    assert plot(results, [], tmp_path / "demo.png", "title", cuda=False) is None
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    message = plot([_fake("standard", 16.0, 4e8, 0.2, 2.0, 2.2)], [], tmp_path / "demo.png", "t", cuda=False)
    assert "pip install 'leanopt[demo]'" in message
    assert not (tmp_path / "demo.png").exists()


def _cfg(**over):
    cfg = {"name": "x", "label": "x", "kind": "leanopt", "master": "exact", "states": "fp32", "release": False,
           "model": {**MODELS["tiny"], "n_layer": 1}, "steps": 3, "batch": 2, "lr": 2e-3, "seed": 0,
           "device": "cpu", "threads": None, "eval_batches": 1, "corpus_bytes": 200_000}  # fmt: skip
    cfg.update(over)
    return cfg


def test_worker_reports_memory_report_bytes_and_measured_peak():
    std = train(_cfg(kind="standard", name="standard"), emit=lambda line: None)
    lean = train(_cfg(), emit=lambda line: None)
    assert std["bytes_per_param"] == pytest.approx(16.0, abs=0.01)  # fp32 weights, grads, 2 fp32 states
    assert lean["bytes_per_param"] == pytest.approx(14.0, abs=0.01)  # bf16 + int16 remainder + bf16 grads + fp32 states
    for r in (std, lean):
        assert r["completed_steps"] == 3 and len(r["step_times_s"]) == 3
        assert all(math.isfinite(v) for v in r["train_losses"]) and math.isfinite(r["val_loss"])
        assert r["peak_rss_bytes"] > 0 and r["peak_rss_above_start_bytes"] > 0


@pytest.mark.skipif(not FEATURES.release, reason="gradient release has not landed")
def test_worker_with_release_trains_bit_identically_and_holds_no_gradients():
    plain = train(_cfg(), emit=lambda line: None)
    released = train(_cfg(release=True), emit=lambda line: None)
    assert released["train_losses"] == plain["train_losses"]
    assert released["val_loss"] == plain["val_loss"]
    assert released["bytes_by_category"]["gradients"] == 0 < plain["bytes_by_category"]["gradients"]


@pytest.mark.slow
def test_demo_end_to_end_in_fresh_processes_writes_table_json_and_png(tmp_path):
    configs = "standard,exact/fp32" + ("+release" if FEATURES.release else "")
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "leanopt", "demo", "--quick", "--steps", "3", "--batch", "2", "--configs", configs,
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LEANOPT_DEBUG": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bytes per parameter" in res.stdout and "peak RSS" in res.stdout and "[####" in res.stderr
    doc = json.loads((out / "demo.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert list(runs) == configs.split(",")
    assert runs["standard"]["ratios_vs_standard"]["bytes_per_param"] == 1.0
    lean = runs[configs.split(",")[1]]
    base = runs["standard"]
    assert base["bytes_per_param"] == pytest.approx(16.0, abs=0.01)
    assert lean["ratios_vs_standard"]["bytes_per_param"] == lean["bytes_per_param"] / base["bytes_per_param"]
    assert lean["ratios_vs_standard"]["bytes_per_param"] < 1.0
    # each run was its own process: the workers' start RSS is measured separately
    assert all(r["peak_rss_bytes"] > 0 and len(r["train_losses"]) == 3 for r in runs.values())
    # where the time went: each run's wall time (process start to end) and its phases inside the worker
    assert sum(r["wall_s"] for r in runs.values()) <= doc["wall_s"] and f"({doc['wall_s']:.0f} s)" in res.stdout
    assert all(sum(r["phase_s"].values()) < r["wall_s"] for r in runs.values())
    try:
        import matplotlib  # noqa: F401

        assert (out / "demo.png").stat().st_size > 10_000
    except ImportError:
        assert "pip install 'leanopt[demo]'" in res.stderr


def test_list_configs_names_what_can_run(capsys):
    assert main(["demo", "--list-configs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("standard") and "exact/fp32" in out and "(default)" in out


def test_worker_builds_kernels_before_the_peak_is_measured_and_trains_the_same(monkeypatch):
    import torch

    import leanopt.kernels

    kept, calls = [], []

    def fake_prepare(opt):  # as leanopt.kernels.prepare: creates the state, plus a kernel build's memory
        calls.append(sum(len(s) for s in opt.state.values()))  # no state exists before
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state_for(p, group)  # zeros, as the first step would create them
        transient = torch.ones(64 * 2**20)  # 256 MiB, touched, then freed
        kept.append(torch.ones(16 * 2**20))  # 64 MiB kept, as a kernel cache would be
        del transient

    monkeypatch.delattr(leanopt.kernels, "prepare", raising=False)  # as before leanopt had it
    plain = train(_cfg(), emit=lambda line: None)
    monkeypatch.setattr(leanopt.kernels, "prepare", fake_prepare, raising=False)
    prepared = train(_cfg(), emit=lambda line: None)
    assert calls == [0] and plain["kernel_prepare"]["called"] is False and prepared["kernel_prepare"]["called"]
    assert prepared["train_losses"] == plain["train_losses"] and prepared["val_loss"] == plain["val_loss"]
    assert set(prepared["phase_s"]) == {"warmup", "build", "prepare", "train", "eval"}
    assert all(v >= 0 for v in prepared["phase_s"].values())
    state = {k: v for k, v in prepared["bytes_by_category"].items() if k not in ("weights", "gradients")}
    assert prepared["kernel_prepare"]["state_bytes"] == sum(state.values()) > 0  # the state is training memory
    if not prepared["peak_rss_reset"]:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert 56 * 2**20 < prepared["kernel_prepare"]["rss_bytes"] < 72 * 2**20  # the kept 64 MiB, not the state
    # neither the 256 MiB transient nor the 64 MiB cache counts as training memory
    assert abs(prepared["peak_rss_above_start_bytes"] - plain["peak_rss_above_start_bytes"]) < 32 * 2**20
    assert train(_cfg(kind="standard", name="standard"), emit=lambda line: None)["kernel_prepare"]["called"] is False
    assert calls == [0]  # the standard recipe has no leanopt kernels to prepare
    monkeypatch.undo()
    if callable(getattr(leanopt.kernels, "prepare", None)):  # the real one, where this leanopt has it
        real = train(_cfg(), emit=lambda line: None)
        assert real["kernel_prepare"]["called"] and real["train_losses"] == plain["train_losses"]


def test_a_busy_machine_is_named_before_timings_are_trusted(monkeypatch):
    from leanopt.cli import common

    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(common.os, "getloadavg", lambda: (3.2, 2.0, 1.0))
    assert common.busy_note() == "note: this machine is busy (load average 3.2 on 2 CPUs): times will be noisy"
    monkeypatch.setattr(common.os, "getloadavg", lambda: (0.4, 2.0, 1.0))
    assert common.busy_note() is None and common.loadavg() == 0.4
