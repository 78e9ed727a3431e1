"""Singular spectra of many matrices taken at a hook and computed off the training thread:
exact (SVD, or Gram eigendecompositions on the host) or estimated on the GPU
(:mod:`lightning_optlab.spectral.lanczos`), per matrix by its size. The engine of
:class:`~lightning_optlab.callbacks.SpectralMonitor` and of the analyses that need spectra.
"""

from __future__ import annotations

import time
from contextlib import nullcontext as _nullcontext

import torch

from ..spectral import lanczos
from ..spectral.metrics import gram_of_small_side, singular_values_from_gram, singular_values_stacked
from ._worker import Snapshot

METHODS = ("auto", "gram_host", "svd", "gram", "lanczos")
GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# "gram_host": at most this many elements per float64 stack a Gram product reads (512 MB), so the
# transient device memory of a snapshot stays bounded on large models (one matrix at a time beyond)
GRAM_STACK_ELEMENTS = 1 << 26
# "lanczos": one batched estimate's float32 copies and Grams take at most this many bytes (one
# batch at a time; on CUDA the copies' buffer and the graphs' work memory stay allocated)
SKETCH_BATCH_BYTES = 1 << 31
# "lanczos": matrices of one k share padded batches unless padding adds more than this fraction
# of their Gram products and those exceed PAD_FLOPS (below it the batch count, not the
# arithmetic, is what a snapshot costs)
PAD_EXTRA, PAD_FLOPS = 0.25, 1e12
# method="auto" on CUDA: matrices whose small side is at most this get an exact spectrum
EXACT_MAX_K = 256
ESTIMATE_OPTIONS = {"rank": lanczos.DEFAULT_RANK, "iterations": lanczos.DEFAULT_ITERATIONS,
                    "probes": lanczos.DEFAULT_PROBES, "steps": lanczos.DEFAULT_STEPS, "gram": None}


def _padded_groups(k: int, entries: list) -> list[tuple[int, list]]:
    """``[(n, entries)]``: matrices ``(meta, rows, cols)`` of one small side ``k`` in one group
    padded to the widest (zero columns leave the sketch unchanged), or per long side ``n`` where
    padding would add more than ``PAD_EXTRA`` of Gram work that is large (``PAD_FLOPS``)."""
    widths = [max(r, c) for _, r, c in entries]
    n_max = max(widths)
    padded = 4.0 * k * k * n_max * len(entries)  # two Grams, 2 flops per multiply-add
    if padded <= (1 + PAD_EXTRA) * 4.0 * k * k * sum(widths) or padded <= PAD_FLOPS:
        return [(n_max, entries)]
    by_n: dict[int, list] = {}
    for e, n in zip(entries, widths):
        by_n.setdefault(n, []).append(e)
    return sorted(by_n.items())


def _estimate_options(owner: str, estimate: dict | None) -> dict:
    """The estimate's options, defaults filled in; unknown keys and bad values named."""
    opts = dict(ESTIMATE_OPTIONS)
    for key, value in (estimate or {}).items():
        if key not in opts:
            raise ValueError(f"{owner}(estimate={{{key!r}: ...}}): unknown option; the estimate takes {', '.join(opts)}")
        if key == "gram":
            if value not in lanczos.GRAM_PRECISIONS and value is not None:
                raise ValueError(f"{owner}(estimate={{'gram': {value!r}}}): use one of {', '.join(lanczos.GRAM_PRECISIONS)} (None: bfloat16 on CUDA, float32 on CPU)")
        elif not isinstance(value, int) or isinstance(value, bool) or value < (low := 0 if key in ("rank", "iterations") else 1):
            raise ValueError(f"{owner}(estimate={{{key!r}: {value!r}}}): give an integer >= {low}, e.g. {ESTIMATE_OPTIONS[key]}")
        opts[key] = value
    return opts


