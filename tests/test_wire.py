"""The wire format: msgpack with numpy arrays and tuples; nothing is ever unpickled."""

from __future__ import annotations

import collections
import pickle

import numpy as np
import pytest

from batchserve import wire


def test_plain_data_numpy_and_tuples_round_trip():
    value = {
        "text": "héllo",
        "raw": b"\x00\x01",
        "numbers": [1, -2, 3.5, None, True],
        "pair": (np.arange(6, dtype=np.float32).reshape(2, 3), 7),
        "scalars": [np.int64(5), np.float32(2.5), np.bool_(True)],
        1: "int key",
    }
    decoded = wire.loads(wire.dumps(value))
    assert decoded.keys() == value.keys()
    assert isinstance(decoded["pair"], tuple)
    np.testing.assert_array_equal(decoded["pair"][0], value["pair"][0])
    assert decoded["pair"][0].dtype == np.float32 and decoded["pair"][0].flags.writeable
    assert [type(x) for x in decoded["scalars"]] == [np.int64, np.float32, np.bool_]
    assert decoded["numbers"] == value["numbers"] and decoded["raw"] == b"\x00\x01"


def test_non_contiguous_and_zero_dimensional_arrays():
    array = np.arange(12, dtype=np.int16).reshape(3, 4).T
    np.testing.assert_array_equal(wire.loads(wire.dumps(array)), array)
    scalar_array = np.array(3.0)
    assert wire.loads(wire.dumps(scalar_array)).shape == ()


def test_subclasses_of_plain_types_encode_as_the_plain_type():
    ordered = collections.OrderedDict(b=1, a=2)
    assert wire.loads(wire.dumps([ordered])) == [{"b": 1, "a": 2}]


@pytest.mark.parametrize("value", [object(), {1, 2}, np.array([object()], dtype=object)])
def test_values_that_would_need_pickle_are_refused(value):
    with pytest.raises(wire.WireError):
        wire.dumps(value)


class Exploit:
    """Unpickling this would call print(): a stand-in for running any code."""

    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Exploit()),
        pickle.dumps([1, 2, 3], protocol=0),
        b"",
        b"\xc1",  # never used in msgpack
        b"\xc7\x03\x09abc",  # unknown extension type
        b"\xc7\x03\x01abc",  # array with a broken header
    ],
)
def test_malformed_payloads_raise_wire_error(payload, capsys):
    with pytest.raises(wire.WireError):
        wire.loads(payload)
    assert "unpickled" not in capsys.readouterr().out


def test_object_dtype_in_an_array_header_is_refused():
    import msgpack

    forged = msgpack.ExtType(wire.ARRAY, msgpack.packb(["|O", [1]]) + b"\x00" * 8)
    with pytest.raises(wire.WireError):
        wire.loads(msgpack.packb(forged))
