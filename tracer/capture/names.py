"""How spec functions are recognised in the kernel: a hash of the code object's name and a
hash of a suffix of its file name, computed here exactly as bpf/capture.c computes them."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

from ..spec import Target

NAME_MAX_BYTES = 64


def fnv(data: bytes) -> int:
    """FNV-1a over the length and the first NAME_MAX_BYTES bytes (mirrors capture.c)."""
    h = 0xCBF29CE484222325
    mask = (1 << 64) - 1
    h = ((h ^ len(data)) * 0x100000001B3) & mask
    for b in data[:NAME_MAX_BYTES]:
        h = ((h ^ b) * 0x100000001B3) & mask
    return h


@dataclass(frozen=True)
class NameRule:
    target_id: int
    match_name: str  # co_qualname on 3.11+, co_name before
    suffix: str  # compared at the end of co_filename
    exact: bool
    firstlineno: int  # 0 = any

    def key_hash(self) -> int:
        return fnv(self.match_name.encode())

    def matches(self, name: str, filename: str, firstlineno: int) -> bool:
        """The kernel's test (bpf/capture.c classify), on values read in user space."""
        if name != self.match_name:
            return False
        if self.exact and filename != self.suffix or not filename.endswith(self.suffix):
            return False
        return not self.firstlineno or firstlineno == self.firstlineno


def main_arg(pid: int) -> tuple[str, str] | None:
    """What runs as `__main__`, from argv: ("module", NAME), ("command", "") or ("script",
    the path as given)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    args = argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):
            return "module", args[i + 1]
        if a == "-c":
            return "command", ""
        if a.startswith("-"):
            i += 2 if a in ("-W", "-X", "-Q") else 1
            continue
        return "script", a
    return None


def _main_files(pid: int) -> list[tuple[str, bool]]:
    """How `__main__`'s file name can end (suffix, whole name?), from the command line."""
    m = main_arg(pid)
    if m is None:
        return []
    kind, value = m
    if kind == "module":  # a package's __main__.py, or a plain module file
        rel = value.replace(".", "/")
        return [(f"/{rel}/__main__.py", False), (f"/{rel}.py", False)]
    if kind == "command":
        return [("<string>", True)]
    if value.startswith("/"):
        return [(value, True)]
    # 3.9+ makes a relative script path absolute from the start-up directory, which the
    # process may have left since: match the path's tail.
    rel = os.path.normpath(value)
    if not rel.startswith(".."):
        return [("/" + rel, False)]
    try:
        return [(os.path.normpath(os.path.join(os.readlink(f"/proc/{pid}/cwd"), value)), True)]
    except OSError:
        return []


def _source_roots(pid: int) -> list[str]:
    roots = []
    try:
        roots.append(os.readlink(f"/proc/{pid}/cwd"))
        with open(f"/proc/{pid}/environ", "rb") as f:
            for kv in f.read().split(b"\0"):
                if kv.startswith(b"PYTHONPATH="):
                    roots += [p for p in kv[11:].decode(errors="replace").split(":") if p]
    except OSError:
        pass
    return roots


def _first_line(path: str, qualname: str) -> int:
    """co_firstlineno of `qualname` in a source file (the first decorator's line), 0 if unknown."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return 0
    node: ast.AST = tree
    for part in qualname.split("."):
        if part == "<locals>":
            continue
        found = None
        for child in ast.walk(node) if node is not tree else tree.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child.name == part:
                found = child
                break
        if found is None:
            return 0
        node = found
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return 0
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


def rules_for(target: Target, pid: int, version: tuple[int, int, int]) -> tuple[list[NameRule], list[str]]:
    """Kernel match rules for one spec target, and warnings (for the user) about them."""
    qual = target.qualname
    use_qualname = version[:2] >= (3, 11)
    match_name = qual if use_qualname else qual.rsplit(".", 1)[-1]
    warnings: list[str] = []
    if target.module == "__main__":
        suffixes = _main_files(pid)
        if not suffixes:
            warnings.append(f"{target.function}: cannot tell __main__'s file from the command line")
            return [], warnings
    elif target.file_suffix:
        suffixes = [(target.file_suffix, False)]
    else:
        rel = target.module.replace(".", "/")
        suffixes = [(f"/{rel}.py", False), (f"/{rel}/__init__.py", False)]
    rules = []
    for suffix, exact in suffixes:
        line = 0
        if not use_qualname and target.firstlineno:
            # Listed from the source (spec/modules.py): pinned even for module-level names,
            # so that `run` cannot also claim a method `run` defined in the same file.
            line = target.firstlineno
        elif not use_qualname and "." in qual:
            # co_name alone cannot tell Class.run from Other.run in one file: pin the line.
            for root in _source_roots(pid):
                path = f"/proc/{pid}/root" + (suffix if exact and suffix.startswith("/")
                                              else os.path.join(root, suffix.lstrip("/")))
                if os.path.exists(path):
                    line = _first_line(path, qual)
                    break
            if line == 0 and suffix.endswith(".py") and not suffix.endswith("__init__.py"):
                warnings.append(f"{target.function}: source not found; on {version[0]}.{version[1]} "
                                f"any function named {match_name!r} in that file matches")
        rules.append(NameRule(target.target_id, match_name, suffix, exact, line))
    return rules, warnings
