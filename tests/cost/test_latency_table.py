"""The latency-table format: round trips, validation errors, target lookup, roofline precision."""

from __future__ import annotations

import json

import pytest

from qinject.latency_table import (
    BUILTIN_DIR,
    Entry,
    LatencyTable,
    LatencyTableError,
    Roofline,
    builtin_targets,
    load_target,
)


def _table() -> LatencyTable:
    table = LatencyTable("toy", "measured", Roofline({"fp32": 1e11, "int8": 4e11}, 2e10, 3.0, "int16", "toy"),
                         "a toy target", "made up in a test")
    table.add(Entry("Conv", "1x3x8x8;8x3x3x3->1x8x8x8", 8, 8, 12.5))
    table.add(Entry("QuantizeLinear", "x192", 0, 8, 1.25))
    return table


def test_round_trip_is_exact(tmp_path):
    table = _table()
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.to_json() == table.to_json()
    assert again.lookup("Conv", "1x3x8x8;8x3x3x3->1x8x8x8", 8, 8) == 12.5
    assert again.lookup("Conv", "1x3x8x8;8x3x3x3->1x8x8x8", 4, 8) is None


def test_every_builtin_target_loads():
    names = builtin_targets()
    assert {"nvidia-a100", "nvidia-h100", "google-tpu-v5e"} <= set(names)
    for path in BUILTIN_DIR.glob("*.json"):
        table = LatencyTable.load(path)
        assert table.target == path.stem and table.source


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format="other"), "'format' is 'other'"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.update(kind="guessed"), "'kind' must be one of"),
    (lambda d: d.pop("roofline"), "roofline must be an object"),
    (lambda d: d["roofline"]["peak_ops_per_s"].update(fp8=1e12), r"unknown precision\(s\) \['fp8'\]"),
    (lambda d: d["roofline"].update(memory_bytes_per_s=-1), "'memory_bytes_per_s' must be a positive number"),
    (lambda d: d["entries"][0].update(weight_bits=3), "'weight_bits' must be 0, 4, 8, 16 or 32"),
    (lambda d: d["entries"][0].update(latency_us="fast"), "'latency_us' must be a positive number"),
    (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
])
def test_malformed_tables_give_one_clear_error(tmp_path, mutate, message):
    data = _table().to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match=message) as info:
        LatencyTable.load(path)
    assert "\n" not in str(info.value)


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(LatencyTableError, match="cannot read latency table"):
        LatencyTable.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{\"format\": ")
    with pytest.raises(LatencyTableError, match="is not valid JSON"):
        LatencyTable.load(tmp_path / "broken.json")


def test_targets_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.setenv("QINJECT_TARGETS", str(tmp_path / "cache"))
    assert load_target("nvidia-a100").target == "nvidia-a100"
    path = _table().save(tmp_path / "mine.json")
    assert load_target(str(path)).target == "toy"
    with pytest.raises(LatencyTableError, match="unknown target 'nope'"):
        load_target("nope")
    (tmp_path / "cache").mkdir()
    _table().save(tmp_path / "cache" / "toy.json")
    assert load_target("toy").kind == "measured" and "toy" in builtin_targets()


def test_roofline_precision_and_fallbacks():
    gpu = Roofline({"fp32": 1.0, "fp16": 2.0, "int8": 4.0}, 1.0)
    assert gpu.precision(32, 32) == "fp32"
    assert gpu.precision(16, 16) == "fp16"
    assert gpu.precision(8, 8) == "int8" and gpu.precision(4, 8) == "int8"
    assert gpu.precision(4, 4) == "int8"  # no int4 units: the next wider precision
    tpu = Roofline({"fp16": 2.0, "int8": 4.0}, 1.0)
    assert tpu.precision(32, 32) == "fp16"  # no fp32 units at all
    assert Roofline({"int8": 1.0}, 1.0, sixteen_bit="int16").precision(16, 16) == "int8"


def test_roofline_is_compute_or_memory_bound_plus_overhead():
    r = Roofline({"fp32": 2e12}, 1e9, op_overhead_us=5.0)
    assert r.node_us(10**9, 0.0, "fp32") == pytest.approx(1000.0 + 5.0)  # 2 GFLOP at 2 TFLOP/s
    assert r.node_us(1, 1e6, "fp32") == pytest.approx(1000.0 + 5.0)  # 1 MB at 1 GB/s
