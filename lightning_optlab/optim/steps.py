"""The steps rules are composed of, each written once as a function over (stacks of) tensors.

Most optimizers are short chains of the same steps; each rule file composes them::

    muon          = decoupled decay -> momentum look-ahead -> Newton-Schulz -> scale by shape
    sinkgd        = (row l2, column l2)^L, rows/columns scaled to unit-RMS entries
    sinkhorn_tanh = (row l2, column l2, tanh(./tau))^n_iter -> restore the gradient's RMS
    adamw_spam    = spike-aware clipping -> AdamW (torch's functional core) -> reset + warm-up
    sparkles      = centralize -> std-normalize -> amplify by momentum -> adaptive step
                    -> (ADOPT clip) -> (random kick) -> stochastic rounding to bf16

Precision: math runs in at least fp32 (:func:`upcast`); bf16/fp16 tensors are upcast,
transformed and cast back once (:func:`store_`); fp32/fp64 tensors are worked on in place.
State tensors keep the parameter's dtype, like torch's own optimizers (``load_state_dict``
casts state to the parameter dtype, so it round-trips exactly). Muon's Newton-Schulz iteration
runs in bf16 on CUDA (:mod:`.newton_schulz`); the stacked layouts are in :mod:`.stacks`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: Tensor) -> Tensor:
    """``t`` in :func:`compute_dtype` -- the same object when it already is (so in-place works)."""
    dtype = compute_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def store_(target: Tensor, value: Tensor) -> Tensor:
    """Write ``value`` (computed in fp32) back into ``target`` unless it already is ``target``."""
    if value is not target:
        target.copy_(value)
    return target


def fused_by_default(group: Mapping[str, Any], params: list[torch.Tensor]) -> bool:
    """torch's fused kernels are the fastest on CUDA; use them unless the group says otherwise."""
    if group.get("fused") is not None:
        return bool(group["fused"])
    if group.get("foreach") or group.get("differentiable"):
        return False
    return all(p.is_cuda and p.is_floating_point() for p in params)


def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries (0-D tensor)."""
    return x.square().mean().sqrt()


def spike_clip_foreach(grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], threshold: float) -> list[Tensor]:
    """SPAM's spike clip (g clipped to sign(g)*sqrt(theta*v) where g^2 > theta*v) of each pair as five foreach kernels for the whole list; new tensors
    (the gradients are not modified)."""
    bound = torch._foreach_mul(list(exp_avg_sqs), threshold)
    torch._foreach_sqrt_(bound)
    clipped = torch._foreach_maximum(list(grads), torch._foreach_neg(bound))
    torch._foreach_minimum_(clipped, bound)
    return clipped


ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral_unclamped")


def muon_lr_scale(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Factor on lr for a (rows, cols) update; the vocabulary of ``torch.optim.Muon``'s ``adjust_lr_fn``.

    * ``original`` (Keller Jordan; also ``None``): ``sqrt(max(1, rows / cols))``
    * ``match_rms_adamw`` (Moonshot): ``0.2 * sqrt(max(rows, cols))`` -- the update's RMS
      matches AdamW's, so AdamW learning rates and weight decay carry over
    * ``spectral_unclamped`` (Bernstein): ``sqrt(rows / cols)``
    """
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def muon_lookahead_(G: Tensor, buf: Tensor, momentum: float, nesterov: bool, out: Tensor) -> Tensor:
    """Muon's momentum on one stack of matrices: ``buf <- lerp(buf, G, 1 - momentum)`` in place,
    then ``out <- lerp(G, buf, momentum)`` (nesterov) or ``buf``, stored in ``out``'s dtype (the
    Newton-Schulz input, rounded once). The eager step and the CUDA graph both run this."""
    buf.lerp_(G, 1 - momentum)
    if nesterov:
        return torch.lerp(G, buf, momentum, out=out)
    return out.copy_(buf)


def rms_stack(x: Tensor, eps: float) -> Tensor:
    """max(rms(x[b]), eps) per item, shaped (B, 1, ...)."""
    dims = tuple(range(1, x.ndim))
    count = math.prod(x.shape[1:])
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True).div_(math.sqrt(count)).clamp_min_(eps)


def normalize_dim_(G: Tensor, dim: int, target_norm: float, eps: float, extra: float = 1.0) -> Tensor:
    """G <- G * target_norm / max(||G||_dim, eps) / extra, in place (one reduction, two small
    ops, one pass over G). ``extra`` folds a following division (tanh's tau) into the pass."""
    norm = torch.linalg.vector_norm(G, dim=dim, keepdim=True).clamp_min_(eps)
    factor = extra / target_norm
    if factor != 1.0:
        norm.mul_(factor)
    return G.div_(norm)


