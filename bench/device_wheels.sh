#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/device_scale.sh installs on a machine that can fetch nothing:
# flowpool's own requirements and its server extra, with everything they need, for CPython 3.12 on
# manylinux x86_64, plus psutil for the benchmark. boto3 is left out: only the S3 blob store imports it,
# and lazily. .whl/ is ignored through .git/info/exclude.
#
#   bench/device_wheels.sh [PYTHON]    (PYTHON: the interpreter whose pip downloads; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# The requirements as setup.cfg states them, so this list follows it.
mapfile -t requirements < <("$python" - <<'EOF'
import configparser

config = configparser.ConfigParser()
config.read("setup.cfg")
lines = config["options"]["install_requires"].splitlines() + \
    config["options.extras_require"]["server"].splitlines()
for line in lines:
    line = line.split("#")[0].strip()
    if line and not line.startswith("boto3"):
        print(line)
print("psutil>=5.9")
EOF
)

rm -rf .whl && mkdir .whl
"$python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_5_x86_64 --platform linux_x86_64 --platform any \
    -d .whl "${requirements[@]}"
ls .whl
du -sh .whl
