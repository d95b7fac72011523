#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: runs the CUDA variants of the test suite (every test whose
# id names cuda) and the kernel benchmark on CUDA with FlashOptim (GPT-2 small, one 50M tensor, 500
# small tensors; kernel="auto" runs the multi-tensor CUDA kernels there): about 4.5 minutes on an H200.
# With FULL=1 (what a lent device session runs, about 8 minutes) it first times the CUDA kernels'
# code-shape variants (benchmarks/gpu_variants.py, which chooses the shapes clearly faster than the
# defaults), runs the benchmark in the chosen shapes, and then measures the host time per tensor of a
# planned step and per gradient release hook, and, while at most EXTRA_BUDGET (default 540) seconds have
# passed, an FSDP2 step on the GPU (benchmarks/fsdp_step.py, at most 45 s; summary.json's fsdp_benchmark),
# the host time of a step by part (benchmarks/gpu_host_parts.py: each CUDA call alone, steps synchronised
# and back to back, release hooks; at most 70 s; summary.json's host_parts) and the CPU kernel benchmark
# on the host's own cores (torch fused against leanopt exact/fp32, compact/int8, compact/int4; at most
# 75 s; summary.json's cpu_host_benchmark: on the H200's 16-core host, 2026-11-30, a CPU step was
# memory-bound and met the CPU targets, where this project's 2-core CI machines are compute-bound).
# Everything goes under $OUT: summary.json (machine, date,
# exit codes, test counts, the shapes benchmarked), log.txt (everything printed), tests.txt, tests.xml,
# kernels.json, and with FULL=1 variants.json, gpu_host.json and release_host.json. Eight files at
# most, no subfolders: what a device call brings back.
#
#   bash benchmarks/gpu_check.sh                 # results in $OUT, else benchmarks/results/gpu-<date>/
#   FULL=1 bash benchmarks/gpu_check.sh          # with the variants and the host time
#   DRY_RUN=1 FULL=1 OUT=/tmp/g bash benchmarks/gpu_check.sh   # the script itself, on a CPU (~1.5 min)
#
# With a lent device machine (the `run` tool): command `FULL=1 bash benchmarks/gpu_check.sh`, timeout_s
# 590; the eight files come back from its $OUT; commit them as benchmarks/results/gpu-<date>/.
#
# It needs no network and no install: it runs leanopt from src/ (PYTHONPATH) with the machine's own
# python3 and torch, and installs FlashOptim and optimi from benchmarks/wheels/ (pure Python, in the
# repo) into a temporary folder when they are missing.
# Environment: PYTHON (default: .venv/bin/python if present, else python3), OUT, WHEELS (default
# benchmarks/wheels), FULL, TEST_TIMEOUT (s, default 240), BENCH_TIMEOUT (s, default 100),
# VARIANTS_TIMEOUT (s, default 170), HOST_TIMEOUT (s, default 40), RELEASE_TIMEOUT (s, default 30),
# EXTRA_BUDGET (s since the start, default 540: the FSDP2 step runs only with 20 s of it left, the CPU
# benchmark with 30). On an
# H200 (2026-11-29): tests 193 s, benchmark 75 s; variants 80 s for 36 timed cases, each drawing its
# parameters (now 90 cases on 3 workloads that reuse each workload's parameter values, 45 of them
# profiled); host 14 s; release (added 2026-11-30, not yet run there: 3 rounds of 4 modes x 13
# iterations of a 128-layer MLP, seconds). 9.7 minutes at most plus ~20 s of setup, ~7 expected: if a
# call's limit stops it, every file but summary.json is already written. LEANOPT_GPU_VARIANT, if set, is what the benchmark runs instead of the
# variants' choice. DRY_RUN=1 runs the same steps on the CPU with a tiny workload (to check the script
# itself on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
STAMP=$(date -u +%Y-%m-%dT%H%MZ)
OUT=${OUT:-benchmarks/results/gpu-$STAMP}
WHEELS=${WHEELS:-benchmarks/wheels}
SITE=$(mktemp -d)  # wheels brought along are installed here, not into the machine's Python
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
# gated VAR WHAT MIN MAX CMD...: CMD (at most MAX s, its output into the log) if at least MIN s of
# EXTRA_BUDGET are left, its exit code into the variable VAR; else logged as skipped (VAR unchanged).
gated() {
  local var=$1 what=$2 min=$3 max=$4 left=$(( ${EXTRA_BUDGET:-540} - SECONDS ))
  shift 4
  if (( left >= min )); then
    log "$what (${left} s left of ${EXTRA_BUDGET:-540})"
    timeout "$(( left < max ? left : max ))" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
    printf -v "$var" '%s' "${PIPESTATUS[0]}"
  else
    log "$what: skipped, ${left} s left of ${EXTRA_BUDGET:-540}"
  fi
}

