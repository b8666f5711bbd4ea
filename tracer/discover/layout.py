"""Struct layouts of one CPython build: the byte offsets a tracer reads through.

One source is chosen per build, in this order (py-spy style):
1. 3.13+: `_Py_DebugOffsets` read statically from the ELF file (debug_offsets.py); the few
   fields it does not publish come from DWARF when the file has it, else the 3.13 table.
2. DWARF (dwarf.py), when the image or its /usr/lib/debug/.build-id file carries .debug_info.
3. The built-in table of the minor version (tables.py), for stripped builds.
`verify_layout_live` then checks a layout against a live process before it is trusted.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..errors import PrivilegeError, TargetGone, Unsupported
from . import dwarf
from .debug_offsets import read_debug_offsets
from .tables import TABLES

SUPPORTED_MINORS = (9, 10, 11, 12, 13)

# _PyInterpreterFrame.owner value of the shim frames 3.12+ push on the C stack at each entry
# into the eval loop; on 3.13 their f_executable is None, so they carry no code object.
FRAME_OWNED_BY_CSTACK = 3


@dataclass(frozen=True)
class Layout:
    """Byte offsets (and sizes) inside one interpreter build's structs; -1: not in this version."""

    runtime_interpreters_head: int
    interp_next: int
    interp_threads_head: int
    tstate_next: int
    tstate_interp: int
    tstate_native_thread_id: int
    tstate_thread_id: int
    tstate_frame: int
    tstate_cframe: int
    cframe_current_frame: int
    tstate_current_frame: int
    tstate_curexc_type: int
    tstate_current_exception: int
    frame_code: int
    frame_back: int
    frame_localsplus: int
    frame_prev_instr: int
    frame_stacktop: int  # 3.9: f_stacktop (non-NULL while a generator is suspended)
    frame_state: int  # 3.10: f_state (FRAME_CREATED -2, FRAME_SUSPENDED -1, ...)
    frame_owner: int
    frame_is_entry: int
    code_qualname: int
    code_name: int
    code_filename: int
    code_firstlineno: int
    code_flags: int
    code_argcount: int
    code_kwonlyargcount: int
    code_nlocalsplus: int
    code_code_adaptive: int
    code_localsplusnames: int
    code_varnames: int
    code_code: int
    code_linetable: int
    object_type: int
    var_size: int
    type_name: int
    type_flags: int
    unicode_state: int
    unicode_length: int
    unicode_kind_shift: int
    unicode_compact_shift: int
    unicode_ascii_shift: int
    ascii_data: int
    compact_data: int
    long_digits: int
    long_size_or_tag: int
    float_value: int
    dict_used: int
    tuple_items: int
    list_items: int
    gen_frame: int
    source: str  # "debug_offsets" | "dwarf" | "table:3.N"
    version: tuple[int, int]
    # Where the fields _Py_DebugOffsets does not publish came from ("dwarf" | "table:3.N");
    # empty for the other sources, whose every field comes from `source`.
    supplement: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = f"{self.version[0]}.{self.version[1]}"
        return d


OFFSET_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(Layout) if f.name not in ("source", "version", "supplement"))


def _make(values: dict[str, int], source: str, minor: int, supplement: str = "") -> Layout:
    unknown = set(values) - set(OFFSET_FIELDS)
    if unknown:
        raise ValueError(f"not Layout fields: {sorted(unknown)}")
    return Layout(**{f: values.get(f, -1) for f in OFFSET_FIELDS},
                  source=source, version=(3, minor), supplement=supplement)


def _check_version(version: tuple[int, ...]) -> int:
    if version[0] != 3 or version[1] not in SUPPORTED_MINORS:
        shown = ".".join(map(str, version))
        raise Unsupported(f"CPython {shown} is not supported: struct layouts exist for 3.9-3.13 only")
    return version[1]


def layout_from_table(version: tuple[int, ...]) -> Layout:
    """The built-in table for this minor version (x86-64 release builds)."""
    minor = _check_version(version)
    return _make(TABLES[minor], f"table:3.{minor}", minor)


def _debug_file(elf_path: str, build_id: str | None) -> str | None:
    """The ELF that holds DWARF for this image: itself, or its separate build-id debug file."""
    if dwarf.has_dwarf(elf_path):
        return elf_path
    if build_id and len(build_id) > 2:
        cand = Path("/usr/lib/debug/.build-id") / build_id[:2] / f"{build_id[2:]}.debug"
        if cand.exists() and dwarf.has_dwarf(str(cand)):
            return str(cand)
    return None


