"""Kernel correlation: what the scheduler and the memory manager saw while a span ran.

`sched` loads bpf/sched.c and turns two per-thread snapshots into span attributes;
`profile` builds the per-cycle resource profile Ophamin reads.
"""
