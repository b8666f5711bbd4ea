"""Read what discovery needs from an interpreter's ELF image, with pyelftools.

Symbols (.dynsym and .symtab), R_X86_64_RELATIVE relocations, bytes at a virtual address,
the build id and USDT notes. Opened once per image and cached by path+inode, since tests and
`--match` attach to many processes that map the same libpython.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from ..errors import Unsupported

R_X86_64_RELATIVE = 8


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int  # link-time virtual address
    size: int
    local: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "value": hex(self.value), "size": self.size, "local": self.local}


class ElfImage:
    """One interpreter image on disk (opened through /proc/PID/root when it came from a process)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - held for the image's lifetime
        self.elf = ELFFile(self._f)
        if self.elf["e_machine"] != "EM_X86_64":
            raise Unsupported(f"{path}: {self.elf['e_machine']} images are not supported (x86-64 only)")
        self.is_pie_or_shared = self.elf["e_type"] == "ET_DYN"
        self.symbols: dict[str, Symbol] = {}
        self.has_symtab = False
        for secname in (".dynsym", ".symtab"):
            sec = self.elf.get_section_by_name(secname)
            if sec is None:
                continue
            self.has_symtab |= secname == ".symtab"
            for s in sec.iter_symbols():
                if not s.name or s["st_value"] == 0:
                    continue
                local = s["st_info"]["bind"] == "STB_LOCAL"
                # Global definitions win over locals of the same name.
                if s.name not in self.symbols or not local:
                    self.symbols[s.name] = Symbol(s.name, s["st_value"], s["st_size"], local)
        self.has_dwarf = self.elf.get_section_by_name(".debug_info") is not None
        self._segments = [
            (seg["p_vaddr"], seg["p_filesz"], seg["p_offset"], seg["p_memsz"])
            for seg in self.elf.iter_segments() if seg["p_type"] == "PT_LOAD"
        ]

    @property
    def first_load_vaddr(self) -> int:
        return min(v for v, *_ in self._segments)

    def symbol(self, name: str) -> Symbol | None:
        return self.symbols.get(name)

    def symbol_prefix(self, prefix: str) -> list[Symbol]:
        """Compiler-renamed locals such as `opcode_targets.0`."""
        return [s for n, s in self.symbols.items() if n == prefix or n.startswith(prefix + ".")]

    def read(self, vaddr: int, size: int) -> bytes:
        """File-backed bytes at a link-time virtual address (zeros past filesz, as mapped)."""
        for v, filesz, off, memsz in self._segments:
            if v <= vaddr < v + memsz:
                avail = max(0, min(size, v + filesz - vaddr))
                self._f.seek(off + vaddr - v)
                data = self._f.read(avail)
                return data + b"\0" * (size - len(data))
        raise ValueError(f"{self.path}: address {vaddr:#x} is not in a loaded segment")

    def relative_relocs(self) -> dict[int, int]:
        """R_X86_64_RELATIVE: slot address -> addend (the pointer value a PIE slot holds)."""
        return _relative_relocs(self.path)

    def section_containing(self, vaddr: int) -> str | None:
        for sec in self.elf.iter_sections():
            a, n = sec["sh_addr"], sec["sh_size"]
            if a and a <= vaddr < a + n:
                return sec.name
        return None

    def section_range(self, name: str) -> tuple[int, int] | None:
        sec = self.elf.get_section_by_name(name)
        return (sec["sh_addr"], sec["sh_size"]) if sec is not None else None

    def build_id(self) -> str | None:
        for sec in self.elf.iter_sections():
            if sec["sh_type"] != "SHT_NOTE":
                continue
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
        return None

    def has_usdt(self) -> bool:
        return self.elf.get_section_by_name(".note.stapsdt") is not None


@lru_cache(maxsize=16)
def _relative_relocs(path: str) -> dict[int, int]:
    out: dict[int, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection) or not sec.is_RELA():
                continue
            for r in sec.iter_relocations():
                if r["r_info_type"] == R_X86_64_RELATIVE:
                    out[r["r_offset"]] = r["r_addend"]
    return out


@lru_cache(maxsize=16)
def _open_cached(path: str, ino: int, mtime_ns: int) -> ElfImage:
    return ElfImage(path)


def open_image(path: str) -> ElfImage:
    st = os.stat(path)
    return _open_cached(path, st.st_ino, st.st_mtime_ns)
