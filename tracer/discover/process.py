"""From a PID to the interpreter image inside it: path, load bias, build id and version.

Everything is read from /proc and from the ELF file as the process sees it (opened through
/proc/PID/root, so processes in other mount namespaces resolve to their own files).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from ..errors import NotPython, TargetGone, TraceError, Unsupported
from .elf import ElfImage, open_image

EVAL = "_PyEval_EvalFrameDefault"
_LIBPY = re.compile(r"libpython(\d+)\.(\d+)[a-z]*\.so")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str


@dataclass(frozen=True)
class Interpreter:
    """The CPython image a process runs, located in that process."""

    pid: int
    image_path: str  # path as the target sees it
    host_path: str  # path this tracer opens (through /proc/PID/root)
    bias: int  # runtime address = link-time address + bias
    build_id: str | None
    version: tuple[int, int, int]
    version_source: str
    has_symtab: bool
    has_dwarf: bool
    has_usdt: bool

    def runtime(self, vaddr: int) -> int:
        return vaddr + self.bias

    def to_dict(self) -> dict:
        return {
            "pid": self.pid, "image": self.image_path, "bias": hex(self.bias),
            "build_id": self.build_id, "version": ".".join(map(str, self.version)),
            "version_source": self.version_source, "symbols": ".symtab" if self.has_symtab else ".dynsym only",
            "dwarf": self.has_dwarf, "usdt_notes": self.has_usdt,
        }


def read_maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise TargetGone(f"no process with PID {pid}") from None
    except PermissionError:
        raise TraceError(f"cannot read /proc/{pid}/maps: permission denied") from None
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(Mapping(lo, hi, parts[1], int(parts[2], 16), int(parts[4]), parts[5]))
    return out


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, flags) from /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[6])


def is_alive(pid: int) -> bool:
    st = proc_state(pid)
    return st is not None and st[0] not in ("Z", "X")


def check_process(pid: int) -> None:
    """Refuse PIDs that are gone, zombies or kernel threads, with one line each."""
    st = proc_state(pid)
    if st is None:
        raise TargetGone(f"no process with PID {pid}")
    state, flags = st
    if state in ("Z", "X"):
        raise TargetGone(f"PID {pid} is a zombie (it has exited; nothing to trace)")
    if flags & 0x00200000:  # PF_KTHREAD
        raise NotPython(f"PID {pid} is a kernel thread, not a Python process")


def _bias(image: ElfImage, maps: list[Mapping]) -> int:
    if not image.is_pie_or_shared:
        return 0
    first = min(maps, key=lambda m: m.offset)
    for seg in image.elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_offset"] <= first.offset < seg["p_offset"] + seg["p_filesz"]:
            return first.start - (seg["p_vaddr"] + first.offset - seg["p_offset"])
    raise TraceError(f"{image.path}: mapping at offset {first.offset:#x} matches no PT_LOAD segment")


def read_version(image: ElfImage, name_hint: tuple[int, int] | None) -> tuple[tuple[int, int, int], str]:
    """Version from Py_Version (3.11+), else the PY_VERSION string; cross-checked with the name."""
    sym = image.symbol("Py_Version")
    if sym is not None:
        hexv = struct.unpack("<I", image.read(sym.value, 4))[0]
        version = ((hexv >> 24) & 0xFF, (hexv >> 16) & 0xFF, (hexv >> 8) & 0xFF)
        source = "Py_Version"
    else:
        # 3.9/3.10 export no Py_Version and fold PY_VERSION into code; the minor version
        # comes from the library name, the patch level from the build path recorded in
        # the image (e.g. ".../Python-3.10.13"), or stays 0 and is said to be unknown.
        if name_hint is None:
            raise Unsupported(f"{image.path}: no Py_Version symbol and no libpythonX.Y name")
        with open(image.path, "rb") as f:
            data = f.read()
        m = re.search(rb"(?:Python-|versions/)(%d\.%d\.(\d+))[/\x00]" % name_hint, data)
        if m:
            version = (*name_hint, int(m.group(2)))
            source = "library name + build path"
        else:
            version = (*name_hint, 0)
            source = "library name (patch level unknown)"
    if name_hint is not None and version[:2] != name_hint:
        raise Unsupported(f"{image.path}: file name says {name_hint[0]}.{name_hint[1]} "
                          f"but the image says {'.'.join(map(str, version))}")
    return version, source  # type: ignore[return-value]


def find_interpreter(pid: int) -> Interpreter:
    check_process(pid)
    maps = read_maps(pid)
    by_path: dict[str, list[Mapping]] = {}
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None
    except PermissionError:
        raise TraceError(f"cannot inspect PID {pid}: permission denied (run as root)") from None
    # libpython first (shared builds map it), then the executable (static builds).
    candidates = sorted(by_path, key=lambda p: (_LIBPY.search(os.path.basename(p)) is None, p != exe))
    for path in candidates:
        base = os.path.basename(path)
        m = _LIBPY.search(base)
        if m is None and path != exe and not base.startswith("python"):
            continue
        host = f"/proc/{pid}/root{path}"
        try:
            image = open_image(host)
        except (OSError, Exception) as e:  # noqa: BLE001 - any unreadable/non-ELF file is not it
            if isinstance(e, TraceError):
                raise
            continue
        if image.symbol(EVAL) is None:
            continue
        hint = (int(m.group(1)), int(m.group(2))) if m else None
        if hint is not None and not ((3, 9) <= hint <= (3, 13)):
            raise Unsupported(f"PID {pid} runs Python {hint[0]}.{hint[1]}; CPython 3.9-3.13 are supported")
        version, source = read_version(image, hint)
        if not ((3, 9) <= version[:2] <= (3, 13)):
            raise Unsupported(f"PID {pid} runs CPython {'.'.join(map(str, version))}; "
                              "3.9-3.13 are supported")
        return Interpreter(pid, path, host, _bias(image, by_path[path]), image.build_id(), version,
                           source, image.has_symtab, image.has_dwarf, image.has_usdt())
    # Python 2 and very old 3.x name the eval loop differently: say so rather than "not Python".
    for path in by_path:
        if re.search(r"(libpython|/python)(2|3\.[0-8](?!\d))", path):
            raise Unsupported(f"PID {pid} maps {path}, which is not a supported CPython (3.9-3.13)")
    raise NotPython(f"PID {pid} ({os.path.basename(exe)}) is not a Python process: "
                    "no CPython interpreter is mapped")
