"""Exporters: where finished spans go (OTLP-JSON files, OTLP/HTTP). Each is a plug-in with
`export(spans)` and `close()`; the session fans spans out to all that were asked for."""
