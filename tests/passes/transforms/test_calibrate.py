from __future__ import annotations

import numpy as np
import pytest
from qinject.passes import Calibrate

from qinject.core import ir as qir
from qinject.core.calib_data import QinjectWarning
from qinject.core.errors import CalibrationDataError
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import conv_net, run


def _calibrated(data, **kw):
    model = load_onnx(conv_net())
    Calibrate(data, progress=False, **kw)(model)
    return model, {v.name: v.meta[qir.ACT_STATS] for n in model.graph for v in [*n.inputs, *n.outputs]
                   if v is not None and qir.ACT_STATS in v.meta}


def test_stats_match_a_full_run(rng) -> None:
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    _, stats = _calibrated({"x": x}, batch_size=7)
    assert set(stats) == {"x", "r1", "p1", "r2", "f"}
    # The input of the first conv: exact min/max over all samples, streamed in batches of 7.
    assert stats["x"].minimum == x.min() and stats["x"].maximum == x.max() and stats["x"].count == x.size


def test_npz_folder_iterable_and_reader_agree(tmp_path, rng) -> None:
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "a.npy", x[:5])
    np.savez(folder / "b.npz", x=x[5:])

    class Reader:  # onnxruntime's CalibrationDataReader interface
        def __init__(self) -> None:
            self.items = iter([{"x": x[i:i + 4]} for i in range(0, 12, 4)])

        def get_next(self):
            return next(self.items, None)

    sources = [tmp_path / "calib.npz", folder, [{"x": x[i:i + 3]} for i in range(0, 12, 3)], Reader()]
    results = [_calibrated(s)[1]["r2"] for s in sources]
    for r in results[1:]:
        assert (r.minimum, r.maximum, r.count) == (results[0].minimum, results[0].maximum, results[0].count)


def test_random_inputs_warn() -> None:
    with pytest.warns(QinjectWarning, match="random inputs"):
        _, stats = _calibrated(None)
    assert stats["x"].count > 0


def test_histograms_only_when_needed(rng) -> None:
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    assert not _calibrated({"x": x})[1]["x"].with_histogram
    assert _calibrated({"x": x}, method="entropy")[1]["x"].counts.sum() == x.size


@pytest.mark.parametrize("data,message", [
    ({"y": np.zeros((2, 3, 8, 8), np.float32)}, "lacks model input"),
    ({"x": np.zeros((2, 3, 9, 8), np.float32)}, "axis 2: 9 != 8"),
    ({"x": np.zeros((2, 3, 8), np.float32)}, "expects rank 4"),
    ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "empty"),
    ({"x": np.full((2, 3, 8, 8), np.nan, np.float32)}, "NaN"),
    ({"x": np.zeros((2, 3, 8, 8), np.int32)}, "dtype int32"),
    ([], "yielded no calibration batches"),
    (42, "cannot use a int"),
])
def test_bad_calibration_data(data, message) -> None:
    with pytest.raises(CalibrationDataError, match=message):
        _calibrated(data)


def test_missing_and_unreadable_files(tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="does not exist"):
        _calibrated(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CalibrationDataError, match="cannot read"):
        _calibrated(tmp_path / "bad.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="no .npy or .npz"):
        _calibrated(tmp_path / "empty")


def test_analysis_does_not_change_the_model(rng) -> None:
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    model, _ = _calibrated({"x": x})
    from qinject.backends.onnx_backend import to_proto

    assert np.array_equal(run(to_proto(model), {"x": x})[0], run(conv_net(), {"x": x})[0])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_is_streamed_not_loaded(tmp_path, rng, save) -> None:
    import tracemalloc

    x = rng.standard_normal((20_000, 3, 8, 8)).astype(np.float32)  # 15 MB; a batch of 16 is 12 KB
    save(tmp_path / "big.npz", x=x)
    expected_max = float(x.max())
    del x
    tracemalloc.start()
    _, stats = _calibrated(tmp_path / "big.npz", batch_size=16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stats["x"].count == 20_000 * 3 * 8 * 8 and stats["x"].maximum == expected_max
    assert peak < 4e6, f"peak traced memory {peak / 1e6:.1f} MB: the file was not streamed"
