"""Nothing read from a data folder runs code: object arrays go through a plain-data unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from test_precomp import make_split

from itmatch.data.precomp import PrecompSplit
from itmatch.errors import DataError
from itmatch.safe_pickle import load_npy, loads_plain


class _Payload:
    """Pickles as a call of os.system that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _payload_array(marker: Path) -> np.ndarray:
    array = np.empty(4, dtype=object)
    array[:] = [_Payload(marker)] + [{"image_w": 500, "image_h": 400}] * 3
    return array


@pytest.mark.parametrize("name,read", [("test_ims_size.npy", "image_sizes"), ("test_ims_bbx.npy", "boxes")])
def test_pickle_payload_in_a_data_folder_never_runs(tmp_path: Path, name: str, read: str) -> None:
    folder = make_split(tmp_path / "data")
    marker = tmp_path / "pwned"
    np.save(folder / name, _payload_array(marker), allow_pickle=True)
    with pytest.raises(DataError, match=rf"{name}: holds pickled data that is not plain data .*system") as caught:
        getattr(PrecompSplit(folder, "test"), read)
    assert not marker.exists()
    assert "\n" not in str(caught.value)


def test_official_size_files_still_load(tmp_path: Path) -> None:
    sizes = load_npy(SHARED / "data" / "f30k_test_text" / "test_ims_size.npy")
    assert sizes.dtype == object and sizes.shape == (1000,)
    assert set(sizes[0]) == {"image_w", "image_h"}
    split = PrecompSplit(make_split(tmp_path / "data"), "test")
    assert split.image_sizes.tolist()[0] == [500, 450]


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True], "b": ("x", b"y", {3}, frozenset({4}))},
        np.arange(6, dtype=np.int16).reshape(2, 3),
        np.array(["a", "bc"]),
        np.float32(1.5),
        np.array([{"image_w": np.int64(3)}], dtype=object),
    ],
)
def test_plain_data_round_trips(value) -> None:
    loaded = loads_plain(pickle.dumps(value, protocol=4))
    assert repr(loaded) == repr(value)


@pytest.mark.parametrize(
    "value",
    [
        np.ma.masked_array([1, 2]),  # an ndarray subclass
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),  # structured dtype
        np.datetime64("2020-01-01"),
        os.system,  # a function
        Path("x"),
    ],
)
def test_anything_else_is_refused(value) -> None:
    with pytest.raises(pickle.UnpicklingError):
        loads_plain(pickle.dumps(value, protocol=4))