def _dwarf_fields(debug_path: str, minor: int, build_id: str | None) -> dict[str, int]:
    try:
        return dwarf.extract_cached(debug_path, minor, build_id).fields
    except dwarf.DwarfError as e:
        raise Unsupported(f"{debug_path}: cannot read struct layouts from its DWARF: {e}") from None


def _check_machine(elf_path: str) -> None:
    with open(elf_path, "rb") as f:
        machine = ELFFile(f)["e_machine"]
    if machine != "EM_X86_64":
        raise Unsupported(f"{elf_path}: built-in layout tables are for x86-64, this image is {machine}")


def layout_for(elf_path: str, version: tuple[int, int, int], build_id: str | None) -> Layout:
    """The layout of the interpreter image at `elf_path` (the executable or libpython)."""
    minor = _check_version(version)
    debug_path = _debug_file(elf_path, build_id)
    if minor >= 13:
        offsets = read_debug_offsets(elf_path)
        if offsets.version[:2] != (3, minor):
            raise Unsupported(f"{elf_path}: _Py_DebugOffsets says {offsets.version}, expected 3.{minor}")
        if debug_path is not None:
            rest, supplement = _dwarf_fields(debug_path, minor, build_id), "dwarf"
        elif offsets.free_threaded:
            raise Unsupported(f"{elf_path}: free-threaded 3.{minor} build without DWARF: "
                              "no built-in table for its object layout")
        else:
            _check_machine(elf_path)
            rest, supplement = TABLES[minor], f"table:3.{minor}"
        return _make({**rest, **offsets.layout_fields()}, "debug_offsets", minor, supplement)
    if debug_path is not None:
        return _make(_dwarf_fields(debug_path, minor, build_id), "dwarf", minor)
    _check_machine(elf_path)
    return layout_from_table(version)


# ---------------------------------------------------------------------------------------------
# Live cross-check through /proc/PID/mem (read-only).

MAX_INTERPRETERS = 256
MAX_THREADS = 100_000
MAX_FRAMES = 4096
MAX_STR = 4096


@dataclass(frozen=True)
class LiveThread:
    """One thread state found by walking the interpreter's list."""

    interp: int  # PyInterpreterState address
    tstate: int  # PyThreadState address
    thread_id: int  # pthread_t
    native_thread_id: int  # kernel TID; -1 on 3.9/3.10 where the struct has none
    frames: tuple[str, ...]  # function names of the current Python stack, innermost first
    chain: tuple[tuple[int, int], ...] = ()  # (frame address, code address) of the same frames

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interp"], d["tstate"] = hex(self.interp), hex(self.tstate)
        d["frames"] = list(self.frames)
        d["chain"] = [[hex(f), hex(c)] for f, c in self.chain]
        return d


class _Mem:
    def __init__(self, pid: int) -> None:
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except FileNotFoundError:
            raise TargetGone(f"process {pid} does not exist") from None
        except PermissionError:
            raise PrivilegeError(f"cannot read /proc/{pid}/mem: run as root or with CAP_SYS_PTRACE") from None

    def close(self) -> None:
        os.close(self._fd)

    def read(self, addr: int, n: int) -> bytes:
        data = os.pread(self._fd, n, addr)
        if len(data) != n:
            raise OSError(f"short read at {addr:#x}")
        return data

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def i64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little", signed=True)

    def u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def u8(self, addr: int) -> int:
        return self.read(addr, 1)[0]

    def cstr(self, addr: int, limit: int = 256) -> str:
        raw = self.read(addr, limit) if limit else b""
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _type_name(mem: _Mem, lay: Layout, obj: int) -> str:
    return mem.cstr(mem.u64(mem.u64(obj + lay.object_type) + lay.type_name), 64)


def _read_str(mem: _Mem, lay: Layout, obj: int) -> str:
    state = mem.u32(obj + lay.unicode_state)
    length = mem.i64(obj + lay.unicode_length)
    if not 0 <= length <= MAX_STR:
        raise ValueError(f"str length {length} out of range")
    kind = (state >> lay.unicode_kind_shift) & 7
    if not (state >> lay.unicode_compact_shift) & 1:
        raise ValueError("str is not compact (legacy representation)")
    if (state >> lay.unicode_ascii_shift) & 1:
        return mem.read(obj + lay.ascii_data, length).decode("ascii")
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}.get(kind)
    if codec is None:
        raise ValueError(f"str kind {kind} is not 1, 2 or 4")
    return mem.read(obj + lay.compact_data, length * kind).decode(codec)


