"""ManifoldRetraction in real (tiny, CPU) fits: on the manifold after every optimizer step, once per
step under accumulation / manual optimization / GradScaler skips, exact resume, errors."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_optlab.callbacks import ManifoldRetraction
from lightning_optlab.policy import build_optimizer

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and much faster on a shared, busy machine
    (OpenMP threads spin against the other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


POLICY = {
    "rules": [
        {"name": "input", "match": {"role": "embedding"}, "optimizer": "adamw", "lr": 0.02,
         "constraint": "sphere"},
        {"name": "hidden", "match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.2,
         "momentum": 0.9, "constraint": "stiefel"},
        {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 0.02},
    ]
}


def stiefel_dist64(p):
    """sqrt(mean((s^2 - 1)^2)) of the flattened parameter, from a float64 SVD."""
    s = torch.linalg.svdvals(p.detach().double().reshape(p.shape[0], -1))
    return torch.sqrt(((s**2 - 1) ** 2).mean()).item()


def sphere_dist64(p, radius=1.0):
    return (p.detach().double().reshape(p.shape[0], -1).norm(dim=1) - radius).abs().max().item()


class EpochSampler(Sampler):
    """Order from (seed, epoch) only, so a resumed run sees the same batches."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self):
        return self.n


def loader(n=64, batch_size=8):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :4].argmax(1)).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(n))


