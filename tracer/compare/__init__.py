"""Cross-checks between two recordings of one run (eBPF spans vs the in-process emitter's)."""
