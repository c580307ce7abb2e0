"""The Lorentz model of hyperbolic space, on space components (docs/METHOD.md, "HySAC").

A point of the hyperboloid of curvature ``-c`` (``c > 0``) is stored by its space components
``x`` ``[..., D]``; its time component is ``x_t = sqrt(1/c + ‖x‖²)``, so every ``x`` in R^D is
a valid point and no projection step is ever needed. The origin is ``x = 0``.

Operations (all pure functions of tensors, float32 recommended):

* :func:`expmap0` / :func:`logmap0`: exponential / logarithmic map at the origin
  (tangent vector ``v`` ↔ point ``x``); ``logmap0(expmap0(v)) = v``.
* :func:`distance_from_origin`: ``d(0, x) = asinh(√c‖x‖) / √c``, equal to ``‖logmap0(x)‖``.
* :func:`pairwise_distance` ``[N, M]`` and :func:`distance` (row by row ``[N]``): the
  geodesic distance ``acosh(−c⟨x, y⟩_L) / √c`` with ``⟨x, y⟩_L = x·y − x_t y_t``.
* :func:`half_aperture`: half-aperture of the entailment cone at ``x``,
  ``asin(2K / (√c‖x‖))`` (clamped), in ``(0, π/2)``.
* :func:`exterior_angle`: the angle at ``x`` between the geodesic from the origin through
  ``x`` (continued beyond it) and the geodesic from ``x`` to ``y``; 0 when ``y`` lies on that
  continuation. ``x`` entails ``y`` when the angle is within the aperture.

A short module rather than geoopt / hypll: both model the hyperboloid with the time
component stored, and their curvature is a manifold attribute rather than a per-call
tensor; the maths needed here fits on a screen and is tested against closed forms
(tests/test_hysac.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-6  # float32-safe clamp margin: below it acos/asin/acosh lose their gradients
# sinh(x) overflows float32 near x = 89; a tangent vector this long is far outside any
# radius a model uses, so the map saturates instead of returning inf.
_MAX_SINH_ARG = math.asinh(2.0**15)


def _sqrt_c(curvature: Tensor | float) -> Tensor:
    return torch.as_tensor(curvature, dtype=torch.float32).clamp_min(1e-8).sqrt()


def time_component(x: Tensor, curvature: Tensor | float) -> Tensor:
    """``x_t = sqrt(1/c + ‖x‖²)`` ``[...]``."""
    c = torch.as_tensor(curvature, dtype=x.dtype, device=x.device)
    return torch.sqrt(1.0 / c + (x * x).sum(-1))


def expmap0(v: Tensor, curvature: Tensor | float) -> Tensor:
    """Exponential map at the origin: tangent vectors ``[..., D]`` → points ``[..., D]``,
    ``x = sinh(√c‖v‖) · v / (√c‖v‖)``."""
    rc = _sqrt_c(curvature).to(v.device)
    rc_norm = (rc * v.norm(dim=-1, keepdim=True)).clamp_min(EPS)
    return torch.sinh(rc_norm.clamp_max(_MAX_SINH_ARG)) * v / rc_norm


def logmap0(x: Tensor, curvature: Tensor | float) -> Tensor:
    """Logarithmic map at the origin, the inverse of :func:`expmap0`:
    ``v = asinh(√c‖x‖) · x / (√c‖x‖)``."""
    rc = _sqrt_c(curvature).to(x.device)
    rc_norm = (rc * x.norm(dim=-1, keepdim=True)).clamp_min(EPS)
    return torch.asinh(rc_norm) * x / rc_norm


def distance_from_origin(x: Tensor, curvature: Tensor | float) -> Tensor:
    """Geodesic distance of each point from the origin ``[...]``: ``asinh(√c‖x‖) / √c``."""
    rc = _sqrt_c(curvature).to(x.device)
    return torch.asinh(rc * x.norm(dim=-1)) / rc


def _acosh_of(minus_c_inner: Tensor, curvature: Tensor | float) -> Tensor:
    rc = _sqrt_c(curvature).to(minus_c_inner.device)
    return torch.acosh(minus_c_inner.clamp_min(1.0 + EPS)) / rc


def pairwise_distance(x: Tensor, y: Tensor, curvature: Tensor | float) -> Tensor:
    """Geodesic distances between every row of ``x`` ``[N, D]`` and of ``y`` ``[M, D]``: ``[N, M]``."""
    c = torch.as_tensor(curvature, dtype=x.dtype, device=x.device)
    inner = x @ y.T - time_component(x, c)[:, None] * time_component(y, c)[None, :]
    return _acosh_of(-c * inner, c)


def distance(x: Tensor, y: Tensor, curvature: Tensor | float) -> Tensor:
    """Geodesic distance between paired rows of ``x`` and ``y`` ``[N, D]``: ``[N]``."""
    c = torch.as_tensor(curvature, dtype=x.dtype, device=x.device)
    inner = (x * y).sum(-1) - time_component(x, c) * time_component(y, c)
    return _acosh_of(-c * inner, c)


def half_aperture(x: Tensor, curvature: Tensor | float, k: float = 0.1) -> Tensor:
    """Half-aperture of the entailment cone at each point ``[...]``: ``asin(2K / (√c‖x‖))``,
    the argument clamped inside (−1, 1) (a point near the origin gets a cone of nearly π/2)."""
    rc = _sqrt_c(curvature).to(x.device)
    arg = 2.0 * k / (rc * x.norm(dim=-1) + EPS)
    return torch.asin(arg.clamp(-1.0 + EPS, 1.0 - EPS))


def exterior_angle(x: Tensor, y: Tensor, curvature: Tensor | float) -> Tensor:
    """The exterior angle at ``x`` towards ``y`` for paired rows ``[N, D]`` → ``[N]``:
    ``acos((y_t + c⟨x, y⟩_L x_t) / (‖x‖ sqrt((c⟨x, y⟩_L)² − 1)))``, clamped."""
    c = torch.as_tensor(curvature, dtype=x.dtype, device=x.device)
    x_t, y_t = time_component(x, c), time_component(y, c)
    c_inner = c * ((x * y).sum(-1) - x_t * y_t)
    numerator = y_t + c_inner * x_t
    denominator = x.norm(dim=-1) * torch.sqrt((c_inner * c_inner - 1.0).clamp_min(EPS))
    return torch.acos((numerator / (denominator + EPS)).clamp(-1.0 + EPS, 1.0 - EPS))


def entailment_loss(general: Tensor, specific: Tensor, curvature: Tensor | float, k: float = 0.1) -> Tensor:
    """``mean(max(0, angle(general, specific) − aperture(general)))``: zero when every
    ``specific`` point lies inside the entailment cone of its ``general`` point."""
    angle = exterior_angle(general, specific, curvature)
    return (angle - half_aperture(general, curvature, k)).clamp_min(0.0).mean()


def traverse(x: Tensor, radius: Tensor | float, curvature: Tensor | float) -> Tensor:
    """Safety traversal: a point farther than ``radius`` from the origin moves back along its
    geodesic to distance ``radius``; a point within it is unchanged ``[..., D]``. (The tangent
    vector's norm is the distance from the origin, so the move is a rescaling of it.)"""
    v = logmap0(x, curvature)
    norm = v.norm(dim=-1, keepdim=True)
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device)  # a scalar
    scale = torch.where(norm > r, r / norm.clamp_min(EPS), torch.ones_like(norm))
    return torch.where(norm > r, expmap0(v * scale, curvature), x)
