"""Case generation (``generate_case``) and corpus writing (``write_corpus`` + ``manifest.jsonl``).

A case is fully determined by its seed.  Geometry is built on a canonical RAS-aligned grid; the
optional re-orientation at the end permutes / flips the voxel axes and adjusts ``ijk_to_ras``
exactly (no resampling), and a random origin offset moves the patient in scanner space.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..exports.atomic import check_writable_dir
from ..io import atomic_write
from ..volume import set_sitk_geometry
from . import anatomy as an
from . import findings as fd
from . import calcification, deformation, positioning
from . import variation as vr
from .report_writer import write_report
from .texture import scanner, tissue_table


@dataclass
class PhantomCase:
    seed: int
    volume: np.ndarray  # float32 HU, [k, j, i]
    ijk_to_ras: np.ndarray  # 4x4
    structures: np.ndarray  # uint8 label map, [k, j, i]
    structure_labels: dict  # {int: name}
    findings: list  # list[findings.Finding]
    labels: dict  # {finding key: 0/1}
    report: str
    meta: dict = field(default_factory=dict)

    @property
    def volume_array(self) -> np.ndarray:
        return self.volume

    def anatomy_mask(self, name: str) -> np.ndarray:
        return an.anatomy_mask(self.structures, name)


def _spacing(spacing, rng):
    if spacing is None:
        s = rng.uniform(2.0, 2.4)
        return np.array([s, s, rng.uniform(2.2, 3.0)])
    if np.isscalar(spacing):
        s = float(spacing)
        if not (0.3 <= s <= 10):
            raise InputError(f"Spacing {s} mm is outside the supported range 0.3-10 mm.")
        return np.array([s, s, s])
    sp = np.asarray(spacing, float).reshape(-1)
    if sp.size != 3 or np.any(sp < 0.3) or np.any(sp > 10):
        raise InputError("Spacing must be one number or three numbers (x, y, z) between 0.3 and 10 mm.")
    return sp


def _make_grid(P, rng, sp, fov=None, slab=None):
    """Canonical grid and its FOV kind.  ``slab=(n_slices, centre fraction)`` for an abdomen_slab;
    fov "chest_only" is the variation's chest FOV (stops above both kidneys)."""
    u = rng.uniform
    zs = np.linspace(P["z_bif"] - 50, P["z_apex"] + 50, 64)
    a, ba, bp = an.body_radii(P, zs)
    amax, bamax, bpmax = float(np.max(a)), float(np.max(ba)), float(np.max(bp))
    mx, my = u(-5, 28), u(5, 30)
    x0, x1 = -(amax + mx), amax + mx
    y0, y1 = -(bpmax + my) + u(-10, 5), bamax + my
    r = rng.random()
    if fov is not None:
        r = {"chest_abdomen": 0.0, "chest": 0.75, "chest_only": 0.75, "abdomen": 0.9, "abdomen_slab": 0.9}[fov]
    if r < 0.7:
        kind = "chest_abdomen"
        z1 = P["z_apex"] + u(5, 35)
        z0 = P["z_kidney_r"] - u(50, 85)
    elif r < 0.85:
        kind = "chest"
        z1 = P["z_apex"] + u(5, 35)
        z0 = P["z_dome_r"] - u(60, 110)
        if fov == "chest_only":  # a chest CT ends in the upper abdomen, above the kidneys
            z0 = max(z0, max(P["z_kidney_l"], P["z_kidney_r"]) + KIDNEY_TOP_MM)
    else:
        kind = "abdomen"
        z1 = P["z_dome_r"] + u(30, 70)
        z0 = P["z_kidney_r"] - u(60, 120)
    n = np.floor((np.array([x1 - x0, y1 - y0, z1 - z0])) / sp).astype(int) + 1
    if slab is not None:  # n slices around a level between the kidneys and the liver dome
        kind = "abdomen_slab"
        n_sl, frac = slab
        lo, hi = P["z_kidney_r"] - 40, P["z_dome_r"] - 20
        zc = lo + frac * (hi - lo)
        z0 = zc - (n_sl - 1) * sp[2] / 2
        n[2] = n_sl
    return an.Grid((n[2], n[1], n[0]), sp, (x0, y0, z0)), kind


# Kidney half-length is at most 52 mm x 1.1 x 1.12 (scales); + tilt margin.
KIDNEY_TOP_MM = 80.0


