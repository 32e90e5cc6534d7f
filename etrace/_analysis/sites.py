"""Sites and units: where parameters enter the recurrent update, which group each
feeds, and the static structure the algorithms exploit (a masked weight's
structural zeros, the coupling of a group's states, units that share `Df`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _interpret
from .._graph import Site, Unit
from . import weights
from .classify import Classified
from .locality import Locality, Tail
from .model import split_model
from .trace import TracedStep


def _site_name(params: tuple[int, ...], paths: tuple[str, ...]) -> str:
    return "*".join(paths[i] for i in params) or "<constant>"


def _matrix_site(program, i: int, form: weights.Form, params, paths) -> Site:
    eqn = program.eqns[i]
    w = eqn.ins[form.w_pos]
    inputs = tuple(a for k, a in enumerate(eqn.ins) if k != form.w_pos)
    return Site(
        name=form.name.format(_site_name(params, paths)),
        kind="matrix",
        out=eqn.outs[0],
        weight=w,
        x=next((a for a in inputs if isinstance(a, int)), None),
        eqn=i,
        params=params,
        b=form.b,
        fw=form.fw,
        fx=form.fx,
        c=form.c,
        w_shape=tuple(program.aval(w).shape),
        w_perm=form.w_perm,
        y_perm=form.y_perm,
        dtype=program.avals[eqn.outs[0]].dtype,
        op=eqn.name,
        w_pos=form.w_pos,
        inputs=inputs,
        x_fn=form.x_fn,
    )


def _elementwise_site(program, v: int, params, paths) -> Site:
    shape = tuple(program.avals[v].shape)
    return Site(
        name=_site_name(params, paths),
        kind="elementwise",
        out=v,
        weight=v,
        x=None,
        eqn=None,
        params=params,
        b=1,
        fw=int(np.prod(shape, dtype=int)),
        fx=1,
        c=1,
        w_shape=shape,
        w_perm=tuple(range(len(shape))),
        y_perm=(),
        dtype=program.avals[v].dtype,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Sites:
    """The sites and units the compiler found.

    **Attributes:**

    - `sites`: every site that feeds a hidden group.
    - `units`: every (site, group) pair, in group order.
    - `cut_sites`: per weight operation (equation index), its site.
    - `site_of_out`: per site output variable, its site.
    - `mask_leaves`: non-parameter model arrays that a weight's structural zeros
        were read from: model-array index and where they were non-zero.
    """

    sites: tuple[Site, ...]
    units: tuple[Unit, ...]
    cut_sites: dict[int, Site]
    site_of_out: dict[int, Site]
    mask_leaves: tuple[tuple[int, np.ndarray], ...]


def _structure(
    model: Any, step: TracedStep, classified: Classified
) -> _interpret.Zeros:
    """The structural-zero domain over the step, with the model's non-parameter
    arrays known: `(mask * W)` is zero wherever a constant or a fixed `mask` is."""
    leaves, _, _ = split_model(model)
    invars = classified.program.invars
    known = {
        invars[k]: np.asarray(leaves[k])
        for k in range(step.n_dyn)
        if not step.layout.is_param[k]
    }
    opaque = classified.dyn.union(classified.pmask)
    return _interpret.Zeros(classified.program, known, opaque)


def _units(site: Site, program, local: Locality, groups) -> list[Unit]:
    """One unit per group that `site` feeds, with its neuron map."""
    v = site.out
    feeds = local.feeds(v)
    labels = site.canonical_y_np(np.arange(feeds.size).reshape(program.avals[v].shape))
    nodes = local.site_nodes[v][labels]
    out = []
    for g in sorted(set(int(x) for x in feeds[feeds >= 0])):
        mine = local.comp_group[local.comp[nodes]] == g
        nmap = np.where(mine, local.comp_idx[local.comp[nodes]], 0).astype(np.int32)
        out.append(Unit(f"{site.name} -> {groups[g].name}", site, groups[g], nmap))
    return out


def find_sites(
    model: Any,
    step: TracedStep,
    classified: Classified,
    tail: Tail,
    local: Locality,
) -> Sites:
    """The sites of the tail's weight outputs and parameter-only values that feed
    a hidden group, their units, and a masked weight's pattern of non-zeros."""
    program = classified.program
    structure = _structure(model, step, classified)
    paths = step.layout.paths
    sites: list[Site] = []
    units: list[Unit] = []
    used_names: dict[str, int] = {}
    for v in tail.site_outs:
        if not (local.feeds(v) >= 0).any():
            continue
        p = program.producer.get(v)
        if p is not None and p in classified.cuts:
            form = classified.forms[p]
            weight = program.eqns[p].ins[form.w_pos]
            params = classified.params_of(weight) if isinstance(weight, int) else ()
            site = _matrix_site(program, p, form, params, paths)
            pattern = site.canonical_w_np(structure.get(site.weight))
            if not pattern.all():
                site = dataclasses.replace(site, pattern=pattern)
        else:
            site = _elementwise_site(program, v, classified.params_of(v), paths)
        count = used_names.get(site.name, 0)
        used_names[site.name] = count + 1
        if count:
            site = dataclasses.replace(site, name=f"{site.name}#{count + 1}")
        sites.append(site)
        units.extend(_units(site, program, local, local.groups))
    units.sort(key=lambda u: local.groups.index(u.group))
    mask_leaves = ()
    if any(s.pattern is not None for s in sites):
        where = {v: k for k, v in enumerate(program.invars[: step.n_dyn])}
        mask_leaves = tuple(
            (where[v], np.asarray(structure.known[v]) != 0)
            for v in sorted(structure.used)
        )
    return Sites(
        sites=tuple(sites),
        units=tuple(units),
        cut_sites={s.eqn: s for s in sites if s.eqn is not None},
        site_of_out={s.out: s for s in sites},
        mask_leaves=mask_leaves,
    )


