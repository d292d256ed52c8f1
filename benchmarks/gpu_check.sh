#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU and PyTorch already installed:
# the CUDA tests, then GPU-vs-CPU training times. Wheels of missing packages (zuko, isal), if
# any, are taken from .whl/ (see the README's "GPU" paragraph). Output also goes to $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
log=${OUT:-/tmp}/gpu_check.log
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, zuko, h5py; print('torch', torch.__version__, 'zuko', zuko.__version__, 'h5py', h5py.__version__)"
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_vae.py::test_runs_on_cuda tests/test_train.py::test_bad_inputs
    python3 benchmarks/bench_scale.py --skip-memory --threads 2 --gpu-n 20000 --gpu-maps 1000 --gpu-epochs 3
    python3 benchmarks/bench_flows.py --device cuda --dims 2 10
} 2>&1 | tee "$log"
