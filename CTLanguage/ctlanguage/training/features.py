"""Cached stage-1 features: one ``.npz`` per case with the frozen encoder's dense features and the
targets stage 2 trains and evaluates on (docs/training.md "Stage 2").

A cached sample has the keys of ``ManifestDataset.sample`` with ``dense`` [C,d,h,w] in place of
``image``, so ``TrainingObjective`` and ``collect_predictions`` run on it unchanged. Dense
features are stored as float16 (the only loss: |Δ| ≲ 1e-3 relative), the model-grid ground truth
(``anat_full``, ``find_full``) as packed bits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

FORMAT = "ctlanguage-features-v1"


def encoder_fingerprint(model) -> str:
    """sha256 over the image encoder's tensors and the model grid: equal for a stage-1 model and
    every stage-2 model trained on its features."""
    h = hashlib.sha256(json.dumps(model.config.spec_params, sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        if k.startswith("image_encoder."):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_dir_for(root: str | Path, model, split: str) -> Path:
    """<root>/<first 12 hex of the encoder fingerprint>/<split>: features of one encoder."""
    return Path(root) / encoder_fingerprint(model)[:12] / split


def _pack(x: torch.Tensor) -> np.ndarray:
    return np.packbits(x.numpy().astype(bool).reshape(-1))


def _unpack(bits: np.ndarray, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(bool).reshape(shape))


@torch.no_grad()
def cache_features(model, manifest: str | Path, out_dir: str | Path, progress=None) -> Path:
    """Encode every case of ``manifest`` with ``model`` (frozen, eval mode, no augmentation) and
    write ``out_dir/<case_id>.npz``; cases already cached are skipped (resumable)."""
    from .dataset import ManifestDataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    ds = ManifestDataset(manifest, cfg.spec, cfg.anatomies, feature_stride=cfg.feature_stride,
                         preload=False, seg_classes=cfg.seg_classes)
    model.eval()
    ids = []
    for n in range(len(ds)):
        cid = ds.entries[n]["case_id"]
        ids.append(cid)
        dest = out / f"{cid}.npz"
        if dest.is_file():
            if progress:
                progress(n + 1, len(ds))
            continue
        s = ds.sample(n)
        dense = model.encode_image(s["image"][None]).dense[0]
        ff = s["find_full"]
        nz = [i for i in range(ff.shape[0]) if bool(ff[i].any())]
        arrays = dict(
            format=np.array(FORMAT), case_id=np.array(cid), report=np.array(s["report"]),
            dense=dense.to(torch.float16).numpy(),
            anat=np.round(s["anat"].numpy() * 255).astype(np.uint8),
            seg_classes=np.array(json.dumps(list(cfg.seg_classes))),
            seg=np.round(s["seg"].numpy() * 255).astype(np.uint8) if "seg" in s else np.zeros(0, np.uint8),
            find=np.round(s["find"].numpy() * 255).astype(np.uint8),
            find_known=s["find_known"].numpy(), presence=s["presence"].numpy(),
            full_shape=np.array(s["anat_full"].shape[1:]), n_items=np.array(ff.shape[0]),
            anat_full=_pack(s["anat_full"]), find_full_index=np.array(nz, np.int64),
            find_full=_pack(ff[nz]) if nz else np.zeros(0, np.uint8),
        )
        tmp = dest.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, dest)
        if progress:
            progress(n + 1, len(ds))
    (out / "index.json").write_text(json.dumps({"format": FORMAT, "manifest": str(manifest),
                                                "encoder": encoder_fingerprint(model),
                                                "cases": ids}, indent=1))
    return out


class FeatureSet:
    """Cached cases of one or more ``cache_features`` folders (read into memory once).

    ``full=False`` (training) keeps neither the model-grid ground truth nor, with ``seg=False``,
    the seg-class fractions in memory, and stores the finding targets sparsely: ~8 MB a case."""

    def __init__(self, dirs, preload: bool = True, full: bool = True, seg: bool = True):
        self.full, self.seg = full, seg
        self.files, self.encoders = [], set()
        for d in [dirs] if isinstance(dirs, (str, Path)) else dirs:
            d = Path(d)
            idx = json.loads((d / "index.json").read_text())
            if idx.get("format") != FORMAT:
                raise ValueError(f"{d} is not a CTLanguage feature cache ({FORMAT})")
            self.files += [d / f"{c}.npz" for c in idx["cases"]]
            self.encoders.add(idx.get("encoder"))
        self._data = [self._read(f) for f in self.files] if preload else None

    def check_encoder(self, model) -> None:
        """Refuse a model whose frozen encoder is not the one these features came from."""
        if self.encoders != {encoder_fingerprint(model)}:
            raise ValueError("these cached features were computed by another image encoder than "
                             "this model's")

    def _read(self, path: Path) -> dict:
        drop = set() if self.full else {"anat_full", "find_full", "find_full_index"}
        if not self.seg:
            drop.add("seg")
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files if k not in drop}
        if not self.full:   # finding targets: only the channels that have a voxel
            f = out.pop("find")
            nz = np.flatnonzero(f.reshape(f.shape[0], -1).any(1))
            out.update(find_shape=np.array(f.shape), find_index=nz, find_values=f[nz])
        return out

    def __len__(self):
        return len(self.files)

    def sample(self, i: int, aug_seed=None) -> dict:
        z = self._data[i] if self._data is not None else self._read(self.files[i])
        if "find" in z:
            find = z["find"].astype(np.float32) / 255.0
        else:
            find = np.zeros(tuple(z["find_shape"]), np.float32)
            find[z["find_index"]] = z["find_values"].astype(np.float32) / 255.0
        out = dict(case_id=str(z["case_id"]), report=str(z["report"]),
                   dense=torch.from_numpy(z["dense"].astype(np.float32)),
                   anat=torch.from_numpy(z["anat"].astype(np.float32) / 255.0),
                   find=torch.from_numpy(find), find_known=torch.from_numpy(z["find_known"]),
                   presence=torch.from_numpy(z["presence"]))
        if "seg" in z and z["seg"].size:
            out["seg"] = torch.from_numpy(z["seg"].astype(np.float32) / 255.0)
        if "anat_full" in z:
            shape = tuple(int(v) for v in z["full_shape"])
            out["anat_full"] = _unpack(z["anat_full"], (z["anat"].shape[0],) + shape)
            out["find_full"] = torch.zeros((int(z["n_items"]),) + shape, dtype=torch.bool)
            idx = z["find_full_index"].tolist()
            if idx:
                out["find_full"][idx] = _unpack(z["find_full"], (len(idx),) + shape)
        return out


def collate_features(samples: list[dict]) -> dict:
    """Stack cached samples, centre-padding the feature-grid tensors to the largest in the batch."""
    from .dataset import _pad_to

    shape = [max(s["dense"].shape[-3 + k] for s in samples) for k in range(3)]
    out = {"case_id": [s["case_id"] for s in samples], "report": [s["report"] for s in samples]}
    for k in ("dense", "anat", "find", "seg"):
        if k in samples[0]:
            out[k] = torch.stack([_pad_to(s[k], shape) for s in samples])
    for k in ("find_known", "presence"):
        out[k] = torch.stack([s[k] for s in samples])
    return out


def subsample_voxels(sample: dict, n: int, rng: np.random.Generator, per_mask: int = 256) -> dict:
    """A cached sample reduced to ``n`` feature voxels, laid out as a [.., n, 1, 1] grid, for
    stage-2 training of the pointwise heads (organ pooling, mask head, 1x1x1 seg head): up to
    ``per_mask`` voxels of every anatomy and finding target (so a gallbladder or a nodule is never
    lost), the rest uniform. Pooling and losses then see an unbiased-enough sample of each mask at
    ~1/10 of the cost; evaluation always uses the whole grid."""
    dense = sample["dense"]
    P = int(np.prod(dense.shape[1:]))
    keys = [k for k in ("anat", "find") if k in sample]
    picked = []
    for k in keys:
        flat = sample[k].reshape(sample[k].shape[0], P)
        for ch in range(flat.shape[0]):
            idx = torch.nonzero(flat[ch] > 0).flatten().numpy()
            if idx.size:
                picked.append(rng.choice(idx, size=min(per_mask, idx.size), replace=False))
    chosen = np.unique(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    if chosen.size > n:
        chosen = rng.choice(chosen, size=n, replace=False)
    elif chosen.size < n:
        rest = np.setdiff1d(np.arange(P), chosen, assume_unique=True)
        chosen = np.concatenate([chosen, rng.choice(rest, size=min(n - chosen.size, rest.size), replace=False)])
    if chosen.size < n:   # a grid smaller than n voxels: repeat some (weights stay per voxel)
        chosen = np.concatenate([chosen, rng.choice(chosen, size=n - chosen.size)])
    idx = torch.from_numpy(np.sort(chosen))
    out = dict(sample)
    for k in ("dense", "anat", "find", "seg"):
        if k in sample:
            t = sample[k].reshape(sample[k].shape[0], P)[:, idx]
            out[k] = t.reshape(t.shape[0], n, 1, 1)
    return out
