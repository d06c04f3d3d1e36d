"""Build hook: the wheel carries the embedded model and the catalog.

They live in <repo>/Resources, where the Slicer extension's CMake install also takes them from;
``build_py`` copies them into ``ctlanguage/_resources`` inside the wheel (an editable install
finds them in the repository instead, see ctlanguage/resources.py). Everything else is in
pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RESOURCES = ROOT / "Resources"
PACKAGED = ("ctlanguage", "_resources")  # the same name as ctlanguage/resources.py looks for


class build_py_with_resources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (RESOURCES / "catalog.json").is_file():
            raise SystemExit(f"{RESOURCES}/catalog.json is missing: the wheel would have no model")
        dest = Path(self.build_lib).joinpath(*PACKAGED)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copy2(RESOURCES / "catalog.json", dest / "catalog.json")
        shutil.copytree(RESOURCES / "Models", dest / "Models",
                        ignore=shutil.ignore_patterns("*.tmp", "*.part", ".*"))


setup(cmdclass={"build_py": build_py_with_resources})
