"""The patient on the scanner: arms beside the torso (or raised out of the image) and the CT table.

Both live on the canonical grid ([k, j, i] = S, A, R; mm).  Arms are patient tissue (label
``body``); the table is not part of the patient (label 0, HU only).  When either is drawn, the grid
is widened (arms) or extended posteriorly (table): see :func:`extend_grid`.

Table attenuation: thin carbon-fibre skins around a foam core (radiotherapy couch models assign
~0.55 g/cm3 to the skins and ~0.03 g/cm3 to the foam, i.e. about -970 HU; e.g. Mihaylov et al.,
Radiat Oncol 2012;7:190); the skins are 1.5-3 mm thick and show as a bright line after the PSF.
Values are coarse, not measured.
"""

from __future__ import annotations

import numpy as np

from .anatomy import LABEL, Anatomy, Grid, body_radii


def plan(P: dict, drawn: dict, rng: np.random.Generator) -> dict:
    """Arm and table geometry of one case (mm).  Always consumes the same numbers."""
    u = rng.uniform(0, 1, 24)
    h = P["h"]
    geo = dict(arms=drawn.get("arms"), table=bool(drawn.get("table")))
    geo["arm"] = dict(
        gap=2.0 + 23.0 * u[0],               # skin-to-skin gap between arm and torso
        r_upper=(27.0 + 10.0 * u[1]) * h,    # muscle radius of the upper arm
        r_fore=(20.0 + 7.0 * u[2]) * h,      # muscle radius of the forearm
        fat=0.35 * P["fat"] + 2.0,           # arm subcutaneous fat
        lift=0.62 + 0.3 * u[3],              # arm's lowest point as a fraction of the back's depth
        z_shoulder=P["z_apex"] + 10.0 + 30.0 * u[4],
        humerus=(285.0 + 50.0 * u[5]) * h,   # shoulder -> elbow
        bone_r=(9.0 + 3.0 * u[6]) * h,
        marrow_hu=-80.0 + 70.0 * u[7],       # fatty marrow of long bones
        fov_margin=-40.0 + 60.0 * u[8],      # FOV edge beyond the arms' outer skin (< 0: arms cut)
        asym=(u[9] - 0.5) * 10.0,            # mm, right arm further out than the left
    )
    geo["table_geo"] = dict(
        radius=600.0 + 900.0 * u[10],        # curvature of the concave top (mm)
        half_width=200.0 + 60.0 * u[11],
        skin=1.5 + 1.5 * u[12],
        core=18.0 + 27.0 * u[13],
        pad=0.0 if u[14] < 0.4 else 12.0 + 38.0 * u[15],  # foam mattress (40 %: none)
        skin_hu=100.0 + 400.0 * u[16],
        foam_hu=-990.0 + 60.0 * u[17],
        pad_hu=-920.0 + 160.0 * u[18],
        fov_margin=-25.0 + 50.0 * u[19],     # FOV edge below the table's underside (< 0: table cut)
    )
    return geo


def _arm_profile(P: dict, a: dict, z: np.ndarray, side: float):
    """Per-slice arm centre (x, y) and radii (muscle, outer) for slice heights z; radius 0 above the shoulder."""
    tor_a, _, tor_bp = body_radii(P, z)
    z_el = a["z_shoulder"] - a["humerus"]
    t = np.clip((z_el + 20.0 - z) / 60.0, 0.0, 1.0)  # 0 upper arm, 1 forearm (elbow in between)
    r_m = a["r_upper"] * (1 - t) + a["r_fore"] * t
    r_o = r_m + a["fat"]
    # rounded top: a spherical cap over the last r_o mm below the shoulder
    top = a["z_shoulder"] - z
    cap = np.where(top < r_o, np.sqrt(np.clip(1.0 - ((r_o - top) / r_o) ** 2, 0.0, 1.0)), 1.0)
    cap = np.where(top < 0, 0.0, cap)
    xc = tor_a * 1.04 + a["gap"] + r_o + (a["asym"] if side > 0 else 0.0)
    yc = -tor_bp * a["lift"] + r_o * 1.1
    return side * xc, yc, r_m * cap, r_o * cap, t


def arms_outer_x(P: dict, geo: dict, z: np.ndarray) -> float:
    """Largest |x| (mm) of the arms' skin over the slice heights z."""
    a = geo["arm"]
    xs = []
    for side in (1.0, -1.0):
        xc, _, _, r_o, _ = _arm_profile(P, a, z, side)
        xs.append(np.max(np.abs(xc) + r_o))
    return float(max(xs))