def orient_transform(shape_kji, rng):
    """Random axis permutation + flips of a [k, j, i] array.

    Returns (perm, flips, T) where ``new = flip(transpose(old_ijk_order, perm))`` and ``T`` maps
    new homogeneous (i, j, k) indices to old ones: ``old = T @ new``.
    """
    perm = rng.permutation(3)
    flips = rng.random(3) < 0.5
    n_old_ijk = np.array(shape_kji[::-1])
    T = np.zeros((4, 4))
    T[3, 3] = 1
    for a in range(3):  # new index axis a takes old index axis perm[a]
        if flips[a]:
            T[perm[a], a] = -1
            T[perm[a], 3] = n_old_ijk[perm[a]] - 1
        else:
            T[perm[a], a] = 1
    return perm, flips, T


def apply_orientation(arr: np.ndarray, perm, flips) -> np.ndarray:
    a = np.transpose(arr, (2, 1, 0))  # -> [i, j, k]
    a = np.transpose(a, perm)
    for ax in range(3):
        if flips[ax]:
            a = np.flip(a, axis=ax)
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


def generate_case(seed: int, spacing=None, orient: bool = True, findings=None, fov=None,
                  variation=None) -> PhantomCase:
    """One synthetic torso CT with label map, exact finding masks and a generated report.

    spacing: None (random ~2 mm in-plane, 2-3 mm slices), one number (isotropic mm) or (x, y, z).
    orient: randomly permute/flip the voxel axes (affine adjusted exactly).
    findings: optional list of finding keys to force (default: random per seed).
    fov: optional "chest_abdomen" | "chest" | "abdomen" (default: random per seed); overrides the
    variation's field of view.
    variation: None (default phantom), a preset name ("realistic") or a ``variation.Variation``:
    field of view incl. abdominal slabs, contrast phase, HU shift, noise, kernel, slice thickness,
    and (preset "full") arms, table, fat, a smooth warp and calcifications, drawn from the case's
    own streams and recorded in ``meta["variation"]``.
    """
    if fov not in (None, "chest_abdomen", "chest", "abdomen"):
        raise InputError(f"Unknown field of view {fov!r}; use chest_abdomen, chest or abdomen.")
    seed = int(seed)
    var = vr.resolve(variation)
    vd = vr.draw(var, vr.variation_rng(seed)) if var is not None else None
    bd = vr.draw_body(var, vr.variation_rng(seed, 2)) if var is not None and var.sets_body() else None
    ss = np.random.SeedSequence(seed)
    r_pat, r_find, r_anat, r_apply, r_scan, r_geo, r_rep = (np.random.default_rng(s) for s in ss.spawn(7))
    P = an.sample_patient(r_pat)
    if bd is not None:  # habitus: replaces what sample_patient drew (its stream is unchanged)
        if bd["fat_mm"] is not None:
            d_fat = bd["fat_mm"] - P["fat"]
            P["fat"] = bd["fat_mm"]
            # the chest wall subtracts 0.33 x fat (anterior) and 0.1 x fat (posterior) from the body's
            # half-depths (anatomy._body_wall): shift them so the thoracic cavity stays where it was
            P["b_ant"] += 0.33 * d_fat
            P["b_post"] += 0.1 * d_fat
        if bd["visceral_fat"] is not None:
            P["belly"] = bd["visceral_fat"]
    if vd is not None and vd["phase"] is not None:
        P["contrast"] = vd["phase"] != "non_contrast"
    plan = fd.plan_findings(r_find, P, force=findings)
    T = tissue_table(r_pat, P["contrast"])
    sp = _spacing(spacing, r_geo)
    slab = None
    if vd is not None:
        if vd["phase"] is not None:
            T.update(vd["phase_hu"])
        if vd["slice_mm"] is not None:
            sp = np.array([sp[0], sp[1], vd["slice_mm"]])
        if fov is None and vd["fov"] is not None:
            fov = {"chest": "chest_only"}.get(vd["fov"], vd["fov"])
            if fov == "abdomen_slab":
                slab = (vd["slab_slices"], vd["slab_center"])
    grid, fov = _make_grid(P, r_geo, sp, fov, slab)
    if bd is not None:  # arms beside the torso / table: a wider grid (positioning.extend_grid)
        pos = positioning.plan(P, bd, vr.variation_rng(seed, 3))
        grid = positioning.extend_grid(grid, P, pos, bd["deform_mm"] or 0.0, rescale=spacing is None)
        sp = grid.spacing.copy()
    nvox = int(np.prod(grid.shape))
    if nvox > 120_000_000:
        raise InputError(f"Spacing {tuple(round(float(v), 2) for v in sp)} mm gives {nvox / 1e6:.0f} M voxels per case "
                         f"(about {nvox * 20 / 1e9:.0f} GB of working memory); use a coarser spacing.")
    thickness = float(sp[2] * r_geo.uniform(1.0, 1.25))
    noise_sd = float(r_geo.uniform(8, 25))
    fwhm = float(r_geo.uniform(1.0, 1.6)) * float(min(sp[0], 2.0))
    if vd is not None:
        if vd["slice_mm"] is not None:
            thickness = float(vd["slice_mm"])
        if vd["noise_sd"] is not None:
            noise_sd = float(vd["noise_sd"])
        if vd["psf_fwhm_factor"] is not None:
            fwhm = float(vd["psf_fwhm_factor"]) * float(min(sp[0], 2.0))
    perm, flips, Tm = orient_transform(grid.shape, r_geo)
    offset = r_geo.uniform(-150, 150, 3)

    A = an.build_anatomy(grid, P, T, r_anat)
    finds = fd.apply_findings(A, plan, r_apply)
    if vd is not None and vd["organ_texture"] is not None:  # focal lesions keep their own attenuation
        from .montage import DIFFUSE

        focal = [f.mask for f in finds if f.name not in DIFFUSE]
        keep = np.logical_or.reduce(focal).astype(bool) if focal else None
        vr.add_organ_texture(A.hu, A.lab, grid.spacing, vd["organ_texture"], vr.variation_rng(seed, 1), keep)
    incidental = None
    if bd is not None:
        finds, incidental = _patient_variation(A, finds, bd, pos, seed)
    counts = np.bincount(A.lab.reshape(-1), minlength=len(an.STRUCTURE_NAMES) + 1)
    visible = {an.STRUCTURE_LABELS[i] for i in range(1, len(counts)) if counts[i] >= 20}
    if counts[1:6].sum() >= 20:
        visible |= {"lung_left", "lung_right"}
    report = write_report(finds, visible, r_rep, P["contrast"], "abdomen" if fov == "abdomen_slab" else fov,
                          phase=vd["phase"] if vd is not None else None, incidental=incidental)
    vol = scanner(A.hu, grid.spacing, thickness, noise_sd, r_scan, fwhm)
    if vd is not None and vd["hu_shift"] is not None:
        vol += np.float32(vd["hu_shift"])
    np.clip(vol, -1024, 3071, out=vol)

    m = grid.ijk_to_ras()
    m[:3, 3] += offset
    lab = A.lab
    if orient:
        m = m @ Tm
        vol = apply_orientation(vol, perm, flips)
        lab = apply_orientation(lab, perm, flips)
        for f in finds:
            f.mask = apply_orientation(f.mask, perm, flips)
    for f in finds:
        if f.info.get("centroid") is not None:
            f.info["centroid"] = [float(v) for v in (np.array(f.info["centroid"]) + offset)]
    for info in (incidental or {}).values():  # calcification points: RAS like the finding centroids
        info["point"] = [float(v) for v in (np.array(info["point"]) + offset)]
    labels = {k: 0 for k in fd.FINDING_KEYS}
    for f in finds:
        labels[f.name] = 1
    meta = dict(spacing=[float(v) for v in sp], slice_thickness=thickness, noise_sd=noise_sd, psf_fwhm_mm=fwhm,
                contrast=bool(P["contrast"]), fov=fov, oriented=bool(orient), axis_perm=[int(v) for v in perm],
                axis_flips=[bool(v) for v in flips], visible=sorted(visible))
    if vd is not None:
        meta["variation"] = dict(vd, shape_kji=[int(v) for v in grid.shape])
        meta["fov"] = fov
        if bd is not None:
            meta["variation"].update(bd, patient=A.geo["variation_applied"])
    return PhantomCase(seed, vol, m, lab, dict(an.STRUCTURE_LABELS), finds, labels, report, meta)


