"""The probe plan for one interpreter build: where entries and exits of Python calls are seen.

One explicit strategy per version family, chosen once (py-spy style):

* 3.9/3.10 — every Python call runs `_PyEval_EvalFrameDefault(tstate, frame, throwflag)`:
  entry = its first instruction (frame in rsi); exit = the one call of
  `_Py_CheckFunctionResult(tstate, NULL, retval, __func__)` at `exit_eval_frame`, found as
  the call whose rcx is loaded with the address of the string "_PyEval_EvalFrameDefault"
  (retval in rdx; NULL means the frame exits by exception). Both are emulated sites, and no
  uretprobe is used, so recursion depth is unlimited (uretprobes stop at 64).
* 3.11+ — Python-to-Python calls are inlined in the eval loop: entry = the RESUME-family
  opcode handlers, located through the computed-goto table; the frame is read from the
  thread state. Exit = the frame-clear function (`_PyFrame_Clear` on 3.11,
  `_PyFrame_ClearExceptCode` on 3.12/3.13; frame in rdi), which runs on return, on exception
  unwind and when a generator's frame is released. `_PyEval_EvalFrameDefault`'s first
  instruction (tstate in rdi, frame in rsi) teaches the kernel side each thread's state as
  threads start. On 3.11 a uretprobe on it sees frames entered from C end: 3.11 clears them
  in the C caller after the eval loop returns, and an LTO build may inline that clear (Debian's
  stripped 3.11 does), out of sight of any probe. Generator and coroutine frames are the
  exception (their eval return is a yield): they end at the frame clear, which is not inlined
  for them in any build checked. 3.12+ clear every frame inside the eval loop.

Every site is proven to be an instruction boundary: it is a symbol start or a jump-table
target, and it appears in a linear sweep from that proven start; for handler sites moved
forward to a cheaper (emulated) instruction, no branch anywhere in the eval loop or its
cold code lands strictly between the handler start and the site, so the site runs exactly
once each time the handler runs.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field

from ..errors import Unsupported
from .disasm import Insn, base_register_of_store, disassemble, sweep_function

# Opcode numbers of the RESUME family, per minor version (verified against each
# interpreter's own `opcode`/`dis` tables by tests/test_plan.py).
RESUME_OPCODES: dict[tuple[int, int], dict[str, int]] = {
    (3, 11): {"RESUME": 151, "RESUME_QUICK": 150},
    (3, 12): {"RESUME": 151, "INSTRUMENTED_RESUME": 240},
    (3, 13): {"RESUME": 149, "RESUME_CHECK": 207, "INSTRUMENTED_RESUME": 236},
}
RETURN_VALUE_OPCODE = {(3, 11): 83, (3, 12): 83, (3, 13): 36}
FRAME_CLEAR_SYMBOL = {(3, 11): "_PyFrame_Clear", (3, 12): "_PyFrame_ClearExceptCode",
                      (3, 13): "_PyFrame_ClearExceptCode"}
EVAL = "_PyEval_EvalFrameDefault"
MAX_FORWARD = 24  # instructions a handler site may move forward looking for an emulated one


@dataclass(frozen=True)
class ProbeSite:
    role: str  # "entry" | "exit" | "eval-entry" | "eval-return"
    label: str
    vaddr: int  # link-time virtual address in the image
    instruction: str
    emulated: bool
    proof: str
    registers: str  # what the BPF handler reads from registers at this site
    # Entry sites where a register provably holds the frame (else it is read from the thread
    # state): that register, and the register holding the RESUME instruction's address when
    # frame->prev_instr is not yet stored at the site ("" when it is).
    frame_register: str = ""
    instr_register: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vaddr"] = hex(self.vaddr)
        return d


@dataclass(frozen=True)
class ProbePlan:
    version: tuple[int, int]
    strategy: str
    sites: tuple[ProbeSite, ...]
    unavailable: tuple[str, ...] = field(default=())

    def by_role(self, role: str) -> list[ProbeSite]:
        return [s for s in self.sites if s.role == role]

    def to_dict(self) -> dict:
        return {"version": ".".join(map(str, self.version)), "strategy": self.strategy,
                "sites": [s.to_dict() for s in self.sites], "unavailable": list(self.unavailable)}


class _Eval:
    """The eval loop's code: its instructions and every address some branch lands on."""

    def __init__(self, image, table: list[int] | None) -> None:
        sym = image.symbol(EVAL)
        if sym is None or sym.size == 0:
            raise Unsupported(f"{image.path}: no sized {EVAL} symbol")
        self.image, self.lo, self.hi = image, sym.value, sym.value + sym.size
        self.insns = sweep_function(image.path, self.lo, image.read(self.lo, sym.size))
        self.starts = {i.address for i in self.insns}
        self.targets: set[int] = set(table or ())
        outside: set[int] = {t for t in (table or ()) if not self.inside(t)}
        for i in self.insns:
            t = i.direct_target
            if t is None:
                continue
            if i.mnemonic != "call":
                self.targets.add(t)
                if not self.inside(t):
                    outside.add(t)
        # Cold code (split off by the compiler) jumps back into handlers: sweep each cold
        # entry until control leaves it, collecting its branch targets too.
        for start in outside:
            try:
                code = image.read(start, 4096)
            except ValueError:
                continue
            for i in disassemble(code, start, 400):
                t = i.direct_target
                if t is not None and i.mnemonic != "call":
                    self.targets.add(t)
                if i.mnemonic in ("jmp", "ret", "ud2") or i.mnemonic.startswith("notrack"):
                    break

    def inside(self, a: int) -> bool:
        return self.lo <= a < self.hi

    def insn_at(self, a: int) -> Insn:
        for i in disassemble(self.image.read(a, 16), a, 1):
            return i
        raise Unsupported(f"{self.image.path}: cannot decode an instruction at {a:#x}")