DEVICE=cuda WORKLOADS=(--workloads gpt2-small,tensor50m,many-small) STEPS=(--steps 10 --warmup 3) VWORK=()
RELEASE=(--path cuda --rounds 3 --iters 10)
CPU_WORK=(--workloads tensor50m,gpt2-small --steps 5 --rounds 3)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  CPU_WORK=(--workloads tiny --steps 1 --rounds 1)
  DEVICE=cpu WORKLOADS=(--workloads tiny) STEPS=(--steps 1 --warmup 1) VWORK=(--workloads tiny)
  RELEASE=(--path cuda-emulated --rounds 1 --iters 2 --warmup 1)
  log "DRY_RUN=1: the CPU, tiny workloads"
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA device visible to torch ($PYTHON); nothing to check"
  exit 2
fi
"$PYTHON" - "$STAMP" > "$OUT/machine.json" <<'EOF'
import json, platform, sys, torch
info = {"date": sys.argv[1], "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "platform": platform.platform()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info))
EOF
log "machine: $(cat "$OUT/machine.json")"

# FlashOptim and optimi: already installed, else from the wheels in the repo (never touching torch).
for pkg in flashoptim:flashoptim optimi:torch_optimi; do
  mod=${pkg%%:*}; dist=${pkg##*:}
  if ! "$PYTHON" -c "import $mod" 2>/dev/null; then
    if compgen -G "$WHEELS/$dist-*.whl" > /dev/null; then
      log "installing $dist from $WHEELS"
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/$dist-*.whl >> "$OUT/log.txt" 2>&1
    fi
    "$PYTHON" -c "import $mod" 2>> "$OUT/log.txt" || log "$dist unavailable: the benchmark records it"
  fi
done
"$PYTHON" -c "import leanopt, torch; print('leanopt from', leanopt.__file__, '| torch', torch.__version__)" 2>&1 | tee -a "$OUT/log.txt"

# 1. Tests on CUDA: every test whose id names cuda (the CPU variants run in CI), but the offline source
#    checks (clang's CUDA front end, NVRTC from its wheel), which need no GPU and run in CI.
log "tests (CUDA variants)"
timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  -k "cuda and not clangs_cuda_checks and not compiles_with_nvrtc" \
  --junitxml "$OUT/tests.xml" tests > "$OUT/tests.txt" 2>&1
TEST_RC=$?
tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/log.txt"

VARIANTS_RC=-1 HOST_RC=-1 RELEASE_RC=-1 CPU_RC=-1 FSDP_RC=-1 PARTS_RC=-1 PLAN_RC=-1  # -1: not run (FULL=1 runs them)

# 2. (FULL=1) The CUDA kernels' code-shape variants (kernels.gpu.VARIANT: the defaults and the ones not yet timed,
#    4 or 16 chunks per block in the flat kernels and the NaN/inf check, vector loads, several groups per
#    warp with a decode table), next to torch's fused AdamW; each case's kernel time from torch.profiler
#    too (gpu_ms, and per kernel: gpu_ms_by_name), to tell it from host time. It chooses, per kernel
#    family, a variant clearly faster than the default (gpu_variants.choose; "chosen" in variants.json).
if [[ "${FULL:-0}" == 1 ]]; then
  log "kernel variants ($DEVICE)"
  timeout "${VARIANTS_TIMEOUT:-170}" "$PYTHON" benchmarks/gpu_variants.py --device "$DEVICE" \
    "${VWORK[@]}" --steps "${STEPS[1]}" --out "$OUT/variants.json" 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
  VARIANTS_RC=${PIPESTATUS[0]}
  CHOSEN=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1])).get('chosen', {}).get('env', ''))" \
    "$OUT/variants.json" 2>/dev/null)
  export LEANOPT_GPU_VARIANT="${LEANOPT_GPU_VARIANT:-$CHOSEN}"
