import json

import pytest

from joules.errors import ConfigError
from joules.measure.carbon import hardware_table
from joules.predict.catalog import (
    _normalise_limits,
    get_hardware,
    hardware_names,
    load_catalog,
    this_machine,
)

REQUIRED = {
    "h100": "nvidia-h100-sxm",
    "h200": "nvidia-h200",
    "a100": "nvidia-a100-sxm",
    "l4": "nvidia-l4",
    "rtx4090": "nvidia-rtx-4090",
    "m2": "apple-m2",
    "m3": "apple-m3",
    "orin": "nvidia-jetson-agx-orin",
    "x86-server": "amd-epyc-7763",
}


def test_the_issue_s_entries_are_catalogued_with_sources():
    for alias, hid in REQUIRED.items():
        s = get_hardware(alias)
        assert s.id == hid
        assert s.sources["performance"] and s.sources["power"]
        assert s.bandwidth_bps > 0 and s.memory_bytes > 0 and s.tdp_w > s.idle_w > 0
        assert s.peak_flops[s.default_dtype] > 0


def test_one_table_the_estimator_still_reads_it():
    ids = {d["id"] for d in hardware_table()["devices"]}
    assert set(load_catalog()) <= ids  # predict entries are hardware.json entries


def test_unknown_hardware_lists_valid_names():
    with pytest.raises(
        ConfigError, match=r"unknown hardware 'b200': pass one of this-machine, .*h100"
    ):
        get_hardware("b200")


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("tdp_w"), "tdp_w"),
        (lambda d: d["perf"].pop("source"), "source"),
        (lambda d: d["perf"]["peak_tflops"].update(fp7=1.0), "peak_tflops.fp7"),
        (lambda d: d["perf"].update(memory_bandwidth_gbs=-1), "memory_bandwidth_gbs"),
        (lambda d: d["perf"].update(default_dtype="int8"), "default_dtype"),
    ],
)
def test_malformed_user_entry_names_the_bad_key(tmp_path, mutate, key):
    entry = {
        "id": "my-npu",
        "kind": "gpu",
        "name": "My NPU",
        "tdp_w": 30.0,
        "idle_w": 3.0,
        "memory_gib": 16,
        "source": "vendor sheet",
        "aliases": ["npu"],
        "perf": {
            "peak_tflops": {"fp16": 40.0},
            "vector_tflops": 5.0,
            "memory_bandwidth_gbs": 120.0,
            "default_dtype": "fp16",
            "source": "vendor sheet p. 3",
        },
    }
    f = tmp_path / "cat.json"
    f.write_text(json.dumps({"devices": [entry]}))
    assert get_hardware("npu", (f,)).peak_flops["fp16"] == 40e12
    assert "npu" in hardware_names((f,))
    mutate(entry)
    f.write_text(json.dumps({"devices": [entry]}))
    with pytest.raises(ConfigError, match=f"my-npu.*{key}"):
        load_catalog((f,))


def test_probe_limits_are_read_defensively():
    raw = {
        "read_bandwidth_gbs": 12.5,
        "triad_bandwidth_gbs": 10.0,
        "matmul_flops": {"fp32": 6e10, "bf16": 3e10},
        "threads": 2,
    }
    lim = _normalise_limits(raw)
    assert lim["bandwidth_bps"] == 12.5e9 and lim["peak_flops"]["bf16"] == 3e10
    assert _normalise_limits({"something": 1}) is None


def test_this_machine_merges_a_probe_cache(tmp_path, monkeypatch):
    # a probe cache as `joules bench --probe` would leave it (test fixture, not a probe)
    monkeypatch.setenv("JOULES_CACHE_DIR", str(tmp_path))
    import joules.predict.catalog as cat

    monkeypatch.setattr(cat, "_probe_cache_files", lambda: [tmp_path / "probe.json"])
    (tmp_path / "probe.json").write_text(
        json.dumps({"read_bandwidth_bps": 11e9, "peak_flops": {"fp32": 7e10}, "threads": 2})
    )
    monkeypatch.setattr("joules.bench.probe.load_machine_limits", lambda: None)  # none measured
    m = this_machine()
    assert m.id == "this-machine" and m.bandwidth_bps == 11e9
    assert "probe" in m.sources["performance"]


def test_probe_cache_with_entries_per_cpu_and_threads(tmp_path, monkeypatch):
    import joules.predict.catalog as cat
    from joules.system import cpu_model

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    f = tmp_path / "machine_limits.json"
    rec = {
        "cpu_model": cpu_model(),
        "threads": 2,
        "read_bw_bytes_s": 9e9,
        "triad_bw_bytes_s": 8e9,
        "peak_flops": {"fp32": 5e10, "bf16": 2e10},
    }
    f.write_text(
        json.dumps(
            {
                "version": 1,
                "entries": {
                    "Other CPU|2": {**rec, "read_bw_bytes_s": 1.0},
                    f"{cpu_model()}|2": rec,
                },
            }
        )
    )
    monkeypatch.setattr(cat, "_probe_cache_files", lambda: [f])
    monkeypatch.setattr("joules.bench.probe.load_machine_limits", lambda: None)  # none measured
    lim = cat.machine_limits()
    assert lim["bandwidth_bps"] == 9e9 and lim["peak_flops"]["bf16"] == 2e10
