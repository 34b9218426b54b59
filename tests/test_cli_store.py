"""`latentdit inspect` and `latentdit validate` through Typer's CliRunner."""

from __future__ import annotations

import json

import zarr
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_inspect_text_and_json(store_path):
    result = runner.invoke(app, ["inspect", str(store_path)])
    assert result.exit_code == 0, result.output
    assert "40 written of 40" in result.output and "3/3 complete" in result.output
    d = json.loads(runner.invoke(app, ["inspect", str(store_path), "--json"]).output)
    assert d["samples"] == 40 and d["classes"] == 3 and d["per_class_min"] == 13
    assert d["per_class_max"] == 14 and d["bytes_on_disk"] > 40 * 256


def test_validate_passes_then_fails(store_path):
    ok = runner.invoke(app, ["validate", str(store_path)])
    assert ok.exit_code == 0 and "valid" in ok.output and "FAIL" not in ok.output
    zarr.open_group(str(store_path), mode="r+")["shard_records"][1] = ""
    bad = runner.invoke(app, ["validate", str(store_path), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert not report["ok"]
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["completion"]


def test_missing_store_is_one_line_error(tmp_path):
    for command in ("inspect", "validate"):
        result = runner.invoke(app, [command, str(tmp_path / "nope.zarr")])
        assert result.exit_code == 2
        assert result.output.strip().count("\n") == 0
        assert "no latent store here" in result.output and "Traceback" not in result.output