fi

# 3. Kernel benchmark on CUDA, FlashOptim included, leanopt's kernels in the chosen shapes (kernels.json
#    records them: gpu_variant; host_ms: each case's time until step() returned).
log "benchmark ($DEVICE; LEANOPT_GPU_VARIANT='${LEANOPT_GPU_VARIANT:-}')"
timeout "${BENCH_TIMEOUT:-100}" "$PYTHON" benchmarks/kernels.py --device "$DEVICE" "${WORKLOADS[@]}" "${STEPS[@]}" \
  --out "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
BENCH_RC=$?
grep -v "^W[0-9]" "$OUT/kernels.txt" >> "$OUT/log.txt"; tail -n 25 "$OUT/kernels.txt"; rm -f "$OUT/kernels.txt"

# 4. (FULL=1) Host time of a kernel="fused" step on CUDA: planned against general, 500 small tensors.
if [[ "${FULL:-0}" == 1 ]]; then
  log "host time per tensor ($DEVICE)"
  timeout "${HOST_TIMEOUT:-40}" "$PYTHON" benchmarks/gpu_host_overhead.py --device "$DEVICE" --steps 10 \
    --out "$OUT/gpu_host.json" 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
  HOST_RC=${PIPESTATUS[0]}
  # 5. (FULL=1) Gradient release's hooks on CUDA: each iteration (forward, backward with the hooks' updates,
  #    step, synchronise) against backward alone, with the hooks' plans and without (256 small tensors).
  log "gradient release, per hook ($DEVICE)"
  timeout "${RELEASE_TIMEOUT:-30}" "$PYTHON" benchmarks/release_overhead.py "${RELEASE[@]}" \
    --out "$OUT/release_host.json" 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
  RELEASE_RC=${PIPESTATUS[0]}
  # 6. (FULL=1, only if the time allows) An FSDP2 step on the device: one rank, 128 sharded tensors, the
  #    sharded updates in one launch per kernel and their NaN/inf check in one launch (since 2026-11-30;
  #    measured before only emulated). Into summary.json (fsdp_benchmark).
  gated FSDP_RC "FSDP2 step ($DEVICE)" 20 45 "$PYTHON" benchmarks/fsdp_step.py --device "$DEVICE" --steps 20 \
    --out "$OUT/fsdp.json"
  # 6b. (FULL=1, only if the time allows) Where a CUDA step's host time goes (benchmarks/gpu_host_parts.py):
  #    each CUDA call of the path timed alone, steps of one 50M tensor and GPT-2 (host, synchronised and
  #    back to back) and release hooks. Into summary.json (host_parts).
  gated PARTS_RC "host time by part ($DEVICE)" 40 70 "$PYTHON" benchmarks/gpu_host_parts.py --device "$DEVICE" \
    --release-rounds 2 --out "$OUT/host_parts.json"
  # 6c. (FULL=1, only if the time allows) Planned steps' host time against the code before their launch
  #    tables were kept (855b674; git, or its tree in .ab/src carried along), both packages stepped
  #    alternately in one process (benchmarks/gpu_plan_host.py). Into summary.json (plan_host).
  AGAINST=855b674
  [[ -d .ab/src ]] && AGAINST=.ab/src
  if [[ -d "$AGAINST" ]] || git rev-parse --verify -q "$AGAINST^{commit}" > /dev/null 2>&1; then
    gated PLAN_RC "planned step host work against $AGAINST ($DEVICE)" 15 40 "$PYTHON" benchmarks/gpu_plan_host.py \
      --device "$DEVICE" --against "$AGAINST" --rounds 5 --calls 200 --out "$OUT/plan_host.json"
  else
    log "planned step host work: skipped (neither git nor .ab/src here to load $AGAINST's code from)"
  fi
  # 7. (FULL=1, only if the time allows) The CPU kernels on the GPU host's own cores: with 16 cores a CPU
  #    step may be memory-bound where this project's 2-core machines are compute-bound, which decides
  #    whether int8 states' fewer bytes make the step faster than torch's fused fp32 AdamW there (the
  #    kernel issue's CPU targets). Its JSON goes into summary.json (cpu_host_benchmark): 8 files at most.
  gated CPU_RC "CPU kernels on the GPU host" 30 75 "$PYTHON" benchmarks/kernels.py --device cpu "${CPU_WORK[@]}" \
    --modes torch-fused,exact/fp32,exact/fp32:ignore,compact/int8,compact/int4 --out "$OUT/kernels_cpu.json"
