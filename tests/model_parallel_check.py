"""Run in a subprocess with 4 virtual CPU devices (see `test_shard.py`): traces,
hidden state and traced weight rows split along neurons (`etrace.shard_traces`,
`etrace.shard_params`) against one device."""

import json
import re
import sys

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import etrace  # noqa: E402
from etrace._shard import neuron_axes  # noqa: E402
from etrace.testing._families import build  # noqa: E402


sys.path.insert(0, "examples")
import model_parallel  # noqa: E402


N_IN, HIDDEN, N_OUT, BATCH, LENGTH = 3, 8, 2, 4, 6
MESHES = {"2x2": (2, 2), "1x4": (1, 4)}
COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%(\S+) = (.*?) (all-gather-start|all-gather|all-to-all|"
    r"collective-permute-start|collective-permute)\((.*?)\)"
)
DEFINITION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) [a-z][\w\-]*\(")
SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")


def loss_fn(y, target):
    return jnp.mean((y - target) ** 2)


def model_of(family):
    if family == "gru":
        return build("gru", N_IN, HIDDEN, N_OUT, 0)
    return model_parallel.build(N_IN, HIDDEN, N_OUT, jr.key(0))


def data(family):
    scale = 1.0 if family == "gru" else 3.0
    xs = scale * jr.normal(jr.key(1), (LENGTH, BATCH, N_IN))
    return xs, jr.normal(jr.key(2), (LENGTH, BATCH, N_OUT))


def firing_rate(model, state, xs):
    """The mean spike of the recurrent LIF network over the batch and time."""

    def body(state, x):
        _, state = model(x, state)
        return state, state.get(model.lif.z)

    run = jax.vmap(lambda xs: jax.lax.scan(body, state, xs)[1], in_axes=1)
    return float(jnp.mean(run(xs)))


def rel_error(a, b):
    pairs = zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(b))
    return max(
        float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-300))
        for x, y in pairs
    )


