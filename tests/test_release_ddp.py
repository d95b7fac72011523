"""DDP + gradient release: 2 processes, gloo, CPU. Release must update from the all-reduced gradient and
give bit-identical weights to DDP without release (plain, accumulation with no_sync, global clipping)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_release import bits

WORKER = Path(__file__).with_name("_release_ddp_worker.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(tmp / "init"), str(tmp)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:  # never leave a rank behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario", ["adamw_exact", "sgd_stochastic", "adamw_accumulate", "adamw_clip", "adamw_clip_accumulate"]
)
def test_ddp_release_is_bit_identical_to_ddp(ddp_results, scenario):
    for rank, results in enumerate(ddp_results):
        plain, released = results[scenario]["plain"], results[scenario]["release"]
        for name in plain:
            assert torch.equal(bits(plain[name]), bits(released[name])), f"rank {rank}: {name} differs"
    ref = ddp_results[0][scenario]["release"]
    for name, value in ddp_results[1][scenario]["release"].items():
        assert torch.equal(bits(ref[name]), bits(value)), f"ranks disagree on {name}: local gradients were used"
