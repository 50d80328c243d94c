#!/usr/bin/env bash
# Submit a medfuse command to a running Ray cluster's job server, uploading this checkout
# (for clusters whose image lacks medfuse; with medfuse in the image, `medfuse submit` alone does):
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh finetune --config experiments/finetune_cxr_gpu.yaml \
#       --data /data/shards --workdir /data/runs/ft1
# Ray 2.60 heads use token authentication: the token is read from RAY_AUTH_TOKEN or
# ~/.ray/auth_token (copy it from the head node).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the head's dashboard address, e.g. http://127.0.0.1:8265}"
exec medfuse submit --code --address "$RAY_ADDRESS" -- "$@"
