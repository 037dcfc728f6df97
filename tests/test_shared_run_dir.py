"""The start-up probe that ``run_dir`` is one folder for every rank (2 gloo processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch.multiprocessing as mp


def _rank(rank: int, store: str, run_dirs: list, out: str) -> None:
    import torch.distributed as dist

    from dig_torchrec.distributed.shared_fs import PROBE_DIR, broadcast_from_rank0, check_shared_run_dir
    from dig_torchrec.errors import ConfigError

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    result = {"resume": broadcast_from_rank0("step-7" if rank == 0 else "other")}
    try:
        check_shared_run_dir(run_dirs[rank])
        result["error"] = None
    except ConfigError as e:
        result["error"] = str(e)
    dist.barrier()
    result["leftover_probes"] = sorted(p.name for p in Path(run_dirs[rank], PROBE_DIR).glob("*"))
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(tmp_path: Path, name: str, run_dirs: list) -> list:
    out = str(tmp_path / name)
    mp.start_processes(_rank, args=(str(tmp_path / f"{name}.store"), run_dirs, out), nprocs=2, join=True,
                       start_method="spawn")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def test_shared_and_unshared_run_dir(tmp_path: Path) -> None:
    shared = _run(tmp_path, "shared", [str(tmp_path / "run")] * 2)
    assert [r["error"] for r in shared] == [None, None]
    assert [r["resume"] for r in shared] == ["step-7", "step-7"]  # rank 0's decision everywhere
    assert shared[0]["leftover_probes"] == []
    # two node-local folders at the same path look like this: each rank sees only its own probe
    split = _run(tmp_path, "split", [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")])
    errors = [r["error"] for r in split]
    assert errors[0] == errors[1] and errors[0] is not None
    assert "config key 'run_dir'" in errors[0] and "is not shared by all ranks" in errors[0]
    assert "rank 1 (" in errors[0] and "\n" not in errors[0]
