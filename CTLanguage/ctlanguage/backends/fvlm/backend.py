"""The fVLM backend: one image pass per region present, fVLM's zero-shot rule per finding.

Encoding takes the pipeline's anatomy masks for fVLM's four regions (``preprocess.REGIONS``),
builds each region's window and keeps one 256-d embedding per region. A finding is judged in the
region fVLM was evaluated on for it (:data:`FINDINGS`; lung findings and pleural effusion in the
whole lung, so both sides get the same number) with the authors' prompt pair
``"{X}."`` / ``"Not {X}."``: probability = softmax(cosine / temperature) of the positive text,
i.e. sigmoid((cos_pos - cos_neg) / temp). The temperature is the model's own training value, so
the number is the model's zero-shot probability, not calibrated on any site's cases: answers say
``calibrated=False`` with the rule's decision point 0.5 (the positive text as close as the negated
one). A site calibration (``ctlanguage calibrate``, fitted on the logit
(cos_pos - cos_neg) / temp) turns it into a calibrated probability named after the cohort.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ... import catalog
from ...engine.progress import check_cancel, report
from ...engine.protocol import Answer, Capabilities, ModelInfo
from ...engine.scoring import calibrated_probability, site_calibration
from ...errors import CheckpointError, InputError
from ...preprocess import ModelGrid
from . import NEEDS_ANATOMY, WEIGHTS_HINT
from . import preprocess as P
from . import weights as W
from .network import ORGANS

MAX_TOKENS = 384     # fVLM's text length limit
# our finding key -> (fVLM region, the authors' positive text); negative: "Not " + positive
FINDINGS = {
    "emphysema": ("lung", "Emphysema."),
    "atelectasis": ("lung", "Atelectatic."),
    "lung_nodule": ("lung", "Nodule."),
    "pleural_effusion": ("lung", "Pleural effusion."),
    "consolidation": ("lung", "Consolidation."),
    "cardiomegaly": ("heart", "Cardiomegaly."),
    "pericardial_effusion": ("heart", "Pericardial effusion."),
    "arterial_calcification": ("aorta", "Arterial wall calcification."),
}


def prompt_pair(finding: str) -> tuple:
    """(region, positive text, negative text) fVLM judges ``finding`` with."""
    if finding not in FINDINGS:
        raise InputError(f"fVLM gives no score for {finding!r}; it scores "
                         f"{', '.join(sorted(FINDINGS))}")
    organ, pos = FINDINGS[finding]
    return organ, pos, "Not " + pos


@dataclass
class FVLMState:
    organs: tuple                   # regions present (rows of ``embeddings``)
    embeddings: np.ndarray          # (len(organs), 256) L2-normalised
    windows: dict = field(default_factory=dict)   # organ -> ModelGrid of its network input
    timings: dict = field(default_factory=dict)

    def embedding(self, organ: str) -> Optional[np.ndarray]:
        return self.embeddings[self.organs.index(organ)] if organ in self.organs else None

    def tensors(self) -> dict:
        return {"embeddings": self.embeddings}

    def metadata(self) -> dict:
        return {"organs": list(self.organs), "windows": {o: g.to_dict() for o, g in self.windows.items()}}

    def nbytes(self) -> int:
        return int(self.embeddings.nbytes)


class FVLMBackend:
    """Implements ``engine.protocol.Backend`` (scores only; needs the pipeline's anatomy)."""

    def __init__(self, net, tokenizer, info, device):
        self.net = net.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.info = info
        # a site's `ctlanguage calibrate` of these exact weights, else fVLM's own probabilities
        self.calibration = site_calibration(info.id, info.sha256 or "", Path(info.path) if info.path else None)
        self.capabilities = Capabilities(scores=True, calibrated=self.calibration is not None, device="cpu")
        self._text: dict = {}

    # ---- image ------------------------------------------------------------------------------
    def region_masks(self, anatomy) -> dict:
        """{organ: bool mask on the source grid} from the pipeline's anatomy backend."""
        known = set(anatomy.keys)
        out = {}
        for organ, keys in P.REGIONS.items():
            have = tuple(k for k in keys if k in known)
            if have:
                m = anatomy.mask(have)
                if m.any():
                    out[organ] = m.astype(bool)
        return out

    def encode(self, volume, progress=None, cancel=None, anatomy=None) -> FVLMState:
        import time

        if anatomy is None:
            raise InputError(NEEDS_ANATOMY)
        t0 = time.perf_counter()
        report(progress, 0.0, "fVLM: anatomy regions")
        masks = self.region_masks(anatomy)
        return self.encode_regions(volume, masks, progress, cancel, t0)

    def encode_regions(self, volume, masks: dict, progress=None, cancel=None, t0=None) -> FVLMState:
        """Encode with region masks given directly (``{organ: bool array on the source grid}``)."""
        import time

        import torch

        t0 = time.perf_counter() if t0 is None else t0
        report(progress, 0.05, "fVLM: resampling to 1 x 1 x 3 mm")
        x = P.prepare(volume, masks)
        check_cancel(cancel)
        organs = x.present()
        embs, grids = [], {}
        t1 = time.perf_counter()
        for i, organ in enumerate(organs):
            report(progress, 0.1 + 0.9 * i / len(organs), f"fVLM: image encoder ({organ})")
            w = P.window(x, organ)
            with torch.inference_mode():
                img = torch.from_numpy(w.image)[None, None].to(self.device)
                e = self.net.organ_embedding(img, torch.from_numpy(w.mask).to(self.device),
                                             ORGANS.index(organ))
            embs.append(e.float().cpu().numpy())
            grids[organ] = w.grid
            check_cancel(cancel)
        report(progress, 1.0, "fVLM: encoded")
        emb = np.stack(embs).astype(np.float32) if embs else np.zeros((0, 256), np.float32)
        return FVLMState(tuple(organs), emb, grids,
                         {"preprocess": t1 - t0, "image_encoder": time.perf_counter() - t1})

    def restore(self, metadata: dict, tensors) -> FVLMState:
        emb = np.asarray(tensors["embeddings"], np.float32)
        organs = tuple(metadata["organs"])
        if emb.shape != (len(organs), 256):
            raise InputError("The saved fVLM embeddings do not match their metadata.")
        return FVLMState(organs, emb, {o: ModelGrid.from_dict(g) for o, g in metadata["windows"].items()})

    # ---- text -------------------------------------------------------------------------------
    def text_embeddings(self, texts) -> np.ndarray:
        """(N, 256) L2-normalised text embeddings (kept per text)."""
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self._text]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt")
            with torch.inference_mode():
                e = self.net.text_embeddings(batch["input_ids"].to(self.device),
                                             batch["attention_mask"].to(self.device))
            self._text.update(zip(todo, e.float().cpu().numpy()))
        return np.stack([self._text[t] for t in texts])

    # ---- scores -----------------------------------------------------------------------------
    def logit(self, state: FVLMState, finding: str, positives=None) -> Optional[float]:
        """(cos_pos - cos_neg) / temperature, or None when the finding's region is absent;
        ``positives`` replaces the positive text (mean similarity over them)."""
        organ, pos, neg = prompt_pair(finding)
        img = state.embedding(organ)
        if img is None:
            return None
        pos_e = self.text_embeddings(list(positives) if positives is not None else [pos])
        neg_e = self.text_embeddings([neg])
        temp = float(self.net.temp.detach().cpu())
        return float(((pos_e @ img).mean() - (neg_e @ img).mean()) / temp)

    def probability(self, z: float, finding: str) -> float:
        """The site calibration's probability, else fVLM's own (sigmoid of the logit)."""
        if self.calibration is not None:
            return self.calibration.probability(z, finding)
        return calibrated_probability(z)

    def presence(self, state: FVLMState, finding: str, anatomy: str, side: Optional[str],
                 positives=None, raw: bool = False) -> float:
        """The number for ``finding`` (``raw``: fVLM's logit, what calibration fits on). fVLM
        judges its whole region: ``anatomy``/``side`` do not change the number."""
        z = self.logit(state, finding, positives)
        if z is None:
            raise InputError(f"the {FINDINGS[finding][0]} region fVLM judges {finding!r} in is "
                             "absent from this scan's anatomy masks")
        return z if raw else self.probability(z, finding)

    def answer(self, state: FVLMState, request) -> Answer:
        cal = self.calibration
        ans = Answer(model=self.info.id, calibrated=cal is not None,
                     calibration=cal.label if cal is not None else None,
                     decision_score=None if cal is not None else 0.5)
        if request.kind != "finding" or request.finding not in FINDINGS or not request.want_scores:
            return ans
        z = self.logit(state, request.finding)
        if z is not None:
            p = self.probability(z, request.finding)
            for key in request.anatomies:
                ans.scores[key] = p
        return ans


