"""Float64 references shared by several test files."""

import itertools

import numpy as np


def project_dual_cone(jac, u):
    """Projection of ``Jᵀu`` onto ``{x: Jx >= 0}`` by enumerating the active constraints.

    Every subset of rows is tried as the active set; the closest feasible candidate wins
    (feasibility relative to each row's norm and ``|Jᵀu|``, so it is scale-free).
    """
    jac = np.asarray(jac, np.float64)
    k = jac.shape[0]
    v = jac.T @ u
    tol = 1e-10 * np.linalg.norm(jac, axis=1) * max(np.linalg.norm(v), 1e-300)
    best = None
    for r in range(k + 1):
        for act in itertools.combinations(range(k), r):
            a = jac[list(act)]
            x = v - a.T @ np.linalg.lstsq(a @ a.T, a @ v, rcond=None)[0] if r else v
            if np.all(jac @ x >= -tol) and (best is None or
                                             np.sum((x - v) ** 2) < np.sum((best - v) ** 2)):
                best = x
    return best
