"""Byte-level language-modelling data from text files, offline by default.

``TextDataModule`` reads text files (or directories of them), splits them *by file* into train and
validation sets, and stores each split once as a flat ``uint8`` array in a cache directory; the
loaders then cut random windows of ``block_size + 1`` bytes out of a read-only ``np.memmap``
(``x`` = the first ``block_size`` bytes, ``y`` = the same window shifted by one). The vocabulary
is the 256 byte values, so nothing is downloaded and no tokenizer is needed.

The default corpus is the source of the running Python's standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, without ``site-packages``): real text that exists on every
machine with Python, about 30 MB in 1,800 files for CPython 3.11.

Determinism:

* files are visited in sorted order (directories depth-first, entries sorted by name);
* the file-level split (``split="file"``) is by position: with ``val_fraction`` f, file ``i``
  goes to validation when ``floor((i + 1) f) > floor(i f)``, which spreads exactly ``floor(n f)``
  validation files evenly over the corpus (at least one when there are two files or more);
  sibling files (``encodings/cp1250.py`` and ``cp1251.py``) then fall on both sides, and
  validation text appears verbatim in training. ``split="directory"`` holds out whole top-level
  directories instead (:func:`split_groups`); :func:`verbatim_overlap` measures what is left;
* :func:`corpus_digest` (logged at setup; ``expect_digest`` enforces it) pins the text: the
  SHA-256 of both splits' file lists and bytes;
* in each split the files are concatenated, each followed by one ``\\0`` byte (a document
  boundary; text files contain no NUL);
* training windows are drawn by :class:`RandomWindowSampler`, seeded by ``(seed, epoch)``:
  Lightning calls its ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
  sees the same windows in each epoch as the uninterrupted run; the training loader is a
  :class:`ResumableDataLoader`, so a checkpoint taken mid-epoch resumes with the next window of
  that epoch rather than replaying its first ones;
* validation windows are fixed, evenly spaced over the validation split.

The cache key is a hash of the file list (absolute paths, sizes, modification times) and the split,
so editing, adding or removing a file rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

DOC_SEPARATOR = 0  # the byte written after each file
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CACHE_VERSION = 1


def stdlib_root() -> Path:
    """The running Python's standard-library directory (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _walk_sorted(root: Path, suffixes: Sequence[str] | None) -> Iterator[Path]:
    """Files under ``root`` in deterministic order, skipping hidden entries and package dirs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is not None and not name.endswith(tuple(suffixes)):
                continue
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def package_root(name: str) -> Path:
    """The source directory of the installed package ``name`` (found without importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    if not locations:
        raise ValueError(
            f"TextDataModule: packages: {name!r} is not an installed package with a source "
            "directory; install it, or leave it out of 'packages'"
        )
    return Path(locations[0])


def corpus_roots(paths: str | Sequence[str] | None, packages: Sequence[str] | None = None) -> list[Path]:
    """The roots the corpus files are walked from: ``paths`` (the standard library for ``None``),
    then each of ``packages``' source directories."""
    roots = [stdlib_root()] if paths is None else [
        Path(p).expanduser() for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return roots + [package_root(n) for n in (packages or [])]


def list_text_files(
    paths: str | Sequence[str] | None = None,
    suffixes: Sequence[str] | None = None,
    max_files: int | None = None,
    max_bytes: int | None = None,
    packages: Sequence[str] | None = None,
) -> tuple[list[Path], str]:
    """The corpus files in deterministic order, and a description of where they come from.

    ``paths``: files and/or directories; ``None`` = the standard library's ``*.py`` files.
    ``packages``: installed packages whose ``*.py`` sources follow (e.g. ``["torch"]``: text
    that ships with a pinned version of a package).
    ``suffixes``: file-name endings kept when walking directories (``None``: ``.py`` for the
    default corpus, every non-binary file for given directories). Files given explicitly are
    always kept. ``max_files``/``max_bytes``: stop after that many files / once the files so far
    hold at least that many bytes (whole files; the walk stops early, so small limits are fast).
    """
    if paths is None:
        roots = [stdlib_root()]
        suffixes = (".py",) if suffixes is None else suffixes
        origin = f"Python standard library at {roots[0]}"
    else:
        roots = corpus_roots(paths)
        if not roots:
            raise ValueError("TextDataModule: 'paths' is an empty list; give files/directories or null")
        origin = ", ".join(str(r) for r in roots)
    extra = [package_root(n) for n in (packages or [])]
    if extra:
        origin += " + " + ", ".join(f"{n} {_version(n)} sources at {r}" for n, r in zip(packages, extra))
    for r in roots:
        if not r.exists():
            raise FileNotFoundError(
                f"TextDataModule: path {str(r)!r} does not exist; give existing text files or "
                "directories in 'paths', or leave it null for the standard-library corpus"
            )
    for name, limit in (("max_files", max_files), ("max_bytes", max_bytes)):
        if limit is not None and (not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"TextDataModule: {name} must be a positive int or null, got {limit!r}")

    files: list[Path] = []
    total = 0
    seen: set[Path] = set()
    for r, kept in [(r, suffixes) for r in roots] + [(r, suffixes or (".py",)) for r in extra]:
        candidates = (
            [r]
            if r.is_file()
            else (
                p
                for p in _walk_sorted(r, kept)
                if kept is not None or not _looks_binary(p)
            )
        )
        for p in candidates:
            p = p.resolve()
            if p in seen:
                continue
            seen.add(p)
            files.append(p)
            total += p.stat().st_size
            if (max_files is not None and len(files) >= max_files) or (
                max_bytes is not None and total >= max_bytes
            ):
                return files, origin
    return files, origin


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(version unknown)"


def split_files(files: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic file-level split: evenly spaced validation files (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"TextDataModule: val_fraction must be in [0, 1), got {val_fraction!r}")
    train, val = [], []
    for i, f in enumerate(files):
        (val if math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) else train).append(f)
    if val_fraction > 0 and not val and len(files) >= 2:
        val.append(train.pop())
    return train, val


SPLITS = ("file", "directory")


def group_key(path: Path, roots: Sequence[Path]) -> str:
    """The near-duplicate group of a corpus file: its top-level directory under the root it came
    from, or the file itself where it lies in the root, named with the root
    (``python3.12/json/decoder.py`` -> ``python3.12/json``)."""
    for root in roots:
        root = root.resolve()
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        return f"{root.name}/{rel.parts[0]}"
    return path.name


def split_groups(files: Sequence[Path], keys: Sequence[str], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split by group: whole groups go to validation, taken in the order of their
    names' SHA-256 and kept while the validation bytes stay within ``val_fraction`` of the corpus
    (a group larger than what is left is passed over), so no group has files on both sides.
    Files keep their corpus order in each split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"TextDataModule: val_fraction must be in [0, 1), got {val_fraction!r}")
    sizes: dict[str, int] = {}
    for f, k in zip(files, keys):
        sizes[k] = sizes.get(k, 0) + f.stat().st_size
    budget = val_fraction * sum(sizes.values())
    held, total = set(), 0
    for k in sorted(sizes, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if total + sizes[k] <= budget:
            held.add(k)
            total += sizes[k]
    if val_fraction > 0 and not held and len(sizes) >= 2:
        held.add(min(sizes, key=lambda k: (sizes[k], k)))
    train = [f for f, k in zip(files, keys) if k not in held]
    val = [f for f, k in zip(files, keys) if k in held]
    return train, val


def verbatim_overlap(train: bytes, val: bytes, chunk: int = 4096) -> float:
    """The share of ``val``'s bytes in aligned ``chunk``-byte pieces that occur verbatim anywhere
    in ``train`` (the last, shorter piece counted too): how much of a validation split the model
    may have seen word for word."""
    if not val:
        return 0.0
    seen = sum(len(val[i : i + chunk]) for i in range(0, len(val), chunk) if train.find(val[i : i + chunk]) >= 0)
    return seen / len(val)


def corpus_digest(splits: Sequence["CorpusSplit"], roots: Sequence[Path]) -> str:
    """SHA-256 of each split's file list (paths relative to their roots) and bytes: the same
    digest means the same training and validation text, on any machine."""
    h = hashlib.sha256()
    for split in splits:
        h.update(f"split {split.name}\n".encode())
        for f in split.files:
            rel = next((str(f.relative_to(r.resolve())) for r in roots if f.is_relative_to(r.resolve())), f.name)
            h.update(f"{rel}\n".encode())
        with open(split.path, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _corpus_key(files: Sequence[Path], tag: str) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}:{tag}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_byte_array(files: Sequence[Path], path: Path) -> int:
    """Write the files' bytes, each followed by one separator byte, to ``path``; return the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    n = 0
    with open(tmp, "wb") as out:
        for f in files:
            data = f.read_bytes()
            out.write(data)
            out.write(bytes([DOC_SEPARATOR]))
            n += len(data) + 1
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written cache
    return n


@dataclass
class CorpusSplit:
    """One split of the corpus: its files and the cached byte array."""

    name: str
    files: list[Path]
    path: Path
    num_bytes: int

    def array(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")


class ByteWindows(Dataset):
    """Item ``start`` = (x, y): bytes ``[start, start + block_size)`` and the next-byte targets.

    Indices are window start offsets (``0 <= start < len(self)``). The memmap is opened lazily in
    each process, so pickling the dataset to DataLoader workers does not copy the array.
    """

    def __init__(self, path: str | Path, block_size: int):
        self.path = str(path)
        self.block_size = int(block_size)
        self._data: np.memmap | None = None
        self._size = os.path.getsize(self.path)
        if self._size < self.block_size + 1:
            raise ValueError(
                f"TextDataModule: the split in {self.path} has {self._size} bytes, fewer than "
                f"block_size + 1 = {self.block_size + 1}; use more files (raise max_bytes/max_files) "
                "or a smaller block_size"
            )

    def __len__(self) -> int:
        return self._size - self.block_size

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= start < len(self):
            raise IndexError(f"window start {start} outside [0, {len(self)})")
        chunk = torch.from_numpy(self.data[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state


class RandomWindowSampler(DistributedSampler):
    """``num_windows`` random window starts per epoch, a pure function of ``(seed, epoch)``.

    It is a ``DistributedSampler`` so that Lightning neither replaces nor wraps it under DDP: every
    rank draws the same global list and keeps every ``num_replicas``-th start from ``rank`` on.
    ``set_epoch`` (called by Lightning each epoch) selects the epoch's draw.
    """

    def __init__(
        self, num_starts: int, num_windows: int, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ):
        if num_starts <= 0 or num_windows <= 0:
            raise ValueError(f"RandomWindowSampler: need num_starts, num_windows > 0, got {num_starts}, {num_windows}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"RandomWindowSampler: rank {rank} not in [0, {num_replicas})")
        # Deliberately not calling DistributedSampler.__init__ (it wants a dataset and a process group).
        self.num_starts = int(num_starts)
        self.total_windows = int(num_windows)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.num_samples = len(range(self.rank, self.total_windows, self.num_replicas))
        self._resume: tuple[int, int] | None = None  # (epoch, windows of it already trained on)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """Make the next pass over ``epoch`` leave out its first ``skip`` windows (of this rank)."""
        self._resume = (int(epoch), int(skip)) if 0 < skip < self.num_samples else None

    def starts(self) -> torch.Tensor:
        """All ranks' starts for the current epoch."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return torch.randint(0, self.num_starts, (self.total_windows,), generator=g)

    def __iter__(self) -> Iterator[int]:
        starts = self.starts()[self.rank :: self.num_replicas].tolist()
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if epoch == self.epoch:
                starts = starts[skip:]
        return iter(starts)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`RandomWindowSampler` that Lightning can resume mid-epoch.

    Lightning saves ``state_dict()`` in checkpoints and, on resume, hands it to
    ``load_state_dict`` before iterating: the state is the epoch and how many batches of it the
    training loop has processed (``progress()``), and the resumed epoch continues with the next
    window instead of replaying the epoch's first batches.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        done = int(self._progress()) if self._progress is not None else 0
        return {"epoch": self.sampler.epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)


class EvenWindowSampler(torch.utils.data.Sampler):
    """``num_windows`` window starts evenly spaced over a split (fixed; for validation)."""

    def __init__(self, num_starts: int, num_windows: int):
        self.starts = np.unique(np.linspace(0, num_starts - 1, num=max(1, num_windows)).astype(np.int64))

    def __iter__(self) -> Iterator[int]:
        return iter(self.starts.tolist())

    def __len__(self) -> int:
        return len(self.starts)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_optlab" / "text"


class TextDataModule(pl.LightningDataModule):
    """Byte-level LM batches ``(x, y)``, int64 tensors of shape ``(batch_size, block_size)``.

    Args:
        paths: text files and/or directories (walked recursively); ``None`` = the running Python's
            standard-library sources (offline).
        block_size: context length T. ``None`` = the model's ``context_length`` (e.g. GPT's), so a
            config that shrinks the model shrinks the windows with it.
        batch_size: windows per batch.
        val_fraction: fraction of the corpus held out for validation (of the files with
            ``split="file"``, of the bytes with ``split="directory"``).
        split: ``"file"``: evenly spaced files; ``"directory"``: whole top-level directories
            (and the root's own files, one by one), so sibling files never fall on both sides
            (:func:`split_groups`).
        expect_digest: the :func:`corpus_digest` the run must train on; a corpus with another
            digest (another Python's standard library, an edited file) is refused.
        packages: installed packages whose ``*.py`` sources are added to the corpus (e.g.
            ``[torch]``: ~40 MB more, so a 3000-step GPT run sees its text about once).
        train_windows: windows drawn per training epoch; ``None`` = about one pass over the
            training bytes (``train_bytes // block_size``).
        val_windows: evenly spaced validation windows (fixed across epochs).
        suffixes: file endings kept when walking directories (``None``: ``.py`` for the default
            corpus, every non-binary file for given directories).
        max_files, max_bytes: take only the first files in walk order (for tests and quick runs).
        cache_dir: where the byte arrays are cached (default ``~/.cache/lightning_optlab/text``).
        seed: seed of the training windows (combined with the epoch).
        num_workers, pin_memory: DataLoader options.
    """

    def __init__(
        self,
        paths: str | list[str] | None = None,
        block_size: int | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        train_windows: int | None = None,
        val_windows: int = 256,
        suffixes: list[str] | None = None,
        max_files: int | None = None,
        max_bytes: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        split: str = "file",
        expect_digest: str | None = None,
        packages: list[str] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_windows", val_windows)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TextDataModule: {name} must be a positive int, got {value!r}")
        for name, value in (("block_size", block_size), ("train_windows", train_windows)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"TextDataModule: {name} must be a positive int or null, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"TextDataModule: val_fraction must be in (0, 1), got {val_fraction!r}")
        if split not in SPLITS:
            raise ValueError(f"TextDataModule: split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.save_hyperparameters()
        self.paths = paths
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_windows = train_windows
        self.val_windows = val_windows
        self.suffixes = suffixes
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seed = seed
        self.split = split
        self.expect_digest = expect_digest
        self.packages = list(packages) if packages else None
        self.digest = ""
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.splits: dict[str, CorpusSplit] = {}
        self._prepared: dict[str, CorpusSplit] | None = None  # prepare_data's splits, until setup takes them
        self.origin = ""
        self.train_sampler: RandomWindowSampler | None = None

    # ---- corpus -------------------------------------------------------------------------------
    def _prepare_splits(self) -> dict[str, CorpusSplit]:
        """List, split and hash the corpus, building each split's cache where it is missing."""
        files, origin = list_text_files(self.paths, self.suffixes, self.max_files, self.max_bytes, self.packages)
        if len(files) < 2:
            raise ValueError(
                f"TextDataModule: found {len(files)} file(s) in {origin}; a file-level train/val split "
                "needs at least 2 (give more paths, or raise max_files/max_bytes)"
            )
        roots = corpus_roots(self.paths, self.packages)
        if self.split == "directory":
            train, val = split_groups(files, [group_key(f, roots) for f in files], self.val_fraction)
        else:
            train, val = split_files(files, self.val_fraction)
        splits = {}
        for name, group in (("train", train), ("val", val)):
            key = _corpus_key(group, name)
            path = self.cache_dir / f"{name}-{key}.u8"
            meta = path.with_suffix(".json")
            if path.is_file() and meta.is_file():
                num_bytes = path.stat().st_size
            else:
                num_bytes = build_byte_array(group, path)
                meta.write_text(json.dumps({"origin": origin, "files": [str(f) for f in group]}))
                rank_zero_info(f"TextDataModule: wrote the {name} split's cache to {path}")
            splits[name] = CorpusSplit(name, list(group), path, num_bytes)
        self.origin = origin
        self.digest = corpus_digest(list(splits.values()), roots)
        if self.expect_digest is not None and self.digest != self.expect_digest:
            raise ValueError(
                f"TextDataModule: the corpus from {origin} (split {self.split!r}) has digest "
                f"{self.digest[:16]}..., not the expected {str(self.expect_digest)[:16]}...: it is other "
                "text (another Python's standard library, edited files, other max_files/max_bytes). "
                "Train on the pinned corpus, or set expect_digest to null"
            )
        return splits

    def _announce(self) -> None:
        """What the splits hold and the corpus digest, once per module (from setup)."""
        for split in self.splits.values():
            rank_zero_info(
                f"TextDataModule {split.name} split: {len(split.files)} files from {self.origin}, "
                f"{split.num_bytes:,} bytes (cached at {split.path}; the file list is in "
                f"{split.path.with_suffix('.json').name})"
            )
        rank_zero_info(f"TextDataModule corpus digest (sha256 of file lists and bytes): {self.digest}")

    def prepare_data(self) -> None:
        # Builds the caches (once per node). This process's setup() takes the splits from here
        # rather than listing, splitting and hashing the corpus again; other ranks build theirs there.
        self._prepared = self._prepare_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.block_size is None:
            model = getattr(self.trainer, "lightning_module", None) if self.trainer else None
            context = getattr(model, "context_length", None)
            if context is None:
                raise ValueError(
                    "TextDataModule: block_size is null and the model has no 'context_length'; "
                    "set data block_size explicitly"
                )
            self.block_size = int(context)
        if not self.splits:
            # cheap when cached; needed where prepare_data did not run
            self.splits, self._prepared = self._prepared or self._prepare_splits(), None
            self._announce()

    def summary(self) -> str:
        """Which files and how many bytes each split holds."""
        return "; ".join(
            f"{s.name}: {len(s.files)} files, {s.num_bytes} bytes" for s in self.splits.values()
        ) + (f" (from {self.origin})" if self.origin else "")

    # ---- loaders -------------------------------------------------------------------------------
    def _dataset(self, name: str) -> ByteWindows:
        if not self.splits:
            self.setup()
        return ByteWindows(self.splits[name].path, self.block_size)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        trainer = self.trainer
        num_replicas = getattr(trainer, "world_size", 1) if trainer else 1
        rank = getattr(trainer, "global_rank", 0) if trainer else 0
        windows = self.train_windows or max(self.batch_size, self.splits["train"].num_bytes // self.block_size)
        self.train_sampler = RandomWindowSampler(len(ds), windows, self.seed, num_replicas, rank)
        return ResumableDataLoader(
            ds,
            progress=self._batches_processed,
            batch_size=self.batch_size,
            sampler=self.train_sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def _batches_processed(self) -> int:
        # Batches of the current epoch the training loop has run (counts the one whose
        # on_train_batch_end is saving a checkpoint right now).
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        return int(loop.batch_progress.current.processed) if loop is not None else 0

    def val_dataloader(self) -> DataLoader:
        ds = self._dataset("val")
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EvenWindowSampler(len(ds), self.val_windows),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
