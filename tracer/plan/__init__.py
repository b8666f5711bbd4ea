"""Probe planning: which instructions to probe, proven safe, and what each costs."""
