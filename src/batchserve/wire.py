"""The bytes that cross the network: msgpack, with numpy arrays and tuples supported.

Never pickle: a payload is only ever decoded by msgpack, so bytes from the network can
build nothing but plain data (None, bools, numbers, strings, bytes, lists, dicts) plus
the extension types below.  Anything else refuses to encode, and anything malformed
refuses to decode with :class:`WireError`.

Extension types:

* ``1`` numpy array: ``msgpack([dtype.str, shape]) + raw bytes`` (object and structured arrays refused)
* ``2`` numpy scalar: as a 0-d array
* ``3`` tuple: the msgpack of its items (msgpack turns tuples into lists otherwise)
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

ARRAY, SCALAR, TUPLE = 1, 2, 3


class WireError(ValueError):
    """A value cannot be encoded, or bytes are not a valid payload."""


def dumps(value: Any) -> bytes:
    """Encode ``value`` (plain data, numpy arrays and scalars, tuples) to bytes."""
    try:
        return msgpack.packb(value, default=_encode_extension, strict_types=True, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError(f"cannot encode {type(value).__name__}: {error}") from None


def loads(payload: bytes) -> Any:
    """Decode bytes made by :func:`dumps`; raise :class:`WireError` on anything else."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"payload must be bytes, not {type(payload).__name__}")
    try:
        value = msgpack.unpackb(
            payload,
            ext_hook=_decode_extension,
            list_hook=_plain_list,
            object_hook=_plain_map,
            raw=False,
            strict_map_key=False,
        )
    except WireError:
        raise
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise WireError(f"malformed payload: {type(error).__name__}: {error}") from None
    _refuse_timestamp(value)
    return value


def _refuse_timestamp(value: Any) -> None:
    """msgpack decodes its own timestamp extension (-1) by itself: refuse it like any other."""
    if isinstance(value, msgpack.Timestamp):
        raise WireError("unknown extension type -1 (msgpack timestamp)")


def _plain_list(items: list) -> list:
    for item in items:
        _refuse_timestamp(item)
    return items


def _plain_map(mapping: dict) -> dict:
    for key, item in mapping.items():
        _refuse_timestamp(key)
        _refuse_timestamp(item)
    return mapping


# --------------------------------------------------------------------------- encode


def _encode_extension(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return msgpack.ExtType(ARRAY, _array_bytes(value))
    if isinstance(value, np.generic):
        return msgpack.ExtType(SCALAR, _array_bytes(np.asarray(value)))
    if isinstance(value, tuple):
        return msgpack.ExtType(TUPLE, dumps(list(value)))
    # strict_types sends subclasses of plain types here too: encode them as the base type
    for plain in (dict, list, str, bytes, int, float):
        if isinstance(value, plain):
            return plain(value)
    raise TypeError(f"{type(value).__name__} is not plain data or a numpy array")


def _array_bytes(array: np.ndarray) -> bytes:
    if array.dtype.hasobject:
        raise TypeError("numpy arrays of Python objects cannot cross the network")
    if array.dtype.kind == "V":
        raise TypeError("structured (record) numpy arrays cannot cross the network: send one array per field")
    header = msgpack.packb([array.dtype.str, list(array.shape)])
    return header + array.tobytes(order="C")


# --------------------------------------------------------------------------- decode


def _decode_extension(code: int, data: bytes) -> Any:
    if code == TUPLE:
        return tuple(loads(data))
    if code in (ARRAY, SCALAR):
        array = _array_from_bytes(data)
        return array[()] if code == SCALAR else array
    raise WireError(f"unknown extension type {code}")


def _array_from_bytes(data: bytes) -> np.ndarray:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        dtype_name, shape = unpacker.unpack()
    except Exception:
        raise WireError("malformed array header") from None
    if not isinstance(dtype_name, str) or not isinstance(shape, list):
        raise WireError("malformed array header")
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        raise WireError(f"unknown dtype {dtype_name!r}") from None
    if dtype.hasobject:
        raise WireError("arrays of Python objects are refused")
    if dtype.kind == "V":
        raise WireError("structured (record) arrays are refused")
    body = memoryview(data)[unpacker.tell():]
    try:
        return np.frombuffer(body, dtype=dtype).reshape(shape).copy()
    except ValueError as error:
        raise WireError(f"malformed array: {error}") from None
