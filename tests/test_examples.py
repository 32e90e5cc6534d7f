"""Smoke tests: the examples and benchmarks run end to end at tiny sizes."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(relative: str):
    path = ROOT / relative
    # As when the script runs: its folder is importable (`examples/_common.py`).
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
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


def test_kernels_benchmark_smoke(tmp_path):
    module = _load("benchmarks/kernels.py")
    out = tmp_path / "kernels.json"
    sizes = ["--models", "gru", "--gru-hidden", "8", "--gru-lengths", "5"]
    algorithms = ["--algorithms", "D-RTRL", "BPTT"]
    rows = module.main([*sizes, *algorithms, "--repeats", "2", "--out", str(out)])
    assert [r["algorithm"] for r in rows] == ["D-RTRL", "BPTT"]
    for r in rows:
        kernels = r["kernels"]
        assert kernels and r["kernel_seconds_per_time_step"] > 0
        # The scan body's kernels run once per time step, the Adam update once
        # per call (1 / T), and the loops that contain them are not counted.
        calls = {round(k["calls_per_step"], 6) for k in kernels}
        assert 1.0 in calls and 0.2 in calls
        assert not any(k["op"] == "while" for k in kernels)
        times = [k["seconds_per_step"] for k in kernels]
        assert times == sorted(times, reverse=True) and times[-1] > 0
    assert json.loads(out.read_text())["results"][0]["kernels"]

    # A fusion is named after what its fused computation computes last.
    name = "jit(step)/jit(_online_grad)/while/body/closed_call/jvp(vmap())"
    hlo = f"""
%f (p: f32[64,128], q: f32[384,128]) -> f32[64,384] {{
  ROOT %d = f32[64,384]{{1,0}} dot(%p, %q), metadata={{op_name="{name}/dot_general"}}
}}

