"""Stiefel constraint: matrices with orthonormal columns (tall) or orthonormal rows (wide).

For ``W`` of shape (m, n) the manifold is ``W^T W = I_n`` when m >= n and ``W W^T = I_m`` when
m < n, i.e. all min(m, n) singular values equal 1. The nearest such matrix in Frobenius norm is
the polar factor ``U V^T`` of ``W = U S V^T``; :func:`stiefel_retract` approximates it by a
Newton-Schulz iteration (matmuls only, batched over same-shaped matrices) and
:func:`stiefel_retract_exact` computes it by SVD as the reference.

The iteration is the classical cubic Newton-Schulz iteration for the polar factor,
``X <- 1.5 X - 0.5 (X X^T) X``, which acts on each singular value as ``s <- 1.5 s - 0.5 s^3``:

* its fixed point is exactly 1 with derivative 0 there, so near the manifold it converges
  quadratically (error e -> 1.5 e^2): a weight one optimizer step away (s = 1 +- 0.05) is on the
  manifold to float32 precision after 3 iterations. Muon's quintic (3.4445, -4.7750, 2.0315) is
  tuned to inflate small singular values fast and has no fixed point at 1 (it oscillates in about
  [0.7, 1.2]); used as a retraction it would move weights *off* the manifold by ~0.3 every step.
* it converges for every singular value in (0, sqrt(3)), and the map is odd, so a zero singular
  value stays zero (see "rank-deficient inputs" below).
* for the same cost per unit of convergence the quintic of the same family
  ((15 s - 10 s^3 + 3 s^5) / 8: cubic convergence, 3 matmuls) is no faster (2 vs 3 matmuls per
  iteration, order 2 vs 3) and has a smaller basin (0, 1.53); the cubic is the simpler choice.

Pre-scaling. The iteration needs every singular value below sqrt(3). Scaling by the Frobenius
norm (as Muon does for gradients) is wrong for weights: a weight that is one optimizer step off the
manifold has all singular values near 1, and dividing by ||W||_F ~ sqrt(n) would push them to
~1/sqrt(n), costing ~log_1.5(sqrt(n)) extra iterations. Instead the first Gram matrix
``A = X X^T`` (computed anyway) gives a cheap upper bound of the largest singular value,
``s_max^2 <= min(max row sum of |A|, ||A||_F)`` (Gershgorin / Frobenius bounds on lambda_max(A));
a matrix is rescaled by 1/bound only when the bound exceeds 1.5, so near-manifold weights are
iterated unscaled and arbitrary matrices (e.g. at fit start) start with all singular values in
(0, 1].

Ill-conditioned inputs. After pre-scaling, a singular value s < 1 grows by about 1.5x per
iteration until it is near 1, then converges quadratically. With a fixed number of ``steps`` a
relative singular value below about 1.5**-(steps - 3) is therefore *not* brought to 1: the
result is then not on the manifold, and :func:`stiefel_distance` says how far it is. Pass
``tol`` (stop once the distance is below it, at most ``steps`` iterations) with a larger
``steps``, or use :func:`stiefel_retract_exact`.

Rank-deficient inputs. Every iterate is ``W p(W^T W)`` for a polynomial p, so it stays in the
row and column spaces of W: in exact arithmetic zero singular values stay exactly zero and no
direction of the null space is created; the result is the partial isometry ``U_r V_r^T`` of the
nonzero part (for enough steps), at Stiefel distance ``sqrt(#zero singular values / k)``.
In floating point the null space receives rounding noise (~1e-7 relative in float32) that the
iteration amplifies by 1.5x per step, so beyond ~35 float32 iterations arbitrary directions *are*
created; the default :func:`stiefel_retract` stops at 30 and says the manifold was not reached.
A zero matrix is returned as zero. The SVD
reference instead completes U and V with an arbitrary orthonormal basis of the null space, so it
is on the manifold but not unique.

Adaptive step count (``schedule="predict"``). After one optimizer step a weight is close to the
manifold, and there the iteration is run in its corrected form X <- X + (E/2 + 3E^2/8) X with
E = I - X X^T (the Taylor expansion of (X X^T)^(-1/2) X to second order; on an eigenvalue
lambda = 1 - e of the Gram matrix it maps e to exactly 5/8 e^3 + 15/64 e^4 + 9/64 e^5: third-order
convergence for one extra k x k x k product, much cheaper than the k x k x max(m, n) Gram and
update products). The first Gram matrix gives each matrix's distance d = sqrt(mean e^2) and, with
E^2 and E^4, the moments mean e^4 and mean e^8; from these, :func:`predicted_distances` bounds the
distance after t steps (rigorously in exact arithmetic: max|e| is bounded by the Schatten-8 norm
of E, and the per-eigenvalue error map is bounded by a monotone polynomial), and
:func:`choose_steps` picks the smallest t whose bound plus the rounding floors is <= ``tol``. One
host sync reads the moments of all stacks together; the iterations themselves run without one.
A weight one optimizer step off the manifold (distance a few 1e-2) takes one step at tol 1e-3.

Mixed precision (``precision="mixed"``, the ``"auto"`` choice for float32 on CUDA). Newton
iterations correct their own rounding errors, except those of the last step, which are set by
how accurately the last Gram matrix is formed (an error in A is an error in the distance).
So every product runs on bf16 operands with float32 accumulation (``torch.bmm(...,
out_dtype=torch.float32)``): the update products (E is small, so their relative error 2^-9 is an
absolute error ~2^-9 * distance), and the Gram matrices, which, when ``tol`` < 1e-2, are formed
from the split X = H + L (H = bf16(X), L = bf16(X - H)) as H H^T + H L^T + L H^T: two bf16 products,
error ~1e-5, at a fraction of the cost of one full float32 product (no TF32). For a looser
``tol`` (bf16 weights) one bf16 Gram product is used. On CPU ``"mixed"`` is emulated exactly
(bf16-rounded operands, float32 products) for testing; ``"auto"`` picks ``"fp32"`` there.

In place, every step (:class:`StiefelRetractor`, :func:`stiefel_retract_`; what
ManifoldRetraction runs). The same mathematics with a fixed, launch-free structure: H = bf16(X)
and L = bf16(X - H) are built straight from the parameters (no float32 stack); the Gram matrix,
E, E^2, E^4 (k x k) and the moments are formed into one float32 buffer W = (E/2, (E/2)^2,
(E/2)^4) (``baddbmm`` with a float32 output: G = -H H^T/4 - H L^T/2, E/2 = G + G^T + I/2,
exactly symmetric), the three statistics come from one reduction over W (powers of 2 are exact);
and -- speculatively, before the one host sync -- the first corrected iteration is ONE product
per matrix accumulated into the parameter in place (the same bf16 operands as the out-of-place
path, so the rounding floors above are unchanged). After the sync the bound decides per bucket:
one iteration proven enough (the usual case, decided on the bucket's worst statistics, sound
because the bound is monotone), more iterations (continued from the speculative iterate), or
undo and the "check" fallback. On CUDA the part before the sync is one captured CUDA graph with
a branch per bucket, so memory-bound loads overlap other buckets' GEMMs. One bf16 Gram product
instead of the split two would mis-measure the distance by ~1.6e-3 (per-entry error
~2^-9/sqrt(n), times sqrt(k)), above the 5e-4 / 1e-3 targets, so the float32-grade split stays.
Its cost: ``docs/benchmarks.md`` (bench_ops' retraction rows).

Conventions. A tensor argument of shape (..., m, n) is a matrix or a stack of matrices (leading
dims batched, as in ``torch.linalg``). A list/tuple argument holds *parameters*: each is flattened
to 2-D as (out, in * k * ...) (conv kernels), the ones of equal flattened shape are retracted in
one batched call, and each result has its parameter's shape and dtype. 1-D tensors are refused.
All computation is float32 (float64 input stays float64) with full-precision matmuls (TF32 off
for the call: its 10-bit mantissa would leave a ~1e-3 floor under the distance), and the result is
cast back to the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import torch

from ..optim.cuda_graph import CapturedStep, bucket_streams, check_cuda_graph_setting, run_branches
from ..optim.steps import full_fp32_matmul
from .sphere import compute_dtype

SCALE_LIMIT = 1.5  # iterate unscaled when the spectral bound is below this (basin: s < sqrt(3))


def as_matrix(W: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """A parameter as the matrix the Stiefel constraint applies to: (out, in * k * ...).

    Raises for 0-/1-D tensors, which cannot have orthonormal columns.
    """
    if W.ndim < 2:
        who = f"parameter {name!r}" if name else "a tensor"
        raise ValueError(
            f"stiefel constraint: {who} of shape {list(W.shape)} is not a matrix; a vector cannot "
            "be on a Stiefel manifold. Use the sphere constraint for vectors, or leave it "
            "unconstrained (e.g. match ndim: '>=2' in the policy rule)."
        )
    return W.reshape(W.shape[0], -1)


def _gram_distance(A: torch.Tensor) -> torch.Tensor:
    """||A - I||_F / sqrt(k) for a batch of k x k Gram matrices."""
    k = A.size(-1)
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    return (A - eye).norm(dim=(-2, -1)) / math.sqrt(k)


class PolarNS(NamedTuple):
    """Result of :func:`polar_newton_schulz`."""

    polar: torch.Tensor  # the approximate polar factor, shape and dtype of the input
    distance_before: torch.Tensor  # stiefel distance of the input, one per matrix
    steps: int  # iterations actually run (< the maximum when tol stopped it early)
    fallback: bool = False  # "predict" only: too far off for the bound, the 'check' schedule ran


SCHEDULES = ("fixed", "check", "predict")
PRECISIONS = ("auto", "fp32", "mixed")
# Below this tolerance the Gram matrix of a float32 iterate must be formed to ~float32 accuracy
# (a plain bf16 Gram mis-measures the distance by up to ~3e-3); above it a bf16 Gram is enough.
BF16_GRAM_TOL = 1e-2
# Error floors added to the predicted distance (see "Adaptive step count" in the module docstring).
GRAM_FLOOR = {"fp32": 2e-6, "split": 2e-5, "bf16": 4e-3}
UPDATE_REL_FLOOR = {False: 1e-6, True: 2.0**-8}  # x the distance before the last update
MOMENT_SAFETY = 1.0 + 2.0**-5  # bf16 products of E: relative error ~2^-8, bounds inflated by 3%


def _check_schedule(steps, tol, schedule, precision) -> str:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"stiefel retraction: steps must be an int >= 0, got {steps!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"stiefel retraction: tol must be > 0 or None, got {tol!r}")
    if schedule is None:
        schedule = "fixed" if tol is None else "check"
    if schedule not in SCHEDULES:
        raise ValueError(
            f"stiefel retraction: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    if schedule != "fixed" and tol is None:
        raise ValueError(
            f"stiefel retraction: schedule={schedule!r} stops at a tolerance; give tol (e.g. tol=1e-3)"
        )
    if precision not in PRECISIONS:
        raise ValueError(
            f"stiefel retraction: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return schedule


def _low_precision(precision: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether to run the matmuls on bf16 operands (float32 accumulation and output)."""
    if dtype != torch.float32 or precision == "fp32":
        return False  # float64 stays float64 throughout
    return precision == "mixed" or device.type == "cuda"