def _current_frame(mem: _Mem, lay: Layout, tstate: int) -> int:
    if lay.tstate_frame >= 0:
        return mem.u64(tstate + lay.tstate_frame)
    if lay.tstate_cframe >= 0:
        cframe = mem.u64(tstate + lay.tstate_cframe)
        return mem.u64(cframe + lay.cframe_current_frame) if cframe else 0
    return mem.u64(tstate + lay.tstate_current_frame)


def _frames(mem: _Mem, lay: Layout, tstate: int, problems: list[str]) -> tuple[tuple[str, ...], tuple]:
    names: list[str] = []
    chain: list[tuple[int, int]] = []
    frame = _current_frame(mem, lay, tstate)
    seen: set[int] = set()
    while frame and len(names) < MAX_FRAMES:
        if frame in seen:
            problems.append(f"tstate {tstate:#x}: frame chain loops at {frame:#x}")
            break
        seen.add(frame)
        if lay.frame_owner >= 0 and lay.version >= (3, 12) and \
                mem.u8(frame + lay.frame_owner) == FRAME_OWNED_BY_CSTACK:
            frame = mem.u64(frame + lay.frame_back)
            continue
        code = mem.u64(frame + lay.frame_code)
        tname = _type_name(mem, lay, code)
        if tname != "code":
            problems.append(f"tstate {tstate:#x}: frame {frame:#x} code slot holds a {tname!r}, not a code")
            break
        name_obj = mem.u64(code + lay.code_name)
        sname = _type_name(mem, lay, name_obj)
        if sname != "str":
            problems.append(f"tstate {tstate:#x}: co_name of code {code:#x} is a {sname!r}, not a str")
            break
        names.append(_read_str(mem, lay, name_obj))
        chain.append((frame, code))
        frame = mem.u64(frame + lay.frame_back)
    return tuple(names), tuple(chain)


def _walk(pid: int, lay: Layout, runtime_addr: int) -> tuple[list[LiveThread], list[str]]:
    problems: list[str] = []
    threads: list[LiveThread] = []
    mem = _Mem(pid)
    try:
        interp = mem.u64(runtime_addr + lay.runtime_interpreters_head)
        if interp == 0:
            problems.append("_PyRuntime.interpreters.head is NULL")
        interps = 0
        while interp and interps < MAX_INTERPRETERS:
            interps += 1
            tstate = mem.u64(interp + lay.interp_threads_head)
            seen: set[int] = set()
            while tstate and len(seen) < MAX_THREADS:
                if tstate in seen:
                    problems.append(f"interpreter {interp:#x}: thread list loops at {tstate:#x}")
                    break
                seen.add(tstate)
                back = mem.u64(tstate + lay.tstate_interp)
                if back != interp:
                    problems.append(f"tstate {tstate:#x}: interp is {back:#x}, expected {interp:#x}")
                native = mem.u64(tstate + lay.tstate_native_thread_id) \
                    if lay.tstate_native_thread_id >= 0 else -1
                try:
                    frames, chain = _frames(mem, lay, tstate, problems)
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    problems.append(f"tstate {tstate:#x}: unreadable frame chain: {e}")
                    frames, chain = (), ()
                threads.append(LiveThread(interp, tstate, mem.u64(tstate + lay.tstate_thread_id),
                                          native, frames, chain))
                tstate = mem.u64(tstate + lay.tstate_next)
            interp = mem.u64(interp + lay.interp_next)
    except OSError as e:
        problems.append(f"unreadable memory while walking interpreters: {e}")
    finally:
        mem.close()
    if not threads and not problems:
        problems.append("no thread states found")
    return threads, problems


def walk_threads_live(pid: int, layout: Layout, runtime_addr: int) -> list[LiveThread]:
    """Every thread state of every interpreter in `pid`, with its current Python stack."""
    return _walk(pid, layout, runtime_addr)[0]


def verify_layout_live(pid: int, layout: Layout, runtime_addr: int) -> list[str]:
    """Problems found walking `pid`'s interpreters and threads with `layout`; [] if none.

    Checks: the interpreter list is non-empty and acyclic; each thread state points back at
    its interpreter; on 3.11+ each native_thread_id is a TID in /proc/PID/task; every frame's
    code slot holds an object whose type is named "code" and whose co_name is a "str".
    `runtime_addr` is the absolute address of `_PyRuntime` in the process.
    """
    threads, problems = _walk(pid, layout, runtime_addr)
    if layout.tstate_native_thread_id >= 0:
        try:
            tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        except FileNotFoundError:
            raise TargetGone(f"process {pid} exited during the check") from None
        for t in threads:
            if t.native_thread_id not in tids:
                problems.append(f"tstate {t.tstate:#x}: native_thread_id {t.native_thread_id} "
                                f"is not a thread of {pid}")
    return problems
