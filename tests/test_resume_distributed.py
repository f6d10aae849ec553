"""Generation resumes by chunk under DDP sharding: a two-rank launch (`torchrun`, `trainer=ddp_cpu`) killed
with SIGKILL once a chunk of a generation stage is committed, started again with the same command, ends
with an uninterrupted two-rank run's stage files and metrics (slow: three launches)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import TINY
from .test_distributed import _env, _launch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "laffi_exp"]


def _stage_files(cache_dir: Path) -> dict[str, bytes]:
    """Every generation and likelihood entry's output file, by stage and key."""
    return {
        str(p.relative_to(cache_dir)): p.read_bytes()
        for kind in ("generations", "likelihoods")
        for p in sorted((cache_dir / kind).glob("*/*"))
        if p.is_file() and p.name != "spec.json"
    }


def _metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


@pytest.mark.slow
def test_a_killed_two_rank_generation_resumes_from_its_chunks(cache_dir, tmp_path):
    # One prompt a batch: 24 training questions are 12 chunks of two batches (one per rank) in stage 1.
    common = [*TORCHRUN, *TINY, "generation.batch_size=1", "trainer=ddp_cpu", f"paths.cache_dir={cache_dir}"]
    whole = _launch(
        [*common, "cache.chunk_batches=0", f"cache.dir={tmp_path / 'whole'}", f"hydra.run.dir={tmp_path / 'w'}"],
        cwd=tmp_path,
    )
    assert whole.returncode == 0, whole.stdout[-5000:]
    stages = tmp_path / "stages"
    cmd = [*common, "cache.chunk_batches=1", f"cache.dir={stages}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    try:
        while not list((stages / "partial" / "generations").glob("*/chunk-*.json")):
            assert proc.poll() is None, "the launch ended before it committed a chunk"
            assert time.monotonic() < deadline, "no chunk committed in 10 minutes"
            time.sleep(0.01)
    finally:  # torchrun and both ranks, mid-stage (the ranks are torchrun's children, not in its process group)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for process in tree:
            process.kill()
        psutil.wait_procs(tree, timeout=60)
        proc.wait()
    committed = list((stages / "partial" / "generations").glob("*/chunk-*.json"))
    assert committed and not (tmp_path / "run" / "metrics.json").exists()

    again = _launch(cmd, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-5000:]
    assert "chunks already done" in again.stdout  # it started at its first unfinished chunk
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "w")
    assert _stage_files(stages) == _stage_files(tmp_path / "whole")  # every generation, byte for byte
    assert not list((stages / "partial").rglob("chunk-*.json"))  # the chunks go once the entries are cached
