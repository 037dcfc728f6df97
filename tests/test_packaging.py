"""The pinned stack is the same in pyproject.toml, the Makefile and both Dockerfiles."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _pins(text: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r"\b(torch|torchrec|fbgemm-gpu(?:-cpu)?)==([0-9.]+)", text)}


def test_pins_agree_everywhere():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = py["project"]["optional-dependencies"]
    cpu = _pins(" ".join(extras["cpu"]))
    gpu = _pins(" ".join(extras["gpu"]))
    make = _pins((ROOT / "Makefile").read_text())
    dcpu = _pins((ROOT / "docker" / "Dockerfile.cpu").read_text())
    dgpu = _pins((ROOT / "docker" / "Dockerfile").read_text())
    assert cpu == {"torch": "2.13.0", "fbgemm-gpu-cpu": "1.8.0"}
    assert gpu == {"torch": "2.13.0", "fbgemm-gpu": "1.8.0"}
    assert make == {**cpu, "torchrec": make["torchrec"]}
    assert dcpu == make, "docker/Dockerfile.cpu must pin what the Makefile installs"
    assert dgpu == {**gpu, "torchrec": make["torchrec"]}
    # torchrec is never a pip dependency (it must be installed --no-deps)
    assert not any("torchrec" in d for d in py["project"]["dependencies"])


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
