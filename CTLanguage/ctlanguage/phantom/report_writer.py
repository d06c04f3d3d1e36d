"""Generated radiology reports (FINDINGS + IMPRESSION) for phantom cases.

Wording is drawn from the tables below (``PHRASES``, ``NORMALS``, templates in the writers), with
measurements read from the finding masks.  :func:`phrasings_used` lists every noun phrase a report
may use for each finding, so that evaluation can use phrasings that never occur in training
reports (e.g. lay wording such as "fluid around the lung" is deliberately absent here).
"""

from __future__ import annotations

import numpy as np

# noun phrases per finding (singular); the first entry is the canonical one
PHRASES = {
    "lung_nodule": ["pulmonary nodule", "lung nodule", "nodule", "solid nodule"],
    "lung_mass": ["pulmonary mass", "lung mass", "mass lesion", "soft tissue mass"],
    "pleural_effusion": ["pleural effusion", "effusion", "pleural fluid collection"],
    "emphysema": ["emphysema", "emphysematous change", "emphysematous destruction"],
    "consolidation": ["consolidation", "airspace consolidation", "airspace opacity"],
    "atelectasis": ["atelectasis", "subsegmental atelectasis", "collapse"],
    "cardiomegaly": ["cardiomegaly", "enlarged heart", "enlargement of the cardiac silhouette"],
    "pericardial_effusion": ["pericardial effusion", "pericardial fluid"],
    "aortic_aneurysm": ["aortic aneurysm", "aneurysmal dilatation of the aorta", "aneurysm"],
    "arterial_calcification": ["atherosclerotic calcification", "aortic calcification", "calcified atherosclerotic plaque"],
    "liver_lesion": ["hepatic lesion", "liver lesion", "focal hepatic lesion", "hepatic mass"],
    "liver_cyst": ["hepatic cyst", "liver cyst", "simple cyst"],
    "steatosis": ["hepatic steatosis", "fatty infiltration of the liver", "fatty liver"],
    "hepatomegaly": ["hepatomegaly", "enlarged liver"],
    "splenomegaly": ["splenomegaly", "enlarged spleen"],
    "kidney_cyst": ["renal cyst", "kidney cyst", "simple renal cyst", "cortical cyst"],
    "kidney_stone": ["renal calculus", "nephrolithiasis", "kidney stone", "non-obstructing renal calculus"],
    "ascites": ["ascites", "free intraperitoneal fluid", "peritoneal fluid"],
    "lymphadenopathy": ["mediastinal lymphadenopathy", "enlarged mediastinal lymph nodes", "lymph node enlargement"],
    "gallstone": ["cholelithiasis", "gallstone", "calculus in the gallbladder"],
}

