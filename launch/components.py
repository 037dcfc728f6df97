"""TorchX component for DIG training: one entry point from a laptop to a cluster.

``train`` launches ``python -m dig_torchrec.training.cli`` under ``torchrun`` on
``nnodes x nproc_per_node`` workers (built on ``torchx.components.dist.ddp``), so the
same component runs on every TorchX scheduler::

    torchx run -s local_cwd launch/components.py:train --config configs/tiny.yaml
    torchx run -s local_cwd launch/components.py:train --config configs/ml100k.yaml --nproc_per_node 4 --gpu 4
    torchx run -s slurm launch/components.py:train --config configs/industrial_large.yaml --nnodes 4 --nproc_per_node 8 --gpu 8
    torchx run -s kubernetes -cfg queue=default launch/components.py:train --image ghcr.io/me/dig:latest \\
        --config configs/industrial_large.yaml --nnodes 4 --nproc_per_node 8 --gpu 8

Config overrides go after the named arguments: ``... --config configs/tiny.yaml -- train.epochs=1 run_dir=/x``.

Resources. ``--cpu`` and ``--memMB`` default to a value derived from the workers per node:
on GPU nodes (``--gpu > 0``) 8 CPUs and 48 GiB of host RAM per GPU rank (a rank holds
torch + CUDA + FBGEMM (~3-4 GiB), its reader threads and windows, pinned batches and, at
checkpoints, a host copy of its shards), i.e. 64 CPUs / 384 GiB for 8 x A100 -- below the
allocatable share of a DGX A100 / p4d node; on CPU nodes 1 CPU and 6 GiB per rank. Explicit
values below 4 GiB per GPU rank are rejected (the ranks would be OOM-killed at start-up).

GPU path. ``--gpu > 0`` requires ``gpu >= nproc_per_node`` and adds ``train.device=cuda``:
a node whose CUDA is broken then fails at start-up with a one-line error instead of
training 16 ranks on CPU over gloo (``train.device=auto`` falls back silently).

Data and run directory must be on a file system every node mounts at the same path (the
trainer checks ``run_dir`` at start-up), e.g. ``--mounts type=volume,src=dig,dst=/shared``
on Kubernetes, NFS/Lustre on Slurm, plus ``data.path=/shared/... run_dir=/shared/...``.
"""

from typing import Dict, List, Optional, Tuple

import torchx
from torchx import specs
from torchx.components import dist as dist_components

TRAIN_MODULE = "dig_torchrec.training.cli"

# per worker (rank) on a node: (CPUs, host RAM in MB)
GPU_RANK_RESOURCES: Tuple[int, int] = (8, 48 * 1024)
CPU_RANK_RESOURCES: Tuple[int, int] = (1, 6 * 1024)
MIN_GPU_RANK_MEM_MB = 4 * 1024  # below this the ranks are OOM-killed while importing torch + CUDA + FBGEMM


def node_resources(nproc_per_node: int, gpu: int, cpu: Optional[int] = None,
                   memMB: Optional[int] = None) -> Tuple[int, int]:
    """CPUs and host memory (MB) per node: the given values, or derived from the ranks per node.

    Args:
        nproc_per_node: workers per node.
        gpu: GPUs per node (0 = CPU job).
        cpu: CPUs per node; default ``nproc_per_node x`` 8 (GPU) or 1 (CPU), at least 2.
        memMB: host memory per node; default ``nproc_per_node x`` 48 GiB (GPU) or 6 GiB (CPU).

    Raises:
        ValueError: ``gpu`` smaller than ``nproc_per_node``, or less than 4 GiB per GPU rank.
    """
    if gpu < 0 or nproc_per_node < 1:
        raise ValueError(f"--gpu={gpu} and --nproc_per_node={nproc_per_node} must be >= 0 and >= 1")
    if 0 < gpu < nproc_per_node:
        raise ValueError(f"--gpu={gpu} < --nproc_per_node={nproc_per_node}: every GPU rank needs its own GPU")
    per_cpu, per_mem = GPU_RANK_RESOURCES if gpu > 0 else CPU_RANK_RESOURCES
    cpu = cpu if cpu is not None else max(2, per_cpu * nproc_per_node)
    memMB = memMB if memMB is not None else per_mem * nproc_per_node
    if gpu > 0 and memMB < MIN_GPU_RANK_MEM_MB * nproc_per_node:
        raise ValueError(
            f"--memMB={memMB} is {memMB // nproc_per_node} MB per GPU rank: {nproc_per_node} ranks of torch + CUDA + "
            f"FBGEMM need at least {MIN_GPU_RANK_MEM_MB} MB each (default {per_mem} MB); raise --memMB or omit it"
        )
    return cpu, memMB


