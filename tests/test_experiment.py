"""fsgeom.experiment: RunConfig, run() and sweep() (processes, dask, failures, resume)."""

import concurrent.futures as cf
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from fsgeom import experiment
from fsgeom.experiment import RunConfig, SweepError, evaluate, run, sweep

TIMING = ["epoch_seconds"]


def tiny(**kw) -> RunConfig:
    """A run of a few steps on the embedded digits (a second or two)."""
    base = dict(
        dataset="digits",
        model="mlp",
        optimizer="sgd",
        hparams={"lr": 0.1, "momentum": 0.9},
        epochs=2,
        batch_size=64,
        probe_size=32,
        train_size=192,
        test_size=100,
        seed=0,
    )
    base.update(kw)
    return RunConfig(**base)


def hcgd(**kw) -> RunConfig:
    hp = {"lr": 0.1, "momentum": 0.9, "lam": 0.5, "inner_lr": 0.02, "n_corrections": 1}
    return tiny(optimizer="hcgd", hparams=hp, val_batch_size=64, label="HCGD", **kw)


def values(ds: xr.Dataset) -> xr.Dataset:
    """The computed content of a run: no timing variables, no attributes."""
    ds = ds.drop_vars([v for v in TIMING if v in ds.variables])
    ds = ds.drop_vars([c for c in ds.coords if c in ("wall_seconds",)], errors="ignore")
    out = ds.copy()
    out.attrs = {}
    for v in out.variables:
        out[v].attrs = {}
    return out


# --------------------------------------------------------------------------- RunConfig


def test_config_roundtrip_and_hash():
    cfg = hcgd(seed=3)
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.hash == cfg.hash
    assert cfg.replace(label="other", data_root="/x").hash == cfg.hash  # not identity
    assert cfg.replace(seed=4).hash != cfg.hash
    assert cfg.replace(hparams_update={"lam": 0.25}).hparams["lam"] == 0.25


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("dataset", "imagenet", "dataset must be one of"),
        ("model", "resnet", "model must be one of"),
        ("optimizer", "lion", "optimizer must be one of"),
        ("epochs", 0, "epochs must be a positive integer"),
        ("batch_size", 2.5, "batch_size must be a positive integer"),
        ("train_size", -3, "train_size must be None or a positive integer"),
        ("output", "softmax", "output must be"),
    ],
)
def test_config_rejects_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


def test_config_from_dict_unknown_key():
    with pytest.raises(ValueError, match=r"unknown RunConfig field\(s\) \['lr'\]"):
        RunConfig.from_dict({"lr": 0.1})


def test_bad_hparams_name_the_optimizer():
    with pytest.raises(ValueError, match="not valid for torch.optim.SGD"):
        run(tiny(hparams={"lr": 0.1, "nesterov_typo": True}))


# --------------------------------------------------------------------------- run


def test_run_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = run(hcgd())
    assert torch.equal(torch.get_rng_state(), state)
    b = run(hcgd())
    xr.testing.assert_identical(values(a), values(b))
    c = run(hcgd(seed=1))
    assert not np.allclose(a.csdt_param.values[1:], c.csdt_param.values[1:])


def test_run_dataset_variables_and_passes():
    cfg = tiny(epochs=3)
    ds = run(cfg)
    steps_per_epoch = -(-cfg.train_size // cfg.batch_size)
    n = cfg.epochs * steps_per_epoch
    for v in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "passes_total"):
        assert ds[v].dims == ("epoch_end",), v
    for v in ("csdt_param", "csdt_function", "function_step_sq", "param_step_sq"):
        assert ds[v].dims == ("step",), v
    np.testing.assert_array_equal(ds.epoch_end.values, [1, 2, 3])
    np.testing.assert_array_equal(ds.step.values, np.arange(n + 1))
    # plain optimizer: one forward + one backward per step
    np.testing.assert_array_equal(ds.passes.values[1:], 2)
    np.testing.assert_array_equal(ds.passes_cum.values, 2 * np.arange(n + 1))
    np.testing.assert_array_equal(ds.passes_total.values, 2 * steps_per_epoch * np.arange(1, 4))
    np.testing.assert_array_equal(ds.epoch_end_step.values, steps_per_epoch * np.arange(1, 4))
    assert np.isfinite(ds.loss.values[1:]).all()
    cfg2 = json.loads(ds.attrs["config"])
    assert RunConfig.from_dict(cfg2) == cfg
    assert ds.attrs["config_hash"] == cfg.hash


def test_run_hcgd_reports_optimizer_passes():
    ds = run(hcgd(epochs=1))
    p = ds.passes.values[1:]
    assert (p > 2).all()  # validation forward/backward passes on top of the user's 2
    assert ds.passes_cum.values[-1] == p.sum() == ds.passes_total.values[-1]


def test_run_without_tracking():
    ds = run(tiny(track=False))
    assert "csdt_param" not in ds
    assert ds.passes_total.values[-1] == ds.passes_cum.values[-1]
    assert ds.epoch.values[0] == 0 and ds.epoch.values[-1] == 2


