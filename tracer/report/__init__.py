"""Reports: per-name statistics, tables, HTML waterfall, Chrome trace, drift."""
