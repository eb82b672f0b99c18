"""Development, test and demo tooling, kept apart from the production core.

What lives here exists only to develop, test and demo meterai: the ``./dev`` commands (:mod:`.dev`), the
private PostgreSQL and Redis they start (:mod:`.services`), the one launcher that runs the Procfile's
processes for ``./dev up``, the tests and the drills (:mod:`.launcher`), the development CA, and the
stand-in payment gateway (:mod:`.standin`). Production code (the rest of ``shared``, ``web``, ``workers``)
never imports this package; an import-linter contract in ``pyproject.toml``, run by the test suite, says so.
"""
