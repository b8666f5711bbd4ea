"""Assemble raw entry/exit events into spans and span events."""
