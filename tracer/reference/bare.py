"""The substrate with its emitter calls compiled out: the "no emitter wiring" build.

Tests and the emitter benchmark compare the wired substrate (default NoOpEmitter) against this
one. It is the same source, not a hand-written twin: each module of this package is parsed,
every emitter call is removed from the syntax tree (`with <x>._emitter.span(...) [as s]:` is
replaced by its body, minus `s.set_attribute(...)`; `<x>._emitter.event(...)` statements are
dropped), and the result is compiled into a separate package, `tracer.reference._bare`. The
removal counts are checked against what the source is known to hold, so a new emitter call the
stripper misses fails loudly instead of quietly biasing the comparison.

Never imported by the runner: only tests and benchmarks load it.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
BARE = __package__ + "._bare"  # tracer.reference._bare
ORIGIN = __package__  # tracer.reference
SKIP = {"__init__", "__main__", "bare"}


def _is_emitter_call(node: Any, method: str) -> bool:
    # <anything>._emitter.<method>(...)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == method and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "_emitter")


class _Stripper(ast.NodeTransformer):
    def __init__(self) -> None:
        self.spans = 0
        self.events = 0
        self.set_attributes = 0

    def _body(self, stmts: List[ast.stmt]) -> List[ast.stmt]:
        out: List[ast.stmt] = []
        for st in stmts:
            res = self.visit(st)
            if res is None:
                continue
            out.extend(res if isinstance(res, list) else [res])
        return out or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, field, self._body(stmts))
        if isinstance(node, ast.Try):
            for h in node.handlers:
                h.body = self._body(h.body)
        return node

    def visit_With(self, node: ast.With) -> Any:
        if not all(_is_emitter_call(item.context_expr, "span") for item in node.items):
            return self.generic_visit(node)
        self.spans += len(node.items)
        names = {item.optional_vars.id for item in node.items
                 if isinstance(item.optional_vars, ast.Name)}
        kept = []
        for st in node.body:
            if (names and isinstance(st, ast.Expr) and isinstance(st.value, ast.Call)
                    and isinstance(st.value.func, ast.Attribute) and st.value.func.attr == "set_attribute"
                    and isinstance(st.value.func.value, ast.Name) and st.value.func.value.id in names):
                self.set_attributes += 1
                continue
            kept.append(st)
        return self._body(kept)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> Any:
        # The bare package sits one level deeper (tracer.reference._bare): `from ..emitter`
        # must still reach tracer.emitter; `from .x` stays inside the bare package.
        if node.level >= 2:
            node.level += 1
        return node

    def visit_Expr(self, node: ast.Expr) -> Any:
        if _is_emitter_call(node.value, "event"):
            self.events += 1
            return None
        return node


# What the wired source holds; the loader refuses to build if the stripper saw anything else.
EXPECTED = {
    "takwin": {"spans": 8, "events": 0, "set_attributes": 0},  # 7 steps + the optional GPU step
    "gwf": {"spans": 0, "events": 1, "set_attributes": 0},
    "walker": {"spans": 0, "events": 1, "set_attributes": 0},
    "scar": {"spans": 0, "events": 1, "set_attributes": 0},
    "dissonance": {"spans": 0, "events": 1, "set_attributes": 0},
    "kccl": {"spans": 0, "events": 1, "set_attributes": 0},
}


class StripError(RuntimeError):
    pass


def stripped_source_tree(module: str) -> ast.Module:
    path = HERE / (module + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    stripper = _Stripper()
    tree = stripper.visit(tree)
    seen = {"spans": stripper.spans, "events": stripper.events, "set_attributes": stripper.set_attributes}
    want = EXPECTED.get(module, {"spans": 0, "events": 0, "set_attributes": 0})
    if seen != want:
        raise StripError(f"bare build of {module}: removed {seen!r}, expected {want!r}")
    remaining = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and (_is_emitter_call(n, "span") or _is_emitter_call(n, "event"))]
    if remaining:
        raise StripError(f"bare build of {module}: {len(remaining)} emitter calls left")
    return ast.fix_missing_locations(tree)


class _Loader(importlib.abc.Loader):
    def __init__(self, module: str) -> None:
        self._module = module

    def create_module(self, spec: Any) -> Optional[types.ModuleType]:
        return None

    def exec_module(self, mod: types.ModuleType) -> None:
        tree = stripped_source_tree(self._module)
        code = compile(tree, "%s [bare]" % (HERE / (self._module + ".py")), "exec")
        exec(code, mod.__dict__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == BARE:
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = []
            return spec
        if fullname.startswith(BARE + "."):
            name = fullname[len(BARE) + 1:]
            if "." in name or name in SKIP or not (HERE / (name + ".py")).exists():
                return None
            return importlib.machinery.ModuleSpec(fullname, _Loader(name))
        return None


_FINDER = _Finder()


def load_bare() -> Dict[str, types.ModuleType]:
    """The stripped modules, by short name; `load_bare()["takwin"].Takwin` is the bare Takwin."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    if BARE not in sys.modules:
        pkg = importlib.util.module_from_spec(_FINDER.find_spec(BARE, None))
        sys.modules[BARE] = pkg
    out = {}
    for name in EXPECTED:
        out[name] = importlib.import_module(BARE + "." + name)
    return out
