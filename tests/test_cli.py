"""The ``fsgeom`` command (demo, run, sweep, reproduce, plot) and the analyses/ scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsgeom import paper
from fsgeom.cli import main
from fsgeom.experiment import open_result

from .conftest import needs_mnist

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--seeds", "1", "--epochs", "1", "--dataset", "digits", "--train-size", "128",
        "--workers", "1", "--no-progress"]  # fmt: skip


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FSGEOM_DEMO_TINY", "1")
    assert cli("demo", "--out", tmp_path, "--workers", "1", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "final test acc" in out and "SGD" in out and "HCGD" in out
    ds = open_result(tmp_path / "demo.nc")
    assert set(ds.optimizer.values) == {"SGD", "HCGD"}
    assert ds.sizes["seed"] == 2
    for v in ("test_acc", "csdt_function", "csdt_param", "passes"):
        assert v in ds
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "HCGD" in (tmp_path / "summary.txt").read_text()
    for kind in ("csdt", "accuracy", "passes"):
        png = tmp_path / f"{kind}.png"
        assert cli("plot", tmp_path / "demo.nc", "--kind", kind, "--out", png) == 0
        assert png.stat().st_size > 5_000


def test_run_from_options_and_toml(tmp_path):
    out = tmp_path / "a.nc"
    args = ["--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--epochs", "1",
            "--train-size", "100", "--probe-size", "16"]  # fmt: skip
    assert cli("run", *args, "--out", out, "--no-progress") == 0
    ds = open_result(out)
    cfg = json.loads(ds.attrs["config"])
    assert cfg["hparams"] == {"lr": 0.1, "momentum": 0.9}
    assert ds.sizes["epoch_end"] == 1
    toml = tmp_path / "run.toml"
    toml.write_text(
        'dataset = "digits"\nepochs = 1\ntrain_size = 100\nprobe_size = 16\noptimizer = "hcgd"\n'
        "[hparams]\nlr = 0.1\nlam = 0.5\n"
    )
    out2 = tmp_path / "b.nc"
    assert cli("run", "--config", toml, "--hp", "n_corrections=2", "--out", out2,
               "--no-progress") == 0  # fmt: skip
    cfg2 = json.loads(open_result(out2).attrs["config"])
    assert cfg2["optimizer"] == "hcgd"
    assert cfg2["hparams"] == {"lr": 0.1, "lam": 0.5, "n_corrections": 2}


def test_sweep_from_toml(tmp_path, capsys):
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        'seeds = [0, 1]\n[base]\ndataset = "digits"\nepochs = 1\ntrain_size = 100\n'
        'probe_size = 16\n[[run]]\nlabel = "SGD"\noptimizer = "sgd"\n'
        'hparams = { lr = 0.1 }\n[[run]]\nlabel = "Adam"\noptimizer = "adam"\n'
        "hparams = { lr = 0.001 }\n"
    )
    assert cli("sweep", "--config", toml, "--out", tmp_path / "s", "--workers", "1",
               "--no-progress") == 0  # fmt: skip
    ds = open_result(tmp_path / "s" / "sweep.nc")
    assert set(ds.optimizer.values) == {"SGD", "Adam"} and list(ds.seed.values) == [0, 1]
    assert len(list((tmp_path / "s" / "runs").glob("*.nc"))) == 4
    assert "Adam" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--optimizer", "lion"], "invalid choice: 'lion'"),
        (["run", "--epochs", "0"], "expected a positive integer, got 0"),
        (["run", "--hp", "lam"], "--hp expects KEY=VALUE"),
        (["run", "--config", "/nonexistent.toml"], "no such file"),
        (["reproduce", "fig9"], "unknown figure 'fig9'"),
        (["plot", "/nonexistent.nc"], "no such file"),
        (["demo", "--seeds", "x"], "expected a positive integer, got 'x'"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_toml_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    with pytest.raises(SystemExit):
        cli("run", "--config", bad)
    assert "not valid TOML" in capsys.readouterr().err
    bad.write_text("colour = 1\n")
    with pytest.raises(SystemExit):
        cli("run", "--config", bad)
    assert "unknown top-level key(s) ['colour']" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for c in ("demo", "run", "sweep", "reproduce", "plot"):
        assert c in out
    assert cli("reproduce", "--list") == 0
    assert "fig5_csdt" in capsys.readouterr().out


# --------------------------------------------------------------------------- analyses

SWEEP_VARS = ("test_acc", "train_acc", "passes", "csdt_function", "csdt_param")


@pytest.mark.parametrize(
    "name, dims",
    [
        ("fig3_cnn_bn_mnist", ("optimizer", "seed")),
        ("distance_scales", ("model", "optimizer", "seed")),
    ],
)
def test_analysis_tiny(name, dims, tmp_path):
    assert cli("reproduce", name, "--quick", *TINY, "--root", tmp_path) == 0
    out = tmp_path / name
    ds = open_result(out / f"{name}.nc")
    assert ds.csdt_function.dims[: len(dims)] == dims
    for v in SWEEP_VARS:
        assert v in ds, v
    assert list(out.glob("*.png")), "no figure written"
    assert (out / "summary.csv").exists()


def test_fig1_then_fig2_fig5_reuse_its_runs(tmp_path):
    """Fig. 2 and 5 are drawn from the Fig. 1 runs: nothing is trained again."""
    assert cli("reproduce", "fig1_mlp_mnist", "--quick", *TINY, "--root", tmp_path) == 0
    ds = open_result(tmp_path / "fig1_mlp_mnist" / "fig1_mlp_mnist.nc")
    assert ds.csdt_function.dims[:3] == ("momentum", "optimizer", "seed")
    assert set(ds.optimizer.values) == {"SGD", "HCGD n=1", "HCGD n=10"}
    for v in SWEEP_VARS:
        assert v in ds, v
    assert (tmp_path / "fig1_mlp_mnist" / "accuracy.png").exists()
    n_runs = len(list((tmp_path / "runs").glob("*.nc")))
    for name, png in (("fig2_passes", "accuracy_vs_passes.png"), ("fig5_csdt", "csdt.png")):
        assert cli("reproduce", name, "--quick", *TINY, "--root", tmp_path, "--collect") == 0
        assert (tmp_path / name / png).exists()
    assert len(list((tmp_path / "runs").glob("*.nc"))) == n_runs
    ds = open_result(tmp_path / "fig5_csdt" / "fig5_csdt.nc")
    assert set(ds.optimizer.values) == {"SGD", "HCGD n=1"}


def test_analysis_scripts_run_as_files():
    """Each script is a thin wrapper: it parses ``fsgeom reproduce <name>`` options."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    scripts = sorted((ROOT / "analyses").glob("[!_]*.py"))
    assert {p.stem for p in scripts} >= set(paper.FIGURES)
    r = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "fig5_csdt.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--quick" in r.stdout and "--collect" in r.stdout


