"""Development sessions: `nox -s tests` (default), `slow`, `lint`, `typecheck`."""

import nox


nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "virtualenv"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite without the slow sweeps."""
    session.install("-e", ".[tests]")
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Only the slow sweeps (larger hypothesis budgets, long runs)."""
    session.install("-e", ".[tests]")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "etrace", "tests", "examples", "benchmarks")
    session.run(
        "ruff", "format", "--check", "etrace", "tests", "examples", "benchmarks"
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", "pyright")
    session.run("pyright", "etrace")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print tables and write JSON under `benchmarks/results/`."""
    session.install("-e", ".[examples]")
    session.run("python", "benchmarks/memory.py", *session.posargs)
    session.run("python", "benchmarks/algorithms.py")
