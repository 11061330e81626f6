#!/usr/bin/env bash
# Every GPU check of issue 11 in one run, for whoever is lent the GPU machine (BENCHMARKS.md, "On a GPU").
#
# Here, once (the wheels and the data travel as ignored folders):
#   bash ../shared/gpu/fetch-wheels.sh .whl
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
# Then, with the device tool:
#   run(command="bash .ci/gpu-check.sh", carry=[".whl", ".data"], timeout_s=600)
#
# Each step has its own timeout and the whole stays within GPU_CHECK_BUDGET seconds (default 540);
# a failed step does not stop the others. Writes 6 files under $OUT: summary.txt (one line per
# step), setup.log, pytest.log, pipeline.log, federated.log, and BENCHMARKS.md with the GPU
# sections (`pipeline-cuda`, `federated-cuda`) to copy into the repository's.
set -u
out=${OUT:?set OUT to the folder for the results}
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
devices=${GPU_CHECK_DEVICES:-cuda}            # "cpu" only to try this script on a machine without a GPU
tarball=${GPU_CHECK_DATA:-.data/cifar10-jpeg.tar.gz}
repeats=${GPU_CHECK_REPEATS:-2}
py=${PYTHON:-python3}
work=${GPU_CHECK_WORK:-/tmp/gpu-check}        # data and cache go here
data=$work/data/cifar10-jpeg
cache=$work/cache
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))

step() {  # step NAME SECONDS LOG COMMAND...: its own timeout, never past the overall deadline
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((deadline - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "$name: skipped, out of time" >>"$out/summary.txt"
    return 1
  fi
  local t0=$SECONDS rc
  echo "== $name (timeout ${limit} s): $*" >>"$out/$log"
  timeout "$limit" "$@" >>"$out/$log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" >>"$out/summary.txt"
  return $rc
}

# flwr and what its server and client import: the image lacks them (../shared/gpu/README.md)
if compgen -G ".whl/*.whl" >/dev/null; then
  step install 120 setup.log "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
mkdir -p "$work/data"
step extract 120 setup.log tar xzf "$tarball" -C "$work/data"
step machine 30 setup.log bash -c 'nvidia-smi || true; $0 -c "import torch, torchvision, flwr, sys
print(sys.version, torch.__version__, torchvision.__version__, flwr.__version__, torch.cuda.is_available())"' "$py"
# Decode once into the cache, so that no timed run pays for it; also the first run of cifar.py on this device
step cache 180 setup.log "$py" cifar.py --data-root "$data" --cache-dir "$cache" --epochs 0 --device "${devices%% *}"
# The graph path against eager on the device, and the CPU tests of its logic
step pytest 150 pytest.log "$py" -m pytest -q -p no:cacheprovider tests/test_cifar.py \
  -k "cuda or graph or proximal or sgd_loop or tutorials_loaders"
cp BENCHMARKS.md "$out/BENCHMARKS.md"
# The tutorial's own cifar.py, cifar.py --pipeline tutorial, cifar.py eager and as a CUDA graph
# shellcheck disable=SC2086  # devices is a list
step pipeline 300 pipeline.log "$py" bench.py --out "$out/BENCHMARKS.md" pipeline --data-root "$data" \
  --cache-dir "$cache" --devices $devices --repeats "$repeats"
# server.py + two client.py (on CUDA when there is one), the tutorial's setup and the README's
step federated 240 federated.log "$py" bench.py --out "$out/BENCHMARKS.md" federated --data-root "$data" \
  --cache-dir "$cache" --repeats 1
cat "$out/summary.txt"
