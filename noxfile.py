"""Development sessions: `nox -s tests` (default), `slow`, `lint`, `typecheck`."""

import json
import os
import pathlib

import nox


nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "virtualenv"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite without the slow sweeps."""
    session.install("-e", ".[tests]")
    # One worker per core (at most 4): the tests are independent, and most of
    # their time is single-threaded tracing and compilation.
    session.run(
        "pytest",
        "-m",
        "not slow",
        "-n",
        "auto",
        "--maxprocesses",
        "4",
        *session.posargs,
    )


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
def docs(session: nox.Session) -> None:
    """Builds the documentation site into `site/`; any warning fails the build."""
    session.install("-e", ".[docs]")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},  # silences a theme banner, not a check
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print tables and write JSON under `benchmarks/results/`."""
    session.install("-e", ".[examples]")
    session.run("python", "benchmarks/memory.py", *session.posargs)
    session.run("python", "benchmarks/algorithms.py")
    session.run("python", "benchmarks/operators.py")


@nox.session
def results(session: nox.Session) -> None:
    """Runs the copy-task, spiking-digits and evidence-accumulation examples with
    their defaults and writes `docs/results.md` (about a minute on 2 CPUs)."""
    session.install("-e", ".[examples]")
    session.run("python", "benchmarks/results.py", *session.posargs)


@nox.session
def bench_training(session: nox.Session) -> None:
    """Training step against BPTT (`training.py`), trace update against the
    roofline (`roofline.py`) and ES-D-RTRL's step against its matrix products
    (`products.py`); arguments after `--` go to all three, e.g. `-- --quick`."""
    session.install("-e", ".[examples]")
    session.run("python", "benchmarks/training.py", *session.posargs)
    session.run("python", "benchmarks/roofline.py", *session.posargs)
    session.run("python", "benchmarks/products.py", *session.posargs)


# braintrace and the versions of its dependencies the comparison was measured with.
PEER = (
    "braintrace==0.2.8",
    "brainstate==0.6.0",
    "brainpy==2.9.0",
    "braintools==0.4.0",
    "brainunit==0.6.0",
    "brainevent==0.3.0",
)


def _training_jax() -> str:
    """`jax==V` for the jax version `training.py` recorded, so that both libraries
    are measured on the same jax; unpinned if it has not been run."""
    path = pathlib.Path("benchmarks/results/training.json")
    if path.exists():
        return f"jax=={json.loads(path.read_text())['jax']}"
    return "jax"


@nox.session(python="3.12")
def bench_peer(session: nox.Session) -> None:
    """braintrace (Python >= 3.12) on the models of `training.py`, then the side by
    side comparison if `training.py` has been run. Arguments after `--` go to
    `peer_braintrace.py`. `BENCH_PEER_JAX` overrides the jax requirement, e.g.
    `BENCH_PEER_JAX="jax[cuda12]==0.10.2"` on a CUDA machine."""
    session.install(*PEER, os.environ.get("BENCH_PEER_JAX") or _training_jax())
    session.run("python", "benchmarks/peer_braintrace.py", *session.posargs)
    if pathlib.Path("benchmarks/results/training.json").exists():
        session.run("python", "benchmarks/compare_peer.py")


@nox.session(python="3.12")
def bench_alternating(session: nox.Session) -> None:
    """etrace and braintrace in one environment and one process, their training
    steps timed in turn (`alternating.py`; arguments after `--` go to it).
    `BENCH_PEER_JAX` as for `bench_peer`."""
    session.install(
        "-e", ".[examples]", *PEER, os.environ.get("BENCH_PEER_JAX") or _training_jax()
    )
    session.run("python", "benchmarks/alternating.py", *session.posargs)
