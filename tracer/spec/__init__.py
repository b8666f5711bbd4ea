"""Trace specs: which functions become spans or span events, and which arguments become
attributes. TOML, with line-numbered errors; two specs ship built in (`kimera`, `reference`).

    [service]
    name = "takwin-reference"

    [[span]]
    function = "tracer.reference.takwin:Takwin._run_cycle"   # module:qualname
    name = "takwin.cycle"
    attributes = { "stimulus.length" = "len(stimulus)" }

    [[event]]                                          # an event on the innermost open span
    function = "tracer.reference.gwf:GWFProtocol._record_screen"
    name = "gwf.screen"
    attributes = { verdict = "verdict" }

An attribute expression is a parameter name (its value: int, float, bool, None, or str cut
to STR_LIMIT bytes) or `len(PARAM)` (length of a str, list, tuple or dict). Only the first
MAX_ARGS parameters can be read. Attribute access (`self.x`) is not supported: reading an
instance's attributes from outside needs the dict layout per version; it is refused loudly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import tomllib

from ..errors import SpecError

STR_LIMIT = 48
MAX_ARGS = 6
_BUILTIN = Path(__file__).parent
_FUNC = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*):([A-Za-z_<][\w<>]*(?:\.[A-Za-z_<][\w<>]*)*)$")
_EXPR = re.compile(r"^(?:len\((?P<lp>[A-Za-z_]\w*)\)|(?P<p>[A-Za-z_]\w*))$")


@dataclass(frozen=True)
class Attr:
    key: str
    param: str
    length: bool  # len(param) rather than the value

    def to_dict(self) -> dict:
        return {"key": self.key, "expr": f"len({self.param})" if self.length else self.param}


@dataclass(frozen=True)
class Target:
    target_id: int  # 1-based, as the kernel side reports it
    kind: str  # "span" | "event"
    module: str
    qualname: str
    name: str
    attributes: tuple[Attr, ...] = ()
    # Set when the defining file is known (functions listed from a module's source, see
    # spec/modules.py): match that file name suffix only, and pin the first line if > 0.
    file_suffix: str = ""
    firstlineno: int = 0

    @property
    def function(self) -> str:
        return f"{self.module}:{self.qualname}"

    def to_dict(self) -> dict:
        return {"id": self.target_id, "kind": self.kind, "function": self.function, "name": self.name,
                "attributes": [a.to_dict() for a in self.attributes]}


@dataclass(frozen=True)
class Spec:
    source: str
    service: str
    targets: tuple[Target, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"source": self.source, "service": self.service,
                "targets": [t.to_dict() for t in self.targets]}


def _line_of(text: str, needle: str, start: int = 0) -> int:
    idx = text.find(needle, start)
    return text.count("\n", 0, idx) + 1 if idx >= 0 else 0


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: {e}") from None
    unknown = set(doc) - {"service", "span", "event"}
    if unknown:
        key = sorted(unknown)[0]
        raise SpecError(f"{source}:{_line_of(text, key)}: unknown table {key!r} (use [service], [[span]], [[event]])")
    service = doc.get("service", {})
    if not isinstance(service, dict) or not isinstance(service.get("name", "python"), str):
        raise SpecError(f"{source}:{_line_of(text, '[service]')}: [service] name must be a string")
    targets: list[Target] = []
    seen: set[str] = set()
    for kind in ("span", "event"):
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise SpecError(f"{source}:{_line_of(text, kind)}: use [[{kind}]] (an array of tables)")
        for entry in entries:
            targets.append(_target(entry, kind, len(targets) + 1, text, source, seen))
    if not targets:
        raise SpecError(f"{source}: the spec names no [[span]] or [[event]]")
    return Spec(source, service.get("name", "python"), tuple(targets))


def _target(entry: object, kind: str, tid: int, text: str, source: str, seen: set[str]) -> Target:
    if not isinstance(entry, dict):
        raise SpecError(f"{source}: each [[{kind}]] must be a table")
    func = entry.get("function")
    line = _line_of(text, f'"{func}"') if isinstance(func, str) else _line_of(text, f"[[{kind}]]")
    where = f"{source}:{line}"
    extra = set(entry) - {"function", "name", "attributes"}
    if extra:
        raise SpecError(f"{where}: unknown key {sorted(extra)[0]!r} in [[{kind}]]")
    _check_function(func, where)
    if func in seen:
        raise SpecError(f"{where}: {func} is named twice")
    seen.add(func)
    name = entry.get("name", func.split(":")[1])
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}: name must be a non-empty string")
    attrs = entry.get("attributes", {})
    if not isinstance(attrs, dict):
        raise SpecError(f"{where}: attributes must be a table of key = \"expression\"")
    parsed = []
    for key, expr in attrs.items():
        m = _EXPR.match(expr) if isinstance(expr, str) else None
        if m is None:
            hint = " (attribute access such as self.x is not supported)" if isinstance(expr, str) and "." in expr else ""
            raise SpecError(f"{where}: attribute {key!r}: {expr!r} is not PARAM or len(PARAM){hint}")
        parsed.append(Attr(key, m.group("lp") or m.group("p"), m.group("lp") is not None))
    module, qualname = func.split(":")
    return Target(tid, kind, module, qualname, name, tuple(parsed))


def _check_function(func: object, where: str) -> None:
    if not isinstance(func, str) or not _FUNC.match(func):
        raise SpecError(f"{where}: function must be 'module:qualname', got {func!r}")


def spec_from_functions(functions: Sequence[str], *, base: Spec | None = None, service: str | None = None,
                        source: str = "--function") -> Spec:
    """A spec whose spans are `functions`, each 'module:qualname[=span.name]' (the span is
    named after the qualname unless given), added after `base`'s targets if there is one."""
    targets = []
    for arg in functions:
        func, eq, name = arg.partition("=")
        func, name = func.strip(), name.strip()
        where = f"{source} {arg!r}"
        if func.count(":") != 1:
            raise SpecError(f"{where}: must be module:qualname[=span.name] (e.g. app.jobs:Worker.run=job.run)")
        _check_function(func, where)
        if eq and not name:
            raise SpecError(f"{where}: the span name after '=' is empty")
        module, qualname = func.split(":")
        targets.append(Target(0, "span", module, qualname, name or qualname))
    if base is None:
        base = Spec(source, service or "python")
    elif service:
        base = replace(base, service=service)
    return add_targets(base, targets, source=source)


