"""``benchmarks/gpu_check.py --dry-run``: every part runs on the CPU against a fake NVML GPU and
writes its keys; without a GPU (and without ``--dry-run``) the script refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> dict:
    """One dry run (about 25 s of CPU; its wall time grows with the machine's load)."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    r = _run("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "time plan" in r.stdout.splitlines()[0]  # the plan comes first
    return json.loads(out.read_text())


def test_the_dry_run_is_marked_and_carries_the_house_header(dry: dict) -> None:
    assert dry["dry_run"] is True and dry["device"]["fake"] is True
    assert {"command", "created_utc", "versions", "machine"} <= set(dry)
    assert "cpu_flags" in dry["machine"]
    parts = ["meter", "async", "gptq", "decode", "predict"]
    assert list(dry["parts"]) == parts and list(dry["plan"]) == parts
    for name, part in dry["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        assert part["seconds"] > 0
    assert set(dry["verdicts"]) == set(dry["targets"])
    assert all(v["value"] is not None for v in dry["verdicts"].values())


def test_meter_part_compares_counter_and_sampled_over_the_same_windows(dry: dict) -> None:
    m = dry["parts"]["meter"]
    assert len(m["windows"]) == 2 and m["all_counter"]
    for w in m["windows"]:
        assert w["counter_j"] > 0 and w["sampled_j"] > 0 and w["samples"] >= 3
        assert w["sampled_vs_counter_pct"] == pytest.approx(
            100 * (w["sampled_j"] / w["counter_j"] - 1)
        )
    worst = max(abs(w["sampled_vs_counter_pct"]) for w in m["windows"])
    assert m["max_abs_sampled_vs_counter_pct"] == worst


def test_async_part_shows_what_an_unsynchronised_window_misses(dry: dict) -> None:
    a = dry["parts"]["async"]
    sy, un = a["synchronised"], a["unsynchronised"]
    assert all(r["method"] == "counter" for r in sy["rows"])
    # the fake burst runs 0.3 s on a thread: closed at once, the window misses nearly all of it
    assert un["median_window_s"] < 0.5 * sy["median_window_s"]
    assert a["energy_error_unsynchronised_pct"] < -50


def test_gptq_part_times_and_meters_the_compression(dry: dict) -> None:
    g = dry["parts"]["gptq"]
    assert g["recipe"] == "gptq(format=int4-g64)" and g["layers_compressed"] == 7
    assert g["gptq_s"] > 0 and g["gpu_energy_j"] > 0 and g["energy_method"] == "counter"
    assert g["linear_paths"] == {"kernel:cpu-int4/fp32": 7}  # on a GPU: kernel:cuda-int4/bf16


def test_decode_part_runs_every_variant_through_its_path(dry: dict) -> None:
    d = dry["parts"]["decode"]
    rows = d["rows"]
    assert list(rows) == ["fp16", "int8", "int4", "int4-emulated"]
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["decode_j_per_token"] > 0
        # metered: the counter, or power x time from the same sensor for a decode window
        # shorter than the counter's period (3 tiny steps on a fast CPU)
        assert r["decode_energy_method"] in ("counter", "sampled")
    assert rows["int4"]["linear_paths"]["kernel:cpu-int4/fp32"] == 7
    assert rows["int8"]["linear_paths"]["kernel:cpu-int8/fp32"] == 7
    assert rows["int4-emulated"]["linear_paths"]["emulated"] == 7
    assert rows["int4-emulated"]["kernel_checks"] is None
    for name in ("int8", "int4"):
        assert rows[name]["kernel_checks"]["logits_rel_err_vs_emulated"] < 1e-3
    layer = rows["int4"]["kernel_checks"]["layer"]
    assert layer["max_abs_err_vs_reference_rel"] < 2e-2  # bf16 reference vs the fp32 kernel
    assert (
        d["int4_vs_emulated_x"]
        == rows["int4"]["decode_tok_s"] / (rows["int4-emulated"]["decode_tok_s"])
    )


def test_predict_part_sets_predictions_beside_measurements_and_leaves_one_out(dry: dict):
    p = dry["parts"]["predict"]
    assert p["hardware"] == "nvidia-h100-sxm"  # the fake GPU's name, matched in the catalog
    assert [r["row"] for r in p["decode_rows"]] == ["fp16", "int8", "int4"]
    for r in p["decode_rows"]:
        assert r["method"].startswith("predicted") and r["predicted_tpot_s"] > 0
        assert r["tpot_rel_err"] == pytest.approx(r["predicted_tpot_s"] / r["measured_tpot_s"] - 1)
    grid = p["grid"]
    assert grid["n_points"] >= 8 and len(grid["points"]) == grid["n_points"]
    assert grid["loo_decode_latency_mape_pct"] is not None
    assert grid["loo_decode_energy_mape_pct"] is not None
    # measured, never estimated (a prefill window shorter than the counter's period is power x
    # time from the same sensor, "sampled", and a point is as direct as its least direct phase)
    assert all(pt["energy_method"] in ("counter", "sampled") for pt in grid["points"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path: Path) -> None:
    r = _run("--out", str(tmp_path / "x.json"), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--dry-run" in r.stderr
    r = _run("--dry-run", timeout=300)  # a dry run never writes into benchmarks/results
    assert r.returncode == 2 and "outside benchmarks/results" in r.stderr
    assert not (tmp_path / "x.json").exists()
