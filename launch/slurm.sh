#!/usr/bin/env bash
# Multi-node nemo-quant under Slurm (one torchrun per node, preemption -> checkpoint -> requeue):
#   launch/slurm.sh --nodes 2 --procs-per-node 8 --time 04:00:00 -- train quant=fp8 parallel.tp=8 \
#       parallel.pp=2 checkpoint.save=/shared/qat
# Writes nemo-quant.sbatch and submits it (--dry-run: only writes and prints it); see
# nemo_quant/integrations/slurm.py, or `nemo-quant-slurm --help` where nemo_quant is installed.
set -euo pipefail
exec "${PYTHON:-python}" -m nemo_quant.integrations.slurm "$@"
