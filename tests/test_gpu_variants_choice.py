"""benchmarks/gpu_variants.py's choice of code shapes (what benchmarks/gpu_check.sh runs the kernel
benchmark with): a variant replaces the default only if it is clearly faster and nowhere much slower."""

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def gv():
    return load_benchmark("gpu_variants.py")


def rows_for(gv, times: dict[str, float], gpu: bool = True) -> list[dict]:
    """Rows as gpu_variants.report writes them: each variant's modes on two workloads, the variant's
    time = default's x ``times[variant]`` (a float, or per workload a dict)."""
    rows = []
    for w, base in (("gpt2-small", 3.0), ("tensor50m", 1.0)):
        for v, (_, modes) in gv.VARIANTS.items():
            if v not in times:
                continue
            f = times[v][w] if isinstance(times[v], dict) else times[v]
            for m in modes:
                row = {"workload": w, "variant": v, "mode": m, "step_ms": 2 * base * f}
                if gpu:
                    row["gpu_ms"] = base * f
                rows.append(row)
    return rows


def test_the_clearly_faster_variant_of_each_family_is_chosen(gv):
    chosen = gv.choose(rows_for(gv, {"default": 1.0, "chunks4": 0.95, "chunks16": 0.9, "vec": 1.2,
                                     "groups4+table": 0.8}))  # fmt: skip
    assert chosen["families"]["flat"]["chosen"] == "chunks16"
    assert chosen["families"]["grouped"]["chosen"] == "groups4+table"
    assert chosen["families"]["flat"]["metric"] == "gpu_ms"
    assert chosen["settings"] == {"chunks": 16, "groups": 4, "table": True}
    assert chosen["env"] == "chunks=16,groups=4,table=1"
    from leanopt.kernels import gpu

    assert gpu.parse_variant(chosen["env"]) == chosen["settings"]  # what LEANOPT_GPU_VARIANT accepts


def test_a_small_gain_or_one_much_slower_case_keeps_the_default(gv):
    chosen = gv.choose(rows_for(gv, {"default": 1.0, "chunks4": 0.98,  # within the margin
                                     "chunks16": {"gpt2-small": 0.7, "tensor50m": 1.2},  # one case 1.2x
                                     "groups4+table": 1.05}))  # fmt: skip
    assert chosen["families"]["flat"]["chosen"] is None and chosen["families"]["grouped"]["chosen"] is None
    assert chosen["env"] == "" and chosen["settings"] == {}
    assert chosen["families"]["flat"]["scores"]["chunks16"]["worst"] == pytest.approx(1.2)


def test_step_time_decides_where_the_kernel_time_is_missing_and_a_failed_case_disqualifies(gv):
    rows = rows_for(gv, {"default": 1.0, "chunks16": 0.9, "vec": 0.8}, gpu=False)
    rows = [r for r in rows if not (r["variant"] == "vec" and r["workload"] == "tensor50m")]
    rows.append({"workload": "tensor50m", "variant": "vec", "mode": gv.FLAT[0], "error": "RuntimeError: boom"})
    chosen = gv.choose(rows)
    assert chosen["families"]["flat"]["metric"] == "step_ms"
    assert "vec" not in chosen["families"]["flat"]["scores"]  # not measured everywhere: not a candidate
    assert chosen["families"]["flat"]["chosen"] == "chunks16"


def test_a_variant_whose_bits_differ_is_never_chosen(gv):
    rows = rows_for(gv, {"default": 1.0, "chunks16": 0.9, "groups4+table": 0.5, "groups2+table": 0.8})
    for r in rows:
        if r["variant"] == "groups4+table":
            r["bits_differ"] = "compact/int8: tensor 3 differs from the native kernels'"
    chosen = gv.choose(rows)
    assert "groups4+table" not in chosen["families"]["grouped"]["scores"]
    assert chosen["families"]["grouped"]["chosen"] == "groups2+table"
    assert chosen["families"]["flat"]["chosen"] == "chunks16"


def test_the_bit_check_finds_kernels_that_differ_from_the_native_ones(gv, monkeypatch):
    """bits_differ (run on the device for each variant before it is timed): None for the kernels as
    they are (emulated here), the combination that differs when a kernel's code is changed."""
    from leanopt.kernels import gpu, native

    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setattr(gpu, "EMULATE", True)
    monkeypatch.setitem(gpu.VARIANT, "groups", 2)
    gpu.reset()
    try:
        assert gv.bits_differ(torch.device("cpu")) is None
        generate = gpu.generate
        # the grouped kernels' int8/int4 codes taken against half the group's scale
        monkeypatch.setattr(gpu, "generate", lambda spec, ns: generate(spec, ns).replace(
            "const float inv = 1.0f /", "const float inv = 0.5f /"))  # fmt: skip
        gpu.reset()
        found = gv.bits_differ(torch.device("cpu"))
        assert found is not None and found.startswith("compact/int8:"), found
    finally:
        gpu.reset()