def extend_grid(grid: Grid, P: dict, geo: dict, deform_mm: float = 0.0, rescale: bool = False) -> Grid:
    """The grid widened to hold the arms (``arms == "down"``) and extended posteriorly to hold the
    table (the FOV margins drawn in ``plan`` may still cut them).

    ``rescale=False``: by an even number of whole voxels, so every voxel of the original grid keeps
    its centre (and the anatomy there is unchanged).  ``rescale=True`` (random spacing): like a
    scanner's fixed matrix, the in-plane spacing grows with the larger in-plane extent, so a wider
    reconstruction FOV has coarser pixels and about the same number of voxels."""
    nk, nj, ni = grid.shape
    sx, sy = float(grid.spacing[0]), float(grid.spacing[1])
    x0, y0 = float(grid.origin[0]), float(grid.origin[1])
    x1, y1 = x0 + (ni - 1) * sx, y0 + (nj - 1) * sy
    lo_x, hi_x, lo_y = x0, x1, y0
    if geo["arms"] == "down":
        want = arms_outer_x(P, geo, grid.z.astype(np.float64)) + geo["arm"]["fov_margin"]
        lo_x, hi_x = min(x0, -want), max(x1, want)
    if geo["table"]:
        t = geo["table_geo"]
        _, _, bp = body_radii(P, grid.z.astype(np.float64))
        back = -float(np.max(bp)) * 1.04 - deform_mm
        if geo["arms"] == "down":
            back = min(back, -float(np.max(bp)) * geo["arm"]["lift"])
        bottom = back - t["pad"] - 2 * max(t["skin"], sy) - t["core"]
        lo_y = min(y0, bottom - t["fov_margin"])
    if lo_x == x0 and hi_x == x1 and lo_y == y0:
        return grid
    if rescale:
        f = max(hi_x - lo_x, y1 - lo_y) / max(x1 - x0, y1 - y0)
        sp = np.array([sx * f, sy * f, float(grid.spacing[2])])
        n_i = int(np.floor((hi_x - lo_x) / sp[0])) + 1
        n_j = int(np.floor((y1 - lo_y) / sp[1])) + 1
        return Grid((nk, n_j, n_i), sp, (lo_x, lo_y, float(grid.origin[2])))
    even = lambda d, s: int(2 * np.ceil(max(d, 0.0) / (2 * s) - 1e-9))  # noqa: E731
    n_lo_i, n_hi_i, n_lo_j = even(x0 - lo_x, sx), even(hi_x - x1, sx), even(y0 - lo_y, sy)
    origin = (x0 - n_lo_i * sx, y0 - n_lo_j * sy, float(grid.origin[2]))
    return Grid((nk, nj + n_lo_j, ni + n_lo_i + n_hi_i), grid.spacing, origin)


