"""Curvature across processes: two gloo ranks on CPU give the single-process plan and weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from families import tiny_model

import surgeon_fx as sf

CALIB = dict(n=6, seq=24)


def _calibration() -> torch.Tensor:
    return torch.randint(0, 128, (CALIB["n"], CALIB["seq"]), generator=torch.Generator().manual_seed(3))


def _compress(fisher: str):
    model = tiny_model("llama").eval()
    return sf.compress(model, 0.3, calibration=_calibration(), fisher=fisher, shots=2, progress=False)


def _rank_main(rank: int, world: int, store: str, out: str, fisher: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from surgeon_fx.passes import curvature

        local = []
        reduce = curvature._all_reduce_

        def spy(curv, *args):  # the tokens this rank swept itself, before the sum over ranks
            local.append(curv.tokens)
            reduce(curv, *args)

        curvature._all_reduce_ = spy
        small = _compress(fisher)
        state = {"plan": small.surgeon_fx_plan.to_dict(), "state": small.state_dict(), "local": local}
        torch.save(state, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_two_gloo_ranks_match_one_process(tmp_path, fisher):
    """Each rank sweeps half of the batches and the factors are all-reduced: both ranks end with
    exactly the same plan and weights, and those equal the single-process run (the plan exactly,
    weights up to float32 summation order)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path), fisher), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    half = CALIB["n"] * CALIB["seq"] // 2
    assert r0["local"] == r1["local"] == [half, half]  # each rank swept half of the windows, each shot
    single = _compress(fisher)
    assert r0["plan"] == r1["plan"] == single.surgeon_fx_plan.to_dict()
    for k, v in single.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        torch.testing.assert_close(r0["state"][k], v, atol=1e-5, rtol=1e-4)
