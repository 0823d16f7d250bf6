#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU machine, as one prepared run:
#   1. bench/gpu_mfu.py: lmforge's tokens/s and MFU against a bare nanoGPT-style loop (bf16);
#   2. a 2-rank NCCL run of the trainer (examples/quickstart.yaml on 2 processes), where the machine
#      has 2 GPUs or more (NCCL puts one rank per GPU: a 1-GPU machine cannot run it).
# Python packages the GPU image lacks (it has torch, not DeepSpeed or pydantic) travel as wheels in
# an ignored .whl/ folder: the deepspeed wheel pip built here (~/.cache/pip/wheels/**/deepspeed-*.whl)
# plus `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# -d .whl pydantic pydantic-core annotated-types typing-inspection hjson boto3 botocore s3transfer
# jmespath zstandard datasketch` (the versions this venv has). Logs go to $OUT (or /tmp/gpu-session).
#
#     bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-session}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed cannot parse the image's "9.0a"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

echo "== bench/gpu_mfu.py"
timeout "${MFU_TIMEOUT:-420}" python3 bench/gpu_mfu.py --steps "${MFU_STEPS:-60}" 2>&1 | tee "$out/gpu_mfu.log"
status=${PIPESTATUS[0]}

echo "== 2-rank NCCL run"
if [ "$gpus" -ge 2 ]; then
  timeout "${NCCL_TIMEOUT:-300}" python3 -m lmforge.cli run examples/quickstart.yaml --processes 2 2>&1 | tee "$out/nccl.log"
  status=$((status | PIPESTATUS[0]))
else
  echo "skipped: $gpus GPU here; NCCL needs one GPU per rank (the 2-rank path runs on gloo in the CPU tests)"
fi
exit "$status"
