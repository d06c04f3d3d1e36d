"""Procedural torso anatomy evaluated at the physical coordinate of every voxel.

Geometry is generated on a canonical grid whose array axes ``[k, j, i]`` run along S, A, R
(patient frame, millimetres, RAS: +x = patient right, +y = anterior, +z = superior).  Every
organ is an implicit function of ``(x, y, z)`` (deformed ellipsoids, tubes, tori, planes), so the
label map is exact for any spacing; the random re-orientation of the voxel grid happens later and
is exact too (axis permutation / flip with the affine adjusted, no resampling).

Conventions of this module: ``x`` positive = patient right, so left-sided organs have ``x < 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .texture import SmoothField

# ----------------------------------------------------------------------------- labels
STRUCTURE_NAMES = [
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right", "pleural_space_left",
    "pleural_space_right", "heart", "pericardium", "aorta", "trachea", "esophagus", "liver",
    "spleen", "kidney_left", "kidney_right", "gallbladder", "pancreas", "stomach", "spine", "ribs",
    "peritoneal_cavity", "body",
]
LABEL = {name: i + 1 for i, name in enumerate(STRUCTURE_NAMES)}
STRUCTURE_LABELS = {i + 1: name for i, name in enumerate(STRUCTURE_NAMES)}
LOBES = {
    "left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
}
# anatomy key -> labels that make it up (unions)
COMPOSITE = {
    "lung_left": [LABEL[n] for n in LOBES["left"]],
    "lung_right": [LABEL[n] for n in LOBES["right"]],
    "body": list(STRUCTURE_LABELS),
}


def anatomy_labels(name: str) -> list[int]:
    if name in COMPOSITE:
        return COMPOSITE[name]
    return [LABEL[name]]


def anatomy_mask(lab: np.ndarray, name: str) -> np.ndarray:
    ids = anatomy_labels(name)
    if name == "body":
        return lab > 0
    if len(ids) == 1:
        return lab == ids[0]
    return isin(lab, ids)


# ----------------------------------------------------------------------------- grid
@dataclass
class Box:
    sl: tuple
    x: np.ndarray  # [1,1,ni]
    y: np.ndarray  # [1,nj,1]
    z: np.ndarray  # [nk,1,1]
    index: tuple | None = None  # for scattered voxel lists: (gx, gy, gz, ii, jj, kk)


def points_box(b: "Box", kk, jj, ii) -> "Box":
    """A Box of scattered voxels (1-D coordinates) inside box ``b``."""
    gx, gy, gz = b.x[0, 0, :], b.y[0, :, 0], b.z[:, 0, 0]
    return Box(None, gx[ii], gy[jj], gz[kk], (gx, gy, gz, ii, jj, kk))


def isin(lab: np.ndarray, ids) -> np.ndarray:
    """Fast membership test for uint8 label arrays (lookup table instead of np.isin)."""
    lut = np.zeros(256, dtype=bool)
    lut[np.asarray(ids, dtype=np.int64)] = True
    return lut[lab]


class Grid:
    """Canonical axis-aligned grid: index (i, j, k) -> origin + spacing * (i, j, k) in mm."""

    def __init__(self, shape_kji, spacing_xyz, origin_xyz):
        self.shape = tuple(int(s) for s in shape_kji)
        self.spacing = np.asarray(spacing_xyz, dtype=np.float64)
        self.origin = np.asarray(origin_xyz, dtype=np.float64)
        nk, nj, ni = self.shape
        self.x = (self.origin[0] + self.spacing[0] * np.arange(ni)).astype(np.float32)
        self.y = (self.origin[1] + self.spacing[1] * np.arange(nj)).astype(np.float32)
        self.z = (self.origin[2] + self.spacing[2] * np.arange(nk)).astype(np.float32)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def ijk_to_ras(self) -> np.ndarray:
        m = np.eye(4)
        m[0, 0], m[1, 1], m[2, 2] = self.spacing
        m[:3, 3] = self.origin
        return m

    def box(self, lo, hi) -> Box | None:
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        n = (self.shape[2], self.shape[1], self.shape[0])
        a = np.maximum(0, np.ceil((lo - self.origin) / self.spacing - 1e-6)).astype(int)
        b = np.minimum(n, np.floor((hi - self.origin) / self.spacing + 1e-6).astype(int) + 1)
        if np.any(b <= a):
            return None
        sl = (slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0]))
        return Box(sl, self.x[None, None, a[0]:b[0]], self.y[None, a[1]:b[1], None], self.z[a[2]:b[2], None, None])

    def full(self) -> Box:
        return Box((slice(None),) * 3, self.x[None, None, :], self.y[None, :, None], self.z[:, None, None])

    def to_index(self, p_xyz) -> np.ndarray:
        return (np.asarray(p_xyz) - self.origin) / self.spacing


def rotation(rng_or_angles, max_deg: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rotation matrix from Euler angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(rng_or_angles)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Ellipsoid:
    """Ellipsoid (optionally rotated and deformed by a smooth field) — the basic organ shape."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray | None = None  # columns = body axes in patient frame
    deform: SmoothField | None = None  # relative radial deformation

    def scaled(self, factor, grow_mm: float = 0.0) -> "Ellipsoid":
        return Ellipsoid(self.center.copy(), self.radii * factor + grow_mm, self.rot, self.deform)

    def half_extent(self) -> np.ndarray:
        r = self.radii * 1.3
        if self.rot is None:
            return r
        return np.sqrt((self.rot ** 2) @ (r ** 2))

    def bbox(self, margin: float = 0.0):
        h = self.half_extent() + margin
        return self.center - h, self.center + h

    def q(self, b: Box) -> np.ndarray:
        """Normalised squared radius (< 1 inside), deformation applied."""
        dx = b.x - np.float32(self.center[0])
        dy = b.y - np.float32(self.center[1])
        dz = b.z - np.float32(self.center[2])
        if self.rot is None:
            q = (dx / np.float32(self.radii[0])) ** 2 + (dy / np.float32(self.radii[1])) ** 2 + (dz / np.float32(self.radii[2])) ** 2
        else:
            q = None
            for ax in range(3):
                r = self.rot[:, ax].astype(np.float32) / np.float32(self.radii[ax])
                u = dx * r[0] + dy * r[1] + dz * r[2]
                q = u * u if q is None else q + u * u
        if self.deform is not None:
            q = q / (1.0 + self.deform(b.x, b.y, b.z, index=b.index)) ** 2
        return q

    def mask(self, b: Box) -> np.ndarray:
        return self.q(b) < 1.0


def seg_dist2(b: Box, p0, p1) -> np.ndarray:
    """Squared distance of every voxel in the box to the segment p0-p1 (mm)."""
    p0 = np.asarray(p0, np.float32)
    d = np.asarray(p1, np.float32) - p0
    L2 = float(d @ d) + 1e-9
    dx, dy, dz = b.x - p0[0], b.y - p0[1], b.z - p0[2]
    t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / L2, 0.0, 1.0)
    ex, ey, ez = dx - t * d[0], dy - t * d[1], dz - t * d[2]
    return ex * ex + ey * ey + ez * ez


def ball_offsets(radius_mm: float, spacing) -> np.ndarray:
    """Integer (i, j, k) offsets that may contain a voxel centre within radius of a point."""
    sp = np.asarray(spacing, dtype=np.float64)
    n = np.ceil(radius_mm / sp + 0.5).astype(int)
    gi, gj, gk = np.meshgrid(*[np.arange(-m, m + 1) for m in n], indexing="ij")
    off = np.stack([gi.ravel(), gj.ravel(), gk.ravel()], axis=1)
    reach = radius_mm + 0.5 * float(np.sqrt((sp ** 2).sum()))
    keep = ((off * sp) ** 2).sum(1) <= reach ** 2
    return off[keep]