def train_step(learner, optimiser):
    """`online_grad` and an optax update, on the model's arrays (`dynamic`)."""

    def step(dynamic, static, opt_state, trace_state, xs, ys):
        model = eqx.combine(dynamic, static)
        grads, trace_state, losses = etrace.online_grad(
            learner, loss_fn, model, trace_state, xs, ys
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        params = eqx.filter(eqx.apply_updates(model, updates), eqx.is_array)
        return grads, params, opt_state, trace_state, losses

    return jax.jit(step, static_argnums=1)


def step_grad(learner, model, trace_state, x, y):
    """The gradient of one batched `learner.step`."""

    def loss(model):
        out, _ = learner.step(model, trace_state, x)
        return loss_fn(out, y)

    return eqx.filter_jit(eqx.filter_grad(loss))(model)


def split_leaves(learner, trace_state):
    """`(path, leaf, neuron axis, batch size)` of every trace array with a neuron
    axis (the axis counted in `leaf`, after the batch axis of a batched state)."""
    _, axes = neuron_axes(learner)
    lead = int(jnp.ndim(trace_state.t))
    out = []
    flat_axes = jtu.tree_leaves(axes, is_leaf=lambda a: a is None)
    flat = jtu.tree_flatten_with_path(trace_state.traces, is_leaf=lambda a: a is None)
    for (path, leaf), axis in zip(flat[0], flat_axes):
        if leaf is not None and axis is not None:
            batch = leaf.shape[0] if lead else 1
            out.append((jtu.keystr(path), leaf, axis + lead, batch))
    return out


def quarter_shards(learner, trace_state):
    """Whether every trace with a neuron axis, and every hidden group's state,
    holds a quarter of its entries on each device."""
    leaves = [leaf for _, leaf, _, _ in split_leaves(learner, trace_state)]
    state = jax.tree.leaves(trace_state.state)
    leaves += [state[i] for g in learner.graph.groups for i in g.leaves]
    return bool(leaves) and all(
        len(leaf.addressable_shards) == 4
        and all(4 * s.data.size == leaf.size for s in leaf.addressable_shards)
        for leaf in leaves
    )


def trace_threshold(learner, trace_state):
    """The fewest entries a device holds of a split trace with at least two
    entries per neuron-axis index (a weight's trace, a trace per output and
    state): a collective moving as many is moving a trace."""
    sizes = [
        leaf.addressable_shards[0].data.size
        for _, leaf, axis, batch in split_leaves(learner, trace_state)
        if leaf.size // leaf.shape[axis] // batch >= 2
    ]
    return min(sizes)


def trace_collectives(hlo: str, threshold: int) -> list[str]:
    """The all-gathers, all-to-alls and collective permutes of compiled `hlo`
    with an operand of at least `threshold` entries."""
    found, sizes = [], {}
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a new computation
            sizes = {}
            continue
        match = DEFINITION.match(line)
        if match:
            sizes[match.group(1)] = [
                int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in SHAPE.findall(match.group(2))
            ]
        match = COLLECTIVE.match(line)
        if match:
            operands = re.findall(r"%([\w.\-]+)", match.group(4))
            counts = [c for name in operands for c in sizes.get(name, [])]
            if any(c >= threshold for c in counts):
                found.append(line.strip()[:160])
    return found


def compiled_text(step, args):
    return step.lower(*args).compile().as_text()


def gathered(step, learner, mesh):
    """`step` with the largest split trace gathered onto every device first: the
    negative control of the collective check."""

    def control(dynamic, static, opt_state, trace_state, xs, ys):
        _, leaf, _, _ = max(split_leaves(learner, trace_state), key=lambda t: t[1].size)
        whole = NamedSharding(mesh, PartitionSpec())
        traces = jtu.tree_map(
            lambda a: jax.lax.with_sharding_constraint(a, whole) if a is leaf else a,
            trace_state.traces,
        )
        trace_state = eqx.tree_at(lambda t: t.traces, trace_state, traces)
        return step(dynamic, static, opt_state, trace_state, xs, ys)

    return jax.jit(control, static_argnums=1)


def run_case(family, algorithm):
    model, state = model_of(family)
    learner, _ = etrace.compile(
        model, jnp.zeros(N_IN), state=state, algorithm=algorithm
    )
    xs, ys = data(family)
    report = {}
    if family == "lif":
        report["firing_rate"] = firing_rate(model, state, xs)
    optimiser = optax.adam(1e-2)
    step = train_step(learner, optimiser)
    dynamic, static = eqx.partition(model, eqx.is_array)
    opt_state = optimiser.init(dynamic)
    ts = learner.init(batch_size=BATCH)
    single = step(dynamic, static, opt_state, ts, xs, ys)
    single_step = step_grad(learner, model, ts, xs[0], ys[0])
    for name, shape in MESHES.items():
        mesh = model_parallel.mesh_of(shape)
        smodel, sopt, sts, sxs, sys_ = model_parallel.place(
            learner, optimiser, model, ts, xs, ys, mesh
        )
        sdynamic = eqx.filter(smodel, eqx.is_array)
        args = (sdynamic, static, sopt, sts, sxs, sys_)
        compiled = step.lower(*args).compile()
        out = compiled(*args[:1], *args[2:])  # `static` is compiled in
        threshold = trace_threshold(learner, sts)
        report[name] = {
            "grad_error": rel_error(out[0], single[0]),
            "params_error": rel_error(out[1], single[1]),
            "traces_error": rel_error(out[3], single[3]),
            "step_grad_error": rel_error(
                step_grad(learner, smodel, sts, sxs[0], sys_[0]), single_step
            ),
            "quarter_in": quarter_shards(learner, sts),
            "quarter_out": quarter_shards(learner, out[3]),
            "weight_rows": list(
                smodel.cell.weight_hh.addressable_shards[0].data.shape
                if family == "gru"
                else smodel.w_rec.weight.addressable_shards[0].data.shape
            ),
            "threshold": threshold,
            "trace_collectives": trace_collectives(compiled.as_text(), threshold),
        }
        if name == "2x2" and algorithm.chunk_refusal(learner.graph) is None:
            # D-RTRL's chunks (`chunk=3`: two chunks of three steps).
            chunked = eqx.filter_jit(etrace.online_grad)(
                learner, loss_fn, smodel, sts, sxs, sys_, chunk=3
            )
            report[name]["chunk_error"] = rel_error(chunked[0], single[0])
        if name == "1x4":  # one negative control per case keeps the run short
            control = compiled_text(gathered(step, learner, mesh), args)
            report[name]["control_collectives"] = trace_collectives(control, threshold)
    return report


def unbatched_error():
    """An unbatched trace state split along neurons only (`online_grad`)."""
    model, state = model_of("lif")
    learner, ts = etrace.compile(model, jnp.zeros(N_IN), state=state)
    xs, ys = data("lif")
    xs, ys = xs[:, 0], ys[:, 0]
    grad = eqx.filter_jit(etrace.online_grad)
    single = grad(learner, loss_fn, model, ts, xs, ys)[0]
    mesh = model_parallel.mesh_of((1, 4))
    smodel = etrace.shard_params(model, learner, mesh, neuron_axis="model")
    sts = etrace.shard_traces(ts, learner, mesh, neuron_axis="model")
    sharded, out, _ = grad(learner, loss_fn, smodel, sts, xs, ys)
    return rel_error(sharded, single), quarter_shards(learner, out)


def errors():
    model, state = model_of("lif")
    learner, ts = etrace.compile(model, jnp.zeros(N_IN), state=state)
    es, es_ts = etrace.compile(
        model, jnp.zeros(N_IN), state=state, algorithm=etrace.ES_D_RTRL(decay=0.5)
    )
    odd, odd_state = model_parallel.build(N_IN, 6, N_OUT, jr.key(0))
    odd_learner, odd_ts = etrace.compile(odd, jnp.zeros(N_IN), state=odd_state)
    rtrl, rtrl_ts = etrace.compile(
        model, jnp.zeros(N_IN), state=state, algorithm=etrace.RTRL()
    )
    mesh = model_parallel.mesh_of((2, 2))
    line = model_parallel.mesh_of((1, 4))
    calls = {
        "indivisible": lambda: etrace.shard_traces(
            odd_ts, odd_learner, line, neuron_axis="model"
        ),
        "indivisible_params": lambda: etrace.shard_params(
            odd, odd_learner, line, neuron_axis="model"
        ),
        "axis_name": lambda: etrace.shard_traces(ts, learner, mesh, neuron_axis="x"),
        "batch_axis_name": lambda: etrace.shard_traces(
            learner.init(batch_size=4),
            learner,
            mesh,
            neuron_axis="model",
            batch_axis="batch",
        ),
        "params_axis_name": lambda: etrace.shard_params(
            model, learner, mesh, neuron_axis="neurons"
        ),
        "mismatch": lambda: etrace.shard_traces(
            es_ts, learner, mesh, neuron_axis="model"
        ),
        "mismatch_shape": lambda: etrace.shard_traces(
            odd_ts, learner, mesh, neuron_axis="model"
        ),
        "params_mismatch": lambda: etrace.shard_params(
            odd, learner, mesh, neuron_axis="model"
        ),
        "joint": lambda: etrace.shard_traces(rtrl_ts, rtrl, mesh, neuron_axis="model"),
        "joint_params": lambda: etrace.shard_params(
            model, rtrl, mesh, neuron_axis="model"
        ),
        "unbatched": lambda: etrace.shard_traces(
            ts, learner, mesh, neuron_axis="model", batch_axis="data"
        ),
        "same_axis": lambda: etrace.shard_traces(
            learner.init(batch_size=4),
            learner,
            mesh,
            neuron_axis="model",
            batch_axis="model",
        ),
        "batch": lambda: etrace.shard_traces(
            learner.init(batch_size=3),
            learner,
            mesh,
            neuron_axis="model",
            batch_axis="data",
        ),
        "not_a_mesh": lambda: etrace.shard_traces(ts, learner, "mesh", neuron_axis="m"),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except etrace.EtraceError as err:
            out[name] = str(err)
    return out


def cuda_export():
    """The sharded training step exported for CUDA (lowering needs no GPU): the
    module keeps the split of the traces, and none of the rewrites made for XLA on
    the CPU only (which pass through `optimization_barrier`)."""
    from jax import export

    model, state = model_of("lif")
    learner, _ = etrace.compile(model, jnp.zeros(N_IN), state=state)
    xs, ys = data("lif")
    optimiser = optax.adam(1e-2)
    step = train_step(learner, optimiser)
    mesh = model_parallel.mesh_of((2, 2))
    smodel, *rest = model_parallel.place(
        learner, optimiser, model, learner.init(batch_size=BATCH), xs, ys, mesh
    )
    dynamic, static = eqx.partition(smodel, eqx.is_array)
    args = (dynamic, *rest)
    shardings = jax.tree.map(lambda a: a.sharding, args)
    placed = jax.jit(
        lambda *args: step(args[0], static, *args[1:]), in_shardings=shardings
    )
    out = {}
    for platform in ("cuda", "cpu"):
        exported = export.export(placed, platforms=[platform])(*args)
        text = exported.mlir_module()
        out[platform] = {
            "devices": exported.nr_devices,
            "trace_split": '[{"data"}, {}, {"model"}, {}, {}]' in text,
            "barriers": text.count("stablehlo.optimization_barrier"),
        }
    return out


class MaskedLIF(eqx.Module):
    """The recurrent LIF network with a constant mask on its recurrent weight."""

    net: model_parallel.Net
    mask: jax.Array

    def __call__(self, x, state):
        net = self.net
        w_rec = jnp.where(self.mask, net.w_rec.weight, 0.0)
        current = net.w_in(x) + w_rec @ state.get(net.lif.z)
        z, state = net.lif(current, state)
        return net.readout(z), state


def masked_model():
    net, state = model_of("lif")
    mask = jr.bernoulli(jr.key(3), 0.5, (HIDDEN, HIDDEN))
    return MaskedLIF(net, mask), state


def other_algorithms():
    """The other algorithms of the diagonal family on the LIF network: the
    single-device gradient of `online_grad` against `1x4` and `2x2` meshes, and how
    many of their trace arrays are split along neurons."""
    model, state = model_of("lif")
    xs, ys = data("lif")
    modulators = jnp.cos(jnp.arange(LENGTH * BATCH)).reshape(LENGTH, BATCH)
    algorithms = {
        "EProp": etrace.EProp(),
        "EProp(random, kappa)": etrace.EProp(feedback="random", kappa=0.8),
        "OSTLFeedforward": etrace.OSTLFeedforward(),
        "OSTLRecurrent": etrace.OSTLRecurrent(),
        "OSTTP": etrace.OSTTP(),
        "ThreeFactor": etrace.ThreeFactor(),
        "RFLO": etrace.RFLO(tau=5.0),
        "OTPE": etrace.OTPE(decay=0.8),
        "OTPE(approx)": etrace.OTPE(decay=0.8, approx=True),
        "OTTT": etrace.OTTT(decay=0.8),
    }
    algorithms["D_RTRL(masked)"] = etrace.D_RTRL()
    grad = eqx.filter_jit(etrace.online_grad)
    out = {}
    for name, algorithm in algorithms.items():
        if name == "D_RTRL(masked)":  # kept at the mask's non-zeros, whole
            model, state = masked_model()
        learner, _ = etrace.compile(
            model, jnp.zeros(N_IN), state=state, algorithm=algorithm
        )
        extra = algorithm.learning_signal == "modulator"
        kwargs = {"modulators": modulators} if extra else {}
        ts = learner.init(batch_size=BATCH)
        single = grad(learner, loss_fn, model, ts, xs, ys, **kwargs)[0]
        for shape in ((1, 4), (2, 2)):
            mesh = model_parallel.mesh_of(shape)
            smodel, _, sts, sxs, sys_ = model_parallel.place(
                learner, optax.sgd(1.0), model, ts, xs, ys, mesh
            )
            if extra:
                kwargs = {
                    "modulators": etrace.shard_batch(
                        modulators, mesh, axis=1, axis_name="data"
                    )
                }
            sharded = grad(learner, loss_fn, smodel, sts, sxs, sys_, **kwargs)[0]
            leaves = jax.tree.leaves(sts.traces)
            out[f"{name} {shape[0]}x{shape[1]}"] = {
                "error": rel_error(sharded, single),
                "split": sum("model" in str(a.sharding.spec) for a in leaves),
                "traces": len(leaves),
            }
    return out


def main():
    if "--slow" in sys.argv:
        report = {"algorithms": other_algorithms()}
        sizes = "--hidden 8 --inputs 3 --batch 4 --length 5 --steps 2".split()
        example = model_parallel.main([*sizes, "--plot", "/dev/null"])
        report["example"] = {"meshes": [r["mesh"] for r in example["memory"]]}
        report["example"].update(mesh=example["mesh"], losses=example["losses"])
        print(json.dumps(report))
        return
    report = {"devices": jax.device_count()}
    report["gru_d_rtrl"] = run_case("gru", etrace.D_RTRL())
    report["lif_d_rtrl"] = run_case("lif", etrace.D_RTRL())
    report["lif_es_d_rtrl"] = run_case("lif", etrace.ES_D_RTRL(decay=0.6))
    report["unbatched_error"], report["unbatched_quarter"] = unbatched_error()
    report["errors"] = errors()
    report["export"] = cuda_export()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
