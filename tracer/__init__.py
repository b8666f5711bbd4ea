"""ophamin-trace: exact Python function spans from outside the process, with eBPF."""

__version__ = "0.1.0"
