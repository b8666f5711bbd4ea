"""`_Py_DebugOffsets` (CPython 3.13+), read statically from the interpreter's ELF file.

3.13 puts this struct at the very start of `_PyRuntime` and fills it with a static
initialiser, so its bytes sit in the file's initialised data: no live process is needed. The
member order below is CPython 3.13's (Include/internal/pycore_runtime.h): `char cookie[8]`
then only `uint64_t` members, grouped in sub-structs whose first member is their own size.
tests/test_layout.py checks this order member-by-member against the DWARF of the 3.13.0
build, so an edit here that drifts from the real header fails a test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from ..errors import Unsupported

COOKIE = b"xdebugpy"

# Per minor version: the uint64 members after the cookie, in declaration order, as
# "group.member" ("version" and "free_threaded" are top-level).
MEMBERS: dict[int, tuple[str, ...]] = {
    13: (
        "version", "free_threaded",
        "runtime_state.size", "runtime_state.finalizing", "runtime_state.interpreters_head",
        "interpreter_state.size", "interpreter_state.id", "interpreter_state.next",
        "interpreter_state.threads_head", "interpreter_state.gc", "interpreter_state.imports_modules",
        "interpreter_state.sysdict", "interpreter_state.builtins", "interpreter_state.ceval_gil",
        "interpreter_state.gil_runtime_state", "interpreter_state.gil_runtime_state_enabled",
        "interpreter_state.gil_runtime_state_locked", "interpreter_state.gil_runtime_state_holder",
        "thread_state.size", "thread_state.prev", "thread_state.next", "thread_state.interp",
        "thread_state.current_frame", "thread_state.thread_id", "thread_state.native_thread_id",
        "thread_state.datastack_chunk", "thread_state.status",
        "interpreter_frame.size", "interpreter_frame.previous", "interpreter_frame.executable",
        "interpreter_frame.instr_ptr", "interpreter_frame.localsplus", "interpreter_frame.owner",
        "code_object.size", "code_object.filename", "code_object.name", "code_object.qualname",
        "code_object.linetable", "code_object.firstlineno", "code_object.argcount",
        "code_object.localsplusnames", "code_object.localspluskinds", "code_object.co_code_adaptive",
        "pyobject.size", "pyobject.ob_type",
        "type_object.size", "type_object.tp_name", "type_object.tp_repr", "type_object.tp_flags",
        "tuple_object.size", "tuple_object.ob_item", "tuple_object.ob_size",
        "list_object.size", "list_object.ob_item", "list_object.ob_size",
        "dict_object.size", "dict_object.ma_keys", "dict_object.ma_values",
        "float_object.size", "float_object.ob_fval",
        "long_object.size", "long_object.lv_tag", "long_object.ob_digit",
        "bytes_object.size", "bytes_object.ob_size", "bytes_object.ob_sval",
        "unicode_object.size", "unicode_object.state", "unicode_object.length",
        "unicode_object.asciiobject_size",
        "gc.size", "gc.collecting",
    ),
}

# Layout field <- debug-offsets member, per minor version. Layout fields not named here come
# from DWARF or the version's table (see layout.layout_for).
TO_LAYOUT: dict[int, dict[str, str]] = {
    13: {
        "runtime_interpreters_head": "runtime_state.interpreters_head",
        "interp_next": "interpreter_state.next",
        "interp_threads_head": "interpreter_state.threads_head",
        "tstate_next": "thread_state.next",
        "tstate_interp": "thread_state.interp",
        "tstate_current_frame": "thread_state.current_frame",
        "tstate_thread_id": "thread_state.thread_id",
        "tstate_native_thread_id": "thread_state.native_thread_id",
        "frame_back": "interpreter_frame.previous",
        "frame_code": "interpreter_frame.executable",
        "frame_prev_instr": "interpreter_frame.instr_ptr",
        "frame_localsplus": "interpreter_frame.localsplus",
        "frame_owner": "interpreter_frame.owner",
        "code_filename": "code_object.filename",
        "code_name": "code_object.name",
        "code_qualname": "code_object.qualname",
        "code_linetable": "code_object.linetable",
        "code_firstlineno": "code_object.firstlineno",
        "code_argcount": "code_object.argcount",
        "code_localsplusnames": "code_object.localsplusnames",
        "code_code_adaptive": "code_object.co_code_adaptive",
        "object_type": "pyobject.ob_type",
        "type_name": "type_object.tp_name",
        "type_flags": "type_object.tp_flags",
        "tuple_items": "tuple_object.ob_item",
        "var_size": "tuple_object.ob_size",
        "list_items": "list_object.ob_item",
        "float_value": "float_object.ob_fval",
        "long_size_or_tag": "long_object.lv_tag",
        "long_digits": "long_object.ob_digit",
        "unicode_state": "unicode_object.state",
        "unicode_length": "unicode_object.length",
        "ascii_data": "unicode_object.asciiobject_size",
    },
}


@dataclass(frozen=True)
class DebugOffsets:
    version_hex: int  # PY_VERSION_HEX of the build, e.g. 0x030d00f0 for 3.13.0
    free_threaded: bool
    members: dict[str, int]  # "group.member" -> value, exactly as in the struct

    @property
    def version(self) -> tuple[int, int, int]:
        v = self.version_hex
        return (v >> 24) & 0xFF, (v >> 16) & 0xFF, (v >> 8) & 0xFF

    def layout_fields(self) -> dict[str, int]:
        minor = self.version[1]
        return {field: self.members[m] for field, m in TO_LAYOUT[minor].items()}

    def to_dict(self) -> dict:
        return {"version_hex": hex(self.version_hex), "free_threaded": self.free_threaded,
                "members": dict(self.members)}


def _symbol_value(elf: ELFFile, name: str) -> int | None:
    for secname in (".dynsym", ".symtab"):
        sec = elf.get_section_by_name(secname)
        if sec is None:
            continue
        syms = sec.get_symbol_by_name(name)
        if syms:
            return syms[0]["st_value"]
    return None


def _file_offset(elf: ELFFile, vaddr: int, size: int) -> int | None:
    """File offset of [vaddr, vaddr+size) if a PT_LOAD segment holds it as file bytes (not bss)."""
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        start = seg["p_vaddr"]
        if start <= vaddr and vaddr + size <= start + seg["p_filesz"]:
            return seg["p_offset"] + (vaddr - start)
    return None


def read_debug_offsets(elf_path: str) -> DebugOffsets:
    """Parse `_Py_DebugOffsets` from the file. Raises Unsupported with the reason it cannot."""
    with open(elf_path, "rb") as f:
        elf = ELFFile(f)
        addr = _symbol_value(elf, "_PyRuntime")
        if addr is None:
            raise Unsupported(f"{elf_path}: no _PyRuntime symbol, cannot read _Py_DebugOffsets")
        head_off = _file_offset(elf, addr, 16)
        if head_off is None:
            raise Unsupported(f"{elf_path}: _PyRuntime is not in initialised file data")
        f.seek(head_off)
        head = f.read(16)
        if head[:8] != COOKIE:
            raise Unsupported(f"{elf_path}: _PyRuntime does not start with the {COOKIE.decode()} cookie")
        version_hex = struct.unpack_from("<Q", head, 8)[0]
        minor = (version_hex >> 16) & 0xFF
        names = MEMBERS.get(minor)
        if names is None or (version_hex >> 24) != 3:
            raise Unsupported(f"{elf_path}: _Py_DebugOffsets of version {version_hex:#x} has no known layout")
        size = 8 + 8 * len(names)
        off = _file_offset(elf, addr, size)
        if off is None:
            raise Unsupported(f"{elf_path}: _Py_DebugOffsets runs past the initialised file data")
        f.seek(off + 8)
        raw = f.read(8 * len(names))
    values = struct.unpack(f"<{len(names)}Q", raw)
    members = dict(zip(names, values))
    return DebugOffsets(version_hex, bool(members["free_threaded"]), members)
