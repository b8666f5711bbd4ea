"""Struct member offsets of one CPython build, read from its DWARF with pyelftools.

Only a handful of compilation units carry the structs a tracer needs, so the reader walks the
CU headers (cheap) and parses the top-level type DIEs of a short list of CUs until every
wanted struct is found; parsing all of libpython's DWARF would take tens of seconds. Results
are cached on disk keyed by the ELF build id (see `cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

# (field, first minor, last minor, kind, struct, member path). kind: "off" = byte offset of
# the member path, "size" = sizeof(struct), "bit" = bit offset of a bitfield inside the
# enclosing member (path "state.kind" -> bit of `kind` within `state`). A field with no
# spec row for a minor version does not exist there (-1 in a Layout).
SPEC: tuple[tuple[str, int, int, str, str, str], ...] = (
    ("runtime_interpreters_head", 9, 13, "off", "pyruntimestate", "interpreters.head"),
    ("interp_next", 9, 13, "off", "_is", "next"),
    ("interp_threads_head", 9, 10, "off", "_is", "tstate_head"),
    ("interp_threads_head", 11, 13, "off", "_is", "threads.head"),
    ("tstate_next", 9, 13, "off", "_ts", "next"),
    ("tstate_interp", 9, 13, "off", "_ts", "interp"),
    ("tstate_native_thread_id", 11, 13, "off", "_ts", "native_thread_id"),
    ("tstate_thread_id", 9, 13, "off", "_ts", "thread_id"),
    ("tstate_frame", 9, 10, "off", "_ts", "frame"),
    ("tstate_cframe", 11, 12, "off", "_ts", "cframe"),
    ("cframe_current_frame", 11, 12, "off", "_PyCFrame", "current_frame"),
    ("tstate_current_frame", 13, 13, "off", "_ts", "current_frame"),
    ("tstate_curexc_type", 9, 11, "off", "_ts", "curexc_type"),
    ("tstate_current_exception", 12, 13, "off", "_ts", "current_exception"),
    ("frame_code", 9, 10, "off", "_frame", "f_code"),
    ("frame_code", 11, 12, "off", "_PyInterpreterFrame", "f_code"),
    ("frame_code", 13, 13, "off", "_PyInterpreterFrame", "f_executable"),
    ("frame_back", 9, 10, "off", "_frame", "f_back"),
    ("frame_back", 11, 13, "off", "_PyInterpreterFrame", "previous"),
    ("frame_localsplus", 9, 10, "off", "_frame", "f_localsplus"),
    ("frame_localsplus", 11, 13, "off", "_PyInterpreterFrame", "localsplus"),
    ("frame_prev_instr", 9, 10, "off", "_frame", "f_lasti"),
    ("frame_prev_instr", 11, 12, "off", "_PyInterpreterFrame", "prev_instr"),
    ("frame_prev_instr", 13, 13, "off", "_PyInterpreterFrame", "instr_ptr"),
    ("frame_stacktop", 9, 9, "off", "_frame", "f_stacktop"),
    ("frame_state", 10, 10, "off", "_frame", "f_state"),
    ("frame_owner", 11, 13, "off", "_PyInterpreterFrame", "owner"),
    ("frame_is_entry", 11, 11, "off", "_PyInterpreterFrame", "is_entry"),
    ("code_qualname", 11, 13, "off", "PyCodeObject", "co_qualname"),
    ("code_name", 9, 13, "off", "PyCodeObject", "co_name"),
    ("code_filename", 9, 13, "off", "PyCodeObject", "co_filename"),
    ("code_firstlineno", 9, 13, "off", "PyCodeObject", "co_firstlineno"),
    ("code_flags", 9, 13, "off", "PyCodeObject", "co_flags"),
    ("code_argcount", 9, 13, "off", "PyCodeObject", "co_argcount"),
    ("code_kwonlyargcount", 9, 13, "off", "PyCodeObject", "co_kwonlyargcount"),
    ("code_nlocalsplus", 9, 10, "off", "PyCodeObject", "co_nlocals"),
    ("code_nlocalsplus", 11, 13, "off", "PyCodeObject", "co_nlocalsplus"),
    ("code_code_adaptive", 11, 13, "off", "PyCodeObject", "co_code_adaptive"),
    ("code_localsplusnames", 11, 13, "off", "PyCodeObject", "co_localsplusnames"),
    ("code_varnames", 9, 10, "off", "PyCodeObject", "co_varnames"),
    ("code_code", 9, 10, "off", "PyCodeObject", "co_code"),
    ("code_linetable", 9, 9, "off", "PyCodeObject", "co_lnotab"),
    ("code_linetable", 10, 13, "off", "PyCodeObject", "co_linetable"),
    ("object_type", 9, 13, "off", "_object", "ob_type"),
    ("var_size", 9, 13, "off", "PyVarObject", "ob_size"),
    ("type_name", 9, 13, "off", "_typeobject", "tp_name"),
    ("type_flags", 9, 13, "off", "_typeobject", "tp_flags"),
    ("unicode_state", 9, 13, "off", "PyASCIIObject", "state"),
    ("unicode_length", 9, 13, "off", "PyASCIIObject", "length"),
    ("unicode_kind_shift", 9, 13, "bit", "PyASCIIObject", "state.kind"),
    ("unicode_compact_shift", 9, 13, "bit", "PyASCIIObject", "state.compact"),
    ("unicode_ascii_shift", 9, 13, "bit", "PyASCIIObject", "state.ascii"),
    ("ascii_data", 9, 13, "size", "PyASCIIObject", ""),
    ("compact_data", 9, 13, "size", "PyCompactUnicodeObject", ""),
    ("long_digits", 9, 11, "off", "_longobject", "ob_digit"),
    ("long_digits", 12, 13, "off", "_longobject", "long_value.ob_digit"),
    ("long_size_or_tag", 9, 11, "off", "_longobject", "ob_base.ob_size"),
    ("long_size_or_tag", 12, 13, "off", "_longobject", "long_value.lv_tag"),
    ("float_value", 9, 13, "off", "PyFloatObject", "ob_fval"),
    ("dict_used", 9, 13, "off", "PyDictObject", "ma_used"),
    ("tuple_items", 9, 13, "off", "PyTupleObject", "ob_item"),
    ("list_items", 9, 13, "off", "PyListObject", "ob_item"),
    ("gen_frame", 11, 13, "off", "PyGenObject", "gi_iframe"),
)

# CUs that define (and use) the wanted structs, most productive first; the search stops as
# soon as every wanted struct is found. Unlisted CUs are read only if these fall short.
PREFERRED_CUS = (
    "Python/pystate.c",
    "Objects/genobject.c",
    "Objects/unicodeobject.c",
    "Objects/longobject.c",
    "Objects/codeobject.c",
    "Objects/frameobject.c",
    "Objects/floatobject.c",
    "Objects/dictobject.c",
    "Objects/listobject.c",
    "Objects/tupleobject.c",
    "Python/ceval.c",
)

# Bumped (through the digest) whenever SPEC changes, so stale cache files are never read.
SPEC_DIGEST = hashlib.sha256(repr(SPEC).encode()).hexdigest()[:12]


class DwarfError(Exception):
    """The DWARF lacks a struct or member the spec names (an internal error, not user-facing)."""


@dataclass(frozen=True)
class DwarfExtraction:
    fields: dict[str, int]  # every SPEC field for this minor version; absent fields omitted
    cus_read: tuple[str, ...]
    seconds: float
    cached: bool

    def to_dict(self) -> dict:
        return {"fields": dict(self.fields), "cus_read": list(self.cus_read),
                "seconds": self.seconds, "cached": self.cached}


def has_dwarf(elf_path: str) -> bool:
    with open(elf_path, "rb") as f:
        return ELFFile(f).get_section_by_name(".debug_info") is not None


def specs_for(minor: int) -> list[tuple[str, str, str, str]]:
    return [(f, kind, s, p) for (f, lo, hi, kind, s, p) in SPEC if lo <= minor <= hi]


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/ophamin-trace/layouts, else the checkout's .cache/layouts, else ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "ophamin-trace" / "layouts"
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists():
        return checkout / ".cache" / "layouts"
    return Path.home() / ".cache" / "ophamin-trace" / "layouts"


def _name(die) -> str | None:
    a = die.attributes.get("DW_AT_name")
    return a.value.decode() if a is not None else None


def _strip(die):
    """Follow typedef/const/volatile to the underlying type DIE."""
    while die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
                      "DW_TAG_atomic_type"):
        if "DW_AT_type" not in die.attributes:
            return die
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def _is_complete(die) -> bool:
    return "DW_AT_declaration" not in die.attributes


def _member_offset(member) -> int:
    loc = member.attributes.get("DW_AT_data_member_location")
    if loc is None:
        return 0  # union members and the first member of some structs omit it
    if isinstance(loc.value, int):
        return loc.value
    raise DwarfError(f"member location is an expression, not a constant: {loc.value!r}")


def _find_member(struct, name: str):
    """(member DIE, byte offset) of `name`, looking through anonymous struct/union members."""
    for m in struct.iter_children():
        if m.tag != "DW_TAG_member":
            continue
        mname = _name(m)
        if mname == name:
            return m, _member_offset(m)
        if mname is None and "DW_AT_type" in m.attributes:
            inner = _strip(m.get_DIE_from_attribute("DW_AT_type"))
            if inner.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                found = _find_member(inner, name)
                if found is not None:
                    return found[0], _member_offset(m) + found[1]
    return None


def _resolve(struct, path: str, kind: str) -> int:
    if kind == "size":
        return struct.attributes["DW_AT_byte_size"].value
    parts = path.split(".")
    total = 0
    cur = struct
    for i, part in enumerate(parts):
        found = _find_member(cur, part)
        if found is None:
            raise DwarfError(f"no member {part!r} in {path!r}")
        member, off = found
        if kind == "bit" and i == len(parts) - 1:
            bit = member.attributes.get("DW_AT_data_bit_offset")
            if bit is None:
                raise DwarfError(f"{path!r} is not a DWARF4+ bitfield")
            return bit.value
        total += off
        if i < len(parts) - 1:
            cur = _strip(member.get_DIE_from_attribute("DW_AT_type"))
    return total


def _collect(f, wanted: set[str]) -> tuple[dict[str, object], list[str]]:
    """Name -> complete struct DIE for every wanted name (struct tags and typedef names).

    The DIEs read lazily from `f`, so it must stay open while they are used.
    """
    found: dict[str, object] = {}
    cus_read: list[str] = []
    dwarf = ELFFile(f).get_dwarf_info()
    cus = list(dwarf.iter_CUs())
    names = {id(cu): _name(cu.get_top_DIE()) or "" for cu in cus}
    order = sorted(cus, key=lambda cu: (PREFERRED_CUS.index(names[id(cu)])
                                        if names[id(cu)] in PREFERRED_CUS else len(PREFERRED_CUS)))
    for cu in order:
        if wanted <= found.keys():
            break
        cus_read.append(names[id(cu)])
        for die in cu.get_top_DIE().iter_children():
            nm = _name(die)
            if nm is None or nm not in wanted or nm in found:
                continue
            if die.tag == "DW_TAG_typedef":
                target = _strip(die)
                if target.tag == "DW_TAG_structure_type" and _is_complete(target):
                    found[nm] = target
            elif die.tag == "DW_TAG_structure_type" and _is_complete(die):
                found[nm] = die
    return found, cus_read


def extract(elf_path: str, minor: int) -> DwarfExtraction:
    """Read every SPEC field for CPython 3.<minor> from the DWARF of `elf_path` (uncached)."""
    t0 = time.perf_counter()
    specs = specs_for(minor)
    fields: dict[str, int] = {}
    with open(elf_path, "rb") as f:
        structs, cus_read = _collect(f, {s for (_, _, s, _) in specs})
        for field, kind, sname, path in specs:
            if sname not in structs:
                raise DwarfError(f"struct {sname} not found in the DWARF of {elf_path}")
            try:
                fields[field] = _resolve(structs[sname], path, kind)
            except DwarfError as e:
                raise DwarfError(f"{field}: {sname}: {e}") from None
    return DwarfExtraction(fields, tuple(cus_read), time.perf_counter() - t0, cached=False)


def extract_cached(elf_path: str, minor: int, build_id: str | None) -> DwarfExtraction:
    """`extract`, memoised on disk by build id (no build id: no cache, always re-read)."""
    if not build_id:
        return extract(elf_path, minor)
    path = cache_dir() / f"{build_id}-3.{minor}-{SPEC_DIGEST}.json"
    t0 = time.perf_counter()
    try:
        data = json.loads(path.read_text())
        return DwarfExtraction({k: int(v) for k, v in data["fields"].items()},
                               tuple(data["cus_read"]), time.perf_counter() - t0, cached=True)
    except (OSError, ValueError, KeyError):
        pass  # missing or unreadable cache: recompute and rewrite it
    result = extract(elf_path, minor)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"elf": elf_path, **result.to_dict()}, indent=1))
    os.replace(tmp, path)  # atomic: concurrent tracers never read half a file
    return result


def struct_members(elf_path: str, struct_name: str) -> dict[str, int]:
    """Flattened "a.b" -> byte offset of every member of one struct (used to check parsers)."""
    out: dict[str, int] = {}

    def walk(s, prefix: str, base: int) -> None:
        for m in s.iter_children():
            if m.tag != "DW_TAG_member":
                continue
            name = prefix + (_name(m) or "")
            off = base + _member_offset(m)
            inner = _strip(m.get_DIE_from_attribute("DW_AT_type"))
            if inner.tag == "DW_TAG_structure_type":
                walk(inner, name + ".", off)
            else:
                out[name] = off

    with open(elf_path, "rb") as f:
        structs, _ = _collect(f, {struct_name})
        if struct_name not in structs:
            raise DwarfError(f"struct {struct_name} not found in {elf_path}")
        walk(structs[struct_name], "", 0)
    return out
