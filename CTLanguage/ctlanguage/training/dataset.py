"""Training/evaluation data from any ``manifest.jsonl`` (docs/architecture.md "Manifest").

Each case is brought to model space once with ``preprocess.to_model_space`` (image) and
``ModelGrid.labels_to_model`` (structure label map, finding masks) and cached as an ``.npz`` in
``<manifest dir>/.ctlanguage_cache/<spec hash>/`` so later epochs/runs skip resampling.
Training samples get MONAI intensity jitter and a small random affine (rotation, scale,
translation; never flips, which would swap left and right).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..manifest import read_manifest, read_structures
from . import phrases as PH


@dataclass
class Case:
    case_id: str
    image: np.ndarray            # float16 [D,H,W] in [0,1]
    labels: np.ndarray          # uint8 [D,H,W] structure labels (model grid)
    label_names: dict           # {int id: anatomy key}
    finding_masks: np.ndarray   # uint8 [F,D,H,W] masks of the present findings that have one
    finding_items: list         # per mask: (finding, laterality)
    presence: np.ndarray        # float32 [len(finding_items())] 0/1 per finding x side
    report: str
    grid: dict                  # ModelGrid.to_dict()


def _spec_hash(spec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def presence_vector(entry: dict) -> np.ndarray:
    items = PH.finding_items()
    index = {(f, s): i for i, (f, s, _) in enumerate(items)}
    y = np.zeros(len(items), np.float32)
    for fd in entry.get("findings") or []:
        name, lat = fd.get("name"), fd.get("laterality")
        sides = ["left", "right"] if lat in (None, "bilateral") else [lat]
        for s in sides:
            if (name, s) in index:
                y[index[(name, s)]] = 1.0
        if (name, None) in index:
            y[index[(name, None)]] = 1.0
    labels = entry.get("labels") or {}
    for (f, s), i in index.items():
        if s is None and labels.get(f) == 1:
            y[i] = 1.0
    return y


def _preprocess_case(entry: dict, root: Path, spec) -> dict:
    from ..io import read_ct
    from ..preprocess import to_model_space

    vol = read_ct(root / entry["image"])
    mi = to_model_space(vol, spec)
    grid = mi.grid
    n_items = len(PH.finding_items())
    labels = np.zeros(grid.shape, np.uint8)
    names = {}
    lab, struct_names = read_structures(entry, root, vol.shape)
    if lab is not None:
        labels = grid.labels_to_model(lab, vol).astype(np.uint8)
        names = struct_names
    masks, items = [], []
    for fd in entry.get("findings") or []:
        if not fd.get("mask"):
            continue
        mv = read_ct(root / fd["mask"], validate=False)
        m = (mv.array > 0.5).astype(np.uint8)
        masks.append(grid.labels_to_model(m, vol).astype(np.uint8))
        items.append((fd["name"], fd.get("laterality")))
    report = ""
    if entry.get("report"):
        rp = root / entry["report"]
        report = rp.read_text() if rp.is_file() else str(entry["report"])
    fm = np.stack(masks) if masks else np.zeros((0,) + grid.shape, np.uint8)
    return dict(image=mi.array.astype(np.float16), labels=labels, label_names=json.dumps(names),
                finding_masks=fm, finding_items=json.dumps(items), presence=presence_vector(entry),
                report=report, grid=json.dumps(grid.to_dict()), n_items=n_items)


def load_case(entry: dict, root: Path, spec, cache: bool = True) -> Case:
    cache_file = root / ".ctlanguage_cache" / _spec_hash(spec) / f"{entry['case_id']}.npz"
    data = None
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            data = None
    if data is None:
        data = _preprocess_case(entry, root, spec)
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez_compressed(tmp, **{k: (np.asarray(v) if not isinstance(v, str) else np.array(v))
                                        for k, v in data.items()})
            os.replace(tmp, cache_file)
    return Case(
        case_id=entry["case_id"], image=np.asarray(data["image"]), labels=np.asarray(data["labels"]),
        label_names={int(k): v for k, v in json.loads(str(data["label_names"])).items()},
        finding_masks=np.asarray(data["finding_masks"]),
        finding_items=[tuple(x) for x in json.loads(str(data["finding_items"]))],
        presence=np.asarray(data["presence"], np.float32), report=str(data["report"]),
        grid=json.loads(str(data["grid"])),
    )


def anatomy_masks(case: Case, anatomies: list[str]) -> np.ndarray:
    """[A,D,H,W] uint8 binary masks; lung_left/lung_right are unions of their lobes and body is
    every labelled voxel (plus an explicit 'body' label if present)."""
    by_key: dict[str, list[int]] = {}
    for i, k in case.label_names.items():
        by_key.setdefault(k, []).append(i)
    out = np.zeros((len(anatomies),) + case.labels.shape, np.uint8)
    for a_i, a in enumerate(anatomies):
        if a == "body":
            out[a_i] = case.labels > 0
            continue
        ids = list(by_key.get(a, []))
        if a in ("lung_left", "lung_right"):
            side = a.split("_")[1]
            ids += [i for k, v in by_key.items() if k.startswith("lung_") and "lobe" in k
                    and k.endswith(side) for i in v]
        if ids:
            lut = np.zeros(max(256, int(case.labels.max()) + 1), bool)
            lut[ids] = True
            out[a_i] = lut[case.labels]
    return out


def finding_targets(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """[I,D,H,W] masks per finding item (zeros when absent) and [I] bool 'target known'."""
    items = PH.finding_items()
    index = {(f, s): i for i, (f, s, _) in enumerate(items)}
    shape = case.labels.shape
    out = np.zeros((len(items),) + shape, np.uint8)
    known = case.presence < 0.5  # absent findings: the empty mask is a known target
    for m, (name, lat) in zip(case.finding_masks, case.finding_items):
        sides = [lat] if lat in ("left", "right") else ["left", "right", None]
        for s in sides:
            if (name, s) in index:
                i = index[(name, s)]
                if lat in (None, "bilateral") and s is not None:
                    continue  # bilateral mask without a split: leave the sided targets unknown
                out[i] |= m
                known[i] = True
    return out, known


def _plain(x) -> torch.Tensor:
    """MONAI MetaTensor -> plain torch.Tensor."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x)


