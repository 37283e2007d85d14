"""Replica plumbing for ``axis_name`` (``jax.pmap`` / ``jax.shard_map``), in one place.

Under ``shard_map`` with varying-axes checks, a value is *varying* over the mesh axes
where replicas may hold different values and *invariant* elsewhere; cotangents must vary
like their primals, and derivatives with respect to an invariant input are already
summed over the replicas by autodiff. :class:`Replicas` hides those rules from the
engine: ``mean`` averages per-replica values, ``cast_like`` fixes a cotangent's axes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Replicas", "varying_axes", "match_vma", "replicas_of"]


def varying_axes(x) -> frozenset:
    """The mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def match_vma(tree: Any, like: Any) -> Any:
    """Casts each leaf of ``tree`` to vary over the mesh axes its ``like`` leaf varies over.

    A VJP's cotangent must vary over the same axes as the primal output; weights computed
    from ``pmean``-ed inputs are invariant and need the cast. Elsewhere the identity.
    """
    def one(x, ref):
        missing = tuple(sorted(varying_axes(ref) - varying_axes(x), key=str))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(one, tree, like)


class Replicas(NamedTuple):
    """The replica context of one step.

    Attributes:
      axis_name: the ``pmap`` / ``shard_map`` axis name (or tuple), ``None`` without.
      tracking: whether ``shard_map`` tracks varying axes for this step's values.
    """

    axis_name: Any = None
    tracking: bool = False

    @property
    def axes(self) -> tuple:
        a = self.axis_name
        return a if isinstance(a, tuple) else (a,)

    @property
    def active(self) -> bool:
        return self.axis_name is not None

    def count(self):
        """The number of replicas ``R`` (1 without ``axis_name``)."""
        return 1 if self.axis_name is None else jax.lax.psum(1, self.axis_name)

    def mean(self, tree: Any) -> Any:
        """Mean over the replicas of per-replica values.

        With varying-axes tracking, a leaf that is invariant (a derivative with respect to
        a replicated input, already summed by autodiff) is divided by ``R`` instead.
        """
        if self.axis_name is None:
            return tree
        nrep = self.count()

        def one(x):
            if self.tracking and not set(self.axes) <= varying_axes(x):
                return x / jnp.asarray(nrep, x.dtype)
            return jax.lax.pmean(x, self.axis_name)

        return jax.tree_util.tree_map(one, tree)

    def sum(self, x):
        return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

    def max(self, x):
        return x if self.axis_name is None else jax.lax.pmax(x, self.axis_name)

    def any(self, mask: jax.Array) -> jax.Array:
        """A bool mask OR-ed over the replicas."""
        if self.axis_name is None:
            return mask
        return jax.lax.pmax(mask.astype(jnp.int32), self.axis_name).astype(bool)

    def gather_columns(self, flat: jax.Array) -> jax.Array:
        """The replicas' ``(K, d_r)`` blocks side by side, ``(K, R·d_r)``, on every replica."""
        if self.axis_name is None:
            return flat
        if self.tracking:
            # An invariant gather: place the local block in a zero matrix and psum.
            nrep = self.count()
            d_loc = flat.shape[1]
            full = jnp.zeros((flat.shape[0], d_loc * nrep), flat.dtype)
            full = jax.lax.dynamic_update_slice(
                full, flat, (0, jax.lax.axis_index(self.axis_name) * d_loc))
            return jax.lax.psum(full, self.axis_name)
        return jax.lax.all_gather(flat, self.axis_name, axis=1, tiled=True)

    def local_block(self, vector: jax.Array) -> jax.Array:
        """This replica's block of a ``(R·d_r,)`` vector built by :meth:`gather_columns`."""
        if self.axis_name is None:
            return vector
        d_loc = vector.shape[0] // self.count()
        start = jax.lax.axis_index(self.axis_name) * d_loc
        return jax.lax.dynamic_slice(vector, (start,), (d_loc,))


def replicas_of(losses: jax.Array, axis_name: Any) -> Replicas:
    """The replica context, with tracking on when the losses vary over ``axis_name``."""
    if axis_name is None:
        return Replicas()
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return Replicas(axis_name, set(axes) <= varying_axes(losses))
