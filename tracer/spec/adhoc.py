"""The spec a trace uses, from a spec file, `-f` functions and `--module` prefixes.

`-f` and a spec file are fixed: checked once, before anything attaches. `--module`
depends on the process (its import roots and its Python version), so the full spec is
made per process by `for_pid`, and several processes may each get their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..discover.process import find_interpreter
from . import Spec, add_targets, load_spec, spec_from_functions
from .modules import module_targets

DEFAULT_SPEC = "reference"


@dataclass(frozen=True)
class SpecRequest:
    spec: str | Spec | None = None  # a built-in name, a TOML path or a Spec; None: see base()
    functions: tuple[str, ...] = ()  # "module:qualname[=span.name]"
    modules: tuple[str, ...] = ()  # dotted prefixes
    service: str | None = None

    def base(self) -> Spec:
        """The process-independent part. With neither -f nor --module, the default spec."""
        if isinstance(self.spec, Spec):
            spec: Spec | None = self.spec
        elif self.spec is not None:
            spec = load_spec(str(self.spec))
        elif not self.functions and not self.modules:
            spec = load_spec(DEFAULT_SPEC)
        else:
            spec = None
        if self.functions:
            return spec_from_functions(self.functions, base=spec, service=self.service)
        if spec is None:  # --module alone: its targets come per process
            return Spec("--module", self.service or self.modules[0].split(".")[0])
        return spec

    def for_pid(self, pid: int, base: Spec | None = None) -> tuple[Spec, list[str]]:
        """The spec for one process, and warnings about it (functions left out, cost)."""
        spec = base or self.base()
        if not self.modules:
            return spec, []
        targets, warnings = module_targets(pid, self.modules, find_interpreter(pid).version, spec)
        return add_targets(spec, targets, source="--module", skip_duplicates=True), warnings

    def to_dict(self) -> dict:
        spec = self.spec.source if isinstance(self.spec, Spec) else self.spec
        return {"spec": spec, "functions": list(self.functions), "modules": list(self.modules)}
