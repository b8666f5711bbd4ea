"""Capture: load the BPF programs, attach the planned probes, and stream raw events."""
