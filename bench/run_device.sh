#!/usr/bin/env bash
# On a GPU machine from the repository root: kdtrain from src/, optional wheels from .whl/, the
# NCCL settings the bench launches with, and the Python that holds torch. Usage:
#   bash bench/run_device.sh python3 bench/worker_9b.py --gpus 4 ...
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# serve-teacher's bench needs the server and client stack; a machine without it gets .whl/serve/ first
# (installed once per machine: a later call finds /tmp/serve)
if [ -d /tmp/serve ]; then
  export PYTHONPATH="/tmp/serve:$PYTHONPATH"
elif compgen -G ".whl/serve/*.whl" >/dev/null && ! python3 -c "import fastapi, uvicorn, openai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/serve .whl/serve/*.whl \
    && export PYTHONPATH="/tmp/serve:$PYTHONPATH"
fi
"$@"
