"""A short version of benchmarks/quality_conv.py: int8/int4 states on conv weights train like fp32 AdamW."""

import pytest
import torch

from conftest import load_benchmark


@pytest.mark.slow
def test_short_conv_run_int8_and_int4_track_fp32():
    q = load_benchmark("quality_conv.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {name: q.run(name, steps=40, batch=32, lr=3e-3, seed=0) for name in q.RUNS}
    finally:
        torch.set_num_threads(threads)
    fp32 = rows["torch AdamW fp32"]
    assert fp32["val_loss"] < 1.8  # it learned something (10 classes: ln 10 = 2.30)
    for name in ("leanopt compact/int8", "leanopt compact/int4"):
        assert rows[name]["quantised_state_share"] > 0.99  # the conv weights' states are quantised
        assert abs(rows[name]["val_loss"] / fp32["val_loss"] - 1) < 0.05, (name, rows[name], fp32)
    assert rows["leanopt compact/int8"]["bytes_per_param_held"] < 5.2