NORMALS = {
    "lungs": ["The lungs are clear.", "No focal consolidation, mass or suspicious nodule is seen in either lung.",
              "The lungs are well aerated without focal opacity.", "Lung parenchyma is unremarkable."],
    "lung_bases": ["The visualized lung bases are clear.", "No consolidation or nodule at the lung bases."],
    "emphysema": ["No emphysema.", "There is no emphysematous change."],
    "pleura": ["No pleural effusion.", "There is no pleural effusion or pneumothorax.", "The pleural spaces are clear."],
    "heart": ["The heart is normal in size.", "Heart size is within normal limits.", "No cardiomegaly."],
    "pericardium": ["No pericardial effusion.", "The pericardium is unremarkable."],
    "aorta": ["The aorta is normal in caliber.", "Normal caliber of the thoracic and abdominal aorta.",
              "No aortic aneurysm."],
    "calcification": ["No significant atherosclerotic calcification.", "No vascular calcification is seen."],
    "nodes": ["No mediastinal or hilar lymphadenopathy.", "There are no enlarged lymph nodes in the mediastinum.",
              "Mediastinal lymph nodes are not enlarged."],
    "liver": ["The liver is normal in size and attenuation.", "The liver is unremarkable without focal lesion.",
              "Normal liver size and parenchymal density, no focal hepatic lesion."],
    "gallbladder": ["The gallbladder is unremarkable.", "No gallstones.", "The gallbladder is normal without calculi."],
    "spleen": ["The spleen is normal in size.", "The spleen is unremarkable.", "No splenomegaly."],
    "kidneys": ["The kidneys are unremarkable.", "No renal cysts or calculi.", "Both kidneys are normal without stones or hydronephrosis."],
    "pancreas": ["The pancreas is unremarkable.", "Normal pancreas."],
    "peritoneum": ["No ascites.", "There is no free fluid in the abdomen.", "No free intraperitoneal fluid."],
    "bones": ["No aggressive osseous lesion.", "The visualized bones are unremarkable.", "No acute osseous abnormality."],
}
# incidental calcifications (calcification.py): named in FINDINGS, never a finding label.
# {kind: (sentences for one focus, sentences for several)}; {n}, {lobe}, {side} are filled in.
INCIDENTAL = {
    "lung_granuloma": (["A calcified granuloma in the {lobe}.", "Small calcified granuloma in the {lobe}, benign."],
                       ["{n} calcified granulomas in the {side} lung, benign.", "Scattered calcified granulomas in the {side} lung."]),
    "spleen_granuloma": (["A punctate calcified granuloma in the spleen."],
                         ["Punctate splenic calcifications, consistent with old granulomatous disease.",
                          "Calcified granulomas in the spleen."]),
    "liver_granuloma": (["A punctate calcified granuloma in the liver.", "Small hepatic calcification, likely a calcified granuloma."],
                        ["A few punctate hepatic calcifications (calcified granulomas)."]),
    "coronary": (["Coronary artery calcification."], ["Coronary artery calcification.", "Calcification of the coronary arteries."]),
}
INCIDENTAL_SECTION = {"lung_granuloma": "LUNGS AND PLEURA", "spleen_granuloma": "ABDOMEN", "liver_granuloma": "ABDOMEN",
                      "coronary": "HEART AND MEDIASTINUM"}
UNCERTAIN = ["possible", "probable", "suspected", "likely"]
UNCERTAIN_TAIL = ["cannot be excluded", "is not excluded", "is suspected"]

LOBE_TEXT = {
    "lung_upper_lobe_left": "left upper lobe", "lung_lower_lobe_left": "left lower lobe",
    "lung_upper_lobe_right": "right upper lobe", "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
}


def phrasings_used() -> dict:
    """Every noun phrase and normal sentence the generator can emit (for held-out evaluation)."""
    return {"findings": {k: list(v) for k, v in PHRASES.items()}, "normals": {k: list(v) for k, v in NORMALS.items()},
            "uncertainty": UNCERTAIN + UNCERTAIN_TAIL,
            "incidental": {k: list(one) + list(many) for k, (one, many) in INCIDENTAL.items()}}


def _size(mm: float, rng) -> str:
    if mm >= 30 and rng.random() < 0.6:
        return f"{mm / 10:.1f} cm"
    return f"{mm:.0f} mm"


