"""x86-64 disassembly for probe-site selection: instruction boundaries, branch targets, and
which instructions the kernel's uprobe code emulates (cheap) versus single-steps (costly).

Emulation set, from arch/x86/kernel/uprobes.c (branch_setup_xol_ops, push_setup_xol_ops):
relative jmp (eb, e9), relative call (e8), relative jcc (70-7f, 0f 80-8f), nop (90 with
prefixes) and `push reg` (50-57, optionally with REX.B). A 0x66 operand-size prefix on a
branch is refused by the kernel, so it is not counted as emulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import capstone

_MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

_CONTROL = {"jmp", "ret", "call", "ud2", "hlt", "int3", "bnd jmp", "notrack jmp", "retq"}


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    @property
    def direct_target(self) -> int | None:
        """Target of a relative jmp/jcc/call, None for anything else."""
        if (self.mnemonic.startswith("j") or self.mnemonic == "call") and self.op_str.startswith("0x"):
            return int(self.op_str, 16)
        return None

    @property
    def is_conditional(self) -> bool:
        return self.mnemonic.startswith("j") and self.mnemonic != "jmp"

    @property
    def falls_through(self) -> bool:
        """Execution always continues with the next instruction (no branch away)."""
        if self.mnemonic == "call":
            return True
        return not (self.mnemonic.startswith("j") or self.mnemonic in _CONTROL)

    @property
    def emulated(self) -> bool:
        b = self.raw
        prefixes = 0
        while prefixes < len(b) and b[prefixes] in (0x66, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x64, 0x65, 0x36):
            prefixes += 1
        rest = b[prefixes:]
        if not rest:
            return False
        has_66 = 0x66 in b[:prefixes]
        op = rest[0]
        if op == 0x90:
            return True
        if op in (0xEB, 0xE9, 0xE8) or 0x70 <= op <= 0x7F:
            return not has_66
        if op == 0x0F and len(rest) > 1 and 0x80 <= rest[1] <= 0x8F:
            return not has_66
        if 0x50 <= op <= 0x57 and prefixes == 0:
            return True
        return op == 0x41 and len(rest) > 1 and 0x50 <= rest[1] <= 0x57 and prefixes == 0


def disassemble(code: bytes, address: int, count: int = 0) -> list[Insn]:
    return [Insn(i.address, i.size, i.mnemonic, i.op_str, bytes(i.bytes))
            for i in _MD.disasm(code, address, count)]


@lru_cache(maxsize=8)
def _sweep(key: tuple[str, int, int], code: bytes) -> tuple[Insn, ...]:
    return tuple(disassemble(code, key[1]))


def sweep_function(image_path: str, start: int, code: bytes) -> tuple[Insn, ...]:
    """Linear sweep of a whole function (cached: the eval loop is tens of KB)."""
    return _sweep((image_path, start, len(code)), code)


# ---- which register holds a pointer at a site -------------------------------------------

_MDD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_MDD.detail = True
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15")
_LEGACY = {"rax": "eax ax al ah", "rbx": "ebx bx bl bh", "rcx": "ecx cx cl ch", "rdx": "edx dx dl dh",
           "rsi": "esi si sil", "rdi": "edi di dil", "rbp": "ebp bp bpl", "rsp": "esp sp spl"}
# Every name of a general-purpose register's parts, mapped to the 64-bit register.
_PARENT = {r: r for r in _GPRS}
for _r, _parts in _LEGACY.items():
    _PARENT.update({p: _r for p in _parts.split()})
for _n in range(8, 16):
    _PARENT.update({f"r{_n}{s}": f"r{_n}" for s in ("d", "w", "b")})


def base_register_of_store(code: bytes, address: int, site: int, disp: int) -> tuple[str, int, str] | None:
    """(R, store address, source register) for the first 8-byte store `mov qword ptr [R + disp], S`
    (no index register) in the straight-line code from `address` through the instruction at
    `site`, provided nothing between that store and `site` writes R; None otherwise.

    Used at opcode handlers: their first store is `frame->prev_instr = next_instr`, so R is the
    frame pointer there, and still is at `site` when no instruction in between writes it.
    """
    store: tuple[str, int, str] | None = None
    for i in _MDD.disasm(code, address):
        if i.address > site:
            break
        if store is not None:
            # A write after the store (and before the site itself runs) would change R.
            if i.address < site and store[0] in {_PARENT.get(i.reg_name(r), "") for r in i.regs_access()[1]}:
                return None
            continue
        if i.mnemonic == "mov" and len(i.operands) == 2 and i.operands[0].type == capstone.x86.X86_OP_MEM:
            m = i.operands[0].mem
            if i.operands[0].size == 8 and m.index == 0 and m.disp == disp and m.base != 0:
                base = _PARENT.get(i.reg_name(m.base))
                src = i.operands[1]
                source = _PARENT.get(i.reg_name(src.reg), "") if src.type == capstone.x86.X86_OP_REG else ""
                if base and base not in ("rsp", "rip"):
                    store = (base, i.address, source)
    return store
