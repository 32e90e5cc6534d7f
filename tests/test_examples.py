"""Smoke tests: the examples and benchmarks run end to end at tiny sizes."""

import importlib.util
import json
import pathlib
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_copying_task_smoke(tmp_path):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/copying_task.py")
    out = tmp_path / "copy.png"
    summary = module.main(
        ["--steps", "2", "--hidden", "8", "--batch", "4", "--out", str(out)]
    )
    assert out.exists() and out.stat().st_size > 0
    assert summary


@pytest.mark.parametrize("neuron", ["lif", "alif"])
def test_snn_digits_smoke(tmp_path, neuron):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    module = _load("examples/snn_digits.py")
    out = tmp_path / "digits.png"
    sizes = "--steps 3 --batch 8 --hidden 16 --time-steps 6".split()
    results = module.main([*sizes, "--neuron", neuron, "--plot", str(out)])
    assert set(results) == {"es_d_rtrl", "eprop", "bptt"}
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1
        assert 0 <= r["firing_rate"] <= 1
        assert r["seconds_per_step"] > 0
        assert len(r["losses"]) == 3
    assert out.exists() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_benchmark_smoke(tmp_path):
    module = _load("benchmarks/memory.py")
    out = tmp_path / "memory.json"
    rows = module.main(
        ["--lengths", "5", "20", "--hidden", "8", "--batch", "2", "--out", str(out)]
    )
    assert len(rows) == 2
    assert json.loads(out.read_text())


def test_user_test_file_example_passes(tmp_path):
    # The page "Testing your model's online gradients" ships this file for users to
    # copy; run it where a user would, outside this project's pytest settings.
    import shutil
    import subprocess

    target = tmp_path / "test_my_model.py"
    shutil.copy(ROOT / "examples" / "test_my_model.py", target)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            # With runtime type checks on, as in this project's own suite: the
            # `x64` fixture must still run.
            "--jaxtyping-packages=etrace,beartype.beartype",
            str(target),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_algorithms_benchmark_smoke(tmp_path):
    module = _load("benchmarks/algorithms.py")
    out = tmp_path / "algorithms.json"
    rows = module.main(["--hidden", "4", "--repeats", "1", "--out", str(out)])
    assert {r["algorithm"] for r in rows} >= {"D-RTRL", "RTRL", "UORO"}
    assert all(r["trace_bytes_per_example"] > 0 for r in rows)
    assert json.loads(out.read_text())["results"]
