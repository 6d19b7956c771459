"""``surgeon-fx compress`` under torchrun: two gloo ranks on CPU write one folder, equal to one process's.

Rank 1 runs with an audit hook (``sitecustomize`` on its ``PYTHONPATH``) that reports on stderr every file
it opens for writing, creates, renames or removes under the test's folder; there must be none.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import compress_args, make_source

from surgeon_fx import launch
from surgeon_fx.cli import EXIT_EXISTS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from surgeon_fx.rundir import OutputExistsError

SURGEON = ("--ratio", "0.3", "--method", "surgeon", "--shots", "2", "--export", "--no-shot-eval")
SURGEON += ("--calib-windows", "4", "--calib-seq-len", "32")

WATCH = r"""
import os, sys

if os.environ.get("RANK", "0") != "0" and os.environ.get("SURGEON_FX_TEST_WATCH"):
    _root = os.path.realpath(os.environ["SURGEON_FX_TEST_WATCH"])
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _events = {"os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod", "os.utime"}

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in (mode or "") for c in "wax+") or (flags or 0) & _writes):
                return
            paths = [path]
        elif event in ("os.link", "os.symlink"):  # (source, new link): only the link is written
            paths = [args[1]]
        elif event == "os.rename":
            paths = list(args[:2])
        elif event in _events:
            paths = [args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(_root):
                sys.stderr.write(f"RANK-WRITE {os.environ['RANK']} {event} {path}\n")

    sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny Llama folder with a tokenizer and text (see ``test_cli.make_source``)."""
    return make_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def single(src, tmp_path_factory) -> Path:
    """The single-process CLI run (one thread, as every torchrun rank) that the ranks must reproduce."""
    out = tmp_path_factory.mktemp("single") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(compress_args(src, out, *SURGEON, "--calibration", str(src / "text.jsonl"))) == EXIT_OK
    finally:
        torch.set_num_threads(threads)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment plus the write watch on ranks other than 0 (and gloo on the loopback)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(WATCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    env |= {"SURGEON_FX_TEST_WATCH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env |= {"OMP_NUM_THREADS": "1", **extra}
    return env


def torchrun(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "surgeon_fx.cli", *args]
    return subprocess.run(cmd, env=environment(tmp_path), capture_output=True, text=True, timeout=180)


def files(root: Path) -> set[str]:
    return {str(f.relative_to(root)) for f in root.rglob("*")}


def assert_same_model(a: Path, b: Path) -> None:
    """The same plan, parameter counts and weights (up to float32 summation order over ranks)."""
    assert json.loads((a / "surgeon_fx_plan.json").read_text()) == json.loads((b / "surgeon_fx_plan.json").read_text())
    ra, rb = (json.loads((f / "report.json").read_text()) for f in (a, b))
    for key in ("parameters", "linear_parameters", "file_bytes"):
        assert ra["compressed"][key] == rb["compressed"][key] and ra["dense"][key] == rb["dense"][key], key
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


def test_torchrun_two_ranks_write_one_folder_equal_to_one_process(src, single, tmp_path):
    """Exit 0 on both ranks; one output folder, equal to the single-process run; rank 1 writes nothing and
    prints no progress; nothing else appears beside the output."""
    before = files(tmp_path)
    out = tmp_path / "out"
    run = torchrun(tmp_path, compress_args(src, out, *SURGEON, "--calibration", str(src / "text.jsonl")))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "RANK-WRITE" not in run.stderr, run.stderr
    new = files(tmp_path) - before - {"hook", "hook/sitecustomize.py"}
    assert new == {"out"} | {f"out/{f}" for f in files(out)}  # no out.partial, no out.old-*, nothing else
    assert files(out) == files(single)
    assert_same_model(out, single)
    assert run.stdout.count("done: ") == 1 and run.stdout.count("2 processes, rank 0 writes") == 1
    assert run.stderr.count("tracing: 100%") == 1  # rank 0's progress bars only
    assert json.loads((out / "report.json").read_text())["processes"] == 2


def test_torchrun_resumes_after_a_shot_on_every_rank(src, single, tmp_path, monkeypatch):
    """A one-process run interrupted after shot 1 leaves OUT.partial/shots/; torchrun with the same command
    resumes at shot 2 on both ranks (rank 1 from rank 0's saved state) and gives the uninterrupted result."""
    from surgeon_fx import evaluate

    real, calls = evaluate.perplexity, []

    def interrupt_second(model, windows, **kw):  # 1: dense, 2: after shot 1 (saved by then) <- Ctrl-C
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, windows, **kw)

    out = tmp_path / "out"
    args = compress_args(src, out, *SURGEON, "--calibration", str(src / "text.jsonl"))
    args.remove("--no-shot-eval")  # evaluate after every shot: the evaluation after shot 1 is interrupted
    monkeypatch.setattr(evaluate, "perplexity", interrupt_second)
    assert main(args) == EXIT_INTERRUPTED
    monkeypatch.undo()
    assert json.loads((tmp_path / "out.partial" / "shots" / "state.json").read_text())["shot"] == 1
    run = torchrun(tmp_path, args)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "RANK-WRITE" not in run.stderr, run.stderr
    assert "resuming" in run.stdout and not (tmp_path / "out.partial").exists()
    assert_same_model(out, single)  # shot evaluation does not change the model
    labels = [p["label"] for p in json.loads((out / "report.json").read_text())["points"]]
    assert labels == ["dense", "shot 1", "shot 2"]


def test_rank0_refusal_reaches_every_rank(src, tmp_path):
    """The output exists (no --force): rank 0 refuses and rank 1, waiting for its decision, exits 3 too,
    instead of hanging; the existing output is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = environment(tmp_path, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "surgeon_fx.cli", *compress_args(src, out, "--export", "--no-eval")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_EXISTS, EXIT_EXISTS], results
    assert all("--force" in err for _, err in results)
    assert "RANK-WRITE" not in results[1][1]
    assert files(out) == {"keep.txt"} and not (tmp_path / "out.partial").exists()


def test_bad_options_fail_before_the_process_group(src, tmp_path, monkeypatch, capsys):
    """Under torchrun's environment, bad options exit 2 at once on each rank: no group is initialised (a
    lone rank would wait for its peer there)."""
    import torch.distributed as dist

    def refuse(*a, **k):
        raise AssertionError("init_process_group called")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    for k, v in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    assert main(compress_args(src, tmp_path / "out", "--sparsity", "3:2")) == EXIT_USAGE
    assert main(compress_args(src, tmp_path / "out", "--device", "cuda:0")) == EXIT_USAGE
    assert "--device cuda" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_launch_environment_and_devices():
    """torchrun's variables give (rank, local rank, world); cuda becomes cuda:LOCAL_RANK under several ranks,
    with NCCL; CPU uses gloo; a lone process is left alone."""
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch.env_world(env) == (3, 1, 4)
    assert launch.env_world({}) == (0, 0, 1) and launch.env_world({"WORLD_SIZE": "1"}) == (0, 0, 1)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        launch.env_world({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="RANK"):
        launch.env_world({**env, "RANK": "x"})
    assert launch.rank_device("cuda", 1, 4) == "cuda:1" and launch.rank_device("cpu", 1, 4) == "cpu"
    assert launch.rank_device("cuda:0", 0, 1) == "cuda:0"
    with pytest.raises(ValueError, match="--device cuda"):
        launch.rank_device("cuda:0", 1, 4)
    assert launch.backend_for("cuda:1") == "nccl" and launch.backend_for("cpu") == "gloo"
    assert launch.rank_and_world() == (0, 1) and launch.is_main() and launch.from_rank0(lambda: 7) == 7


def _decide(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    seen = []
    try:
        seen.append(launch.from_rank0(lambda: f"rank {rank} decided"))

        def refuse():
            raise OutputExistsError("out exists")

        for fn in (refuse, lambda: launch.on_every_rank(lambda: [0][rank])):  # rank 1's fn fails (IndexError)
            try:
                seen.append(fn())
            except Exception as e:
                seen.append(f"{type(e).__name__}: {e}")
        seen.append(launch.on_every_rank(lambda: rank))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_rank_decisions_and_errors_reach_every_rank(tmp_path):
    """from_rank0: rank 0's result, or its exception, on every rank; on_every_rank: each rank's own result,
    and when one rank fails every rank raises (the others with the failing rank named)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_decide, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0[:2] == r1[:2] == ["rank 0 decided", "OutputExistsError: out exists"]
    assert r0[2] == "IndexError: rank 1: list index out of range" and r1[2] == "IndexError: list index out of range"
    assert (r0[3], r1[3]) == (0, 1)
