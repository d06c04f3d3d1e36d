"""Scan-to-scan variation of the phantom: field of view, contrast phase, HU shift, noise, kernel, slices.

A :class:`Variation` says which of these a case draws and from what range; ``None`` for a field
keeps the phantom's default behaviour for it.  Every draw comes from one random stream of its own
(``variation_rng(seed)``), so a case generated without a variation is bit-identical to the
phantom before this module existed, and the drawn values go into the case's manifest record.

Contrast-phase attenuation (HU, means of typical adult ranges at ~1.5 ml/kg iodinated contrast;
aortic targets after Bae, Radiology 2010; renal corticomedullary / nephrographic / excretory
phases after Yuh & Cohan, AJR 1999).  These are coarse round numbers, not a physiological model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError

FOV_KINDS = ("chest_abdomen", "chest", "abdomen", "abdomen_slab")
PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")

# (low, high) HU per tissue class that contrast changes; keys as in texture.tissue_table.
PHASE_HU: dict[str, dict[str, tuple[float, float]]] = {
    "non_contrast": dict(blood=(35, 50), blood_venous=(35, 50), myocardium=(38, 50), liver=(52, 68),
                         spleen=(42, 52), kidney_cortex=(30, 40), kidney_medulla=(25, 35), pancreas=(35, 48),
                         gut_wall=(35, 45), node=(35, 50)),
    # late arterial (~35 s): bright aorta, veins not yet opacified, corticomedullary kidneys,
    # liver barely enhanced, pancreas at its peak
    "arterial": dict(blood=(250, 400), blood_venous=(60, 110), myocardium=(100, 150), liver=(60, 85),
                     spleen=(90, 140), kidney_cortex=(170, 260), kidney_medulla=(60, 110), pancreas=(100, 150),
                     gut_wall=(80, 120), node=(55, 80)),
    # portal venous (~70 s): liver peak, homogeneous nephrogram (cortex ~ medulla)
    "portal_venous": dict(blood=(150, 220), blood_venous=(140, 190), myocardium=(90, 130), liver=(100, 130),
                          spleen=(105, 135), kidney_cortex=(160, 220), kidney_medulla=(130, 190),
                          pancreas=(80, 110), gut_wall=(70, 100), node=(60, 85)),
    # delayed / excretory (3-5 min): equilibrium blood pool, medulla brighter than cortex
    "delayed": dict(blood=(100, 140), blood_venous=(100, 135), myocardium=(80, 110), liver=(80, 100),
                    spleen=(80, 105), kidney_cortex=(120, 160), kidney_medulla=(150, 260), pancreas=(65, 85),
                    gut_wall=(60, 85), node=(55, 75)),
}


@dataclass(frozen=True)
class Variation:
    """Ranges a case draws from.  ``dict`` fields are {choice: weight}; tuples are (low, high)."""

    fov: dict | None = None             # {FOV kind: weight}
    slab_slices: tuple = (20, 60)       # slices of an abdomen_slab (inclusive)
    phase: dict | None = None           # {phase: weight}
    hu_shift: tuple | None = None       # HU added to the whole volume (scanner calibration)
    noise_sd: tuple | None = None       # HU, after the PSF
    psf_fwhm_factor: tuple | None = None  # in-plane PSF FWHM in units of min(spacing, 2 mm): kernel sharpness
    slice_mm: dict | None = None        # {slice thickness = slice spacing (mm): weight}
    organ_texture: tuple | None = None  # HU SD of mottled texture in liver, spleen, kidneys, pancreas
    # patient and table (drawn from a second stream, so the fields above draw as before)
    arms: dict | None = None            # {"up": w, "down": w}: arms raised out of the FOV or beside the torso
    table: float | None = None          # probability that the CT table (couch) is in the image
    fat_mm: tuple | None = None         # subcutaneous fat thickness (mm)
    visceral_fat: tuple | None = None   # abdominal AP enlargement ("belly" factor): intra-abdominal fat
    deform_mm: tuple | None = None      # peak displacement (mm) of a smooth random warp of the whole case
    calcification: dict | None = None   # {kind: probability}, kinds in CALCIFICATION_KINDS

    def check(self) -> "Variation":
        for name, allowed in (("fov", FOV_KINDS), ("phase", PHASES)):
            d = getattr(self, name)
            if d is not None:
                bad = [k for k in d if k not in allowed]
                if bad or not d or any(w < 0 for w in d.values()) or sum(d.values()) <= 0:
                    raise InputError(f"Variation {name} must weight some of {', '.join(allowed)}; got {d!r}.")
        if self.slice_mm is not None and any(not (0.5 <= float(s) <= 10) for s in self.slice_mm):
            raise InputError("Variation slice thicknesses must lie between 0.5 and 10 mm.")
        lo, hi = self.slab_slices
        if not (1 <= lo <= hi):
            raise InputError("Variation slab_slices must be (low, high) with 1 <= low <= high.")
        if self.arms is not None and (not self.arms or any(k not in ("up", "down") for k in self.arms)
                                      or any(w < 0 for w in self.arms.values()) or sum(self.arms.values()) <= 0):
            raise InputError(f"Variation arms must weight some of up, down; got {self.arms!r}.")
        if self.table is not None and not (0.0 <= float(self.table) <= 1.0):
            raise InputError("Variation table is a probability between 0 and 1.")
        for name, (a, b) in (("fat_mm", (0.0, 80.0)), ("visceral_fat", (0.8, 1.6)), ("deform_mm", (0.0, 12.0))):
            r = getattr(self, name)
            if r is not None and not (a <= float(r[0]) <= float(r[1]) <= b):
                raise InputError(f"Variation {name} must be (low, high) within {a:g}-{b:g}; got {r!r}.")
        if self.calcification is not None and (any(k not in CALCIFICATION_KINDS for k in self.calcification)
                                               or any(not (0 <= p <= 1) for p in self.calcification.values())):
            raise InputError(f"Variation calcification must map some of {', '.join(CALCIFICATION_KINDS)} to "
                             f"probabilities; got {self.calcification!r}.")
        return self

    def sets_body(self) -> bool:
        """Whether any patient/table field is set (they draw from stream 2; see draw_body)."""
        return any(getattr(self, n) is not None for n in BODY_FIELDS)


BODY_FIELDS = ("arms", "table", "fat_mm", "visceral_fat", "deform_mm", "calcification")
# incidental calcifications (not findings; the report names them) and coronary calcification, which is
# placed only in cases that have the arterial_calcification finding (vascular calcification = that finding)
CALCIFICATION_KINDS = ("costal_cartilage", "lung_granuloma", "spleen_granuloma", "liver_granuloma", "coronary")


_REALISTIC_FOV = {"chest_abdomen": 0.35, "chest": 0.25, "abdomen": 0.15, "abdomen_slab": 0.25}
_REALISTIC_PHASE = {"non_contrast": 0.3, "arterial": 0.2, "portal_venous": 0.4, "delayed": 0.1}
# "fov" / "phase": one factor of "realistic" alone, to measure what each does to a model.  The FOV
# is the first draw of a case's stream, so a seed gets the same FOV (and slab) in "fov" and "realistic".
PRESETS = {
    "realistic": Variation(
        fov=_REALISTIC_FOV,
        slab_slices=(20, 60),
        phase=_REALISTIC_PHASE,
        hu_shift=(-15.0, 15.0),
        noise_sd=(6.0, 40.0),
        psf_fwhm_factor=(0.8, 2.2),
        slice_mm={0.625: 0.1, 1.25: 0.2, 2.5: 0.3, 3.0: 0.15, 5.0: 0.25},
        organ_texture=(3.0, 12.0),
    ),
    "fov": Variation(fov=_REALISTIC_FOV, slab_slices=(20, 60)),
    "phase": Variation(phase=_REALISTIC_PHASE),
}
# "full": "realistic" (same draws per seed) + patient position, table, habitus, warp and calcifications
PRESETS["full"] = replace(
    PRESETS["realistic"],
    arms={"up": 0.7, "down": 0.3},
    table=0.85,
    fat_mm=(3.0, 60.0),
    visceral_fat=(0.9, 1.45),
    deform_mm=(2.0, 8.0),
    calcification={"costal_cartilage": 0.5, "lung_granuloma": 0.2, "spleen_granuloma": 0.1,
                   "liver_granuloma": 0.05, "coronary": 0.7},
)

# The held-out "realistic variation" set (docs/phantom.md): never train, calibrate or monitor on it.
HELD_OUT_SEEDS = range(30000, 30064)


def resolve(variation) -> Variation | None:
    """None | preset name | Variation -> Variation (checked) or None."""
    if variation is None or variation == "none":
        return None
    if isinstance(variation, str):
        if variation not in PRESETS:
            raise InputError(f"Unknown variation {variation!r}; use one of: none, {', '.join(PRESETS)}.")
        return PRESETS[variation]
    if isinstance(variation, Variation):
        return variation.check()
    raise InputError("variation must be None, a preset name or a Variation.")


def variation_rng(seed: int, stream: int = 0) -> np.random.Generator:
    """The case's variation streams (0: drawn values, 1: organ texture, 2: patient/table values,
    3: patient/table geometry, 4: calcifications, 5: warp field): disjoint from the 7 streams
    generate_case spawns from the seed."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(7 + int(stream),)))


