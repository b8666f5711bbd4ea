"""The functions a workload defines, and the ophamin-trace specs built from them.

A "large" spec names every module-level function and every method of every class (nested
classes included) in the workload's own source files; a "small" one names its steps, a handful
of coarse functions chosen per workload. Both also name the harness's `beacon()`, whose first
span tells the driver the tracer is attached.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

HARNESS = Path(__file__).resolve().parent / "harness.py"

# The steps of each workload: what a user would trace first.
SMALL = {
    "reference": ("tracer.reference.takwin:Takwin.run", "tracer.reference.takwin:Takwin._step1_screen",
                  "tracer.reference.takwin:Takwin._step2_encode",
                  "tracer.reference.takwin:Takwin._step3_step4_traverse",
                  "tracer.reference.takwin:Takwin._step5_consolidate", "tracer.reference.takwin:Takwin._step6_vault",
                  "tracer.reference.takwin:Takwin._step7_render"),
    "richards": ("Richards.run", "schedule", "HandlerTask.fn", "WorkTask.fn"),
    "deltablue": ("delta_blue", "chain_test", "projection_test", "change", "Planner.extract_plan_from_constraints"),
    "nbody": ("bench_nbody", "advance", "report_energy", "offset_momentum"),
    "go": ("versus_cpu", "computer_move", "UCTNode.play", "UCTNode.random_playout"),
}


@dataclass(frozen=True)
class Function:
    module: str  # dotted; its file name must end with module.replace(".", "/") + ".py"
    qualname: str
    file: str
    line: int  # co_firstlineno: the first decorator's line, else the def line

    @property
    def ident(self) -> str:
        return f"{self.module}:{self.qualname}"

    def to_dict(self) -> dict:
        return {"function": self.ident, "file": self.file, "line": self.line}


def module_name(path: str) -> str:
    """The dotted name whose path suffix identifies `path`: its package directories, or for
    a pyperformance benchmark (`bm_x/run_benchmark.py`, no package) its folder and stem."""
    p = Path(path)
    parts = [] if p.stem == "__init__" else [p.stem]
    d = p.parent
    while (d / "__init__.py").exists():
        parts.insert(0, d.name)
        d = d.parent
    if len(parts) == 1 and not (p.parent / "__init__.py").exists():
        parts.insert(0, p.parent.name)
    return ".".join(parts)


def functions_of(path: str) -> list[Function]:
    """Module-level functions and class methods (nested classes too) defined in `path`."""
    tree = ast.parse(Path(path).read_text(), path)
    mod = module_name(path)
    out: list[Function] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                line = min([node.lineno] + [d.lineno for d in node.decorator_list])
                out.append(Function(mod, prefix + node.name, path, line))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return out


def large_spec(files: list[str]) -> list[Function]:
    return [f for path in files for f in functions_of(path)]


def small_spec(workload: str, files: list[str]) -> list[Function]:
    """The workload's steps, looked up among its functions (so a renamed step fails here)."""
    every = large_spec(files)
    by_ident = {f.ident: f for f in every}
    by_qual = {f.qualname: f for f in every}
    out = []
    for name in SMALL[workload]:
        f = by_ident.get(name) if ":" in name else by_qual.get(name)
        if f is None:
            raise SystemExit(f"bench peers: the {workload} workload has no function {name!r}")
        out.append(f)
    return out


def toml(functions: list[Function], service: str) -> str:
    """A spec naming `functions` as spans (named by their full ident), plus the beacon."""
    lines = [f'[service]\nname = "{service}"\n', '[[span]]\nfunction = "__main__:beacon"\nname = "beacon"\n']
    for f in functions:
        lines.append(f'[[span]]\nfunction = "{f.ident}"\nname = "{f.ident}"\n')
    return "\n".join(lines)
