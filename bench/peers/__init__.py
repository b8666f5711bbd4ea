"""Parts of `scripts/bench peers` (bench/peers.py): the harness run inside each target, the
external tools' runners, the specs, the per-interpreter venvs and the figures."""
