"""Singular spectra estimated from products with Gram matrices: an exact top subspace plus
stochastic Lanczos quadrature (SLQ) of the rest, for matrices too many or too large for an
exact decomposition at every snapshot.

An exact spectrum of a ``k x k`` Gram matrix ``G = W W^T`` costs an eigendecomposition (``~k^3``
work that does not run on matrix units); a GPT of a billion parameters has hundreds of matrices
with ``k = 2048``. The estimate needs only matrix products, batched over same-shaped matrices:

1. The top: ``rank`` leading directions ``Y`` by subspace iteration on ``G`` (``iterations``
   products with a block of ``rank`` vectors); the eigenvalues of ``(W^T Y)^T (W^T Y)``
   (Rayleigh-Ritz, in float32 from ``W`` itself) are the top of the spectrum, and a few Lanczos
   steps from the leading directions refine ``sigma_max``.
2. The rest: ``W_r = (I - Y Y^T) W`` and its own Gram; ``steps`` Lanczos iterations from each of
   ``probes`` random unit vectors orthogonal to ``Y`` give Gauss quadrature rules -- nodes (Ritz
   values) and weights -- whose mixture approximates the rest's eigenvalue density (Ubaru, Chen
   & Saad 2017). Why deflate, and in ``W`` rather than in ``G``: quadrature resolves a density
   relative to its largest eigenvalue, and a Gram's rounding is relative to its own largest; with
   the top removed from the matrix, the tail of a gradient's spectrum (often below 1e-3
   ``sigma_max``) is resolved.
3. :func:`spectrum_from_sketch` rebuilds ``k`` singular values: the top's Ritz values, and for
   the other ``k - rank`` the ``(i + 1/2)/(k - rank)`` quantiles of the rest's density (the
   lowest set to the smallest node carrying weight), rescaled so that the squares add up to the
   exact ``||W_r||_F^2``. Every figure is then computed from the rebuilt spectrum as from an exact
   one.

Accuracy with the defaults, against float64 SVDs (``tests/test_spectral_estimates.py``: ``k`` 256
to 1024, flat, Marchenko-Pastur, power-law, exponential, low-rank-plus-noise and rank-deficient
spectra; the weights and gradients of this project's GPT, HF GPT-2, an HF Llama and timm's
ResNet-50): ``||W||_F`` exact; spectral norm within 0.5% on gapless tops (a random
initialisation), 1e-5 on decaying spectra; stable rank within 1%; top-k concentration
(``k <= rank``) within 2%, 3% seen on a gapless top (a random GPT-2 ``c_attn``, one draw in
22 of weights and probes); effective rank within 1%, up to 5% on an exponential decay without a
noise floor or a rank between ``rank`` and ``k`` (the gradient of a small batch); a rank up to
``rank`` is kept exactly, a larger one within 2%. The condition number is a lower bound in exact
arithmetic (float32 Lanczos can undershoot ``sigma_min`` by a few percent); read it for spectra
spanning less than ~1e2. Singular values below float32 eps times ``sigma_max`` read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_RANK = 64
DEFAULT_ITERATIONS = 8
DEFAULT_PROBES = 16
DEFAULT_STEPS = 24
TOP_PROBES, TOP_STEPS = 4, 8  # the refinement of sigma_max


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Columns spanning about ``Y`` (``(B, k, r)``), near-orthonormal: the columns brought to unit
    norm, then Cholesky-QR twice with a shift of 1e-3 (matrix products and an ``r x r``
    factorization, cheap on a GPU). Why unit columns and that shift: float32 Gram products on a
    GPU carry ~1e-5 relative rounding, enough to make a smaller-shifted factorization fail on
    the nearly dependent columns of a low-rank gradient; subspace iteration needs only the span,
    and :func:`top_subspace` ends with a Householder QR."""
    for _ in range(2):
        Y = _cholesky_qr(Y / Y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny), 1e-3)
    return Y


def _cholesky_qr(Y: torch.Tensor, shift: float) -> torch.Tensor:
    """One Cholesky-QR pass of the columns of ``Y`` (``(B, k, r)``), their Gram shifted by
    ``shift`` (a failed factorization leaves zeros, not NaNs)."""
    eye = torch.eye(Y.size(-1), dtype=Y.dtype, device=Y.device)
    L, _ = torch.linalg.cholesky_ex(Y.mT @ Y + eye * shift)
    return torch.linalg.solve_triangular(L, Y.mT, upper=False).mT.nan_to_num(0.0, 0.0, 0.0)


