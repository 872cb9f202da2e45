#!/usr/bin/env bash
# The prepared run for a lent GPU machine: the CUDA tests, then the speed benchmark on the
# device, in one call of under 10 minutes (a session has 15 minutes of device time).
#
# That machine has PyTorch with CUDA but neither Pyro nor ArviZ (k-hat), and reaches no
# package registry, so they travel as wheels (pure Python; the rest of what they need,
# numpy to xarray, is there). Here, once, in the repository's root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2 \
#       arviz==0.23.4 h5netcdf==1.8.3 xarray-einstats==0.9.1 platformdirs==4.14.9
#
# then the device tool's run with command "bash benchmarks/device_check.sh", carry
# [".whl"] and timeout_s 590. Everything lands in $OUT (runs/device without the tool):
#   env.txt          nvidia-smi, torch and pyro versions
#   cuda_tests.log   tests/ppl_vae/test_cuda.py
#   speed_cuda.json  "quick_cuda", then as much of "full_cuda" as the time allows
#                    (written item by item; rerun with the same file to resume)
#   speed.log        the benchmark's lines and tables
# DEVICE=cpu runs the same stages on the CPU (a dry run of this script anywhere); ONLY
# passes item prefixes to the benchmark's --only; SITE is where Pyro's wheels and the
# package's links go (default /tmp/ppl_vae_site).
# Each stage has its own time limit (the tests 190 s, with the command line's GPU run;
# quick 120 s; full 200 s), so that one stuck stage cannot eat the others'.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/runs/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}

SITE=${SITE:-/tmp/ppl_vae_site}
if ! python3 -c "import pyro, arviz" 2>/dev/null; then
    ls "$REPO"/.whl/*.whl >/dev/null 2>&1 || { echo "no Pyro or ArviZ here, no wheels in .whl/"
                                               exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$REPO"/.whl/*.whl || exit 2
fi
# The package as it installs (models/ and guides/ inside it as ppl_vae.models and
# ppl_vae.guides), made of links into the checkout: no build, no registry. Everything
# then runs from outside the checkout, whose own ppl_vae/ (without models) would come
# first on sys.path.
mkdir -p "$SITE/ppl_vae"
ln -sfn "$REPO"/ppl_vae/* "$SITE/ppl_vae/"
ln -sfn "$REPO/models" "$SITE/ppl_vae/models"
ln -sfn "$REPO/guides" "$SITE/ppl_vae/guides"
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
cd /tmp || exit 2

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, pyro, ppl_vae; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0));
print('pyro', pyro.__version__); print('ppl_vae', ppl_vae.__file__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 190 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib -o addopts="" \
    --rootdir "$REPO" -c "$REPO/pyproject.toml" "$REPO/tests/ppl_vae/test_cuda.py" \
    2>&1 | tee "$OUT/cuda_tests.log"
echo "cuda tests: rc ${PIPESTATUS[0]}"

for mode in --quick ""; do
    limit=$([ -n "$mode" ] && echo 120 || echo 200)
    # shellcheck disable=SC2086
    timeout "$limit" python3 -m benchmarks.speed $mode ${ONLY:+--only $ONLY} \
        --device "$DEVICE" --threads 1 \
        --resume --json "$OUT/speed_$DEVICE.json" 2>&1 | tee -a "$OUT/speed.log"
    echo "speed ${mode:-full}: rc ${PIPESTATUS[0]}"
done
