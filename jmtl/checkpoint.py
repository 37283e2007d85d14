"""Checkpoints of a multi-task training state, with the task set and method checked.

Saves params, optimizer state and method state (any pytrees of arrays) with orbax
(an optional dependency: ``pip install orbax-checkpoint``), together with metadata: the
task names, the method's name and hyperparameters, and the structure and shapes of
every saved tree. :func:`restore` refuses a checkpoint whose task set, method or
structure differs from what the caller expects, with a message saying what differs,
instead of silently reshaping.

:func:`save` never deletes anything that is not a jmtl checkpoint: with
``force=True`` it replaces a directory only if that directory holds a jmtl
checkpoint and nothing else (or is empty), and refuses otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jmtl.methods import base

__all__ = ["save", "restore", "CheckpointMismatchError"]

_FORMAT = "jmtl-checkpoint-1"
# Top-level entries of a directory written by :func:`save`: the metadata item, one
# ``tree_<name>`` item per non-empty tree (checked against the metadata), and orbax's
# own bookkeeping files.
_META_ITEM = "meta"
_ORBAX_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not match the training state it is restored into."""


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - exercised only without orbax
        raise ImportError(
            "jmtl.checkpoint needs orbax: pip install orbax-checkpoint (or jmtl[test])"
        ) from e
    return ocp


