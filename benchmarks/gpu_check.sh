#!/usr/bin/env bash
# The GPU check, for a short lease of a GPU machine that has nothing but this repository: a venv with a CUDA build
# of torch and the project, the GPU tests (pytest -m gpu), then the essential rows of gpu_throughput.py (the MLP
# fast path against the naive loop; ResNet-50 and GPT-2 small in bf16 against the hand-written loop, with tokens/s
# and MFU, and GPT-2 small again under FSDP2 with its peak memory), sized to take under 8 minutes in all. Everything goes into one results file, headed by the date, the
# commit and the device; each step ends with "-- <step>: ok (N s)" or "FAILED", and the script exits non-zero if
# any step failed.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--device cuda|cpu]
#
#   --out FILE     the results file (default: gpu-check-<date>-<time>.txt in the current folder)
#   --device cpu   a smoke run of the same steps at a tiny size on a CPU (the GPU tests then skip, saying why;
#                  the seed rows are the CNN's, which take the MLP's path and channels_last)
#
# Environment: GPU_CHECK_TORCH, the torch requirement installed (default torch==2.13.0: on a machine with a GPU,
# PyPI's build is a CUDA one; the project takes torch>=2.3,<2.15); GPU_CHECK_VENV, the venv's folder (default
# .venv-gpu); GPU_CHECK_PYTHON, a Python that has the project installed already: then no venv and no install.
set -uo pipefail

device=cuda
out="gpu-check-$(date +%Y%m%d-%H%M%S).txt"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--out FILE] [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
case "$device" in
    cuda | cpu) ;;
    *) echo "gpu_check.sh: --device is cuda or cpu, not '$device'" >&2; exit 2 ;;
esac
out=$(realpath -m "$out")  # named from the caller's folder; the steps run in the repository's
mkdir -p "$(dirname "$out")" && : >"$out" || exit 2
cd "$(dirname "$0")/.." || exit 2

failed=0
say() { printf '%s\n' "$@" | tee -a "$out"; }
# One step: its command line, its output and how it ended, into the results file as well as onto the terminal.
step() {
    local name=$1 start=$SECONDS
    shift
    say "" "== $name: $*"
    if "$@" 2>&1 | tee -a "$out"; then
        say "-- $name: ok ($((SECONDS - start)) s)"
    else
        say "-- $name: FAILED ($((SECONDS - start)) s)"
        failed=1
        return 1
    fi
}
finish() {
    local verdict="every step ok"
    [ $failed = 0 ] || verdict="FAILED (see the steps above)"
    say "" "gpu check: $verdict, ${SECONDS} s in all"
    exit $failed
}

say "pipeline GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null ||
    echo unknown), --device $device"
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    py=$GPU_CHECK_PYTHON
else
    venv=${GPU_CHECK_VENV:-.venv-gpu}
    py=$venv/bin/python
    step venv python3 -m venv "$venv" &&
        step torch "$py" -m pip install -q "${GPU_CHECK_TORCH:-torch==2.13.0}" &&
        step project "$py" -m pip install -q -e ".[dev]" || finish
fi
# torch's view of the device: a CPU build of torch on a GPU machine stops the check here
torch_device() {
    "$py" - "$device" <<'EOF'
import sys, torch
gpu = torch.cuda.is_available()
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| NCCL",
      ".".join(map(str, torch.cuda.nccl.version())) if gpu else None)
print("device:", torch.cuda.get_device_name() if gpu else "no CUDA device", "| count", torch.cuda.device_count())
sys.exit(sys.argv[1] == "cuda" and not gpu)
EOF
}
step device torch_device || finish
if command -v nvidia-smi >/dev/null; then
    step nvidia-smi nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
fi
step gpu-tests "$py" -m pytest -q -m gpu -rs

if [ "$device" = cuda ]; then
    # the large rows eager: compiling ResNet-50 and GPT-2 small takes minutes a side, the MLP's seconds
    sizes=(--steps 200 --large-steps 60 --no-compile)
    models=(mlp)
else
    # the smoke: the CNN's seed rows (the MLP's and channels_last), the large models' layouts at a tiny size
    sizes=(--device cpu --steps 4 --warmup 2 --batch 32 --train-size 1024 --large-steps 4 --large-batch 2
        --image-size 32 --context 32 --no-compile --tiny)
    models=(cnn)
fi
step throughput "$py" benchmarks/gpu_throughput.py --models "${models[@]}" --large resnet50 gpt2_small gpt2_small_fsdp \
    "${sizes[@]}"
finish
