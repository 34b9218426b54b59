"""Memory mode's size estimate: what a store takes, what the host offers, the one-line refusal."""

from __future__ import annotations

import pytest
import torch
from conftest import write_store
from test_trainer_runs import cli_args, tiny_options
from typer.testing import CliRunner

from cli import app
from latent_store import LatentStore
from trainer.data import BatchLayout, build_batches
from trainer.memory_budget import (
    BOOKKEEPING,
    ENV_BUDGET,
    MemoryBudgetError,
    check_fits,
    host_available,
    in_flight,
    sample_bytes,
)
from trainer.normalization import normalization_from_store

CPU = torch.device("cpu")
runner = CliRunner()


def test_estimate_counts_every_loaded_array_and_the_ranks(tmp_path, monkeypatch):
    store = LatentStore(write_store(tmp_path / "s.zarr", n=24, variants=2, channels=4, size=8))
    assert sample_bytes(store) == 2 * 4 * 8 * 8 + 2  # uint8 latents, both variants; int16 label
    assert in_flight(store) == store.spec.num_shards * store.spec.shard_size  # few shards
    need = 24 * (sample_bytes(store) + BOOKKEEPING) + in_flight(store) * sample_bytes(store)
    monkeypatch.setenv(ENV_BUDGET, str(need))
    check_fits(store, mode="memory", device=CPU)  # exactly enough
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks of this node each load it
    with pytest.raises(MemoryBudgetError, match=r"x 2 ranks on this node"):
        check_fits(store, mode="memory", device=CPU)
    check_fits(store, mode="stream", device=CPU)  # stream mode holds a few shards only
    norm, layout = (
        normalization_from_store(store, "channel_stats"),
        BatchLayout(batch_size=8, grad_accum=1, rank=0, world_size=1),
    )
    with pytest.raises(MemoryBudgetError, match="use --data stream"):
        build_batches(store, norm, layout, mode="memory", seed=0, device=CPU)
    monkeypatch.setenv(ENV_BUDGET, "1.5k")
    with pytest.raises(
        MemoryBudgetError, match=r"in flight while loading x 2 ranks on this node\) = 0\.00 GB"
    ):
        check_fits(store, mode="memory", device=CPU)
    monkeypatch.setenv(ENV_BUDGET, "lots")
    with pytest.raises(MemoryBudgetError, match=f"{ENV_BUDGET}='lots' is not a size"):
        check_fits(store, mode="memory", device=CPU)


def test_host_available_reads_meminfo_within_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_available(meminfo, cgroup) == 20_000_000 * 1024  # no cgroup files: no limit
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert host_available(meminfo, cgroup) == 20_000_000 * 1024
    (cgroup / "memory.max").write_text("8000000000\n")
    (cgroup / "memory.current").write_text("3000000000\n")
    (cgroup / "memory.stat").write_text("anon 1\ninactive_file 1000000000\nactive_file 5\n")
    assert host_available(meminfo, cgroup) == 6_000_000_000  # limit - usage + reclaimable cache
    assert host_available(tmp_path / "none", cgroup) is not None  # sysconf's free pages instead


def test_train_refuses_a_store_too_large_for_memory_in_one_line(tmp_path, monkeypatch):
    store = write_store(tmp_path / "s.zarr", n=16)
    run = tmp_path / "run"
    monkeypatch.setenv(ENV_BUDGET, "1k")
    result = runner.invoke(app, ["train", *cli_args(tiny_options(store, run, steps=1))])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "use --data stream" in result.output and str(store) in result.output
    assert not run.exists()  # nothing written


def test_loading_holds_the_result_and_the_shards_in_flight_only(tmp_path):
    """load_latents fills one array shard by shard: no list of parts, then a concatenation."""
    import tracemalloc

    from latent_store import load_latents

    path = write_store(tmp_path / "s.zarr", n=1024, shard=64, chunk=64, size=16, variants=2)
    store = LatentStore(path)
    load_latents(store, threads=2)  # warm: zarr's and numpy's own one-time allocations
    tracemalloc.start()
    arrays = load_latents(store, threads=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = arrays.latents.nbytes
    shard = result // store.spec.num_shards
    assert result == 1024 * 2 * 4 * 16 * 16
    assert peak < result + 6 * shard + arrays.labels.nbytes * 4, (peak, result)
