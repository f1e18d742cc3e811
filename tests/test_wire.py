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


# --------------------------------------------------------------------------- dtypes, shapes, nesting

DTYPES = ["?", "i1", "u1", "<i2", "<u2", "<i4", "<i8", ">i8", "<f2", "<f4", "<f8", ">f8", "<c8", "<c16",
          "<U5", "|S3", "<M8[s]", "<m8[ms]"]
SHAPES = [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 2, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_arrays_of_every_plain_dtype_and_shape_round_trip(dtype, shape):
    array = (np.arange(int(np.prod(shape)), dtype=np.int64) % 7).astype(dtype).reshape(shape)
    decoded = wire.loads(wire.dumps(array))
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_nested_structures_with_arrays_round_trip_exactly():
    value = {
        "batch": [
            {"vector": np.linspace(0, 1, 384, dtype=np.float32), "tokens": np.int64(7), "ids": (np.arange(3), "x")},
            {"mask": np.eye(3, dtype=bool), "nested": [[np.float16(0.5), (None, [b"raw", np.zeros((0, 2))])]]},
        ],
        "meta": ({"shape": (2, 3)}, [()]),
    }

    def same(a, b) -> bool:
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        if isinstance(a, np.generic):
            return type(a) is type(b) and a == b
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b

    assert same(value, wire.loads(wire.dumps(value)))


def test_decoded_arrays_own_their_memory():
    payload = wire.dumps(np.arange(4, dtype=np.int32))
    decoded = wire.loads(payload)
    decoded[0] = 99  # writable, and not a view into the payload
    assert wire.loads(payload)[0] == 0


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 1 + 2j, Exploit(), int, print, b"x".decode, range(3)])
def test_values_outside_plain_data_are_refused_when_encoding(value):
    with pytest.raises(wire.WireError, match="cannot encode"):
        wire.dumps(value)


@pytest.mark.parametrize("code", [0, 4, 5, 42, 127])
def test_extension_types_it_does_not_know_are_refused(code):
    import msgpack

    with pytest.raises(wire.WireError, match=f"unknown extension type {code}"):
        wire.loads(msgpack.packb(msgpack.ExtType(code, b"\x00" * 8)))


@pytest.mark.parametrize("payload", ["text", 42, None, [b"\x90"]])
def test_only_bytes_are_decoded(payload):
    with pytest.raises(wire.WireError, match="must be bytes"):
        wire.loads(payload)


@pytest.mark.parametrize(
    "header, body, says",
    [
        (["<f8", [10**12]], b"\x00" * 8, "malformed array"),  # claims 8 TB, holds 8 bytes: nothing allocated
        (["<f8", [2]], b"\x00" * 12, "malformed array"),  # not a whole number of items
        (["no such dtype", [1]], b"\x00" * 8, "unknown dtype"),
        (["<f8"], b"\x00" * 8, "malformed array header"),
        ([8, [1]], b"\x00" * 8, "malformed array header"),
        (["<f8", ["one"]], b"\x00" * 8, "malformed"),
    ],
)
def test_array_headers_that_lie_are_refused(header, body, says):
    import msgpack

    forged = msgpack.ExtType(wire.ARRAY, msgpack.packb(header) + body)
    with pytest.raises(wire.WireError, match=says):
        wire.loads(msgpack.packb(forged))


def test_truncated_payloads_are_refused():
    payload = wire.dumps({"vector": np.arange(100, dtype=np.float32), "text": "hello"})
    for cut in (1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(wire.WireError):
            wire.loads(payload[:cut])


def test_structured_arrays_are_refused_both_ways():
    array = np.zeros(2, dtype=[("x", "<i4"), ("y", "<f4")])
    with pytest.raises(wire.WireError, match="structured"):
        wire.dumps(array)
    import msgpack

    forged = msgpack.packb(msgpack.ExtType(wire.ARRAY, msgpack.packb(["|V8", [2]]) + bytes(16)))
    with pytest.raises(wire.WireError, match="structured"):
        wire.loads(forged)


def test_msgpack_timestamps_are_refused_wherever_they_are():
    import msgpack

    stamp = msgpack.Timestamp(1, 0)
    for value in (stamp, [1, stamp], {"when": stamp}, {"a": [{"b": stamp}]}):
        with pytest.raises(wire.WireError, match="timestamp"):
            wire.loads(msgpack.packb(value))
