#!/usr/bin/env bash
# One GPU session's work, in stages that each fit a 10-minute command of the
# lent H100/H200 (see the device tool's README).  Run from the repository root
# there, in this order (a warm machine keeps the in-place build between calls):
#
#   bash scripts/gpu_session.sh build tests          # ~4 min: build _C for sm_90, GPU + heavy tests
#   bash scripts/gpu_session.sh ops attention sample # ~8 min: bench_ops, bench_attention, bench_sample
#   bash scripts/gpu_session.sh train quality        # ~9 min: bench_train, the training quality check
#
# A stage that is not "build" builds first if the extension is missing.  What
# comes back under $OUT: gpu_session.log (everything printed) and results.tgz
# (benchmarks/results/*_cuda*.{json,md} and the test report); unpack it here
# with `tar xzf results.tgz -C benchmarks/results`.
#
# diffusers and denoising-diffusion-pytorch are not on the device image: fetch
# their wheels here first (scripts/fetch_device_wheels.sh) and name `.whl` in
# the call's `carry`; this script installs them to /tmp/site.  The image's
# torch and triton are used as they are (they may be older than this repo's
# pin: the log's first lines record the versions).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS="${MAX_JOBS:-16}" FASTDDPM_CUDA_ARCHS="${FASTDDPM_CUDA_ARCHS:-9.0}"
PY="${PYTHON:-python3}"
RESULTS=benchmarks/results

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below, not an installed copy

"$PY" - <<'EOF'
import subprocess, torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "?")
EOF

status=0
run() {  # run a command, remember a failure, go on with the next stage
    echo "+ $*"
    local t0=$SECONDS
    "$@" || { echo "FAILED ($?): $*"; status=1; }
    echo "  ($((SECONDS - t0)) s)"
}

built() { "$PY" -c "import fastddpm.cpp_ops as c; assert c.has_cuda()" 2>/dev/null; }

build() {
    run env FASTDDPM_REQUIRE_CUDA=1 "$PY" setup.py -q build_ext --inplace
    run "$PY" -c "import fastddpm.cpp_ops as c; print('fastddpm._C CUDA kernels:', c.has_cuda())"
}

stage() {
    case "$1" in
        build) build ;;
        tests)
            run "$PY" -m pytest -q -m "gpu or heavy" --heavy -p no:cacheprovider -rs --junitxml="$RESULTS/gpu_tests_cuda.xml" tests ;;
        ops)
            run "$PY" benchmarks/bench_ops.py --device cuda ;;
        attention)
            run "$PY" benchmarks/bench_attention.py ;;
        sample)
            run "$PY" benchmarks/bench_sample.py --device cuda ;;
        train)
            run "$PY" benchmarks/bench_train.py --device cuda --first-call-timeout 240 ;;
        quality)
            run "$PY" benchmarks/bench_train.py --device cuda --quality ;;
        *) echo "unknown stage $1 (build, tests, ops, attention, sample, train, quality)"; status=2 ;;
    esac
}

[ $# -gt 0 ] || set -- build tests
for s in "$@"; do
    if [ "$s" != build ] && ! built; then build; fi
    stage "$s"
done

mkdir -p "$RESULTS"
files=$(cd "$RESULTS" && ls | grep -E '_cuda|^attention_|gpu_tests' || true)
if [ -n "$files" ]; then (cd "$RESULTS" && tar czf "$OUT/results.tgz" $files) && echo "results.tgz:" $files
else echo "no GPU results to pack"; fi
echo "gpu_session.sh: done, status $status"
exit $status
