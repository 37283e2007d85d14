"""The two test tiers: what ``python -m pytest -m "not slow"`` runs of the per-method tests.

The full command (the README's and CI's) runs every test. The fast tier keeps every
method covered through ``test_properties.py`` (each method on its declared properties,
except those that compile it several more times), and runs the tests that build a
whole training step per method (the engine against brute force, tracing, scale-freedom)
on :data:`REPRESENTATIVE` methods only: one per kind of input and output a method can
declare, because it is the engine's handling of that kind that those tests check.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

import jmtl

__all__ = ["FEATURES_MODE", "FULL_ONLY", "REPRESENTATIVE", "first_fast", "mark_full_only",
           "method_modes", "methods"]

# One method per kind the engine treats differently: no inputs (ew), losses with state
# (uw), a key (rlw), gradient norms with state (gradnorm), a Gramian (upgrad), a Gramian
# with the scale and state (nash_mtl), a Gramian with a key (pcgrad), the Jacobian with
# losses and state (imtl reads the Gramian and losses), a direction output from the
# Jacobian (config), a stateful direction (moco).
REPRESENTATIVE = frozenset({"ew", "uw", "rlw", "gradnorm", "upgrad", "nash_mtl", "pcgrad",
                            "imtl", "config", "moco"})


# Features mode in the fast tier: a Gramian, gradient norms and a direction output.
FEATURES_MODE = frozenset({"upgrad", "gradnorm", "config"})


def method_modes() -> list:
    """``pytest.param(name, mode)`` for every method in params and features mode; fast for
    :data:`REPRESENTATIVE` methods in params mode and :data:`FEATURES_MODE` in both."""
    out = []
    for name in jmtl.methods.names():
        for mode in ("params", "features"):
            fast = name in REPRESENTATIVE and (mode == "params" or name in FEATURES_MODE)
            out.append(pytest.param(name, mode, id=f"{name}-{mode}",
                                    marks=() if fast else pytest.mark.slow))
    return out


def methods(names: Iterable[str] | None = None) -> list:
    """``pytest.param`` per method name; those outside :data:`REPRESENTATIVE` are slow."""
    names = jmtl.methods.names() if names is None else names
    return [pytest.param(n, id=n, marks=() if n in REPRESENTATIVE else pytest.mark.slow)
            for n in names]


def first_fast(values: Iterable, *, keep: int = 1, unpack: bool = False) -> list:
    """Parametrisation values: the first ``keep`` run in both tiers, the rest are slow.

    For tests whose cases differ in data (seeds, scales, methods of one kind) rather than
    in the code path: the fast tier keeps one example of the path.

    Args:
      values: the values as they would be given to ``pytest.mark.parametrize``.
      keep: how many leading values stay in the fast tier.
      unpack: the values are tuples for several argument names.
    """
    out = []
    for i, v in enumerate(values):
        marks = () if i < keep else pytest.mark.slow
        out.append(pytest.param(*v, marks=marks) if unpack else pytest.param(v, marks=marks))
    return out


# Whole tests that run in the full tier only: deeper or repeated checks of code that a
# fast test covers too (the per-method properties cover finiteness, absent tasks and
# equivariance of every method; the engine tests cover the engine for every input kind).
FULL_ONLY = frozenset({
    "test_fidelity_qp.py::test_cagrad_c2_strictly_weak_float32_does_not_conflict",
    "test_fidelity_qp.py::test_cagrad_matches_float64_reference",
    "test_fidelity_qp.py::test_cagrad_traced_c_and_rescale",
    "test_fidelity_qp.py::test_upgrad_float32_matches_float64_and_is_permutation_equivariant",
    "test_methods_qp.py::test_permutation_equivariance",
    "test_methods_qp.py::test_absent_tasks",
    "test_methods_qp.py::test_zero_jacobian_gives_zero_update",
    "test_methods_qp.py::test_single_task_returns_gradient",
    "test_solvers.py::test_solvers_finite_on_degenerate_input",
    "test_nn.py::test_output_shapes_and_jit_matches_eager",
    "test_nn_new.py::test_output_shapes_and_jit_matches_eager",
    "test_nn_new.py::test_dselect_static_gate_matches_numpy_reference",
    "test_nn_new.py::test_encode_decode_work_with_jmtl_features_mode",
    "test_nn_new.py::test_dselect_training_saturates_the_gates_to_at_most_k_experts",
    "test_nn_new.py::test_dselect_saturated_gates_select_at_most_k_experts",
    "test_nn_new.py::test_ltb_search_works_in_jmtl_features_mode_with_explicit_keys",
    "test_nn_new.py::test_one_sgd_step_lowers_the_total_loss",
    "test_parallel.py::test_jit_named_sharding_data_parallel",
    "test_parallel.py::test_jit_fsdp_sharded_params",
    "test_methods_new.py::test_value_and_mtl_grad_against_per_task_grads",
    "test_methods_new.py::test_traced_hyperparameters",
    "test_methods_new.py::test_modo_two_batches_through_the_engine",
    "test_methods_new.py::test_absent_tasks_get_zero_and_keep_their_state",
    "test_methods_new.py::test_finite_at_extreme_scales",
    "test_optax.py::test_chain_with_sgd_equals_minus_lr_times_aggregate",
    "test_optim.py::test_jit_equals_no_jit",
    "test_fidelity_misc.py::test_graddrop_extreme_scales_float32",
    "test_fidelity_misc.py::test_config_absent_zero_and_pytree",
    "test_methods_stateful.py::test_degenerate_input_finite",
    "test_methods_surgery.py::test_gramian_methods_degenerate_finite",
    "test_methods_surgery.py::test_graddrop_jit_and_degenerate",
    "test_methods_surgery.py::test_gradvac_jit_equals_nojit",
    "test_methods_robust.py::test_krum_metadata_and_aggregate",
    "test_properties.py::test_low_precision_jacobians",
    "test_kendall.py::test_uw_method_in_the_engine_reaches_the_same_sigmas",
    "test_parallel.py::test_shard_map_axis_name",
    "test_methods_new.py::test_finite_on_degenerate_jacobians",
    "test_nn.py::test_encode_decode_work_with_jmtl_features_mode",
    "test_train.py::test_nnx_features_mode_lowers_the_loss",
    "test_train.py::test_a_few_steps_lower_the_loss",
    "test_precision_checkpoint.py::test_bf16_run_tracks_float32_run",
    "test_engine.py::test_chunked_bf16_gramian_is_float32_accurate",
})


def mark_full_only(items) -> None:
    """Adds the ``slow`` mark to the collected tests listed in :data:`FULL_ONLY`."""
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if name in FULL_ONLY:
            item.add_marker(pytest.mark.slow)
