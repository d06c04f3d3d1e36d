#!/usr/bin/env python
"""Does the model segment the same anatomy worse when it sees less of the body around it?

For every held-out seed whose `fov` variation draws an abdominal slab, the same patient is also
generated as a whole-torso case (same anatomy, same in-plane and slice spacing, canonical voxel
order). The model segments both; organ Dice is computed on each case's own grid, in the torso case
only over the slices inside the slab's z range. Equal Dice: the crop does not matter; lower Dice on
the slab: the model's location prior depends on the crop (issue 14's hypothesis).

    python benchmarks/fov_context.py [--model Resources/Models/ctlanguage-synth-v2] [--n 64]
"""

import argparse
import json

import numpy as np

ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "aorta", "heart",
          "lung_left", "lung_right"]


def main() -> int:
    from ctlanguage.engine import Engine
    from ctlanguage.evaluation import canonical_prompt
    from ctlanguage.metrics import dice
    from ctlanguage.phantom import generate_case
    from ctlanguage.phantom.variation import HELD_OUT_SEEDS
    from ctlanguage.volume import CTVolume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Resources/Models/ctlanguage-synth-v2")
    ap.add_argument("--n", type=int, default=len(HELD_OUT_SEEDS))
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cpu")

    def organ_dice(case, k_keep):
        enc = engine.encode(CTVolume(case.volume, case.ijk_to_ras, modality="CT"), use_cache=False)
        out = {}
        for o in ORGANS:
            gt = case.anatomy_mask(o)[k_keep]
            if gt.sum() < 20:
                continue
            pred = engine.query(enc, canonical_prompt(o), compute_masks=True)[0].mask[k_keep]
            out[o] = dice(pred, gt)
        return out

    rows = []
    for seed in list(HELD_OUT_SEEDS)[: args.n]:
        slab = generate_case(seed, orient=False, variation="fov")
        if slab.meta["fov"] != "abdomen_slab":
            continue
        torso = generate_case(seed, orient=False, fov="chest_abdomen")
        assert np.allclose(slab.meta["spacing"], torso.meta["spacing"])
        z_slab = slab.ijk_to_ras[2, 3] + slab.ijk_to_ras[2, 2] * np.array([0, slab.volume.shape[0] - 1])
        z_torso = torso.ijk_to_ras[2, 3] + torso.ijk_to_ras[2, 2] * np.arange(torso.volume.shape[0])
        inside = (z_torso >= z_slab.min()) & (z_torso <= z_slab.max())
        d_slab = organ_dice(slab, slice(None))
        d_torso = organ_dice(torso, inside)
        rows.append(dict(seed=seed, slices=int(slab.volume.shape[0]), slab=d_slab, torso=d_torso))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| organ | cases | Dice, torso case (slab slices only) | Dice, slab case | difference |")
    print("|---|---|---|---|---|")
    for o in ORGANS:
        pairs = [(r["torso"][o], r["slab"][o]) for r in rows if o in r["torso"] and o in r["slab"]]
        if pairs:
            t, s = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
            print(f"| {o} | {len(pairs)} | {t:.2f} | {s:.2f} | {s - t:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
