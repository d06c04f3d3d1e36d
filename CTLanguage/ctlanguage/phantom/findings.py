"""Pathological findings: choice per case, placement in the anatomy, exact masks, measurements.

Two phases:
* :func:`plan_findings` runs before the anatomy is built; organ-level findings (cardiomegaly,
  hepatomegaly, splenomegaly, aneurysm, pericardial effusion) change the anatomy parameters.
* :func:`apply_findings` runs on the built anatomy and paints focal findings (HU + labels) and
  returns :class:`Finding` objects with exact masks.

Every mask is a subset of the labels of the anatomy the finding is judged in (see
``FINDING_ANATOMY``; sided findings use ``<anatomy>_<side>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import anatomy as an
from .anatomy import LABEL, LUNG_IDS, Ellipsoid
from .texture import SmoothField

FINDING_KEYS = [
    "lung_nodule", "lung_mass", "pleural_effusion", "emphysema", "consolidation", "atelectasis",
    "cardiomegaly", "pericardial_effusion", "aortic_aneurysm", "arterial_calcification",
    "liver_lesion", "liver_cyst", "steatosis", "hepatomegaly", "splenomegaly", "kidney_cyst",
    "kidney_stone", "ascites", "lymphadenopathy", "gallstone",
]
FINDING_ANATOMY = {
    "lung_nodule": "lung", "lung_mass": "lung", "pleural_effusion": "pleural_space",
    "emphysema": "lung", "consolidation": "lung", "atelectasis": "lung", "cardiomegaly": "heart",
    "pericardial_effusion": "pericardium", "aortic_aneurysm": "aorta",
    "arterial_calcification": "aorta", "liver_lesion": "liver", "liver_cyst": "liver",
    "steatosis": "liver", "hepatomegaly": "liver", "splenomegaly": "spleen",
    "kidney_cyst": "kidney", "kidney_stone": "kidney", "ascites": "peritoneal_cavity",
    "lymphadenopathy": "body", "gallstone": "gallbladder",
}
SIDED_ANATOMIES = {"lung", "pleural_space", "kidney"}

GROUPS = {
    "lung": ["lung_nodule", "lung_mass", "emphysema", "consolidation", "atelectasis"],
    "pleura": ["pleural_effusion"],
    "heart": ["cardiomegaly", "pericardial_effusion", "lymphadenopathy"],
    "aorta": ["aortic_aneurysm", "arterial_calcification"],
    "liver": ["liver_lesion", "liver_cyst", "steatosis", "hepatomegaly"],
    "gallbladder": ["gallstone"],
    "spleen": ["splenomegaly"],
    "kidney": ["kidney_cyst", "kidney_stone"],
    "peritoneum": ["ascites"],
}
GROUP_PROB = {"lung": 0.5, "pleura": 0.3, "heart": 0.4, "aorta": 0.4, "liver": 0.5,
              "gallbladder": 0.2, "spleen": 0.25, "kidney": 0.4, "peritoneum": 0.22}
NORMAL_FRACTION = 0.15


@dataclass
class Finding:
    name: str
    anatomy: str
    laterality: str | None
    mask: np.ndarray  # uint8, same grid as the case volume
    volume_ml: float
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}_{self.laterality}" if self.laterality else self.name


def _side(rng) -> str:
    return "left" if rng.random() < 0.5 else "right"


def plan_findings(rng: np.random.Generator, P: dict, force=None) -> dict:
    """Choose the findings of a case; organ-level ones are written into the patient params.

    ``force``: optional list of finding keys to place instead of the random choice (tests, docs).
    """
    u = rng.uniform
    plan: dict[str, dict] = {}
    normal = rng.random() < NORMAL_FRACTION
    for grp, names in GROUPS.items():  # always draw, so that forcing does not shift the stream
        hit = rng.random() < GROUP_PROB[grp]
        k = 1 if (len(names) == 1 or rng.random() < 0.7) else 2
        pick = rng.choice(names, size=min(k, len(names)), replace=False)
        if hit and not normal and force is None:
            for n in pick:
                plan[str(n)] = {}
    if force is not None:
        unknown = [n for n in force if n not in FINDING_ANATOMY]
        if unknown:
            raise ValueError(f"unknown finding keys: {unknown}")
        plan = {str(n): {} for n in force}
    elif "atelectasis" in plan and "pleural_effusion" not in plan and rng.random() < 0.3:
        plan["pleural_effusion"] = {}
    for n, p in plan.items():
        if n in ("lung_nodule", "lung_mass", "consolidation", "atelectasis", "kidney_cyst", "kidney_stone"):
            p["sides"] = [_side(rng)]
        elif n in ("pleural_effusion", "emphysema"):
            p["sides"] = ["left", "right"] if rng.random() < (0.4 if n == "pleural_effusion" else 0.8) else [_side(rng)]
    if "atelectasis" in plan and "pleural_effusion" in plan and rng.random() < 0.7:
        plan["atelectasis"]["sides"] = [plan["pleural_effusion"]["sides"][0]]
        plan["atelectasis"]["compressive"] = True
    if "cardiomegaly" in plan:
        P["cardiomegaly"] = u(1.2, 1.42)
    if "pericardial_effusion" in plan:
        P["pericardial_fluid_mm"] = u(6, 22)
    if "hepatomegaly" in plan:
        P["hepatomegaly"] = u(1.2, 1.38)
    if "splenomegaly" in plan:
        P["splenomegaly"] = u(1.45, 1.95)
    if "aortic_aneurysm" in plan:
        site = "abdominal" if rng.random() < 0.7 else "thoracic"
        P["aneurysm"] = dict(site=site, diameter=u(34, 75) if site == "abdominal" else u(45, 62), length=u(45, 100))
    return plan


# ----------------------------------------------------------------------------- helpers
def _ids(name: str) -> list[int]:
    return an.anatomy_labels(name)


def _pick_point(A, ids, rng, radius: float, frac_inside: float = 0.6, tries: int = 25, weights=None):
    """A random voxel centre of the given labels whose ball of ``radius`` is mostly inside."""
    lab = A.lab
    cand = np.flatnonzero(an.isin(lab, ids))
    if cand.size == 0:
        return None
    g = A.grid
    best, best_f = None, -1.0
    for _ in range(tries):
        f = cand[rng.integers(cand.size)]
        k, j, i = np.unravel_index(f, lab.shape)
        p = np.array([g.x[i], g.y[j], g.z[k]], float)
        b = g.box(p - radius, p + radius)
        d2 = (b.x - p[0]) ** 2 + (b.y - p[1]) ** 2 + (b.z - p[2]) ** 2
        ball = d2 <= radius * radius
        nin = an.isin(lab[b.sl], ids)[ball].mean() if ball.any() else 1.0
        if nin > best_f:
            best, best_f = p, nin
        if nin >= frac_inside:
            return p
    return best


def _blob(A, center, diameter, rng, lobulation=0.08, elong=0.15):
    """Full-volume boolean of a deformed ellipsoid with the given nominal diameter (mm)."""
    r = diameter / 2.0
    radii = r * np.exp(rng.uniform(-elong, elong, 3))
    radii *= r / np.cbrt(np.prod(radii))
    e = Ellipsoid(np.asarray(center, float), radii, an.rotation(rng.uniform(-90, 90, 3)),
                  SmoothField(rng, lobulation, (max(6.0, r), max(12.0, 4 * r)), 2) if lobulation > 0 else None)
    out = np.zeros(A.grid.shape, bool)
    b = A.grid.box(*e.bbox())
    if b is not None:
        out[b.sl] = e.mask(b)
    if not out.any():  # tiny blob: keep at least its nearest voxel
        idx = np.rint(A.grid.to_index(center)).astype(int)
        if np.all(idx >= 0) and np.all(idx < np.array(A.grid.shape[::-1])):
            out[idx[2], idx[1], idx[0]] = True
    return out


def measure(mask: np.ndarray, grid) -> dict:
    """Longest diameter, perpendicular short axes (mm, PCA extents) and volume (ml) of a mask."""
    kz = np.flatnonzero(mask.any(axis=(1, 2)))
    if kz.size == 0:
        return dict(long_mm=0.0, short_mm=0.0, volume_ml=0.0, centroid=None)
    idx = np.argwhere(mask[kz[0]:kz[-1] + 1])
    idx[:, 0] += kz[0]
    if len(idx) == 0:
        return dict(long_mm=0.0, short_mm=0.0, volume_ml=0.0, centroid=None)
    pts = idx[:, ::-1] * grid.spacing + grid.origin  # x, y, z
    c = pts.mean(0)
    vol = len(idx) * grid.voxel_ml
    if len(idx) < 3:
        d = float(grid.spacing.mean())
        return dict(long_mm=d, short_mm=d, volume_ml=vol, centroid=c)
    sub = pts if len(pts) < 20000 else pts[:: len(pts) // 20000 + 1]
    cov = np.cov((sub - c).T)
    w, v = np.linalg.eigh(cov)
    proj = (sub - c) @ v
    ext = proj.max(0) - proj.min(0) + float(grid.spacing.mean())
    return dict(long_mm=float(ext[2]), short_mm=float(ext[1]), min_mm=float(ext[0]), volume_ml=vol, centroid=c)


def _lobe_of(A, mask) -> str | None:
    vals = A.lab[mask]
    vals = vals[an.isin(vals, LUNG_IDS)]
    if vals.size == 0:
        return None
    return an.STRUCTURE_LABELS[int(np.bincount(vals).argmax())]


def _finding(A, name, side, mask, **info) -> Finding | None:
    if not mask.any():
        return None
    base = FINDING_ANATOMY[name]
    anat = f"{base}_{side}" if base in SIDED_ANATOMIES else base
    m = measure(mask, A.grid)
    info.update({k: v for k, v in m.items() if k != "centroid"})
    info["centroid"] = None if m["centroid"] is None else [float(v) for v in m["centroid"]]
    return Finding(name, anat, side if base in SIDED_ANATOMIES else None, mask.astype(np.uint8), m["volume_ml"], info)


# ----------------------------------------------------------------------------- painters
def apply_findings(A, plan: dict, rng: np.random.Generator) -> list[Finding]:
    out: list[Finding] = []
    T = A.T
    u = rng.uniform
    con = A.P["contrast"]
    lungside = {s: _ids(f"lung_{s}") for s in ("left", "right")}

    # --- diffuse liver first (lesions are painted relative to the new parenchyma)
    liver = A.lab == LABEL["liver"]
    if "steatosis" in plan and liver.sum() > 50:
        new = (A.T["spleen"] - u(25, 55)) if con else u(-15, 32)
        A.hu[liver] = new
        A.T["liver"] = new
        out.append(_finding(A, "steatosis", None, liver, liver_hu=float(new), spleen_hu=float(A.T["spleen"])))
    if "hepatomegaly" in plan and liver.sum() > 50:
        out.append(_finding(A, "hepatomegaly", None, liver))
    spleen = A.lab == LABEL["spleen"]
    if "splenomegaly" in plan and spleen.sum() > 50:
        out.append(_finding(A, "splenomegaly", None, spleen))
    heart = A.lab == LABEL["heart"]
    if "cardiomegaly" in plan and heart.sum() > 50:
        out.append(_finding(A, "cardiomegaly", None, heart))
    if "pericardial_effusion" in plan:
        pm = A.lab == LABEL["pericardium"]
        if pm.sum() > 20:
            out.append(_finding(A, "pericardial_effusion", None, pm, thickness_mm=float(A.P["pericardial_fluid_mm"])))

    # --- aorta
    aorta = A.lab == LABEL["aorta"]
    if "aortic_aneurysm" in plan and "aneurysm_s" in A.geo and aorta.sum() > 50:
        b = A.geo.get("aorta_box")
        m = np.zeros(A.grid.shape, bool)
        if b is not None:
            m[b.sl] = an._aorta_mask(A, b, s_range=A.geo["aneurysm_s"])
        m &= aorta
        # the aneurysmal part beyond ~1.15x the native calibre only counts if it is dilated
        if m.sum() > 20:
            an_info = A.P["aneurysm"]
            if an_info["site"] == "abdominal" and rng.random() < 0.6:
                # eccentric mural thrombus: outer part of the sac, unenhanced soft tissue
                c = A.geo["aorta_line"]
                dirv = rng.normal(size=2)
                dirv /= np.linalg.norm(dirv)
                idx = np.argwhere(m)
                pts = idx[:, ::-1] * A.grid.spacing + A.grid.origin
                k_line = np.argmin(np.abs(c[:, 2][None, :] - pts[:, 2:3]), axis=1)
                off = pts[:, :2] - c[k_line, :2]
                r_nat = A.P["aorta_r"] * 0.7
                thr = (off @ dirv) > r_nat * u(0.2, 0.8)
                far = np.linalg.norm(off, axis=1) > r_nat * 1.05
                th = idx[thr & far]
                A.hu[th[:, 0], th[:, 1], th[:, 2]] = u(35, 55)
            diam = _aorta_max_diameter(A, m)
            out.append(_finding(A, "aortic_aneurysm", None, m, site=an_info["site"], diameter_mm=diam))
    if "arterial_calcification" in plan and aorta.sum() > 50:
        line, s, rad = A.geo["aorta_line"], A.geo["aorta_s"], A.geo["aorta_r"]
        n = int(rng.integers(6, 45))
        k = rng.integers(len(line) // 5, len(line) - 1, n)  # mostly arch / descending / abdominal
        t = line[np.minimum(k + 1, len(line) - 1)] - line[k]
        t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-9
        rv = rng.normal(size=(n, 3))
        rv -= (rv * t).sum(1, keepdims=True) * t
        rv /= np.linalg.norm(rv, axis=1, keepdims=True) + 1e-9
        pts = line[k] + rv * (rad[k] - 1.2)[:, None]
        rr = u(0.8, 2.5, n)
        idx = an.stamp_indices(A.grid, pts, rr)
        idx = idx[A.lab.reshape(-1)[idx] == LABEL["aorta"]]
        A.hu.reshape(-1)[idx] = u(500, 1100)
        m = np.zeros(A.grid.shape, bool)
        m.reshape(-1)[idx] = True
        out.append(_finding(A, "arterial_calcification", None, m, count=n,
                            grade="extensive" if n > 30 else ("moderate" if n > 15 else "mild")))

    # --- lungs
    if "emphysema" in plan:
        panlob = rng.random() < 0.25
        sev = u(0.05, 0.3)
        for side in plan["emphysema"]["sides"]:
            lobes = [n for n in an.LOBES[side] if ("lower" in n) == panlob]
            region = an.isin(A.lab, [LABEL[n] for n in lobes])
            if region.sum() < 100:
                continue
            # low-attenuation foci (centrilobular holes / confluent lucency): random small balls
            idx = np.flatnonzero(region)
            n_voxels = idx.size
            r_mean = 3.5 if not panlob else 5.0
            ball_vox = 4.19 * r_mean ** 3 / 1000.0 / A.grid.voxel_ml
            n = int(np.clip(sev * n_voxels / max(ball_vox, 1.0), 20, 4000))
            centers = idx[rng.integers(0, idx.size, n)]
            kk, jj, ii = np.unravel_index(centers, region.shape)
            pts = np.stack([A.grid.x[ii], A.grid.y[jj], A.grid.z[kk]], axis=1)
            holes = an.stamp_indices(A.grid, pts, rng.uniform(0.6, 1.4, n) * r_mean)
            holes = holes[region.reshape(-1)[holes]]
            A.hu.reshape(-1)[holes] = rng.uniform(-995, -960, holes.size).astype(np.float32)
            out.append(_finding(A, "emphysema", side, region, lobes=lobes, kind="panlobular" if panlob else "centrilobular",
                                severity="severe" if sev > 0.22 else ("moderate" if sev > 0.12 else "mild")))
    if "pleural_effusion" in plan:
        for side in plan["pleural_effusion"]["sides"]:
            m = _effusion(A, side, rng, plan)
            if m is not None:
                out.append(_finding(A, "pleural_effusion", side, m, depth_mm=float(plan["_eff_depth"][side])))
    if "atelectasis" in plan:
        side = plan["atelectasis"]["sides"][0]
        m = plan.get("_compressed", {}).get(side) if plan["atelectasis"].get("compressive") else None
        kind = "compressive"
        if m is None or not m.any():
            kind = "plate-like"
            lobes = [n for n in an.LOBES[side] if "lower" in n or "middle" in n]
            ids = [LABEL[n] for n in lobes]
            p = _pick_point(A, ids, rng, 20)
            m = None
            if p is not None:
                nrm = np.array([u(-0.3, 0.3), u(-0.5, 0.5), 1.0])
                nrm /= np.linalg.norm(nrm)
                R = u(20, 45)
                th = u(4, 9)
                b = A.grid.box(p - R, p + R)
                d = (b.x - p[0]) * nrm[0] + (b.y - p[1]) * nrm[1] + (b.z - p[2]) * nrm[2]
                r2 = (b.x - p[0]) ** 2 + (b.y - p[1]) ** 2 + (b.z - p[2]) ** 2
                m = np.zeros(A.grid.shape, bool)
                m[b.sl] = (np.abs(d) < th / 2) & (r2 < R * R)
                m &= an.isin(A.lab, ids)
        if m is not None and m.any():
            A.hu[m] = u(60, 100) if con else u(25, 50)
            out.append(_finding(A, "atelectasis", side, m, kind=kind, lobe=_lobe_of(A, m)))
    if "consolidation" in plan:
        side = plan["consolidation"]["sides"][0]
        lobes = list(an.LOBES[side])
        lobe = lobes[rng.integers(len(lobes))]
        region = A.lab == LABEL[lobe]
        if region.sum() > 100:
            lobar = rng.random() < 0.35
            if not lobar:
                p = _pick_point(A, [LABEL[lobe]], rng, 25)
                blob = _blob(A, p, u(35, 90), rng, lobulation=0.25, elong=0.3)
                region &= blob
            if region.any():
                A.hu[region] = u(45, 80) if con else u(20, 45)
                pts, rr = A.geo["airways"]
                idx = an.stamp_indices(A.grid, pts, rr)
                idx = idx[region.reshape(-1)[idx]]
                A.hu.reshape(-1)[idx] = u(-950, -850)
                out.append(_finding(A, "consolidation", side, region, lobe=lobe, lobar=lobar, bronchograms=bool(idx.size > 0)))
    for name in ("lung_mass", "lung_nodule"):
        if name not in plan:
            continue
        side = plan[name]["sides"][0]
        ids = lungside[side]
        n = 1 if name == "lung_mass" or rng.random() < 0.7 else int(rng.integers(2, 4))
        total = np.zeros(A.grid.shape, bool)
        sizes, ggo = [], False
        for _ in range(n):
            d = u(31, 85) if name == "lung_mass" else float(np.exp(u(np.log(4), np.log(30))))
            p = _pick_point(A, ids, rng, d / 2, frac_inside=0.85)
            if p is None:
                continue
            m = _blob(A, p, d, rng, lobulation=0.18 if name == "lung_mass" else 0.06)
            m &= an.isin(A.lab, ids)
            if not m.any():
                continue
            hu = u(25, 55) + (20 if con else 0)
            if name == "lung_nodule" and d >= 6 and rng.random() < 0.15:
                hu, ggo = u(-650, -450), True
            A.hu[m] = hu
            if name == "lung_mass" and rng.random() < 0.4:  # central necrosis
                core = m & ndimage.binary_erosion(m, iterations=3)
                A.hu[core] = u(5, 25)
            total |= m
            sizes.append(measure(m, A.grid)["long_mm"])
        if total.any():
            out.append(_finding(A, name, side, total, count=len(sizes), largest_mm=max(sizes), lobe=_lobe_of(A, total), ground_glass=ggo))

    # --- liver focal
    for name in ("liver_lesion", "liver_cyst"):
        if name not in plan:
            continue
        ids = [LABEL["liver"]]
        n = int(rng.integers(1, 4))
        total = np.zeros(A.grid.shape, bool)
        sizes, hyper = [], False
        hyper = name == "liver_lesion" and rng.random() < 0.3
        for _ in range(n):
            d = u(8, 60) if name == "liver_lesion" else u(5, 40)
            p = _pick_point(A, ids, rng, d / 2, frac_inside=0.9)
            if p is None:
                continue
            m = _blob(A, p, d, rng, lobulation=0.12 if name == "liver_lesion" else 0.02, elong=0.15 if name == "liver_lesion" else 0.05)
            m &= A.lab == LABEL["liver"]
            if not m.any():
                continue
            if name == "liver_cyst":
                A.hu[m] = T["fluid"]
            elif hyper:
                A.hu[m] = T["liver"] + (u(30, 60) if con else u(12, 25))
            else:
                A.hu[m] = T["liver"] - (u(30, 55) if con else u(15, 30))
            total |= m
            sizes.append(measure(m, A.grid)["long_mm"])
        if total.any():
            c = measure(total, A.grid)["centroid"]
            out.append(_finding(A, name, None, total, count=len(sizes), largest_mm=max(sizes),
                                lobe="left" if c[0] < -5 else "right", hyper=hyper))

    # --- gallbladder
    if "gallstone" in plan:
        gbm = A.lab == LABEL["gallbladder"]
        if gbm.sum() > 30:
            n = int(rng.integers(1, 6))
            gb = A.geo["gallbladder"]
            pts, rr = [], []
            for _ in range(n):
                d = u(4, 18)
                p = _pick_point(A, [LABEL["gallbladder"]], rng, d / 2, frac_inside=0.95)
                if p is None:
                    continue
                p[1] = min(p[1], gb.center[1])  # dependent (posterior)
                pts.append(p)
                rr.append(d / 2)
            idx = an.stamp_indices(A.grid, np.array(pts).reshape(-1, 3), np.array(rr))
            idx = idx[A.lab.reshape(-1)[idx] == LABEL["gallbladder"]]
            if idx.size:
                A.hu.reshape(-1)[idx] = u(150, 700) if rng.random() < 0.6 else u(45, 80)
                m = np.zeros(A.grid.shape, bool)
                m.reshape(-1)[idx] = True
                out.append(_finding(A, "gallstone", None, m, count=len(pts), largest_mm=2 * max(rr)))

    # --- kidneys
    if "kidney_cyst" in plan:
        side = plan["kidney_cyst"]["sides"][0]
        kid = LABEL[f"kidney_{side}"]
        total = np.zeros(A.grid.shape, bool)
        sizes = []
        for _ in range(int(rng.integers(1, 3))):
            d = u(5, 45)
            p = _pick_point(A, [kid], rng, 3)
            if p is None:
                continue
            m = _blob(A, p, d, rng, lobulation=0.0, elong=0.05)
            m &= an.isin(A.lab, [kid, LABEL["body"]]) & A.geo["abdomen"]  # may bulge out (exophytic)
            A.lab[m] = kid
            A.hu[m] = T["fluid"]
            total |= m
            sizes.append(measure(m, A.grid)["long_mm"])
        if total.any():
            out.append(_finding(A, "kidney_cyst", side, total, count=len(sizes), largest_mm=max(sizes),
                                pole=_pole(A, kid, total)))
    if "kidney_stone" in plan:
        side = plan["kidney_stone"]["sides"][0]
        kid = LABEL[f"kidney_{side}"]
        kd = A.geo[f"kidney_{side}"]
        sgn = 1.0 if side == "right" else -1.0
        n = int(rng.integers(1, 4))
        pts = kd.center + np.array([-sgn * 10, 3, 0]) + rng.normal(0, [3, 3, 14], (n, 3))
        rr = u(1.0, 6.0, n)
        idx = an.stamp_indices(A.grid, pts, rr)
        idx = idx[A.lab.reshape(-1)[idx] == kid]
        if idx.size:
            A.hu.reshape(-1)[idx] = u(400, 1300)
            m = np.zeros(A.grid.shape, bool)
            m.reshape(-1)[idx] = True
            out.append(_finding(A, "kidney_stone", side, m, count=n, largest_mm=float(2 * rr.max()), pole=_pole(A, kid, m)))

    # --- peritoneum
    if "ascites" in plan:
        m = _ascites(A, rng)
        if m is not None:
            out.append(_finding(A, "ascites", None, m))

    # --- mediastinal nodes
    if "lymphadenopathy" in plan:
        m, stations, short = _nodes(A, rng)
        if m is not None:
            out.append(_finding(A, "lymphadenopathy", None, m, stations=stations, short_axis_mm=short))
    # later findings may relabel voxels (effusion compresses lung, nodes displace lung): keep every
    # mask exactly inside its anatomy as it is in the final label map
    final = []
    for f in out:
        if f is None:
            continue
        m = f.mask.astype(bool) & an.anatomy_mask(A.lab, f.anatomy)
        if not m.any():
            continue
        f.mask = m.astype(np.uint8)
        f.volume_ml = float(m.sum()) * A.grid.voxel_ml
        f.info["volume_ml"] = f.volume_ml
        final.append(f)
    return final


def _pole(A, kid, m) -> str:
    zk = A.grid.z[np.nonzero(np.any(A.lab == kid, axis=(1, 2)))[0]]
    zc = A.grid.z[np.nonzero(np.any(m, axis=(1, 2)))[0]].mean()
    t = (zc - zk.min()) / max(1e-6, zk.max() - zk.min())
    return "upper pole" if t > 0.66 else ("lower pole" if t < 0.33 else "interpolar region")


def _aorta_max_diameter(A, m) -> float:
    area = m.sum(axis=(1, 2)) * A.grid.spacing[0] * A.grid.spacing[1]
    return float(2 * np.sqrt(area.max() / np.pi))


def _effusion(A, side, rng, plan):
    """Dependent (posterior) fluid in the pleural space; the adjacent lung is compressed."""
    b = A.geo.get("lung_box")
    if b is None:
        return None
    ids = [LABEL[f"pleural_space_{side}"]] + an.anatomy_labels(f"lung_{side}")
    lab = A.lab[b.sl]
    space = an.isin(lab, ids)
    if space.sum() < 200:
        return None
    # supine patient: the fluid surface is (nearly) horizontal, i.e. y = const, slightly tilted
    # cranio-caudally; fluid fills the dependent (posterior) part of the hemithorax
    kk, jj, ii = np.nonzero(space)
    ys = A.grid.y[b.sl[1]][jj]
    y_back = float(np.quantile(ys, 0.01))
    zs = b.z[:, 0, 0]
    zlow = float(zs[kk.min()])
    depth = rng.uniform(12, 75)
    tilt = rng.uniform(0.05, 0.25)
    xs = A.grid.x[b.sl[2]][ii]
    xc, xw = 0.5 * (xs.min() + xs.max()), 0.5 * (xs.max() - xs.min()) + 1e-3
    # meniscus: the surface climbs towards the lateral and medial walls (lung floats on the fluid)
    men = depth * rng.uniform(0.5, 1.1) * ((b.x - xc) / xw) ** 2
    lvl = y_back + depth * 0.75 + men - tilt * np.maximum(b.z - zlow - 30, 0)
    fluid = space & (b.y < lvl)
    if not fluid.any():
        return None
    plan.setdefault("_eff_depth", {})[side] = depth
    comp = space & ~fluid & (b.y < lvl + rng.uniform(6, 14)) & an.isin(lab, LUNG_IDS)
    lab[fluid] = LABEL[f"pleural_space_{side}"]
    A.hu[b.sl][fluid] = A.T["fluid"] + rng.uniform(0, 8)
    full = np.zeros(A.grid.shape, bool)
    full[b.sl] = fluid
    cm = np.zeros(A.grid.shape, bool)
    cm[b.sl] = comp
    plan.setdefault("_compressed", {})[side] = cm
    return full


def _ascites(A, rng):
    per = A.lab == LABEL["peritoneal_cavity"]
    if per.sum() < 500:
        return None
    kk = np.nonzero(per.any(axis=(1, 2)))[0]
    sl = slice(kk[0], kk[-1] + 1)
    lab = A.lab[sl]
    seeds = an.isin(lab, [LABEL["liver"], LABEL["spleen"]]) | ~A.geo["cavity"][sl]
    d = rng.uniform(6, 30)
    # distance on a 2x coarser grid (the EDT dominates otherwise); the painted mask is exact
    # by construction since the mask *is* what gets painted
    ds = seeds[::2, ::2, ::2]
    dist = ndimage.distance_transform_edt(~ds, sampling=tuple(2 * A.grid.spacing[::-1]))
    dist = dist.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: seeds.shape[0], : seeds.shape[1], : seeds.shape[2]]
    m = (lab == LABEL["peritoneal_cavity"]) & (dist < d)
    if not m.any():
        return None
    A.hu[sl][m] = A.T["fluid"] + rng.uniform(0, 10)
    full = np.zeros(A.grid.shape, bool)
    full[sl] = m
    return full


def _nodes(A, rng):
    P = A.P
    tr = A.geo["trachea"]
    zc = P["z_carina"]
    stations = {
        "subcarinal": np.array([tr["x"], tr["y"] - 12, zc - 22]),
        "right paratracheal": np.array([tr["x"] + 20, tr["y"] + 4, zc + 22]),
        "prevascular": np.array([-8.0, tr["y"] + 30, zc + 10]),
        "aortopulmonary window": np.array([tr["x"] - 24, tr["y"] + 2, zc + 2]),
        "right hilar": A.geo["hilum"]["right"] + np.array([6, 8, 6]),
        "left hilar": A.geo["hilum"]["left"] + np.array([-6, 8, 6]),
    }
    names = list(stations)
    pick = rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)
    total = np.zeros(A.grid.shape, bool)
    chosen, shorts = [], []
    allowed = [LABEL["body"], LABEL["pericardium"]] + LUNG_IDS + [LABEL["pleural_space_left"], LABEL["pleural_space_right"]]
    for k in pick:
        s = rng.uniform(11, 28)
        m = _blob(A, stations[names[k]] + rng.normal(0, 3, 3), s * 1.25, rng, lobulation=0.05, elong=0.2)
        m &= an.isin(A.lab, allowed)
        if m.sum() < 2:
            continue
        A.lab[m] = LABEL["body"]
        A.hu[m] = A.T["node"]
        total |= m
        chosen.append(names[k])
        shorts.append(measure(m, A.grid)["short_mm"])
    if not total.any():
        return None, [], 0
    return total, chosen, float(max(shorts))
