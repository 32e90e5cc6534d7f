"""Model parallelism: traces, hidden state and traced weight rows split along
neurons over 4 virtual CPU devices (in a subprocess: the device count is fixed
when JAX starts; the checks run in `model_parallel_check.py`)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).parent.parent
CASES = ["gru_d_rtrl", "lif_d_rtrl", "lif_es_d_rtrl"]
MESHES = ["2x2", "1x4"]


def _run_check(*args):
    devices = "--xla_force_host_platform_device_count=4"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "model_parallel_check.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return _run_check()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES)
def test_split_along_neurons_equals_one_device(report, case, mesh):
    assert report["devices"] == 4
    if case.startswith("lif"):  # a network that never or always spikes proves nothing
        assert 0 < report[case]["firing_rate"] < 1
    r = report[case][mesh]
    # `online_grad`'s gradient, the traces after it, the parameters after an optax
    # (adam) update, and the gradient of one batched `learner.step`.
    for key in ("grad_error", "traces_error", "params_error", "step_grad_error"):
        assert r[key] < 1e-10, (key, r[key])


@pytest.mark.parametrize("case", ["gru_d_rtrl", "lif_d_rtrl"])
def test_split_along_neurons_in_chunks(report, case):
    # `online_grad(..., chunk=3)` on the 2x2 mesh: the step-by-step gradient of
    # one device.
    assert report[case]["2x2"]["chunk_error"] < 1e-10


def test_neurons_only_split_of_an_unbatched_trace_state(report):
    assert report["unbatched_error"] < 1e-10
    assert report["unbatched_quarter"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES)
def test_every_device_holds_a_quarter_of_every_trace(report, case, mesh):
    r = report[case][mesh]
    # Before the step (as placed) and after it (as XLA left them).
    assert r["quarter_in"] and r["quarter_out"]
    rows = {"2x2": 8 // 2, "1x4": 8 // 4}[mesh]
    if case.startswith("gru"):  # 3H = 24 rows of `weight_hh`
        rows *= 3
    assert r["weight_rows"] == [rows, 8]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES)
def test_no_trace_sized_collective(report, case, mesh):
    # No all-gather, all-to-all or collective permute in the compiled step moves
    # as many entries as a device's share of a trace.
    assert report[case][mesh]["trace_collectives"] == []


@pytest.mark.parametrize("case", CASES)
def test_the_collective_check_sees_a_gathered_trace(report, case):
    # Negative control: the same step with one trace gathered onto every device
    # first (`with_sharding_constraint` to replicated) is caught.
    found = report[case]["1x4"]["control_collectives"]
    assert found and all("all-gather" in line for line in found)


def test_sharded_step_lowers_for_a_gpu(report):
    # Exported for CUDA on the 2x2 mesh (lowering needs no GPU): four devices,
    # the batched traces split over `data` and along neurons over `model`, and no
    # CPU-only rewrite. Control: exported for the CPU, the step has them.
    cuda, cpu = report["export"]["cuda"], report["export"]["cpu"]
    assert cuda["devices"] == 4 and cuda["trace_split"]
    assert cuda["barriers"] == 0 and cpu["barriers"] > 0


@pytest.mark.parametrize(
    "case, match",
    [
        ("indivisible", r"Hidden group `lif.z\+lif.v` has 6 neurons, not a multiple"),
        ("indivisible_params", r"has 6 neurons, not a multiple of the 4 devices"),
        ("axis_name", r"`neuron_axis='x'` is not an axis of the mesh"),
        ("batch_axis_name", r"`batch_axis='batch'` is not an axis of the mesh"),
        ("params_axis_name", r"`neuron_axis='neurons'` is not an axis of the mesh"),
        ("mismatch", r"does not have the structure of this learner's \(D_RTRL\)"),
        ("mismatch_shape", r"state leaf `lif.z` has shape \(6,\), where this"),
        ("params_mismatch", r"`model` does not have the structure and shapes"),
        ("joint", r"RTRL keeps whole-state traces .* cannot be split along neurons"),
        ("joint_params", r"RTRL keeps whole-state traces"),
        ("unbatched", r"`batch_axis='data'` was given, but the trace state has no"),
        ("same_axis", r"`batch_axis` and `neuron_axis` are both 'model'"),
        ("batch", r"batch size 3, not a multiple of the 2 devices of mesh axis 'data'"),
        ("not_a_mesh", r"`mesh` must be a `jax.sharding.Mesh`"),
    ],
)
def test_shard_traces_errors(report, case, match):
    message = report["errors"][case]
    assert message is not None and re.search(match, message), message


@pytest.fixture(scope="module")
def slow_report():
    return _run_check("--slow")


@pytest.mark.slow
def test_the_diagonal_family_splits_along_neurons(slow_report):
    # The other algorithms whose traces are per neuron, on the LIF network: the
    # same gradient on 1x4 and 2x2 meshes as on one device. OTTT keeps only
    # presynaptic traces, which have no neuron axis; OTPE's approximation keeps
    # one per weight.
    report = slow_report["algorithms"]
    assert len(report) == 20
    for name, r in report.items():
        assert r["error"] < 1e-10, (name, r)
        if name.startswith("OTTT"):
            assert r["split"] == 0, (name, r)
        elif name.startswith("OTPE(approx)"):
            assert 0 < r["split"] < r["traces"], (name, r)
        else:
            assert r["split"] == r["traces"], (name, r)


@pytest.mark.slow
def test_model_parallel_example_on_four_devices(slow_report):
    # `examples/model_parallel.py` at tiny sizes: the four meshes, then training
    # on 2x2 (its smoke test in `test_examples.py` has the devices of the test
    # process).
    example = slow_report["example"]
    assert example["meshes"] == ["1x1", "1x4", "4x1", "2x2"]
    assert example["mesh"] == "2x2" and len(example["losses"]) == 2