def coupling(program, eqns, leaves, sinks, state_vars):
    """`Group.coupling` of one group: which new states depend on which previous
    ones through its update `eqns`. Dependence is carried by inexact values only
    (a comparison's boolean result has no derivative) and is cut by
    `stop_gradient`, as in autodiff; anything else counts as a dependence."""
    seeds = {state_vars[j]: 1 << b for b, j in enumerate(leaves)}
    dep = _interpret.union_bits(
        program,
        eqns,
        seeds,
        cut={"stop_gradient"},
        carries=lambda aval: jnp.issubdtype(aval.dtype, jnp.inexact),
    )
    return tuple(
        tuple(
            isinstance(s, int) and bool(dep.get(s, 0) >> b & 1)
            for b in range(len(leaves))
        )
        for s in sinks
    )


def with_coupling(program, groups, units, group_tail, sinks, state_vars):
    """The groups with their `coupling` pattern, and the units pointing at them."""
    new = [
        dataclasses.replace(g, coupling=coupling(program, gt, g.leaves, s, state_vars))
        for g, gt, s in zip(groups, group_tail, sinks)
    ]
    by_old = {id(g): n for g, n in zip(groups, new)}
    units = [dataclasses.replace(u, group=by_old[id(u.group)]) for u in units]
    return tuple(new), tuple(units)


def _sum_root(program, eqns, v: int) -> int:
    """The variable whose cotangent `v` has in the update `eqns`: `v` itself, or,
    while `v` is read exactly once and by an `add` of its own shape and dtype (so
    that the add passes its cotangent through unchanged), that add's result."""
    while True:
        reads = [
            (program.eqns[i], pos)
            for i in eqns
            for pos, a in enumerate(program.eqns[i].ins)
            if a == v
        ]
        if len(reads) != 1 or reads[0][0].name not in ("add", "add_any"):
            return v
        (out,) = reads[0][0].outs
        if program.avals[out].shape != program.avals[v].shape or (
            program.avals[out].dtype != program.avals[v].dtype
        ):
            return v
        v = out


def _canonical_order(program, site: Site) -> np.ndarray:
    """Which element of the site's output each canonical output is."""
    shape = program.avals[site.out].shape
    return site.canonical_y_np(np.arange(int(np.prod(shape, dtype=int))).reshape(shape))


def with_same_df(program, groups, units, group_tail) -> tuple[Unit, ...]:
    """The units with `Unit.same_df` set: within a group, units whose site outputs
    reach the same sum (see `_sum_root`) and are laid out alike share their `Df`."""
    roots = []
    first: dict[tuple[int, int], Unit] = {}
    for u in units:
        g = groups.index(u.group)
        key = (g, _sum_root(program, group_tail[g], u.site.out))
        roots.append(key)
        # A matrix site keeps the shared trace where there is one (its input
        # trace is the larger), else the first unit.
        if key not in first or (
            first[key].site.kind != "matrix" and u.site.kind == "matrix"
        ):
            first[key] = u
    out = []
    for u, key in zip(units, roots):
        twin = first[key]
        s, t = u.site, twin.site
        alike = (
            twin is not u
            and key[1] != s.out
            and s.dtype == t.dtype
            and program.avals[s.out].shape == program.avals[t.out].shape
            and np.array_equal(u.nmap, twin.nmap)
            and np.array_equal(
                _canonical_order(program, s), _canonical_order(program, t)
            )
        )
        out.append(dataclasses.replace(u, same_df=twin.name) if alike else u)
    return tuple(out)
