#!/usr/bin/env bash
# Run a nemo-quant command on one node with N processes:
#   launch/torchrun.sh 3 eval parallel.tp=3
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or use launch/slurm.sh under Slurm).
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC COMMAND [hydra overrides...]}"
shift
exec torchrun \
  --nproc-per-node "$nproc" \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m nemo_quant.cli.main "$@"
