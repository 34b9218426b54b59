"""What a run cost: the cost fields of log.jsonl, the FID milestones, the summary that ends
`latentdit train` and `latentdit inspect RUN` (finished or running), across a resume."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TRAIN, train_cli, write_store
from typer.testing import CliRunner

from cli import app
from evaluation.evaluate import EvaluateConfig, evaluate
from trainer.config import ConfigError, TrainConfig
from trainer.cost import RunCost, first_below, read_records

runner = CliRunner()


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_vae_dir, tiny_inception):
    """A run of 4 steps (16 samples, batch 8: 2 steps an epoch) with FID every 2 steps and
    milestones 1 (reached at once: the tiny network's features are tiny) and 1e-7 (never),
    then resumed to 6 steps."""
    root = tmp_path_factory.mktemp("report")
    store = write_store(root / "s.zarr", n=16, size=4)
    evaluate(
        EvaluateConfig(
            samples=store,
            vae=str(tiny_vae_dir),
            inception=tiny_inception,
            workers=0,
            save_stats=root / "ref.npz",
        )
    )
    run = root / "run"
    common = [
        *TINY_TRAIN,
        "--store",
        store,
        "--run",
        run,
        "--vae",
        tiny_vae_dir,
        "--sample-every",
        100,
        "--eval-every",
        2,
        "--eval-samples",
        6,
        "--eval-ref",
        root / "ref.npz",
        "--eval-inception",
        tiny_inception,
        "--eval-milestones",
        "1,1e-7",
    ]
    first = train_cli(*common, "--steps", 4)
    before = read_records(run / "log.jsonl")
    second = train_cli(*common, "--steps", 6)
    return run, before, read_records(run / "log.jsonl"), first, second


def test_the_cost_of_every_record_adds_up(evaluated_run):
    _, before, after, _, _ = evaluated_run
    train_records = [r for r in after if not r.get("eval")]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    for r in train_records:
        assert r["images_seen"] == r["step"] * 8  # steps x global batch
        assert r["epoch"] == pytest.approx(r["step"] / 2)
        assert r["images_per_s_per_device"] == pytest.approx(r["images_per_s"])  # one device
        assert r["device_hours"] == pytest.approx(r["wall_s"] / 3600)
    walls = [r["wall_s"] for r in train_records]
    assert walls == sorted(walls) and walls[0] > 0
    # the resumed call's clock starts where the first call's record of step 4 left it
    at_4 = max((r for r in before if r["step"] == 4), key=lambda r: r["wall_s"])
    assert train_records[4]["wall_s"] > at_4["wall_s"]
    evals = [r for r in after if r.get("eval")]
    assert [(r["step"], r["epoch"], r["images_seen"]) for r in evals] == [
        (2, 1.0, 16),
        (4, 2.0, 32),
        (6, 3.0, 48),
    ]
    for r in evals:
        assert r["milestones"] == {"1": {"step": 2, "epoch": 1.0}, "1e-07": None}


def test_the_summary_and_inspect_give_the_same_report(evaluated_run):
    run, _, after, first, second = evaluated_run
    assert "seen         32 images, 2.00 epochs" in first
    assert (
        "seen         48 images, 3.00 epochs" in second
        and "FID < 1      step 2, epoch 1.00" in second
    )
    assert "FID < 1e-07  not yet" in second
    r = runner.invoke(app, ["inspect", str(run), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    last = after[-1]
    assert report["status"] == "finished" and report["step"] == 6 and report["devices"] == 1
    assert report["images_seen"] == 48 and report["epoch"] == 3.0
    assert report["wall_s"] == pytest.approx(last["wall_s"])
    assert [p["step"] for p in report["fid_curve"]] == [2, 4, 6]
    assert report["milestones"] == {"1": {"step": 2, "epoch": 1.0}, "1e-07": None}
    assert report["images_per_s_per_device"] > 0 and report["mfu"] is None  # no peak on a CPU
    assert report["checkpoint"].endswith("0000006")
    text = runner.invoke(app, ["inspect", str(run)]).stdout
    assert "finished at step 6 of 6" in text and "device-hours on 1 device(s)" in text


def test_a_running_run_is_reported_as_far_as_its_log_goes(evaluated_run, tmp_path):
    run, _, after, _, _ = evaluated_run
    live = tmp_path / "live"
    live.mkdir()
    config = json.loads((run / "config.json").read_text())
    (live / "config.json").write_text(json.dumps({**config, "steps": 1000}))
    lines = [json.dumps(r) for r in after[:5]] + ['{"step": 4, "loss": 0.']  # a torn last line
    (live / "log.jsonl").write_text("\n".join(lines))
    report = json.loads(runner.invoke(app, ["inspect", str(live), "--json"]).stdout)
    assert report["status"] == "running or stopped" and report["step"] == 4
    assert report["images_seen"] == 32 and report["checkpoint"] is None


def test_milestones_and_the_clock_of_a_resumed_call(tmp_path):
    curve = [
        {"step": 10, "epoch": 1.0, "fid": 12.0},
        {"step": 20, "epoch": 2.0, "fid": 4.0},
        {"step": 30, "epoch": 3.0, "fid": 6.0},
    ]
    assert first_below(curve, (10.0, 5.0, 2.0)) == {
        "10": {"step": 20, "epoch": 2.0},
        "5": {"step": 20, "epoch": 2.0},
        "2": None,
    }
    log = tmp_path / "log.jsonl"
    log.write_text(
        json.dumps({"step": 10, "wall_s": 100.0, "device_hours": 0.5})
        + "\n"
        + json.dumps({"step": 20, "wall_s": 200.0, "device_hours": 1.0})
        + "\n"
    )
    cost = RunCost.resume(log, start_step=10, global_batch=4, steps_per_epoch=5, world_size=2)
    fields = cost.train_fields(12, images_per_s=100.0)
    assert fields["wall_s"] >= 100.0 and fields["device_hours"] >= 0.5
    assert fields["images_seen"] == 48 and fields["epoch"] == 2.4
    assert fields["images_per_s_per_device"] == 50.0


@pytest.mark.parametrize("text", ["ten", "5,-1", ","])
def test_bad_milestones_are_one_line(text):
    evals = dict(store="s", run="r", eval_every=10, vae="v", eval_ref="ref.npz")
    with pytest.raises(ConfigError, match=r"--eval-milestones .* give FID thresholds > 0"):
        TrainConfig(**evals, eval_milestones=text)
    assert TrainConfig(**evals, eval_milestones="10, 5,2.5").milestones == (10, 5, 2.5)
    with pytest.raises(ConfigError, match="--eval-milestones needs --eval-every"):
        TrainConfig(store="s", run="r", eval_milestones="10")
