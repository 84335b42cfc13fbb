"""The wheel ships the bundled model: built from this checkout and installed into a fresh venv (its
dependencies borrowed from the test environment's site-packages through a .pth line, so nothing is
downloaded but the build backend), `twotower generate` works with no --model, from outside the
source tree."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}: {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def test_wheel_ships_the_bundled_model_and_generates_from_a_fresh_venv(tmp_path):
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path / "dist"),
         cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("twotower-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert f"twotower/models/twotower-tiny/{f}" in names, f
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    py = venv / "bin" / "python"
    own = Path(_run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
               .stdout.strip())  # fmt: skip
    (own / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # after the venv's own
    _run(str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    out = _run(str(py), "-c", "import sys; from twotower.cluster.cli import main; "
               "sys.exit(main(['generate', 'def f(', '--max-tokens', '16', '--mode', 'ar', '--threads', '1']))",
               cwd=tmp_path)  # fmt: skip
    assert "tokens=16 finish=length" in out.stderr and out.stdout.strip(), out.stderr[-2000:]
    where = _run(str(py), "-c", "import twotower.cluster.engine.loading as m; print(m.BUNDLED_MODEL)", cwd=tmp_path)
    assert where.stdout.strip() == str(own / "twotower" / "models" / "twotower-tiny")


def test_the_image_build_context_has_every_file_the_dockerfile_copies():
    """Every COPY source of the Dockerfile exists and survives .dockerignore (docker has no other way to
    tell: a source the ignore file drops fails the build with "not found"), and the package folder
    copied is the one setuptools packages."""
    import fnmatch

    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]  # fmt: skip
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert "twotower" in sources and "pyproject.toml" in sources, sources
    for src in sources:
        assert (ROOT / src).exists(), src
        hits = [pat for pat in ignored if fnmatch.fnmatch(src, pat) or fnmatch.fnmatch(src.split("/")[0], pat)]
        assert not hits, f"{src} is copied by the Dockerfile but dropped by .dockerignore {hits}"
