"""A short version of benchmarks/quality.py: compressed formats train like fp32 AdamW."""

import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import load_benchmark
from leanopt.data import stdlib_corpus
from leanopt.models import GPTConfig


@pytest.mark.slow
def test_short_quality_run_compact_int8_and_int4_track_fp32():
    q = load_benchmark("quality.py")
    setup = replace(
        q.SHORT,
        model=GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32),
        steps=40,
        batch_size=8,
        warmup=5,
        eval_batches=4,
        corpus_bytes=300_000,
    )
    data = stdlib_corpus(setup.corpus_bytes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and robust on a busy machine
    try:
        loss = {run: q.train(run, setup, data)["val_loss"] for run in ("fp32", "compact_int8", "compact_int4")}
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(v) for v in loss.values())
    assert loss["fp32"] < 5.0  # it learned something (uniform bytes: ln 256 = 5.55)
    assert abs(loss["compact_int8"] / loss["fp32"] - 1) < 0.01
    assert abs(loss["compact_int4"] / loss["fp32"] - 1) < 0.03


def test_quality_cli_writes_json_and_rejects_bad_arguments(tmp_path):
    q = load_benchmark("quality.py")
    out = tmp_path / "q.json"
    assert q.main(["--short", "--steps", "2", "--runs", "compact_int8", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["complete"] and [r["run"] for r in payload["results"]] == ["compact_int8"]
    assert payload["results"][0]["finite"]
    with pytest.raises(SystemExit):
        q.main(["--runs", "adam9", "--out", str(out)])
    with pytest.raises(SystemExit):
        q.main(["--steps", "0", "--out", str(out)])
