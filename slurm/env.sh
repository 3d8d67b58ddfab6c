# shellcheck shell=bash
# Cluster-specific settings, sourced by slurm/train.sbatch and slurm/tune.sbatch on the first
# node of the job; srun passes the exported variables on to every task. Edit for your site:
# everything here is an example, and each line says why it is there.

# Software: the site's modules (names differ per cluster), then the project's environment
# (`make install` creates .venv; any environment with `pip install -e .` works).
# module purge
# module load cuda/12.4 gcc/12
VLDS_VENV=${VLDS_VENV:-$PWD/.venv}
if [ -f "$VLDS_VENV/bin/activate" ]; then
    # shellcheck source=/dev/null
    source "$VLDS_VENV/bin/activate"
fi

# Threads per rank: the CPUs SLURM gave each task (data loading uses its own processes).
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

# NCCL (GPU collectives between nodes).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}        # INFO prints the rings/trees and the transport used
# export NCCL_SOCKET_IFNAME=ib0              # the interface that reaches the other nodes (ip -br a)
# export NCCL_IB_HCA=mlx5                    # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                   # Ethernet-only clusters
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1     # a dead rank fails the job instead of hanging it

# Caches on storage every node sees: the embedded data set and hub weights are written once.
export VLDS_CACHE=${VLDS_CACHE:-$HOME/.cache/vlds}
export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
# export HF_HUB_OFFLINE=1                    # compute nodes without internet: use local copies

# Ray (slurm/tune.sbatch): no login token, no usage reporting.
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
