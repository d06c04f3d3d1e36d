"""Tissue attenuation tables, smooth random fields and the scanner model (PSF blur + noise).

All HU values are drawn per case so that a corpus covers unenhanced and contrast-enhanced
(portal-venous-like) studies.  Nothing here knows about geometry beyond voxel spacing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def tissue_table(rng: np.random.Generator, contrast: bool) -> dict[str, float]:
    """Mean HU per tissue class for one case."""
    u = rng.uniform
    t = {
        "air": -1000.0,
        "lung": u(-880, -830),
        "fat": u(-115, -85),
        "muscle": u(40, 55),
        "bone_cortex": u(750, 1250),
        "bone_marrow": u(170, 300),
        "rib_cortex": u(550, 900),
        "disc": u(70, 100),
        "csf": u(5, 20),
        "fluid": u(0, 15),
        "bile": u(0, 20),
        "soft": u(35, 50),
        "stool": u(-150, 20),
    }
    if contrast:
        blood = u(150, 300)
        t.update(
            blood=blood,
            blood_venous=u(120, 180),
            myocardium=u(90, 130),
            liver=u(95, 125),
            spleen=u(105, 135),
            kidney_cortex=u(150, 220),
            kidney_medulla=u(80, 120),
            pancreas=u(80, 110),
            gut_wall=u(70, 100),
            lung_vessel=blood * u(0.6, 0.9),
            node=u(55, 80),
        )
    else:
        t.update(
            blood=u(35, 50),
            blood_venous=u(35, 50),
            myocardium=u(38, 50),
            liver=u(52, 68),
            spleen=u(42, 52),
            kidney_cortex=u(30, 40),
            kidney_medulla=u(25, 35),
            pancreas=u(35, 48),
            gut_wall=u(35, 45),
            lung_vessel=u(30, 50),
            node=u(35, 50),
        )
    return t


class SmoothField:
    """Low-frequency random field f(x, y, z) (mm -> scalar), a sum of separable cosine products.

    Separable terms keep evaluation cheap: each term needs three 1-D evaluations and two
    broadcast multiplications over the region of interest.
    """

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength=(40.0, 140.0), terms: int = 3):
        self.amp = (amplitude * rng.uniform(0.5, 1.0, size=terms) / np.sqrt(terms)).astype(np.float32)
        lam = rng.uniform(wavelength[0], wavelength[1], size=(terms, 3))
        self.k = 2 * np.pi / lam
        self.phase = rng.uniform(0, 2 * np.pi, size=(terms, 3))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, index=None) -> np.ndarray:
        """x, y, z are broadcastable (e.g. x[None,None,:], y[None,:,None], z[:,None,None]).

        ``index=(gx, gy, gz, ii, jj, kk)``: x, y, z are gathered from grid axes gx[ii], gy[jj],
        gz[kk]; the cosines are then evaluated on the (short) axes and gathered — much cheaper for
        scattered voxel lists.
        """
        if index is not None:
            gx, gy, gz, ii, jj, kk = index
            out = None
            for t in range(len(self.amp)):
                fx = np.cos(self.k[t, 0] * gx + self.phase[t, 0]).astype(np.float32)[ii]
                fy = np.cos(self.k[t, 1] * gy + self.phase[t, 1]).astype(np.float32)[jj]
                fz = np.cos(self.k[t, 2] * gz + self.phase[t, 2]).astype(np.float32)[kk]
                term = self.amp[t] * fz * fy * fx
                out = term if out is None else out + term
            return out
        out = None
        for t in range(len(self.amp)):
            fx = np.cos(self.k[t, 0] * x + self.phase[t, 0]).astype(np.float32)
            fy = np.cos(self.k[t, 1] * y + self.phase[t, 1]).astype(np.float32)
            fz = np.cos(self.k[t, 2] * z + self.phase[t, 2]).astype(np.float32)
            term = (self.amp[t] * fz) * (fy * fx)
            out = term if out is None else out + term
        return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    if sigma < 0.2:
        return np.array([1.0], dtype=np.float32)
    radius = max(1, int(np.ceil(2.5 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def scanner(hu: np.ndarray, spacing_xyz, slice_thickness: float, noise_sd: float,
            rng: np.random.Generator, inplane_fwhm_mm: float) -> np.ndarray:
    """Apply the scanner model in place-free fashion: correlated noise + Gaussian PSF.

    The PSF (in-plane FWHM ``inplane_fwhm_mm``, through-plane from the slice thickness) also makes
    the partial-volume mixing at every boundary.  White noise is added *before* the blur and
    pre-scaled so that the noise standard deviation after blurring equals ``noise_sd`` — this
    gives the spatially correlated grain of real CT noise.
    """
    sx, sy, sz = spacing_xyz
    fwhm_to_sigma = 1.0 / 2.3548
    sig = [
        max(slice_thickness * 0.9, 0.5) * fwhm_to_sigma / sz,  # k axis (z)
        inplane_fwhm_mm * fwhm_to_sigma / sy,                 # j axis (y)
        inplane_fwhm_mm * fwhm_to_sigma / sx,                 # i axis (x)
    ]
    kernels = [gaussian_kernel(s) for s in sig]
    gain = float(np.prod([np.sqrt(np.sum(k.astype(np.float64) ** 2)) for k in kernels]))
    noise = rng.standard_normal(size=hu.shape, dtype=np.float32)
    noise *= np.float32(noise_sd / gain)
    out = hu + noise
    for axis, k in enumerate(kernels):
        if len(k) > 1:
            out = ndimage.correlate1d(out, k, axis=axis, mode="nearest")
    return out.astype(np.float32, copy=False)
