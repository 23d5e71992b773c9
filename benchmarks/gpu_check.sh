#!/usr/bin/env bash
# The GPU checks of the fused kernels in one command, for a lent GPU machine:
#
#   bash benchmarks/gpu_check.sh [tests] [tests-band] [bench] [bench-bf16] [model] [sweep] [profile]   (default: tests bench)
#
# tests       tests/ops/test_cuda.py: the Triton path against float64 references (pytest-xdist
#             where installed: the first launch of each kernel variant compiles it, about a
#             second each on one core)
# tests-band  the same with the forward and backward in one launch each (two with a training
#             BatchNorm) for every call: SPATIALATTN_TRITON_BAND_FORWARD=1 / _BACKWARD=1, the
#             check to run before turning them on by default
# bench       benchmarks/bench_sam.py --device cuda --quick (float32): the issue's ratios to x.clone()
# bench-bf16  the same in bfloat16
# model       benchmarks/bench_model.py --device cuda --quick: the attention layers inside a ResNet-50
#             (batch 8, 224x224), in copies of their inputs (needs torchvision)
# sweep       benchmarks/triton_report.py --sweep: each kernel under its launch settings
# profile     benchmarks/profile_cuda.py: host time vs GPU time per call (and replayed from a CUDA
#             graph), the kernels of each call, the host cost of one launch; the same calls with
#             the forward and backward in one launch each ("fwd band", "fwd+bwd band": off by
#             default until these figures are read)
#
# Runs from the repository root without installing the package (PYTHONPATH=.), with the
# machine's own python3, torch and triton. Writes one log (gpu_check.log) and the tables to
# $OUT (the device tool's folder) or benchmarks/results/gpu; each part has its own time limit,
# so a slow part cannot eat the others'. About 2-4 min for tests, 3-5 for bench on an H200
# (first compiles included), 3-4 for sweep: split them over two calls of the device tool if
# its budget is short. Each part's time limit (seconds) can be set as LIMIT_<part> with '-' as
# '_' (LIMIT_tests=150 LIMIT_bench_bf16=120 ...): a short lease then gets a table per part
# instead of one part that ran out of time.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Not the C++ CPU kernels: test_cuda.py's float64 references run on the CPU, and their first
# call would build the extension (minutes of one core on a fresh machine, inside the first
# part's time limit); plain PyTorch gives those references, independent of our kernels too.
# The GPU parts never take the C++ path.
export SPATIALATTN_DISABLE_CPP=${SPATIALATTN_DISABLE_CPP:-1}
py=${PYTHON:-python3}
parts=${*:-tests bench}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,driver_version --format=csv 2>&1
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
  $py -m spatialattn.cli kernels 2>&1  # which implementation each device and dtype gets (Triton on cuda)
} | tee "$log"
status=0
for part in $parts; do
  start=$SECONDS
  echo "== $part" | tee -a "$log"
  var="LIMIT_${part//-/_}"
  limit=${!var:-}
  case $part in
    tests)
      xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
      timeout ${limit:-420} $py -m pytest -q -p no:cacheprovider --durations=8 $xdist tests/ops/test_cuda.py >>"$log" 2>&1 ;;
    tests-band)
      xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
      SPATIALATTN_TRITON_BAND_FORWARD=1 SPATIALATTN_TRITON_BAND_BACKWARD=1 timeout ${limit:-420} \
        $py -m pytest -q -p no:cacheprovider --durations=8 $xdist tests/ops/test_cuda.py >>"$log" 2>&1 ;;
    bench)
      timeout ${limit:-420} $py benchmarks/bench_sam.py --device cuda --quick --no-compile --out "$out" >>"$log" 2>&1 ;;
    bench-bf16)
      timeout ${limit:-420} $py benchmarks/bench_sam.py --device cuda --quick --no-compile --dtype bfloat16 --out "$out" >>"$log" 2>&1 ;;
    model)
      timeout ${limit:-300} $py benchmarks/bench_model.py --device cuda --quick --out "$out" >>"$log" 2>&1 ;;
    sweep)
      timeout ${limit:-420} $py benchmarks/triton_report.py --sweep --out "$out" >>"$log" 2>&1 ;;
    profile)
      timeout ${limit:-240} $py benchmarks/profile_cuda.py >>"$log" 2>&1 ;;
    *)
      echo "unknown part: $part (tests, tests-band, bench, bench-bf16, model, sweep, profile)" | tee -a "$log"; false ;;
  esac
  code=$?
  [ $code -ne 0 ] && status=1
  echo "== $part exited $code after $((SECONDS - start)) s" | tee -a "$log"
done
rm -f "$out"/*.csv  # the markdown tables hold the same figures; the device tool returns at most 8 files
tail -n 60 "$log"
exit $status
