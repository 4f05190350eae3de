"""gta as a library: a wheel built from this checkout carries the config tree and the experiment files, and,
installed into a fresh virtual environment, trains from an unrelated directory with a method from a package
that only this test has, chosen through the user's own config directory; and an installed package records no
commit of a repository it happens to lie in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import POOL, ROOT, SIZE, SPLIT, VAL, tiny

from gta.tracking.sweep import git_commit

#: a method of the user's: SupOnly under another name, whose one network is called "net"
USER_METHOD = '''
from gta.contract import Method


class LabelsOnly(Method):
    reported = "net"
    uses_unlabeled = False

    def __init__(self, model, ignore_index=255):
        super().__init__()
        self.net = model()
        self.ignore_index = ignore_index

    def trained_models(self):
        return {"net": self.net}

    def evaluated_models(self):
        return {"net": self.net}

    def training_step(self, batch, progress, update):
        loss = self.labeled_loss(self.net, batch)
        update("net", loss)
        return {"net/loss": loss.detach()}
'''

USER_METHOD_CONFIG = """\
_target_: labels_only.LabelsOnly
ignore_index: ${dataset.ignore_index}
"""


def run(*command: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``command`` without this checkout on the path: only what is installed, and ``env``."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GTA_DATA", "GTA_TRACKING_URI")}
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**environment, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}:\n" \
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (a build writes build/ and *.egg-info where it runs)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("gta", "conf", "experiments", "docs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source,
        cwd=source)  # fmt: skip
    (built,) = dist.glob("gta-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_the_config_tree_and_the_experiments(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("gta/conf/")}
    conf = {f"gta/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    experiments = {f"gta/conf/experiment/{p.relative_to(ROOT / 'experiments').as_posix()}"
                   for p in (ROOT / "experiments").rglob("*.yaml")}  # fmt: skip
    assert "gta/conf/train.yaml" in conf and "gta/conf/experiment/table4.yaml" in experiments
    assert packaged == conf | experiments


@pytest.mark.slow
def test_the_wheel_carries_the_documentation(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("gta/docs/")}
    assert packaged == {f"gta/docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} and "gta/docs/extending.md" in packaged


@pytest.mark.slow
def test_an_installed_gta_trains_a_users_method_from_any_directory(wheel, tmp_path):
    # A fresh environment that reuses the installed dependencies: their site-packages joins its path.
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout
                .strip())  # fmt: skip
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel, cwd=tmp_path)
    found = run(python, "-c", "import gta; print(gta.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(found).is_relative_to(site), found

    # The user's package and config directory, and a directory that has nothing to do with either.
    user = tmp_path / "user"
    (user / "src" / "labels_only").mkdir(parents=True)
    (user / "src" / "labels_only" / "__init__.py").write_text(USER_METHOD)
    (user / "conf" / "method").mkdir(parents=True)
    (user / "conf" / "method" / "labels_only.yaml").write_text(USER_METHOD_CONFIG)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    small = [f"dataset.num_labeled_pool={POOL}", "dataset.num_unlabeled=0", f"dataset.num_val={VAL}",
             f"dataset.image_size={SIZE}", f"split={SPLIT}", f"data.val_batch_size={VAL}", *tiny()]  # fmt: skip
    done = run(env / "bin" / "gta", "train", "--config-dir", user / "conf", "method=labels_only", *small,
               "hydra.run.dir=outputs/run", cwd=elsewhere, PYTHONPATH=str(user / "src"))  # fmt: skip
    assert "LabelsOnly on SyntheticShapes" in done.stdout and "val mIoU net" in done.stdout, done.stdout
    # data and run files where the command ran
    assert (elsewhere / "data" / "synthetic").is_dir() and (elsewhere / "outputs" / "run" / "net.pt").is_file()

    done = run(python, "-m", "gta", "eval", "checkpoint=outputs/run/net.pt",
               "hydra.run.dir=outputs/eval", cwd=elsewhere, PYTHONPATH=str(user / "src"))  # fmt: skip
    assert "mIoU" in done.stdout, done.stdout


def test_a_sweep_records_the_commit_of_a_checkout_and_none_for_a_package_inside_another_repository(tmp_path):
    """A virtual environment often lies inside the user's own repository: its commit is not gta's."""
    repository = tmp_path / "project"
    git = ["git", "-C", str(repository), "-c", "user.name=gta", "-c", "user.email=gta@localhost"]
    subprocess.run(["git", "init", "-q", str(repository)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    site_packages = repository / ".venv" / "lib" / "site-packages"
    site_packages.mkdir(parents=True)
    assert git_commit(repository) == head
    assert git_commit(site_packages) == "unknown"