def analysis_engine(owner: str, method: str, exact_max_k: int, estimate: dict | None) -> "SpectrumSnapshots":
    """The spectra of an analysis that can also run its iteration itself (``method="iterate"``,
    whose engine then goes unused): ``method`` checked against both, the engine built."""
    if method not in METHODS + ("iterate",):
        raise ValueError(f"{owner}(method={method!r}): use 'iterate' or one of {', '.join(map(repr, METHODS))}")
    return SpectrumSnapshots(owner, "auto" if method == "iterate" else method, exact_max_k=exact_max_k, estimate=estimate)


class SpectrumSnapshots:
    """Snapshots of singular spectra: :meth:`take` at the hook (training thread), :meth:`spectra`
    in the worker. ``method`` and the options are :class:`~lightning_optlab.callbacks.SpectralMonitor`'s
    (``owner`` names the callback in errors)."""

    def __init__(self, owner: str, method: str = "auto", gram_dtype: str = "float64",
                 exact_max_k: int = EXACT_MAX_K, estimate: dict | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"{owner}(method={method!r}): use one of {', '.join(map(repr, METHODS))}")
        if gram_dtype not in GRAM_DTYPES:
            raise ValueError(
                f"{owner}(gram_dtype={gram_dtype!r}): use 'float64' (precise) or 'float32' (fast on consumer GPUs)"
            )
        if not isinstance(exact_max_k, int) or isinstance(exact_max_k, bool) or exact_max_k < 0:
            raise ValueError(f"{owner}(exact_max_k={exact_max_k!r}): give a non-negative integer, e.g. exact_max_k=256")
        self.method, self.gram_dtype, self.exact_max_k = method, gram_dtype, exact_max_k
        self.estimate = _estimate_options(owner, estimate)
        self._buffers: dict = {}
        self._streams: dict = {}
        self._sketchers: dict = {}
        self._flat: dict = {}
        self._pools: dict = {}

    def method_for(self, k: int, cuda: bool) -> str:
        """The method of a matrix whose small side is ``k``, on CUDA (``cuda=True``) or the CPU:
        ``"auto"`` is ``"svd"`` on the CPU, and on CUDA ``"gram_host"`` up to ``exact_max_k``,
        ``"lanczos"`` beyond."""
        if self.method != "auto":
            return self.method
        if not cuda:
            return "svd"
        return "gram_host" if k <= self.exact_max_k else "lanczos"

    def take(self, tensors: dict, meta: list) -> list:
        """Training thread, at the hook: enqueue what each matrix's method needs (``tensors``:
        ``{key: matrix}``; ``meta``: entries whose first two fields are the key). Returns the
        parts for :meth:`spectra`; nothing here waits for the GPU."""
        cuda = any(t.is_cuda for t in tensors.values())
        by_method: dict[str, list] = {}
        for m in meta:
            t = tensors[(m[0], m[1])]
            by_method.setdefault(self.method_for(min(t.shape[0], t[0].numel()), cuda), []).append(m)
        parts = []
        for method, metas in by_method.items():
            sub = {(m[0], m[1]): tensors[(m[0], m[1])] for m in metas}
            if method == "gram_host":
                snap, chunks = self._gram_snapshot(sub, metas)
                parts.append((self._groups_from_grams, snap, chunks))
            elif method == "lanczos":
                snap, chunks = self._lanczos_snapshot(sub, metas)
                parts.append((self._groups_from_sketches, snap, chunks))
            else:
                on_device = cuda and method == "gram"  # compute on the GPU, on a side stream
                snap = Snapshot(sub, to_cpu=not on_device, buffers=None if on_device else self._buffers)
                parts.append((self._groups_exact, snap, (metas, method)))
        return parts

    def clear(self) -> None:
        self._buffers.clear()
        self._sketchers.clear()
        self._flat.clear()
        self._pools.clear()

    def _gram_snapshot(self, tensors: dict, meta: list) -> tuple[Snapshot, list]:
        """Training thread, ``"gram_host"``: the float64 Gram matrix of each tracked matrix's
        small side, batched per shape, enqueued on the current (training) stream, so it reads
        the tensors before the optimizer step that follows overwrites them; then non-blocking
        copies of the Grams into reused pinned host buffers and an event (``Snapshot``). Nothing
        here waits for the GPU. Returns the snapshot and ``[(meta entries, key of their Grams,
        output dtype)]``, one entry per stack of at most ``GRAM_STACK_ELEMENTS`` elements.
        """
        groups: dict[tuple, list] = {}
        for m in meta:
            t = tensors[(m[0], m[1])]
            groups.setdefault((t.shape[0], t[0].numel(), t.device), []).append(m)
        grams, chunks = {}, []
        eig_dtype = GRAM_DTYPES[self.gram_dtype]
        for (rows, cols, device), metas in groups.items():
            per_stack = max(1, GRAM_STACK_ELEMENTS // (rows * cols))
            for start in range(0, len(metas), per_stack):
                part = metas[start:start + per_stack]
                ts = [tensors[(m[0], m[1])].detach() for m in part]
                X = torch.empty((len(ts), rows, cols), dtype=torch.float64, device=device)
                for j, t in enumerate(ts):  # conv kernels as (out, in*kh*kw); the copy upcasts
                    X[j].copy_(t.reshape(rows, cols))
                G = gram_of_small_side(X, torch.float64)
                del X
                # float32 eigvalsh (opt-in): round on the device, which halves the host copy
                key = (rows, cols, str(device), start)
                grams[key] = G if eig_dtype == torch.float64 else G.to(eig_dtype)
                out_dtype = torch.float64 if all(t.dtype == torch.float64 for t in ts) else torch.float32
                chunks.append((part, key, out_dtype))
        device = next(iter(grams.values())).device if grams else None
        copy_stream = self._side_stream(device) if device is not None and device.type == "cuda" else None
        return Snapshot(grams, to_cpu=True, buffers=self._buffers, owned=True, copy_stream=copy_stream), chunks

    def _lanczos_snapshot(self, tensors: dict, meta: list) -> tuple[Snapshot, list]:
        """Training thread, ``"lanczos"``: each tracked matrix copied in float32 with its small
        side first into the static batch of a :class:`~lightning_optlab.spectral.lanczos.CapturedSketch`,
        one batch per ``k`` (narrower matrices padded with zero columns, which leave the sketch
        unchanged; batches of equal size, each at most ``SKETCH_BATCH_BYTES`` of copies and
        Grams), and the sketch replayed on the training stream before the optimizer step; then
        non-blocking host copies of the sketches (a few hundred numbers per matrix). Returns the
        snapshot and ``[(meta entries, their (rows, cols), batch index, k)]``."""
        opts = self.estimate
        by_k: dict[tuple, list] = {}
        for m in meta:
            t = tensors[(m[0], m[1])]
            rows, cols = t.shape[0], t[0].numel()
            by_k.setdefault((min(rows, cols), t.device), []).append((m, rows, cols))
        plan = []  # (k, n, device, batch size, entries)
        for (k, device), entries in by_k.items():
            for n, group in _padded_groups(k, entries):
                # the float32 copy, its bf16 rounding and two k x k float32 Grams per matrix
                per = max(1, SKETCH_BATCH_BYTES // (k * n * 6 + 8 * k * k))
                size = -(-len(group) // -(-len(group) // per))  # equal batches: one graph per shape
                plan.append((k, n, device, size, group))
        need: dict = {}  # per device: the largest batch, which the shared input buffer must hold
        for k, n, device, size, _ in plan:
            need[device] = max(need.get(device, 0), size * k * n)
        out: dict = {}
        chunks: list = []
        for k, n, device, size, entries in plan:
            precision = opts["gram"] or ("bfloat16" if device.type == "cuda" else "float32")
            storage = self._storage(device, need[device])
            sketcher = self._sketcher((size, k, n), device, precision, storage)
            ragged = len(entries) % size or any(max(r, c) != n for _, r, c in entries)
            for start in range(0, len(entries), size):
                part = entries[start:start + size]
                X = sketcher.inputs
                if ragged:  # padding columns and unused slots must read as zeros
                    X.zero_()
                for j, (m, rows, cols) in enumerate(part):  # conv kernels as (out, in*kh*kw)
                    t = tensors[(m[0], m[1])].detach().reshape(rows, cols)
                    X[j, :, :max(rows, cols)].copy_(t if rows <= cols else t.mT)
                # a non-finite matrix is measured as zeros and left out by the worker (the
                # inf-norm is NaN/Inf exactly when an entry is, and never overflows)
                finite = torch.linalg.vector_norm(X.flatten(1), float("inf"), dim=1).isfinite()
                X.masked_fill_(~finite[:, None, None], 0.0)
                sk = sketcher.run()
                idx = len(chunks)
                for name, t in sk.tensors().items():
                    out[("sketch", idx, name)] = t[:len(part)]
                out[("sketch", idx, "finite")] = finite[:len(part)]
                chunks.append(([m for m, _, _ in part], [(r, c) for _, r, c in part], idx, k))
        device = next(iter(out.values())).device if out else None
        copy_stream = self._side_stream(device) if device is not None and device.type == "cuda" else None
        return Snapshot(out, to_cpu=True, buffers=self._buffers, owned=True, copy_stream=copy_stream), chunks

    def _storage(self, device: torch.device, numel: int) -> torch.Tensor | None:
        """On CUDA, the one input buffer the engine's captured sketches share (they run one after
        another); a larger need drops them all (their graphs point into the old buffer)."""
        if device.type != "cuda":
            return None
        have = self._flat.get(device)
        if have is None or have.numel() < numel:
            self._sketchers = {key: s for key, s in self._sketchers.items() if key[1] != str(device)}
            self._flat[device] = None  # free the old buffer first
            self._flat[device] = torch.zeros(numel, dtype=torch.float32, device=device)
            self._pools[device] = torch.cuda.graph_pool_handle()
        return self._flat[device]

    def _sketcher(self, shape: tuple, device: torch.device, precision: str,
                  storage: torch.Tensor | None) -> lanczos.CapturedSketch:
        """The captured sketch of one batch shape: kept across snapshots on CUDA (its graph),
        built afresh on the CPU (where it runs eagerly and would only hold memory)."""
        opts = self.estimate
        key = (shape, str(device), precision)
        sketcher = self._sketchers.get(key)
        if sketcher is None:
            sketcher = lanczos.CapturedSketch(shape, device, min(opts["rank"], shape[1] // 2), opts["iterations"],
                                              opts["probes"], opts["steps"], precision, storage=storage,
                                              pool=self._pools.get(device))
            if device.type == "cuda":
                self._sketchers[key] = sketcher
        return sketcher

    @property
    def graph_failures(self) -> list[str]:
        """Why a captured sketch runs eagerly, per batch shape whose capture failed (empty when
        every sketch is a graph)."""
        return [f"{key[0]}: {s.failed}" for key, s in self._sketchers.items() if s.failed]

    def _side_stream(self, device: torch.device):
        """One lowest-priority CUDA stream per device for a snapshot's side work: the ``"gram"``
        computations, or the ``"gram_host"`` Grams' device-to-host copies (the copy engine runs
        them while the training stream goes on, off its path)."""
        if device not in self._streams:  # priority 0 is CUDA's lowest (lower number = higher)
            self._streams[device] = torch.cuda.Stream(device=device, priority=0)
        return self._streams[device]

    def _spectra(self, tensors: dict, meta: list, method: str) -> list[tuple[list, torch.Tensor]]:
        """``[(meta entries, their singular values (B, k) on CPU)]``, one entry per shape group;
        matrices with non-finite entries are left out.

        Why per group, not per matrix: the worker shares the GIL with the training thread, and
        every tensor op it issues has to win the GIL back. A few ops per shape group (instead of
        ~30 per matrix) is what lets a snapshot of a 42M GPT finish between two snapshots.
        """
        dtype = GRAM_DTYPES[self.gram_dtype]
        groups: dict[tuple, list] = {}
        for m in meta:
            t = tensors[(m[0], m[1])]
            groups.setdefault((tuple(t.shape), t.dtype), []).append(m)
        if not groups:
            return []
        cuda = tensors[(meta[0][0], meta[0][1])].is_cuda
        stream = self._side_stream(tensors[(meta[0][0], meta[0][1])].device) if cuda else None
        out = []
        with torch.cuda.stream(stream) if cuda else _nullcontext():
            for metas in groups.values():
                ts = [tensors[(m[0], m[1])] for m in metas]
                if cuda:
                    for t in ts:
                        t.record_stream(stream)
                stack = torch.stack(ts)
                stack = stack.reshape(stack.shape[0], stack.shape[1], -1)  # conv kernels as (out, in*kh*kw)
                ok = torch.isfinite(stack).flatten(1).all(1).tolist()
                if not all(ok):
                    metas = [m for m, good in zip(metas, ok) if good]
                    if not metas:
                        continue
                    stack = stack[torch.tensor(ok, device=stack.device)]
                sv = singular_values_stacked(stack, method, dtype)
                out.append((metas, sv.cpu()))  # blocks this worker thread only
        return out

    def spectra(self, parts: list) -> tuple[list, dict, int, float]:
        """Worker: the singular values of a snapshot's parts (what :meth:`take` returned):
        ``([(meta entries, singular values (B, k) on the CPU)], {key: (rows, cols)}, how many
        matrices were measured, perf_counter when the first part's data had arrived)``; matrices
        with non-finite entries are left out of the groups."""
        groups, shapes, total, t0 = [], {}, 0, None
        for fn, snap, info in parts:
            data = snap.wait()
            if t0 is None:
                t0 = time.perf_counter()
            part_groups, part_shapes, measured = fn(data, info)
            groups += part_groups
            shapes.update(part_shapes)
            total += measured
        return groups, shapes, total, t0 if t0 is not None else time.perf_counter()

    def _groups_exact(self, tensors: dict, info: tuple) -> tuple[list, dict, int]:
        """Worker, ``"svd"`` / ``"gram"`` (and ``"gram_host"`` forced on the CPU is the next one)."""
        meta, method = info
        shapes = {(m[0], m[1]): tuple(tensors[(m[0], m[1])].shape) for m in meta}
        return self._spectra(tensors, meta, method), shapes, len(meta)

    def _groups_from_grams(self, grams: dict, chunks: list) -> tuple[list, dict, int]:
        """Worker, ``"gram_host"``: ``eigvalsh`` of the Grams' host copies on the CPU, one call per
        stack. A matrix whose Gram is not finite is left out: in float64 the Gram is finite
        exactly when the matrix is (its diagonal holds the squared row/column norms; see
        :func:`~lightning_optlab.spectral.gram_of_small_side`)."""
        groups, shapes, total = [], {}, 0
        for metas, key, out_dtype in chunks:
            G = grams[key]
            total += len(metas)
            for m in metas:
                shapes[(m[0], m[1])] = (key[0], key[1])
            ok = torch.isfinite(G).flatten(1).all(1).tolist()
            if not all(ok):
                metas = [m for m, good in zip(metas, ok) if good]
                if not metas:
                    continue
                G = G[torch.tensor(ok)]
            sv = singular_values_from_gram(G).to(out_dtype)  # in the buffers' dtype (gram_dtype)
            groups.append((metas, sv))
        return groups, shapes, total

    def _groups_from_sketches(self, data: dict, chunks: list) -> tuple[list, dict, int]:
        """Worker, ``"lanczos"``: the spectra rebuilt from the sketches' host copies
        (:func:`~lightning_optlab.spectral.lanczos.spectrum_from_sketch`); matrices with a
        non-finite Gram are left out."""
        groups, shapes, total = [], {}, 0
        for metas, dims, idx, k in chunks:
            total += len(metas)
            fields = {key[2]: t for key, t in data.items() if key[0] == "sketch" and key[1] == idx}
            sv = lanczos.spectrum_from_sketch(lanczos.SpectrumSketch.from_tensors(fields, k)).float()
            ok = data[("sketch", idx, "finite")].tolist()
            for m, dim in zip(metas, dims):
                shapes[(m[0], m[1])] = dim
            if not all(ok):
                keep = [j for j, good in enumerate(ok) if good]
                metas, sv = [metas[j] for j in keep], sv[keep]
            if metas:
                groups.append((metas, sv))
        return groups, shapes, total