%main () -> f32[128,384] {{
  %while.3 = (s32[], f32[4]{{0}}) while(%tuple.1), condition=%c, body=%b
  %ynn_fusion.2 = f32[64,384]{{1,0}} fusion(%p, %q), kind=kCustom, calls=%f
  ROOT %dot.17 = f32[128,384]{{1,0}} dot(%a, %b), lhs_contracting_dims={{0}}
}}
"""
    found = module.instructions(hlo)
    assert found["ynn_fusion.2"] == (
        "fusion/kCustom",
        "f32[64,384]",
        "jvp(vmap())/dot_general",
    )
    assert found["dot.17"] == ("dot", "f32[128,384]", "")
    assert "while.3" not in found


def test_training_benchmark_merges_fresh_processes(tmp_path):
    configs = _load("benchmarks/configs.py")
    key = {"model": "GRU", "hidden": 8, "batch": 64, "T": 3}

    def run(step, fastest, temp, compile_s):
        # Two measurements per process, in the same order in every process.
        return [
            {**key, "algorithm": "BPTT", "step_seconds": step,
             "step_seconds_min": fastest, "temp_bytes": temp,
             "compile_seconds": compile_s, "setup_seconds": None},
            {**key, "algorithm": "D-RTRL", "step_seconds": 10 * step,
             "step_seconds_min": 10 * fastest, "temp_bytes": 7,
             "compile_seconds": compile_s, "setup_seconds": 0.1},
        ]  # fmt: skip

    # Medians that a mean would miss (1.5 against 1.83, 2.0 against 2.33, 100
    # against 133.3), and a fastest call that only the minimum gives.
    runs = [run(3.0, 2.5, 100, 1.0), run(1.0, 0.9, 250, 2.0), run(1.5, 1.4, 50, 4.0)]
    bptt, drtrl = configs.merge_processes(runs)
    assert bptt["algorithm"] == "BPTT" and drtrl["algorithm"] == "D-RTRL"
    assert bptt["step_seconds"] == 1.5 and bptt["step_seconds_min"] == 0.9
    assert bptt["temp_bytes"] == 100 and isinstance(bptt["temp_bytes"], int)
    assert bptt["compile_seconds"] == 2.0
    assert bptt["step_seconds_processes"] == [3.0, 1.0, 1.5]
    assert bptt["setup_seconds"] is None and drtrl["setup_seconds"] == 0.1
    assert drtrl["step_seconds"] == 15.0 and drtrl["step_seconds_min"] == 9.0

    # End to end: each process writes its own JSON; the merged record says how many.
    module = _load("benchmarks/training.py")
    out = tmp_path / "training.json"
    sizes = ["--models", "gru", "--gru-hidden", "4", "--gru-lengths", "3"]
    argv = [*sizes, "--algorithms", "BPTT", "--repeats", "1", "--processes", "2"]
    (row,) = module.main([*argv, "--out", str(out)])
    assert len(row["step_seconds_processes"]) == 2
    assert json.loads(out.read_text())["processes"] == 2


def test_training_benchmark_steps_lower_for_a_gpu():
    # The suite runs unchanged on JAX's default backend. With no GPU here, each
    # step that `training.py` times is exported for CUDA (lowering needs no GPU):
    # every method lowers, and without the rewrites made for XLA on the CPU only
    # (the kept-one multiplies and turned weights, which pass through
    # `optimization_barrier`). Control: exported for the CPU, each online step
    # has them, so the count can see them.
    from jax import export

    configs = _load("benchmarks/configs.py")
    training = _load("benchmarks/training.py")
    lowered = []
    for family in ("gru", "lif"):
        config = configs.Config(configs.FAMILIES[family], 4, 2)
        for name in [*training.algorithms(), "BPTT"]:
            if not training.applies(name, config):
                continue
            step, args = training.step_function(config, name)
            barriers = {}
            for platform in ("cuda", "cpu"):
                exported = export.export(jax.jit(step), platforms=[platform])(*args)
                text = exported.mlir_module()
                barriers[platform] = text.count("stablehlo.optimization_barrier")
            assert barriers["cuda"] == 0, (family, name)
            assert (barriers["cpu"] > 0) == (name != "BPTT"), (family, name)
            lowered.append((family, name))
    # Every method is exported on the LIF network.
    assert {n for f, n in lowered if f == "lif"} == {*training.algorithms(), "BPTT"}


def test_products_benchmark_smoke(tmp_path):
    import jax.random as jr
    import numpy as np

    module = _load("benchmarks/products.py")
    out = tmp_path / "products.json"
    sizes = ["--models", "gru", "--gru-hidden", "8", "--gru-lengths", "10"]
    rows = module.main([*sizes, "--repeats", "1", "--out", str(out)])
    # The GRU's two weight products, and not its biases.
    assert [r["products"] for r in rows] == [[[24, 10], [24, 8]]]
    assert json.loads(out.read_text())["results"][0]["floor_seconds"] > 0

    # Both floors form each step's read-out from that step's forward product and
    # input, the chunked one five or ten steps at a time.
    ops = module.operands([(6, 3), (2, 5)], batch=4, length=20, key=jr.key(0))
    want = [np.einsum("tnm,tnc->cm", np.einsum("mc,tnc->tnm", w, x), x) for w, x in ops]
    want[1] = want[1].T  # more columns than rows: not turned
    assert min(np.abs(w).max() for w in want) > 1
    floors = [module.per_step_floor(ops)]
    floors += [module.chunked_floor(ops, chunk) for chunk in (5, 10)]
    for got in floors:
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


PNG = b"\x89PNG\r\n\x1a\n"


def test_model_parallel_smoke(tmp_path):
    # Imported, the example keeps the devices of this process (one, unless
    # `XLA_FLAGS` says otherwise): the meshes that fit. The four meshes and
    # training on 2x2 run in `model_parallel_check.py` (`test_shard.py`, slow).
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/model_parallel.py")
    out = tmp_path / "model_parallel.png"
    sizes = "--hidden 8 --inputs 3 --batch 4 --length 5 --steps 2".split()
    result = module.main([*sizes, "--plot", str(out)])
    fit = [f"{a}x{b}" for a, b in module.MESHES if a * b <= jax.device_count()]
    assert [r["mesh"] for r in result["memory"]] == fit
    assert result["memory"][0]["bytes_per_device"] > 0
    assert len(result["losses"]) == 2 and all(map(math.isfinite, result["losses"]))
    assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "script",
    [
        "examples/evidence_accumulation.py",
        "examples/equinox_embedding.py",
        "examples/gradient_fidelity.py",
        "examples/custom_algorithm.py",
        "examples/streaming.py",
        "examples/reward_modulated.py",
    ],
)
def test_example_help_exits_zero(script, capsys):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    module = _load(script)
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_streaming_smoke(tmp_path, capsys):
    import numpy as np

    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/streaming.py")
    out = tmp_path / "streaming.png"
    sizes = "--steps 26 --segment 4 --batch 4 --hidden 8 --per-call-steps 3"
    summary = module.main([*sizes.split(), "--out", str(out)])
    printed = capsys.readouterr().out
    head = next(line for line in printed.splitlines() if line.startswith("method"))
    assert "final loss" in head and "s/step" in head and "traces/stream" in head
    assert "memoryless baseline" in printed
    results = summary["results"]
    assert set(results) == {"step", "segment 1", "segment sqrt(L)", "segment L"}
    # The stream is cut to whole segments: 6 of 4 steps.
    assert results["step"]["updates"] == 24 and results["segment L"]["updates"] == 6
    step = results["step"]
    for r in results.values():
        assert r["losses"].shape == (24,) and np.all(np.isfinite(r["losses"]))
        assert r["seconds_per_step"] > 0 and math.isfinite(r["final_loss"])
        # Every run sees the same streams from the same initial network.
        np.testing.assert_array_equal(r["baselines"], step["baselines"])
        np.testing.assert_allclose(r["losses"][0], step["losses"][0], rtol=1e-5)
    # Before their first update the per-segment runs are the same computation.
    first = [r["losses"][:4] for n, r in results.items() if n != "step"]
    for losses in first[1:]:
        np.testing.assert_array_equal(losses, first[0])
    # A jitted call per step computes what the scanned loop does.
    assert len(summary["per_call"]["losses"]) == 3
    assert summary["per_call"]["difference"] < 1e-5
    assert summary["memory_bytes"] > 0
    assert out.read_bytes()[:8] == PNG


def test_evidence_accumulation_smoke(tmp_path):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/evidence_accumulation.py")
    out = tmp_path / "cues.png"
    sizes = (
        "--steps 3 --batch 4 --lif 4 --alif 4 --cues 3 --cue-steps 2 --gap-steps 1 "
        "--delay 2 --recall-steps 2 --population 2 --test-size 8"
    ).split()
    results = module.main([*sizes, "--plot", str(out)])
    assert set(results) == {"eprop", "es_d_rtrl", "bptt"}
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1
        assert 0 <= r["firing_rate"] <= 1
        assert r["seconds_per_step"] > 0
        assert r["memory_bytes"] > 0
        assert len(r["losses"]) == 3
        assert all(math.isfinite(v) for v in (r["loss"], r["train_loss"]))
    # e-prop keeps a trace per synapse; ES-D-RTRL a factored one.
    assert results["eprop"]["memory_bytes"] > results["es_d_rtrl"]["memory_bytes"]
    assert out.read_bytes()[:8] == PNG


def test_evidence_accumulation_task_layout():
    import jax.numpy as jnp
    import jax.random as jr

    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/evidence_accumulation.py")
    task = module.CueTask(
        cues=3,
        cue_steps=2,
        gap_steps=1,
        delay=2,
        recall_steps=2,
        population=2,
        cue_rate=1.0,
        noise_rate=0.0,
        batch=16,
    )
    xs, targets = task.sample(jr.key(0))
    assert xs.shape == (task.num_steps, 16, 8)
    assert targets.shape == (task.num_steps, 16)
    # With certain spikes and no noise, the label is the side with more bursts.
    left = jnp.sum(xs[:, :, 0], axis=0)
    right = jnp.sum(xs[:, :, 2], axis=0)
    assert bool(jnp.all((right > left) == (targets[0] == 1)))
    assert bool(jnp.all(xs[task.recall_start :, :, 4:6] == 1))
    assert float(jnp.sum(task.mask())) == task.recall_steps


def test_equinox_embedding_smoke(tmp_path):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    module = _load("examples/equinox_embedding.py")
    out = tmp_path / "embedding.png"
    sizes = "--steps 4 --batch 4 --hidden 8 --features 8 --digits-per-stream 3"
    summary = module.main([*sizes.split(), "--plot", str(out)])
    # Resuming from the checkpoint reproduces the uninterrupted run exactly; fresh
    # traces do not.
    assert summary["resume_difference"] == 0.0
    assert summary["fresh_traces_difference"] > 0.0
    # The encoder gets a gradient from the same step as the GRU; the projection none.
    assert all(v > 0 for v in summary["first_step_grad_norms"].values())
    assert summary["frozen_parameters"] == 8 * 8
    assert 0 <= summary["accuracy"] <= 1
    assert len(summary["losses"]) == 4
    assert out.read_bytes()[:8] == PNG


def test_gradient_fidelity_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    module = _load("examples/gradient_fidelity.py")
    out = tmp_path / "fidelity.png"
    sizes = "--hidden 4 --length 6 --batch 2 --uoro-samples 1"
    rows = module.main(
        [*sizes.split(), "--algorithms", "RTRL", "OSTTP", "--plot", str(out)]
    )
    assert set(rows) == {"RTRL", "OSTTP"}
    # RTRL is exact (float64 by default); OSTTP follows a projection of the target.
    assert rows["RTRL"]["error"] < 1e-9 and rows["RTRL"]["cosine"] > 1 - 1e-9
    assert rows["RTRL"]["not_exact"] == []
    assert rows["OSTTP"]["error"] > 1e-6
    for r in rows.values():
        assert r["trace_bytes"] > 0
        assert set(r["per_parameter"]) >= {"synapses.weight", "readout.weight"}
    assert out.read_bytes()[:8] == PNG


def test_results_page_smoke(tmp_path):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("benchmarks/results.py")
    measured = module.run_task(
        "copying_task", tmp_path, ["--steps", "2", "--hidden", "8", "--batch", "4"]
    )
    assert measured["settings"]["steps"] == 2
    assert "out" not in measured["settings"]
    assert set(measured["methods"]) >= {"d_rtrl", "bptt"}
    meta = {
        "command": "nox -s results",
        "date": "today",
        "wall_seconds": 1.0,
        "machine": module.machine(),
    }
    page = module.render(meta, {"copying_task": measured})
    assert page.startswith("# Measured results\n")
    assert "nox -s results" in page and "`--steps 2`" in page
    head = next(line for line in page.splitlines() if line.startswith("| method"))
    rows = [line for line in page.splitlines() if line.startswith("| D-RTRL")]
    assert len(rows) == 1 and rows[0].count("|") == head.count("|")
    assert "| BPTT |" in page


def test_deep_stack_smoke():
    pytest.importorskip("optax")
    pytest.importorskip("sklearn")
    module = _load("examples/deep_stack.py")
    sizes = "--steps 3 --batch 8 --width 8 --depths 1 --cell minlstm".split()
    results = module.main(sizes)
    assert set(results) == {1} and set(results[1]) == {"d_rtrl", "bptt"}
    for r in results[1].values():
        assert 0 <= r["accuracy"] <= 1
        assert len(r["losses"]) == 3 and np.isfinite(r["losses"]).all()
        assert r["memory_bytes"] > 0
    # The first step starts from the same network and batch: the same loss.
    first = [r["losses"][0] for r in results[1].values()]
    assert abs(first[0] - first[1]) < 1e-5


def test_reward_modulated_smoke(tmp_path):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/reward_modulated.py")
    out = tmp_path / "reward.png"
    sizes = "--steps 3 --batch 4 --hidden 8 --evidence-steps 3 --delay 1 --test-size 8"
    summary = module.main([*sizes.split(), "--plot", str(out)])
    results = summary["results"]
    assert set(results) == {"three_factor", "d_rtrl"}
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1 and 0 < r["expected_reward"] < 1
        assert len(r["rewards"]) == 3 and np.isfinite(r["expected_rewards"]).all()
        assert r["seconds_per_step"] > 0 and r["memory_bytes"] > 0
    assert summary["chance"] == pytest.approx(1 / 3)
    assert 0 <= summary["ideal"] <= 1
    assert out.read_bytes()[:8] == PNG


def test_reward_modulated_gradient_is_reinforce():
    # On the minGRU, D-RTRL's traces are exact: ThreeFactor with the modulator of
    # the example is the REINFORCE estimate, BPTT's gradient of the surrogate
    # `-(R - b) log pi(a)` at the decision step, for every parameter.
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    import etrace

    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    module = _load("examples/reward_modulated.py")
    task = module.ChoiceTask(
        options=3, evidence_steps=4, delay=2, signal=0.5, noise=1.0, batch=5
    )
    model = module.Agent(task.n_in, 6, 3, key=jr.key(0))
    xs, _ = task.sample(jr.key(1))
    actions = jr.randint(jr.key(2), (5,), 0, 3)
    advantages = jr.normal(jr.key(3), (5,), jnp.float32)
    state = jnp.zeros(6, jnp.float32)
    learner, _ = etrace.compile(
        model, xs[0, 0], state=state, algorithm=etrace.ThreeFactor()
    )
    grads = module.reinforce_gradient(learner, model, xs, actions, advantages)
    targets = (
        jnp.broadcast_to(actions, xs.shape[:2]),
        jnp.broadcast_to(advantages, xs.shape[:2]),
    )
    want, _ = etrace.bptt_grad(
        module.policy_loss,
        model,
        jnp.broadcast_to(state, (5, 6)),
        xs,
        targets,
        mask=task.mask(),
        batched=True,
    )
    got, wanted = (jax.tree.leaves(eqx.filter(g, eqx.is_array)) for g in (grads, want))
    assert len(got) == 6
    for g, w in zip(got, wanted):
        assert float(jnp.abs(w).max()) > 1e-3  # not vacuous
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # Negative control: the modulator of another choice gives another gradient.
    other = module.reinforce_gradient(learner, model, xs, (actions + 1) % 3, advantages)
    difference = other.cell.linear.weight - grads.cell.linear.weight
    assert float(jnp.abs(difference).max()) > 1e-3


def test_online_lru_smoke(tmp_path):
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    module = _load("examples/online_lru.py")
    out = tmp_path / "lru.png"
    sizes = "--delays 2 40 --train-delays 2 --steps 2 --digit-steps 2 --width 4"
    # A ratio no delay reaches here: the search is checked on its own below.
    sizes = [*sizes.split(), "--gru-hidden", "4", "--batch", "4", "--ratio", "1e6"]
    results = module.main([*sizes, "--eval-batch", "8", "--out", str(out)])
    memory = results["memory"]
    assert {2, 40} <= set(memory)
    # BPTT keeps every step, D-RTRL's traces do not grow with the delay.
    assert memory[40]["bptt"] > memory[2]["bptt"]
    assert memory[40]["bptt"] / memory[40]["d_rtrl"] > (
        memory[2]["bptt"] / memory[2]["d_rtrl"]
    )
    assert results["first"] is None
    assert set(results["copy"]) == {2}
    assert set(results["copy"][2]) == {"d_rtrl", "bptt"}
    assert set(results["digits"]) == set(module.LABELS)
    for r in results["digits"].values():
        assert 0 <= r["accuracy"] <= 1
        assert len(r["losses"]) == 2 and np.isfinite(r["losses"]).all()
    # The LRU stack starts from the same network and batch with both methods.
    first = [results["digits"][n]["losses"][0] for n in ("lru_d_rtrl", "lru_bptt")]
    assert abs(first[0] - first[1]) < 1e-5
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_lru_first_delay_at_ratio(monkeypatch):
    module = _load("examples/online_lru.py")
    # BPTT's memory grows linearly with the delay, D-RTRL's does not.
    probed = []

    def fake(args, delay):
        probed.append(delay)
        return {"d_rtrl": 100, "bptt": 10 * delay + 5}

    monkeypatch.setattr(module, "copy_memory", fake)
    args = module.parse_args(["--ratio", "20"])
    table = {d: fake(args, d) for d in (100, 1000, 5000)}
    # 10 d + 5 >= 20 * 100 first at d = 200, between the measured 100 and 1000.
    assert module.first_delay_at_ratio(args, table) == 200
    assert 199 in table and table[199]["bptt"] < 2000 <= table[200]["bptt"]
    assert len(probed) < 3 + 12  # a bisection, not a scan
    args = module.parse_args(["--ratio", "1000"])
    assert module.first_delay_at_ratio(args, {5: fake(args, 5)}) is None
