#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (about 5 minutes): runs the CUDA variants of the test suite
# (every test parametrized with device="cuda", including the fused-kernel tests on the Triton path) and
# the kernel benchmark on CUDA with FlashOptim, and writes everything as JSON under $OUT.
#
#   bash benchmarks/gpu_check.sh                 # results in benchmarks/results/gpu-<date>/
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # no internet: install FlashOptim from wheels
#
# Bring FlashOptim along for an offline machine with (on a machine with internet):
#   python -m pip download flashoptim --no-deps -d benchmarks/wheels
# Environment: PYTHON (default: .venv/bin/python if present, else python), OUT, WHEELS (default
# benchmarks/wheels), TEST_TIMEOUT (s, default 140), BENCH_TIMEOUT (s, default 100), FUSED_TIMEOUT (s,
# default 50).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
STAMP=$(date -u +%Y-%m-%dT%H%MZ)
OUT=${OUT:-benchmarks/results/gpu-$STAMP}
WHEELS=${WHEELS:-benchmarks/wheels}
mkdir -p "$OUT"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA device visible to torch ($PYTHON); nothing to check"
  exit 2
fi
"$PYTHON" - > "$OUT/machine.json" <<'EOF'
import json, platform, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                  "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}))
EOF
log "machine: $(cat "$OUT/machine.json")"

# FlashOptim: already installed, else from brought-along wheels, else PyPI (never touching torch).
if ! "$PYTHON" -c "import flashoptim" 2>/dev/null; then
  if compgen -G "$WHEELS/flashoptim*" > /dev/null; then
    log "installing FlashOptim from $WHEELS"
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps flashoptim >> "$OUT/log.txt" 2>&1
  else
    log "installing FlashOptim from PyPI"
    timeout 90 "$PYTHON" -m pip install --no-deps flashoptim >> "$OUT/log.txt" 2>&1
  fi
  "$PYTHON" -c "import flashoptim" 2>> "$OUT/log.txt" || log "FlashOptim unavailable: the benchmark records the error"
fi

# 1. Tests on CUDA: every test whose id names cuda (the CPU variants run in CI).
log "tests (CUDA variants)"
timeout "${TEST_TIMEOUT:-140}" "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda" \
  --junitxml "$OUT/tests.xml" tests > "$OUT/tests.txt" 2>&1
TEST_RC=$?
tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/log.txt"

# 2. Kernel benchmark on CUDA, FlashOptim included.
log "benchmark (CUDA)"
timeout "${BENCH_TIMEOUT:-100}" "$PYTHON" benchmarks/kernels.py --device cuda --steps 10 --warmup 3 \
  --out "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
BENCH_RC=$?
cat "$OUT/kernels.txt" | grep -v "^W[0-9]" | tee -a "$OUT/log.txt" | tail -n 25

# 3. The opt-in compiled path for int8/int4 states (kernel="fused"; by default CUDA runs them eagerly)
#    on one 50M tensor, next to the default: the data for making it the default.
log "benchmark (CUDA, int8/int4 compiled)"
timeout "${FUSED_TIMEOUT:-50}" "$PYTHON" benchmarks/kernels.py --device cuda --workloads tensor50m \
  --modes torch-fused,compact/int8,compact/int8@fused,compact/int4@fused --steps 10 --warmup 3 \
  --out "$OUT/kernels_int8_fused.json" > "$OUT/kernels_int8_fused.txt" 2>&1
FUSED_RC=$?
grep -v "^W[0-9]" "$OUT/kernels_int8_fused.txt" | tee -a "$OUT/log.txt" | tail -n 12

"$PYTHON" - "$OUT" "$TEST_RC" "$BENCH_RC" "$FUSED_RC" <<'EOF'
import json, sys, pathlib, xml.etree.ElementTree as ET
out, test_rc, bench_rc, fused_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"machine": json.loads((out / "machine.json").read_text()), "tests_rc": test_rc, "benchmark_rc": bench_rc,
           "int8_fused_benchmark_rc": fused_rc}
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as err:  # noqa: BLE001
    summary["tests"] = f"no junit xml: {err}"
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
EOF
log "results in $OUT (tests rc=$TEST_RC, benchmark rc=$BENCH_RC, int8 compiled benchmark rc=$FUSED_RC)"
[[ $TEST_RC -eq 0 && $BENCH_RC -eq 0 && $FUSED_RC -eq 0 ]]
