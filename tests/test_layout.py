"""Struct layouts: DWARF extraction, _Py_DebugOffsets, built-in tables, and live checks.

Every table in tracer/discover/tables.py is compared field-by-field with the DWARF of the
pyenv build it was generated from, and every layout source is checked against live
processes of every interpreter on the machine by walking their thread lists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tracer.discover import dwarf
from tracer.discover.debug_offsets import MEMBERS, TO_LAYOUT, read_debug_offsets
from tracer.discover.elf import open_image
from tracer.discover.layout import (
    OFFSET_FIELDS,
    Layout,
    layout_for,
    layout_from_table,
    verify_layout_live,
    walk_threads_live,
)
from tracer.discover.tables import GENERATED_FROM, TABLES
from tracer.errors import TargetGone, Unsupported

PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"


def pyenv_lib(version: str) -> str:
    minor = version.split(".")[1]
    lib = PYENV / version / "lib" / f"libpython3.{minor}.so.1.0"
    if not lib.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{lib} missing in CI")
        pytest.skip(f"{lib} not installed")
    return str(lib)


def symbol_value(path: str, name: str) -> int:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            if sec is not None and sec.get_symbol_by_name(name):
                return sec.get_symbol_by_name(name)[0]["st_value"]
    raise AssertionError(f"{name} not in {path}")


def image_and_runtime(pid: int) -> tuple[str, int]:
    """(interpreter image path, absolute address of _PyRuntime) from /proc/PID/maps."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    image = next((ln.split()[5] for ln in maps
                  if len(ln.split()) >= 6 and re.search(r"/libpython3\.\d+\.so", ln.split()[5])), exe)
    with open(image, "rb") as f:
        elf = ELFFile(f)
        is_dyn = elf["e_type"] == "ET_DYN"
        first_vaddr = min(s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    base = 0
    if is_dyn:
        # The mapping of file offset 0 is the first PT_LOAD, placed at base + its page-aligned vaddr.
        start = min(int(ln.split()[0].split("-")[0], 16) for ln in maps
                    if len(ln.split()) >= 6 and ln.split()[5] == image and int(ln.split()[2], 16) == 0)
        base = start - (first_vaddr & ~0xFFF)
    return image, base + symbol_value(image, "_PyRuntime")


TARGET = textwrap.dedent("""
    import sys, threading, time
    ready = threading.Event()
    def ophamin_worker_fn():
        ready.set()
        time.sleep(120)
    class Box:
        # A method, so that co_name ("ophamin_main_fn") differs from co_qualname (3.11+).
        def ophamin_main_fn(self):
            threading.Thread(target=ophamin_worker_fn, daemon=True).start()
            ready.wait()
            time.sleep(0.2)  # let the worker reach its sleep
            print("ready", flush=True)
            time.sleep(120)
    Box().ophamin_main_fn()
""")


@pytest.fixture
def target(interpreter):
    interp, python = interpreter
    proc = subprocess.Popen([python, "-c", TARGET], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield interp, proc.pid
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# Tables and DWARF


@pytest.mark.parametrize("minor", sorted(TABLES))
def test_table_matches_dwarf_of_its_build(minor):
    lib = pyenv_lib(GENERATED_FROM[minor])
    extracted = dwarf.extract(lib, minor)
    assert not extracted.cached
    assert extracted.fields == TABLES[minor]


@pytest.mark.parametrize("minor", sorted(TABLES))
def test_table_covers_exactly_the_fields_of_its_version(minor):
    expected = {f for (f, _, _, _) in dwarf.specs_for(minor)}
    assert set(TABLES[minor]) == expected
    layout = layout_from_table((3, minor, 0))
    for name in OFFSET_FIELDS:
        value = getattr(layout, name)
        assert (value >= 0) == (name in expected), name


def test_version_specific_fields_exist_only_where_they_should():
    t = {m: layout_from_table((3, m, 0)) for m in TABLES}
    assert t[9].tstate_native_thread_id == t[10].tstate_native_thread_id == -1
    assert all(t[m].tstate_native_thread_id > 0 for m in (11, 12, 13))
    assert t[10].tstate_frame > 0 and t[11].tstate_frame == -1
    assert t[11].tstate_cframe > 0 and t[12].tstate_cframe > 0 and t[13].tstate_cframe == -1
    assert t[13].tstate_current_frame > 0 and t[12].tstate_current_frame == -1
    assert t[11].tstate_curexc_type > 0 and t[12].tstate_curexc_type == -1
    assert t[11].frame_is_entry >= 0 and t[12].frame_is_entry == -1
    assert t[10].code_qualname == -1 and t[11].code_qualname > 0
    # 3.12 dropped the two wstr-era members from PyASCIIObject
    assert t[11].ascii_data == 48 and t[12].ascii_data == 40


def test_dwarf_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = pyenv_lib("3.12.1")
    bid = open_image(lib).build_id()
    cold = dwarf.extract_cached(lib, 12, bid)
    warm = dwarf.extract_cached(lib, 12, bid)
    assert not cold.cached and warm.cached
    assert warm.fields == cold.fields == TABLES[12]
    files = list((tmp_path / "ophamin-trace" / "layouts").iterdir())
    assert [f.name for f in files] == [f"{bid}-3.12-{dwarf.SPEC_DIGEST}.json"]
    # A corrupt cache file is recomputed, not trusted.
    files[0].write_text("{not json")
    again = dwarf.extract_cached(lib, 12, bid)
    assert not again.cached and again.fields == TABLES[12]
    assert json.loads(files[0].read_text())["fields"] == TABLES[12]


def test_dwarf_reads_nested_and_bitfield_members():
    lib = pyenv_lib("3.12.1")
    members = dwarf.struct_members(lib, "pyruntimestate")
    assert members["interpreters.head"] == TABLES[12]["runtime_interpreters_head"]
    assert TABLES[12]["unicode_kind_shift"] == 2  # interned:2 comes first in the state bitfield


# ---------------------------------------------------------------------------------------------
# _Py_DebugOffsets


def test_debug_offsets_member_order_matches_dwarf():
    lib = pyenv_lib("3.13.0")
    real = dwarf.struct_members(lib, "_Py_DebugOffsets")
    assert real.pop("cookie") == 0
    ours = {name: 8 + 8 * i for i, name in enumerate(MEMBERS[13])}
    assert ours == real


def test_debug_offsets_agree_with_dwarf():
    lib = pyenv_lib("3.13.0")
    offsets = read_debug_offsets(lib)
    assert offsets.version == (3, 13, 0)
    assert not offsets.free_threaded
    from_dwarf = dwarf.extract(lib, 13).fields
    published = offsets.layout_fields()
    assert set(published) == set(TO_LAYOUT[13])
    assert {k: from_dwarf[k] for k in published} == published
    # The sub-struct sizes it publishes match DWARF's sizeof too.
    assert offsets.members["unicode_object.asciiobject_size"] == from_dwarf["ascii_data"]


def test_debug_offsets_absent_before_313():
    with pytest.raises(Unsupported, match="cookie"):
        read_debug_offsets(pyenv_lib("3.12.1"))


# ---------------------------------------------------------------------------------------------
# Source selection


@pytest.mark.parametrize("version", ["3.9.18", "3.10.13", "3.11.7", "3.12.1"])
def test_layout_for_pyenv_uses_dwarf(version):
    lib = pyenv_lib(version)
    v = tuple(map(int, version.split(".")))
    layout = layout_for(lib, v, open_image(lib).build_id())
    assert layout.source == "dwarf" and layout.version == v[:2] and layout.supplement == ""
    assert replace(layout, source="x") == replace(layout_from_table(v), source="x")


def test_layout_for_313_uses_debug_offsets_with_dwarf_supplement():
    lib = pyenv_lib("3.13.0")
    layout = layout_for(lib, (3, 13, 0), open_image(lib).build_id())
    assert (layout.source, layout.supplement) == ("debug_offsets", "dwarf")
    assert replace(layout, source="x", supplement="") == replace(layout_from_table((3, 13)), source="x")
    d = layout.to_dict()
    assert d["version"] == "3.13" and d["source"] == "debug_offsets" and len(d) == len(OFFSET_FIELDS) + 3


@pytest.mark.parametrize("version", ["3.12.1", "3.13.0"])
def test_stripped_copy_falls_back_to_table(tmp_path, version):
    """A real stripped copy of the library: no DWARF, so the table (3.13: plus debug offsets)."""
    lib = pyenv_lib(version)
    if shutil.which("strip") is None:
        pytest.skip("binutils strip not installed")
    stripped = tmp_path / Path(lib).name
    subprocess.run(["strip", "--strip-debug", "-o", str(stripped), lib], check=True)
    assert not dwarf.has_dwarf(str(stripped))
    v = tuple(map(int, version.split(".")))
    layout = layout_for(str(stripped), v, None)
    if v[1] == 13:
        assert (layout.source, layout.supplement) == ("debug_offsets", "table:3.13")
    else:
        assert (layout.source, layout.supplement) == ("table:3.12", "")
    assert replace(layout, source="", supplement="") == replace(layout_from_table(v), source="")


def test_debian_311_uses_table():
    exe = "/usr/bin/python3.11"
    if not Path(exe).exists() or dwarf.has_dwarf(exe):
        pytest.skip("no stripped Debian python3.11 here")
    layout = layout_for(exe, (3, 11, 2), open_image(exe).build_id())
    assert layout.source == "table:3.11"


@pytest.mark.parametrize("version", [(2, 7, 18), (3, 6, 15), (3, 8, 18), (3, 14, 0), (4, 0, 0)])
def test_unsupported_versions_raise_one_line(version):
    with pytest.raises(Unsupported) as e:
        layout_for("/nonexistent", version, None)
    assert "\n" not in str(e.value) and "3.9-3.13" in str(e.value)


def test_layout_rejects_unknown_fields():
    from tracer.discover.layout import _make

    with pytest.raises(ValueError, match="nonsense"):
        _make({"nonsense": 1}, "dwarf", 12)
    assert isinstance(layout_from_table((3, 11, 2)), Layout)


# ---------------------------------------------------------------------------------------------
# Live processes


def test_live_layout_walks_every_interpreter(target):
    interp, pid = target
    image, runtime = image_and_runtime(pid)
    layout = layout_for(image, interp.version, open_image(image).build_id())
    if interp.label.startswith("debian"):
        assert layout.source == "table:3.11"
    assert verify_layout_live(pid, layout, runtime) == []
    threads = walk_threads_live(pid, layout, runtime)
    assert len(threads) == 2
    stacks = [t.frames for t in threads]
    assert any(s and s[0] == "ophamin_main_fn" and s[-1] == "<module>" for s in stacks), stacks
    assert any(s and s[0] == "ophamin_worker_fn" for s in stacks), stacks
    assert all(t.thread_id != 0 for t in threads)
    if interp.version >= (3, 11):
        tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        assert {t.native_thread_id for t in threads} <= tids
        assert pid in {t.native_thread_id for t in threads}  # the main thread's TID is the PID
    else:
        assert all(t.native_thread_id == -1 for t in threads)
    json.dumps([t.to_dict() for t in threads])


def test_live_table_layout_matches(target):
    """The built-in table alone (what a stripped build of this version would get) also walks."""
    interp, pid = target
    _, runtime = image_and_runtime(pid)
    assert verify_layout_live(pid, layout_from_table(interp.version), runtime) == []


def test_live_check_catches_wrong_layouts(target):
    interp, pid = target
    _, runtime = image_and_runtime(pid)
    good = layout_from_table(interp.version)
    wrong_frame_code = replace(good, frame_code=good.frame_code + 8)
    wrong_name = replace(good, code_name=good.code_flags)  # an int, not a pointer
    # +8 would be interpreters.main, the same interpreter in a one-interpreter process; +16
    # is interpreters.next_id, a small integer that is no address.
    wrong_head = replace(good, runtime_interpreters_head=good.runtime_interpreters_head + 16)
    for bad in (wrong_frame_code, wrong_name, wrong_head):
        assert verify_layout_live(pid, bad, runtime), bad
    if good.code_qualname >= 0:
        # name and qualname are both str: only the names read back tell them apart.
        swapped = replace(good, code_name=good.code_qualname)
        stacks = [t.frames for t in walk_threads_live(pid, swapped, runtime)]
        assert any(s and s[0] == "Box.ophamin_main_fn" for s in stacks), stacks
    if good.tstate_native_thread_id >= 0:
        wrong_tid = replace(good, tstate_native_thread_id=good.tstate_thread_id)
        assert any("native_thread_id" in p for p in verify_layout_live(pid, wrong_tid, runtime))


def test_live_check_on_missing_process():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(TargetGone):
        verify_layout_live(proc.pid, layout_from_table((3, 11, 2)), 0x1000)


def test_argument_values_are_never_decoded_from_bytes_not_read():
    """bpf/capture.c says in bits 56+ of the type how much of an object it could read (an
    object at the end of its pool may border an untouched page): what needs more is
    unreadable, never a zero."""
    import struct

    from tracer.assemble.values import UNREADABLE, TypeAddrs, decode

    lib = pyenv_lib("3.12.1")
    image = open_image(lib)
    layout = layout_for(lib, (3, 12, 1), image.build_id())
    types = TypeAddrs.of(image, 0)
    int_type = next(a for a, n in types.by_addr.items() if n == "PyLong_Type")
    head = struct.pack("<qI", 1 << 3, 42).ljust(32, b"\0")  # lv_tag: one digit, positive; digit 42
    assert decode(0x1000, int_type | 32 << 56, head, b"", types, layout, False) == 42
    assert decode(0x1000, int_type | 16 << 56, head, b"", types, layout, False) == 42
    assert decode(0x1000, int_type | 8 << 56, head, b"", types, layout, False) is UNREADABLE
    str_type = next(a for a, n in types.by_addr.items() if n == "PyUnicode_Type")
    assert decode(0x1000, str_type | 0 << 56, b"\0" * 32, b"c137", types, layout, False) is UNREADABLE