def _rademacher(shape: tuple, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype).mul_(2).sub_(1)


def top_subspace(G: torch.Tensor, rank: int = DEFAULT_RANK, iterations: int = DEFAULT_ITERATIONS,
                 generator: torch.Generator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal ``(B, k, rank)`` bases approximating the leading invariant subspaces of
    symmetric PSD ``G`` (``(B, k, k)``), by ``iterations`` steps of subspace iteration from a
    random block (or from ``start``, ``(B, k, rank)``)."""
    if start is None:
        if generator is None:
            generator = torch.Generator(device=G.device).manual_seed(0)
        start = _rademacher((G.size(0), G.size(-1), rank), generator, G)
    Y = _orthonormalize(start)
    for _ in range(iterations):
        Y = _orthonormalize(torch.bmm(G, Y))
    # orthonormal to rounding: the deflated Lanczos needs P = I - Y Y^T to be a projector (the
    # shifted passes' ~1e-6 is amplified by lambda_max / lambda_min). One unshifted Cholesky-QR in
    # float64 of the now well-conditioned columns does it with batched products, where a
    # Householder QR runs one factorization per matrix on CUDA and cannot be a graph
    return _cholesky_qr(Y.double(), 1e-12).to(Y.dtype)


def lanczos_tridiagonals(
    G: torch.Tensor, probes: int = DEFAULT_PROBES, steps: int = DEFAULT_STEPS,
    generator: torch.Generator | None = None, deflate: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos coefficients of symmetric PSD ``G`` (``(B, k, k)``) from ``probes`` random unit
    vectors each (or from the columns of ``start``, ``(B, k, probes)``), restricted to the
    complement of ``deflate`` (orthonormal ``(B, k, r)``) when given: ``alpha`` (diagonals,
    ``(B, probes, steps)``) and ``beta`` (off-diagonals, ``(B, probes, steps - 1)``), in ``G``'s
    dtype on its device.

    No reorthogonalization: Gauss quadrature from plain Lanczos stays accurate in floating point
    (converged Ritz values repeat and share their weight). A probe whose Krylov space is
    exhausted (``beta`` below ``16 eps ||G||_F``, rounding level) stops; its later coefficients
    are zero and carry no weight.
    """
    if G.ndim != 3 or G.size(-1) != G.size(-2):
        raise ValueError(f"lanczos_tridiagonals needs Gram matrices (B, k, k), got shape {tuple(G.shape)}")
    if probes < 1 or steps < 1:
        raise ValueError(f"lanczos_tridiagonals: probes and steps must be >= 1, got probes={probes}, steps={steps}")
    B, k, _ = G.shape
    if start is not None:
        probes = start.size(-1)
    elif generator is None:  # never inside a CUDA graph capture (start given there)
        generator = torch.Generator(device=G.device).manual_seed(0)

    def project(x):
        return x if deflate is None else x - deflate @ (deflate.mT @ x)

    q = project(_rademacher((B, k, probes), generator, G) if start is None else start)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    tiny = (G.flatten(1).norm(dim=1) * (16 * torch.finfo(G.dtype).eps)).view(B, 1, 1)
    alpha = G.new_zeros(B, probes, steps)
    beta = G.new_zeros(B, probes, steps)
    q_prev = torch.zeros_like(q)
    b_prev = G.new_zeros(B, 1, probes)
    for j in range(steps):
        w = project(torch.bmm(G, q))
        a = (q * w).sum(1, keepdim=True)  # (B, 1, probes)
        w = w - a * q - b_prev * q_prev
        b = w.norm(dim=1, keepdim=True)
        alive = b > tiny
        b = torch.where(alive, b, torch.zeros_like(b))
        alpha[:, :, j] = a[:, 0]
        beta[:, :, j] = b[:, 0]
        q_prev, q = q, torch.where(alive, w / b.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(w))
        b_prev = b
    return alpha, beta[:, :, : steps - 1]


def gauss_quadrature(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the Gauss rules of Lanczos coefficients (``(B, probes, steps)`` and
    ``(B, probes, steps - 1)``), merged per matrix: ``(B, probes * steps)`` each, float64 on the
    CPU; each matrix's weights add up to 1."""
    alpha = alpha.detach().to("cpu", torch.float64)
    beta = beta.detach().to("cpu", torch.float64)
    B, p, m = alpha.shape
    T = torch.diag_embed(alpha)
    if m > 1:
        T = T + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    nodes, vecs = torch.linalg.eigh(T)
    weights = vecs[..., 0, :] ** 2 / p
    return nodes.reshape(B, p * m), weights.reshape(B, p * m)


@dataclass
class SpectrumSketch:
    """What the estimate needs from the device, a few hundred numbers per matrix, all of
    ``W / ||W||_F``: the Rayleigh-Ritz matrices of the top subspace (``(B, r, r)``, or None), the
    Lanczos coefficients of the rest and of the ``sigma_max`` refinement, the rest's squared
    Frobenius norm (``(B,)``), and ``||W||_F`` itself (``scale``, ``(B,)``)."""

    ritz: torch.Tensor | None
    alpha: torch.Tensor
    beta: torch.Tensor
    rest_trace: torch.Tensor
    scale: torch.Tensor
    k: int
    top_alpha: torch.Tensor | None = None  # Lanczos from the leading directions (sigma_max)
    top_beta: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"alpha": self.alpha, "beta": self.beta, "rest_trace": self.rest_trace, "scale": self.scale}
        for name in ("ritz", "top_alpha", "top_beta"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], k: int) -> "SpectrumSketch":
        return cls(tensors.get("ritz"), tensors["alpha"], tensors["beta"], tensors["rest_trace"], tensors["scale"], k,
                   tensors.get("top_alpha"), tensors.get("top_beta"))


