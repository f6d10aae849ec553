"""The pipeline as one process per rank (`torchrun ... trainer=ddp_cpu`, gloo on CPU): generation shares
whole batches between ranks and gathers them in order, rank 0 alone writes, and the run gives the same
artifacts (and the same untrained-base predictions) as a single process."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from laffi_exp import distributed
from laffi_exp.models.generation import batches
from laffi_exp.stages.cache import StageCache

from .conftest import ARTIFACTS, TINY
from .test_pipeline import SQUAD_KEYS

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"Generation (\w+): rank (\d+)/(\d+) generated (\d+) of (\d+) prompts")


# -- sharing batches, without a process group --------------------------------------------------------
def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch_size", [(16, 4), (17, 4), (5, 8), (24, 1), (0, 4)])
def test_shares_are_whole_batches_and_gather_back_in_order(monkeypatch, world, n, batch_size):
    from laffi_exp.models import shared_prefix
    from laffi_exp.models.generation import _tokenize

    rng = random.Random(n * 10 + world)
    # lengths with ties; groups of prompts that share a long prefix (questions on one passage), split across batches
    prompts = [f"passage {i % 3} " + "y " * 20 + f"p{i} " + "x" * rng.randrange(12) for i in range(n)]
    groups = [i % 3 if i % 4 else None for i in range(n)]

    class Words:  # one token per word: the shared prefix is the passage's words
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[hash(w) % 1000 for w in t.split()] for t in texts]}

    tokenizer = Words()
    single, shared = batches(tokenizer, prompts, batch_size, groups)
    assert n < 8 or max(shared) >= shared_prefix.MIN_SHARED
    shards = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        mine = distributed.my_share(single)
        # The rank's own batching (what `generate` does with its prompts and their shared lengths) gives back
        # exactly its batches of the single-process run: same prompts side by side, same padding, same outputs.
        ids = _tokenize(tokenizer, [prompts[i] for i in mine])
        own = shared_prefix.plan(ids, [shared[i] for i in mine], [groups[i] for i in mine], batch_size)
        assert [[mine[j] for j in batch] for batch in own] == single[rank::world]
        shards.append((mine, [prompts[i].upper() for i in mine]))
    assert sorted(i for mine, _ in shards for i in mine) == list(range(n))
    for order in (shards, shards[::-1]):  # whatever order the shards arrive in
        assert distributed.place(order, n) == [p.upper() for p in prompts]


def test_place_refuses_holes_and_overlaps():
    with pytest.raises(ValueError, match=r"no shard holds indices \[2\]"):
        distributed.place([([0], ["a"]), ([1], ["b"])], 3)
    with pytest.raises(ValueError, match="index 1 comes from two shards"):
        distributed.place([([0, 1], ["a", "b"]), ([1, 2], ["b", "c"])], 3)
    with pytest.raises(ValueError, match="2 indices but 1 results"):
        distributed.place([([0, 1], ["a"])], 2)


def test_a_single_process_is_world_one():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.gather_in_order([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    assert distributed.from_main({"x": 1}) == {"x": 1}
    assert distributed.on_main(lambda a, b: a + b, 2, b=3) == 5
    distributed.check_agree("anything", os.getpid())
    with distributed.main_first():
        distributed.barrier()


def test_get_or_compute_in_one_process_is_get_or_build(tmp_path):
    cache, calls = StageCache(tmp_path / "stages"), []

    def compute():
        calls.append(1)
        return ["a", "b"]

    def write(folder, texts):
        (folder / "t.json").write_text(json.dumps(texts))

    def read(entry):
        return json.loads((entry / "t.json").read_text())

    spec = {"prompts": "x"}
    assert cache.get_or_compute("generations", spec, compute, write, read, label="first") == ["a", "b"]
    assert cache.get_or_compute("generations", spec, compute, write, read, label="again") == ["a", "b"]
    assert len(calls) == 1 and read(cache.lookup("generations", spec)) == ["a", "b"]
    assert (cache.events["first"]["hit"], cache.events["again"]["hit"]) == (False, True)


# -- the collectives on two gloo processes -------------------------------------------------------------
def _fail(message: str) -> None:
    from laffi_exp.core.errors import ConfigError

    raise ConfigError(message)


def _two_ranks(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from laffi_exp.core.errors import ConfigError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (rank, 2, rank == 0)
        mine = distributed.my_share([[3, 1], [0], [2, 4]])
        assert mine == ([3, 1, 2, 4] if rank == 0 else [0])
        assert distributed.gather_in_order(mine, [f"r{rank}-{i}" for i in mine], 5) == [
            "r1-0",
            "r0-1",
            "r0-2",
            "r0-3",
            "r0-4",
        ]
        assert distributed.from_main(f"rank {rank}") == "rank 0"
        assert distributed.on_main(distributed.rank) == 0  # run by rank 0 alone
        with pytest.raises(ConfigError, match="from rank 0"):  # rank 0's error reaches every rank
            distributed.on_main(_fail, "from rank 0")
        distributed.check_agree("same", "x")
        with pytest.raises(ConfigError, match=r"run dir: the ranks disagree \(rank 0: a, rank 1: b\)"):
            distributed.check_agree("run dir", "ab"[rank])

        # The stage cache: rank 0 alone writes and reads entries; every rank computes a miss together.
        cache, calls = StageCache(Path(root) / "stages"), []

        def compute():
            calls.append(1)
            return distributed.gather_in_order([rank], [f"t{rank}"], 2)

        def write(folder, texts):
            assert distributed.is_main()
            (folder / "t.json").write_text(json.dumps(texts))

        def read(entry):
            assert distributed.is_main()
            return json.loads((entry / "t.json").read_text())

        for label, hit in (("first", False), ("again", True)):
            assert cache.get_or_compute("generations", {"k": 1}, compute, write, read, label=label) == ["t0", "t1"]
            assert cache.events[label]["hit"] is hit
        assert len(calls) == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_and_cache_on_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_ranks, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    entries = [p for p in (tmp_path / "stages" / "generations").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and (entries[0] / "spec.json").is_file()


# -- the CLI ---------------------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _launch(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, all of which (torchrun's workers too) is killed on timeout."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... timed out:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.slow
def test_ddp_cpu_without_a_launcher_says_how_to_launch(tmp_path, cache_dir):
    proc = _launch(
        [
            sys.executable,
            "-m",
            "laffi_exp",
            *TINY,
            "trainer=ddp_cpu",
            f"paths.cache_dir={cache_dir}",
            f"cache.dir={tmp_path / 'stages'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert "trainer: runs 2 processes (devices x num_nodes) but 1 were launched" in proc.stdout
    assert "torchrun --nproc_per_node=2" in proc.stdout
    assert not (tmp_path / "run" / "answers.jsonl").exists()  # stopped before any model work


# -- the whole pipeline on two CPU processes ---------------------------------------------------------------
# Four batches per generation stage on the 16 test questions, so that both ranks get a share.
SHARED = ["generation.batch_size=4"]


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-rank run (torchrun, the default run dir), the same config in one process, and a second
    two-rank run that finds every stage in the first one's cache."""
    tmp = tmp_path_factory.mktemp("distributed")
    models = tmp / "models"  # fresh: rank 0 builds the embedded base while rank 1 waits
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "laffi_exp"]
    common = [*TINY, *SHARED, f"paths.cache_dir={models}"]
    ddp = _launch([*torchrun, *common, "trainer=ddp_cpu", f"cache.dir={tmp / 'stages_ddp'}"], cwd=tmp)
    assert ddp.returncode == 0, ddp.stdout[-5000:]
    single = _launch(
        [
            sys.executable,
            "-m",
            "laffi_exp",
            *common,
            f"cache.dir={tmp / 'stages_single'}",
            f"hydra.run.dir={tmp / 'single'}",
        ],
        cwd=tmp,
    )
    assert single.returncode == 0, single.stdout[-5000:]
    again = _launch(
        [*torchrun, *common, "trainer=ddp_cpu", f"cache.dir={tmp / 'stages_ddp'}", f"hydra.run.dir={tmp / 'again'}"],
        cwd=tmp,
    )
    assert again.returncode == 0, again.stdout[-5000:]
    run_dirs = list((tmp / "outputs" / "laffi" / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs  # both ranks named the run dir after rank 0's start time
    return {
        "ddp": (run_dirs[0], ddp.stdout),
        "single": (tmp / "single", single.stdout),
        "again": (tmp / "again", again.stdout),
        "tmp": tmp,
    }


@pytest.mark.slow
def test_two_ranks_write_the_artifacts_of_one_process(runs):
    ddp, single = runs["ddp"][0], runs["single"][0]
    for name in ARTIFACTS:
        assert (ddp / name).is_file(), name
    assert _files(ddp) == _files(single)  # .hydra/, one log, one csv dir: nothing from rank 1
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert metrics.keys() == reference.keys()
    assert metrics["test/total"] == 16
    for prefix in ("base", "test", "test_reflect"):
        assert all(isinstance(metrics[f"{prefix}/{k}"], (int, float)) for k in SQUAD_KEYS)


@pytest.mark.slow
def test_sharded_greedy_generation_equals_one_process(runs):
    ddp, single = runs["ddp"][0], runs["single"][0]
    for name in (
        "base_predictions.json",
        "base_na_probs.json",
        "answers.jsonl",
        "val_answers.jsonl",
    ):  # the untrained base
        assert (ddp / name).read_text() == (single / name).read_text(), name
    # ... so both runs name the same cache entries for them: one cache serves both kinds of run.
    stages = [json.loads((d / "manifest.json").read_text())["stages"] for d in (ddp, single)]
    for label in ("answer_train", "answer_validation", "base_test", "base_na_probs"):
        assert stages[0][label]["key"] == stages[1][label]["key"], label


@pytest.mark.slow
def test_every_rank_generates_its_share(runs):
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    for label, rank, world, mine, total in GENERATED.findall(runs["ddp"][1]):
        assert int(world) == 2
        counts[label][int(rank)] = int(mine)
        counts[label]["n"] = int(total)
    expected = {"answer_train": 24, "answer_validation": 8, "base_test": 16, "test": 16, "reflect": 16}
    assert set(counts) == set(expected)
    for label, n in expected.items():
        assert counts[label]["n"] == n and counts[label][0] + counts[label][1] == n, label
        assert counts[label][0] > 0 and counts[label][1] > 0, label
    assert GENERATED.search(runs["single"][1]) is None  # a single process shares nothing


@pytest.mark.slow
def test_rank_one_writes_nothing(runs):
    ddp = runs["ddp"][0]
    logs = list(ddp.rglob("*.log"))
    assert [p.name for p in logs] == ["__main__.log"]
    text = logs[0].read_text()
    assert "rank 0/2 generated" in text and "rank 1/2 generated" not in text  # rank 1 logs to the console only
    assert "hydra.output_subdir" not in (ddp / ".hydra" / "overrides.yaml").read_text()  # rank 0's copy
    assert not [p for p in ddp.rglob("*") if re.search(r"rank|process_\d|\.tmp", p.name)]
    stages = runs["tmp"] / "stages_ddp"
    assert not [p for p in stages.rglob("*") if ".tmp-" in p.name]
    assert len(list((stages / "adapters").glob("*/adapter/adapter_model.safetensors"))) == 1


@pytest.mark.slow
def test_a_second_two_rank_run_takes_every_stage_from_the_cache(runs):
    (ddp, _), (again, out) = runs["ddp"], runs["again"]
    stages = json.loads((again / "manifest.json").read_text())["stages"]
    assert stages and all(event["hit"] for event in stages.values()), stages
    assert GENERATED.search(out) is None  # nothing generated again
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (ddp, again))
    assert {k: v for k, v in first.items() if k != "time/seconds"} == {
        k: v for k, v in second.items() if k != "time/seconds"
    }
    for name in ("predictions.json", "reflect_predictions.json", "adapter/adapter_model.safetensors"):
        assert (ddp / name).read_bytes() == (again / name).read_bytes(), name


# -- fully sharded training (trainer=fsdp_cpu: Lightning's FSDP on gloo processes) ---------------------
# A clip small enough to act on every step: clipping by the norm over all shards is part of what must
# match DDP (a per-shard norm, or none, would train other weights).
CLIPPED = [*TINY, *SHARED, "trainer.gradient_clip_val=0.01"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same two-rank run trained with FSDP and with DDP."""
    tmp = tmp_path_factory.mktemp("fsdp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "laffi_exp"]
    out = {}
    for name in ("fsdp_cpu", "ddp_cpu"):
        proc = _launch(
            [
                *torchrun,
                *CLIPPED,
                f"trainer={name}",
                f"paths.cache_dir={tmp / 'models'}",
                f"cache.dir={tmp / 'stages'}",
                f"hydra.run.dir={tmp / name}",
            ],
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stdout[-5000:]
        out[name] = (tmp / name, proc.stdout)
    return out


@pytest.mark.slow
def test_fsdp_trains_the_adapter_that_ddp_trains(sharded):
    import torch
    from safetensors.torch import load_file

    (fsdp, log), (ddp, _) = sharded["fsdp_cpu"], sharded["ddp_cpu"]
    assert "FSDP: one unit per LlamaDecoderLayer and per LoRA weight" in log  # sharded by transformer block
    assert re.search(r"FSDP: gathered \d+ adapter tensors", log)
    stages = [json.loads((d / "manifest.json").read_text())["stages"] for d in (fsdp, ddp)]
    assert not stages[0]["train"]["hit"] and not stages[1]["train"]["hit"]  # each trained its own
    assert stages[0]["train"]["key"] != stages[1]["train"]["key"]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (fsdp, ddp))
    assert a.keys() == b.keys() and len(a) > 0
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 0  # trained (lora_B starts at zero)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_fsdp_run_writes_the_artifacts_of_a_ddp_run(sharded):
    (fsdp, _), (ddp, _) = sharded["fsdp_cpu"], sharded["ddp_cpu"]
    for name in ARTIFACTS:
        assert (fsdp / name).is_file(), name
    assert _files(fsdp) == _files(ddp)
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (fsdp, ddp))
    assert metrics.keys() == reference.keys()
    for key in metrics.keys() - {"time/seconds"}:  # losses agree to float rounding; scores exactly
        assert metrics[key] == pytest.approx(reference[key], rel=1e-5), key
    assert (fsdp / "predictions.json").read_text() == (ddp / "predictions.json").read_text()


def test_fsdp_refuses_4bit_before_any_work(make_cfg, tmp_path):
    from laffi_exp.core.errors import ConfigError
    from laffi_exp.pipeline import run

    cfg = make_cfg(
        "trainer=fsdp", "model=hf", "model.name_or_path=org/some-7b", "model.load_in_4bit=true", embedded=False
    )
    with pytest.raises(ConfigError, match="model.load_in_4bit: FSDP does not shard 4-bit weights"):
        run(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_trains_a_bf16_base_like_ddp(tmp_path):
    """A bf16 checkpoint (the paper-scale presets) with fp32 LoRA weights: FSDP needs one dtype per unit,
    so the LoRA weights are units of their own. Close to DDP, not equal: FSDP runs a bf16 base's
    arithmetic in another order."""
    from safetensors.torch import load_file

    from .conftest import SQUAD_DEV, TINYLLAMA

    if not (TINYLLAMA.exists() and SQUAD_DEV.exists()):
        pytest.skip(f"{TINYLLAMA} or {SQUAD_DEV} is absent (the shared/ folder beside the project)")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "laffi_exp"]
    real = [o for o in CLIPPED if not o.startswith("model.")] + [
        "model=hf",
        f"model.name_or_path={TINYLLAMA}",
        "model.dtype=bfloat16",
        "model.max_length=512",
        "dataset=squad_v2",
        f"dataset.path={SQUAD_DEV.parent}",
    ]
    losses, adapters = {}, {}
    for name in ("fsdp_cpu", "ddp_cpu"):
        proc = _launch(
            [
                *torchrun,
                *real,
                f"trainer={name}",
                f"paths.cache_dir={tmp_path / 'models'}",
                f"cache.dir={tmp_path / 'stages'}",
                f"hydra.run.dir={tmp_path / name}",
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-5000:]
        losses[name] = json.loads((tmp_path / name / "metrics.json").read_text())["train/final_val_loss"]
        adapters[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert adapters["fsdp_cpu"].keys() == adapters["ddp_cpu"].keys()
    assert {str(t.dtype) for t in adapters["fsdp_cpu"].values()} == {"torch.float32"}
    assert max(t.abs().max().item() for k, t in adapters["fsdp_cpu"].items() if "lora_B" in k) > 0  # trained
    assert losses["fsdp_cpu"] == pytest.approx(losses["ddp_cpu"], rel=1e-2)
