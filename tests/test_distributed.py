"""Several processes: ``torchrun`` / ``accelerate launch`` with 2 CPU processes (gloo).

Each launch is a subprocess with a timeout; the 2-process runs must leave the same cache
(keys and bytes) and the same confusion matrix as one process.
"""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from ovdiff_core.cli import main
from ovdiff_core.distributed import LaunchEnv, distributed, launch_env, shard
from ovdiff_core.evaluation.datasets import class_names
from ovdiff_core.evaluation.synthetic import color_world, write_synthetic_voc

ROOT = Path(__file__).resolve().parent.parent
VOC_NAMES = class_names("voc")
TIMEOUT_S = 240


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one thread per process in both runs: float reductions (K-means, pooling) depend on
    # the thread count, and torchrun sets OMP_NUM_THREADS=1 in its workers
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")  # fmt: skip
    return env


def torchrun(
    *argv: str, cwd: Path, script: Path | None = None, script_args: tuple[str, ...] | list[str] = ()
) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]  # fmt: skip
    target = [str(script), *script_args] if script else ["-m", "ovdiff_core", *argv, "--quiet"]
    proc = subprocess.run(
        [*launcher, *target], capture_output=True, text=True, env=_env(), cwd=cwd,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def single(*argv: str, cwd: Path) -> str:
    """The command with one process (no launcher), in a subprocess like the 2-process run."""
    proc = subprocess.run(
        [sys.executable, "-m", "ovdiff_core", *argv, "--quiet"], capture_output=True,
        text=True, env=_env(), cwd=cwd, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def cache_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))
    }


# --------------------------------------------------------------------------- launch env


def test_launch_env_reads_torchrun_and_accelerate_variables():
    assert launch_env({}) == LaunchEnv(0, 1, 0, "none")
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0"}).world_size == 1
    torchrun_vars = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                     "TORCHELASTIC_RUN_ID": "x"}  # fmt: skip
    assert launch_env(torchrun_vars) == LaunchEnv(5, 8, 1, "torchrun")
    accel = {**torchrun_vars, "ACCELERATE_MIXED_PRECISION": "no"}
    assert launch_env(accel).launcher == "accelerate"
    assert launch_env({"RANK": "1", "WORLD_SIZE": "2"}) == LaunchEnv(1, 2, 1, "env")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "outside 0..1"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "not an integer"),
    ],
)
def test_inconsistent_launch_variables_say_what_to_do(env, message):
    with pytest.raises(ValueError, match=message):
        launch_env(env)


def test_missing_master_address_is_a_clear_error():
    with (
        pytest.raises(ValueError, match="MASTER_ADDR is not set"),
        distributed({"WORLD_SIZE": "2", "RANK": "0"}, backend="gloo"),
    ):
        pass
    assert not dist.is_initialized()


def test_shard_is_a_deterministic_partition():
    items = list(range(23))
    parts = [shard(items, r, 4) for r in range(4)]
    assert parts[1] == [1, 5, 9, 13, 17, 21]  # round-robin: item i on rank i % 4
    assert sorted(x for p in parts for x in p) == items
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank < world_size"):
        shard(items, 4, 4)


