"""FD_DINOv2 against EDM2's own code: features, statistics and distance from
tests/fixtures/edm2 (made by make_fixtures.py with NVlabs/edm2's calculate_metrics.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from cli import app

FIXTURES = ROOT / "tests" / "fixtures" / "edm2"
runner = CliRunner()


def test_fd_dinov2_matches_edm2s_calculate_metrics(tmp_path):
    """The same tiny DINOv2 (hub layout in EDM2's detector, transformers layout here, loaded by
    folder): EDM2's per-image features bit for bit, its float64 statistics to 1e-12 and its
    FD_DINOv2 to 1e-7 (scipy's sqrtm), through `latentdit evaluate --metrics fd_dinov2`."""
    with np.load(FIXTURES / "edm2_fd_dinov2.npz") as fx:
        edm2 = {k: fx[k] for k in fx.files}
    for name in ("samples", "ref"):
        np.savez(tmp_path / f"{name}.npz", arr_0=edm2[f"{name}_images"])
    args = [
        "evaluate",
        tmp_path / "samples.npz",
        "--ref",
        tmp_path / "ref.npz",
        "--metrics",
        "fd_dinov2",
        "--dinov2",
        FIXTURES / "tiny-dinov2",
        "--batch-size",
        4,
        "--json",
        "--save-stats",
        tmp_path / "st.npz",
    ]
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["fd_dinov2"] == pytest.approx(float(edm2["fd_dinov2"]), rel=1e-7)
    with np.load(tmp_path / "st.npz") as st:
        np.testing.assert_array_equal(st["dinov2"], edm2["samples_features"])
        np.testing.assert_allclose(st["mu_dinov2"], edm2["samples_mu"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(st["sigma_dinov2"], edm2["samples_sigma"], rtol=0, atol=1e-12)
    r = runner.invoke(
        app,
        [
            str(a)
            for a in [
                "evaluate",
                tmp_path / "ref.npz",
                "--metrics",
                "fd_dinov2",
                "--dinov2",
                FIXTURES / "tiny-dinov2",
                "--save-stats",
                tmp_path / "ref_st.npz",
            ]
        ],
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "ref_st.npz") as st:
        np.testing.assert_array_equal(st["dinov2"], edm2["ref_features"])
