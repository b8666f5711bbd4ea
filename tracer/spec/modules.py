"""`--module PREFIX`: every function defined in a module or package, as spec targets.

The module is found the way the target would import it (`discover/syspath.py`), its
source files are read through /proc/PID/root and listed with `ast` (nothing of the
target's is imported). Every `def`/`async def` becomes a span target: module-level
functions, methods (`Class.meth`, nested classes too) and nested functions
(`outer.<locals>.inner`); lambdas and comprehensions are not functions one names, and
are left out. Each target knows its file (one kernel rule, not two) and its first line.

The kernel matches a code object by a hash of its (qual)name, four slots per hash, in a
table of 1024 rules (bpf/capture.c `names`, `MAX_SLOTS`). On 3.9/3.10 it sees only
`co_name`, so every `__init__` of a package competes for the same four slots: functions
beyond them are left out and counted in a warning, never silently; a set that does not
fit the table at all is refused with one line.
"""

from __future__ import annotations

import ast
import os
from collections import Counter
from typing import Iterator, Sequence

from ..discover.syspath import host, source_roots
from ..errors import SpecError
from . import Spec, Target

KERNEL_RULES = 1024  # entries of bpf/capture.c `names`
KERNEL_TARGET_IDS = 1023  # bpf/capture.c `targets` is an array of 1024, ids start at 1
SLOTS_PER_NAME = 4  # MAX_SLOTS in bpf/capture.c
LARGE_SET = 50  # above this many functions, warn about the per-call cost
# Measured by bench/everyday.py on the project's 2-core VM under load (docs/fleet.md): what
# one call of a traced function costs beyond the probes every Python call pays.
PER_SPAN_COST = "about 12 µs in the kernel's probe handlers, and the tracer about 0.1 ms of CPU"


def _match_key(qualname: str, version: tuple[int, int, int]) -> str:
    return qualname if version[:2] >= (3, 11) else qualname.rsplit(".", 1)[-1]


def _rules_of(t: Target) -> int:
    return 1 if t.file_suffix else 2  # as capture/names.py rules_for (__main__ run by -m: 2)


def _is_ident(s: str) -> bool:
    return s.isidentifier() and s.isascii()


def functions_in(source: str) -> list[tuple[str, int]]:
    """(qualname, co_firstlineno) of every def in a module's source, in source order.
    co_firstlineno of a decorated function is its first decorator's line."""
    tree = ast.parse(source)
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = prefix + child.name
                out.append((q, min([child.lineno] + [d.lineno for d in child.decorator_list])))
                visit(child, q + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            elif isinstance(child, (ast.stmt, ast.excepthandler)) or type(child).__name__ == "match_case":
                visit(child, prefix)  # defs under if/try/with/for/match keep their prefix

    visit(tree, "")
    return out


def _module_files(pid: int, roots: Sequence[str], prefix: str) -> Iterator[tuple[str, str, str]]:
    """(module name, the target's path, file suffix to match) of every source file under
    `prefix`, from the first root that has it (as import would pick)."""
    rel = prefix.replace(".", "/")
    for root in roots:
        as_file = os.path.join(root, rel + ".py")
        as_dir = os.path.join(root, rel)
        if os.path.isfile(host(pid, as_file)):
            yield prefix, as_file, "/" + rel + ".py"
            return
        if not os.path.isdir(host(pid, as_dir)):
            continue
        for dirpath, dirnames, filenames in os.walk(host(pid, as_dir)):
            dirnames[:] = sorted(d for d in dirnames if _is_ident(d))
            sub = os.path.relpath(dirpath, host(pid, root))
            for fn in sorted(filenames):
                stem = fn[:-3]
                if not fn.endswith(".py") or not _is_ident(stem):
                    continue
                parts = sub.split(os.sep) + ([] if stem == "__init__" else [stem])
                suffix = "/" + "/".join(sub.split(os.sep) + [fn])
                yield ".".join(parts), os.path.join(root, sub, fn), suffix
        return


def module_targets(pid: int, prefixes: Sequence[str], version: tuple[int, int, int],
                   base: Spec) -> tuple[list[Target], list[str]]:
    """Span targets for every function under `prefixes`, and warnings about them.
    Functions `base` already names keep base's entry."""
    roots = source_roots(pid, version)
    warnings: list[str] = []
    named = {t.function for t in base.targets}
    slots: Counter[str] = Counter()
    for t in base.targets:
        slots[_match_key(t.qualname, version)] += _rules_of(t)
    targets: list[Target] = []
    crowded: Counter[str] = Counter()
    unlisted: list[str] = []
    for prefix in prefixes:
        if not all(_is_ident(p) for p in prefix.split(".")):
            raise SpecError(f"--module {prefix!r}: not a dotted module name (e.g. app.jobs)")
        files = list(_module_files(pid, roots, prefix))
        if not files:
            raise SpecError(f"--module {prefix}: no {prefix.replace('.', '/')}.py or package directory under "
                            f"the target's import roots ({', '.join(roots) or 'none readable'})")
        before = len(targets)
        for module, path, suffix in files:
            try:
                with open(host(pid, path), encoding="utf-8") as f:
                    funcs = functions_in(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
                unlisted.append(f"{path} ({type(e).__name__})")
                continue
            for qualname, line in funcs:
                t = Target(0, "span", module, qualname, f"{module}.{qualname}", (), suffix, line)
                if t.function in named:
                    continue
                named.add(t.function)
                key = _match_key(qualname, version)
                if slots[key] >= SLOTS_PER_NAME:
                    crowded[key] += 1
                    continue
                slots[key] += 1
                targets.append(t)
        if len(targets) == before and not crowded:
            warnings.append(f"--module {prefix}: defines no functions")
    if unlisted:
        warnings.append(f"--module: {len(unlisted)} source files could not be read or parsed, their functions "
                        f"are not traced: {', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}")
    if crowded:
        what = "names" if version[:2] < (3, 11) else "qualified names"
        warnings.append(
            f"--module: {sum(crowded.values())} functions not traced: the kernel tells functions apart by their "
            f"{what}, {SLOTS_PER_NAME} per name, and these share one with others already traced: "
            + ", ".join(f"{k} x{v}" for k, v in crowded.most_common(5))
            + " (name the ones you need with -f)")
    n_ids = len(base.targets) + len(targets)
    n_rules = sum(_rules_of(t) for t in base.targets) + len(targets)
    if n_ids > KERNEL_TARGET_IDS or n_rules > KERNEL_RULES:
        raise SpecError(f"--module {' '.join(prefixes)}: {n_ids} functions need {n_rules} kernel match rules, the "
                        f"kernel tables hold {KERNEL_RULES} rules and {KERNEL_TARGET_IDS} targets; narrow the "
                        "prefix (e.g. a subpackage) or name functions with -f")
    if len(targets) > LARGE_SET:
        warnings.append(f"--module: {len(targets)} functions traced; each call of one costs the target "
                        f"{PER_SPAN_COST} to assemble the span (bench/everyday.py), so a hot helper among them "
                        "can slow the target and fill the ring buffer; narrow the set with -f or a longer prefix")
    return targets, warnings
