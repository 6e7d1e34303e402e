"""The notebooks run top to bottom with small settings (FSGEOM_NB_SMALL=1), so they cannot rot.

Each notebook is executed by nbclient in a python3 kernel (one kernel for the module, its
namespace cleared before each notebook); an injected first cell checks that the kernel runs
in this interpreter's environment (the project's venv). A notebook whose fsgeom modules do
not exist yet is skipped with the reason.
"""

import importlib
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# notebook -> (module, attribute or None) it needs
NEEDS = {
    "01_quickstart.ipynb": [("fsgeom.tracking", "Tracker"), ("fsgeom.plotting", None)],
    "02_csdt_any_optimizer.ipynb": [("fsgeom.tracking", "combine"), ("fsgeom.optim", "HCGD")],
    "03_fisher_vs_l2.ipynb": [
        ("fsgeom.curvature", "L2Metric"),
        ("fsgeom.curvature", "Fisher"),
        ("fsgeom.curvature", "EmpiricalFisher"),
    ],
}


def missing_requirement(name: str) -> str | None:
    for module, attr in NEEDS.get(name, []):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            return f"{name} needs {module}, which cannot be imported yet ({e})"
        if attr is not None and not hasattr(mod, attr):
            return f"{name} needs {module}.{attr}, which does not exist yet"
    return None


def test_every_notebook_is_listed_and_stored_without_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(NEEDS)
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        first = code[0]
        assert "parameters" in first.metadata.get("tags", []), name
        assert "FSGEOM_NB_SMALL" in first.source, name


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One python3 kernel shared by the notebooks of this module (imports are paid once).

    Each notebook starts with an injected cell that clears the user namespace
    (``%reset -f``), closes figures and checks the kernel runs in this interpreter's
    environment, so a notebook cannot lean on names another one defined.
    """
    from nbclient.util import run_sync

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSGEOM_NB_SMALL", "1")
        mp.setenv("MPLBACKEND", "Agg")
        km = nbclient.NotebookClient(nbformat.v4.new_notebook()).create_kernel_manager()
        run_sync(km.start_kernel)(cwd=str(tmp_path_factory.mktemp("notebooks")))
    try:
        yield km
    finally:
        run_sync(km.shutdown_kernel)(now=True)


PRELUDE = f"""\
get_ipython().run_line_magic("reset", "-f")
import sys

import matplotlib.pyplot as plt

plt.close("all")
assert sys.prefix == {sys.prefix!r}, f"kernel runs in {{sys.prefix}}, not the test environment"
"""


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_notebook_runs(name, kernel):
    reason = missing_requirement(name)
    if reason:
        pytest.skip(reason)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PRELUDE))
    client = nbclient.NotebookClient(nb, km=kernel, timeout=180, kernel_name="python3")
    start = time.perf_counter()
    client.execute()
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors  # nbclient raises on the first error; this guards allow_errors configs
