from __future__ import annotations

import numpy as np
import onnx
import pytest

from qinject.backends import onnx_backend
from qinject.core.errors import QinjectError
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import conv_net, run


def test_save_with_external_data_is_checked_and_loadable(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    onnx_backend.save(load_onnx(conv_net()), out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    x = {"x": np.ones((1, 3, 8, 8), np.float32)}
    assert np.array_equal(run(str(out), x)[0], run(conv_net(), x)[0])


def test_refuses_missing_folder_and_input_path(tmp_path) -> None:
    model = load_onnx(conv_net())
    with pytest.raises(QinjectError, match="does not exist"):
        onnx_backend.save(model, tmp_path / "no" / "m.onnx")
    src = tmp_path / "in.onnx"
    onnx.save(conv_net(), str(src))
    with pytest.raises(QinjectError, match="is the input model"):
        onnx_backend.save(model, src, input_path=src)
    assert list(tmp_path.iterdir()) == [src]
