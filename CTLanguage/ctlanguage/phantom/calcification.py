"""Calcifications that are not findings: costal cartilage, calcified granulomas (lung, spleen, liver)
and coronary artery calcification.

None of them changes a label or a finding mask.  Vascular calcification is the
``arterial_calcification`` finding (aortic wall, findings.py); coronary calcification is added only
to cases that have that finding, so that a case without it never shows calcified arteries while its
report says "No vascular calcification".  Granulomas and coronary calcification are named in the
report (``report_writer.INCIDENTAL``); costal cartilage calcification, as in practice, is not.
Coronary foci sit on the heart surface (labels heart / pericardium: the arteries run in the
epicardial fat inside the pericardial sac).
All foci are painted at >= 200 HU before the scanner model (>= 130 HU is the usual calcium threshold).
"""

from __future__ import annotations

import numpy as np

from . import anatomy as an
from .anatomy import LABEL


def _balls(A, centers, radii, allowed: np.ndarray, hu_range, rng) -> np.ndarray:
    """Flat indices of small balls, restricted to ``allowed`` (flat bool), painted with one HU each."""
    if len(centers) == 0:
        return np.zeros(0, np.int64)
    out = []
    hu = A.hu.reshape(-1)
    for c, r in zip(np.asarray(centers, float), np.asarray(radii, float)):
        idx = an.stamp_indices(A.grid, c[None], np.array([r]))
        idx = idx[allowed[idx]]
        if idx.size:
            hu[idx] = rng.uniform(*hu_range)
            out.append(idx)
    return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)


def _centres(A, flat_idx: np.ndarray, n: int, rng) -> np.ndarray:
    """``n`` random voxel centres (mm) among ``flat_idx``."""
    if flat_idx.size == 0 or n <= 0:
        return np.zeros((0, 3))
    pick = flat_idx[rng.integers(0, flat_idx.size, n)]
    kk, jj, ii = np.unravel_index(pick, A.grid.shape)
    g = A.grid
    return np.stack([g.x[ii], g.y[jj], g.z[kk]], axis=1).astype(np.float64)


def cartilage_mask(A) -> np.ndarray:
    """Full-grid bool mask of the costal cartilage voxels recorded by anatomy._ribs."""
    m = np.zeros(A.grid.shape, bool)
    if "cartilage" in A.geo:
        m[A.geo["cartilage"]] = True
    return m


def _point(A, idx: np.ndarray) -> list:
    """Centre (mm, canonical frame) of the middle voxel of a flat index list."""
    k, j, i = np.unravel_index(int(idx[len(idx) // 2]), A.grid.shape)
    return [float(A.grid.x[i]), float(A.grid.y[j]), float(A.grid.z[k])]


def calcify(A, findings: list, kinds, rng: np.random.Generator, cartilage: np.ndarray | None = None) -> dict:
    """Paint the requested kinds into ``A.hu``; returns {kind: info} for what was placed (count,
    voxels, point = one focus voxel in mm, and for granulomas the lobe / organ).  Finding voxels
    are never touched.
    ``cartilage``: costal cartilage mask (default: ``cartilage_mask(A)``; pass the warped one)."""
    labf = A.lab.reshape(-1)
    busy = np.zeros(labf.size, bool)
    for f in findings:
        busy |= f.mask.reshape(-1).astype(bool)
    free = ~busy
    out: dict = {}
    u = rng.uniform(0, 1, 8)  # per-kind counts: fixed consumption
    if "costal_cartilage" in kinds:
        cart = (cartilage_mask(A) if cartilage is None else cartilage).reshape(-1) & (labf == LABEL["body"]) & free
        n = int(6 + u[0] * 34)
        idx = _balls(A, _centres(A, np.flatnonzero(cart), n, rng), rng.uniform(1.0, 3.0, n), cart, (250, 700), rng)
        if idx.size:
            out["costal_cartilage"] = dict(count=n, voxels=int(idx.size), point=_point(A, idx))
    if "lung_granuloma" in kinds:
        side = "left" if u[1] < 0.5 else "right"
        lobes = an.anatomy_labels(f"lung_{side}")
        lung = an.isin(A.lab, lobes).reshape(-1) & free
        n = 1 + int(u[2] * 3)
        cs = _centres(A, np.flatnonzero(lung), n, rng)
        idx = _balls(A, cs, rng.uniform(1.0, 3.0, len(cs)), lung, (300, 900), rng)
        if idx.size:
            lobe = an.STRUCTURE_LABELS[int(np.bincount(labf[idx]).argmax())]
            out["lung_granuloma"] = dict(count=len(cs), voxels=int(idx.size), point=_point(A, idx), side=side, lobe=lobe)
    for kind, organ, nmax in (("spleen_granuloma", "spleen", 8), ("liver_granuloma", "liver", 3)):
        if kind in kinds:
            m = (labf == LABEL[organ]) & free
            n = 1 + int(u[3 if organ == "spleen" else 4] * nmax)
            cs = _centres(A, np.flatnonzero(m), n, rng)
            idx = _balls(A, cs, rng.uniform(0.8, 2.2, len(cs)), m, (250, 800), rng)
            if idx.size:
                out[kind] = dict(count=len(cs), voxels=int(idx.size), point=_point(A, idx), organ=organ)
    if "coronary" in kinds and any(f.name == "arterial_calcification" for f in findings) and "heart" in A.geo:
        cs = _coronary_points(A.geo["heart"], int(4 + u[5] * 20), rng)
        heart = an.isin(A.lab, [LABEL["heart"], LABEL["pericardium"]]).reshape(-1) & free
        idx = _balls(A, cs, rng.uniform(1.0, 2.5, len(cs)), heart, (300, 900), rng)
        if idx.size:
            out["coronary"] = dict(count=len(cs), voxels=int(idx.size), point=_point(A, idx))
    return out


def _coronary_points(heart, n: int, rng) -> np.ndarray:
    """``n`` points 1 mm outside the heart surface (in the epicardial fat, label pericardium) along
    the atrioventricular groove (right coronary, circumflex) and the interventricular grooves (LAD,
    80 %; posterior descending), placed in the heart's own frame."""
    r0, r1, r2 = heart.radii
    pts = []
    for _ in range(n):
        if rng.random() < 0.5:  # AV groove: ring where the long-axis coordinate is -0.1 r0
            th = rng.uniform(0, 2 * np.pi)
            s = np.sqrt(1 - 0.01)
            p = np.array([-0.1 * r0, r1 * s * np.cos(th), r2 * s * np.sin(th)])
        else:  # interventricular groove: the septal plane (v = 0) on the anterior surface
            t = rng.uniform(-0.1, 0.85)
            w = np.sqrt(max(1 - t * t, 0.0))
            p = np.array([t * r0, 0.0, r2 * w * (-1 if rng.random() < 0.8 else 1)])  # -e3: anterior
        normal = heart.rot @ (p / heart.radii ** 2)
        pts.append(heart.center + heart.rot @ p + normal / np.linalg.norm(normal))
    return np.array(pts)