def _patient_variation(A, finds, bd: dict, pos: dict, seed: int):
    """Arms, warp, calcifications and table on the built case (in this order: the table is rigid and
    placed under the warped patient; calcifications are placed on the warped organs, so that they
    agree with the findings that survive the warp).  Returns (findings, incidental calcifications)."""
    applied = dict(arm_voxels=positioning.paint_arms(A, pos))
    if bd["arms"] == "down":
        applied["arm_gap_mm"] = round(float(pos["arm"]["gap"]), 2)
    cart = {"cartilage": calcification.cartilage_mask(A)}
    if bd["deform_mm"] is not None:
        applied.update(deformation.warp(A, finds, bd["deform_mm"], vr.variation_rng(seed, 5), extra=cart))
        applied["pleura_relabelled"] = deformation.repair_pleura(A)
        finds = deformation.refresh_findings(A, finds)
    incidental = {}
    if bd["calcification"]:
        incidental = calcification.calcify(A, finds, bd["calcification"], vr.variation_rng(seed, 4), cart["cartilage"])
        applied["calcification"] = incidental
    applied["table_voxels"] = positioning.paint_table(A, pos)
    if pos["table"]:
        applied["table"] = {k: round(float(v), 2) for k, v in pos["table_geo"].items()}
    A.geo["variation_applied"] = applied
    return finds, incidental