def _symbol_site(image, name: str, role: str, registers: str) -> ProbeSite:
    sym = image.symbol(name)
    if sym is None:
        raise Unsupported(f"{image.path}: symbol {name} not found")
    insn = disassemble(image.read(sym.value, 16), sym.value, 1)[0]
    return ProbeSite(role, name, sym.value, insn.text, insn.emulated,
                     f"start of symbol {name}", registers)


def find_opcode_table(image) -> tuple[int, list[int], str]:
    """Address and 256 entries of the computed-goto dispatch table, and how it was found."""
    sym = image.symbol(EVAL)
    if sym is None:
        raise Unsupported(f"{image.path}: no {EVAL} symbol")
    lo, hi = sym.value, sym.value + sym.size
    relocs = image.relative_relocs() if image.is_pie_or_shared else {}

    def entries(addr: int) -> list[int]:
        if image.is_pie_or_shared:
            return [relocs.get(addr + 8 * k, 0) for k in range(256)]
        return list(struct.unpack("<256Q", image.read(addr, 2048)))

    cands = [s for s in image.symbol_prefix("opcode_targets") if s.size == 2048]
    for s in cands:
        e = entries(s.value)
        if sum(lo <= v < hi for v in e) >= 100:
            return s.value, e, f"symbol {s.name}"
    # Stripped build: the table is the one run of exactly 256 code pointers, most of them
    # into the eval loop (the rest into its cold code).
    text = image.section_range(".text")
    found = []
    for secname in (".data.rel.ro", ".rodata"):
        rng = image.section_range(secname)
        if rng is None:
            continue
        base, size = rng
        n = size // 8
        if image.is_pie_or_shared:
            vals = [relocs.get(base + 8 * k, 0) for k in range(n)]
        else:
            vals = list(struct.unpack(f"<{n}Q", image.read(base, n * 8)))
        k = 0
        while k < n:
            if text[0] <= vals[k] < text[0] + text[1]:
                j = k
                while j < n and text[0] <= vals[j] < text[0] + text[1]:
                    j += 1
                if j - k == 256 and sum(lo <= v < hi for v in vals[k:j]) >= 100:
                    found.append((base + 8 * k, vals[k:j], f"run of 256 code pointers in {secname}"))
                k = j
            else:
                k += 1
    if len(found) != 1:
        raise Unsupported(f"{image.path}: dispatch table not identified ({len(found)} candidates)")
    return found[0]


def _frame_register(ev: _Eval, start: int, site: int, prev_instr_off: int) -> tuple[str, str, str]:
    """(frame register, instruction-pointer register, proof) at a handler site, or empties."""
    if prev_instr_off < 0:
        return "", "", ""
    found = base_register_of_store(ev.image.read(start, site - start + 16), start, site, prev_instr_off)
    if found is None:
        return "", "", ""
    reg, at, source = found
    if at == site and not source:
        return "", "", ""
    proof = (f"{reg} = frame: the handler stores next_instr to [{reg} + {prev_instr_off:#x}] (frame->prev_instr) "
             f"at {at:#x} and nothing writes {reg} before the site")
    return reg, (source if at == site else ""), proof


def _reads(reg: str, ireg: str) -> str:
    if not reg:
        return "none (frame read from the thread state)"
    return f"{reg} = _PyInterpreterFrame*" + (f", {ireg} = the RESUME instruction" if ireg else "")


def _handler_site(ev: _Eval, name: str, start: int, table_how: str, prev_instr_off: int) -> ProbeSite:
    """The cheapest instruction that runs exactly once per execution of a handler."""
    if start not in ev.starts and not ev.inside(start):
        # Cold handlers lie outside the eval loop; decode from the table target itself.
        insn = ev.insn_at(start)
        reg, ireg, why = _frame_register(ev, start, start, prev_instr_off)
        return ProbeSite("entry", f"{name} handler", start, insn.text, insn.emulated,
                         f"jump-table target ({table_how}), outside the eval loop" + (f"; {why}" if why else ""),
                         _reads(reg, ireg), reg, ireg)
    if start not in ev.starts:
        raise Unsupported(f"{name} handler {start:#x} is not on the eval loop's instruction boundaries")
    idx = next(k for k, i in enumerate(ev.insns) if i.address == start)
    first = ev.insns[idx]
    chosen = first
    for k in range(idx, min(idx + MAX_FORWARD, len(ev.insns))):
        i = ev.insns[k]
        if k > idx and i.address in ev.targets:
            break  # something else lands here: a site at or past it could fire for others
        if i.emulated:
            chosen = i
            break
        if not i.falls_through:
            break
    proof = f"jump-table target ({table_how}); linear sweep of {EVAL} agrees"
    if chosen is not first:
        proof += (f"; moved {chosen.address - start} bytes forward along straight-line code to an "
                  f"emulated instruction, no branch target in between")
    reg, ireg, why = _frame_register(ev, start, chosen.address, prev_instr_off)
    if why:
        proof += f"; {why}"
    return ProbeSite("entry", f"{name} handler", chosen.address, chosen.text, chosen.emulated, proof,
                     _reads(reg, ireg), reg, ireg)


