"""The images pin every Python package and check their imports at build time (no docker needed)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _names(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_every_dependency_is_pinned_in_the_image_constraints():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*py["dependencies"], *py["optional-dependencies"]["bench"]]
    pinned = _names((ROOT / "docker" / "constraints.txt").read_text().splitlines())
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]).lower()
        assert name in pinned, f"{name} (pyproject.toml) has no pin in docker/constraints.txt"
    assert not any(n in pinned for n in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"))
    gpu = _names((ROOT / "docker" / "constraints-gpu.txt").read_text().splitlines())
    assert gpu == {"torch": "2.13.0+cu128", "fbgemm-gpu": "1.8.0+cu128", "torchrec": "1.8.0"}
    cpu = _names((ROOT / "docker" / "constraints-cpu.txt").read_text().splitlines())
    assert cpu == {"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.8.0", "torchrec": "1.8.0"}


def test_dockerfiles_apply_the_constraints_and_check_imports():
    for name, flavour in (("Dockerfile", "gpu"), ("Dockerfile.cpu", "cpu")):
        text = (ROOT / "docker" / name).read_text()
        assert f"constraints-{flavour}.txt" in text and "ENV PIP_CONSTRAINT=" in text
        # the constraint is in force before the first pip install
        assert text.index("ENV PIP_CONSTRAINT=") < text.index("RUN pip install")
        assert 'python -c "import torch, torchrec, fbgemm_gpu' in text
    gpu = (ROOT / "docker" / "Dockerfile").read_text()
    assert "libibverbs1" in gpu and "librdmacm1" in gpu  # NCCL's InfiniBand/RoCE transport