def _mm(a: torch.Tensor, b: torch.Tensor, low: bool) -> torch.Tensor:
    """Batched ``a @ b``; with ``low``: operands rounded to bf16, products summed and returned in
    float32 (tensor-core bf16 GEMM with a float32 output on CUDA, emulated exactly on CPU)."""
    if not low:
        return a @ b
    a16, b16 = a.bfloat16(), b.bfloat16()
    if a.is_cuda:
        try:
            return torch.bmm(a16, b16, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no out_dtype
            return a @ b
    return a16.float() @ b16.float()  # bf16 values are exact in float32: same numerics


def _gram(X: torch.Tensor, how: str) -> torch.Tensor:
    """``X X^T`` of a wide stack. ``fp32``: working precision. ``bf16``: one bf16 GEMM (error
    ~2^-9 relative). ``split``: X = H + L with H = bf16(X), L = bf16(X - H), A = H H^T + C + C^T
    with C = H L^T (two bf16 GEMMs, error ~2^-17: float32-grade at a fraction of the cost)."""
    if how == "fp32":
        return X @ X.mT
    H = X.bfloat16()
    A = _mm(H, H.mT, True)
    if how == "split":
        C = _mm(H, (X - H.float()).bfloat16().mT, True)
        A = A + C + C.mT
    return A


def _cubic_update(X: torch.Tensor, A: torch.Tensor, low: bool) -> torch.Tensor:
    """One cubic Newton-Schulz step X <- 1.5 X - 0.5 A X = X + 0.5 (I - A) X."""
    if not low:
        return torch.baddbmm(X, A, X, beta=1.5, alpha=-0.5)
    E = _eye_minus(A)
    return X + 0.5 * _mm(E, X, True)


def _eye_minus(A: torch.Tensor) -> torch.Tensor:
    E = -A
    E.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return E


def polar_newton_schulz(
    X: torch.Tensor,
    steps: int = 5,
    tol: float | None = None,
    *,
    schedule: str | None = None,
    precision: str = "auto",
) -> PolarNS:
    """Newton-Schulz iteration for the polar factor of ``X`` (..., m, n), batched.

    ``X`` must already be floating point (the iteration runs in its dtype). ``schedule``:

    * ``"fixed"`` (default without ``tol``): exactly ``steps`` cubic iterations;
    * ``"check"`` (default with ``tol``): cubic iterations until every matrix's Stiefel distance
      is ``<= tol``, at most ``steps`` (one host sync per iteration; the distance comes free from
      the Gram matrix the iteration computes anyway);
    * ``"predict"``: read the distance (and two spectral moments) once -- one host sync -- and
      run the number of second-order-corrected iterations that provably reaches ``tol``
      (module docstring, "Adaptive step count"), falling back to ``"check"`` when the input is
      too far from the manifold for the prediction.

    ``precision``: ``"fp32"`` runs every matmul in ``X``'s dtype at full precision; ``"mixed"``
    runs them on bf16 operands with float32 accumulation where that keeps the accuracy;
    ``"auto"`` = mixed for float32 on CUDA, fp32 otherwise. See the module docstring for the
    pre-scaling and the behaviour on ill-conditioned and rank-deficient inputs.
    """
    if X.ndim < 2:
        raise ValueError(f"polar_newton_schulz needs (..., m, n), got shape {list(X.shape)}")
    schedule = _check_schedule(steps, tol, schedule, precision)
    if schedule == "predict":
        return polar_newton_schulz_buckets([X], steps=steps, tol=tol, precision=precision)[0]
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide form so the Gram matrix is the small side
        X = X.mT
    low = _low_precision(precision, X.dtype, X.device)
    how = "split" if low else "fp32"  # fixed/check: every Gram to float32 accuracy
    with full_fp32_matmul():
        A = _gram(X, how)
        distance_before = _gram_distance(A)
        bound_sq = torch.minimum(A.abs().sum(-1).amax(-1), A.norm(dim=(-2, -1)))
        scale_sq = torch.where(bound_sq > SCALE_LIMIT**2, 1.0 / bound_sq, torch.ones_like(bound_sq))
        X = X * scale_sq.sqrt()[:, None, None]
        A = A * scale_sq[:, None, None]
        taken = 0
        for i in range(steps):
            if i > 0:
                A = _gram(X, how)
            if schedule == "check" and bool((_gram_distance(A) <= tol).all()):
                break
            X = _cubic_update(X, A, low)
            taken += 1
    if tall:
        X = X.mT
    return PolarNS(X.reshape(shape), distance_before.reshape(shape[:-2]), taken)


# ---------------------------------------------------------------- adaptive step count (predict)
# Error of one corrected step on an eigenvalue lambda = 1 - e of the Gram matrix:
# X <- (I + E/2 + 3E^2/8) X gives e' = 5/8 e^3 + 15/64 e^4 + 9/64 e^5 (exactly), so
# |e'| <= R(|e|) with R below, monotone, R(x) < x for x < 1.
def _R(x: float) -> float:
    return x**3 * (0.625 + x * (0.234375 + 0.140625 * x))


def predicted_distances(
    d: float, m4: float, m8: float, k: int, steps: int
) -> list[float]:
    """Upper bounds of the Stiefel distance after t = 0..steps corrected iterations (exact
    arithmetic), from the distance ``d`` = sqrt(mean e^2) and the moments ``m4`` = mean e^4,
    ``m8`` = mean e^8 of the eigenvalues e of E = I - X X^T (k x k). ``inf`` where the bound does
    not contract (too far from the manifold for the prediction)."""
    out = [d]
    # rho >= max|e|: the smallest of the Frobenius, Schatten-4 and Schatten-8 norms of E
    rho = min(math.sqrt(k) * d, (k * m4) ** 0.25, (k * m8) ** 0.125)
    if rho == 0.0:
        return out + [0.0] * steps
    if rho >= 1.0:
        return out + [math.inf] * steps
    r = rho
    for t in range(1, steps + 1):
        r = _R(r)  # >= max|e| after t steps
        # |e_t| <= (R^t(rho) / rho^(3^t)) |e|^(3^t) since R^t(x)/x^(3^t) increases with x;
        # mean(e^(2*3^t)) <= rho^(2*3^t - 8) m8 (t >= 2), mean(e^6) <= sqrt(m4 m8) (t = 1)
        if t == 1:
            bound = r / rho**3 * (m4 * m8) ** 0.25
        else:
            bound = r / rho**4 * math.sqrt(m8)
        out.append(min(bound, r))
    return out


def choose_steps(
    d: float, m4: float, m8: float, k: int, tol: float, max_steps: int,
    gram_floor: float, update_rel_floor: float,
) -> int | None:
    """Smallest count whose predicted distance (plus the rounding floors) is ``<= tol``;
    ``None`` if none up to ``max_steps`` is."""
    bounds = predicted_distances(d, m4, m8, k, max_steps)
    if bounds[0] + gram_floor <= tol:
        return 0
    for t in range(1, max_steps + 1):
        if bounds[t] + gram_floor + update_rel_floor * bounds[t - 1] <= tol:
            return t
    return None


# Monotonicity (used by the in-place engine below to decide a whole bucket from its worst case).
# predicted_distances(d, m4, m8)[t] is non-decreasing in each of d, m4, m8:
#  * rho = min(sqrt(k) d, (k m4)^(1/4), (k m8)^(1/8)) is non-decreasing in each argument, and so
#    is r_t = R^t(rho) (R is increasing on [0, inf));
#  * t = 1: r_1 / rho^3 = 0.625 + 0.234375 rho + 0.140625 rho^2 is increasing in rho, and
#    (m4 m8)^(1/4) in m4, m8; t >= 2: r_t / rho^4 = (R^t(rho) / rho^(3^t)) rho^(3^t - 4) is a
#    product of two increasing functions (3^t - 4 > 0), and sqrt(m8) is increasing;
#  * min(bound, r_t) of non-decreasing functions is non-decreasing; rho = 0 gives 0 and rho >= 1
#    gives inf, both consistent with the order.
# So if the t-step criterion of choose_steps holds at the componentwise maximum (d*, m4*, m8*)
# of a bucket's matrices, it holds for every matrix of the bucket: each one is then proven to
# reach tol after t steps. (The converse is false -- the maximum may be worse than every single
# matrix -- so a bucket that fails at its maximum is decided matrix by matrix, exactly as before.)


class BucketResult(NamedTuple):
    """What :class:`StiefelRetractor` did to one bucket of same-shaped matrices."""

    steps: int  # corrected iterations applied (the 'check' fallback: its iteration count)
    distance_before: torch.Tensor  # Stiefel distance of each matrix before, float64 on the CPU
    fallback: bool  # too far off for the bound: retracted with the 'check' schedule instead


_PROBES: dict[tuple[str, torch.device], bool] = {}


def _probe(name: str, device: torch.device, check: Callable[[torch.device], bool]) -> bool:
    """``check(device)`` once per (probe, device): whether a torch feature works there (CUDA
    only; an exception means no)."""
    if device.type != "cuda":
        return False
    key = (name, device)
    if key not in _PROBES:
        try:
            _PROBES[key] = bool(check(device))
        except (TypeError, RuntimeError, NotImplementedError):
            _PROBES[key] = False
    return _PROBES[key]


def _check_addmm_into(device: torch.device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(24, 40, device=device, generator=g).bfloat16()
    b = torch.randn(40, 16, device=device, generator=g).bfloat16()
    c = torch.randn(24, 16, device=device, generator=g)
    ref = c + a.float() @ b.float()
    out = c.clone()
    torch.addmm(out, a, b, out_dtype=torch.float32, alpha=-1.0, out=out)
    torch.addmm(out, a, b, out_dtype=torch.float32, alpha=2.0, out=out)
    return bool(((out - ref).abs().max() < 1e-3).item())


def _check_baddbmm_into(device: torch.device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(2, 24, 40, device=device, generator=g).bfloat16()
    b = torch.randn(2, 40, 16, device=device, generator=g).bfloat16()
    c = torch.full((2, 24, 16), float("nan"), device=device)
    ref = -0.25 * (a.float() @ b.float()) + 2.0 * (a.float() @ b.float())
    torch.baddbmm(c, a, b, beta=0.0, alpha=-0.25, out_dtype=torch.float32, out=c)
    torch.baddbmm(c, a, b, beta=1.0, alpha=2.0, out_dtype=torch.float32, out=c)
    return bool(((c - ref).abs().max() < 1e-3).item())


def _addmm_into_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(C, A16, B16, out_dtype=float32, out=C)`` accumulates a bf16 product
    into a float32 matrix in place on ``device`` (CUDA, recent torch), checked once per device
    against a reference; otherwise the update is formed as a float32 temporary and added."""
    return _probe("addmm_into", device, _check_addmm_into)


def _baddbmm_into_supported(device: torch.device) -> bool:
    """Whether ``torch.baddbmm(C, A16, B16, beta, alpha, out_dtype=float32, out=C)`` computes
    ``beta C + alpha A B`` from bf16 batches into a float32 C in place on ``device`` (beta = 0
    ignoring C, NaN included), checked once per device against a reference; otherwise the
    product is formed as a float32 temporary and added."""
    return _probe("baddbmm_into", device, _check_baddbmm_into)


class _Bucket:
    """Same-shaped matrices retracted together, in place: each one a 2-D view of its parameter.

    Work buffers are allocated once and reused by every call (and captured by the CUDA graph):
    with bf16 products (``low``) ``H = bf16(X)`` and, for float32-accurate Gram matrices,
    ``L = bf16(X - H)``; otherwise ``S``, an exact copy of X in the compute dtype (the update
    reads X while it writes the parameters, so it needs a copy anyway). The k x k work of a
    call lives in ``W`` (3, B, k, k), float32 (the compute dtype without ``low``):
    ``W[0] = E/2``, ``W[1] = (E/2)^2``, ``W[2] = (E/2)^4`` with E = I - X X^T of the wide form;
    the three squared Frobenius norms (one reduction over W) are the statistics up to exact
    powers of 2, and the products write straight into W (no copies, no stacking).
    """

    def __init__(self, params: Sequence[torch.Tensor], tol: float, precision: str) -> None:
        p0 = params[0]
        m, n = as_matrix(p0).shape
        self.params = list(params)
        self.shape = (m, n)
        self.tall = m > n
        self.k = k = min(m, n)
        self.dtype = compute_dtype(p0.dtype)
        self.device = p0.device
        for p in self.params:
            if as_matrix(p).shape != (m, n) or p.dtype != p0.dtype or p.device != p0.device:
                raise ValueError(
                    "StiefelRetractor: a bucket must hold matrices of one flattened shape, dtype and "
                    f"device; got {list(p0.shape)} {p0.dtype} {p0.device} and {list(p.shape)} {p.dtype} {p.device}"
                )
        self.low = _low_precision(precision, self.dtype, self.device)
        accurate = tol < BF16_GRAM_TOL
        self.how = ("split" if accurate else "bf16") if self.low else "fp32"
        self.mats: list[torch.Tensor] = []
        self.staged = False  # a parameter whose matrix is not a view: work on a copy, copy back
        for p in self.params:
            try:
                self.mats.append(p.view(m, n))
            except RuntimeError:
                self.mats.append(p.reshape(m, n).contiguous())
                self.staged = True
        B = len(self.params)
        dev = self.device
        self.addmm_into = self.low and p0.dtype == torch.float32 and _addmm_into_supported(dev)
        self.baddbmm_into = self.low and _baddbmm_into_supported(dev)
        kk_dtype = torch.float32 if self.low else self.dtype
        if self.low:
            self.H = torch.empty((B, m, n), dtype=torch.bfloat16, device=dev)
            self.L = torch.empty_like(self.H) if self.how == "split" else None
            self.S = self.H  # the update's operand: bf16(X)
            self.P = torch.empty((B, k, k), dtype=torch.bfloat16, device=dev)  # bf16(E/2), then the update
            self.Q = torch.empty_like(self.P)  # bf16((E/2)^2), the operand of (E/2)^4
        else:
            self.S = torch.empty((B, m, n), dtype=self.dtype, device=dev)
            self.H = self.L = self.Q = None
            self.P = torch.empty((B, k, k), dtype=self.dtype, device=dev)
        self.G = torch.empty((B, k, k), dtype=kk_dtype, device=dev) if self.how == "split" else None
        self.W = torch.empty((3, B, k, k), dtype=kk_dtype, device=dev)
        # ||E||^2 / k = 4 ||E/2||^2 / k, ||E^2||^2 / k = 16 ||(E/2)^2||^2 / k, ||E^4||^2 / k = 256 ...
        self.stat_scale = torch.tensor([4.0 / k, 16.0 / k, 256.0 / k], dtype=kk_dtype, device=dev)
        self.S_list = list(self.S.unbind(0))
        self.L_list = list(self.L.unbind(0)) if self.L is not None else None

    def key(self) -> tuple:
        return tuple((p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype) for p in self.params)

    def _wide(self, T: torch.Tensor) -> torch.Tensor:
        return T.mT if self.tall else T  # the wide form as a view, never a copy

    def _product(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> None:
        """``out <- beta out + alpha (a @ b)`` in place (beta 0 or 1; beta 0 ignores out). With
        ``low``, a and b are bf16 and out float32: one bf16 GEMM accumulating into out where
        torch offers it, the emulation (bf16 values, float32 products) on CPU."""
        if not self.low:
            torch.baddbmm(out, a, b, beta=beta, alpha=alpha, out=out)
            return
        if self.baddbmm_into:
            torch.baddbmm(out, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=out)
            return
        prod = _mm(a, b, True).to(out.dtype)
        if beta == 0:
            torch.mul(prod, alpha, out=out)
        else:
            out.add_(prod, alpha=alpha)

    # -- the pieces of one corrected iteration, all without a host sync
    def _load(self, how: str) -> None:
        if self.staged:
            for p, mat in zip(self.params, self.mats):
                if mat.data_ptr() != p.data_ptr():
                    mat.copy_(p.reshape(mat.shape))
        torch._foreach_copy_(self.S_list, self.mats)  # one pass: X -> bf16(X) (or an exact copy)
        if how == "split":
            for X, H, L in zip(self.mats, self.S_list, self.L_list):
                torch.sub(X, H, out=L)  # X - H is exact in float32; L = bf16 of it

    def _half_residual(self, how: str) -> torch.Tensor:
        """``W[0] = E/2 = (I - X X^T)/2`` of the wide form, from the loaded buffers. ``split``:
        G = -H H^T/4 - H L^T/2 (two bf16 GEMMs accumulated in float32, G never leaves float32),
        E/2 = G + G^T + I/2, exactly symmetric (the float32-grade Gram H H^T + H L^T + L H^T of
        the module docstring, halved). ``bf16`` / ``fp32``: one product in that precision."""
        S = self._wide(self.S)
        Eh = self.W[0]
        if how == "split":
            L = self._wide(self.L)
            self._product(self.G, S, S.mT, alpha=-0.25, beta=0.0)
            self._product(self.G, S, L.mT, alpha=-0.5, beta=1.0)
            torch.add(self.G, self.G.mT, out=Eh)
        else:
            self._product(Eh, S, S.mT, alpha=-0.5, beta=0.0)
        Eh.diagonal(dim1=-2, dim2=-1).add_(0.5)
        return Eh

    def _square_half_residual(self, moments: bool) -> None:
        """``W[1] = (E/2)^2`` (and with ``moments`` ``W[2] = (E/2)^4``) from ``W[0]``; then the
        update ``P = E/2 + 3E^2/8 = W[0] + 1.5 W[1]`` (bf16 with ``low``)."""
        Eh, Eh2, Eh4 = self.W.unbind(0)
        if self.low:
            self.P.copy_(Eh)  # bf16(E/2): the operand of its square
            self._product(Eh2, self.P, self.P, alpha=1.0, beta=0.0)
            if moments:
                self.Q.copy_(Eh2)
                self._product(Eh4, self.Q, self.Q, alpha=1.0, beta=0.0)
        else:
            torch.bmm(Eh, Eh, out=Eh2)
            if moments:
                torch.bmm(Eh2, Eh2, out=Eh4)
        torch.add(Eh, Eh2, alpha=1.5, out=self.P)  # the cast to bf16 is the store

    def _apply(self, alpha: float = 1.0) -> None:
        """X += alpha (P X) for the wide form, i.e. X += alpha X P for a tall parameter (P is
        symmetric), accumulated into the parameters in place."""
        if self.addmm_into:  # the bf16 product accumulated in float32 straight into X (no temporary)
            for X, S, P in zip(self.mats, self.S_list, self.P.unbind(0)):
                a, b = (S, P) if self.tall else (P, S)
                torch.addmm(X, a, b, out_dtype=torch.float32, alpha=alpha, out=X)
            return
        U = _mm(self.S, self.P, self.low) if self.tall else _mm(self.P, self.S, self.low)
        if alpha != 1.0:
            U = U * alpha
        torch._foreach_add_(self.mats, list(U.unbind(0)))

    def _store(self) -> None:
        if self.staged:
            for p, mat in zip(self.params, self.mats):
                if mat.data_ptr() != p.data_ptr():
                    p.copy_(mat.view(p.shape))

    def measure(self, stats_out: torch.Tensor, apply: bool) -> None:
        """Load X, form E/2, (E/2)^2, (E/2)^4 (k x k, in W); write each matrix's (d^2, mean e^4,
        mean e^8) into ``stats_out`` (B, 3) from one reduction over W; keep P = E/2 + 3E^2/8;
        with ``apply``, also run the first corrected iteration X <- X + P X in place."""
        self._load(self.how)
        self._half_residual(self.how)
        self._square_half_residual(moments=True)
        norms = torch.linalg.vector_norm(self.W, dim=(-2, -1))  # (3, B): one reduction kernel
        stats_out.copy_(norms.mT.square().mul_(self.stat_scale))
        if apply:
            self._apply()
            self._store()

    def iterate(self, how: str) -> None:
        """One more corrected iteration from the current X (Gram formed as ``how``)."""
        self._load(how)
        self._half_residual(how)
        self._square_half_residual(moments=False)
        self._apply()
        self._store()

    def undo_first(self) -> None:
        """Back to the X that :meth:`measure` loaded: an exact copy where one was kept; with bf16
        products X - P H, the same product subtracted again (equal to X up to two float32
        roundings, |error| <= 2^-24 (|X| + 2 |P H|) per entry)."""
        if self.low:
            self._apply(alpha=-1.0)
        else:
            torch._foreach_copy_(self.mats, self.S_list)
        self._store()

    def check_fallback(self, steps: int, tol: float, precision: str) -> int:
        stack = torch.stack([mat.to(self.dtype) for mat in self.mats])
        res = polar_newton_schulz(stack, steps=steps, tol=tol, schedule="check", precision=precision)
        torch._foreach_copy_(self.mats, list(res.polar.unbind(0)))
        self._store()
        return res.steps


class StiefelRetractor:
    """The ``"predict"`` retraction of fixed parameters, in place, built once and called every step.

    ``buckets``: lists of parameters; the matrices of one bucket (same flattened shape, dtype and
    device) are processed by batched products. A call:

    1. for every bucket, without a host sync (on CUDA each bucket on its own stream): H = bf16(X)
       and L = bf16(X - H) straight from the parameters (no float32 stack), the Gram matrix
       A = H H^T + H L^T + L H^T of the small side, E/2 = (I - A)/2, (E/2)^2, (E/2)^4 (k x k, into
       one buffer) and each matrix's (d^2, mean e^4, mean e^8) from one reduction; with
       ``speculate`` (default) also the first corrected iteration X <- X + P X, P = E/2 + 3E^2/8,
       as one product per matrix accumulated into the parameter in place (a tall parameter is
       updated as X + X P: its transposed view, never a transposed copy);
    2. ONE host sync reads the statistics of all buckets;
    3. per bucket, on the host: if the t = 1 criterion of :func:`choose_steps` holds at the
       bucket's componentwise-worst statistics, it holds for every matrix (monotonicity, see the
       comment above :class:`BucketResult`) and the speculative iteration is the whole work:
       every matrix provably reaches ``tol``. Otherwise each matrix's count is chosen exactly as
       :func:`polar_newton_schulz_buckets` does: count n >= 2 -> n - 1 more iterations from the
       speculative iterate (which *is* the schedule's first iterate); n = 0 for all (already
       within tol, but one step not proven harmless) -> the iteration is undone; a matrix too
       far off for the bound -> undone, then the ``"check"`` schedule.
       A bucket within ``tol`` before the call still gets the one iteration when the t = 1
       bound proves it stays within ``tol``: the count logged is the count applied.

    Without ``speculate`` (used by the out-of-place functions) nothing is applied before the
    sync, and a bucket already within ``tol`` gets 0 iterations.

    ``cuda_graph``: ``"auto"`` (default) captures step 1 (all buckets) in a CUDA graph on CUDA
    devices (the parameters' storage is stable across optimizer steps, so the graph reads and
    writes them directly) and replays it: per call the host then launches one graph instead of
    ~30 kernels per bucket. The first call runs eagerly on a side stream (warm-up), the second
    captures; any change of the parameters' storage (data_ptr, shape, stride, dtype) rebuilds,
    and a failed capture falls back to the eager path for good. ``False``: always eager.
    ``True``: like ``"auto"``, but raise where a graph cannot be used. Never used on CPU.
    Errors-free reuse requires the same parameter objects; the result of each call is a list
    of :class:`BucketResult`, aligned with ``buckets``.
    """

    def __init__(
        self,
        buckets: Sequence[Sequence[torch.Tensor]],
        steps: int = 5,
        tol: float = 1e-3,
        precision: str = "auto",
        cuda_graph: bool | str = "auto",
        speculate: bool = True,
    ) -> None:
        _check_schedule(steps, tol, "predict", precision)
        check_cuda_graph_setting(cuda_graph, "StiefelRetractor: ")
        buckets = [list(b) for b in buckets if len(b)]
        devices = {b[0].device for b in buckets}
        if len(devices) > 1:
            raise ValueError(
                f"StiefelRetractor: all buckets must be on one device (one host sync each), got {sorted(map(str, devices))}; "
                "build one retractor per device"
            )
        self.steps, self.tol, self.precision = steps, tol, precision
        self.cuda_graph, self.speculate = cuda_graph, bool(speculate)
        with torch.no_grad():
            self.buckets = [_Bucket(b, tol, precision) for b in buckets]
        self.device = self.buckets[0].device if self.buckets else torch.device("cpu")
        sizes = [len(b.params) for b in self.buckets]
        self.rows = [slice(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
        stats_dtype = torch.float64 if any(b.dtype == torch.float64 for b in self.buckets) else torch.float32
        self.stats = torch.zeros((sum(sizes), 3), dtype=stats_dtype, device=self.device)
        self._key = self._current_key()
        # the largest bucket is enqueued first, each on its own CUDA stream
        self._order = sorted(range(len(self.buckets)),
                             key=lambda i: -len(self.buckets[i].params) * math.prod(self.buckets[i].shape))
        self.streams = bucket_streams(self.device, len(self.buckets))
        self.captured = CapturedStep(self.device, strict=cuda_graph is True)

    # ---------------------------------------------------------------- graph bookkeeping
    def _current_key(self) -> tuple:
        return tuple(b.key() for b in self.buckets)

    def _graph_eligible(self) -> bool:
        if self.cuda_graph is False or self.device.type != "cuda" or not self.buckets:
            return False
        why = None
        if any(b.staged for b in self.buckets):
            why = "a parameter's matrix is not a view of it (non-contiguous storage)"
        elif self.captured.failed:
            why = f"capture failed earlier ({self.captured.failed})"
        elif torch.cuda.is_current_stream_capturing():
            why = "called inside another CUDA graph capture"
        if why and self.cuda_graph is True:
            raise RuntimeError(f"StiefelRetractor: cuda_graph=True but a graph cannot be used: {why}; use cuda_graph='auto'")
        return why is None

    @property
    def uses_graph(self) -> bool:
        """Whether the last call replayed a captured graph."""
        return self.captured.graph is not None

    def _measure_all(self) -> None:
        run_branches(
            None if self.streams is None else [self.streams[i] for i in self._order],
            [functools.partial(self.buckets[i].measure, self.stats[self.rows[i]], apply=self.speculate)
             for i in self._order],
        )

    def _run_first(self) -> None:
        if self._graph_eligible():
            self.captured.run(self._measure_all)
        else:
            self._measure_all()

    # ---------------------------------------------------------------- the call
    @torch.no_grad()
    def __call__(self, agree: Callable[[list[list[list[float]]]], list[list[list[float]]]] | None = None
                 ) -> list[BucketResult]:
        """Retract. ``agree`` (sharded buckets, each rank holding some of a bucket's matrices)
        maps every bucket's per-matrix statistics to those of all of its matrices over the ranks,
        so each rank chooses the count one process would (a collective: every rank calls it)."""
        if not self.buckets:
            return []
        key = self._current_key()
        if key != self._key:  # storage moved (e.g. .to(), a new tensor): rebuild buffers and graph
            self.__init__([b.params for b in self.buckets], self.steps, self.tol, self.precision,
                          self.cuda_graph, self.speculate)
        with full_fp32_matmul():
            self._run_first()
            host = self.stats.cpu().tolist()  # the one host sync of the call
            mine = [host[rows] for rows in self.rows]
            every = agree(mine) if agree is not None else mine
            return [self._finish(b, m, e) for b, m, e in zip(self.buckets, mine, every)]

    def _finish(self, b: _Bucket, rows: list[list[float]], every: list[list[float]]) -> BucketResult:
        # rows: this bucket's matrices' statistics; every: those the count is chosen from (all
        # ranks' matrices of the bucket where the ranks agree, else rows)
        safety = MOMENT_SAFETY if b.low else 1.0
        gram_floor, rel_floor = GRAM_FLOOR[b.how], UPDATE_REL_FLOOR[b.low]
        distance_before = torch.tensor([math.sqrt(max(r[0], 0.0)) for r in rows], dtype=torch.float64)
        if self.speculate:
            d2, m4, m8 = (max(r[i] for r in every) for i in range(3))
            worst = predicted_distances(math.sqrt(max(d2, 0.0)), m4 * safety, m8 * safety, b.k, 1)
            if worst[1] + gram_floor + rel_floor * worst[0] <= self.tol:  # NaN compares False
                return BucketResult(1, distance_before, False)
        counts = [
            choose_steps(math.sqrt(max(d2, 0.0)), m4 * safety, m8 * safety, b.k, self.tol, self.steps,
                         gram_floor, rel_floor)
            for d2, m4, m8 in every
        ]
        if any(c is None for c in counts):  # too far for the bound: check every iteration
            if self.speculate:
                b.undo_first()
            return BucketResult(b.check_fallback(self.steps, self.tol, self.precision), distance_before, True)
        n = max(counts)
        done = 1 if self.speculate else 0
        if n == 0:
            if done:  # within tol already, but the t = 1 bound does not prove the extra step harmless
                b.undo_first()
            return BucketResult(0, distance_before, False)
        if not done:
            b._apply()
            b._store()
        for t in range(1, n):
            # intermediate Gram matrices need no float32 accuracy (the iteration corrects their
            # errors); the last one sets the final accuracy
            b.iterate(b.how if (t == n - 1 or not b.low) else "bf16")
        return BucketResult(n, distance_before, False)


def group_by_shape(params: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (flattened shape, device, dtype): the buckets of
    :class:`StiefelRetractor`, in order of first appearance. Raises for 0-/1-D tensors."""
    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(params):
        M = as_matrix(W, name=f"#{i} of the list")
        groups.setdefault((tuple(M.shape), W.device, W.dtype), []).append(i)
    return list(groups.values())


# The one cache of in-place retractors (their buffers and CUDA graphs), shared by
# stiefel_retract_ and ManifoldRetraction's plans; keyed by the parameters and the options.
_RETRACTORS: dict[tuple, StiefelRetractor] = {}
_MAX_CACHED = 8


def retractor_for(
    buckets: Sequence[Sequence[torch.Tensor]],
    steps: int = 5,
    tol: float = 1e-3,
    precision: str = "auto",
    cuda_graph: bool | str = "auto",
) -> StiefelRetractor:
    """The cached :class:`StiefelRetractor` over ``buckets`` (lists of same-shaped parameters on
    one device) with these options, built on first use; at most 8 sets are kept (oldest dropped;
    :func:`release_retractors` frees those of given parameters)."""
    key = (tuple(tuple(id(p) for p in b) for b in buckets), steps, tol, precision, cuda_graph)
    retractor = _RETRACTORS.get(key)
    if retractor is None:
        while len(_RETRACTORS) >= _MAX_CACHED:
            _RETRACTORS.pop(next(iter(_RETRACTORS)))
        retractor = _RETRACTORS[key] = StiefelRetractor(buckets, steps, tol, precision, cuda_graph)
    return retractor


def release_retractors(params: Sequence[torch.Tensor] | None = None) -> None:
    """Drop the cached retractors (buffers, CUDA graphs) that hold any of ``params``; all of
    them when ``params`` is None."""
    if params is None:
        _RETRACTORS.clear()
        return
    ids = {id(p) for p in params}
    for key in [k for k in _RETRACTORS if any(i in ids for b in k[0] for i in b)]:
        del _RETRACTORS[key]


def stiefel_retract_(
    params: Sequence[torch.Tensor],
    steps: int = 5,
    tol: float = 1e-3,
    *,
    precision: str = "auto",
    cuda_graph: bool | str = "auto",
) -> list[BucketResult]:
    """Retract ``params`` onto the Stiefel manifold IN PLACE with the ``"predict"`` schedule
    (see :class:`StiefelRetractor`, built once per set of parameters and cached by
    :func:`retractor_for`). Returns one :class:`BucketResult` per bucket of
    :func:`group_by_shape` (per device, one sync each)."""
    params = list(params)
    for i, W in enumerate(params):
        _check_tensor(W)
        if not W.is_floating_point():
            raise TypeError(f"stiefel_retract_: parameter #{i} has dtype {W.dtype}, not floating point")
    by_device: dict[torch.device, list[list[int]]] = {}
    for idx in group_by_shape(params):
        by_device.setdefault(params[idx[0]].device, []).append(idx)
    results: list[BucketResult] = []
    for idxs in by_device.values():
        buckets = [[params[i] for i in idx] for idx in idxs]
        results.extend(retractor_for(buckets, steps, tol, precision, cuda_graph)())
    return results


def clear_stiefel_cache() -> None:
    """Drop every cached retractor (and its CUDA graphs and buffers)."""
    release_retractors()


def polar_newton_schulz_buckets(
    stacks: Sequence[torch.Tensor],
    steps: int = 5,
    tol: float = 1e-3,
    precision: str = "auto",
    agree: Callable[[list[list[list[float]]]], list[list[list[float]]]] | None = None,
    speculate: bool = False,
) -> list[PolarNS]:
    """The ``"predict"`` schedule for several stacks of same-shaped matrices with ONE host sync.

    For each stack (..., m, n): the Gram matrix A of the small side (to float32 accuracy when
    ``tol`` < 1e-2), E = I - A, E^2 and E^4 give each matrix's distance d and moments; one sync
    reads them all; each stack then runs, without further syncs, the smallest count t <= ``steps``
    whose bound (:func:`predicted_distances` plus rounding floors) is ``<= tol`` of the corrected
    iteration X <- X + (E/2 + 3E^2/8) X (the Taylor expansion of A^(-1/2) X to second order:
    third-order convergence, one k x k x k product more than the cubic step, which is needed
    for the moments anyway). Matrices too far from the manifold for the bound (a stack with no
    such t) are retracted with the ``"check"`` schedule instead (one sync per iteration).
    Returns one :class:`PolarNS` per stack; ``steps`` is the count that stack ran. The inputs
    are not modified: this runs :class:`StiefelRetractor` (without speculation or graph) on
    float copies of them (``speculate``: with the first iteration computed before the sync, so
    the count is the in-place retraction's, at least 1 where one iteration provably suffices).
    ``agree``: see :meth:`StiefelRetractor.__call__` (one stack on one device; an empty stack
    still takes part).
    """
    _check_schedule(steps, tol, "predict", precision)
    copies, shapes = [], []
    for X in stacks:
        if X.ndim < 2:
            raise ValueError(f"polar_newton_schulz needs (..., m, n), got shape {list(X.shape)}")
        shapes.append(X.shape)
        copies.append(X.reshape(-1, *X.shape[-2:]).to(compute_dtype(X.dtype), copy=True))
    results: list[PolarNS | None] = [None] * len(copies)
    by_device: dict[torch.device, list[int]] = {}
    for i, C in enumerate(copies):
        if C.shape[0] > 0:
            by_device.setdefault(C.device, []).append(i)
        else:
            results[i] = PolarNS(C.reshape(shapes[i]), C.new_zeros(shapes[i][:-2]), 0)
    if agree is not None and not by_device:  # nothing of ours to retract: agree all the same
        agree([[] for _ in copies])
    for idx in by_device.values():
        retractor = StiefelRetractor([list(copies[i].unbind(0)) for i in idx], steps, tol, precision,
                                     cuda_graph=False, speculate=speculate)
        for i, res in zip(idx, retractor(agree)):
            d = res.distance_before.to(device=copies[i].device, dtype=copies[i].dtype)
            results[i] = PolarNS(copies[i].reshape(shapes[i]), d.reshape(shapes[i][:-2]), res.steps, res.fallback)
    return results  # type: ignore[return-value]


def _check_tensor(W) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"expected a tensor or a list of tensors, got {type(W).__name__}")
    if W.ndim < 2:
        as_matrix(W)  # raises with the explanation


def _per_parameter(
    Ws: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor], reshape_back: bool
) -> list[torch.Tensor]:
    """Apply a batched (B, m, n) -> (B, ...) function to parameters grouped by flattened shape."""
    mats = [as_matrix(W, name=f"#{i} of the list") for i, W in enumerate(Ws)]
    groups: dict[tuple, list[int]] = {}
    for i, M in enumerate(mats):
        key = (tuple(M.shape), M.device, compute_dtype(M.dtype))
        groups.setdefault(key, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (_, _, dtype), idx in groups.items():
        result = fn(torch.stack([mats[i].to(dtype) for i in idx]))
        for j, i in enumerate(idx):
            r = result[j]
            out[i] = r.reshape(Ws[i].shape).to(Ws[i].dtype) if reshape_back else r
    return out  # type: ignore[return-value]


# The default retraction: to the dtype's tolerance in at most this many iterations, which
# brings relative singular values down to ~1e-4 to 1 (1.5x per step, then quadratic).
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DEFAULT_MAX_STEPS = 30


def stiefel_retract(
    W: torch.Tensor | Sequence[torch.Tensor],
    steps: int | None = None,
    tol: float | None = None,
    *,
    schedule: str | None = None,
    precision: str = "auto",
) -> torch.Tensor | list[torch.Tensor]:
    """Nearest matrix with orthonormal columns (tall) or rows (wide), by Newton-Schulz.

    ``W``: a matrix or a stack (..., m, n), or a list of parameters (conv kernels flattened to
    (out, in*k*k); equal shapes batched together).

    With the defaults the result is on the manifold: iterations run until every Stiefel distance
    is ``<= tol`` (1e-5 in float32, 1e-10 in float64), at most 30, and an input they cannot
    bring there (rank-deficient, or a condition number beyond ~1e4) raises ``ValueError`` with
    the distance reached; :func:`stiefel_retract_exact` handles those. ``steps`` alone runs
    exactly that many iterations (a truncated iteration: :func:`stiefel_distance` says how far
    it is); ``steps`` with ``tol`` is the maximum. ``schedule``: ``"check"`` (stop at ``tol``,
    one host sync per iteration), ``"fixed"`` (exactly ``steps``) or ``"predict"`` (one host
    sync for the whole call, then the step count proven to reach ``tol``). ``precision``:
    ``"auto"`` | ``"fp32"`` | ``"mixed"`` (bf16 matmuls where the accuracy allows; see
    :func:`polar_newton_schulz`). Returns new tensor(s) of the input shape(s) and dtype(s).

    Example::

        Q = stiefel_retract(torch.randn(64, 32))   # Q.T @ Q = I to 1e-5
        Ws = stiefel_retract([layer.weight for layer in layers])
    """
    to_tolerance = steps is None and schedule in (None, "check")
    if to_tolerance:
        steps = DEFAULT_MAX_STEPS
        if tol is None:
            first = W[0] if isinstance(W, (list, tuple)) and W else W
            dtype = compute_dtype(first.dtype) if isinstance(first, torch.Tensor) else torch.float32
            tol = DEFAULT_TOL[dtype]
    elif steps is None:
        steps = DEFAULT_MAX_STEPS
    schedule = _check_schedule(steps, tol, schedule, precision)

    def run(X: torch.Tensor) -> torch.Tensor:
        result = polar_newton_schulz(X, steps=steps, tol=tol, schedule=schedule, precision=precision)
        if to_tolerance and result.steps == steps:
            _require_reached(result.polar, tol, steps)
        return result.polar

    if isinstance(W, (list, tuple)):
        if schedule == "predict":
            return _per_parameter_buckets(W, steps, tol, precision)
        return _per_parameter(W, run, reshape_back=True)
    _check_tensor(W)
    return run(W.to(compute_dtype(W.dtype))).to(W.dtype)


def _require_reached(X: torch.Tensor, tol: float, steps: int) -> None:
    worst = stiefel_distance(X).max().item()
    if not worst <= tol:
        raise ValueError(
            f"stiefel_retract: {steps} Newton-Schulz iterations left a Stiefel distance of "
            f"{worst:.3g} (tol {tol:g}): the input is rank-deficient or too ill-conditioned for "
            "the iteration. Use stiefel_retract_exact (SVD), or pass a larger steps with tol."
        )


def _per_parameter_buckets(Ws, steps, tol, precision) -> list[torch.Tensor]:
    """``predict`` over a list of parameters, out of place: float copies of the parameters,
    one :class:`StiefelRetractor` bucket per flattened shape (no speculation, no graph: the
    copies are new every call), one sync per device."""
    copies = [as_matrix(W, name=f"#{i} of the list").to(compute_dtype(W.dtype), copy=True)
              for i, W in enumerate(Ws)]
    by_device: dict[torch.device, list[list[int]]] = {}
    for idx in group_by_shape(copies):
        by_device.setdefault(copies[idx[0]].device, []).append(idx)
    for idxs in by_device.values():
        StiefelRetractor([[copies[i] for i in idx] for idx in idxs], steps, tol, precision,
                         cuda_graph=False, speculate=False)()
    return [C.reshape(W.shape).to(W.dtype) for C, W in zip(copies, Ws)]


def stiefel_retract_exact(
    W: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor | list[torch.Tensor]:
    """The polar factor ``U V^T`` by SVD (reference). Same conventions as :func:`stiefel_retract`.

    For rank-deficient inputs U V^T uses whatever null-space basis the SVD returns (not unique).
    """
    def run(X: torch.Tensor) -> torch.Tensor:
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        with full_fp32_matmul():
            return U @ Vh

    if isinstance(W, (list, tuple)):
        return _per_parameter(W, run, reshape_back=True)
    _check_tensor(W)
    return run(W.to(compute_dtype(W.dtype))).to(W.dtype)


def stiefel_distance(
    W: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor | list[torch.Tensor]:
    """``||W^T W - I_n||_F / sqrt(n)`` for tall W, ``||W W^T - I_m||_F / sqrt(m)`` for wide W.

    0 exactly on the manifold; the RMS deviation of the squared singular values from 1
    (sqrt(mean((s_i^2 - 1)^2))). A tensor (..., m, n) gives a tensor (...); a list of parameters
    gives a list of 0-D tensors. Computed in float32 (float64 kept) with full-precision matmuls.
    """
    def run(X: torch.Tensor) -> torch.Tensor:
        small = X.mT @ X if X.size(-2) > X.size(-1) else X @ X.mT
        return _gram_distance(small)

    with full_fp32_matmul():
        if isinstance(W, (list, tuple)):
            return _per_parameter(W, run, reshape_back=False)
        _check_tensor(W)
        X = W.to(compute_dtype(W.dtype))
        return run(X.reshape(-1, *X.shape[-2:])).reshape(X.shape[:-2])
