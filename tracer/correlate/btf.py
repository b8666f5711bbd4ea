"""Struct member offsets of the running kernel, from its BTF (/sys/kernel/btf/vmlinux).

The scheduler programs read a few fields of `struct task_struct` (pid, tgid,
se.sum_exec_runtime and sched_info.last_arrival). The kernel headers bcc compiles with are Debian's, not the running
kernel's, so those offsets come from the kernel's own type information and reach the BPF
program as -D macros. Only the parts of the BTF format needed to walk struct members are
decoded (kernel documentation: "BPF Type Format").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import TraceError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# Kinds (BTF_KIND_*) and the bytes each one carries after the 12-byte common header.
K_INT, K_PTR, K_ARRAY, K_STRUCT, K_UNION, K_ENUM, K_FWD, K_TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
K_VOLATILE, K_CONST, K_RESTRICT, K_FUNC, K_FUNC_PROTO, K_VAR, K_DATASEC = 9, 10, 11, 12, 13, 14, 15
K_FLOAT, K_DECL_TAG, K_TYPE_TAG, K_ENUM64 = 16, 17, 18, 19
_FIXED_EXTRA = {K_INT: 4, K_ARRAY: 12, K_VAR: 4, K_DECL_TAG: 4}
_PER_MEMBER = {K_STRUCT: 12, K_UNION: 12, K_ENUM: 8, K_FUNC_PROTO: 8, K_DATASEC: 12, K_ENUM64: 12}
_QUALIFIERS = (K_TYPEDEF, K_VOLATILE, K_CONST, K_RESTRICT, K_TYPE_TAG)


class BtfError(TraceError):
    pass


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int
    members: Tuple[Member, ...] = ()


class Btf:
    """The types of one BTF blob, by id (id 0 is void). Records are decoded when asked for:
    vmlinux holds ~150,000 types and only a handful are needed."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._types = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._pos: List[int] = [-1]  # record start of each type id
        self._structs: Dict[int, int] = {}  # name_off -> first struct id with that name
        unpack, types, n = struct.Struct("<II").unpack_from, self._types, len(self._types)
        pos = 0
        while pos < n:
            name_off, info = unpack(types, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self._pos.append(pos)
            if kind == K_STRUCT and name_off:
                self._structs.setdefault(name_off, len(self._pos) - 1)
            pos += 12 + (_PER_MEMBER[kind] * vlen if kind in _PER_MEMBER else _FIXED_EXTRA.get(kind, 0))
        self._cache: Dict[int, BtfType] = {}

    def type(self, type_id: int) -> Optional[BtfType]:
        if type_id == 0:
            return None
        t = self._cache.get(type_id)
        if t is None:
            pos = self._pos[type_id]
            name_off, info, size_or_type = struct.unpack_from("<III", self._types, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            members: Tuple[Member, ...] = ()
            if kind in (K_STRUCT, K_UNION):
                ms = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", self._types, pos + 12 + 12 * i)
                    bit_off, bits = (m_off & 0xFFFFFF, m_off >> 24) if kflag else (m_off, 0)
                    ms.append(Member(self._str(m_name), m_type, bit_off, bits))
                members = tuple(ms)
            t = BtfType(kind, self._str(name_off), size_or_type, members)
            self._cache[type_id] = t
        return t

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def __len__(self) -> int:
        return len(self._pos)  # type ids, void included

    def struct(self, name: str) -> int:
        want = name.encode() + b"\0"
        for name_off, tid in self._structs.items():
            if self._strings.startswith(want, name_off):
                return tid
        raise BtfError(f"kernel BTF has no struct {name}")

    def resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers."""
        t = self.type(type_id)
        while t is not None and t.kind in _QUALIFIERS:
            type_id = t.size_or_type
            t = self.type(type_id)
        return type_id

    def size(self, type_id: int) -> int:
        t = self.type(self.resolve(type_id))
        if t is None or t.kind not in (K_INT, K_STRUCT, K_UNION, K_ENUM, K_ENUM64, K_FLOAT):
            raise BtfError(f"BTF type {type_id} has no plain size")
        return t.size_or_type

    def offset(self, struct_name: str, path: str) -> Tuple[int, int]:
        """(byte offset, size) of `path` ("se.sum_exec_runtime") inside struct `struct_name`.

        Members of anonymous unions/structs are found through them, as C does.
        """
        type_id, total_bits = self.struct(struct_name), 0
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BtfError(f"kernel BTF: struct {struct_name} has no member {path}")
            bits, member = found
            if member.bitfield_size or bits % 8:
                raise BtfError(f"kernel BTF: {struct_name}.{path} is a bitfield")
            total_bits += bits
            type_id = self.resolve(member.type_id)
        return total_bits // 8, self.size(type_id)

    def _find(self, type_id: int, name: str) -> Optional[Tuple[int, Member]]:
        t = self.type(self.resolve(type_id))
        if t is None or t.kind not in (K_STRUCT, K_UNION):
            return None
        for m in t.members:
            if m.name == name:
                return m.bit_offset, m
            if not m.name:  # anonymous union or struct: look inside
                inner = self._find(m.type_id, name)
                if inner is not None:
                    return m.bit_offset + inner[0], inner[1]
        return None


@dataclass(frozen=True)
class TaskOffsets:
    """Where the scheduler programs find their task_struct fields."""

    pid: int
    tgid: int
    sum_exec_runtime: int
    last_arrival: Optional[int] = None  # sched_info.last_arrival; absent without CONFIG_SCHED_INFO
    fsbase: Optional[int] = None  # thread.fsbase (x86-64): the thread pointer, = pthread_self()

    def cflags(self) -> List[str]:
        flags = [f"-DTASK_PID_OFF={self.pid}", f"-DTASK_TGID_OFF={self.tgid}",
                 f"-DTASK_SUM_EXEC_OFF={self.sum_exec_runtime}"]
        if self.last_arrival is not None:
            flags.append(f"-DTASK_ARRIVAL_OFF={self.last_arrival}")
        if self.fsbase is not None:
            flags.append(f"-DTASK_FSBASE_OFF={self.fsbase}")
        return flags

    def to_dict(self) -> dict:
        return {"pid": self.pid, "tgid": self.tgid, "sum_exec_runtime": self.sum_exec_runtime,
                "last_arrival": self.last_arrival, "fsbase": self.fsbase}


def task_offsets_from(btf: Btf) -> TaskOffsets:
    pid, pid_size = btf.offset("task_struct", "pid")
    tgid, tgid_size = btf.offset("task_struct", "tgid")
    sum_exec, sum_size = btf.offset("task_struct", "se.sum_exec_runtime")
    if (pid_size, tgid_size, sum_size) != (4, 4, 8):
        raise BtfError(f"unexpected task_struct field sizes: pid {pid_size}, tgid {tgid_size}, "
                       f"se.sum_exec_runtime {sum_size}")
    if tgid != pid + 4:
        # The BPF side reads both with one 8-byte load.
        raise BtfError(f"task_struct.tgid ({tgid}) does not follow task_struct.pid ({pid})")
    try:
        arrival, arrival_size = btf.offset("task_struct", "sched_info.last_arrival")
    except BtfError:
        arrival, arrival_size = None, 8
    try:
        fsbase, fsbase_size = btf.offset("task_struct", "thread.fsbase")
    except BtfError:  # not x86-64
        fsbase, fsbase_size = None, 8
    return TaskOffsets(pid, tgid, sum_exec, arrival if arrival_size == 8 else None,
                       fsbase if fsbase_size == 8 else None)


@lru_cache(maxsize=1)
def task_offsets(path: Path = VMLINUX_BTF) -> TaskOffsets:
    """The running kernel's task_struct offsets; a TraceError if it publishes no BTF."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BtfError(f"scheduler correlation needs the kernel's BTF ({path}: {e.strerror}); "
                       f"use a kernel built with CONFIG_DEBUG_INFO_BTF=y") from None
    return task_offsets_from(Btf(data))
