"""``python -m gemma4_nb.bench``: the benchmarks of :mod:`gemma4_nb.devtools.bench`, at the path
scripts and ``docs/benchmarks.md`` use."""

from .devtools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