def test_one_process_never_touches_torch_distributed(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("init_process_group called with one process")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with distributed() as ctx:
        assert ctx.world_size == 1 and ctx.is_main and ctx.backend is None
        assert ctx.all_reduce(np.array([[1, 2]], np.int32)).tolist() == [[1, 2]]
        assert ctx.all_gather_json({"a": 1}) == [{"a": 1}]
    out = io.StringIO()
    assert main(["build", "cat,sofa", "--backend", "color", "--cache", str(tmp_path),
                 "--quiet"], stdout=out) == 0  # fmt: skip
    out = out.getvalue()
    assert "2 classes: 2 built" in out and "processes" not in out


# --------------------------------------------------------------------------- collectives


COLLECTIVES = """
import json, os, sys
import numpy as np
import torch.distributed as dist
from ovdiff_core.distributed import distributed

result = {}
if sys.argv[1] == "own":  # distributed() initialises the group; the block raises at the end
    try:
        with distributed() as ctx:
            r = ctx.rank
            total = ctx.all_reduce(np.array([[r + 1, 10 * r]], dtype=np.int32))
            top = ctx.all_reduce(np.array([0.5 + r]), op="max")
            rows = ctx.all_gather_json({"rank": r, "name": "é" * (r + 1), "x": [r] * r})
            ctx.barrier()
            result = dict(total=total.tolist(), dtype=str(total.dtype), top=top.tolist(),
                          rows=rows, mine=ctx.shard(list(range(7))), backend=ctx.backend)
            raise KeyError("boom")
    except KeyError:
        result["initialized_after_error"] = dist.is_initialized()
else:  # the caller's own group is used and left open
    dist.init_process_group("gloo")
    with distributed() as ctx:
        result["reused"] = int(ctx.all_reduce(np.array([1]))[0])
    result["still_open"] = dist.is_initialized()
    dist.destroy_process_group()
path = os.path.join(os.path.dirname(__file__), f"{sys.argv[1]}{os.environ['RANK']}.json")
with open(path, "w") as f:
    json.dump(result, f)
"""


def test_collectives_and_shutdown_on_error_with_two_gloo_processes(tmp_path):
    """all_reduce (sum, max), all_gather_json and barrier across 2 ranks; a block that
    raises still destroys the process group; a group the caller opened stays open."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    torchrun(cwd=tmp_path, script=script, script_args=["own"])
    r0 = json.loads((tmp_path / "own0.json").read_text())
    r1 = json.loads((tmp_path / "own1.json").read_text())
    assert r0["total"] == r1["total"] == [[3, 10]] and r0["dtype"] == "int64"
    assert r0["top"] == r1["top"] == [1.5]
    rows = [{"rank": 0, "name": "é", "x": []}, {"rank": 1, "name": "éé", "x": [1]}]
    assert r0["rows"] == r1["rows"] == rows
    assert r0["mine"] == [0, 2, 4, 6] and r1["mine"] == [1, 3, 5]
    assert r0["backend"] == "gloo"
    assert r0["initialized_after_error"] is False and r1["initialized_after_error"] is False
    torchrun(cwd=tmp_path, script=script, script_args=["caller"])
    for rank in (0, 1):
        data = json.loads((tmp_path / f"caller{rank}.json").read_text())
        assert data == {"reused": 2, "still_open": True}


# --------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    # 7 images (uneven shards: 4 + 3), two of them with wrong annotations
    written = write_synthetic_voc(
        root, color_world(VOC_NAMES), VOC_NAMES, n_images=7, seed=11, mislabelled=2
    )
    return root, written


def test_build_two_processes_writes_the_same_cache_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    out_one = single("build", "voc", "--backend", "color", "--cache", str(one), cwd=tmp_path)
    proc = torchrun("build", "voc", "--backend", "color", "--cache", str(two), cwd=tmp_path)
    files = cache_files(one)
    assert len(files) == 20 * 3
    assert cache_files(two) == files  # same keys, same bytes
    # rank 0 prints the merged table once: every class, in vocabulary order
    out = proc.stdout
    assert out.count("| class | stuff |") == 1
    assert "20 classes: 20 built, 0 from cache" in out
    assert "split over 2 processes (torchrun, gloo)" in out
    rows = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| ")][1:]
    assert rows == VOC_NAMES
    assert "| monitor | no | 16 | no |" in out_one and "| monitor | no | 16 | no |" in out
    # resumed with 2 processes: every class from the cache, nothing rewritten
    proc = torchrun("build", "voc", "--backend", "color", "--cache", str(two), cwd=tmp_path)
    assert "20 classes: 0 built, 20 from cache" in proc.stdout
    assert cache_files(two) == files


def test_eval_two_processes_same_confusion_matrix_as_one(voc, tmp_path):
    root, written = voc
    common = ["eval", "voc", "--root", str(root), "--backend", "color"]
    single(*common, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "r1"), cwd=tmp_path)
    proc = torchrun(*common, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "r2"),
                    cwd=tmp_path)  # fmt: skip
    one = json.loads((tmp_path / "r1" / "voc21.json").read_text())
    two = json.loads((tmp_path / "r2" / "voc21.json").read_text())
    assert two["n_images"] == one["n_images"] == 7
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["exact"] == one["exact"] and two["per_class"] == one["per_class"]
    matrix = np.array(two["confusion_matrix"])
    assert 0 < matrix.trace() < matrix.sum()  # the wrong annotations show: errors to compare
    assert matrix.sum() == sum(int((w.label != 255).sum()) for w in written if w.split == "val")
    assert one["processes"] == 1 and two["processes"] == 2
    assert (tmp_path / "r2" / "voc21.md").read_text() == (tmp_path / "r1" / "voc21.md").read_text()
    assert proc.stdout.count("## voc21") == 1 and proc.stdout.count("\nmIoU ") == 1
    assert cache_files(tmp_path / "c2") == cache_files(tmp_path / "c1")


def test_segment_two_processes_same_files_as_one(voc, tmp_path):
    root, written = voc
    images = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    cache = str(tmp_path / "cache")
    args = ["segment", str(images), "--vocab", "voc", "--backend", "color", "--cache", cache]
    text = single(*args, "--out", str(tmp_path / "s1"), cwd=tmp_path)
    proc = torchrun(*args, "--out", str(tmp_path / "s2"), cwd=tmp_path)
    s1 = {p.name: p.read_bytes() for p in (tmp_path / "s1").iterdir()}
    s2 = {p.name: p.read_bytes() for p in (tmp_path / "s2").iterdir()}
    assert len(s1) == 3 * len(written)
    assert s2.keys() == s1.keys()
    for name in s1:  # JSON records name their output folder; the rest is byte-identical
        if name.endswith(".json"):
            a, b = json.loads(s1[name]), json.loads(s2[name])
            assert a == b
        else:
            assert s2[name] == s1[name], name
    assert f"{len(written)} of {len(written)} images segmented" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if " -> " in ln]
    assert [ln.replace("/s2/", "/s1/") for ln in lines] == [
        ln for ln in text.splitlines() if " -> " in ln
    ]  # every image once, in file order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_splits_a_build(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single("build", "cat,sofa,lamp", "--backend", "color", "--cache", str(one), cwd=tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "ovdiff_core", "build", "cat,sofa,lamp", "--backend", "color",
           "--cache", str(two), "--quiet"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "split over 2 processes (accelerate, gloo)" in proc.stdout
    assert "3 classes: 3 built, 0 from cache" in proc.stdout
    assert cache_files(two) == cache_files(one)