fi

"$PYTHON" - "$OUT" "$TEST_RC" "$BENCH_RC" "$VARIANTS_RC" "$HOST_RC" "$RELEASE_RC" "${LEANOPT_GPU_VARIANT:-}" "$CPU_RC" \
  "$FSDP_RC" "$PARTS_RC" "$PLAN_RC" <<'EOF'
import json, sys, pathlib, xml.etree.ElementTree as ET
out, test_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
variants_rc, host_rc, release_rc, cpu_rc, fsdp_rc, parts_rc, plan_rc = (None if int(x) == -1 else int(x)
                                                                        for x in (*sys.argv[4:7], *sys.argv[8:12]))
summary = {"machine": json.loads((out / "machine.json").read_text()), "tests_rc": test_rc, "benchmark_rc": bench_rc,
           "variants_rc": variants_rc, "host_overhead_rc": host_rc, "release_rc": release_rc,
           # None: not run (FULL=1 only, and only if the time allowed)
           "fsdp_benchmark_rc": fsdp_rc, "cpu_host_benchmark_rc": cpu_rc, "host_parts_rc": parts_rc,
           "plan_host_rc": plan_rc,
           "benchmark_gpu_variant": sys.argv[7]}
for name, key in (("kernels_cpu.json", "cpu_host_benchmark"), ("fsdp.json", "fsdp_benchmark"),
                  ("host_parts.json", "host_parts"), ("plan_host.json", "plan_host")):
    path = out / name  # kept in summary.json: a device call brings back 8 files at most
    if path.exists():
        try:
            summary[key] = json.loads(path.read_text())
        except ValueError as err:
            summary[key] = f"unreadable: {err}"
        path.unlink()
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as err:  # noqa: BLE001
    summary["tests"] = f"no junit xml: {err}"
(out / "summary.json").write_text(json.dumps(summary, indent=1))
(out / "machine.json").unlink()  # in summary.json now
print(json.dumps(summary))
EOF
log "results in $OUT (tests rc=$TEST_RC, benchmark rc=$BENCH_RC, variants rc=$VARIANTS_RC, host rc=$HOST_RC," \
  "release rc=$RELEASE_RC, FSDP2 rc=$FSDP_RC, host parts rc=$PARTS_RC and CPU host rc=$CPU_RC: not part of the verdict)"
[[ $TEST_RC -eq 0 && $BENCH_RC -eq 0 && ( "${FULL:-0}" != 1 || ( $VARIANTS_RC -eq 0 && $HOST_RC -eq 0 && $RELEASE_RC -eq 0 ) ) ]]
