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
"""

from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components import dist as dist_components

TRAIN_MODULE = "dig_torchrec.training.cli"


def train(
    *overrides: str,
    config: str = "configs/tiny.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    resume: str = "auto",
    image: str = torchx.IMAGE,
    name: str = "dig-train",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
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
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource (overrides cpu, gpu and memMB)
        max_restarts: torchrun restarts of the whole worker group after a worker fails (each restart resumes from the newest checkpoint)
        max_retries: scheduler-level retries of the job
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        rdzv_backend: rendezvous backend
        env: extra environment variables, e.g. ``NCCL_DEBUG=INFO``
        mounts: mounts for container schedulers, e.g. ``type=bind,src=/data,dst=/data``
        tee: tee worker stdout/stderr to the console (0 none, 1 out, 2 err, 3 both)
    """
    args = ["--config", config]
    if resume and resume != "none":
        args += ["--resume", resume]
    args += list(overrides)
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
    if max_restarts > 0:
        # dist.ddp builds `bash -c "torchrun ..."`; let the elastic agent restart the workers too
        assert role.args[1].startswith("torchrun "), role.args
        role.args[1] = role.args[1].replace("torchrun ", f"torchrun --max-restarts {int(max_restarts)} ", 1)
        # restarted workers must not reuse the rendezvous store's stale addresses (pytorch/pytorch#135712)
        role.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return app