@contextlib.contextmanager
def full_fp32_matmul():
    """Float32 matmuls at full precision inside the block (no TF32 / bf16 shortcuts a user may
    have enabled with ``torch.set_float32_matmul_precision``), restored after. Used where a
    matmul measures something: the Sinkhorn matrix-vector products below compute norms, and the
    Stiefel retraction's Gram matrices distances, which TF32's 10-bit mantissa would get wrong
    in the fourth digit."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def norm_floor_sq(eps: float, dtype: torch.dtype) -> float:
    """eps**2, the floor of the squared row/column norms, kept above ``tiny**0.75`` of the dtype
    (fp32: eps >= ~5e-15) so that the scale vectors (<= n / eps**2) stay finite."""
    return max(eps * eps, torch.finfo(dtype).tiny ** 0.75)


def decay_factor(lr: float | Tensor, weight_decay: float) -> float | Tensor | None:
    """Decoupled weight decay's factor ``1 - lr * wd`` (None when ``wd`` is 0); ``lr`` may be a
    device scalar (a CUDA graph's, so a scheduler's new lr needs no recapture)."""
    if weight_decay == 0:
        return None
    return 1 - lr * weight_decay


def decoupled_weight_decay_(weights: Sequence[Tensor], lr: float | Tensor, weight_decay: float) -> None:
    """``p <- p * (1 - lr * wd)`` for every weight, one foreach kernel (AdamW's decay, applied
    before the update as torch.optim.AdamW and torch.optim.Muon do)."""
    factor = decay_factor(lr, weight_decay)
    if factor is not None and weights:
        torch._foreach_mul_(list(weights), factor)


def spam_warmup_factor(steps_since_reset: int, warmup_steps: int, resets: int) -> float:
    """SPAM's LR factor after a momentum reset: cosine from ~0 up to 1 over ``warmup_steps``.

    ``0.5 * (1 - cos(pi * k / (warmup_steps + 1)))`` on the k-th step after a reset
    (k = 1..warmup_steps), 1 afterwards and before the first reset (training starts at full
    rate; the user's own schedule handles the start).
    """
    if resets == 0 or warmup_steps <= 0 or steps_since_reset > warmup_steps:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * steps_since_reset / (warmup_steps + 1)))


_MASK64 = (1 << 64) - 1


_GENERATORS: dict[torch.device, torch.Generator] = {}


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 finalizer over each value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A (cached, re-seeded) generator on ``device``; the same seed gives the same stream."""
    device = torch.device(device)
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def stochastic_round_to_bf16_(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A contiguous fp32 ``x`` (consumed) rounded to bf16 up or down at random, with P(up) = the
    remainder's fraction: unbiased (E[result] = x), so many updates smaller than half a bf16 ulp
    still move a bf16 weight on average, where round-to-nearest would drop every one of them.

    On the bits, in place: add 16 random low bits to the fp32 pattern and truncate them. That
    cannot change an infinity or a quiet NaN (their low 16 bits are zero, nothing carries); only a
    NaN whose payload sits in the low 16 bits alone could turn into an infinity, so NaNs are put
    back explicitly.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    nan = x.isnan()
    x.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return x.masked_fill_(nan, float("nan")).to(torch.bfloat16)


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """:func:`stochastic_round_to_bf16_` of a float32 copy of ``x`` (``x`` is left alone)."""
    return stochastic_round_to_bf16_(x.to(torch.float32, memory_format=torch.contiguous_format, copy=True), generator)


def centralize_(G: Tensor, alpha: float) -> None:
    """Gradient centralization, in place, on a stack (B, out, fan_in) or (B, n):
    ``g <- g - alpha * mean(g)`` over the last dim (per output channel for matrices, conv
    kernels flattened; global for vectors)."""
    G.sub_(G.mean(dim=-1, keepdim=True).mul_(alpha))


def std_normalize_(G: Tensor, alpha: float, mode: str, eps: float) -> None:
    """Std normalization, in place, on a stack: ``g <- (1 - a) g + a g / (std + eps)`` as one
    multiply by the factor ``(1 - a) + a / (std + eps)``, per row (``mode="channel"``) or per
    item; std unbiased."""
    dims = (-1,) if mode == "channel" else tuple(range(1, G.ndim))
    factor = G.std(dim=dims, keepdim=True).add_(eps).reciprocal_().mul_(alpha).add_(1 - alpha)
    G.mul_(factor)
