#!/usr/bin/env bash
# The prepared GPU run (issue: GPU inference from .sws). On this machine, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl dahuffman==0.4.2
# then the device tool's run with carry [".whl"] and the command `bash benchmarks/gpu_run.sh`
# (timeout 600 s; about 5-8 minutes on an H200). The device image has torch, numba, msgpack,
# safetensors, tqdm and triton; dahuffman travels as a wheel. Results land in $OUT.
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# CUDA tests: they skip without a GPU everywhere else.
python3 -m pytest -q -p no:cacheprovider tests/test_sparse.py tests/test_prior.py tests/test_roundtrip.py 2>&1 | tee "$OUT/cuda-tests.log"
python3 benchmarks/gpu_sparse.py --json "$OUT/h200.json" --table "$OUT/h200.md" 2>&1 | tee "$OUT/gpu-bench.log"