def test_track_every_keeps_total_passes():
    ds = run(tiny(track_every=2, epochs=1))
    assert np.nansum(ds.passes.values) == ds.passes_total.values[-1]


def test_lr_milestones_scale_the_learning_rate():
    ds = run(tiny(epochs=3, lr_milestones=(1,), lr_gamma=0.5, track=False))
    np.testing.assert_allclose(ds.lr.values, [0.1, 0.05, 0.05])


def test_evaluate_matches_per_example_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)
    )
    model.train()
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))
    model(x)  # running statistics differ from batch statistics
    loss, acc = evaluate(model, x, y, batch_size=4)
    assert model.training
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).item() for i in range(11)]
        hits = [int(model(x[i : i + 1]).argmax() == y[i]) for i in range(11)]
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6)
    assert acc == np.mean(hits)


# --------------------------------------------------------------------------- sweep


def sweep_configs():
    return [tiny(label="SGD", seed=s, epochs=1) for s in (0, 1)] + [hcgd(seed=0, epochs=1)]


@pytest.fixture(scope="module")
def sequential():
    return sweep(sweep_configs(), executor="sequential", progress=False)


def test_sweep_sequential_dims(sequential):
    ds = sequential
    assert ds.test_acc.dims[:2] == ("optimizer", "seed")
    assert set(ds.optimizer.values) == {"SGD", "HCGD"}
    assert np.isnan(ds.test_acc.sel(optimizer="HCGD", seed=1)).all()  # not run: NaN
    single = run(sweep_configs()[1])
    np.testing.assert_allclose(
        ds.csdt_function.sel(optimizer="SGD", seed=1).values, single.csdt_function.values
    )
    assert json.loads(ds.attrs["failed_runs"]) == []


def test_sweep_two_local_processes_equals_sequential(sequential):
    ds = sweep(sweep_configs(), max_workers=2, progress=False)  # spawned ProcessPool
    xr.testing.assert_allclose(values(ds), values(sequential), rtol=1e-6, atol=1e-9)


def test_sweep_dask_local_cluster_equals_sequential(sequential):
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with (
            distributed.LocalCluster(
                n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            ds = sweep(sweep_configs(), executor=client.get_executor(), progress=False)
    xr.testing.assert_allclose(values(ds), values(sequential), rtol=1e-6, atol=1e-9)


def test_sweep_reports_failed_run_and_keeps_others(tmp_path):
    bad = tiny(label="bad", hparams={"lr": -1.0})  # torch.optim.SGD rejects lr < 0
    good = tiny(label="SGD", epochs=1)
    with cf.ThreadPoolExecutor(2) as ex, pytest.warns(RuntimeWarning, match="1 of 2 run"):
        ds = sweep([good, bad], executor=ex, out_dir=tmp_path, progress=False)
    assert list(ds.optimizer.values) == ["SGD"]
    failed = json.loads(ds.attrs["failed_runs"])
    assert failed[0]["config"]["label"] == "bad"
    assert "learning rate" in failed[0]["error"]
    on_disk = json.loads((tmp_path / "failures.json").read_text())
    assert on_disk[0]["config"]["hparams"] == {"lr": -1.0}
    assert experiment.result_path(tmp_path, good).exists()
    with pytest.raises(SweepError, match="1 run\\(s\\) failed") as info:
        sweep([bad], executor="sequential", progress=False)
    assert info.value.failures[0].config == bad


def test_sweep_resumes_saved_runs(tmp_path, monkeypatch):
    calls = []
    real = experiment.run

    def counting(cfg, *a, **k):
        calls.append(cfg.seed)
        return real(cfg, *a, **k)

    monkeypatch.setattr(experiment, "run", counting)
    first = [tiny(label="SGD", seed=s, epochs=1) for s in (0, 1)]
    a = sweep(first, executor="sequential", out_dir=tmp_path, progress=False)
    assert sorted(calls) == [0, 1]
    b = sweep(first + [tiny(label="SGD", seed=2, epochs=1)], executor="sequential",
              out_dir=tmp_path, progress=False)  # fmt: skip
    assert sorted(calls) == [0, 1, 2]  # only the new config ran
    xr.testing.assert_allclose(values(b.sel(seed=[0, 1])), values(a))
    c = sweep(first, out_dir=tmp_path, run_missing=False, progress=False)
    xr.testing.assert_allclose(values(c), values(a))


def test_sweep_rejects_duplicates_and_bad_arguments():
    with pytest.raises(ValueError, match="same \\('optimizer', 'seed'\\)"):
        sweep([tiny(), tiny()], executor="sequential", progress=False)
    with pytest.raises(ValueError, match="configs is empty"):
        sweep([], progress=False)
    with pytest.raises(ValueError, match="errors must be"):
        sweep([tiny()], errors="ignore", progress=False)
    with pytest.raises(ValueError, match="dims: 'colour'"):
        sweep([tiny()], dims=("colour",), progress=False)


def test_sweep_rejects_unknown_executor():
    with pytest.raises(ValueError, match="executor must be 'sequential'"):
        sweep([tiny()], executor="serial", progress=False)
    with pytest.raises(TypeError, match="submit"):
        sweep([tiny()], executor=object(), progress=False)
