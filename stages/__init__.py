"""The `cart` command line: one thin Typer command per DVC stage (`stages.cli` registers them).

Each command imports the library inside its function, not at the top of its module: `cart --help` and a bad
option's message then come without paying for importing torch (bench/RESULTS.md, "Import times"). The library
(`pipeline/`) imports at the top of its modules, except where a heavy package would slow every stage's start
(each such import says so where it stands).
"""