# ----------------------------------------------------------------------------- writing
def write_nifti(array: np.ndarray, ijk_to_ras: np.ndarray, path: str, compression_level: int = 1) -> None:
    """Atomic NIfTI write (fast compression level for corpus generation)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    set_sitk_geometry(img, ijk_to_ras)
    atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp, True, compression_level), suffix=".nii.gz")


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_case(case: PhantomCase, out_dir: str, montage: bool = True) -> dict:
    """Write one case folder; returns its manifest record (paths relative to ``out_dir``)."""
    cid = f"case_{case.seed:05d}"
    cdir = os.path.join(out_dir, cid)
    os.makedirs(os.path.join(cdir, "findings"), exist_ok=True)
    write_nifti(np.rint(case.volume).astype(np.int16), case.ijk_to_ras, os.path.join(cdir, "ct.nii.gz"))
    write_nifti(case.structures, case.ijk_to_ras, os.path.join(cdir, "structures.nii.gz"))
    recs = []
    for f in case.findings:
        rel = f"{cid}/findings/{f.key}.nii.gz"
        write_nifti(f.mask, case.ijk_to_ras, os.path.join(out_dir, rel))
        recs.append({"name": f.name, "anatomy": f.anatomy, "laterality": f.laterality, "mask": rel,
                     "volume_ml": round(float(f.volume_ml), 3)})
    _write_text(os.path.join(cdir, "report.txt"), case.report)
    rec = {"case_id": cid, "seed": case.seed, "image": f"{cid}/ct.nii.gz", "report": f"{cid}/report.txt",
           "structures": f"{cid}/structures.nii.gz",
           "structure_labels": {str(k): v for k, v in case.structure_labels.items()},
           "findings": recs, "labels": dict(case.labels)}
    if "variation" in case.meta:  # default cases keep their manifest record unchanged
        rec["phantom"] = {k: case.meta[k] for k in ("fov", "contrast", "spacing", "slice_thickness", "noise_sd",
                                                     "psf_fwhm_mm", "variation")}
    if montage:
        from .montage import render_montage, save_png

        img = render_montage(case.volume, case.ijk_to_ras, case.findings, title=cid)
        save_png(img, os.path.join(cdir, "montage.png"))
        rec["montage"] = f"{cid}/montage.png"
    return rec


def _work(args):
    seed, out_dir, spacing, orient, montage, variation = args
    t = time.perf_counter()
    case = generate_case(seed, spacing=spacing, orient=orient, variation=variation)
    tg = time.perf_counter() - t
    rec = write_case(case, out_dir, montage=montage)
    return rec, tg, time.perf_counter() - t


def write_corpus(out_dir: str, n: int, seed: int = 0, spacing=None, orient: bool = True, montage: bool = True,
                 workers: int = 1, progress=None, variation=None) -> dict:
    """Write ``n`` cases (seeds ``seed .. seed+n-1``) and ``out_dir/manifest.jsonl``.

    ``progress(fraction, message)`` is called after each case.  ``variation``: as in
    ``generate_case`` (a preset name or a Variation).  Returns timing statistics.
    """
    if n < 0:
        raise InputError("The number of cases must be zero or more.")
    vr.resolve(variation)  # a bad variation fails before anything is written
    check_writable_dir(out_dir)
    jobs = [(seed + i, out_dir, spacing, orient, montage, variation) for i in range(n)]
    recs, tgen, ttot = [], [], []
    t0 = time.perf_counter()
    if workers > 1 and n > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, (rec, tg, tt) in enumerate(pool.imap(_work, jobs)):
                recs.append(rec), tgen.append(tg), ttot.append(tt)
                if progress:
                    progress((i + 1) / n, rec["case_id"])
    else:
        for i, job in enumerate(jobs):
            rec, tg, tt = _work(job)
            recs.append(rec), tgen.append(tg), ttot.append(tt)
            if progress:
                progress((i + 1) / n, rec["case_id"])
    path = os.path.join(out_dir, "manifest.jsonl")
    _write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
    wall = time.perf_counter() - t0
    return dict(n=n, manifest=path, wall_s=wall, generate_s_mean=float(np.mean(tgen)) if tgen else 0.0,
                case_s_mean=float(np.mean(ttot)) if ttot else 0.0, cases_per_s=n / wall if wall > 0 else 0.0)
