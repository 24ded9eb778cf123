#!/usr/bin/env bash
# The GPU runs of issues 5, 7 and 8 in one device call, on a machine with torch but no ray,
# redis-py or redis-server: wheels from .whl/ (py3.12) and Redis from .debs/ are unpacked under
# /tmp. Usage (repository root): bash benchmarks/gpu_suite.sh OUTDIR [packing] [peers] [scaling]
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [steps...]}; shift
steps=${*:-packing peers scaling ceiling}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
mkdir -p /tmp/redisroot && for f in .debs/*.deb; do dpkg -x "$f" /tmp/redisroot; done
export LD_LIBRARY_PATH=/tmp/redisroot/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
redis=/tmp/redisroot/usr/bin/redis-server
"$redis" --version || exit 1
nvidia-smi -L | tee "$out/cards.txt"
for step in $steps; do
    started=$(date +%s)
    case $step in
        packing) python3 -m benchmarks.gpu_packing --redis-server "$redis" --seconds 40 \
                     --out "$out/gpu_packing.json" ;;
        peers) python3 -m benchmarks.peers --device cuda --models cnn,transformer --systems direct,nosq \
                   --redis-server "$redis" --out "$out/peers_cuda.json" --plots "$out" ;;
        # a model that keeps a GPU busy with small items (8 KiB in and out): 3.2 B parameters
        scaling) python3 -m benchmarks.scaling --device cuda --model transformer --layouts 1x1,1x2 \
                     --options '{"d_model": 1024, "nhead": 16, "layers": 256, "seq": 2}' --max-batch 256 \
                     --latency-budget-ms 500 --producers 6 --seconds 10 --redis-server "$redis" \
                     --out "$out/scaling_cuda.json" ;;
        # the request path's own ceiling on this machine (no model work): noop, 1 and 2 managers
        ceiling) python3 -m benchmarks.scaling --device cpu --model noop --layouts 1x1,2x1 --producers 6 \
                     --seconds 10 --redis-server "$redis" --out "$out/scaling_noop_gpuhost.json" ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac 2>&1 | tee "$out/$step.log"
    echo "== $step: exit ${PIPESTATUS[0]} in $(( $(date +%s) - started )) s"
done