def _frame_clear_site(image, ev: _Eval, version: tuple[int, int], table: list[int]) -> ProbeSite:
    name = FRAME_CLEAR_SYMBOL[version]
    regs = "rdi = _PyInterpreterFrame*"
    if image.symbol(name) is not None:
        return _symbol_site(image, name, "exit", regs)
    # Stripped: RETURN_VALUE's straight path clears the frame with a direct call
    # (frame in rdi) before popping it; that callee is the frame-clear function.
    target = _first_call_on_path(ev, table[RETURN_VALUE_OPCODE[version]])
    if target is None:
        raise Unsupported(f"{image.path}: {name} not found (stripped build, no call in RETURN_VALUE)")
    insn = ev.insn_at(target)
    return ProbeSite("exit", f"{name} (callee of RETURN_VALUE)", target, insn.text, insn.emulated,
                     "direct call target on the RETURN_VALUE handler's path (stripped build)", regs)


def _first_call_on_path(ev: _Eval, start: int) -> int | None:
    """First direct call reached from `start`, following the fall-through path only."""
    for i in disassemble(ev.image.read(start, 512), start, 80):
        if i.mnemonic == "call" and i.direct_target is not None:
            return i.direct_target
        if i.mnemonic in ("jmp", "ret"):
            return None
    return None


def _eval_exit_site_310(ev: _Eval) -> ProbeSite:
    """The `_Py_CheckFunctionResult(tstate, NULL, retval, "_PyEval_EvalFrameDefault")` call."""
    want = EVAL.encode() + b"\0"
    hits = []
    for k, i in enumerate(ev.insns):
        if i.mnemonic != "call":
            continue
        for p in ev.insns[max(0, k - 8):k]:
            if p.mnemonic == "lea" and p.op_str.startswith("rcx, [rip + "):
                addr = p.address + p.size + int(p.op_str.split("+ ")[1].rstrip("]"), 16)
                try:
                    if ev.image.read(addr, len(want)) == want:
                        hits.append(i)
                except ValueError:
                    pass
    if len(hits) != 1:
        raise Unsupported(f"{ev.image.path}: exit_eval_frame call not identified ({len(hits)} candidates)")
    i = hits[0]
    return ProbeSite("exit", "exit_eval_frame (_Py_CheckFunctionResult call)", i.address, i.text,
                     i.emulated, f"instruction of the linear sweep of {EVAL}; the only call passing "
                     "__func__ of the eval loop", "rdi = tstate, rdx = retval (NULL on exception)")


def plan_for(image, version: tuple[int, int, int], layout=None) -> ProbePlan:
    """The plan for one build. With its `layout` (3.11+), entry sites whose frame register can be
    proven read the frame from that register; without, they read it from the thread state."""
    mm = version[:2]
    prev_instr_off = layout.frame_prev_instr if layout is not None else -1
    if mm in ((3, 9), (3, 10)):
        ev = _Eval(image, None)
        entry = _symbol_site(image, EVAL, "entry", "rdi = tstate, rsi = PyFrameObject*")
        return ProbePlan(mm, "eval-frame", (entry, _eval_exit_site_310(ev)))
    if mm not in RESUME_OPCODES:
        raise Unsupported(f"CPython {'.'.join(map(str, version))} is not supported (3.9-3.13 are)")
    addr, table, how = find_opcode_table(image)
    ev = _Eval(image, table)
    sites = [_handler_site(ev, name, table[op], f"{how} at {addr:#x}, slot {op}", prev_instr_off)
             for name, op in RESUME_OPCODES[mm].items()]
    sites.append(_frame_clear_site(image, ev, mm, table))
    entry = _symbol_site(image, EVAL, "eval-entry", "rdi = tstate, rsi = _PyInterpreterFrame*, rsp = call id")
    sites.append(entry)
    if mm == (3, 11):
        # The same function's return (a uretprobe): where frames entered from C end on 3.11.
        sites.append(ProbeSite("eval-return", f"{EVAL} (return)", entry.vaddr, entry.instruction, entry.emulated,
                               f"uretprobe on the start of symbol {EVAL}", "rax = result (NULL on exception), "
                               "rsp = call id + 8"))
    return ProbePlan(mm, "resume-handlers", tuple(sites))
