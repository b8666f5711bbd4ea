"""Decode argument values the kernel side copied out of the target (raw object bytes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..discover.elf import ElfImage
from ..discover.layout import Layout
from ..spec import STR_LIMIT

_TYPES = ("PyLong_Type", "PyBool_Type", "PyFloat_Type", "PyUnicode_Type", "PyList_Type",
          "PyTuple_Type", "PyDict_Type")
_UNREADABLE = object()


@dataclass(frozen=True)
class TypeAddrs:
    """Runtime addresses of the builtin types and singletons, for this process."""

    by_addr: dict[int, str]
    none: int
    true: int
    false: int

    @classmethod
    def of(cls, image: ElfImage, bias: int) -> TypeAddrs:
        by_addr = {}
        for name in _TYPES:
            s = image.symbol(name)
            if s is not None:
                by_addr[s.value + bias] = name
        def addr(n: str) -> int:
            s = image.symbol(n)
            return s.value + bias if s else -1
        return cls(by_addr, addr("_Py_NoneStruct"), addr("_Py_TrueStruct"), addr("_Py_FalseStruct"))


def decode(obj: int, typ: int, head: bytes, data: bytes, types: TypeAddrs, layout: Layout,
           length: bool) -> object:
    """The Python value (or its len()) of one captured argument; _UNREADABLE if unsupported.
    `typ` carries, in bits 56+, how many bytes of `head` the kernel could read (bpf/capture.c);
    a value that needs more is unreadable, never decoded from the zeros."""
    got, typ = typ >> 56, typ & ((1 << 56) - 1)
    head = head[:got]
    try:
        return _decode(obj, typ, head, data, types, layout, length)
    except struct.error:  # fewer bytes than the value needs
        return _UNREADABLE


def _decode(obj: int, typ: int, head: bytes, data: bytes, types: TypeAddrs, layout: Layout,
            length: bool) -> object:
    if obj == 0:
        return _UNREADABLE
    if obj == types.none:
        return None
    kind = types.by_addr.get(typ)
    size = struct.unpack_from("<q", head, layout.var_size - 16)[0] if layout.var_size >= 16 else 0
    if length:
        if kind in ("PyList_Type", "PyTuple_Type"):
            return size
        if kind == "PyDict_Type":
            return struct.unpack_from("<q", head, layout.dict_used - 16)[0]
        if kind == "PyUnicode_Type":
            return struct.unpack_from("<q", head, layout.unicode_length - 16)[0]
        return _UNREADABLE
    if kind == "PyBool_Type" or obj in (types.true, types.false):
        return obj == types.true
    if kind == "PyFloat_Type":
        return struct.unpack_from("<d", head, layout.float_value - 16)[0]
    if kind == "PyLong_Type":
        return _long(head, layout)
    if kind == "PyUnicode_Type":
        n = struct.unpack_from("<q", head, layout.unicode_length - 16)[0]
        state = struct.unpack_from("<I", head, layout.unicode_state - 16)[0]
        if not (state >> layout.unicode_ascii_shift) & 1 or not (state >> layout.unicode_compact_shift) & 1:
            return f"<non-ASCII str, {n} chars>"
        return data[: min(n, STR_LIMIT)].decode("ascii", errors="replace")
    return _UNREADABLE


def _long(head: bytes, layout: Layout) -> object:
    tag = struct.unpack_from("<q", head, layout.long_size_or_tag - 16)[0]
    if layout.version >= (3, 12):
        ndigits, sign = tag >> 3, 1 - (tag & 3)
    else:
        ndigits, sign = abs(tag), (1 if tag > 0 else -1 if tag < 0 else 0)
    room = (len(head) - (layout.long_digits - 16)) // 4
    if ndigits > room:
        return _UNREADABLE  # wider than the bytes copied: say so rather than truncate
    value = 0
    for i in range(ndigits):
        d = struct.unpack_from("<I", head, layout.long_digits - 16 + 4 * i)[0]
        value |= (d & 0x3FFFFFFF) << (30 * i)
    return sign * value


UNREADABLE = _UNREADABLE
