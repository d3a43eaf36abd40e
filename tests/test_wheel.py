"""The wheel alone, as a user gets it: built from a copy of the source tree, installed into a fresh venv with
--no-deps (torch, numpy, ... come from this test environment through a path file that holds only its
site-packages folders, never the source tree), then every shipped workflow that needs no user file is run BY NAME
from an empty folder with the installed `glass-diffusion` command; the one that needs a user checkpoint says which
file to get and where to put it. Also: the README's Python snippet, the LICENSE and the package data in the wheel.

Costs about a minute on 2 idle cores (most of it the workflows' own sampling on the built-in model)."""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from glass_diffusion.nodes.example_workflows import INPUT_IMAGES, USER_FILES, WORKFLOWS

from _nodes_util import saved_pngs

REPO = Path(__file__).resolve().parents[1]
ROOT_SKIP = {".git", ".venv", "build", "dist", "output", "models", "input", ".pytest_cache", ".hypothesis"}


def _source_files() -> list[Path]:
    """The files of the source tree a clone has (tracked and not ignored), relative to the repository."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout.decode()
        files = [Path(f) for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: everything but the usual build output
        files = [p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file()]
    return [f for f in files if f.parts[0] not in ROOT_SKIP and "__pycache__" not in f.parts
            and (REPO / f).is_file()]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("GLASS_DIFFUSION_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(wheel path, venv python, venv bin folder) with the wheel installed and nothing of the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(src)], check=True, env=_clean_env(), timeout=600, cwd=root)
    wheel = next(dist.glob("glass_diffusion-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, env=_clean_env(), timeout=600, cwd=root)
    # the dependencies from this environment: its site-packages folders only (a plain path line does not run the
    # .pth files in them, so an editable install of the source tree there stays inactive)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib, "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours) if Path(p).is_dir()))
    return wheel, python, venv / "bin"


def _run(cmd, cwd, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_license_the_model_the_workflows_and_their_images(wheel_venv):
    wheel, _, _ = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    for name in WORKFLOWS:
        assert f"glass_diffusion/workflows/{name}.json" in names and f"glass_diffusion/workflows/api/{name}.json" in names
    for image in INPUT_IMAGES:
        assert f"glass_diffusion/workflows/input/{image}" in names
    assert "glass_diffusion/sd_core/builtin/glass-tiny.safetensors" in names
    assert not any(n.startswith("glass_diffusion/tests/") for n in names)


def test_the_installed_package_is_the_wheel_not_the_source_tree(wheel_venv, tmp_path):
    _, python, bin_dir = wheel_venv
    r = _run([str(python), "-c", "import glass_diffusion, torch; print(glass_diffusion.__file__)"], tmp_path)
    assert r.returncode == 0, r.stderr
    installed = Path(r.stdout.strip()).resolve()
    assert bin_dir.parent.resolve() in installed.parents and REPO not in installed.parents
    r = _run([str(bin_dir / "glass-diffusion"), "workflows"], tmp_path)
    assert r.returncode == 0, r.stderr
    for name in WORKFLOWS:
        assert name in r.stdout


@pytest.mark.parametrize("name", sorted(set(WORKFLOWS) - set(USER_FILES)))
def test_every_shipped_workflow_runs_by_name_from_an_empty_folder(wheel_venv, tmp_path, name):
    _, _, bin_dir = wheel_venv
    r = _run([str(bin_dir / "glass-diffusion"), "run", name, "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert saved_pngs(tmp_path / "output"), r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]  # nothing needed, nothing else written here


@pytest.mark.parametrize("name", sorted(USER_FILES))
def test_a_workflow_needing_a_user_checkpoint_names_the_file_and_the_folder(wheel_venv, tmp_path, name):
    _, _, bin_dir = wheel_venv
    r = _run([str(bin_dir / "glass-diffusion"), "run", name, "--device", "cpu"], tmp_path)
    assert r.returncode == 2, r.stderr
    for folder, file, _ in USER_FILES[name]:
        assert file in r.stderr and str(tmp_path / "models" / folder) in r.stderr, r.stderr
    assert "get that file and put it there" in r.stderr
    assert not (tmp_path / "output").exists()


def test_the_readme_python_snippet_runs_from_the_wheel(wheel_venv, tmp_path):
    _, python, _ = wheel_venv
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("From Python:\n\n```python\n", 1)[1].split("```", 1)[0]
    assert "run_workflow(" in snippet
    r = _run([str(python), "-c", snippet + "\nprint(sorted(result.ui))"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(saved_pngs(tmp_path / "output")) == 1