def paint_arms(A: Anatomy, geo: dict) -> int:
    """Both arms beside the torso (skin fat, muscle, humerus or radius + ulna, brachial vessels),
    painted only into air; label ``body``.  Returns the number of arm voxels."""
    if geo["arms"] != "down":
        return 0
    g, T, P = A.grid, A.T, A.P
    a = geo["arm"]
    z = g.z.astype(np.float64)
    n = 0
    for side in (1.0, -1.0):
        xc, yc, r_m, r_o, t = _arm_profile(P, a, z, side)
        if not np.any(r_o > 0):
            continue
        reach = float(np.max(r_o)) * 1.15 + 2
        lo, hi = float(np.min(np.abs(xc))) - reach, float(np.max(np.abs(xc))) + reach
        b = g.box((min(side * lo, side * hi), -1e4, -1e5), (max(side * lo, side * hi), 1e4, 1e5))
        if b is None:
            continue
        zb = b.z[:, 0, 0].astype(np.float64)
        xc, yc, r_m, r_o, t = _arm_profile(P, a, zb, side)
        f = lambda v: np.asarray(v, np.float32).reshape(-1, 1, 1)  # noqa: E731
        dx, dy = b.x - f(xc), b.y - f(yc)
        ro, rm = f(r_o) + 1e-3, f(r_m) + 1e-3
        q_out = (dx / ro) ** 2 + (dy / (ro * 1.1)) ** 2
        q_mus = (dx / rm) ** 2 + (dy / (rm * 1.1)) ** 2
        lab, hu = A.lab[b.sl], A.hu[b.sl]
        free = (lab == 0) & (q_out < 1)
        val = np.where(q_mus < 1, np.float32(T["muscle"]), np.float32(T["fat"]))
        # bones: humerus (head widens towards the shoulder) or radius + ulna, cortex around fatty marrow
        tt = f(t)
        capm = f(np.where(r_m > 0, 1.0, 0.0))
        head = f(np.clip((zb - (a["z_shoulder"] - 70.0)) / 40.0, 0.0, 1.0))
        rb = (a["bone_r"] + (22.0 * P["h"] - a["bone_r"]) * head) * capm
        d_hum = np.sqrt(((dx - side * 0.1 * rm) ** 2 + dy ** 2))
        hum = (tt < 0.5) & (d_hum < rb)
        rfb = 6.5 * P["h"] * capm
        d_rad = np.sqrt((dx - side * 0.35 * rm) ** 2 + (dy - 0.25 * rm) ** 2)
        d_uln = np.sqrt((dx + side * 0.2 * rm) ** 2 + (dy + 0.3 * rm) ** 2)
        fore = (tt >= 0.5) & ((d_rad < rfb) | (d_uln < rfb))
        cortex_t = np.maximum(2.0, 0.3 * rb)
        val = np.where(hum, np.where(d_hum < rb - cortex_t, np.float32(a["marrow_hu"]), np.float32(T["bone_cortex"])), val)
        core_f = (np.minimum(d_rad, d_uln) < rfb - 2.0)
        val = np.where(fore, np.where(core_f, np.float32(a["marrow_hu"]), np.float32(T["bone_cortex"])), val)
        # brachial artery and vein, medial (towards the torso) and anterior in the upper arm
        vx, vy = dx + side * 0.5 * rm, dy - 0.3 * rm
        art = (tt < 0.5) & ((vx ** 2 + vy ** 2) < 9.0)
        vein = (tt < 0.5) & (((vx + side * 6.0) ** 2 + (vy - 3.0) ** 2) < 16.0)
        val = np.where(art, np.float32(T["blood"]), np.where(vein, np.float32(T["blood_venous"]), val))
        val = np.broadcast_to(val, free.shape)
        lab[free] = LABEL["body"]
        hu[free] = val[free]
        n += int(free.sum())
    return n


def paint_table(A: Anatomy, geo: dict) -> int:
    """The CT table under the patient: curved carbon-fibre sandwich (skin / foam / skin) and an
    optional foam mattress, the same in every slice, painted only into air (label stays 0).  Its
    concave top rests against the lowest patient voxels of the (possibly warped) label map."""
    if not geo["table"]:
        return 0
    g = A.grid
    t = geo["table_geo"]
    body_cols = (A.lab > 0).any(axis=0)  # (nj, ni)
    has = body_cols.any(axis=0)
    if not has.any():
        return 0
    jmin = np.argmax(body_cols, axis=0)
    x = g.x.astype(np.float64)
    curve = x * x / (2.0 * t["radius"])
    # the mattress (if any) fills the gap between the lowest patient voxels and the table top
    y_top = float(np.min((g.y[jmin] - curve)[has])) - 0.5 * float(g.spacing[1]) - t["pad"]
    top = y_top + curve[None, :]                       # (1, ni)
    y = g.y.astype(np.float64)[:, None]                # (nj, 1)
    inside_w = np.abs(x)[None, :] < t["half_width"]
    d = top - y                                        # depth below the table top (mm)
    # skins thinner than a voxel: a one-voxel band with the skin's HU diluted by the thickness ratio
    # (partial volume), so the curved shell stays a continuous line instead of aliasing into dashes
    s, c, sy = t["skin"], t["core"], float(g.spacing[1])
    band = max(s, sy)
    skin = inside_w & (((d >= 0) & (d < band)) | ((d >= band + c) & (d < 2 * band + c)))
    foam = inside_w & (d >= band) & (d < band + c)
    pad = (np.abs(x)[None, :] < t["half_width"] - 15) & (d < 0) & (d > -t["pad"])
    val = np.full(d.shape, np.nan, np.float32)
    val[foam] = t["foam_hu"]
    val[skin] = t["foam_hu"] + (t["skin_hu"] - t["foam_hu"]) * s / band
    val[pad] = t["pad_hu"]
    m2 = ~np.isnan(val)
    m3 = m2[None] & (A.lab == 0)
    A.hu[m3] = np.broadcast_to(val[None], A.hu.shape)[m3]
    return int(m3.sum())
