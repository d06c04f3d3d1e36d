"""The extension's metadata agrees everywhere: top-level CMakeLists.txt (EXTENSION_*),
ExtensionDescription.s4ext (legacy description) and CTLanguage.json (current Extensions Index
catalog entry, schema v1.0.1 with additionalProperties false). Also checks what the Extensions
Index checks offline: license file, icon (128x128 PNG) and screenshot files that the URLs point to.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
SCHEMA_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
RAW_PREFIX_RE = re.compile(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$")


def cmake_vars() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r'set\(\s*(EXTENSION_[A-Z]+)\s+"((?:[^"\\]|\\.)*)"\s*\)', text):
        out[m.group(1)] = m.group(2).replace('\\"', '"')
    return out


def s4ext() -> dict[str, str]:
    out = {}
    for line in (ROOT / "ExtensionDescription.s4ext").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def catalog_entry() -> dict:
    return json.loads((ROOT / "CTLanguage.json").read_text(encoding="utf-8"))


def cmake_list(value: str) -> list[str]:
    return [] if value.strip() in ("", "NA") else re.split(r"[;\s]+", value.strip())


def repo_path_of(url: str) -> Path:
    m = RAW_PREFIX_RE.match(url)
    assert m, f"{url} is not a raw.githubusercontent.com URL into this repository"
    return ROOT / m.group(1)


def test_cmake_declares_a_slicer_extension():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(CTLanguage\)", text, re.M)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(CTLanguage)" in text
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text
    v = cmake_vars()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert v.get(f"EXTENSION_{key}"), f"EXTENSION_{key} missing or empty"
    assert cmake_list(v["EXTENSION_DEPENDS"]) == ["PyTorch"]
    # embedded model and catalog are installed with the extension
    assert "Resources/Models" in text and "catalog.json" in text and "install(" in text


def test_s4ext_matches_cmake():
    v, s = cmake_vars(), s4ext()
    assert s["homepage"] == v["EXTENSION_HOMEPAGE"]
    assert s["category"] == v["EXTENSION_CATEGORY"]
    assert s["contributors"] == v["EXTENSION_CONTRIBUTORS"]
    assert s["description"] == v["EXTENSION_DESCRIPTION"]
    assert s["iconurl"] == v["EXTENSION_ICONURL"]
    assert s["screenshoturls"].split() == v["EXTENSION_SCREENSHOTURLS"].split()
    assert s["depends"].split() == cmake_list(v["EXTENSION_DEPENDS"])
    assert s["scm"] == "git"
    assert s["scmurl"].removesuffix(".git") == v["EXTENSION_HOMEPAGE"]
    assert s.get("build_subdirectory", ".") == "."


def test_catalog_json_follows_the_schema_and_matches_cmake():
    e, v, s = catalog_entry(), cmake_vars(), s4ext()
    assert e["$schema"] == SCHEMA_URL
    assert set(e) <= SCHEMA_KEYS, f"keys not allowed by the schema: {set(e) - SCHEMA_KEYS}"
    assert {"$schema", "category", "scm_url"} <= set(e)
    assert e["category"] == v["EXTENSION_CATEGORY"]
    assert e["build_dependencies"] == cmake_list(v["EXTENSION_DEPENDS"])
    assert e["scm_url"] == s["scmurl"]
    assert e["scm_url"].removesuffix(".git") == v["EXTENSION_HOMEPAGE"]
    assert e.get("scm_revision", "main") == s["scmrevision"]
    assert e.get("scm_type", "git") in ("git", "local")
    assert e.get("build_subdirectory", ".") == "."
    assert e.get("tier", 5) in (1, 3, 5)


def test_module_category_and_docs_link_agree_with_the_extension():
    v = cmake_vars()
    src = (ROOT / "CTLanguage" / "CTLanguage.py").read_text(encoding="utf-8")
    tree = ast.parse(src)
    cats = None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "categories"):
            cats = ast.literal_eval(node.value)
    assert cats and v["EXTENSION_CATEGORY"] in cats
    docs = re.search(r'DOCS_URL = "([^"]+)"', src).group(1)
    assert docs.startswith(v["EXTENSION_HOMEPAGE"] + "/")
    assert (ROOT / docs.split("/blob/main/", 1)[1]).is_file()


def test_icon_is_a_128_png_at_the_icon_url():
    from PIL import Image

    path = repo_path_of(cmake_vars()["EXTENSION_ICONURL"])
    assert path == ROOT / "CTLanguage" / "Resources" / "Icons" / "CTLanguage.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (128, 128)


def test_screenshot_urls_point_to_files_in_the_repository():
    from PIL import Image

    urls = cmake_vars()["EXTENSION_SCREENSHOTURLS"].split()
    assert urls
    for url in urls:
        path = repo_path_of(url)
        if not path.is_file():
            pytest.fail(f"screenshot {path.relative_to(ROOT)} referenced by EXTENSION_SCREENSHOTURLS is missing")
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 256


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                    "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                    "9. Accepting Warranty or Additional Liability."):
        assert section in text, section
