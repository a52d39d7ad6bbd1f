"""Every notebook in notebooks/ runs headless, top to bottom, against a small run trained here, and
saves its pictures. The Colab install cell (tagged "install") is left out."""

import glob
import os

import pytest

from conftest import REPO, small_config

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
# What each notebook must have saved.
FIGURES = {
    "zero_shot_and_retrieval.ipynb": ["zeroshot_grid.png", "similarity_heatmap.png",
                                      "retrieval_gallery.png"],
    "training_curves.ipynb": ["training_curves.png", "eval_curves.png"],
}


@pytest.fixture(scope="module")
def small_run(tiny_world, tmp_path_factory):
  from bigvl.train import loop
  wd = str(tmp_path_factory.mktemp("notebook_run") / "run")
  c = small_config(tiny_world, total_steps=4, checkpoint_every=4)
  with c.unlocked():
    c.evals.zeroshot.every = 2    # two evaluation points for the curves
    c.evals.zeroshot_all.source = ""   # off: the notebooks need one zero-shot and the retrieval
  loop.train(c, wd)
  return wd


def test_every_notebook_is_checked():
  assert sorted(os.path.basename(p) for p in NOTEBOOKS) == sorted(FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_saves_its_figures(path, small_run, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=4)
  install = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
  assert len(install) == 1 and nb.cells.index(install[0]) <= 1, "the install cell comes first"
  nb.cells = [c for c in nb.cells if c not in install]
  out = tmp_path / "figures"
  # The kernel inherits this environment (and XLA_FLAGS' fake devices).
  monkeypatch.setenv("BIGVL_NOTEBOOK_WORKDIR", small_run)
  monkeypatch.setenv("BIGVL_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("BIGVL_NOTEBOOK_SKIP_INSTALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()
  for name in FIGURES[os.path.basename(path)]:
    assert (out / name).stat().st_size > 1000, name