def _describe(tree: Any) -> dict[str, list]:
    """``{path: [shape, dtype]}`` for every leaf of ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = [list(np.shape(leaf)), str(np.asarray(leaf).dtype)
                                           if not hasattr(leaf, "dtype") else str(leaf.dtype)]
    return out


def _metadata(items: dict[str, Any], method: base.Method, tasks: Sequence[str]) -> dict:
    return {
        "format": _FORMAT,
        "tasks": list(tasks),
        "method": method.name,
        "hparams": repr(method),
        "trees": {name: _describe(tree) for name, tree in items.items()},
    }


def save(directory: str | os.PathLike, items: dict[str, Any], *, method: base.Method,
         tasks: Sequence[str], force: bool = False) -> None:
    """Saves named pytrees (params, optimizer state, method state, ...) and metadata.

    ``directory`` must not exist, or be an empty directory. With ``force=True`` it
    may also hold a checkpoint written by this function, which is then replaced;
    a directory with anything else in it (files of the user's, another library's
    checkpoint, a jmtl checkpoint with extra entries beside it) is refused and
    left untouched, as are a file or a symbolic link at ``directory``. Only a
    checkpoint's own entries are ever deleted.

    Args:
      directory: a new or empty directory, or with ``force=True`` an existing jmtl
        checkpoint (absolute or relative path).
      items: ``{name: pytree}``, e.g. ``{"params": p, "opt_state": o, "method_state": s}``.
      method: the balancing method in use (its name and hyperparameters are recorded).
      tasks: the task names in stacking order (``jmtl.tasks.task_names(losses)``).
      force: replace an existing jmtl checkpoint at ``directory``.

    Raises:
      FileExistsError: ``directory`` exists and is not empty, and ``force`` is off, or
        it is not a jmtl checkpoint (the message says why; nothing is deleted).

    Examples:
      >>> import tempfile, jax.numpy as jnp, jmtl
      >>> d = tempfile.mkdtemp() + "/ckpt"
      >>> m = jmtl.ew()
      >>> jmtl.checkpoint.save(d, {"params": {"w": jnp.ones(2)}}, method=m, tasks=["a", "b"])
      >>> jmtl.checkpoint.restore(d, {"params": {"w": jnp.zeros(2)}}, method=m,
      ...                         tasks=["a", "b"])["params"]["w"].tolist()
      [1.0, 1.0]
    """
    ocp = _orbax()
    path = os.path.abspath(os.fspath(directory))
    overwrite = _check_destination(path, force)
    meta = _metadata(items, method, tasks)
    args = {"meta": ocp.args.JsonSave(meta)}
    for name, tree in items.items():
        if jax.tree_util.tree_leaves(tree):  # orbax refuses empty trees (stateless methods)
            args[f"tree_{name}"] = ocp.args.StandardSave(tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(path, ocp.args.Composite(**args), force=overwrite)


def _check_destination(path: str, force: bool) -> bool:
    """Whether :func:`save` may replace ``path``; raises if it must not write there.

    Returns ``False`` for a path that does not exist, ``True`` for an empty directory
    or (with ``force``) a directory that holds a jmtl checkpoint and nothing else.
    """
    if os.path.islink(path):
        raise FileExistsError(f"jmtl.checkpoint.save: {path} is a symbolic link; refusing to "
                              "write through it (give the real directory)")
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise FileExistsError(f"jmtl.checkpoint.save: {path} exists and is not a directory; "
                              "nothing was written")
    entries = sorted(os.listdir(path))
    if not entries:
        return True  # an empty directory: nothing to lose
    if not force:
        raise FileExistsError(f"jmtl.checkpoint.save: {path} already exists and is not empty; "
                              "pass force=True to replace a jmtl checkpoint there")
    problem = _not_a_checkpoint(path, entries)
    if problem:
        raise FileExistsError(f"jmtl.checkpoint.save(force=True): {path} is not a jmtl "
                              f"checkpoint ({problem}); refusing to delete it")
    return True


def _not_a_checkpoint(path: str, entries: Sequence[str]) -> str | None:
    """Why the directory ``path`` (with top-level ``entries``) is not only a jmtl
    checkpoint, or ``None`` if it is one."""
    meta_file = os.path.join(path, _META_ITEM, "metadata")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"no readable jmtl metadata at {meta_file}: {type(e).__name__}"
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return f"its metadata has format {found!r}, not {_FORMAT!r}"
    trees = meta.get("trees")
    if not isinstance(trees, dict):
        return "its metadata lists no trees"
    expected = {_META_ITEM, *_ORBAX_FILES, *(f"tree_{name}" for name in trees)}
    extra = [e for e in entries if e not in expected]
    if extra:
        return f"it also holds {extra}, which a jmtl checkpoint does not write"
    for entry in entries:
        if entry not in _ORBAX_FILES and not os.path.isdir(os.path.join(path, entry)) \
                or os.path.islink(os.path.join(path, entry)):
            return f"{entry!r} is not a directory"
    return None


def _compare(meta: dict, expected: dict) -> list[str]:
    problems = []
    if meta.get("format") != expected["format"]:
        problems.append(f"format {meta.get('format')!r} is not {expected['format']!r}")
    if meta.get("tasks") != expected["tasks"]:
        saved, now = meta.get("tasks") or [], expected["tasks"]
        problems.append(
            f"task sets differ: checkpoint has {saved}, training has {now} "
            f"(missing from checkpoint: {sorted(set(now) - set(saved))}, "
            f"extra in checkpoint: {sorted(set(saved) - set(now))})"
        )
    if meta.get("method") != expected["method"]:
        problems.append(f"method differs: checkpoint has '{meta.get('method')}', "
                        f"training uses '{expected['method']}'")
    elif meta.get("hparams") != expected["hparams"]:
        problems.append(f"method hyperparameters differ: checkpoint {meta.get('hparams')}, "
                        f"training {expected['hparams']}")
    saved_trees = meta.get("trees", {})
    for name, desc in expected["trees"].items():
        if name not in saved_trees:
            problems.append(f"item '{name}' is not in the checkpoint "
                            f"(it has {sorted(saved_trees)})")
            continue
        got = saved_trees[name]
        for leaf_path in sorted(set(desc) | set(got)):
            if leaf_path not in got:
                problems.append(f"{name}{leaf_path}: not in the checkpoint")
            elif leaf_path not in desc:
                problems.append(f"{name}{leaf_path}: in the checkpoint but not in the target")
            elif got[leaf_path] != desc[leaf_path]:
                problems.append(f"{name}{leaf_path}: checkpoint shape/dtype {got[leaf_path]}, "
                                f"target {desc[leaf_path]}")
    return problems


def restore(directory: str | os.PathLike, like: dict[str, Any], *, method: base.Method,
            tasks: Sequence[str]) -> dict[str, Any]:
    """Restores what :func:`save` wrote, after checking it matches ``like``.

    Args:
      directory: the checkpoint directory.
      like: ``{name: pytree}`` with the target structure, shapes and dtypes (e.g. a freshly
        initialised training state); sharded leaves are restored with their sharding.
      method: the method training will continue with.
      tasks: the task names training will continue with.

    Returns:
      ``{name: pytree}`` restored.

    Raises:
      CheckpointMismatchError: the task set, method, hyperparameters, or any leaf's
        path, shape or dtype differ (the message lists every difference), or the data
        on disk is corrupted.
      FileNotFoundError: no checkpoint at ``directory``.
    """
    ocp = _orbax()
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        try:
            meta = ckpt.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises several types for unreadable data
            raise CheckpointMismatchError(f"checkpoint at {path} has no readable jmtl "
                                          f"metadata: {e}") from e
        problems = _compare(meta, _metadata(like, method, tasks))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint at {path} does not match the training state:\n  - "
                + "\n  - ".join(problems)
            )
        nonempty = {n: t for n, t in like.items() if jax.tree_util.tree_leaves(t)}
        args = {f"tree_{n}": ocp.args.StandardRestore(t) for n, t in nonempty.items()}
        try:
            restored = ckpt.restore(path, ocp.args.Composite(**args)) if args else {}
        except Exception as e:  # a truncated or edited checkpoint: say so, never reshape
            raise CheckpointMismatchError(
                f"checkpoint at {path} is corrupted or unreadable: {type(e).__name__}: {e}"
            ) from e
    return {n: restored[f"tree_{n}"] if n in nonempty else like[n] for n in like}