def _count_word(n: int) -> str:
    return {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class _Writer:
    def __init__(self, rng):
        self.rng = rng

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def noun(self, name):
        ph = PHRASES[name]
        return ph[0] if self.rng.random() < 0.5 else self.pick(ph)

    def hedge(self, sentence_noun: str) -> str | None:
        """Occasionally an uncertain phrasing."""
        if self.rng.random() < 0.12:
            return sentence_noun
        return None


def write_report(findings, visible: set, rng: np.random.Generator, contrast: bool, fov: str = "chest_abdomen",
                 phase: str | None = None, incidental: dict | None = None) -> str:
    """Compose the report text. ``visible``: structure names present in the field of view;
    ``phase``: contrast phase named in the technique line (None: not named); ``incidental``:
    {kind: info} of calcifications placed by calcification.calcify (None: none)."""
    w = _Writer(rng)
    by = {}
    for f in findings:
        by.setdefault(f.name, []).append(f)
    lines: dict[str, list[str]] = {k: [] for k in ("LUNGS AND PLEURA", "HEART AND MEDIASTINUM", "VESSELS",
                                                   "ABDOMEN", "BONES")}
    impression: list[str] = []
    thorax = any(n.startswith("lung_") for n in visible)
    abdomen = "liver" in visible or "kidney_left" in visible or "kidney_right" in visible
    partial_chest = fov == "abdomen"  # only the lung bases / lower heart are in the field of view

    def hedged(noun, loc, sentence, imp):
        """Occasionally replace a finding's sentence by an uncertain one (label stays positive)."""
        if rng.random() < 0.1:
            u = w.pick(UNCERTAIN)
            sentence = w.pick([f"{_cap(u)} {noun}{loc}.", f"{_cap(noun)}{loc} {w.pick(UNCERTAIN_TAIL)}."])
            imp = f"{_cap(u)} {noun}{loc}."
        return sentence, imp

    L = lines["LUNGS AND PLEURA"]
    for f in by.get("lung_nodule", []):
        n, lobe, size = f.info.get("count", 1), LOBE_TEXT.get(f.info.get("lobe"), f"{f.laterality} lung"), _size(f.info["largest_mm"], rng)
        noun = w.noun("lung_nodule")
        if f.info.get("ground_glass"):
            noun = "ground-glass nodule"
        if n == 1:
            s = w.pick([f"There is a {size} {noun} in the {lobe}.", f"A {noun} measuring {size} is present in the {lobe}.",
                        f"{_cap(lobe)}: {size} {noun}."])
        else:
            s = w.pick([f"{_cap(_count_word(n))} {noun}s are seen in the {f.laterality} lung, the largest measuring {size} in the {lobe}.",
                        f"Multiple ({n}) {noun}s in the {f.laterality} lung, largest {size} ({lobe})."])
        imp = f"{_cap(noun)} in the {lobe} ({size})" + (", follow-up recommended." if f.info["largest_mm"] < 8 else ".")
        s, imp = hedged(noun, f" in the {lobe}", s, imp)
        L.append(s)
        impression.append(imp)
    for f in by.get("lung_mass", []):
        lobe, size = LOBE_TEXT.get(f.info.get("lobe"), f"{f.laterality} lung"), _size(f.info["largest_mm"], rng)
        noun = w.noun("lung_mass")
        L.append(w.pick([f"There is a {size} {noun} in the {lobe}.", f"A lobulated {noun} measuring {size} occupies the {lobe}.",
                         f"{_cap(lobe)} {noun} measuring {size}."]))
        impression.append(w.pick([f"{_cap(lobe)} {noun} ({size}), suspicious for malignancy.", f"{_cap(noun)} in the {lobe}, {size}."]))
    for f in by.get("consolidation", []):
        lobe = LOBE_TEXT.get(f.info.get("lobe"), f"{f.laterality} lung")
        noun = w.noun("consolidation")
        extra = " with air bronchograms" if f.info.get("bronchograms") and rng.random() < 0.7 else ""
        kind = "Lobar" if f.info.get("lobar") else w.pick(["Patchy", "Segmental", "Focal"])
        s = f"{kind} {noun} in the {lobe}{extra}."
        imp = w.pick([f"{_cap(noun)} in the {lobe}, compatible with pneumonia in the appropriate clinical setting.",
                      f"{_cap(lobe)} {noun}."])
        s, imp = hedged(noun, f" in the {lobe}", s, imp)
        L.append(s)
        impression.append(imp)
    for f in by.get("atelectasis", []):
        lobe = LOBE_TEXT.get(f.info.get("lobe"), f"{f.laterality} lung")
        noun = w.noun("atelectasis")
        if f.info.get("kind") == "compressive":
            L.append(w.pick([f"Compressive {noun} of the adjacent {lobe}.", f"Passive {noun} in the {lobe} adjacent to the effusion."]))
        else:
            L.append(w.pick([f"Plate-like {noun} in the {lobe}.", f"Linear band of {noun} in the {lobe}."]))
        impression.append(f"{_cap(noun)} in the {lobe}.")
    emph = by.get("emphysema", [])
    if emph:
        sides = sorted({f.laterality for f in emph})
        where = "both lungs" if len(sides) == 2 else f"the {sides[0]} lung"
        kind, sev = emph[0].info.get("kind", "centrilobular"), emph[0].info.get("severity", "mild")
        zone = "upper lobe predominant" if kind == "centrilobular" else "lower lobe predominant"
        noun = w.noun("emphysema")
        L.append(w.pick([f"{_cap(sev)} {kind} {noun} in {where}, {zone}.", f"There is {sev} {zone} {noun} involving {where}."]))
        impression.append(f"{_cap(sev)} {noun}.")
    elif thorax:
        if rng.random() < 0.5:
            L.append(w.pick(NORMALS["emphysema"]))
    if thorax and not any(k in by for k in ("lung_nodule", "lung_mass", "consolidation", "atelectasis")):
        L.insert(0, w.pick(NORMALS["lung_bases"] if partial_chest else NORMALS["lungs"]))
    eff = by.get("pleural_effusion", [])
    if eff:
        for f in eff:
            v = f.volume_ml
            sz = "small" if v < 150 else ("moderate" if v < 600 else "large")
            noun = w.noun("pleural_effusion")
            if noun == "effusion" or noun == "pleural fluid collection":
                s = f"{_cap(sz)} {f.laterality} {noun if noun != 'effusion' else 'pleural effusion'}."
            else:
                s = w.pick([f"{_cap(sz)} {f.laterality} {noun}.", f"There is a {sz} {f.laterality}-sided {noun} (approximately {v:.0f} ml)."])
            L.append(s)
            impression.append(f"{_cap(sz)} {f.laterality} {PHRASES['pleural_effusion'][0]}.")
    elif thorax:
        L.append(w.pick(NORMALS["pleura"]))

    H = lines["HEART AND MEDIASTINUM"]
    if "heart" in visible:
        if "cardiomegaly" in by:
            noun = w.noun("cardiomegaly")
            H.append(w.pick([f"There is {noun}.", "The heart is enlarged.", f"{_cap(noun)} is noted."]))
            impression.append(_cap(noun) + ".")
        else:
            H.append(w.pick(NORMALS["heart"]))
        if "pericardial_effusion" in by:
            f = by["pericardial_effusion"][0]
            t = f.info.get("thickness_mm", 10)
            sz = "small" if t < 10 else ("moderate" if t < 20 else "large")
            noun = w.noun("pericardial_effusion")
            s = w.pick([f"{_cap(sz)} {noun}, up to {t:.0f} mm in thickness.", f"There is a {sz} {noun}."])
            imp = f"{_cap(sz)} {noun}."
            s, imp = hedged(noun, "", s, imp)
            H.append(s)
            impression.append(imp)
        else:
            H.append(w.pick(NORMALS["pericardium"]))
        if "lymphadenopathy" in by:
            f = by["lymphadenopathy"][0]
            st = f.info.get("stations", [])
            where = " and ".join(st) if st else "mediastinal"
            short = f.info.get("short_axis_mm", 15)
            noun = w.noun("lymphadenopathy")
            H.append(w.pick([f"Enlarged {where} lymph nodes, the largest measuring {short:.0f} mm in short axis.",
                             f"There is {noun} ({where}), up to {short:.0f} mm short axis."]))
            impression.append(f"{_cap(noun)}.")
        else:
            if not partial_chest:
                H.append(w.pick(NORMALS["nodes"]))

    V = lines["VESSELS"]
    if "aorta" in visible:
        if "aortic_aneurysm" in by:
            f = by["aortic_aneurysm"][0]
            d = f.info.get("diameter_mm", 50)
            seg = "infrarenal abdominal aorta" if f.info.get("site") == "abdominal" else "ascending thoracic aorta"
            noun = w.noun("aortic_aneurysm")
            V.append(w.pick([f"Aneurysmal dilatation of the {seg} to {d / 10:.1f} cm.", f"There is an {noun} of the {seg}, maximal diameter {d:.0f} mm."]))
            impression.append(f"{_cap(seg)} aneurysm, {d / 10:.1f} cm.")
        else:
            V.append(w.pick(NORMALS["aorta"]))
        if "arterial_calcification" in by:
            f = by["arterial_calcification"][0]
            noun = w.noun("arterial_calcification")
            V.append(w.pick([f"{_cap(f.info.get('grade', 'mild'))} {noun} of the aorta.", f"{_cap(noun)} along the aortic wall ({f.info.get('grade', 'mild')})."]))
            if rng.random() < 0.5:
                impression.append(f"{_cap(f.info.get('grade', 'mild'))} aortic atherosclerosis.")
        elif rng.random() < 0.6:
            V.append(w.pick(NORMALS["calcification"]))

    Ab = lines["ABDOMEN"]
    if "liver" in visible:
        liver_bits = []
        if "hepatomegaly" in by:
            f = by["hepatomegaly"][0]
            span = f.info.get("long_mm", 180)
            noun = w.noun("hepatomegaly")
            liver_bits.append(w.pick([f"The liver is enlarged, measuring {span / 10:.1f} cm.", f"{_cap(noun)} ({span / 10:.1f} cm)."]))
            impression.append(_cap(noun) + ".")
        if "steatosis" in by:
            f = by["steatosis"][0]
            noun = w.noun("steatosis")
            liver_bits.append(w.pick([f"Diffusely decreased hepatic attenuation ({f.info['liver_hu']:.0f} HU) compared with the spleen, consistent with {noun}.",
                                      f"There is {noun}.", f"The liver is hypoattenuating relative to the spleen, in keeping with {noun}."]))
            impression.append(_cap(noun) + ".")
        for name in ("liver_lesion", "liver_cyst"):
            for f in by.get(name, []):
                n, size, lobe = f.info.get("count", 1), _size(f.info["largest_mm"], rng), f.info.get("lobe", "right")
                noun = w.noun(name)
                dens = "hyperenhancing" if f.info.get("hyper") else ("hypodense" if name == "liver_lesion" else "fluid-attenuating")
                if n == 1:
                    s = w.pick([f"A {size} {dens} {noun} in the {lobe} hepatic lobe.", f"There is a {dens} {noun} in the {lobe} lobe of the liver measuring {size}."])
                else:
                    s = f"{_cap(_count_word(n))} {dens} {noun}s, the largest {size} in the {lobe} lobe."
                where = "" if ("hepatic" in noun or "liver" in noun) else " in the liver"
                imp = f"{_cap(noun)}{'s' if n > 1 else ''}{where}, largest {size}."
                if name == "liver_lesion":
                    imp = imp[:-1] + w.pick([", further characterization with MRI recommended.", "."])
                s, imp = hedged(noun, f" in the {lobe} hepatic lobe", s, imp)
                liver_bits.append(s)
                impression.append(imp)
        if not liver_bits:
            liver_bits.append(w.pick(NORMALS["liver"]))
        elif not any(k in by for k in ("hepatomegaly",)) and rng.random() < 0.5:
            liver_bits.insert(0, "The liver is normal in size.")
        Ab.extend(liver_bits)
    if "gallbladder" in visible:
        if "gallstone" in by:
            f = by["gallstone"][0]
            noun = w.noun("gallstone")
            n = f.info.get("count", 1)
            Ab.append(w.pick([f"{_cap(noun)}{'' if noun != 'gallstone' or n == 1 else 's'}, the largest measuring {f.info['largest_mm']:.0f} mm, without gallbladder wall thickening.",
                              f"There {'is' if n == 1 else 'are'} {_count_word(n)} gallstone{'s' if n > 1 else ''} in the gallbladder lumen."]))
            impression.append(_cap(PHRASES["gallstone"][0]) + ".")
        else:
            Ab.append(w.pick(NORMALS["gallbladder"]))
    if "spleen" in visible:
        if "splenomegaly" in by:
            f = by["splenomegaly"][0]
            noun = w.noun("splenomegaly")
            Ab.append(w.pick([f"The spleen is enlarged, measuring {f.info['long_mm'] / 10:.1f} cm.", f"{_cap(noun)}, spleen length {f.info['long_mm'] / 10:.1f} cm."]))
            impression.append(_cap(noun) + ".")
        else:
            Ab.append(w.pick(NORMALS["spleen"]))
    if "pancreas" in visible:
        Ab.append(w.pick(NORMALS["pancreas"]))
    if "kidney_left" in visible or "kidney_right" in visible:
        kid = []
        for f in by.get("kidney_cyst", []):
            noun = w.noun("kidney_cyst")
            size = _size(f.info["largest_mm"], rng)
            kid.append(w.pick([f"{_cap(_count_word(f.info.get('count', 1)))} {noun}{'s' if f.info.get('count', 1) > 1 else ''} in the {f.info.get('pole')} of the {f.laterality} kidney, up to {size}.",
                               f"{_cap(f.laterality)} renal {f.info.get('pole')} cyst measuring {size}."]))
            impression.append(f"{_cap(f.laterality)} {PHRASES['kidney_cyst'][0]}.")
        for f in by.get("kidney_stone", []):
            noun = w.noun("kidney_stone")
            size = f"{f.info['largest_mm']:.0f} mm"
            s = w.pick([f"{size} {noun} in the {f.laterality} kidney ({f.info.get('pole')}), without hydronephrosis.",
                        f"There is a {size} non-obstructing {f.laterality} renal calculus.",
                        f"{_cap(f.laterality)} kidney: {noun}, {size}."])
            imp = f"{_cap(f.laterality)} {noun}." if noun != "nephrolithiasis" else f"{_cap(f.laterality)} nephrolithiasis."
            s, imp = hedged(noun, f" in the {f.laterality} kidney", s, imp)
            kid.append(s)
            impression.append(imp)
        if not kid:
            kid.append(w.pick(NORMALS["kidneys"]))
        Ab.extend(kid)
    if "peritoneal_cavity" in visible and abdomen:
        if "ascites" in by:
            f = by["ascites"][0]
            v = f.volume_ml
            sz = "small" if v < 300 else ("moderate" if v < 1200 else "large")
            noun = w.noun("ascites")
            Ab.append(w.pick([f"{_cap(sz)} volume {noun}, predominantly perihepatic.", f"There is {sz} {noun} around the liver and spleen and in the paracolic gutters."]))
            impression.append(f"{_cap(sz)} {noun}.")
        else:
            Ab.append(w.pick(NORMALS["peritoneum"]))
    for kind in INCIDENTAL:
        info = (incidental or {}).get(kind)
        if info:
            n = int(info.get("count", 1))
            one, many = INCIDENTAL[kind]
            text = w.pick(one if n == 1 else many)
            lobe = LOBE_TEXT.get(info.get("lobe"), f"{info.get('side', '')} lung")
            lines[INCIDENTAL_SECTION[kind]].append(text.format(n=_cap(_count_word(n)), lobe=lobe, side=info.get("side", "")))
    lines["BONES"].append(w.pick(NORMALS["bones"]))

    region = {"chest": "chest", "abdomen": "abdomen", "chest_abdomen": "chest and abdomen"}.get(fov, "chest and abdomen")
    with_phase = f" with intravenous contrast in the {phase.replace('_', ' ')} phase." if contrast and phase else None
    out = [f"TECHNIQUE: CT of the {region}" + (with_phase or (" with intravenous contrast." if contrast
                                                             else " without intravenous contrast.")),
           "", "FINDINGS:"]
    if fov == "abdomen":
        lines = {("LUNG BASES" if k == "LUNGS AND PLEURA" else k): v for k, v in lines.items()}
    elif fov == "chest":
        lines = {("UPPER ABDOMEN" if k == "ABDOMEN" else k): v for k, v in lines.items()}
    for sec, ls in lines.items():
        if ls:
            out.append(f"{sec}: " + " ".join(ls))
    out.append("")
    out.append("IMPRESSION:")
    if impression:
        order = rng.permutation(len(impression)) if rng.random() < 0.3 else range(len(impression))
        for n, i in enumerate(order, 1):
            out.append(f"{n}. {impression[i]}")
    else:
        out.append(w.pick(["No acute abnormality.", "Normal CT examination.", "No significant abnormality identified."]))
    return "\n".join(out) + "\n"