def add_targets(base: Spec, targets: Sequence[Target], *, source: str = "--function",
                skip_duplicates: bool = False) -> Spec:
    """`base` plus `targets`, renumbered after base's. A function already named is an error,
    or skipped with `skip_duplicates` (a spec's own entry then wins over a listed module)."""
    seen = {t.function for t in base.targets}
    out = list(base.targets)
    for t in targets:
        if t.function in seen:
            if skip_duplicates:
                continue
            raise SpecError(f"{source}: {t.function} is named twice")
        seen.add(t.function)
        out.append(replace(t, target_id=len(out) + 1))
    if not out:
        raise SpecError(f"{source}: no functions to trace")
    return replace(base, targets=tuple(out))


def load_spec(name_or_path: str) -> Spec:
    """A built-in spec by name (`kimera`, `reference`) or a TOML file."""
    builtin = _BUILTIN / f"{name_or_path}.toml"
    path = builtin if builtin.exists() and "/" not in name_or_path else Path(name_or_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec {name_or_path!r}: no such built-in spec or file") from None
    except OSError as e:
        raise SpecError(f"spec {name_or_path!r}: {e.strerror}") from None
    return parse_spec(text, str(path) if path != builtin else f"built-in:{name_or_path}")


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in _BUILTIN.glob("*.toml"))