def stamp_indices(grid: Grid, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Flat indices (into the [k, j, i] array) of a union of balls: every voxel whose centre lies
    within the radius of a point, plus each point's nearest voxel (so thin tubes never vanish).

    Used for tubes (dense points along a centreline), vessel trees, specks and stones.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    nk, nj, ni = grid.shape
    if len(centers) == 0:
        return np.zeros(0, np.int64)
    lim = np.array([ni, nj, nk])
    vox = (centers - grid.origin) / grid.spacing  # (N, 3) in i, j, k
    near = np.rint(vox).astype(np.int64)
    parts = []
    ok = np.all((near >= 0) & (near < lim), axis=1)
    parts.append(near[ok])
    q = 0.5
    rq = np.ceil(radii / q) * q
    for rc in np.unique(rq):
        sel = rq == rc
        offs = ball_offsets(rc, grid.spacing)
        if len(offs) <= 1:
            continue
        idx = near[sel][:, None, :] + offs[None, :, :]  # (n, m, 3)
        frac = ((near[sel] - vox[sel]) * grid.spacing).astype(np.float32)  # (n, 3)
        offm = (offs * grid.spacing).astype(np.float32)  # (m, 3)
        d2 = None
        for a in range(3):
            da = frac[:, None, a] + offm[None, :, a]
            d2 = da * da if d2 is None else d2 + da * da
        inside = d2 <= (radii[sel][:, None] ** 2).astype(np.float32)
        idx = idx[inside]
        ok = np.all((idx >= 0) & (idx < lim), axis=1)
        parts.append(idx[ok])
    idx = np.concatenate(parts)
    flat = (idx[:, 2] * nj + idx[:, 1]) * ni + idx[:, 0]
    return np.unique(flat)


def stamp_spheres(grid: Grid, centers: np.ndarray, radii: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean-volume version of :func:`stamp_indices`."""
    if out is None:
        out = np.zeros(grid.shape, dtype=bool)
    out.reshape(-1)[stamp_indices(grid, centers, radii)] = True
    return out


def polyline_points(points: np.ndarray, radii: np.ndarray, step: float):
    """Samples along a polyline at a uniform arc-length step, with interpolated radii.

    The step is ``max(step, 0.4 * smallest radius)``: thick tubes need few balls (the scalloping
    between balls 0.4 r apart is < 2 % of r)."""
    points = np.asarray(points, float)
    radii = np.asarray(radii, float)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    st = max(step, 0.4 * float(radii.min()))
    n = max(2, int(np.ceil(s[-1] / st)) + 1)
    t = np.linspace(0.0, s[-1], n)
    pts = np.stack([np.interp(t, s, points[:, a]) for a in range(3)], axis=1)
    return pts, np.interp(t, s, radii)


def segments_points(p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray, step: float):
    """Vectorised :func:`polyline_points` for many independent segments (N, 3)."""
    p0, p1 = np.asarray(p0, float).reshape(-1, 3), np.asarray(p1, float).reshape(-1, 3)
    r0, r1 = np.asarray(r0, float).reshape(-1), np.asarray(r1, float).reshape(-1)
    L = np.linalg.norm(p1 - p0, axis=1)
    st = np.maximum(step, 0.4 * np.minimum(r0, r1))
    n = np.maximum(2, np.ceil(L / st).astype(np.int64) + 1)
    seg = np.repeat(np.arange(len(n)), n)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    t = (np.arange(n.sum()) - start[seg]) / (n[seg] - 1)
    pts = p0[seg] + t[:, None] * (p1 - p0)[seg]
    return pts, r0[seg] + t * (r1 - r0)[seg]


def smooth_curve(ctrl: np.ndarray, n: int = 60) -> np.ndarray:
    """Catmull-Rom-like smooth curve through control points (no scipy splines needed)."""
    ctrl = np.asarray(ctrl, float)
    p = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    out = []
    for s in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[s - 1], p[s], p[s + 1], p[s + 2]
        t = np.linspace(0, 1, n, endpoint=False)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    out.append(ctrl[-1:])
    return np.vstack(out)


# ----------------------------------------------------------------------------- patient
def sample_patient(rng: np.random.Generator) -> dict:
    """Per-case body habitus, organ sizes and landmark heights (mm, patient frame)."""
    u = rng.uniform
    h = u(0.88, 1.12)  # body size
    fat = u(6, 38)  # subcutaneous fat (habitus)
    P = dict(
        h=h,
        fat=fat,
        a_chest=u(140, 165) * h,
        b_ant=u(95, 112) * h,
        b_post=u(88, 100) * h,
        belly=u(0.95, 1.25),
        wall=u(9, 15),
        z_dome_r=u(-5, 10),
        lung_height=u(215, 265) * h,
        heart_scale=u(0.9, 1.08) * h,
        liver_scale=u(0.9, 1.08) * h,
        spleen_scale=u(0.85, 1.1),
        kidney_scale=u(0.9, 1.1),
        aorta_r=u(11.5, 15.0),
        contrast=bool(rng.random() < 0.55),
        heart_shift=np.array([u(-12, 8), u(-8, 8), u(-8, 8)]),
    )
    P["z_dome_l"] = P["z_dome_r"] - u(10, 25)
    P["z_apex"] = P["z_dome_r"] + P["lung_height"] * u(0.92, 1.0)
    P["z_carina"] = P["z_apex"] - u(85, 110)
    P["z_kidney_l"] = P["z_dome_l"] - u(95, 120)
    P["z_kidney_r"] = P["z_kidney_l"] - u(8, 22)
    P["z_bif"] = P["z_kidney_r"] - u(80, 110)
    return P


def body_radii(P: dict, z: np.ndarray):
    """Outer body half-width a, anterior and posterior half-depth for slice heights z."""
    zr = P["z_dome_r"]
    t_abd = np.clip((zr - 20 - z) / 80.0, 0, 1)  # 0 in chest, 1 in abdomen
    fat = P["fat"]
    a = P["a_chest"] + fat * 0.9 + t_abd * fat * 0.4
    a = a * (1 - 0.06 * np.clip((z - P["z_apex"] + 40) / 60, 0, 1))
    b_ant = P["b_ant"] + fat * 0.6 + t_abd * (P["b_ant"] * (P["belly"] - 1) + fat * 0.6)
    b_post = P["b_post"] + fat * 0.4 + 0 * z
    return a, b_ant, b_post


def diaphragm_z(P: dict, x, y):
    """Height of the diaphragm dome surface at (x, y) (lungs above, abdomen below)."""
    zr, zl = P["z_dome_r"], P["z_dome_l"]
    ww = P["a_chest"] * 0.55
    dr = ((x - 0.42 * P["a_chest"]) / ww) ** 2 + ((y + 5) / (P["b_ant"] * 0.85)) ** 2
    dl = ((x + 0.42 * P["a_chest"]) / ww) ** 2 + ((y + 5) / (P["b_ant"] * 0.85)) ** 2
    zr_ = zr - 48 * dr - 18 * np.clip(-y / P["b_post"], 0, 1)
    zl_ = zl - 48 * dl - 18 * np.clip(-y / P["b_post"], 0, 1)
    return np.where(x >= 0, zr_, zl_)


@dataclass
class Anatomy:
    grid: Grid
    P: dict
    T: dict
    lab: np.ndarray
    hu: np.ndarray
    geo: dict = field(default_factory=dict)

    def paint(self, b: Box, mask: np.ndarray, label: int | None, hu, only: list[int] | None = None, exclude: list[int] | None = None):
        lab = self.lab[b.sl]
        if mask.shape != lab.shape:
            mask = np.broadcast_to(mask, lab.shape)
        if only is not None or exclude is not None:
            mask = mask.copy()
            if only is not None:
                mask &= isin(lab, only)
            if exclude is not None:
                mask &= ~isin(lab, exclude)
        if label is not None:
            lab[mask] = label
        hv = self.hu[b.sl]
        if np.ndim(hu) == 0:
            hv[mask] = hu
        else:
            hv[mask] = np.broadcast_to(hu, mask.shape)[mask]
        return mask


LUNG_IDS = [LABEL[n] for n in LOBES["left"] + LOBES["right"]]


# ----------------------------------------------------------------------------- builder
def build_anatomy(grid: Grid, P: dict, T: dict, rng: np.random.Generator) -> Anatomy:
    lab = np.zeros(grid.shape, dtype=np.uint8)
    hu = np.full(grid.shape, T["air"], dtype=np.float32)
    A = Anatomy(grid, P, T, lab, hu)
    _body_wall(A, rng)
    _spine(A, rng)
    _mediastinum_geometry(A, rng)
    _lungs(A, rng)
    _mediastinum_paint(A, rng)
    _abdomen(A, rng)
    _lung_vessels(A, rng)
    return A


def _body_wall(A: Anatomy, rng):
    P, T, g = A.P, A.T, A.grid
    full = g.full()
    z = g.z[:, None, None]
    a, b_ant, b_post = body_radii(P, z)
    shape2d = SmoothField(rng, 0.035, (60, 160), terms=3)
    fxy = shape2d(g.x[None, None, :], g.y[None, :, None], np.float32(0.0))  # (1, nj, ni)
    x, y = full.x, full.y

    f2 = ((1 + fxy) ** 2).astype(np.float32)
    xx = (g.x * g.x)[None, None, :]
    yy = (g.y * g.y)[None, :, None]
    pos = (g.y >= 0)[None, :, None]

    def q_of(a_, ba, bp, lam=0.35):
        a_ = np.asarray(a_, np.float32).reshape(-1, 1, 1)
        ba = np.asarray(ba, np.float32).reshape(-1, 1, 1)
        bp = np.asarray(bp, np.float32).reshape(-1, 1, 1)
        X2 = xx / (a_ * a_)                              # (nk, 1, ni)
        Y2 = yy / np.where(pos, ba * ba, bp * bp)         # (nk, nj, 1)
        s2 = X2 + Y2
        s4 = X2 * X2 + Y2 * Y2
        s2 *= np.float32(1 - lam)
        s4 *= np.float32(lam)
        s2 += s4
        s2 /= f2
        return s2

    fat = P["fat"]
    body = q_of(a, b_ant, b_post) < 1
    A.lab[body] = LABEL["body"]
    A.hu[body] = T["fat"]
    wall_a = a - fat * 0.9
    mus = q_of(wall_a, b_ant - fat * 0.75 - (b_ant - P["b_ant"]) * 0.3, b_post - fat * 0.5) < 1
    A.hu[mus] = T["muscle"]
    t_w = P["wall"]
    # the bony thorax narrows towards the thoracic inlet (shoulder girdle muscles fill the rest)
    ztap = np.clip((z - P["z_carina"] + 30) / (P["z_apex"] - P["z_carina"] + 30), 0, 1)
    taper = 1 - 0.3 * ztap ** 1.6
    ca = (wall_a - t_w) * taper
    cba = (b_ant - fat * 0.75 - (b_ant - P["b_ant"]) * 0.3 - t_w) * (1 - 0.15 * ztap ** 1.6)
    cbp = b_post - fat * 0.5 - t_w - 10 * P["h"]
    qc = q_of(ca, cba, cbp, lam=0.3)
    cav = qc < 1
    A.hu[cav] = T["fat"]
    A.geo["cavity_q"] = qc
    A.geo["cavity_radii"] = (ca, cba, cbp)
    A.geo["cavity"] = cav
    # diaphragm / abdominal cavity
    zd = diaphragm_z(P, x, y).astype(np.float32)  # (1, nj, ni)
    A.geo["zdia"] = zd
    below = z < zd - 5
    abd = cav & below
    A.geo["abdomen"] = abd
    dia = cav & (z >= zd - 5) & (z < zd)
    A.hu[dia] = T["muscle"]
    # peritoneal cavity: abdominal cavity anterior to the retroperitoneum
    cbp_s = P["b_post"] + fat * 0.4 - fat * 0.5 - t_w - 10 * P["h"]
    ysp = P["y_vb"] = -cbp_s + 16 * P["h"]
    retro = (y < ysp + 30 + 0.002 * x * x) | (np.abs(x) < 25) & (y < ysp + 45)
    perit = abd & ~retro
    A.lab[perit] = LABEL["peritoneal_cavity"]
    # ribs, sternum, costal cartilage in the chest wall band
    _ribs(A, rng, qc, ca, cba, cbp)


def _ribs(A: Anatomy, rng, qc, ca, cba, cbp):
    P, T, g = A.P, A.T, A.grid
    z_top = P["z_apex"] + 10
    z_low = P["z_dome_r"] - 150
    ca0 = float(np.mean(ca))
    lim = np.float32((1 + 16.0 / ca0) ** 2)
    zsel = ((g.z <= z_top) & (g.z >= z_low))[:, None, None]
    band = zsel & (qc >= 1) & (qc < lim) & (A.lab > 0)
    kk, jj, ii = np.nonzero(band)
    if kk.size == 0:
        return
    x, y, z = g.x[ii], g.y[jj], g.z[kk]
    ca_ = np.broadcast_to(np.asarray(ca, np.float32).reshape(-1), (g.shape[0],))[kk]
    rad_mm = (np.sqrt(qc[kk, jj, ii]) - 1.0) * ca_  # ~ radial distance outside the cavity wall
    phi = np.arctan2(np.abs(x), -y)  # 0 posterior midline .. pi anterior midline
    pitch = rng.uniform(24, 30) * P["h"]
    drop = rng.uniform(55, 85)
    w = (z_top - z) + drop * (phi / np.pi)  # ribs run lower anteriorly
    n = np.floor(w / pitch)
    frac = w / pitch - n - 0.5
    hz = rng.uniform(4.5, 6.0)
    tr = rng.uniform(3.0, 4.5)
    dz = frac * pitch / hz
    dr = (rad_mm - tr - 1.0) / tr
    ell = dz * dz + dr * dr
    phi_max = np.where(n >= 8, np.deg2rad(120 - 12 * (n - 8)), np.deg2rad(150))
    rib = (ell < 1) & (n >= 0) & (n <= 11) & (phi > np.deg2rad(12)) & (phi < phi_max)
    cart = (ell < 1) & (n >= 0) & (n <= 9) & (phi >= phi_max) & (phi < np.deg2rad(172))
    A.hu[kk[cart], jj[cart], ii[cart]] = rng.uniform(90, 200)
    A.geo["cartilage"] = (kk[cart], jj[cart], ii[cart])  # costal cartilage voxels (label body)
    A.lab[kk[rib], jj[rib], ii[rib]] = LABEL["ribs"]
    A.hu[kk[rib], jj[rib], ii[rib]] = np.where(ell[rib] > 0.35, T["rib_cortex"], T["bone_marrow"])
    # sternum
    zs0, zs1 = P["z_dome_r"] - 15, P["z_carina"] + 45
    st = (z < zs1) & (z > zs0) & (np.abs(x) < 16 * P["h"]) & (y > 0) & (rad_mm > 1) & (rad_mm < 13)
    inner = st & (rad_mm > 3.5) & (rad_mm < 10.5) & (np.abs(x) < 13 * P["h"])
    A.hu[kk[st], jj[st], ii[st]] = T["rib_cortex"]
    A.hu[kk[inner], jj[inner], ii[inner]] = T["bone_marrow"]


def _spine(A: Anatomy, rng):
    P, T, g = A.P, A.T, A.grid
    h = P["h"]
    yvb = P["y_vb"]
    zmin, zmax = float(g.z[0]), float(g.z[-1])
    b = g.box((-90 * h, yvb - 90 * h, zmin), (90 * h, yvb + 40 * h, zmax))
    if b is None:
        return
    z = b.z
    # vertebral body radii grow caudally (thoracic -> lumbar)
    t = np.clip((P["z_apex"] - z) / 400.0, 0, 1)
    rx = (15 + 10 * t) * h
    ry = (13 + 4 * t) * h
    yc = yvb + 0 * z
    A.geo["vb"] = lambda zz: ((15 + 10 * np.clip((P["z_apex"] - zz) / 400.0, 0, 1)) * h,
                              (13 + 4 * np.clip((P["z_apex"] - zz) / 400.0, 0, 1)) * h)
    dx, dy = b.x / rx, (b.y - yc) / ry
    qb = dx * dx + dy * dy
    # levels: vertebra height + disc
    period = rng.uniform(27, 32) * h
    phase = rng.uniform(0, period)
    s = ((z - phase) % period) / period
    disc = s < 0.2
    vb = (qb < 1) & ~disc
    dsc = (qb < 1) & disc
    cortex = vb & ((qb > 0.72) | (s < 0.26) | (s > 0.94))
    canal_y = yc - ry - 8 * h
    cq = (b.x / (7.5 * h)) ** 2 + ((b.y - canal_y) / (7.0 * h)) ** 2
    canal = cq < 1
    arch = (cq < 2.6) & ~canal & ~disc & (b.y < yc - ry + 2)
    spinous = (np.abs(b.x) < 3.5 * h) & (b.y < canal_y - 6 * h) & (b.y > canal_y - 33 * h) & (s > 0.3) & (s < 0.85)
    trans = (np.abs(np.abs(b.x) - 20 * h) < 8 * h) & (np.abs(b.y - canal_y - 2) < 3.5 * h) & (s > 0.4) & (s < 0.7)
    post = (arch | spinous | trans) & ~canal
    # paraspinal muscles and psoas
    para = ((np.abs(b.x) - 30 * h) / (22 * h)) ** 2 + ((b.y - canal_y + 14 * h) / (22 * h)) ** 2 < 1
    tpsoas = np.clip((P["z_kidney_r"] + 40 - z) / 120.0, 0, 1)
    psoas = (tpsoas > 0) & (((np.abs(b.x) - (rx + 14 * h * tpsoas)) / (6 + 14 * h * tpsoas)) ** 2 + ((b.y - yc + 2) / (5 + 12 * h * tpsoas)) ** 2 < 1)
    lab, hu = A.lab[b.sl], A.hu[b.sl]
    inbody = lab > 0
    m = (para | psoas) & inbody
    hu[m] = T["muscle"]
    lab[m & (lab == LABEL["peritoneal_cavity"])] = LABEL["body"]
    hu[canal & inbody] = T["csf"]
    lab[canal & inbody] = LABEL["body"]
    hu[dsc] = T["disc"]
    lab[dsc] = LABEL["spine"]
    bone = (vb | post) & inbody
    lab[bone] = LABEL["spine"]
    hu[bone] = T["bone_marrow"]
    hu[(cortex | (post & ~(arch & (cq < 1.6)))) & inbody] = T["bone_cortex"]
    hu[arch & inbody & (cq >= 1.6)] = T["bone_cortex"]
    A.geo["spine_box"] = b
    A.geo["spine_solid"] = (qb < 1.35) | (cq < 3.0) | para


def _mediastinum_geometry(A: Anatomy, rng):
    """Shapes of heart, aorta, airway and esophagus (painted after the lungs)."""
    P = A.P
    h = P["h"]
    u = rng.uniform
    yvb = P["y_vb"]
    zd_mid = float(diaphragm_z(P, np.float32(-15.0), np.float32(10.0)))
    hs = P["heart_scale"] * P.get("cardiomegaly", 1.0)
    radii = np.array([62.0, 47.0, 40.0]) * hs
    axis = np.array([-0.62, 0.55, -0.45])
    axis /= np.linalg.norm(axis)
    tmp = np.cross(axis, [0, 0, 1.0])
    e2 = tmp / np.linalg.norm(tmp)
    e3 = np.cross(axis, e2)
    rot = np.stack([axis, e2, e3], axis=1)
    c = np.array([-24.0 * h, 30.0 * h, 0.0]) + P["heart_shift"]
    low = np.sqrt(((rot * radii) ** 2)[2].sum())
    c[2] = zd_mid + low * 0.8
    heart = Ellipsoid(c, radii, rot, SmoothField(rng, 0.05, (60, 150), 2))
    A.geo["heart"] = heart
    A.geo["peri_t"] = P.get("pericardial_fluid_mm", u(1.5, 3.0))
    # aorta centreline: root -> ascending -> arch -> descending -> bifurcation
    r0 = P["aorta_r"]
    top = c + heart.rot @ np.array([-0.5 * radii[0], 0, 0])
    root = np.array([c[0] + 18 * h, c[1] - 5 * h, c[2] + 0.55 * radii[0]])
    z_arch = P["z_carina"] + u(12, 28)
    asc_top = np.array([root[0] + 4, root[1] + 3, z_arch])
    desc_top = np.array([-22.0 * h, yvb + 28 * h, z_arch])
    mid = 0.5 * (asc_top + desc_top)
    R = 0.5 * np.linalg.norm(asc_top - desc_top)
    arch_apex = mid + np.array([0, 0, R * 0.85])
    ctrl = [root, 0.5 * (root + asc_top), asc_top, 0.5 * (asc_top + arch_apex) + np.array([0, 0, R * 0.35]), arch_apex,
            0.5 * (desc_top + arch_apex) + np.array([0, 0, R * 0.35]), desc_top]
    zb = P["z_bif"]
    zd_l = float(diaphragm_z(P, np.float32(-20.0), np.float32(yvb + 30)))
    ctrl += [np.array([-20.0 * h, yvb + 26 * h, zd_l]), np.array([-10.0 * h, yvb + 26 * h, (zd_l + zb) / 2]),
             np.array([-5.0 * h, yvb + 27 * h, zb])]
    line = smooth_curve(np.array(ctrl), n=14)
    # radius along the line (arc length based taper)
    seg = np.linalg.norm(np.diff(line, axis=0), axis=1)
    s = np.concatenate([[0], np.cumsum(seg)])
    s_arch_end = s[np.argmin(np.linalg.norm(line - desc_top, axis=1))]
    rad = np.where(s < s_arch_end, r0 * 1.05, r0 * np.interp(s, [s_arch_end, s[-1]], [0.92, 0.68]))
    A.geo["aorta_line"] = line
    A.geo["aorta_s"] = s
    A.geo["aorta_r"] = rad
    if "aneurysm" in P:
        an = P["aneurysm"]
        if an["site"] == "abdominal":
            # infrarenal: below the kidneys' hila
            z_c = P["z_kidney_r"] - u(25, 55)
            k = np.argmin(np.abs(line[:, 2] - z_c) + 1e6 * (s < s_arch_end))
        else:
            k = np.argmin(np.abs(s - s[np.argmin(np.abs(line[:, 2] - (root[2] + 0.6 * (z_arch - root[2]))) + 1e6 * (s > s_arch_end))]))
        s_c = s[k]
        L = an["length"]
        bump = np.exp(-0.5 * ((s - s_c) / (L / 2.6)) ** 2)
        rmax_target = an["diameter"] / 2
        rad = rad + (rmax_target - rad[k]) * bump
        A.geo["aorta_r"] = rad
        A.geo["aneurysm_s"] = (s_c - L * 0.6, s_c + L * 0.6)
    # airway
    ytr = yvb + 48 * h
    A.geo["trachea"] = dict(x=u(-3, 3), y=ytr, r=u(8, 11) * h, z0=P["z_carina"])
    tr = A.geo["trachea"]
    carina = np.array([tr["x"], ytr - 2, P["z_carina"]])
    A.geo["bronchi"] = {
        "right": (carina, carina + np.array([38 * h, -4, -28]), 0.75 * tr["r"]),
        "left": (carina, carina + np.array([-45 * h, -6, -38]), 0.68 * tr["r"]),
    }
    A.geo["svc"] = (tr_x_svc := A.geo["trachea"]["x"] + 19 * h, ytr + 13 * h)
    A.geo["esophagus"] = dict(x=-6 * h, y=yvb + 27 * h, r=u(7, 9) * h)
    A.geo["hilum"] = {"right": carina + np.array([42 * h, -4, -34]), "left": carina + np.array([-48 * h, -6, -42])}


def _aorta_mask(A: Anatomy, b: Box, grow: float = 0.0, s_range=None) -> np.ndarray:
    line, rad, s = A.geo["aorta_line"], A.geo["aorta_r"], A.geo["aorta_s"]
    pts, rs = line, rad
    if s_range is not None:
        keep = (s >= s_range[0]) & (s <= s_range[1])
        pts, rs = line[keep], rad[keep]
    m = np.zeros(np.broadcast_shapes(b.z.shape, b.y.shape, b.x.shape), bool)
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], rs[:-1], rs[1:]):
        rr = max(r0, r1) + grow
        lo = np.minimum(p0, p1) - rr
        hi = np.maximum(p0, p1) + rr
        sub = _subbox(b, lo, hi)
        if sub is None:
            continue
        sb, ssl = sub
        m[ssl] |= seg_dist2(sb, p0, p1) < rr * rr
    return m


def _subbox(b: Box, lo, hi):
    """A Box restricted to the mm range [lo, hi], with slices relative to b."""
    xs, ys, zs = b.x[0, 0, :], b.y[0, :, 0], b.z[:, 0, 0]

    def rng1(v, a, c):
        i0 = int(np.searchsorted(v, a, "left"))
        i1 = int(np.searchsorted(v, c, "right"))
        return i0, i1

    i0, i1 = rng1(xs, lo[0], hi[0])
    j0, j1 = rng1(ys, lo[1], hi[1])
    k0, k1 = rng1(zs, lo[2], hi[2])
    if i1 <= i0 or j1 <= j0 or k1 <= k0:
        return None
    ssl = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
    return Box(None, b.x[:, :, i0:i1], b.y[:, j0:j1, :], b.z[k0:k1]), ssl


def _lungs(A: Anatomy, rng):
    P, T, g = A.P, A.T, A.grid
    h = P["h"]
    z0 = min(P["z_dome_r"], P["z_dome_l"]) - 110
    b = g.box((-400, -400, z0), (400, 400, P["z_apex"] + 5))
    if b is None:
        A.geo["lung_region"] = {}
        return
    cav = A.geo["cavity"][b.sl]
    zd = A.geo["zdia"][:, b.sl[1], b.sl[2]]
    x, y, z = b.x, b.y, b.z
    region = cav & (z >= zd)
    # apical dome per side
    ca, cba, cbp = A.geo["cavity_radii"]
    ca0 = float(np.mean(ca)) if np.ndim(ca) else float(ca)
    heart = A.geo["heart"]
    # exclusions: mediastinum band, heart, aorta, spine block, airway, esophagus
    zc = P["z_carina"]
    wmed = 9 + 12 * np.clip((z - zc + 20) / 90.0, 0, 1) ** 0.7
    ymed = A.geo["trachea"]["y"]
    medband = (np.abs(x + 4) < wmed) & (y > A.P["y_vb"] - 10)
    hb = heart.scaled(1.0, 9.0)
    lo, hi = hb.bbox()
    sub = _subbox(b, lo, hi)
    excl = medband.copy() if medband.shape == region.shape else np.broadcast_to(medband, region.shape).copy()
    if sub is not None:
        sb, ssl = sub
        excl[ssl] |= hb.mask(sb)
    excl |= _aorta_mask(A, b, grow=5.0)
    sp = A.geo.get("spine_box")
    rx, ry = A.geo["vb"](z)
    spine_block = ((x / (rx + 4)) ** 2 + ((y - P["y_vb"]) / (ry + 4)) ** 2 < 1) | ((np.abs(x) < (rx + 4)) & (y < P["y_vb"]))
    excl |= np.broadcast_to(spine_block, excl.shape)
    tr = A.geo["trachea"]
    es = A.geo["esophagus"]
    excl |= ((x - tr["x"]) ** 2 + (y - tr["y"]) ** 2 < (tr["r"] + 8) ** 2) & (z > zc - 10)
    excl |= ((x - es["x"]) ** 2 + (y - es["y"]) ** 2 < (es["r"] + 6) ** 2)
    sx_, sy_ = A.geo["svc"]
    excl |= ((x - sx_) ** 2 + (y - sy_) ** 2 < (9 * h + 5) ** 2) & (z > A.geo["heart"].center[2])
    region &= ~excl
    # lung envelopes (dome-shaped apex), per side
    lab, hu = A.lab[b.sl], A.hu[b.sl]
    A.geo["lung_box"] = b
    A.geo["lung_region"] = {}
    for side, sgn in (("right", 1.0), ("left", -1.0)):
        zc_env = P["z_dome_r"] - 60
        H = P["z_apex"] - zc_env
        env = Ellipsoid(np.array([sgn * 0.48 * ca0, -12.0, zc_env]), np.array([0.68 * ca0, 170.0 * h, H]),
                        deform=SmoothField(rng, 0.03, (80, 200), 2))
        side_m = region & (sgn * x > 0) & (lab > 0)
        kk, jj, ii = np.nonzero(side_m)  # evaluate the envelope on candidate voxels only
        inside = env.mask(points_box(b, kk, jj, ii))
        side_m[kk[~inside], jj[~inside], ii[~inside]] = False
        A.geo["lung_region"][side] = side_m
    # pleural shell = lung-space voxels touching the outside
    st = ndimage.generate_binary_structure(3, 1)
    for side, sgn in (("right", 1.0), ("left", -1.0)):
        m = A.geo["lung_region"][side]
        core = np.zeros_like(m)
        nzk = np.flatnonzero(m.any(axis=(1, 2)))
        if nzk.size:
            nzj = np.flatnonzero(m[nzk[0]:nzk[-1] + 1].any(axis=(0, 2)))
            nzi = np.flatnonzero(m[nzk[0]:nzk[-1] + 1].any(axis=(0, 1)))
            cs = (slice(nzk[0], nzk[-1] + 1), slice(nzj[0], nzj[-1] + 1), slice(nzi[0], nzi[-1] + 1))
            core[cs] = ndimage.binary_erosion(m[cs], st, iterations=1, border_value=0)
        shell = m & ~core
        kk, jj, ii = np.nonzero(core)
        pts = points_box(b, kk, jj, ii)  # 1-D coordinates of lung voxels
        lobes = _lobe_split(A, pts, side, rng)
        hu[kk, jj, ii] = T["lung"]
        for name, lm in lobes.items():
            lab[kk[lm], jj[lm], ii[lm]] = LABEL[name]
        lab[shell] = LABEL[f"pleural_space_{side}"]
        hu[shell] = T["lung"] * 0.9 + T["soft"] * 0.1


def _lobe_split(A: Anatomy, b: Box, side: str, rng) -> dict[str, np.ndarray]:
    P = A.P
    u = rng.uniform
    x, y, z = b.x, b.y, b.z
    hil = A.geo["hilum"][side]
    f = SmoothField(rng, 6.0, (60, 160), 2)
    slope = u(0.9, 1.35)
    z_obl = hil[2] + u(5, 25) - slope * (y - hil[1]) + f(x, y, z, index=b.index)
    upper = z > z_obl
    if side == "left":
        return {"lung_upper_lobe_left": upper, "lung_lower_lobe_left": ~upper}
    z_hor = hil[2] + u(-5, 12) + 0.08 * (y - hil[1]) + f(x, y, z, index=b.index)[::1] * 0.5
    middle = upper & (z <= z_hor) & (y > hil[1] - 20)
    return {"lung_upper_lobe_right": upper & ~middle, "lung_middle_lobe_right": middle,
            "lung_lower_lobe_right": ~upper}


def _mediastinum_paint(A: Anatomy, rng):
    P, T, g = A.P, A.T, A.grid
    h = P["h"]
    heart = A.geo["heart"]
    t = A.geo["peri_t"]
    peri = heart.scaled(1.0, t)
    lo, hi = peri.bbox(2)
    b = g.box(lo, hi)
    if b is not None:
        incav = A.geo["cavity"][b.sl] & (b.z >= A.geo["zdia"][:, b.sl[1], b.sl[2]] - 6)
        pm = peri.mask(b) & incav
        fluid = P.get("pericardial_fluid_mm", 0) > 0
        A.paint(b, pm, LABEL["pericardium"], T["fluid"] if fluid else (T["soft"] - 15))
        hm = heart.mask(b) & incav
        qin = heart.scaled(1.0, -7.0 * h).q(b)
        # chambers: a septal plane along the long axis splits right (anterior-right) from left
        # heart, an atrioventricular plane splits atria (base) from ventricles (apex side)
        ax_long, ax2 = heart.rot[:, 0], heart.rot[:, 1]
        dx, dy, dz = b.x - heart.center[0], b.y - heart.center[1], b.z - heart.center[2]
        n_sep = np.cross(ax_long, [0.0, 0.0, 1.0])
        n_sep /= np.linalg.norm(n_sep)
        ssep = dx * n_sep[0] + dy * n_sep[1] + dz * n_sep[2]
        slong = dx * ax_long[0] + dy * ax_long[1] + dz * ax_long[2]
        right_heart = ssep > 0 if n_sep[0] > 0 else ssep < 0  # towards the patient's right
        blood_r = T["blood"] if not A.P["contrast"] else T["blood"] * 0.75 + T["blood_venous"] * 0.25
        val = np.where(right_heart, blood_r, T["blood"]).astype(np.float32)
        lv_wall = (~right_heart) & (qin > 0.62) & (slong > -0.1 * heart.radii[0])  # thick LV wall
        wall = (qin >= 1) | lv_wall | (np.abs(ssep) < 4.0 * h) & (slong > -0.1 * heart.radii[0]) \
            | (np.abs(slong + 0.1 * heart.radii[0]) < 2.5) & (qin < 1)
        val = np.where(wall, np.float32(T["myocardium"]), val)
        A.paint(b, hm, LABEL["heart"], val)
    # great veins (label body): SVC and IVC, pulmonary trunk
    zc = P["z_carina"]
    hz = heart.center[2]
    svc = g.box((10 * h, -100, hz), (60 * h, 100, P["z_apex"] + 50))
    if svc is not None:
        cx, cy = A.geo["svc"]
        m = (svc.x - cx) ** 2 + (svc.y - cy) ** 2 < (9 * h) ** 2
        A.paint(svc, m, LABEL["body"], T["blood_venous"], exclude=[LABEL["heart"], LABEL["pericardium"]])
    ivc = g.box((0, -150, float(g.z[0])), (60 * h, 150, hz - 20))
    if ivc is not None:
        cy = P["y_vb"] + 30 * h
        m = (ivc.x - 22 * h) ** 2 + (ivc.y - cy) ** 2 < (11 * h) ** 2
        A.paint(ivc, m, LABEL["body"], T["blood_venous"], exclude=[LABEL["heart"]])
    pa0 = heart.center + heart.rot @ np.array([-0.3 * heart.radii[0], 0, 0]) + np.array([-15, 10, 25])
    pa1 = np.array([-5.0, A.geo["trachea"]["y"] + 5, zc - 15])
    b2 = g.box(np.minimum(pa0, pa1) - 16, np.maximum(pa0, pa1) + 16)
    if b2 is not None:
        m = seg_dist2(b2, pa0, pa1) < (12 * h) ** 2
        A.paint(b2, m, LABEL["body"], T["blood"] * 0.85 + T["blood_venous"] * 0.15, only=[LABEL["body"], LABEL["pericardium"]])
    # aorta
    line = A.geo["aorta_line"]
    rmax = float(A.geo["aorta_r"].max())
    b = g.box(line.min(0) - rmax - 2, line.max(0) + rmax + 2)
    if b is not None:
        am = _aorta_mask(A, b)
        am &= A.lab[b.sl] > 0
        A.paint(b, am, LABEL["aorta"], T["blood"], exclude=[LABEL["spine"]])
        A.geo["aorta_box"] = b
    # trachea + main bronchi
    tr = A.geo["trachea"]
    b = g.box((tr["x"] - 20, tr["y"] - 20, tr["z0"] - 5), (tr["x"] + 20, tr["y"] + 20, float(g.z[-1]) + 1))
    if b is not None:
        d2 = (b.x - tr["x"]) ** 2 + (b.y - tr["y"]) ** 2 + 0 * b.z
        outer = (d2 < (tr["r"] + 2) ** 2) & (b.z >= tr["z0"])
        inner = (d2 < tr["r"] ** 2) & (b.z >= tr["z0"])
        A.paint(b, outer, LABEL["trachea"], T["soft"], only=[LABEL["body"]] + LUNG_IDS + [LABEL["pleural_space_left"], LABEL["pleural_space_right"]])
        A.paint(b, inner, LABEL["trachea"], T["air"], only=[LABEL["trachea"]])
    for side, (p0, p1, r) in A.geo["bronchi"].items():
        b = g.box(np.minimum(p0, p1) - r - 3, np.maximum(p0, p1) + r + 3)
        if b is None:
            continue
        d2 = seg_dist2(b, p0, p1)
        A.paint(b, d2 < (r + 1.8) ** 2, LABEL["trachea"], T["soft"], exclude=[LABEL["aorta"], LABEL["heart"], LABEL["spine"]])
        A.paint(b, d2 < r ** 2, LABEL["trachea"], T["air"], only=[LABEL["trachea"]])
    # esophagus (collapsed, sometimes a small air lumen) down to the gastric cardia
    es = A.geo["esophagus"]
    zgej = P["z_dome_l"] - 25
    b = g.box((es["x"] - 60, es["y"] - 20, zgej), (es["x"] + 20, es["y"] + 20, float(g.z[-1]) + 1))
    if b is not None:
        tt = np.clip((zgej + 60 - b.z) / 60.0, 0, 1)
        cx = es["x"] - 30 * h * tt
        cy = es["y"] + 8 * tt
        d2 = (b.x - cx) ** 2 + (b.y - cy) ** 2
        A.paint(b, d2 < es["r"] ** 2, LABEL["esophagus"], T["soft"] + 5, only=[LABEL["body"], LABEL["peritoneal_cavity"]] + LUNG_IDS)
        if rng.random() < 0.5:
            A.paint(b, d2 < (es["r"] * 0.35) ** 2, None, T["air"], only=[LABEL["esophagus"]])


def _abdomen(A: Anatomy, rng):
    P, T, g = A.P, A.T, A.grid
    h = P["h"]
    u = rng.uniform
    zr, zl = P["z_dome_r"], P["z_dome_l"]
    yvb = P["y_vb"]
    abd_ids = [LABEL["body"], LABEL["peritoneal_cavity"]]
    ls = P["liver_scale"] * P.get("hepatomegaly", 1.0)
    # liver: right lobe + left lobe, below the right dome
    right = Ellipsoid(np.array([62 * h, -2.0 * h, zr - 62 * ls]), np.array([68 * h, 72 * h, 74 * ls]) * ls ** 0.3,
                      rotation((0, 0, u(-10, 10))), SmoothField(rng, 0.08, (60, 160), 3))
    left = Ellipsoid(np.array([-5 * h, 38 * h, zr - 42]), np.array([58 * h, 32 * h, 36 * ls]) * ls ** 0.3,
                     rotation((0, u(-15, 5), u(-20, 0))), SmoothField(rng, 0.1, (50, 120), 2))
    A.geo["liver_parts"] = (right, left)
    lo = np.minimum(right.bbox()[0], left.bbox()[0])
    hi = np.maximum(right.bbox()[1], left.bbox()[1])
    b = g.box(lo, hi)
    if b is not None:
        abd = A.geo["abdomen"][b.sl]
        m = (right.mask(b) | left.mask(b)) & abd
        A.paint(b, m, LABEL["liver"], T["liver"], only=abd_ids)
    # gallbladder (under the liver, anterior)
    gb = Ellipsoid(np.array([42 * h, 38 * h, zr - 105 * ls]), np.array([15, 15, 36]) * u(0.8, 1.15),
                   rotation((u(-25, -10), u(5, 20), 0)), SmoothField(rng, 0.06, (40, 90), 2))
    A.geo["gallbladder"] = gb
    b = g.box(*gb.bbox())
    if b is not None:
        m = gb.mask(b) & A.geo["abdomen"][b.sl]
        A.paint(b, m, LABEL["gallbladder"], T["bile"], only=abd_ids + [LABEL["liver"]])
    # spleen (posterolateral left)
    ss = P["spleen_scale"] * P.get("splenomegaly", 1.0)
    sp = Ellipsoid(np.array([-82 * h - 8 * (ss - 1), -38 * h, zl - 20 - 50 * ss]), np.array([24 * ss ** 0.6, 50 * ss ** 0.9, 55 * ss]) * h,
                   rotation((0, 0, u(-40, -20))), SmoothField(rng, 0.07, (50, 120), 2))
    A.geo["spleen"] = sp
    b = g.box(*sp.bbox())
    if b is not None:
        m = sp.mask(b) & A.geo["abdomen"][b.sl]
        A.paint(b, m, LABEL["spleen"], T["spleen"], only=abd_ids)
    # stomach: wall + dependent fluid + anterior air
    st = Ellipsoid(np.array([-45 * h, 28 * h, zl - 55]), np.array([40, 32, 58]) * h * u(0.8, 1.1),
                   rotation((u(-10, 10), u(15, 35), u(-30, -10))), SmoothField(rng, 0.1, (40, 110), 3))
    b = g.box(*st.bbox())
    if b is not None:
        m = st.mask(b) & A.geo["abdomen"][b.sl]
        m = A.paint(b, m, LABEL["stomach"], T["gut_wall"], only=abd_ids)
        inner = st.scaled(1.0, -5.0).mask(b) & m
        level = st.center[1] + u(-0.2, 0.6) * st.radii[1]
        air = inner & (b.y > level)
        A.paint(b, inner, None, T["fluid"] + 10)
        A.paint(b, air, None, T["air"])
    # pancreas: curved tube head -> tail
    zp = P["z_kidney_l"] + 28
    ctrl = np.array([[28 * h, yvb + 58 * h, zp - 18], [8 * h, yvb + 66 * h, zp - 6], [-25 * h, yvb + 60 * h, zp + 4],
                     [-62 * h, yvb + 40 * h, zp + 14], [-80 * h, yvb + 22 * h, zp + 20]])
    ctrl += rng.normal(0, 4, ctrl.shape)
    line = smooth_curve(ctrl, 12)
    rads = np.interp(np.linspace(0, 1, len(line)), [0, 0.25, 1], [15, 11, 9]) * h
    pts, rs = polyline_points(line, rads, 0.7 * float(g.spacing.min()))
    pm = stamp_indices(g, pts, rs)
    pm = pm[A.geo["abdomen"].reshape(-1)[pm] & isin(A.lab.reshape(-1)[pm], abd_ids + [LABEL["liver"]])]
    A.lab.reshape(-1)[pm] = LABEL["pancreas"]
    A.hu.reshape(-1)[pm] = T["pancreas"]
    # kidneys: cortex shell, medulla, sinus fat
    ks = P["kidney_scale"]
    for side, sgn in (("right", 1.0), ("left", -1.0)):
        zk = P[f"z_kidney_{'r' if side == 'right' else 'l'}"]
        kd = Ellipsoid(np.array([sgn * 72 * h, yvb + 8 * h, zk]), np.array([26, 23, 52]) * ks * h,
                       rotation((u(-25, -10), sgn * u(-20, -8), sgn * u(20, 40))), SmoothField(rng, 0.05, (40, 100), 2))
        A.geo[f"kidney_{side}"] = kd
        b = g.box(*kd.bbox())
        if b is None:
            continue
        m = kd.mask(b) & A.geo["cavity"][b.sl] & (b.z < A.geo["zdia"][:, b.sl[1], b.sl[2]] - 5)
        q_in = kd.scaled(1.0, -7.0).q(b)
        # sinus: medial, central
        sinus = Ellipsoid(kd.center + np.array([-sgn * 12 * h, 4, 0]), np.array([9, 9, 26]) * ks * h, kd.rot)
        qs = sinus.q(b)
        val = np.where(q_in < 1, T["kidney_medulla"], T["kidney_cortex"])
        val = np.where(qs < 1, T["fat"] + 20, val)
        A.paint(b, m, LABEL[f"kidney_{side}"], val, only=abd_ids + [LABEL["liver"]])
    # colon (frames the abdomen) and small bowel loops: label body
    _bowel(A, rng)
    _liver_vessels(A, rng)


def _liver_vessels(A: Anatomy, rng):
    """Portal / hepatic vein branches inside the liver: brighter than parenchyma with contrast,
    slightly darker without (label stays liver)."""
    g, T, P = A.grid, A.T, A.P
    cand = np.flatnonzero(A.lab == LABEL["liver"])
    if cand.size < 500:
        return
    cand = cand[rng.choice(cand.size, size=min(cand.size, 1500), replace=False)]
    kk, jj, ii = np.unravel_index(cand, g.shape)
    L = np.stack([g.x[ii], g.y[jj], g.z[kk]], axis=1).astype(np.float64)
    c = L.mean(0)
    root = c + np.array([-25.0, 5.0, -15.0])
    pts, rs = [], []
    parents = [(root, 6.0 * P["h"])]
    for lev, (nch, r1, reach) in enumerate([(4, 4.0, np.inf), (3, 2.5, 45.0), (2, 1.5, 30.0)]):
        nxt = []
        for p, rp in parents:
            d = np.linalg.norm(L - p, axis=1)
            idx = np.flatnonzero((d < reach) & (d > 12))
            if idx.size == 0:
                continue
            for q in L[idx[rng.choice(idx.size, size=min(nch, idx.size), replace=False)]]:
                if lev == 0:
                    q = p + (q - p) * 0.6
                pp, rr = polyline_points(np.array([p, q]), np.array([rp, r1 * P["h"]]), 0.8 * float(g.spacing.min()))
                pts.append(pp)
                rs.append(rr)
                nxt.append((q, r1 * P["h"]))
        parents = nxt
    if not pts:
        return
    idx = stamp_indices(g, np.concatenate(pts), np.concatenate(rs))
    idx = idx[A.lab.reshape(-1)[idx] == LABEL["liver"]]
    A.hu.reshape(-1)[idx] = (T["liver"] + rng.uniform(25, 60)) if P["contrast"] else (T["liver"] - rng.uniform(8, 18))


def _bowel(A: Anatomy, rng):
    P, T, g = A.P, A.T, A.grid
    h = P["h"]
    ca, cba, cbp = A.geo["cavity_radii"]
    ca0 = float(np.mean(ca)) if np.ndim(ca) else float(ca)
    zr = P["z_dome_r"]
    zk = P["z_kidney_r"]
    j = lambda s: rng.normal(0, s, 3)
    ctrl = np.array([
        [0.62 * ca0, 10, zk - 120], [0.66 * ca0, 5, zk - 40], [0.55 * ca0, 20, zr - 110],
        [0.2 * ca0, 55 * h, zr - 120 - rng.uniform(0, 50)], [-0.3 * ca0, 50 * h, zr - 110],
        [-0.62 * ca0, 0, zr - 80], [-0.66 * ca0, -5, zk - 40], [-0.6 * ca0, 10, zk - 120],
    ]) + np.array([j(5) for _ in range(8)])
    line = smooth_curve(ctrl, 16)
    rads = np.full(len(line), rng.uniform(17, 24) * h)
    pts, rs = polyline_points(line, rads, float(g.spacing.min()))
    labf, huf = A.lab.reshape(-1), A.hu.reshape(-1)
    PER = LABEL["peritoneal_cavity"]
    wall = stamp_indices(g, pts, rs)
    wall = wall[labf[wall] == PER]
    lumen = stamp_indices(g, pts, rs - 3)
    lumen = lumen[labf[lumen] == PER]
    labf[wall] = LABEL["body"]
    huf[wall] = T["gut_wall"]
    # lumen: gas non-dependent, mottled stool dependent
    # (random cells of ~6 mm hashed from a small table: irregular, no lattice-like pattern)
    table = rng.random((23, 19, 17)).astype(np.float32)
    cell = rng.uniform(3.0, 5.0)
    rot = rotation(rng.uniform(-180, 180, 3))  # oblique cells: no axis-aligned blocks
    if lumen.size:
        kk, jj, ii = np.unravel_index(lumen, g.shape)
        xs, ys, zs = g.x[ii], g.y[jj], g.z[kk]
        uvw = np.stack([xs, ys, zs], axis=1) @ rot
        # two octaves of hashed cells -> irregular mottling
        m1 = table[(np.floor(uvw[:, 0] / cell).astype(np.int64) % 23), (np.floor(uvw[:, 1] / cell).astype(np.int64) % 19),
                   (np.floor(uvw[:, 2] / cell).astype(np.int64) % 17)]
        m2 = table[(np.floor(uvw[:, 1] / (2.3 * cell)).astype(np.int64) % 23), (np.floor(uvw[:, 2] / (2.3 * cell)).astype(np.int64) % 19),
                   (np.floor(uvw[:, 0] / (2.3 * cell)).astype(np.int64) % 17)]
        mott = 0.4 * m1 + 0.6 * m2
        gas_level = rng.uniform(0, 40)
        gas = (mott > rng.uniform(0.72, 0.85)) | (ys > gas_level + 25 * mott)
        huf[lumen] = np.where(gas, T["air"], T["stool"] + 90 * (mott - 0.5))
    # small bowel loops: random walks in the lower central abdomen, rasterised in three passes
    # (all walls, fluid-filled lumens, gas-filled lumens)
    n_loops = int(rng.integers(10, 18))
    walls_p, walls_r, lum = [], [], {True: ([], []), False: ([], [])}
    for _ in range(n_loops):
        p = np.array([rng.uniform(-0.4, 0.4) * ca0, rng.uniform(0, 60) * h, rng.uniform(zk - 120, zk + 20)])
        d = rng.normal(size=3)
        pts_ = [p]
        for _s in range(rng.integers(8, 16)):
            d = d + rng.normal(0, 0.8, 3)
            d /= np.linalg.norm(d)
            p = p + d * 14
            pts_.append(p)
        pts_ = np.array(pts_)
        r = rng.uniform(9, 13) * h
        pp, rr = polyline_points(pts_, np.full(len(pts_), r), float(g.spacing.min()))
        walls_p.append(pp)
        walls_r.append(rr)
        gas = bool(rng.random() >= 0.7)
        lum[gas][0].append(pp)
        lum[gas][1].append(rr - 2.5)
    w = stamp_indices(g, np.concatenate(walls_p), np.concatenate(walls_r))
    w = w[labf[w] == PER]
    fluid_hu = T["fluid"] + rng.uniform(5, 30)
    lumens = {}
    for gas, (pl, rl) in lum.items():
        if pl:
            lm = stamp_indices(g, np.concatenate(pl), np.concatenate(rl))
            lumens[gas] = lm[labf[lm] == PER]
    labf[w] = LABEL["body"]
    huf[w] = T["gut_wall"]
    for gas, lm in lumens.items():
        huf[lm] = T["air"] if gas else fluid_hu


def _lung_vessels(A: Anatomy, rng):
    """Pulmonary vessels: hierarchical branches from the hilum towards random targets inside the
    lung (so every branch stays in the lung), radii tapering 5 mm -> <1 mm. The bigger branches'
    centrelines double as bronchi (for air bronchograms in consolidation)."""
    P, T, g = A.P, A.T, A.grid
    h = P["h"]
    step = 0.8 * float(g.spacing.min())
    segs, airs = [], []
    for side in ("right", "left"):
        ids = anatomy_labels(f"lung_{side}")
        cand = np.flatnonzero(isin(A.lab, ids))
        if cand.size < 200:
            continue
        cand = cand[rng.choice(cand.size, size=min(cand.size, 2500), replace=False)]
        kk, jj, ii = np.unravel_index(cand, g.shape)
        L = np.stack([g.x[ii], g.y[jj], g.z[kk]], axis=1).astype(np.float64)
        hil = A.geo["hilum"][side].astype(np.float64)
        dh = np.linalg.norm(L - hil, axis=1)
        parents = [(hil, 5.5 * h)]
        fan = [8, 3, 3, 3]
        radius = [5.0, 3.2, 2.0, 1.2]
        reach = [np.inf, 55.0, 35.0, 22.0]
        for lev, nchild in enumerate(fan):
            nxt = []
            for p, rp in parents:
                dp = np.linalg.norm(L - p, axis=1)
                ok = (dp < reach[lev]) & (dp > 0.4 * min(reach[lev], 80.0)) & (dh > np.linalg.norm(p - hil) + 5)
                if lev == 0:
                    ok = dh > 30
                idx = np.flatnonzero(ok)
                if idx.size == 0:
                    continue
                pick = idx[rng.choice(idx.size, size=min(nchild, idx.size), replace=False)]
                for q in L[pick]:
                    if lev == 0:  # lobar trunks: stop part-way
                        q = hil + (q - hil) * rng.uniform(0.35, 0.55)
                    mid = 0.5 * (p + q) + rng.normal(0, 0.08 * np.linalg.norm(q - p), 3)
                    r1 = radius[lev] * h
                    rm = 0.5 * (rp + r1)
                    segs.append((p, mid, rp, rm))
                    segs.append((mid, q, rm, r1))
                    if lev <= 2:  # bronchi run with the larger arteries
                        off = np.cross(q - p, [0.0, 0.0, 1.0])
                        off = off / (np.linalg.norm(off) + 1e-9) * (rp + 1.0)
                        airs.append((p + off, mid + off, max(rp * 0.6, 1.0), max(rm * 0.6, 1.0)))
                        airs.append((mid + off, q + off, max(rm * 0.6, 1.0), max(r1 * 0.6, 1.0)))
                    nxt.append((q, r1))
            parents = nxt
        # terminal twigs towards the pleura
        for p, rp in parents:
            for _ in range(2):
                d = rng.normal(size=3)
                d /= np.linalg.norm(d)
                q = p + d * rng.uniform(8, 18)
                segs.append((p, q, rp * 0.8, 0.5))
    if not segs:
        A.geo["airways"] = (np.zeros((0, 3)), np.zeros(0))
        return

    def sample(lst):
        p0, p1, r0, r1 = (np.array([t[i] for t in lst]) for i in range(4))
        return segments_points(p0, p1, r0, r1, step)

    pts, rs = sample(segs)
    vm = stamp_indices(g, pts, rs)
    vm = vm[isin(A.lab.reshape(-1)[vm], LUNG_IDS)]
    A.hu.reshape(-1)[vm] = T["lung_vessel"]
    A.geo["airways"] = sample(airs) if airs else (np.zeros((0, 3)), np.zeros(0))
