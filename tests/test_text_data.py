"""TextDataModule: file-level split, cached byte arrays, windows, resume determinism."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_optlab.data import TextDataModule
from lightning_optlab.data import text as text_mod
from lightning_optlab.data.text import (
    ByteWindows,
    RandomWindowSampler,
    list_text_files,
    split_files,
    stdlib_root,
)


def _corpus(tmp_path, n=8, size=3000):
    """n text files with distinct, position-dependent content (so windows locate uniquely)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        words = [f"w{i}_{j}_{int(rng.integers(1_000_000))}" for j in range(size // 12)]
        path = root / ("sub" if i % 2 else "") / f"f{i:02d}.txt"
        path.write_text(" ".join(words) + "\n")
        files.append(path)
    (root / ".hidden.txt").write_text("hidden\n")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    return root, files


def _expected_order(files):
    # os.walk order: the root's files (sorted), then each subdirectory's files (sorted).
    top = sorted(f for f in files if f.parent.name == "corpus")
    sub = sorted(f for f in files if f.parent.name == "sub")
    return [f.resolve() for f in top + sub]


def test_listing_is_sorted_skips_hidden_and_binary(tmp_path):
    root, files = _corpus(tmp_path)
    listed, origin = list_text_files([str(root)])
    assert listed == _expected_order(files)
    assert str(root) in origin
    listed_again, _ = list_text_files(str(root))
    assert listed_again == listed
    assert list_text_files(str(root), max_files=3)[0] == listed[:3]
    sizes = np.cumsum([f.stat().st_size for f in listed])
    limited, _ = list_text_files(str(root), max_bytes=int(sizes[1]) + 1)
    assert limited == listed[:3]  # whole files until the budget is reached


def test_split_is_file_level_even_and_deterministic():
    files = [f"f{i}" for i in range(20)]
    train, val = split_files(files, 0.25)
    assert val == ["f3", "f7", "f11", "f15", "f19"]
    assert sorted(train + val) == sorted(files) and not set(train) & set(val)
    assert split_files(files, 0.25) == (train, val)
    # too few files for the fraction: still one validation file
    assert split_files(["a", "b", "c"], 0.1) == (["a", "b"], ["c"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_files(files, 1.5)


def test_cached_arrays_hold_each_split_files_bytes(tmp_path):
    root, files = _corpus(tmp_path)
    dm = TextDataModule(paths=str(root), block_size=32, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    dm.setup()
    order = _expected_order(files)
    exp_train, exp_val = split_files(order, 0.25)
    assert dm.splits["train"].files == exp_train and dm.splits["val"].files == exp_val
    for name, group in (("train", exp_train), ("val", exp_val)):
        expected = b"".join(f.read_bytes() + b"\0" for f in group)
        arr = dm.splits[name].array()
        assert arr.dtype == np.uint8 and arr.tobytes() == expected
        assert dm.splits[name].num_bytes == len(expected)
    assert "train: 6 files" in dm.summary() and "val: 2 files" in dm.summary()


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    root, files = _corpus(tmp_path, n=4)
    calls = []
    real = text_mod.build_byte_array
    monkeypatch.setattr(text_mod, "build_byte_array", lambda fs, p: calls.append(p) or real(fs, p))
    cache = str(tmp_path / "c")
    first = TextDataModule(paths=str(root), block_size=16, cache_dir=cache)
    first.setup()
    assert len(calls) == 2
    second = TextDataModule(paths=str(root), block_size=16, cache_dir=cache)
    second.setup()
    assert len(calls) == 2  # both splits read from the cache
    assert second.splits["train"].path == first.splits["train"].path
    files[0].write_text("changed content " * 50)
    third = TextDataModule(paths=str(root), block_size=16, cache_dir=cache)
    third.setup()
    assert len(calls) == 3  # only the split holding the changed file is rebuilt
    assert third.splits["train"].path != first.splits["train"].path
    assert third.splits["val"].path == first.splits["val"].path
    assert third.splits["train"].array().tobytes().startswith(b"changed content")


def test_prepare_data_then_setup_lists_and_hashes_the_corpus_once_and_still_states_it(tmp_path, monkeypatch):
    root, _ = _corpus(tmp_path, n=4)
    listed, said = [], []
    real = text_mod.list_text_files
    monkeypatch.setattr(text_mod, "list_text_files", lambda *a: listed.append(a) or real(*a))
    monkeypatch.setattr(text_mod, "rank_zero_info", said.append)
    dm = TextDataModule(paths=str(root), block_size=16, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()  # what Trainer.fit does on the process that also runs setup
    dm.setup("fit")
    assert len(listed) == 1
    n_train = len(dm.splits["train"].files)
    assert any(line.startswith(f"TextDataModule train split: {n_train} files") for line in said)
    assert said[-1].endswith(dm.digest)
    other_rank = TextDataModule(paths=str(root), block_size=16, cache_dir=str(tmp_path / "c"))
    other_rank.setup("fit")  # a rank where prepare_data did not run builds its own view
    assert len(listed) == 2 and other_rank.digest == dm.digest


def test_batches_are_shifted_windows_of_the_train_bytes(tmp_path):
    root, files = _corpus(tmp_path)
    dm = TextDataModule(
        paths=str(root), block_size=48, batch_size=4, train_windows=12, val_windows=5,
        cache_dir=str(tmp_path / "c"),
    )
    dm.setup()
    train_bytes = b"".join(f.read_bytes() + b"\0" for f in dm.splits["train"].files)
    val_bytes = b"".join(f.read_bytes() + b"\0" for f in dm.splits["val"].files)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == y.shape == (4, 48) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for xr, yr in zip(x, y):
            window = bytes(xr.tolist()) + bytes(yr[-1:].tolist())
            assert window in train_bytes and window not in val_bytes
    val = list(dm.val_dataloader())
    val_sampler = dm.val_dataloader().sampler
    starts = list(val_sampler)
    assert starts == sorted(set(starts)) and len(starts) == len(val_sampler) == 5
    assert starts[0] == 0 and starts[-1] == len(val_bytes) - 48 - 1
    x, y = val[0]
    assert bytes(x[0].tolist()) == val_bytes[:48]
    # validation windows are the same every time
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, dm.val_dataloader()))


def test_sampler_is_a_function_of_seed_and_epoch_and_shards_ranks():
    a = RandomWindowSampler(num_starts=10_000, num_windows=64, seed=3)
    b = RandomWindowSampler(num_starts=10_000, num_windows=64, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating twice repeats the epoch
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(RandomWindowSampler(10_000, 64, seed=4)) != list(RandomWindowSampler(10_000, 64, seed=3))
    assert all(0 <= s < 10_000 for s in a)
    ranks = [RandomWindowSampler(10_000, 64, seed=3, num_replicas=4, rank=r) for r in range(4)]
    for r in ranks:
        r.set_epoch(2)
    assert [len(r) for r in ranks] == [16] * 4
    merged = [None] * 64
    for i, r in enumerate(ranks):
        merged[i::4] = list(r)
    assert merged == list(a)
    # resume: the next pass over that epoch leaves out the windows already trained on, once
    b = RandomWindowSampler(10_000, 64, seed=3)
    b.set_epoch(2)
    a.resume(epoch=2, skip=10)
    assert list(a) == list(b)[10:]
    assert list(a) == list(b)
    a.resume(epoch=1, skip=10)  # a state from another epoch (an end-of-epoch checkpoint) is dropped
    assert list(a) == list(b)


class _Recorder(L.Callback):
    def __init__(self):
        self.seen: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append(batch[0][:, 0].tolist())


def _trainer(tmp_path, epochs, recorder, callbacks_extra=()):
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[recorder, *callbacks_extra],
    )


def test_resume_from_checkpoint_replays_the_same_windows(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_optlab.models import GPT

    root, _ = _corpus(tmp_path, n=4)

    def parts():
        torch.manual_seed(0)
        model = GPT(size="tiny", n_layers=1, policy={"rules": [{"match": {}, "optimizer": "adamw", "lr": 1e-3}]})
        # block_size null: the windows take the model's context length (64 for tiny)
        dm = TextDataModule(paths=str(root), batch_size=2, train_windows=12, seed=7, cache_dir=str(tmp_path / "c"))
        return model, dm

    # 6 batches per epoch; checkpoints every 2 steps: step=6 ends epoch 0, step=8 is mid-epoch 1
    full = _Recorder()
    model, dm = parts()
    ckpts = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _trainer(tmp_path / "full", 3, full, callbacks_extra=[ckpts]).fit(model, dm)
    assert dm.block_size == 64
    assert [len(full.seen[e]) for e in range(3)] == [6, 6, 6] and full.seen[0] != full.seen[1]

    for step, expected in ((6, {1: full.seen[1], 2: full.seen[2]}), (8, {1: full.seen[1][2:], 2: full.seen[2]})):
        resumed = _Recorder()
        model, dm = parts()
        _trainer(tmp_path / f"resumed{step}", 3, resumed).fit(model, dm, ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
        assert resumed.seen == expected, f"resume from step {step}"


def test_default_corpus_is_the_stdlib_python_sources(tmp_path):
    files, origin = list_text_files(None, max_files=5)
    root = stdlib_root()
    assert len(files) == 5 and str(root) in origin
    for f in files:
        assert f.suffix == ".py" and f.resolve().is_relative_to(root.resolve())
        assert "site-packages" not in f.parts
    dm = TextDataModule(block_size=64, max_bytes=50_000, cache_dir=str(tmp_path / "c"))
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 64)
    assert dm.splits["train"].num_bytes + dm.splits["val"].num_bytes >= 50_000


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        TextDataModule(paths=str(tmp_path / "does-not-exist"), block_size=8).setup()
    root, _ = _corpus(tmp_path, n=2, size=200)
    with pytest.raises(ValueError, match="block_size"):
        TextDataModule(paths=str(root), block_size=4096, cache_dir=str(tmp_path / "c")).train_dataloader()
    with pytest.raises(ValueError, match="at least 2"):
        TextDataModule(paths=str(root), block_size=8, max_files=1, cache_dir=str(tmp_path / "c")).setup()
    with pytest.raises(ValueError, match="context_length"):
        TextDataModule(paths=str(root), cache_dir=str(tmp_path / "c")).setup()
    with pytest.raises(ValueError, match="batch_size"):
        TextDataModule(batch_size=0)
    with pytest.raises(IndexError):
        ByteWindows(_random_bytes(tmp_path / "a.u8", 40), 8)[32]  # last start is 31


def _random_bytes(path, n):
    path.write_bytes(os.urandom(n))
    return path


# --- the evidence protocol's corpus: split by directory, measured overlap, pinned digest --------


def _families(tmp_path):
    """Three directories of sibling files that share long verbatim blocks (like the stdlib's
    ``encodings/``), and a few root files."""
    root = tmp_path / "families"
    rng = np.random.default_rng(1)
    for fam in ("enc", "mail", "json"):
        (root / fam / "deep").mkdir(parents=True)
        shared = " ".join(f"{fam}{int(rng.integers(10**9))}" for _ in range(1500))  # ~18 KB per family
        for j in range(4):
            own = " ".join(f"{fam}{j}_{int(rng.integers(10**9))}" for _ in range(300))
            (root / fam / ("deep" if j == 3 else "") / f"m{j}.py").write_text(shared + own)
    for j in range(3):
        (root / f"top{j}.py").write_text(" ".join(f"t{j}_{int(rng.integers(10**9))}" for _ in range(600)))
    return root


def test_directory_split_keeps_every_family_on_one_side_and_removes_the_verbatim_overlap(tmp_path):
    root = _families(tmp_path)
    files, _ = list_text_files(str(root), suffixes=[".py"])
    keys = [text_mod.group_key(f, [root]) for f in files]
    assert set(keys) == {f"families/{k}" for k in ("enc", "mail", "json", "top0.py", "top1.py", "top2.py")}
    train, val = text_mod.split_groups(files, keys, 0.3)
    assert text_mod.split_groups(files, keys, 0.3) == (train, val)  # deterministic
    held = {text_mod.group_key(f, [root]) for f in val}
    assert held and not held & {text_mod.group_key(f, [root]) for f in train}
    total = sum(f.stat().st_size for f in files)
    assert 0 < sum(f.stat().st_size for f in val) <= 0.3 * total
    # the file split puts siblings on both sides: their shared block is seen verbatim in training
    by_file = split_files(files, 0.3)

    def overlap(split):
        tr, va = (b"\0".join(f.read_bytes() for f in part) for part in split)
        return text_mod.verbatim_overlap(tr, va, chunk=1024)

    assert overlap(by_file) > 0.3 and overlap((train, val)) == 0.0


def test_verbatim_overlap_against_a_brute_force_count():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 4, 5000, dtype=np.uint8).tobytes()
    val = train[1000:1700] + rng.integers(4, 8, 300, dtype=np.uint8).tobytes() + train[40:300]
    chunk = 256
    pieces = [val[i : i + chunk] for i in range(0, len(val), chunk)]
    seen = sum(len(p) for p in pieces if any(train[k : k + len(p)] == p for k in range(len(train) - len(p) + 1)))
    assert text_mod.verbatim_overlap(train, val, chunk) == seen / len(val)
    assert 0 < seen < len(val)


def test_corpus_digest_pins_the_text_and_a_different_corpus_is_refused(tmp_path):
    root = _families(tmp_path)
    kw = dict(paths=str(root), block_size=32, split="directory", val_fraction=0.3)
    a = TextDataModule(cache_dir=str(tmp_path / "c1"), **kw)
    a.setup()
    b = TextDataModule(cache_dir=str(tmp_path / "c2"), expect_digest=a.digest, **kw)
    b.setup()  # the same text from another cache: accepted
    assert b.digest == a.digest and len(a.digest) == 64
    assert TextDataModule(cache_dir=str(tmp_path / "c3"), **{**kw, "split": "file"}).digest == ""
    other = TextDataModule(cache_dir=str(tmp_path / "c3"), **{**kw, "split": "file"})
    other.setup()
    assert other.digest != a.digest  # the same files, split otherwise
    edited = root / "top1.py"
    edited.write_text(edited.read_text() + " one more word")
    with pytest.raises(ValueError, match="expected .*expect_digest"):
        TextDataModule(cache_dir=str(tmp_path / "c4"), expect_digest=a.digest, **kw).setup()
    with pytest.raises(ValueError, match="split must be one of file, directory"):
        TextDataModule(split="by_dir")


def test_packages_add_their_python_sources_and_an_unknown_one_is_refused(tmp_path):
    import numpy

    files, origin = list_text_files(None, max_files=3, packages=["numpy"])
    assert len(files) == 3  # the standard library first; the limit stops the walk
    files, origin = list_text_files([str(_families(tmp_path))], packages=["numpy"])
    numpy_root = Path(numpy.__file__).parent.resolve()
    from_numpy = [f for f in files if numpy_root in f.parents]
    assert from_numpy and all(f.suffix == ".py" for f in from_numpy) and "numpy" in origin
    assert text_mod.group_key(from_numpy[0], text_mod.corpus_roots(None, ["numpy"])).startswith("numpy/")
    with pytest.raises(ValueError, match="packages: 'no_such_pkg_x' is not an installed package"):
        list_text_files(None, packages=["no_such_pkg_x"])
