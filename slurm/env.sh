# Network and communication settings for multi-node wideep runs; sourced by the sbatch templates in this folder.
# Every value below is a site-specific guess: check each against your cluster (ip -br link, ibv_devices,
# nvidia-smi topo -m) before the first run. Variables already set in the submitting shell win.

# --- Which network carries what -------------------------------------------------------------------------------
# Bootstrap traffic (rendezvous store, NCCL's and Gloo's connection set-up) is plain TCP. On nodes with several
# interfaces (management eth0, docker0, ib0, bond0 ...) pick one that every node can reach, or ranks connect to an
# address their peers cannot route to and the run waits until --dist-timeout.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}   # NCCL bootstrap (and its data path when there is no IB)
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}   # Gloo: CPU collectives (step agreement, result gathering)

# --- NCCL (the torch dispatcher's all_to_all and every other GPU collective) ----------------------------------
# The InfiniBand/RoCE adapters NCCL may use, e.g. one per GPU rail. Unset lets NCCL pick every HCA it finds.
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7}
# RoCE only: the GID index of the RoCE v2 address (3 on most Mellanox set-ups); leave unset on native InfiniBand.
# export NCCL_IB_GID_INDEX=3
# NVLink SHARP (multicast) off: on shared hosts multicast objects can take the GPUs down (see GPU.md).
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# WARN prints only problems; INFO shows the chosen interfaces, HCAs and topology (first thing to read when slow).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# --- NVSHMEM (DeepEP: --moe-a2a-backend deepep) ---------------------------------------------------------------
# GPU-initiated RDMA, what DeepEP's internode and low-latency kernels use across nodes. Needs the nvidia_peermem
# (or dmabuf) module and IBGDA enabled in the driver (NVreg_EnableStreamMemOPs=1 NVreg_RegistryDwords=
# "PeerMappingOverride=1;"). DeepEP V1 also sets it itself when it needs it; exporting it makes the choice visible.
export NVSHMEM_IB_ENABLE_IBGDA=${NVSHMEM_IB_ENABLE_IBGDA:-1}
# Multicast off for NVSHMEM too (GPU.md).
export NVSHMEM_DISABLE_NVLS=1
# Which HCA each local PE (GPU) uses: "hca:port:count,..." in local-rank order, e.g. 8 GPUs sharing 4 NICs two by
# two. Without it NVSHMEM picks the NIC closest to each GPU, which is right on standard 1-NIC-per-GPU nodes.
# It only applies with NVSHMEM_ENABLE_NIC_PE_MAPPING=1, and is ignored when NVSHMEM_HCA_LIST is set.
# export NVSHMEM_ENABLE_NIC_PE_MAPPING=1
# export NVSHMEM_HCA_PE_MAPPING="mlx5_0:1:2,mlx5_1:1:2,mlx5_2:1:2,mlx5_3:1:2"
# RoCE only, as NCCL_IB_GID_INDEX above.
# export NVSHMEM_IB_GID_INDEX=3

# --- CPU threads -----------------------------------------------------------------------------------------------
# One rank per GPU shares the node's cores; without a limit every rank starts one OpenMP thread per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
