"""An independent check of a probe plan, run right before its uprobes are attached.

A uprobe that does not sit on the first byte of an instruction corrupts the target: the
kernel writes int3 over the middle of an instruction. `plan_for` proves its own sites; this
module proves them again from the ELF file alone, with its own decoder loop, so that a bug in
the planner (or a plan built by hand) cannot reach the kernel. For each site:

1. a proven start: the sized function symbol (.symtab or .dynsym) that contains the site, or,
   where no symbol covers it (a stripped build), the dispatch-table entry equal to the site
   (compilers emit table entries only at labels) or the target of a direct call decoded from
   a function that holds another site (a call lands on a function's first byte);
2. a linear decode from that start lands exactly on the site's address;
3. the bytes there decode to the instruction the plan names;
4. when a live process is given, its memory (read-only) holds the file's bytes at the site,
   so the image on disk is the one it runs. A first byte of int3 is accepted: it is the
   breakpoint another uprobe (a second tracer) already placed on this very instruction.
"""

from __future__ import annotations

import bisect
import os
import struct
from functools import lru_cache

import capstone

from ..errors import TargetGone, TraceError
from .probes import ProbePlan, ProbeSite, find_opcode_table

INT3 = 0xCC
STT_FUNC = 2
MAX_INSN = 15
_MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


class ProbeRefused(TraceError):
    """A planned probe site failed verification: nothing is attached."""


@lru_cache(maxsize=8)
def _functions(path: str, _ino: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted (starts, ends) of every sized STT_FUNC symbol of an ELF file (.symtab, .dynsym),
    unpacked straight from the tables: pyelftools takes seconds per libpython."""
    from elftools.elf.elffile import ELFFile  # noqa: PLC0415

    spans: set[tuple[int, int]] = set()
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(secname)
            if sec is None or sec["sh_entsize"] != 24:
                continue
            f.seek(sec["sh_offset"])
            raw = f.read(sec["sh_size"] - sec["sh_size"] % 24)
            for _name, info, _other, shndx, value, size in struct.iter_unpack("<IBBHQQ", raw):
                if info & 0xF == STT_FUNC and size and value and shndx:
                    spans.add((value, value + size))
    ordered = sorted(spans)
    return tuple(a for a, _ in ordered), tuple(b for _, b in ordered)


def _enclosing_function(image, vaddr: int) -> tuple[int, int] | None:
    starts, ends = _functions(image.path, os.stat(image.path).st_ino)
    # Nested or aliased symbols: take the innermost (latest-starting) one that covers vaddr.
    k = bisect.bisect_right(starts, vaddr)
    while k > 0:
        k -= 1
        if starts[k] <= vaddr < ends[k]:
            return starts[k], ends[k]
        if vaddr - starts[k] > 1 << 20:
            break
    return None


def _lands_on(image, start: int, vaddr: int) -> bool:
    """Decoding linearly from `start` reaches an instruction beginning exactly at `vaddr`."""
    code = image.read(start, vaddr - start + MAX_INSN)
    for address, size, _mnemonic, _ops in _MD.disasm_lite(code, start):
        if address == vaddr:
            return True
        if address + size > vaddr:
            return False  # the site falls inside this instruction
    return False  # undecodable bytes before the site


def _decode_one(data: bytes, vaddr: int) -> tuple[str, int] | None:
    for _address, size, mnemonic, ops in _MD.disasm_lite(data, vaddr, 1):
        return f"{mnemonic} {ops}".strip(), size
    return None


def _call_targets(image, fn: tuple[int, int]) -> set[int]:
    """Targets of the direct calls in a function, decoded linearly from its symbol."""
    out = set()
    for _address, _size, mnemonic, ops in _MD.disasm_lite(image.read(fn[0], fn[1] - fn[0]), fn[0]):
        if mnemonic == "call" and ops.startswith("0x"):
            out.add(int(ops, 16))
    return out


def _proven_start(image, site: ProbeSite, table: list[int] | None, callers: list[tuple[int, int]]) -> tuple[int, str]:
    fn = _enclosing_function(image, site.vaddr)
    if fn is not None:
        return fn[0], f"function symbol at {fn[0]:#x}"
    if table is not None and site.vaddr in table:
        return site.vaddr, "dispatch-table entry"
    # A stripped build names few functions; a direct call's target is a function's first byte.
    for caller in callers:
        if site.vaddr in _call_targets(image, caller):
            return site.vaddr, f"target of a direct call in the function at {caller[0]:#x}"
    raise ProbeRefused(f"refusing to place a probe at {site.label} ({site.vaddr:#x}): no function symbol "
                       "covers it and it is neither a dispatch-table entry nor a direct call target, so no "
                       "instruction boundary is proven")


def verify_plan(image, plan: ProbePlan, pid: int | None = None, bias: int = 0) -> None:
    """Raise ProbeRefused (one line) unless every site of `plan` passes the checks above."""
    table = None
    if plan.strategy == "resume-handlers" and any(_enclosing_function(image, s.vaddr) is None for s in plan.sites):
        table = find_opcode_table(image)[1]
    callers = sorted({fn for fn in (_enclosing_function(image, s.vaddr) for s in plan.sites) if fn is not None})
    mem = _open_mem(pid) if pid is not None else None
    try:
        for site in plan.sites:
            _verify_site(image, site, table, callers, mem, bias)
    finally:
        if mem is not None:
            os.close(mem)


def _verify_site(image, site: ProbeSite, table: list[int] | None, callers: list[tuple[int, int]],
                 mem: int | None, bias: int) -> None:
    where = f"refusing to place a probe at {site.label} ({site.vaddr:#x})"
    start, how = _proven_start(image, site, table, callers)
    if not _lands_on(image, start, site.vaddr):
        raise ProbeRefused(f"{where}: not an instruction boundary (decoding from the {how} steps over it)")
    file_bytes = image.read(site.vaddr, MAX_INSN)
    decoded = _decode_one(file_bytes, site.vaddr)
    if decoded is None or decoded[0] != site.instruction:
        got = decoded[0] if decoded else "undecodable bytes"
        raise ProbeRefused(f"{where}: the plan says {site.instruction!r} but the image holds {got!r}")
    if mem is None:
        return
    size = decoded[1]
    try:
        live = os.pread(mem, size, site.vaddr + bias)
    except OSError as e:
        raise ProbeRefused(f"{where}: cannot read the target's code there ({e.strerror})") from None
    if len(live) != size:
        raise ProbeRefused(f"{where}: the target does not map code there")
    if live[1:] != file_bytes[1:size] or live[0] not in (file_bytes[0], INT3):
        raise ProbeRefused(f"{where}: the target's code differs from {image.path} (replaced on disk since it "
                           "started?)")


def _open_mem(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)  # read-only, always
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited while the tracer attached") from None
    except OSError as e:
        raise ProbeRefused(f"cannot read the code of PID {pid} to verify probe sites: {e.strerror}") from None