def write_fake_cifar(root: Path, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Binary batches in the standard layout: label byte + 3072 pixel bytes per record."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        y = rng.integers(0, 10, n, dtype=np.uint8)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        np.concatenate([y[:, None], x], 1).tofile(root / name)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def test_cifar10_binary_reader(tmp_path):
    from fsgeom.data import CIFAR10_MEAN, CIFAR10_STD, load

    x, y = write_fake_cifar(tmp_path / "cifar-10-batches-bin")
    ds = load("cifar10", root=tmp_path / "cifar-10-batches-bin")
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_y.numpy(), y[:100])
    # record 7 of the first batch, green channel, row 3, column 5, by hand
    raw = x[7, 1024 + 3 * 32 + 5] / 255.0
    expected = (raw - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert torch.isclose(ds.train_x[7, 1, 3, 5], torch.tensor(expected, dtype=torch.float32))
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a whole number of CIFAR-10 binary records"):
        load("cifar10", root=tmp_path / "cifar-10-batches-bin")
    with pytest.raises(FileNotFoundError, match="binary batches"):
        load("cifar10", root=tmp_path)


@pytest.mark.slow
def test_fig4_tiny_on_fake_cifar(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-bin", n=40)
    assert cli("reproduce", "fig4_squeezenet_cifar10", "--quick", "--seeds", "1", "--epochs",
               "1", "--train-size", "64", "--data-root", tmp_path / "cifar-10-batches-bin",
               "--root", tmp_path, "--workers", "1", "--no-progress") == 0  # fmt: skip
    ds = open_result(tmp_path / "fig4_squeezenet_cifar10" / "fig4_squeezenet_cifar10.nc")
    assert {"SGD ε=0.1", "HCGD ε=0.1", "HCGD ε=0.3"} == set(ds.optimizer.values)


@pytest.mark.slow
def test_fisher_vs_l2_quick(tmp_path):
    assert cli("reproduce", "fisher_vs_l2", "--quick", "--epochs", "1", "--root", tmp_path,
               "--no-progress") == 0  # fmt: skip
    ds = open_result(tmp_path / "fisher_vs_l2" / "fisher_vs_l2.nc")
    assert set(ds.metric.values) == {"L2", "Fisher", "Fisher MC", "Empirical Fisher"}
    assert ((ds.overlap >= 0) & (ds.overlap <= 1 + 1e-9)).all()
    assert (tmp_path / "fisher_vs_l2" / "spectra_digits_mlp_small.png").exists()


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("name", ["fig1_mlp_mnist", "fig3_cnn_bn_mnist", "distance_scales"])
def test_analysis_quick_mode(name, tmp_path):
    """The real --quick settings (a few minutes each on 2 cores)."""
    assert cli("reproduce", name, "--quick", "--root", tmp_path, "--no-progress") == 0
    ds = open_result(tmp_path / name / f"{name}.nc")
    for v in SWEEP_VARS:
        assert v in ds
    assert paper.summarize(ds).shape[0] >= 2