# ----------------------------------------------------------------------------- loading

def load_folder(folder, device=None, entry=None) -> FVLMBackend:
    """Backend from a converted model folder (``weights.convert``)."""
    import torch
    from safetensors.torch import load_file

    from ...engine.engine import resolve_device
    from .network import FVLMNet

    folder = Path(folder)
    summary = catalog.verify_model_dir(folder, entry)
    cfg = W.read_config(folder)
    W.require_terms(cfg)
    dev = torch.device(resolve_device(device))
    with torch.device("meta"):
        net = FVLMNet(cfg["vision_config"], cfg["text_config"])
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state = W.check_against(load_file(str(folder / catalog.WEIGHTS)), expected,
                            str(folder / catalog.WEIGHTS))
    net.load_state_dict(state, strict=True, assign=True)
    net.rebuild_buffers()
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{folder / catalog.WEIGHTS} lacks {len(left)} tensors (e.g. {left[0]!r})")
    tok = W.load_tokenizer(folder / W.TOKENIZER_DIR)
    info = ModelInfo(id=(entry.id if entry else cfg.get("id", "fvlm")),
                     version=(entry.version if entry else cfg.get("version", "")),
                     sha256=summary["weights_sha256"], kind="fvlm",
                     license=(entry.license if entry else W.TERMS), path=str(folder),
                     notice="fVLM: no licence file; trained on CT-RATE (non-commercial data). "
                            "Scores are the model's own probabilities, not calibrated on your cases.")
    return FVLMBackend(net, tok, info, dev)


def load(entry, device=None, progress=None) -> FVLMBackend:
    folder = catalog.cached_model_dir(entry)
    if not (folder / catalog.WEIGHTS).is_file():
        raise CheckpointError(WEIGHTS_HINT)
    report(progress, 0.0, f"loading {entry.id}")
    return load_folder(folder, device=device, entry=entry)