def _device_override(overrides: List[str], gpu: int) -> List[str]:
    """``train.device=cuda`` for a GPU job (unless given); a CPU device on a GPU job is an error."""
    given = [o for o in overrides if o.split("=", 1)[0].strip() == "train.device"]
    if gpu <= 0:
        return []
    for o in given:
        if o.split("=", 1)[1].strip() != "cuda":
            raise ValueError(f"override '{o}' with --gpu={gpu}: GPU jobs train on train.device=cuda")
    return [] if given else ["train.device=cuda"]


def train(
    *overrides: str,
    config: str = "configs/tiny.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    resume: str = "auto",
    image: str = torchx.IMAGE,
    name: str = "dig-train",
    cpu: Optional[int] = None,
    gpu: int = 0,
    memMB: Optional[int] = None,
    h: Optional[str] = None,
    max_restarts: int = 0,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    tee: int = 3,
) -> specs.AppDef:
    """Train DIG with ``dig train`` on nnodes x nproc_per_node workers (torchrun under the hood).

    Args:
        overrides: dotted config overrides, e.g. ``train.epochs=1 run_dir=runs/x``
        config: path of the YAML config (relative to the job's working directory / image)
        nnodes: number of nodes (replicas of the role)
        nproc_per_node: worker processes per node (GPUs per node on CUDA hosts)
        resume: ``auto`` (newest complete checkpoint of run_dir, else start fresh), ``none``, or a checkpoint path
        image: container image (ignored by local_cwd, which runs in the current directory)
        name: job name
        cpu: CPUs per node (default: 8 per GPU rank, 1 per CPU rank; see the module docstring)
        gpu: GPUs per node (> 0 adds ``train.device=cuda``; must be >= nproc_per_node)
        memMB: host memory per node in MB (default: 48 GiB per GPU rank, 6 GiB per CPU rank)
        h: a registered named resource (overrides cpu, gpu and memMB)
        max_restarts: torchrun restarts of the whole worker group after a worker fails (each restart resumes from the newest checkpoint)
        max_retries: scheduler-level retries of the job
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        rdzv_backend: rendezvous backend
        env: extra environment variables, e.g. ``NCCL_DEBUG=INFO``
        mounts: mounts for container schedulers, e.g. ``type=bind,src=/data,dst=/data``
        tee: tee worker stdout/stderr to the console (0 none, 1 out, 2 err, 3 both)
    """
    cpu, memMB = node_resources(nproc_per_node, gpu, cpu, memMB)
    args = ["--config", config]
    if resume and resume != "none":
        args += ["--resume", resume]
    args += _device_override(list(overrides), gpu) + list(overrides)
    app = dist_components.ddp(
        *args,
        m=TRAIN_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=dict(env or {}),
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=mounts,
        tee=tee,
    )
    role = app.roles[0]
    role.name = "trainer"
    role.env.setdefault("LOGLEVEL", "INFO")
    role.env.setdefault("PYTHONUNBUFFERED", "1")
    if gpu > 0:
        # a rank that dies mid-collective must take the job down, not hang the other 15
        role.env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if max_restarts > 0:
        # dist.ddp builds `bash -c "torchrun ..."`; let the elastic agent restart the workers too
        assert role.args[1].startswith("torchrun "), role.args
        role.args[1] = role.args[1].replace("torchrun ", f"torchrun --max-restarts {int(max_restarts)} ", 1)
        # restarted workers must not reuse the rendezvous store's stale addresses (pytorch/pytorch#135712)
        role.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return app
