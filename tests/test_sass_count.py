"""benchmarks/sass_count.py's walk of a disassembled kernel along its common path (what its instruction
counts per element rest on), on hand-written SASS in nvdisasm's layout; and, where NVRTC and nvdisasm
are installed, on a real kernel: the NaN/inf check's walk reads its gradient in 16-byte loads."""

import subprocess

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def sc():
    return load_benchmark("sass_count.py")


def sass(lines: list[str]) -> str:
    """nvdisasm-like text of ``lo_cuda``: labels as given, instructions numbered."""
    out, pc = ["//--------------------- .text.lo_cuda --------------------------", ".text.lo_cuda:"], 0
    for line in lines:
        if line.startswith("."):
            out.append(line)
        else:
            out.append(f"        /*{pc:04x}*/                   {line} ;")
            pc += 16
    return "\n".join(out) + "\n$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:\n        /*0ff0*/ RET ;\n"


def test_the_walk_skips_slow_paths_and_runs_loops_as_told(sc):
    text = sass([
        "S2R R0, SR_TID.X",
        ".L_x_1:",  # a loop of 3 instructions (the binary search)
        "IADD3 R1, R1, 0x1, RZ",
        "ISETP.GE.AND P0, PT, R1, R2, PT",
        "@!P0 BRA `(.L_x_1)",
        "FCHK P0, R2, R3",
        "@!P0 BRA `(.L_x_2)",  # around a division's slow path: taken
        "MOV R4, 0x100",
        "CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath)",
        ".L_x_2:",
        "@P1 EXIT",  # an early exit for threads past the end: not taken
        "@P2 BRA `(.L_x_3)",  # an ordinary branch: falls through
        "FADD R5, R5, R6",
        ".L_x_3:",
        "EXIT",
    ])  # fmt: skip
    ins, labels = sc.parse(text)
    assert len(ins) == 12 and labels == {".L_x_1": 1, ".L_x_2": 8, ".L_x_3": 11}
    trace = []
    # S2R, the loop 4 times (12), FCHK + BRA, @P1 EXIT, @P2 BRA, FADD, EXIT: 1 + 12 + 2 + 1 + 1 + 1 + 1
    assert sc.walk(ins, labels, [4], trace=trace) == 19
    assert not any("CALL" in t or "MOV R4" in t for t in trace)
    assert sc.walk(ins, labels, [1]) == 1 + 3 + 6
    assert sc.walk(ins, labels, []) == 10  # a loop past the list runs once


def test_the_walk_prefers_16_byte_loads_and_follows_plain_branches(sc):
    text = sass([
        "ISETP.NE.AND P0, PT, R0, RZ, PT",
        "@P0 BRA `(.L_x_1)",  # to the 16-byte loads: taken
        "LD.E.U16 R2, desc[UR4][R4.64]",
        "LD.E.U16 R3, desc[UR4][R4.64+0x2]",
        "BRA `(.L_x_2)",
        ".L_x_1:",
        "ISETP.GT.AND P1, PT, R1, RZ, PT",
        "@!P1 LDG.E.128.CONSTANT R8, desc[UR4][R4.64]",
        ".L_x_2:",
        "EXIT",
    ])  # fmt: skip
    ins, labels = sc.parse(text)
    trace = []
    assert sc.walk(ins, labels, [], trace=trace) == 5
    assert any(".128" in t for t in trace) and not any("U16" in t for t in trace)
    with pytest.raises(ValueError, match="no function"):
        sc.parse(text, "lo_cuda_finite")


def test_only_the_searching_warp_walks_the_search_for_the_blocks_tensor(sc):
    text = sass([
        "S2R R0, SR_TID.X",
        "ISETP.GT.U32.AND P0, PT, R0, 0x1f, PT",
        "@P0 BRA `(.L_x_1)",  # threads past the first warp skip the search
        "LDG.E.64 R2, desc[UR4][R4.64]",
        "VOTE.ANY R6, PT, P1",
        "FLO.U32 R6, R6",
        ".L_x_1:",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "EXIT",
    ])  # fmt: skip
    ins, labels = sc.parse(text)
    assert sc.walk(ins, labels, []) == 8
    trace = []
    assert sc.walk(ins, labels, [], trace=trace, searcher=False) == 5
    assert not any(t.startswith("VOTE") for t in trace)


def test_a_walk_that_never_ends_is_an_error(sc):
    ins, labels = sc.parse(sass([".L_x_0:", "NOP", "BRA `(.L_x_0)"]))
    with pytest.raises(RuntimeError, match="does not end"):
        sc.walk(ins, labels, [], limit=100)


@pytest.mark.parametrize("search", [0, 1, 2])
def test_the_nan_checks_walk_reads_16_bytes_at_a_time(sc, tmp_path, monkeypatch, search):
    """On the real check kernel (sm_90), with each search for a block's tensor: the walk's path holds
    its two 16-byte loads and no narrower load of the gradient, and costs well under one instruction per
    bf16 value; the search's rounds for 148 tensors: 8 binary steps, or 2 rounds of the 32-way search.
    The block's other warps skip the search only where its first warp searches for them (search=2): with
    search=1 every warp walks its own ballots (the rule must not take the branch over its loop)."""
    from leanopt.kernels import gpu

    monkeypatch.setitem(gpu.VARIANT, "search", search)
    nvrtc, nvdisasm = gpu.find_nvrtc(), sc.find_nvdisasm()
    if nvrtc is None or nvdisasm is None:
        pytest.skip("needs NVRTC and nvdisasm")
    cubin, _, _ = gpu.nvrtc_compile(nvrtc, gpu._finite_source(1), "lo_cuda_finite", "sm_90")
    (tmp_path / "k.cubin").write_bytes(cubin)
    text = subprocess.run([nvdisasm, "-c", str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True)
    ins, labels = sc.parse(text.stdout, "lo_cuda_finite")
    trace = []
    count = sc.walk(ins, labels, [sc.search_rounds(gpu, 148), 2], trace=trace)  # the block's first warp
    loads = [t for t in trace if " LD" in f" {t}" and "LDC" not in t]
    wide = [t for t in loads if ".128" in t]
    assert len(wide) == 2, loads
    assert not any(".U16" in t or ".S16" in t for t in loads), loads
    assert count / (32 * 16) < 0.5  # a warp: 32 threads x 16 values
    rounds = [sc.search_rounds(gpu, n) for n in (148, 32, 1025)]
    assert rounds == ([2, 1, 3] if search else [8, 5, 11])
    counted = sc.count(nvrtc, nvdisasm, gpu._finite_source(1), "lo_cuda_finite", "sm_90", [rounds[0], 2])
    assert counted["walked"] == count
    if search == 2:
        assert counted["walked_other_warps"] < count - 20  # the ballots and loads of two rounds left out
    else:
        assert counted["walked_other_warps"] == count
