"""Time struct-layout discovery per pyenv build: DWARF cold (empty cache) vs cached, and layout_for.

Run: scripts/bench layouts   (writes results/layouts.json)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from tracer.discover import dwarf  # noqa: E402
from tracer.discover.elf import open_image  # noqa: E402
from tracer.discover.layout import layout_for  # noqa: E402
from tracer.interpreters import find_interpreters  # noqa: E402


def main() -> None:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="layout-bench-")
    rows = []
    for interp in find_interpreters():
        major, minor, _ = interp.version
        lib = Path(interp.path).resolve().parent.parent / "lib" / f"libpython{major}.{minor}.so.1.0"
        image = str(lib) if lib.exists() else interp.path
        bid = open_image(image).build_id()
        row: dict = {"label": interp.label, "image": image}
        if dwarf.has_dwarf(image):
            cold = dwarf.extract_cached(image, minor, bid)
            warm = dwarf.extract_cached(image, minor, bid)
            row.update(dwarf_cold_ms=round(cold.seconds * 1e3, 1),
                       dwarf_cached_ms=round(warm.seconds * 1e3, 3),
                       cus_read=list(cold.cus_read))
        t0 = time.perf_counter()
        layout = layout_for(image, interp.version, bid)
        row.update(layout_for_ms=round((time.perf_counter() - t0) * 1e3, 2), source=layout.source,
                   supplement=layout.supplement)
        rows.append(row)
        print(json.dumps(row))
    out = ROOT / "results" / "layouts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