def _pick(d: dict, x: float):
    """The choice of {choice: weight} that the uniform number ``x`` falls on."""
    keys = list(d)
    w = np.cumsum([float(d[k]) for k in keys])
    return keys[min(int(np.searchsorted(w / w[-1], x, side="right")), len(keys) - 1)]


def draw(v: Variation, rng: np.random.Generator) -> dict:
    """One case's values (None where the variation leaves the default).

    Every field consumes the same random numbers whether it is set or not, so a seed draws the
    same value of a factor under every variation that sets that factor with the same range."""
    x = rng.uniform(0, 1, 8)
    out = dict(fov=None, slab_slices=None, slab_center=None, phase=None, phase_hu=None, hu_shift=None, noise_sd=None,
               psf_fwhm_factor=None, slice_mm=None, organ_texture=None)
    if v.fov is not None:
        out["fov"] = _pick(v.fov, x[0])
        if out["fov"] == "abdomen_slab":
            lo, hi = v.slab_slices
            out["slab_slices"] = int(lo + min(int(x[1] * (hi - lo + 1)), hi - lo))
            out["slab_center"] = float(x[2])  # fraction between kidney level - 40 mm and dome - 20 mm
    lerp = lambda r, t: float(r[0] + t * (r[1] - r[0]))  # noqa: E731
    if v.hu_shift is not None:
        out["hu_shift"] = lerp(v.hu_shift, x[3])
    if v.noise_sd is not None:
        out["noise_sd"] = lerp(v.noise_sd, x[4])
    if v.psf_fwhm_factor is not None:
        out["psf_fwhm_factor"] = lerp(v.psf_fwhm_factor, x[5])
    if v.slice_mm is not None:
        out["slice_mm"] = float(_pick(v.slice_mm, x[6]))
    if v.phase is not None:
        out["phase"] = _pick(v.phase, x[7])
        out["phase_hu"] = {k: round(val, 2) for k, val in phase_table(out["phase"], rng).items()}
    if v.organ_texture is not None:  # after every other draw: adding it changes no other value
        out["organ_texture"] = lerp(v.organ_texture, float(rng.uniform()))
    return out


