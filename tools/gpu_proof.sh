#!/usr/bin/env bash
# The GPU proof in one run on a CUDA machine: install, every gpu-marked test, the kernel benchmark (autotuning),
# the residency benchmark (host copies and speed of CUDA buffers in an all-reduce and an expert call), and the
# Byzantine-robust path's overhead on a clean run with a core or more per peer (bench/byzantine.py, which a 2-core
# machine runs with 8 peers sharing its cores).
#
#   tools/gpu_proof.sh                      # every step: setup tests kernels residency overhead
#   tools/gpu_proof.sh setup tests          # only these steps (setup is cheap once done)
#   GPU_PROOF_PYTEST="-k moe" tools/gpu_proof.sh setup tests
#
# Logs and results go to $GPU_PROOF_DIR (default /tmp/gpu-proof): summary.txt has each step's exit code and time.
# With $OUT set, summary.txt and results.tar.gz (everything) are copied there after each step. Where
# .gpu/site.tar.xz exists (packages the machine lacks, built by tools/gpu_site.sh), it is unpacked and put on
# PYTHONPATH first. Each step has a deadline, so a hang costs that step only.
set -u
cd "$(dirname "$0")/.."
work=${GPU_PROOF_DIR:-/tmp/gpu-proof}
mkdir -p "$work"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HIVEENGINE_BENCH_OUT="$work" HIVEENGINE_KERNEL_TUNING="$work/kernel-tuning.json"
steps=${*:-setup tests kernels residency overhead}

publish() {
  if [ -n "${OUT:-}" ] && [ "$OUT" != "$work" ]; then
    cp "$work/summary.txt" "$OUT/" && tar -C "$work" -czf "$OUT/results.tar.gz" .
  fi
}

step() {  # step NAME SECONDS COMMAND...: run it with a deadline, log to NAME.log, record exit code and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name ($(date +%T)): $*"
  timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$work/summary.txt"
  tail -n 30 "$work/$name.log"
  publish
  return $rc
}

if [ -f .gpu/site.tar.xz ]; then
  site=/tmp/hiveengine-site
  [ -d "$site" ] || { mkdir -p "$site" && tar -C "$site" -xJf .gpu/site.tar.xz; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

setup() {
  nvidia-smi
  python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -i -E "^(cupy|cuda-|numpy|scikit-build|ucxx|libucx|rmm|bitsandbytes)"
  # Installed (with the native library built) unless this is a fresh machine; from / so that ./hiveengine is not it.
  (cd / && python3 -c "from hiveengine.kernels import native; native.load_native_library()" 2>/dev/null) ||
    python3 -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  python3 -c "import hiveengine, ucxx; from hiveengine.kernels import native; native.load_native_library(); print('hiveengine', hiveengine.__file__, 'ucxx', ucxx.__version__)" || return 1
  python3 -m hiveengine.cli doctor || true  # reachability and the like: facts to read, not a failed setup
}
export -f setup

for s in $steps; do
  hive=hiveengine  # the console script, or the module where the install put no script on PATH
  command -v hiveengine >/dev/null || hive="python3 -m hiveengine.cli"
  case $s in
  setup) step setup 60 bash -c setup ;;
  tests)
    # shellcheck disable=SC2086  # GPU_PROOF_PYTEST is a list of arguments
    step tests 100 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider -n 8 --dist load --durations=15 \
      --junitxml="$work/tests.xml" ${GPU_PROOF_PYTEST:-} ;;
  kernels) step kernels 60 $hive bench kernels --no-cpu --tiles 2048,4096,8192 --warps 4,8 --gpu-sizes 64,256 ;;
  residency) step residency 120 $hive bench residency --sizes 67108864 ;;
  overhead) step overhead 120 python3 bench/byzantine.py --byzantine --clean-repeats 4 ;;
  *) echo "unknown step $s (setup, tests, kernels, residency, overhead)" && exit 2 ;;
  esac
done
cat "$work/summary.txt"