def sketch_starts(X: torch.Tensor, rank: int = DEFAULT_RANK, probes: int = DEFAULT_PROBES,
                  seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The random start blocks of :func:`sketch_matrices` for matrices shaped like ``X``
    (``(B, k, n)``): Rademacher ``(B, k, rank)`` for the subspace iteration (None at ``rank=0``)
    and ``(B, k, probes)`` for the quadrature, from one generator seeded ``seed``."""
    gen = torch.Generator(device=X.device).manual_seed(seed)
    B, k = X.size(0), X.size(-2)
    like = X.new_empty(())
    top = _rademacher((B, k, rank), gen, like) if rank else None
    return top, _rademacher((B, k, probes), gen, like)


def sketch_matrices(
    X: torch.Tensor, rank: int = DEFAULT_RANK, iterations: int = DEFAULT_ITERATIONS,
    probes: int = DEFAULT_PROBES, steps: int = DEFAULT_STEPS, precision: str = "float32", seed: int = 0,
    starts: tuple[torch.Tensor | None, torch.Tensor] | None = None,
) -> SpectrumSketch:
    """The device part of the estimate for matrices ``X`` (``(B, k, n)``, ``k <= n``, float32;
    overwritten): steps 1 and 2 of the module docstring (``rank=0``: no deflation), results
    left on ``X``'s device. ``starts``: :func:`sketch_starts` (default: drawn from ``seed``);
    given, nothing here draws random numbers or waits for the device, so the whole sketch can be
    one CUDA graph (:class:`CapturedSketch`). Zero columns appended to ``X`` change nothing (its
    Gram is the same), which lets matrices of one ``k`` and different ``n`` share a batch.

    The rest is deflated in the matrix, not in its Gram: ``X - Y (Y^T X)`` in float32, whose
    Gram is formed anew. Why: a Gram's rounding is relative to its largest eigenvalue, and the
    tail of a gradient's spectrum often sits below that (sigma < 1e-3 sigma_max) -- subtracting
    the top from a rounded Gram cannot bring it back; forming the rest's own Gram does.
    """
    if X.ndim != 3 or X.size(-2) > X.size(-1):
        raise ValueError(f"sketch_matrices needs matrices (B, k, n) with k <= n, got shape {tuple(X.shape)}")
    k = X.size(-2)
    if not 0 <= rank < k:
        raise ValueError(f"sketch_matrices: rank must be in [0, k) = [0, {k}), got {rank}; use an exact method for small matrices")
    if starts is None:
        starts = sketch_starts(X, rank, probes, seed)
    with torch.autocast(X.device.type, enabled=False):  # the hook may run under bf16 autocast
        # on unit Frobenius norm (the spectrum scales with it): a gradient of 1e-12 would
        # otherwise underflow the float32 products of its Gram
        scale = torch.linalg.vector_norm(X.flatten(1), dim=1)
        X.div_(torch.where(scale > 0, scale, torch.ones_like(scale))[:, None, None])
        Y = ritz = top_alpha = top_beta = None
        if rank:
            G = estimate_gram(X, precision)
            Y = top_subspace(G, rank, iterations, start=starts[0])
            Z = X.mT @ Y  # (B, n, r), float32
            ritz = Z.mT @ Z  # Y^T X X^T Y
            # sigma_max: a few Lanczos steps from the leading columns of Y (subspace iteration
            # alone converges slowly on a gapless top, as at initialization; from inside the top
            # subspace a few steps suffice). No eigensolver on the device: CUDA's batched one can
            # refuse degenerate inputs (a zero gradient), LAPACK on the host does not.
            top_alpha, top_beta = lanczos_tridiagonals(G, steps=TOP_STEPS, start=Y[..., :min(TOP_PROBES, rank)])
            del G
            X.baddbmm_(Y, Z.mT, alpha=-1)  # the rest: (I - Y Y^T) X
            del Z
        rest_trace = X.flatten(1).pow(2).sum(1)
        alpha, beta = lanczos_tridiagonals(estimate_gram(X, precision), steps=steps, deflate=Y, start=starts[1])
    return SpectrumSketch(ritz, alpha, beta, rest_trace, scale, k, top_alpha, top_beta)


def spectrum_from_sketch(sketch: SpectrumSketch) -> torch.Tensor:
    """``k`` singular values per matrix (descending, ``(B, k)`` float64 on the CPU) rebuilt from a
    :class:`SpectrumSketch` (step 3 of the module docstring)."""
    k = sketch.k
    eps = torch.finfo(sketch.alpha.dtype).eps
    nodes, weights = gauss_quadrature(sketch.alpha, sketch.beta)
    B = nodes.shape[0]
    if sketch.ritz is not None:
        H = sketch.ritz.detach().to("cpu", torch.float64)
        top = torch.linalg.eigvalsh((H + H.mT) / 2).flip(-1).clamp_min(0)
    else:
        top = torch.zeros(B, 0, dtype=torch.float64)
    # what the refined sigma_max^2 adds to the top is the part of its direction left in the rest
    moved = torch.zeros(B, dtype=torch.float64)
    if sketch.top_alpha is not None and top.shape[1]:
        refined, _ = gauss_quadrature(sketch.top_alpha, sketch.top_beta)
        lifted = torch.maximum(top[:, 0], refined.amax(1))
        moved = lifted - top[:, 0]
        top[:, 0] = lifted
    units = k - top.shape[1]
    lam = nodes.clamp_min(0)
    order = lam.argsort(dim=1, descending=True)
    lam, w = lam.gather(1, order), weights.gather(1, order)
    cum = (w * units).cumsum(1)
    cum[:, -1] = float(units)  # the weights add up to 1 up to rounding
    positions = torch.arange(units, dtype=torch.float64).add_(0.5).expand(B, units).contiguous()
    rest = lam.gather(1, torch.searchsorted(cum, positions).clamp_max(lam.shape[1] - 1))
    # the smallest node that carries weight (exhausted probes and lost orthogonality leave
    # weightless nodes anywhere in the range)
    weighted = w * units > 1e-3
    rest[:, -1] = torch.where(weighted, lam, torch.full_like(lam, float("inf"))).amin(1).clamp_max(rest[:, -1])
    # the rest's values add up to its exact ||(I - Y Y^T) W||_F^2 (the smallest node is kept as it
    # is: it bounds sigma_min from above)
    target = sketch.rest_trace.detach().to("cpu", torch.float64) - moved - rest[:, -1]
    have = rest[:, :-1].sum(1)
    scale = torch.where((have > 0) & (target > 0), target / have.clamp_min(1e-300), torch.ones_like(have))
    rest[:, :-1] = (rest[:, :-1] * scale[:, None]).clamp_min(rest[:, -1:])
    lam = torch.cat([top, rest], 1).sort(dim=1, descending=True).values
    # below (float32 eps)^2 of lambda_max (sigma < eps sigma_max) nothing is resolved: read as 0
    lam = torch.where(lam > eps * eps * lam[:, :1], lam, torch.zeros_like(lam))
    return lam.sqrt() * sketch.scale.detach().to("cpu", torch.float64)[:, None]


def estimate_singular_values(
    W: torch.Tensor, rank: int = DEFAULT_RANK, iterations: int = DEFAULT_ITERATIONS,
    probes: int = DEFAULT_PROBES, steps: int = DEFAULT_STEPS, seed: int = 0,
) -> torch.Tensor:
    """Estimated singular values of ``W`` (``(m, n)`` or ``(B, m, n)``), descending, float64 on the
    CPU, from the float32 Gram of its small side (see the module docstring)."""
    single = W.ndim == 2
    X = W[None] if single else W
    if X.ndim != 3:
        raise ValueError(f"estimate_singular_values needs (m, n) or (B, m, n), got shape {tuple(W.shape)}")
    X = (X if X.size(-2) <= X.size(-1) else X.mT).to(torch.float32, copy=True)
    s = spectrum_from_sketch(sketch_matrices(X, min(rank, X.size(-2) // 2), iterations, probes, steps, seed=seed))
    return s[0] if single else s


GRAM_PRECISIONS = ("bfloat16", "float32")


def estimate_gram(X: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """The float32 Gram of the small side of ``X`` (``(B, m, n)``) for the estimate.

    ``precision="bfloat16"`` (CUDA): inputs rounded to bfloat16, products accumulated and returned
    in float32, on the matrix units at bf16 rate. Rounding ``W`` to bf16 moves each singular value
    by at most the spectral norm of the rounding error (a few ``2^-9`` of the typical singular
    value): below the estimate's own sampling error for every figure but the condition number of
    spectra spanning more than ~1e2. ``"float32"``: float32 throughout (the CPU path).
    """
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"estimate_gram: precision must be one of {', '.join(GRAM_PRECISIONS)}, got {precision!r}")
    A = X if X.size(-2) <= X.size(-1) else X.mT
    if precision == "bfloat16" and X.is_cuda:
        Ab = A.to(torch.bfloat16)
        try:
            return torch.bmm(Ab, Ab.mT, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without bmm(out_dtype=)
            A = Ab.float()
    A = A.float()
    return torch.bmm(A, A.mT)


class CapturedSketch:
    """:func:`sketch_matrices` of one batch shape ``(B, k, n)`` on static buffers, captured as one
    CUDA graph (:class:`~lightning_optlab.optim.cuda_graph.CapturedStep`: eager on the first call,
    captured on the second, replayed after; eager off CUDA or if the capture fails, ``failed``
    says why). Why: the sketch is ~1,000 small kernels whose launches, not their arithmetic, are
    what a snapshot costs the training thread; a replay is one launch.

    Fill :attr:`inputs` (zero columns pad a narrower matrix), then :meth:`run`: a
    :class:`SpectrumSketch` of fresh copies, safe to keep across the next replay. The first call
    runs the sketch twice (the eager warm-up a capture needs, then the capture), so later calls
    cost one replay. ``storage`` (a flat float32 tensor of at least ``B k n`` elements) and
    ``pool`` (:func:`torch.cuda.graph_pool_handle`) let sketches of several shapes, run one
    after another, share their inputs and work memory; both stay allocated between snapshots.

    Example::

        sketcher = CapturedSketch((B, k, n), "cuda", precision="bfloat16")
        sketcher.inputs.copy_(X)                     # (B, k, n) float32, k <= n
        s = spectrum_from_sketch(sketcher.run())     # (B, k) singular values, on the CPU
    """

    def __init__(self, shape: tuple[int, int, int], device: torch.device, rank: int = DEFAULT_RANK,
                 iterations: int = DEFAULT_ITERATIONS, probes: int = DEFAULT_PROBES, steps: int = DEFAULT_STEPS,
                 precision: str = "float32", seed: int = 0, storage: torch.Tensor | None = None,
                 pool: object = None) -> None:
        from ..optim.cuda_graph import CapturedStep

        numel = shape[0] * shape[1] * shape[2]
        if storage is None:
            storage = torch.zeros(numel, dtype=torch.float32, device=device)
        self.inputs = storage[:numel].view(shape)
        self.settings = (rank, iterations, probes, steps, precision)
        self.starts = sketch_starts(self.inputs, rank, probes, seed)
        self._step = CapturedStep(torch.device(device), pool=pool)
        self._out: SpectrumSketch | None = None

    @property
    def failed(self) -> str | None:
        return self._step.failed

    def run(self) -> SpectrumSketch:
        rank, iterations, probes, steps, precision = self.settings

        def body():
            self._out = sketch_matrices(self.inputs, rank, iterations, probes, steps, precision, starts=self.starts)

        if self._step.capturable and not self._step.warmed_up:
            saved = self.inputs.clone()  # the sketch overwrites its inputs; the capture reads them again
            self._step.run(body)
            self.inputs.copy_(saved)
            del saved
        self._step.run(body)
        out = self._out
        return SpectrumSketch.from_tensors({name: t.clone() for name, t in out.tensors().items()}, out.k)
