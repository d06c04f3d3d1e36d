"""DICOM and Slicer codes of the vocabulary's concepts: SEG segment descriptions, Slicer
terminology strings, and how a segment over some anatomies is named, coded and coloured."""

from __future__ import annotations

from typing import Optional, Sequence

from . import vocabulary as V
from .errors import CTLanguageError


def _codes(key: str, laterality: Optional[str]):
    """(category, type, type modifier, region, region modifier) Code objects (or None).
    A finding without an authoritative type code gets the generic fallback type (Lesion)."""
    V._check_laterality(laterality)
    t = V.get(key)
    mods = V._load()[2]
    side = t.side if t.kind == "anatomy" else (laterality if t.sided else None)
    if t.kind == "anatomy" and laterality in V.SIDES and t.side and laterality != t.side:
        raise V.VocabularyError(f"'{key}' is on the {t.side}, not the {laterality}.")
    side_code = mods.get(side) if side in V.LATERALITIES else None   # bilateral: SCT 51440002
    if t.kind == "anatomy" and t.region is not None:   # e.g. a cyst of the left kidney
        return t.category, t.type, None, t.region, side_code
    if t.kind == "anatomy":
        # a structure's side is a type modifier, except where the type already says it
        modifier = None if (side_code and t.type.meaning and side in t.type.meaning.lower()) else side_code
        return t.category, t.type, modifier, None, None
    typ = t.type if t.type.known else mods["_fallback_type"]
    return t.category, typ, t.type_modifier, t.region, side_code


def code_notes(key: str) -> list:
    """Caveats recorded for a term's codes (missing or approximate codes)."""
    t = V.get(key)
    return [c.note for c in (t.category, t.type, t.region, t.type_modifier) if c is not None and c.note]


def slicer_terminology_string(key: str, laterality: Optional[str] = None) -> str:
    """Slicer terminology entry string (vtkSlicerTerminologiesModuleLogic format):
    context~category~type~typeModifier~regionContext~region~regionModifier, codes as SCT^value^meaning."""
    ctx = V._load()[3]
    cat, typ, mod, region, region_mod = _codes(key, laterality)
    parts = [ctx["category_context"], cat.slicer(), typ.slicer(), mod.slicer() if mod else "^^",
             ctx["region_context"], region.slicer() if region else "^^",
             region_mod.slicer() if region_mod else "^^"]
    return "~".join(parts)


def dicom_seg_codes(key: str, laterality: Optional[str] = None) -> dict:
    """Codes for a DICOM SEG segment description, as (value, scheme, meaning) triples or None:
    {"category", "type", "type_modifier", "anatomic_region", "anatomic_region_modifier",
     "complete": bool, "notes": [str]}. Where no authoritative type code is known the type is
    the generic fallback (SCT 52988006 Lesion) and ``complete`` is False; keep the display name
    as the segment label then."""
    cat, typ, mod, region, region_mod = _codes(key, laterality)
    tri = lambda c: c.triple() if (c is not None and c.known) else None  # noqa: E731
    return {"category": tri(cat), "type": tri(typ), "type_modifier": tri(mod),
            "anatomic_region": tri(region), "anatomic_region_modifier": tri(region_mod),
            "complete": bool(cat.known and V.get(key).type.known), "notes": code_notes(key)}


_BILATERAL_CODE = ("51440002", "SCT", "Bilateral")


def segment_identity(kind: str, key: str, covers: Sequence[str], laterality: Optional[str]) -> dict:
    """How a segment for concept ``key`` over the anatomies ``covers`` is named and coded:
    {"anatomy" (key or group name), "laterality", "color", "codes" (DICOM SEG, None when
    unknown), "terminology" (Slicer string, None when unknown)}."""

    def safe(fn):
        try:
            return fn()
        except CTLanguageError:
            return None

    covers = tuple(covers)
    groups_ = {V.get(a).group for a in covers if V.get(a).kind == "anatomy"}
    if len(covers) == 1:
        anatomy = covers[0]
    else:
        anatomy = next(iter(groups_)) if len(groups_) == 1 and None not in groups_ else "+".join(covers)
    if kind == "anatomy":
        codes = safe(lambda: dicom_seg_codes(key))
        if len(covers) > 1 and codes:
            codes = dict(codes, type_modifier=_BILATERAL_CODE)
        if laterality is None and len(covers) == 1:
            laterality = V.get(key).side
        term = safe(lambda: slicer_terminology_string(key))
    else:
        lat = laterality if laterality in ("left", "right", "bilateral") else None
        codes = safe(lambda: dicom_seg_codes(key, lat))
        term = safe(lambda: slicer_terminology_string(key, lat))
    return {"anatomy": anatomy, "laterality": laterality, "color": tuple(int(c) for c in V.color(key)),
            "codes": codes, "terminology": term}
