#!/usr/bin/env bash
# Submit a medfuse stage to a running Ray cluster's job server.
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh finetune --config experiments/finetune_cxr_gpu.yaml \
#       --data /data/shards --workdir /data/runs/ft1
# Ray 2.60 heads use token authentication: the token is read from ~/.ray/auth_token or
# RAY_AUTH_TOKEN (copy it from the head node).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the head's dashboard address, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir "$(cd "$(dirname "$0")/.." && pwd)" \
  --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": ["runs/", ".git/"]}' \
  -- medfuse "$@"
