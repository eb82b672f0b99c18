"""In-process benchmarks: they may import the core, web and workers to time them.

The drill side of ``loadtests/`` (drill, locustfile, stack, invariants) is a client that sees only HTTP
and the database; what needs the code itself to measure it lives here, so that rule stays checkable.
Commands and dated figures: ``docs/benchmarks.md``.
"""
