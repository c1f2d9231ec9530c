#!/bin/bash
# The body of pretrain.sbatch and finetune.sbatch: `biofm fit` under srun, one task per GPU.
# Lightning's SLURMEnvironment reads the ranks from SLURM; the job asks for SIGUSR1 before its time limit
# (#SBATCH --signal=SIGUSR1@120), on which Lightning saves an HPC checkpoint in the run directory and
# requeues the job (scontrol requeue); the requeued job (same SLURM_JOB_ID, so the same run directory)
# resumes from that checkpoint mid-epoch. BIOFM_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [[ -z "${BIOFM_DRY_RUN:-}" ]]; then
    : "${SLURM_JOB_ID:?run this under sbatch (or print the command with BIOFM_DRY_RUN=1)}"
fi
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-biofm}-${SLURM_JOB_ID:-dry-run}}
TRAINER=${TRAINER:-configs/trainer/gpu.yaml}
export WANDB_MODE=${WANDB_MODE:-offline}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=(biofm fit -c "$CONFIG" --trainer "$TRAINER"
     --trainer.num_nodes "${SLURM_NNODES:-1}" --trainer.devices "${SLURM_NTASKS_PER_NODE:-1}"
     --trainer.default_root_dir "$RUN_DIR"
     --data.num_workers "$(( ${SLURM_CPUS_PER_TASK:-1} - 1 ))"
     "$@")
if [[ -n "${BIOFM_DRY_RUN:-}" ]]; then
    printf '%q ' srun "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$RUN_DIR"
exec srun "${cmd[@]}"
