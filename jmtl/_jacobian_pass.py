"""The per-task Jacobian pass: a named plan and one small function per chunking strategy.

:func:`make_plan` takes every "auto" decision of the engine in one place: what to
compute for the method, whether to chunk, and the final step. :func:`run` then picks one
strategy:

* :func:`_all_rows` -- one ``vmap`` over the VJP with all K one-hot cotangents;
* :func:`_chunked_rows` -- ``lax.map`` over chunks of cotangents, rows kept;
* :func:`_chunked_norms` -- chunks, only the gradient norms kept;
* :func:`_chunked_gram_forward` -- chunks, ``G[:, chunk] = J J_chunkᵀ`` as a forward-mode
  derivative of the losses (the Jacobian is never materialised);
* :func:`_chunked_gram_blocks` -- low precision: ``J_a J_bᵀ`` accumulated in float32.

Every strategy forms the Gramian from rows pre-scaled by a power of two (kept as
``scale``, :func:`jmtl.jacobian.scaled_gramian`), so it is finite for any finite J.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmtl import _task_vmap
from jmtl import jacobian as jac_lib
from jmtl._linearise import CONCAT, MEAN, Linearised
from jmtl.methods import base

__all__ = ["AUTO", "COMBINE", "VJP", "FINAL_STEPS", "AUTO_FEATURES_CHUNK", "GEMM", "VMAP",
           "TASK_BATCHINGS", "Plan", "Stats", "make_plan", "run"]

AUTO = "auto"
COMBINE = "combine"
VJP = "vjp"
FINAL_STEPS = (AUTO, COMBINE, VJP)

# How the per-task VJP is batched over tasks: jmtl._task_vmap.vmap_rows (each weight
# gradient one GEMM over all tasks) or plain jax.vmap. Same numbers; see jmtl._task_vmap.
GEMM = "gemm"
VMAP = "vmap"
TASK_BATCHINGS = (GEMM, VMAP)

# Tasks per chunk of the automatic features-mode Gramian (see ``chunk_size``).
AUTO_FEATURES_CHUNK = 8


class Plan(NamedTuple):
    """What one step computes.

    Attributes:
      jacobian: any per-task Jacobian work at all (else one VJP with the weights).
      flat: the method reads the flat ``(K, d)`` rows (JACOBIAN, or a direction output).
      gramian: the method reads the Gramian.
      norms: the method reads gradient norms.
      rows: the rows are kept in memory (``flat`` or a contraction final step).
      combine: the final shared gradient is the contraction ``sum_i w_i J_i`` of the rows
        (else one more VJP with the weights as cotangent).
      chunk_size: tasks per chunk, or ``None`` for all at once.
      batching: :data:`GEMM` or :data:`VMAP` (how the VJP is batched over tasks).
    """

    jacobian: bool
    flat: bool
    gramian: bool
    norms: bool
    rows: bool
    combine: bool
    chunk_size: int | None
    batching: str = GEMM


class Stats(NamedTuple):
    """What the Jacobian pass produced (``None`` where not planned).

    ``flat`` is ``jac`` as one ``(K, d)`` array when the leaves share a dtype and the
    Gramian or the rows are needed: on XLA:CPU the scale, the Gramian and the final
    contraction each read the rows several times faster from one contiguous array than
    from the vmapped leaves (whose layouts need a transposed copy per consumer), and
    the compiled step needs less temporary memory.
    """

    jac: list | None = None
    gram: jax.Array | None = None
    scale: jax.Array | None = None
    norms: jax.Array | None = None
    flat: jax.Array | None = None


def make_plan(method: base.Method, *, features: bool, final_step: str, chunk_size: Any,
              low_precision_x: bool, replicated: bool, batching: str = GEMM) -> Plan:
    """Every automatic choice of the engine, from the method's needs and the inputs.

    * ``chunk_size="auto"``: no chunking in params mode; in features mode, chunks of
      :data:`AUTO_FEATURES_CHUNK` tasks for Gramian-only methods (forward-mode columns),
      unless the rows are needed anyway, ``z`` is low precision or replicas are used.
    * ``final_step="auto"``: params mode contracts the rows when they are in memory (as
      fast as or faster than a VJP in our measurements); features mode takes one more
      VJP through the heads (cheaper than contracting ``(K, batch, features)`` rows).
    """
    needs = method.needs
    flat = base.JACOBIAN in needs or method.output == base.DIRECTION
    gram = base.GRAMIAN in needs
    norms = base.GRAD_NORMS in needs
    use_jac = flat or gram or norms
    if chunk_size == AUTO:
        rows_needed = flat or final_step == COMBINE
        chunk_size = (AUTO_FEATURES_CHUNK if features and not (
            rows_needed or low_precision_x or replicated) else None)
    step = VJP if (features and final_step == AUTO) else final_step
    if step == AUTO:
        combine = use_jac and (flat or chunk_size is None) and (gram or flat)
    else:
        combine = step == COMBINE and use_jac
    return Plan(jacobian=use_jac, flat=flat, gramian=gram, norms=norms, rows=flat or combine,
                combine=combine, chunk_size=chunk_size, batching=batching)


# --------------------------------------------------------------------------- pieces


def _mask_rows(jac: list, present: jax.Array) -> list:
    """Zeroes the rows of absent tasks (``where``, so a NaN row of an absent task is gone)."""
    def one(leaf):
        m = jnp.reshape(present, (-1,) + (1,) * (leaf.ndim - 1))
        return jnp.where(m, leaf, jnp.zeros((), leaf.dtype))

    return [one(x) for x in jac]


class _Ctx(NamedTuple):
    lin: Linearised
    present: jax.Array
    norm_mask: list | None
    cdt: Any
    ct_dtype: Any
    k: int
    batching: str

    def reduce_rows(self, jac):
        # Params mode: average the replicas' Jacobians before anything reads them.
        if not self.lin.replicas.active or self.lin.mode != MEAN:
            return jac
        return self.lin.replicas.mean([x.astype(self.cdt) for x in jac])

    def reduce_gram(self, g):
        # Features mode: G_global = sum_r G_r / R² (rows are concatenated, scaled 1/R).
        reps = self.lin.replicas
        if not reps.active or self.lin.mode != CONCAT:
            return g
        nrep = reps.count()
        return reps.sum(g) / (nrep * nrep)

    def scale_of(self, jac):
        # The scale of the whole-batch rows, the same on every replica: in features mode
        # they are the replicas' rows side by side, divided by R.
        reps = self.lin.replicas
        m = reps.max(jac_lib.max_abs(jac))
        if reps.active and self.lin.mode == CONCAT:
            m = m / reps.count()
        return jac_lib.power_of_two_above(m)

    def rows_of(self, first, present):
        """Rows of tasks ``first .. first + c - 1`` (``c = len(present)``; zero past K)."""
        c = present.shape[0]
        if self.batching == GEMM:
            rows = _task_vmap.vmap_rows(self.lin.rows, self.k, self.ct_dtype, rows=c,
                                        first=first)
        else:
            eye = (first + jnp.arange(c))[:, None] == jnp.arange(self.k)[None, :]
            rows = jax.vmap(self.lin.rows)(eye.astype(self.ct_dtype))
        return _mask_rows(self.reduce_rows(rows), present)

    def sq_norms(self, jac, scale):
        """Squared norms of the norm-subset rows divided by ``scale``, ``(c,)``."""
        sub = [x for x, m in zip(jac, self.norm_mask, strict=True) if m]
        c = jac[0].shape[0]
        total = jnp.zeros((c,), self.cdt)
        for leaf in sub:
            rows = jnp.reshape(leaf, (c, -1)).astype(self.cdt) / scale.astype(self.cdt)
            total = total + jnp.sum(rows * rows, axis=1)
        return total

    def norms_from_sq(self, sq, scale):
        return jnp.sqrt(jnp.clip(self.reduce_gram(sq), 0.0)) * scale


def _all_rows(ctx: _Ctx, plan: Plan) -> Stats:
    jac = ctx.rows_of(0, ctx.present)
    return _stats_from_rows(ctx, plan, jac)


def _stats_from_rows(ctx: _Ctx, plan: Plan, jac: list) -> Stats:
    flat = None
    if (plan.gramian or plan.rows) and len({x.dtype for x in jac}) == 1:
        flat = jac_lib.flatten_rows(jac, dtype=jac[0].dtype)
    rows = jac if flat is None else [flat]
    scale = ctx.scale_of(rows)
    gram = None
    if plan.gramian:
        g, _ = jac_lib.scaled_gramian(rows, scale)
        gram = ctx.reduce_gram(g)
    norms = None
    if ctx.norm_mask is not None:
        norms = ctx.norms_from_sq(ctx.sq_norms(jac, scale), scale)
    return Stats(jac=jac, gram=gram, scale=scale, norms=norms, flat=flat)


def _chunks(ctx: _Ctx, c: int):
    """``n`` chunks of ``c`` tasks: each chunk's first task and presence mask."""
    n = -(-ctx.k // c)
    pres_p = jnp.concatenate([ctx.present, jnp.zeros((n * c - ctx.k,), bool)])
    return n, (jnp.arange(0, n * c, c, dtype=jnp.int32), jnp.reshape(pres_p, (n, c)))


def _chunked_rows(ctx: _Ctx, plan: Plan, c: int) -> Stats:
    n, chunks = _chunks(ctx, c)
    jac_c = jax.lax.map(lambda a: ctx.rows_of(*a), chunks)
    jac = [jnp.reshape(x, (n * c,) + x.shape[2:])[:ctx.k] for x in jac_c]
    return _stats_from_rows(ctx, plan, jac)


def _chunked_norms(ctx: _Ctx, plan: Plan, c: int) -> Stats:
    del plan
    _, chunks = _chunks(ctx, c)

    def body(args):
        jac = ctx.rows_of(*args)
        scale = ctx.scale_of(jac)
        return ctx.norms_from_sq(ctx.sq_norms(jac, scale), scale)

    norms = jax.lax.map(body, chunks)
    return Stats(norms=jnp.reshape(norms, (-1,))[:ctx.k])


def _chunk_norms(ctx: _Ctx, jac, scale):
    if ctx.norm_mask is None:
        return jnp.zeros((jac[0].shape[0],), ctx.cdt)
    return ctx.norms_from_sq(ctx.sq_norms(jac, scale), scale)


def _finish_columns(ctx: _Ctx, cols, scales, c, n):
    """``G / s²`` from per-chunk columns ``J (J_c / s_c)ᵀ`` and their scales ``s_c``."""
    scale = jnp.max(scales)
    factor = jnp.repeat(scales / scale, c)[:ctx.k] / scale  # column c: s_c / s²
    g = jnp.reshape(cols, (n * c, -1))[:ctx.k] * factor[:, None]
    return scale, g


def _chunked_gram_forward(ctx: _Ctx, plan: Plan, c: int) -> Stats:
    # G[:, chunk] = J J_chunkᵀ is a forward-mode derivative of the losses along the
    # chunk's rows: K VJPs + K JVPs in all, the Jacobian is never materialised. The
    # tangents are the chunk's rows divided by their scale s_c, so nothing overflows.
    del plan
    n, chunks = _chunks(ctx, c)
    pmask = ctx.present.astype(ctx.cdt)
    lin = ctx.lin

    def body(args):
        jac = ctx.rows_of(*args)
        s_c = ctx.scale_of(jac)
        tangents = [(x / s_c.astype(x.dtype)).astype(y.dtype)
                    for x, y in zip(jac, lin.x, strict=True)]
        cols = jax.vmap(lin.tangent)(tangents).astype(ctx.cdt)
        if lin.replicas.active and lin.mode == MEAN:
            cols = lin.replicas.mean(cols)
        return cols * pmask[None, :], s_c, _chunk_norms(ctx, jac, s_c)

    cols, scales, norms = jax.lax.map(body, chunks)
    scale, g = _finish_columns(ctx, cols, scales, c, n)
    gram = ctx.reduce_gram(0.5 * (g + g.T))
    return Stats(gram=gram, scale=scale,
                 norms=jnp.reshape(norms, (-1,))[:ctx.k] if ctx.norm_mask else None)


def _chunked_gram_blocks(ctx: _Ctx, plan: Plan, c: int) -> Stats:
    # Low precision: the forward-mode trick would give a bf16 Gramian. Instead, recompute
    # chunk b's rows for every chunk a and accumulate (J_a/s_a)(J_b/s_b)ᵀ in float32.
    del plan
    n, chunks = _chunks(ctx, c)

    def scaled_rows(args):
        jac = ctx.rows_of(*args)
        s = ctx.scale_of(jac)
        return [jnp.reshape(x, (c, -1)) / s.astype(x.dtype) for x in jac], s, jac

    def body_a(args):
        rows_a, s_a, jac_a = scaled_rows(args)

        def body_b(args_b):
            rows_b, s_b, _ = scaled_rows(args_b)
            total = jnp.zeros((c, c), ctx.cdt)
            for xa, xb in zip(rows_a, rows_b, strict=True):
                total = total + jnp.einsum(
                    "kd,ld->kl", xa, xb, preferred_element_type=ctx.cdt,
                    precision=jax.lax.Precision.HIGHEST).astype(ctx.cdt)
            return total, s_b

        blocks, s_bs = jax.lax.map(body_b, chunks)  # (n, c, c), (n,)
        row = jnp.reshape(jnp.transpose(blocks, (1, 0, 2)), (c, n * c))
        return row, s_a, s_bs, _chunk_norms(ctx, jac_a, s_a)

    rows, s_as, s_bs, norms = jax.lax.map(body_a, chunks)
    scale = jnp.max(s_as)
    col = jnp.repeat(s_bs[0] / scale, c)
    row = jnp.repeat(s_as / scale, c)
    g = jnp.reshape(rows, (n * c, n * c)) * row[:, None] * col[None, :]
    g = g[:ctx.k, :ctx.k]
    gram = ctx.reduce_gram(0.5 * (g + g.T))
    return Stats(gram=gram, scale=scale,
                 norms=jnp.reshape(norms, (-1,))[:ctx.k] if ctx.norm_mask else None)


def run(lin: Linearised, plan: Plan, present: jax.Array, norm_mask: list | None) -> Stats:
    """The Jacobian pass of ``plan`` (see the module docstring).

    Args:
      lin: the linearised step.
      plan: from :func:`make_plan`.
      present: ``(K,)`` bool mask (absent tasks' rows are zeroed).
      norm_mask: one bool per leaf of ``lin.x`` (rows whose norms the method reads), or
        ``None`` when it reads none.
    """
    ct_dtype = lin.losses.dtype
    ctx = _Ctx(lin=lin, present=present, norm_mask=norm_mask,
               cdt=jac_lib.compute_dtype(*[x.dtype for x in lin.x]), ct_dtype=ct_dtype,
               k=lin.losses.shape[0], batching=plan.batching)
    c = plan.chunk_size
    if c is None or c >= ctx.k:
        return _all_rows(ctx, plan)
    c = int(c)
    if plan.rows:
        return _chunked_rows(ctx, plan, c)
    if not plan.gramian:
        return _chunked_norms(ctx, plan, c)
    low_precision = jnp.finfo(ct_dtype).bits < 32 or any(
        jnp.finfo(x.dtype).bits < 32 for x in lin.x)
    if low_precision:
        return _chunked_gram_blocks(ctx, plan, c)
    return _chunked_gram_forward(ctx, plan, c)
