#!/usr/bin/env bash
# GPU verification of pyllm, for a machine with an NVIDIA GPU (sm_80+), a CUDA build of torch, triton,
# pytest, CMake and ninja, and no network. From the repository root:
#
#   bash benchmarks/gpu_check.sh [report_dir]        (default ./gpu_report)
#
# Steps, each under `timeout`, the whole run kept under ~8 minutes on an H100-class GPU:
#   env          nvidia-smi, versions of python/torch/triton/nvcc/cmake, torch.cuda.is_available()
#   build_ext    pip install --no-build-isolation --no-deps -e .  (pyllm._C with the CUDA kernels)
#   build_dev    CMake build of csrc/cuda + csrc/dev harnesses for this GPU's arch (runs beside build_ext)
#   pytest       PYLLM_TEST_DEVICE=cuda pytest -x -q tests
#   attention_fwd, attention_bwd, layer_norm     the csrc/dev harnesses (validate, then time)
#   bench_attention, bench_layer_norm            benchmarks/bench_*.py --device cuda
# Writes report.md, report.json and logs/<step>.log into report_dir. A failed build skips the steps
# that need it (the report says so). Exit status: 0 all ok, 1 some step failed, 2 no usable GPU.
set -u -o pipefail

if [[ "${1:-}" == --env-probe ]]; then MODE=env-probe; else MODE=check; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"  # all steps together

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

record() {  # name status rc seconds timeout command
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STEPS"
}

skip() {  # name reason
  echo "$2" >"$LOGS/$1.log"
  record "$1" skipped - 0 - "$2"
  echo "== $1: skipped ($2)"
}

# run_step NAME TIMEOUT_S CMD...: runs CMD under timeout (capped by the remaining budget), output to
# logs/NAME.log; returns the command's status.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if ((left < 10)); then
    skip "$name" "time budget of ${BUDGET_S}s used up"
    return 124
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - t0)) status=ok
  if ((rc == 124 || rc == 137)); then
    status=timeout
  elif ((rc != 0)); then
    status=fail
  fi
  record "$name" "$status" "$rc" "$secs" "$limit" "$*"
  echo "   $status (rc=$rc, ${secs}s)"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   | /'
  return $rc
}

write_report() {
  local verdict=$1
  "$PY" "$REPO/benchmarks/gpu_report.py" "$OUT" "$verdict" "$(($(date +%s) - START))" ||
    { # no usable python: a plain listing still says what happened
      { echo "# pyllm GPU check: $verdict"; echo; echo '```'; cat "$STEPS"; echo '```'; } >"$OUT/report.md"
    }
  echo "report: $OUT/report.md ($verdict)"
}

# ---- env ------------------------------------------------------------------------------------------
env_probe() {
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  nvidia-smi || echo "nvidia-smi: not available"
  echo
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
  cmake --version 2>/dev/null | head -n 1 || echo "cmake: not found"
  ninja --version 2>/dev/null | sed 's/^/ninja /' || echo "ninja: not found"
  "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda)
    ok = torch.cuda.is_available()
    print("torch.cuda.is_available()", ok)
    if ok:
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "capability", f"{p.major}.{p.minor}", "memory_GiB", round(p.total_memory / 2**30, 1))
except Exception as e:  # report, do not crash: the verdict comes from the exit status
    print("torch: unusable:", e)
    ok = False
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
try:
    import pytest
    print("pytest", pytest.__version__)
except Exception as e:
    print("pytest: not importable:", e)
sys.exit(0 if ok else 3)
EOF
}

if [[ $MODE == env-probe ]]; then
  env_probe
  exit $?
fi

OUT="$(mkdir -p "${1:-./gpu_report}" && cd "${1:-./gpu_report}" && pwd)"
LOGS="$OUT/logs"
STEPS="$OUT/steps.tsv"  # name, status, rc, seconds, timeout, command
mkdir -p "$LOGS"
: >"$STEPS"
START=$(date +%s)
cd "$REPO" || exit 2

if ! run_step env 60 bash "$REPO/benchmarks/gpu_check.sh" --env-probe; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no GPU: nvidia-smi not found" >>"$LOGS/env.log"
  else
    echo "no GPU usable by torch (torch.cuda.is_available() is False or torch is missing)" >>"$LOGS/env.log"
  fi
  for s in build_ext build_dev pytest attention_fwd attention_bwd layer_norm bench_attention bench_layer_norm; do
    skip "$s" "no usable GPU (see env)"
  done
  write_report "no GPU"
  exit 2
fi

# Build for this GPU only (faster than every arch); e.g. 9.0 -> 90.
CAP=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null || echo 80)
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# ---- builds: the CMake harness build runs in the background beside the extension build ------------
DEV_BUILD="$OUT/cmake-build"
( run_step build_dev 300 bash -c "cmake -S '$REPO' -B '$DEV_BUILD' -G Ninja -DCMAKE_CUDA_ARCHITECTURES=$CAP -DPYLLM_RESOURCE_USAGE=ON && cmake --build '$DEV_BUILD' -j $MAX_JOBS" ) &
DEV_PID=$!
run_step build_ext 360 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
EXT_RC=$?
wait "$DEV_PID"
DEV_RC=$(awk -F'\t' '$1 == "build_dev" {print ($2 == "ok") ? 0 : 1}' "$STEPS")

FAILED=0
((EXT_RC != 0 || DEV_RC != 0)) && FAILED=1

# ---- tests and harnesses ------------------------------------------------------------------------------
if ((EXT_RC == 0)); then
  # the op tests on CUDA tensors (cuda and triton backends); one heuristic Triton config per shape keeps
  # compile time inside the budget
  PYLLM_TEST_DEVICE=cuda PYLLM_TRITON_AUTOTUNE=0 run_step pytest 200 "$PY" -m pytest -x -q tests/test_attention.py tests/test_layer_norm.py tests/test_dropins.py || FAILED=1
else
  skip pytest "build_ext failed"
fi

for h in attention_fwd attention_bwd layer_norm; do
  if ((DEV_RC == 0)) && [[ -x "$DEV_BUILD/$h" ]]; then
    run_step "$h" 90 "$DEV_BUILD/$h" || FAILED=1
  else
    skip "$h" "build_dev failed or $h was not built"
  fi
done

for b in attention layer_norm; do
  if ((EXT_RC != 0)); then
    skip "bench_$b" "build_ext failed"
  elif [[ -f "benchmarks/bench_$b.py" ]]; then
    run_step "bench_$b" 90 "$PY" "benchmarks/bench_$b.py" --device cuda || FAILED=1
  else
    skip "bench_$b" "benchmarks/bench_$b.py not found"
  fi
done

if ((FAILED)); then write_report "FAILED"; exit 1; fi
write_report "ok"
exit 0
