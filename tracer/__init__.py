"""ophamin-trace: exact Python function spans from outside the process, with eBPF.

`tracer.attach(pid, ...)` and `tracer.launch(argv, ...)` are the Python API (tracer/api.py,
docs/api.md). They load lazily: this package is also imported inside traced programs (the
reference substrate, the in-process emitter), which have none of the tracer's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import TraceError

__version__ = "0.1.0"
__all__ = ["BatchResourceProfile", "CycleResourceProfile", "TraceError", "TraceSession", "__version__", "attach",
           "launch"]

if TYPE_CHECKING:
    from .api import TraceSession, attach, launch
    from .correlate.profile import BatchResourceProfile, CycleResourceProfile

_LAZY = {"attach": ".api", "launch": ".api", "TraceSession": ".api",
         "BatchResourceProfile": ".correlate.profile", "CycleResourceProfile": ".correlate.profile"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tracer' has no attribute {name!r}")
    from importlib import import_module  # noqa: PLC0415

    return getattr(import_module(mod, __name__), name)