class TinyNet(L.LightningModule):
    """input (embedding role) -> hidden (16x16) -> hidden (24x16, tall) -> output."""

    def __init__(self, policy=POLICY):
        super().__init__()
        self.policy = policy
        self.inp = nn.Linear(20, 16)
        self.hid1 = nn.Linear(16, 16)
        self.hid2 = nn.Linear(16, 24)
        self.out = nn.Linear(24, 4)

    def forward(self, x):
        x = x.to(self.inp.weight.dtype)
        return self.out(F.relu(self.hid2(F.relu(self.hid1(F.relu(self.inp(x)))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return build_optimizer(self, self.policy)


class OnManifoldChecker(Callback):
    """Measures every constrained parameter right after every optimizer step (a post-hook
    registered after ManifoldRetraction's), with float64 SVD/norms."""

    def __init__(self, params=None):
        self.params = params  # [(param, constraint)]; default: from the optimizer's groups
        self.checks = 0
        self.worst = {"sphere": 0.0, "stiefel": 0.0}
        self.at_train_start = None

    def _measure(self):
        worst = {"sphere": 0.0, "stiefel": 0.0}
        for p, kind in self.params:
            d = stiefel_dist64(p) if kind == "stiefel" else sphere_dist64(p)
            worst[kind] = max(worst[kind], d)
        return worst

    def on_train_start(self, trainer, pl_module):
        if self.params is None:
            self.params = [
                (p, g["constraint"]) for opt in trainer.optimizers for g in opt.param_groups
                if g.get("constraint") for p in g["params"]
            ]
        self.at_train_start = self._measure()

        def check(*_):
            self.checks += 1
            for k, v in self._measure().items():
                self.worst[k] = max(self.worst[k], v)

        self.handle = trainer.optimizers[0].register_step_post_hook(check)

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


def trainer(callbacks, **kw):
    kw.setdefault("max_steps", 8)
    return L.Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw
    )


@pytest.mark.parametrize(
    "precision, stiefel_tol, sphere_tol",
    [("32-true", 1e-3, 1e-5), ("bf16-true", 2e-2, 1e-2)],
)
def test_on_manifold_after_every_step(precision, stiefel_tol, sphere_tol):
    torch.manual_seed(0)
    model = TinyNet()
    retraction, checker = ManifoldRetraction(), OnManifoldChecker()
    t = trainer([retraction, checker], precision=precision, log_every_n_steps=1)
    t.fit(model, loader())
    assert model.inp.weight.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert t.global_step == 8 and checker.checks == 8 and retraction.num_retractions == 8
    assert retraction.retracted_at_fit_start
    assert checker.at_train_start["stiefel"] <= stiefel_tol and checker.at_train_start["sphere"] <= sphere_tol
    assert checker.worst["stiefel"] <= stiefel_tol
    assert checker.worst["sphere"] <= sphere_tol
    m = t.callback_metrics  # logged at every step here (log_every_n_steps=1): the last step's values
    assert m["manifold/stiefel_distance_before/hidden"] > 10 * m["manifold/stiefel_distance_after/hidden"]
    assert m["manifold/stiefel_distance_before/hidden"] > 1e-3  # the step really left the manifold
    assert m["manifold/sphere_distance_before/embedding"] > m["manifold/sphere_distance_after/embedding"]
    assert m["manifold/stiefel_distance_after/hidden"].item() == pytest.approx(
        max(stiefel_dist64(model.hid1.weight), stiefel_dist64(model.hid2.weight)), rel=1e-3, abs=1e-6)
    # the adaptive count: one optimizer step off the manifold -> one or two iterations, logged
    # per shape bucket; the overall tag is the largest bucket count
    buckets = {k: v.item() for k, v in m.items() if k.startswith("manifold/stiefel_steps/")}
    assert set(buckets) == {"manifold/stiefel_steps/16x16", "manifold/stiefel_steps/24x16"}
    assert 1 <= m["manifold/stiefel_steps"] <= 2 and m["manifold/stiefel_steps"] == max(buckets.values())
    assert retraction.last_stiefel_steps == {k.rsplit("/", 1)[1]: int(v) for k, v in buckets.items()}
    assert m["manifold/time_ms"] > 0


class StepsRecorder(Callback):
    """The step count of every retraction (read right after it, from the callback)."""

    def __init__(self, retraction):
        self.retraction, self.counts = retraction, []

    def on_train_start(self, trainer, pl_module):
        self.handle = trainer.optimizers[0].register_step_post_hook(
            lambda *_: self.counts.append(dict(self.retraction.last_stiefel_steps)))

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()


def test_step_count_follows_the_distance_the_step_left():
    """Small steps -> 1 iteration; steps that throw the weights far -> more; every count keeps
    the distance under the target (checked in float64 after every step)."""
    def fit(lr, tol="auto", steps=5):
        torch.manual_seed(0)
        policy = {"rules": [dict(POLICY["rules"][1], lr=lr), {"match": {}, "optimizer": "adamw", "lr": 0.01}]}
        retraction = ManifoldRetraction(tol=tol, steps=steps)
        recorder, checker = StepsRecorder(retraction), OnManifoldChecker()
        trainer([retraction, recorder, checker], max_steps=6).fit(TinyNet(policy), loader())
        return [max(c.values()) for c in recorder.counts], checker.worst["stiefel"]

    small, worst_small = fit(lr=0.01)
    large, worst_large = fit(lr=1.0)
    assert max(small) == 1 and worst_small <= 5e-4
    assert max(large) >= 2 and worst_large <= 5e-4  # (the first step has no momentum yet)
    tight, worst_tight = fit(lr=1.0, tol=1e-6, steps=10)  # a tighter target costs more iterations
    assert sum(tight) > sum(large) and worst_tight <= 1e-6


def test_fixed_and_check_schedules_keep_their_meaning():
    torch.manual_seed(0)
    fixed = ManifoldRetraction(schedule="fixed", tol=None, steps=4)
    t = trainer([fixed], max_steps=2, log_every_n_steps=1)
    t.fit(TinyNet(), loader())
    assert fixed.last_stiefel_steps == {"16x16": 4, "24x16": 4} and t.callback_metrics["manifold/stiefel_steps"] == 4
    check, checker = ManifoldRetraction(schedule="check", tol=1e-6, steps=10), OnManifoldChecker()
    trainer([check, checker], max_steps=3).fit(TinyNet(), loader())
    assert checker.worst["stiefel"] <= 1e-5 and all(1 <= v < 10 for v in check.last_stiefel_steps.values())


def test_without_the_callback_the_checker_sees_the_violation():
    """Control for the test above: the same fit without retraction is off the manifold."""
    torch.manual_seed(0)
    checker = OnManifoldChecker()
    trainer([checker]).fit(TinyNet(), loader())
    assert checker.checks == 8
    assert checker.worst["stiefel"] > 1e-2 and checker.worst["sphere"] > 1e-2


def test_accumulation_retracts_once_per_optimizer_step_and_hooks_are_removed():
    torch.manual_seed(0)
    model = TinyNet()
    retraction, checker, counter = ManifoldRetraction(), OnManifoldChecker(), StepCounter()
    t = trainer([retraction, checker, counter], max_steps=-1, max_epochs=2, accumulate_grad_batches=4)
    t.fit(model, loader(n=64, batch_size=4))  # 16 batches/epoch -> 4 optimizer steps/epoch
    assert counter.steps == 8 and t.global_step == 8
    assert retraction.num_retractions == 8
    assert checker.checks == 8 and checker.worst["stiefel"] <= 1e-3
    # after fit the post-hook is gone: a manual step leaves the manifold and is not counted
    opt = t.optimizers[0]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert retraction.num_retractions == 8
    assert stiefel_dist64(model.hid1.weight) > 1e-2


def test_resume_reproduces_uninterrupted_run(tmp_path):
    def run(max_epochs, ckpt_path=None, save=False):
        torch.manual_seed(0)
        model = TinyNet()
        retraction = ManifoldRetraction()
        callbacks = [retraction]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
        t = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
            enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
        )
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model, retraction, t

    full, _, _ = run(3)
    run(1, save=True)
    resumed, retraction, t = run(3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert t.global_step == 24
    assert not retraction.retracted_at_fit_start  # the checkpoint's run already did it
    assert retraction.num_retractions == 16  # epochs 2 and 3: none skipped, none doubled
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert stiefel_dist64(resumed.hid1.weight) < 1e-3


class ManualScalerNet(TinyNet):
    """Manual optimization with a GradScaler; batch 2 has an inf loss, so the scaler skips it."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        self.skipped = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers().optimizer  # the raw torch optimizer, as GradScaler wants it
        loss = F.cross_entropy(self(x), y)
        if batch_idx == 2:
            loss = loss * float("inf")
        opt.zero_grad()
        self.manual_backward(self.scaler.scale(loss))
        scale = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < scale)  # the scale drops only on a skip


def test_manual_optimization_with_gradscaler_skip():
    torch.manual_seed(0)
    model = ManualScalerNet()
    retraction, checker = ManifoldRetraction(), OnManifoldChecker()
    t = trainer([retraction, checker], max_steps=-1, max_epochs=1)
    t.fit(model, loader(n=48, batch_size=8))  # 6 batches
    assert model.skipped == 1
    assert retraction.num_retractions == 5 == checker.checks
    assert checker.worst["stiefel"] <= 1e-3 and checker.worst["sphere"] <= 1e-5
    assert all(torch.isfinite(p).all() for p in model.parameters())


class NoPolicyNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 8, kernel_size=3)  # kernel (8, 6, 3) -> matrix (8, 18), wide
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.conv(self.emb(x).transpose(1, 2)).mean(-1)
        for b in self.blocks:
            h = torch.tanh(b(h))
        return F.cross_entropy(self.head(self.frozen(h)), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.3, momentum=0.9)


def test_mapping_for_a_model_without_policy():
    torch.manual_seed(0)
    model = NoPolicyNet()
    mapping = {"emb.weight": {"constraint": "sphere", "radius": 2.0}, "conv.weight": "stiefel",
               "blocks.*.weight": "stiefel", "frozen.weight": "stiefel"}
    params = [(model.conv.weight, "stiefel"), (model.blocks[0].weight, "stiefel"),
              (model.blocks[1].weight, "stiefel"), (model.frozen.weight, "stiefel")]
    retraction, checker = ManifoldRetraction(mapping), OnManifoldChecker(params)
    x = torch.randint(0, 10, (32, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    t = trainer([retraction, checker], max_steps=6)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert retraction.num_retractions == 6 == checker.checks
    assert checker.at_train_start["stiefel"] <= 1e-3  # fit start put them on the manifold
    assert checker.worst["stiefel"] <= 1e-3
    assert sphere_dist64(model.emb.weight, radius=2.0) <= 1e-5
    assert model.conv.weight.shape == (8, 6, 3)


def test_fit_start_uses_exact_projection_when_the_iteration_cannot_get_there():
    torch.manual_seed(0)
    model = NoPolicyNet()
    with torch.no_grad():  # rank-deficient start: Newton-Schulz keeps zero singular values at zero
        model.blocks[0].weight.copy_(torch.outer(torch.randn(8), torch.randn(8)))
    retraction = ManifoldRetraction({"blocks.*.weight": "stiefel"})
    x = torch.randint(0, 10, (8, 5))
    trainer([retraction], max_steps=1).fit(model, DataLoader(TensorDataset(x, torch.zeros(8).long()), batch_size=8))
    assert stiefel_dist64(model.blocks[0].weight) <= 1e-3


def fit_with(callbacks, model=None):
    model = model or NoPolicyNet()
    x = torch.randint(0, 10, (8, 5))
    trainer(callbacks, max_steps=1).fit(model, DataLoader(TensorDataset(x, torch.zeros(8).long()), batch_size=8))


def test_errors_name_the_culprit():
    with pytest.raises(ValueError, match=r"glob 'block.\*'.*close names: blocks"):
        fit_with([ManifoldRetraction({"block.*": "stiefel"})])
    with pytest.raises(ValueError, match=r"glob 'blocks.\*' puts constraint 'stiefel' on 'blocks.0.bias' of shape \[8\]"):
        fit_with([ManifoldRetraction({"blocks.*": "stiefel"})])
    with pytest.raises(ValueError, match=r"unknown constraint 'stifel'.*did you mean 'stiefel'"):
        ManifoldRetraction({"blocks.*.weight": "stifel"})
    with pytest.raises(ValueError, match=r"schedule must be one of fixed, check, predict, got 'predcit'.*did you mean 'predict'"):
        ManifoldRetraction(schedule="predcit")
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, mixed, got 'bf16'"):
        ManifoldRetraction(precision="bf16")
    with pytest.raises(ValueError, match=r"unknown sphere option\(s\) \['raduis'\]"):
        ManifoldRetraction({"emb.weight": {"constraint": "sphere", "raduis": 2}})
    policy = {"rules": [
        {"name": "hid", "match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.1,
         "constraint": "stiefel", "constraint_options": {"stpes": 3}},
        {"match": {}, "optimizer": "sgd", "lr": 0.1},
    ]}
    with pytest.raises(ValueError, match=r"param group 'hid'.*unknown stiefel option\(s\) \['stpes'\]"):
        trainer([ManifoldRetraction()], max_steps=1).fit(TinyNet(policy), loader())
    conflict = ManifoldRetraction({"hid1.weight": "sphere"})
    with pytest.raises(ValueError, match=r"'hid1.weight' gets constraint 'stiefel'.*'hidden'.*'sphere'.*glob"):
        trainer([conflict], max_steps=1).fit(TinyNet(), loader())


def test_nothing_constrained_warns():
    policy = {"rules": [{"match": {}, "optimizer": "sgd", "lr": 0.1}]}
    with pytest.warns(UserWarning, match="no parameter has a constraint"):
        trainer([ManifoldRetraction()], max_steps=1).fit(TinyNet(policy), loader())


# ----------------------------------------------------------------------------- research plan configs
MODULAR_CONFIGS = {
    # name in the research plan -> (file, {component: constraint})
    "baseline_adamw": ("modular_baseline_adamw.yaml", {}),
    "baseline_muon": ("modular_baseline_muon.yaml", {}),
    "modular_sphere": ("modular_sphere.yaml", {"input": "sphere"}),
    "modular_stiefel": ("modular_stiefel.yaml", {"hidden": "stiefel"}),
    "full_modular": ("modular_full_modular.yaml", {"input": "sphere", "hidden": "stiefel"}),
}
PLAN_OPTIMIZERS = {  # the research plan's table: optimizer of (input, hidden, output) weights
    "baseline_adamw": ("adamw", "adamw", "adamw"),
    "baseline_muon": ("muon", "muon", "adamw"),
    "modular_sphere": ("adamw", "muon", "muon"),
    "modular_stiefel": ("muon", "muon", "adamw"),
    "full_modular": ("adamw", "muon", "adamw"),
}


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("name", list(MODULAR_CONFIGS))
def test_research_plan_configuration_trains_mnist(name, tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_optlab.cli import main

    file, constraints = MODULAR_CONFIGS[name]
    config = Path(__file__).resolve().parents[1] / "configs" / "mnist" / file
    monkeypatch.chdir(tmp_path)
    cli = main([
        "--config", str(config), "--trainer.max_steps=100", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.download=false", "--data.init_args.batch_size=64",
    ], run=False)
    model, t = cli.model, cli.trainer
    # the policy is the plan's row: optimizer and constraint of each component's weight
    groups = {n: (g["algorithm"], g["constraint"]) for g in build_optimizer(model, model.policy).param_groups
              for n in g["param_names"]}
    weights = {"input": ["input.weight"], "hidden": ["hidden.0.weight", "hidden.1.weight"], "output": ["output.weight"]}
    for component, optimizer in zip(("input", "hidden", "output"), PLAN_OPTIMIZERS[name]):
        for w in weights[component]:
            assert groups[w] == (optimizer, constraints.get(component)), (name, w)
    assert all(groups[n][0] == "adamw" for n in groups if n.endswith(".bias"))

    # the monitors of other issues are exercised by tests/test_configs.py; here only training counts
    t.callbacks = [cb for cb in t.callbacks if type(cb).__name__ not in ("SpectralMonitor", "StepTimeMonitor")]
    recorder = LossRecorder()
    t.callbacks.append(recorder)
    t.fit(model, datamodule=cli.datamodule)
    assert t.global_step == 100
    first, last = sum(recorder.losses[:10]) / 10, sum(recorder.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in cli.datamodule.val_dataloader():
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    assert correct / total > 0.6  # chance is 0.1

    retractions = [cb for cb in t.callbacks if isinstance(cb, ManifoldRetraction)]
    assert len(retractions) == (1 if constraints else 0)
    if constraints:
        assert retractions[0].num_retractions == 100
    for component, kind in constraints.items():
        for w in weights[component]:
            p = model.get_parameter(w)
            if kind == "stiefel":
                assert stiefel_dist64(p) <= 1e-3, w
            else:
                assert sphere_dist64(p) <= 1e-5, w


# ----------------------------------------------------------------------------- with the package's mixin
CONSTRAINED_POLICY = {
    "rules": [
        {"match": {"role": "embedding"}, "optimizer": "adamw", "lr": 3e-3, "constraint": "sphere"},
        {"match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "constraint": "stiefel"},
        {"match": {}, "optimizer": "adamw", "lr": 3e-3},
    ]
}


def test_mixin_attaches_the_default_callback():
    from lightning_optlab.models import MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier(policy=CONSTRAINED_POLICY, input_dim=20, hidden_sizes=(16, 16, 12), num_classes=4)
    t = trainer([], max_steps=5)
    t.fit(model, loader())
    attached = [cb for cb in t.callbacks if isinstance(cb, ManifoldRetraction)]
    assert len(attached) == 1 and attached[0].num_retractions == 5
    assert stiefel_dist64(model.hidden[0].weight) <= 1e-3 and stiefel_dist64(model.hidden[1].weight) <= 1e-3
    assert sphere_dist64(model.input.weight) <= 1e-5


def test_ddp_ranks_retract_identically(tmp_path):
    """2-process gloo DDP (the lead's script): no communication, yet identical and on the manifold."""
    from test_ddp import run_ddp

    r0, r1 = run_ddp(tmp_path, CONSTRAINED_POLICY)
    assert r0["world"] == 2 and r0["steps"] == r1["steps"] == 8
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    for name in ("hidden.0.weight",):
        assert stiefel_dist64(r0["state"][name]) <= 1e-3
    assert sphere_dist64(r0["state"]["input.weight"]) <= 1e-5


def test_predict_retracts_in_place_and_logs_the_steps_it_applied():
    """The predict path writes into the parameters' own storage (no copy back) and logs, per
    bucket, the count it applied: replaying a fresh StiefelRetractor on a snapshot of the weights
    taken right before each retraction gives the same weights and the same counts."""
    from lightning_optlab.manifolds import StiefelRetractor

    torch.manual_seed(0)
    model = TinyNet(dict(POLICY, rules=[dict(POLICY["rules"][1], lr=1.0), POLICY["rules"][2]]))
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    replays = []

    class Snapshot(Callback):
        """Registered before ManifoldRetraction's hook, so it runs right before it."""

        def on_fit_start(self, trainer, pl_module):
            def before(*_):
                self.snap = [pl_module.hid1.weight.detach().clone(), pl_module.hid2.weight.detach().clone()]

            def after(*_):
                counts = [r.steps for r in StiefelRetractor([[self.snap[0]], [self.snap[1]]], tol=5e-4)()]
                replays.append((counts, dict(retraction.last_stiefel_steps),
                                max((s - p.detach()).abs().max().item()
                                    for s, p in zip(self.snap, (pl_module.hid1.weight, pl_module.hid2.weight)))))
            self.handles = [trainer.optimizers[0].register_step_post_hook(before)]
            self.after = after

        def on_train_start(self, trainer, pl_module):  # after ManifoldRetraction's hook
            self.handles.append(trainer.optimizers[0].register_step_post_hook(self.after))

    retraction = ManifoldRetraction(cuda_graph=False)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        ManifoldRetraction(cuda_graph="sometimes")
    t = trainer([Snapshot(), retraction], max_steps=4, log_every_n_steps=1)
    t.fit(model, loader())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert len(replays) == 4
    for counts, logged, diff in replays:
        assert logged == {"16x16": counts[0], "24x16": counts[1]}
        assert diff < 1e-6  # the snapshot retracted by the replay equals the model's weights
    assert max(max(c) for c, _, _ in replays) >= 2  # lr 1.0: some step needed more than one
    m = t.callback_metrics
    assert m["manifold/stiefel_steps"] == max(replays[-1][0])
    assert m["manifold/stiefel_steps/16x16"] == replays[-1][0][0]
