"""The `cart` command line: one thin Typer command per DVC stage (`stages.cli` registers them).

Each command imports the library inside its function, not at the top of its module: `cart --help` and a bad
option's message then take about 0.4 s instead of the ~3 s that importing torch alone costs (measured 2026-12-07,
bench/RESULTS.md, "Import times"). The library (`pipeline/`) imports at the top of its modules, except where a
heavy package would slow every stage's start (each such import says so where it stands).
"""