class Augmenter:
    """Seeded MONAI intensity jitter + small affine (no flips)."""

    def __init__(self, affine_prob: float = 0.3, rotate: float = 0.06, scale: float = 0.06,
                 translate_vox: float = 4.0):
        from monai.transforms import (RandAdjustContrast, RandAffine, RandGaussianNoise,
                                      RandScaleIntensity, RandShiftIntensity)

        self.affine = RandAffine(prob=affine_prob, rotate_range=(rotate,) * 3,
                                 scale_range=(scale,) * 3, translate_range=(translate_vox,) * 3,
                                 padding_mode="zeros", cache_grid=False)
        self.intensity = [RandScaleIntensity(factors=0.1, prob=0.8),
                          RandShiftIntensity(offsets=0.04, prob=0.8),
                          RandAdjustContrast(prob=0.5, gamma=(0.85, 1.15)),
                          RandGaussianNoise(prob=0.5, std=0.015)]

    def seed(self, seed: int):
        self.affine.set_random_state(seed)
        for i, t in enumerate(self.intensity):
            t.set_random_state(seed + 1 + i)

    def geometry(self, image: torch.Tensor, targets: torch.Tensor):
        """image [1,D,H,W] float, targets [K,D,H,W] float -> same shapes (one shared affine)."""
        self.affine.randomize(None)
        if not self.affine._do_transform:
            return image, targets
        img = self.affine(image, randomize=False, mode="bilinear")
        tgt = self.affine(targets, randomize=False, mode="nearest") if targets.shape[0] else targets
        return _plain(img), _plain(tgt)

    def intensity_jitter(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        for t in self.intensity:
            x = t(x)
        return _plain(x).clamp(0.0, 1.0)


class ManifestDataset(torch.utils.data.Dataset):
    """Model-space samples: image, targets on the feature grid (model grid / feature_stride), texts."""

    def __init__(self, manifest: str | Path, spec, anatomies: list[str], augment: bool = False,
                 cache: bool = True, preload: bool = True, seed: int = 0, two_views: bool = False,
                 feature_stride: int = 2, seg_classes=None, crop: dict | None = None):
        self.manifest = Path(manifest)
        self.root = self.manifest.parent
        self.entries = read_manifest(self.manifest)
        self.spec, self.anatomies, self.cache = spec, list(anatomies), cache
        self.augment = Augmenter() if augment else None
        self.seed = seed
        self.two_views = two_views
        self.feature_stride = int(feature_stride)
        self.epoch_step = 0
        self.seg_classes = list(seg_classes or [])
        # training only: {"prob", "slices": [...], "label_shift_prob", "label_shift_sd"}
        self.crop = dict(crop or {})
        self._cases = [load_case(e, self.root, spec, cache) for e in self.entries] if preload else None

    def __len__(self):
        return len(self.entries)

    def case(self, i: int) -> Case:
        if self._cases is not None:
            return self._cases[i]
        return load_case(self.entries[i], self.root, self.spec, self.cache)

    def sample(self, i: int, aug_seed: int | None = None) -> dict:
        c = self.case(i)
        img = torch.from_numpy(c.image.astype(np.float32))[None]
        img2 = None
        if self.augment is not None and aug_seed is not None:
            rng = np.random.default_rng([int(aug_seed), 11])
            img, c = _slab_crop(img, c, self.crop, rng)   # before the affine: less to resample
            # one shared affine for image, label map and finding masks (nearest for labels)
            self.augment.seed(aug_seed)
            geo = torch.from_numpy(np.concatenate([c.labels[None], c.finding_masks], 0).astype(np.float32))
            img, geo = self.augment.geometry(img, geo)
            geo = geo.round().to(torch.uint8).numpy()
            c = Case(c.case_id, c.image, geo[0], c.label_names, geo[1:], c.finding_items, c.presence,
                     c.report, c.grid)
            img = _label_shift(img, c, self.crop, rng)
            base = img
            img = self.augment.intensity_jitter(base)
            if self.two_views:
                img2 = self.augment.intensity_jitter(base)
        am = torch.from_numpy(anatomy_masks(c, self.anatomies))
        ft, known = finding_targets(c)
        ft = torch.from_numpy(ft)
        seg = None
        if self.seg_classes:   # class fractions per feature voxel (all 0 where ignored)
            seg = class_fractions(seg_class_map(c, self.seg_classes), len(self.seg_classes) + 1,
                                  self.feature_stride)
        # targets on the feature grid: block average (soft) over stride^3 model voxels
        out = dict(case_id=c.case_id, image=img.float(), anat=_anatomy_fractions(seg, am, self),
                   find=block_mean(ft, self.feature_stride), anat_full=am > 0, find_full=ft > 0,
                   find_known=torch.from_numpy(known), presence=torch.from_numpy(c.presence),
                   report=c.report)
        if img2 is not None:
            out["image2"] = img2.float()
        if seg is not None:
            out["seg"] = seg
        return out


def _anatomy_fractions(seg, am: torch.Tensor, ds) -> torch.Tensor:
    """Anatomy targets on the feature grid: sums of class fractions (classes are exclusive, so
    this equals the block mean of the union) where the seg classes make up the anatomy."""
    from ..model.seg_head import members

    if seg is None:
        return block_mean(am, ds.feature_stride)
    out = torch.empty((am.shape[0],) + tuple(seg.shape[1:]), dtype=torch.float32)
    for a_i, a in enumerate(ds.anatomies):
        idx = members(a, ds.seg_classes)
        out[a_i] = seg[idx].sum(0) if idx else block_mean(am[a_i:a_i + 1], ds.feature_stride)[0]
    return out


def block_mean(x: torch.Tensor, s: int) -> torch.Tensor:
    """uint8 [C,D,H,W] 0/1 -> float32 [C,D/s,H/s,W/s] block means (= avg_pool3d, exact); empty
    channels are not summed (most finding channels are)."""
    C, D, H, W = x.shape
    out = torch.zeros((C, D // s, H // s, W // s), dtype=torch.float32)
    nz = x.reshape(C, -1).any(1).nonzero().flatten().tolist()
    for ch in nz:
        v = x[ch].reshape(D // s, s, H // s, s, W // s, s)
        out[ch] = v.sum((1, 3, 5), dtype=torch.int32).float() / float(s ** 3)
    return out


def class_fractions(cls: np.ndarray, n: int, s: int) -> torch.Tensor:
    """int64 [D,H,W] class map (negative = ignored) -> float32 [n, D/s, H/s, W/s] fraction of
    each block's voxels in each class."""
    D, H, W = cls.shape
    blk = np.arange((D // s) * (H // s) * (W // s)).reshape(D // s, 1, H // s, 1, W // s, 1)
    blk = np.broadcast_to(blk, (D // s, s, H // s, s, W // s, s)).reshape(D, H, W)
    ok = cls >= 0
    counts = np.bincount(blk[ok] * n + cls[ok], minlength=blk.size // s ** 3 * n)
    out = counts.reshape(D // s, H // s, W // s, n).astype(np.float32) / float(s ** 3)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, 0)))


def seg_class_map(case: Case, seg_classes: list) -> np.ndarray:
    """int64 [D,H,W] seg-head class per voxel: 0 background, i+1 for seg_classes[i], -100
    (ignored by the loss) for a labelled structure the head does not have."""
    lut = np.full(max([0, *case.label_names]) + 1, -100, np.int64)
    lut[0] = 0
    for i, k in case.label_names.items():
        if k in seg_classes:
            lut[i] = seg_classes.index(k) + 1
    lab = case.labels.astype(np.int64)
    return lut[np.clip(lab, 0, len(lut) - 1)]


def _slab_crop(img: torch.Tensor, c: Case, crop: dict, rng):
    """With probability crop["prob"], keep a random run of crop["slices"] (multiples of 16)
    slices along S, so organs are cut at the edges as in slabs. Presence labels of findings
    with a mask follow what is left in the crop."""
    depth = img.shape[1]
    choices = [int(n) for n in crop.get("slices", []) if int(n) < depth]
    if not choices or rng.random() >= float(crop.get("prob", 0.0)):
        return img, c
    n = choices[int(rng.integers(len(choices)))]
    z0 = int(rng.integers(0, depth - n + 1))
    fm = c.finding_masks[:, z0:z0 + n]
    presence = c.presence.copy()
    index = {(f, s): i for i, (f, s, _) in enumerate(PH.finding_items())}
    for m, (name, lat) in zip(fm, c.finding_items):
        if m.any():
            continue
        for s in ([lat] if lat in ("left", "right") else ["left", "right", None]):
            if (name, s) in index:
                presence[index[(name, s)]] = 0.0
    c = Case(c.case_id, c.image, c.labels[z0:z0 + n], c.label_names, fm, c.finding_items,
             presence, c.report, c.grid)
    return img[:, z0:z0 + n].contiguous(), c


def _label_shift(img: torch.Tensor, c: Case, crop: dict, rng) -> torch.Tensor:
    """SynthSeg-style: with probability label_shift_prob, every labelled structure gets its own
    random intensity offset (N(0, label_shift_sd) in model units, 1 = 2000 HU)."""
    sd = float(crop.get("label_shift_sd", 0.0))
    if sd <= 0 or rng.random() >= float(crop.get("label_shift_prob", 0.0)):
        return img
    lab = c.labels.astype(np.int64)
    offs = rng.normal(0.0, sd, int(lab.max()) + 1).astype(np.float32)
    offs[0] = 0.0
    return (img + torch.from_numpy(offs[lab])[None]).clamp(0.0, 1.0)


def _pad_to(x: torch.Tensor, shape) -> torch.Tensor:
    pads = []
    for s, t in zip(reversed(x.shape[-3:]), reversed(shape)):
        d = t - s
        pads += [d // 2, d - d // 2]
    return F.pad(x, pads) if any(pads) else x


def collate(samples: list[dict]) -> dict:
    """Stack samples, centre-padding volumes to the largest grid in the batch."""
    shape = [max(s["image"].shape[-3 + k] for s in samples) for k in range(3)]
    stride = samples[0]["image"].shape[-1] // samples[0]["anat"].shape[-1]
    fshape = [v // stride for v in shape]
    out = {"case_id": [s["case_id"] for s in samples], "report": [s["report"] for s in samples]}
    for k in ("image", "image2", "anat_full", "find_full"):
        if k in samples[0]:
            out[k] = torch.stack([_pad_to(s[k], shape) for s in samples])
    for k in ("anat", "find", "seg"):
        if k not in samples[0]:
            continue
        out[k] = torch.stack([_pad_to(s[k], fshape) for s in samples])
    for k in ("find_known", "presence"):
        out[k] = torch.stack([s[k] for s in samples])
    return out
