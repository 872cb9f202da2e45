"""The wheel ships every package of the repository (a subpackage missing from
pyproject.toml installs without error and fails only at import)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / config.get("package-dir", {}).get(name, name.replace(".", "/"))
               for name in config["packages"]}
    listed = {folder.resolve() for folder in folders.values()}
    found = {init.parent.resolve() for top in ("ppl_vae", "models", "guides")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages"