def draw_body(v: Variation, rng: np.random.Generator) -> dict:
    """The patient/table values of one case (stream 2), keyed as the Variation fields; like
    :func:`draw`, every field consumes the same numbers whether it is set or not."""
    x = rng.uniform(0, 1, 16)
    out = dict(arms=None, table=None, fat_mm=None, visceral_fat=None, deform_mm=None, calcification=None)
    lerp = lambda r, t: float(r[0] + t * (r[1] - r[0]))  # noqa: E731
    if v.arms is not None:
        out["arms"] = _pick(v.arms, x[0])
    if v.table is not None:
        out["table"] = bool(x[1] < float(v.table))
    if v.fat_mm is not None:
        out["fat_mm"] = lerp(v.fat_mm, x[2])
    if v.visceral_fat is not None:
        out["visceral_fat"] = lerp(v.visceral_fat, x[3])
    if v.deform_mm is not None:
        out["deform_mm"] = lerp(v.deform_mm, x[4])
    if v.calcification is not None:
        out["calcification"] = sorted(k for i, k in enumerate(CALCIFICATION_KINDS)
                                      if x[5 + i] < float(v.calcification.get(k, 0.0)))
    return out


TEXTURED = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas")


def add_organ_texture(hu: np.ndarray, lab: np.ndarray, spacing_xyz, sd: float, rng: np.random.Generator,
                      keep=None) -> None:
    """Mottled parenchyma in place: white noise low-passed at 1.5-3 mm (Gaussian sigma), scaled to
    ``sd`` HU, added to the voxels of the TEXTURED organs except where ``keep`` (bool) is set."""
    from scipy import ndimage

    from .anatomy import LABEL

    m = np.isin(lab, [LABEL[n] for n in TEXTURED])
    if keep is not None:
        m &= ~keep
    if not m.any():
        return
    idx = np.argwhere(m)
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    sigma_mm = float(rng.uniform(1.5, 3.0))
    sig = [sigma_mm / float(s) for s in np.asarray(spacing_xyz, float)[::-1]]  # [k, j, i]
    field = ndimage.gaussian_filter(rng.standard_normal(size=tuple(hi - lo), dtype=np.float32), sig, mode="nearest")
    field *= np.float32(sd / max(float(field.std()), 1e-6))
    sub = m[sl]
    hu[sl][sub] += field[sub]


def phase_table(phase: str, rng: np.random.Generator) -> dict[str, float]:
    """HU of the contrast-dependent tissue classes for one case in ``phase``."""
    t = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in PHASE_HU[phase].items()}
    # pulmonary arteries/veins follow the blood pool (unenhanced: like blood)
    t["lung_vessel"] = t["blood"] * float(rng.uniform(0.6, 0.9)) if phase != "non_contrast" else t["blood"]
    return t

