"""Python dependencies of the engine inside 3D Slicer.

* torch only through the PyTorch extension (``PyTorchUtils``), declared in EXTENSION_DEPENDS;
  never ``pip install torch`` (the wrong index gives a CPU-only or mismatched CUDA build).
* everything else from ``Resources/requirements.txt`` through ``slicer.pydeps.pip_ensure``
  (Slicer >= 5.11; ``slicer.packaging.pip_ensure`` on builds that used that name) or
  ``slicer.util.pip_install`` on older Slicer, always after asking the user, and always with a
  constraints file that pins Slicer's own packages (numpy, SimpleITK, vtk, ...) to the versions
  already installed, so they are never replaced.
* lines marked ``# no-deps`` are installed with ``--no-deps``.

The pure functions (parsing, what is missing, constraints text) are tested with pytest; the
functions that talk to the Slicer application import ``slicer``/``qt`` lazily.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
REQUESTER = "CTLanguage"
TORCH_REQUIREMENT = "torch>=2.2"

# Packages Slicer ships itself: pinned to the installed version, never upgraded or replaced.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "vtk", "pydicom", "packaging", "requests", "PythonQt",
                      "torch", "torchvision", "dicomweb-client", "urllib3", "certifi")

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class Requirement:
    line: str          # the requirement as pip reads it, e.g. "monai>=1.4"
    name: str          # distribution name, e.g. "monai"
    no_deps: bool = False


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[Requirement]:
    reqs = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        no_deps = "# no-deps" in raw
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _NAME_RE.match(line)
        if not m:
            raise ValueError(f"Cannot parse requirement line {raw!r} in {path}.")
        reqs.append(Requirement(line=line, name=m.group(1), no_deps=no_deps))
    protected = {normalize(p) for p in PROTECTED_PACKAGES}
    bad = [r.name for r in reqs if normalize(r.name) in protected]
    if bad:
        raise ValueError(f"{path} must not list packages that Slicer provides: {', '.join(bad)}.")
    return reqs


def _satisfied(req: Requirement, version_of) -> bool:
    try:
        installed = version_of(req.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    spec = req.line[len(req.name):].strip()
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(installed) in SpecifierSet(spec)
    except Exception:  # packaging missing or odd version string: presence is enough
        return True


def missing_requirements(reqs: list[Requirement] | None = None,
                         version_of=importlib.metadata.version) -> list[Requirement]:
    reqs = read_requirements() if reqs is None else reqs
    return [r for r in reqs if not _satisfied(r, version_of)]


def constraints_text(version_of=importlib.metadata.version) -> str:
    """``name==installed`` for every protected package that is installed."""
    lines = []
    for name in PROTECTED_PACKAGES:
        try:
            lines.append(f"{name}=={version_of(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def write_constraints_file(folder: str | os.PathLike | None = None, version_of=importlib.metadata.version) -> str:
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="ctlanguage-pip-"))
    path = folder / "constraints.txt"
    path.write_text(constraints_text(version_of), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# inside Slicer
# ------------------------------------------------------------------------------------------------

def torch_available() -> bool:
    try:
        importlib.metadata.version("torch")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_torch(ask: bool = True) -> bool:
    """Install torch through the PyTorch extension. Returns True when torch is importable."""
    if torch_available():
        return True
    try:
        import PyTorchUtils
    except ImportError:
        raise ValueError("CTLanguage needs the 'PyTorch' extension: install it from the Extensions Manager "
                         "and restart Slicer.") from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        torch = torch_logic.installTorch(askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
        if torch is None:
            raise ValueError("PyTorch is required; installation was cancelled or failed (see the Python console).")
    return True


def _pip_ensure_function():
    for modname in ("slicer.pydeps", "slicer.packaging"):
        try:
            mod = __import__(modname, fromlist=["pip_ensure"])
        except ImportError:
            continue
        fn = getattr(mod, "pip_ensure", None)
        if fn is not None:
            return mod, fn
    return None, None


def install_requirements(reqs: list[Requirement], constraints: str) -> None:
    """Install ``reqs`` in Slicer's Python with ``constraints`` (blocking)."""
    import slicer

    normal = [r for r in reqs if not r.no_deps]
    no_deps = [r for r in reqs if r.no_deps]
    mod, pip_ensure = _pip_ensure_function()
    if normal:
        if pip_ensure is not None:
            from packaging.requirements import Requirement as PackagingRequirement

            pip_ensure([PackagingRequirement(r.line) for r in normal], constraints=constraints, requester=REQUESTER)
        else:
            # list form: no shell quoting issues with '>=' or spaces in the constraints path
            slicer.util.pip_install([r.line for r in normal] + ["-c", constraints])
    for r in no_deps:
        slicer.util.pip_install(["--no-deps", r.line])


def ensure_dependencies(ask: bool = True, confirm=None) -> bool:
    """Make torch and the requirements available. ``confirm(text) -> bool`` asks the user
    (default: a Slicer OK/Cancel dialog). Returns True when everything is present."""
    ensure_torch(ask=ask)
    missing = missing_requirements()
    if not missing:
        return True
    if ask:
        if confirm is None:
            import slicer

            confirm = slicer.util.confirmOkCancelDisplay
        names = ", ".join(r.line for r in missing)
        text = (f"CTLanguage needs these Python packages: {names}.\n\nInstall them now? "
                "(A few hundred MB; Slicer's own numpy, SimpleITK and VTK are kept as they are.)")
        if not confirm(text):
            raise ValueError("The CTLanguage engine cannot run without its Python packages.")
    constraints = write_constraints_file()
    install_requirements(missing, constraints)
    still = missing_requirements()
    if still:
        raise ValueError("Could not install: " + ", ".join(r.line for r in still)
                         + ". See the Python console; behind a proxy set HTTPS_PROXY before starting Slicer.")
    return True
