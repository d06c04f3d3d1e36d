"""The VoxTell backend through the real ``voxtell`` 0.1.2 predictor, offline: a model folder made
here (the published network class, shrunk; nnU-Net plans; a pickled checkpoint; an embedding bank
in the Hub layout). Checks: the backend contract, equality with the package's own
``predict_single_image``, exact geometry on permuted/flipped/anisotropic copies, the safe weight
path (weights-only unpickling, strict keys, hash, safetensors cache) and the one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("voxtell", reason="the voxtell package is not installed (pip install 'ctlanguage[voxtell]')")

import _voxtell_helpers as H  # noqa: E402
from ctlanguage.engine import Engine, Request  # noqa: E402
from ctlanguage.errors import CancelledError, CheckpointError, InputError  # noqa: E402
from ctlanguage.volume import CTVolume, closest_ras  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Own cache, Hub cache and no VoxTell variables (restored afterwards)."""
    keys = ("CTLANGUAGE_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "VOXTELL_MODEL", "VOXTELL_EMBEDDINGS",
            "VOXTELL_TEXT_MODEL")
    before = {k: os.environ.get(k) for k in keys}
    root = tmp_path_factory.mktemp("vx_env")
    os.environ.update(CTLANGUAGE_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"),
                      HF_HUB_OFFLINE="1")
    for k in keys[3:]:
        os.environ.pop(k, None)
    yield root
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model_dir(env, tmp_path_factory):
    return H.make_model_dir(tmp_path_factory.mktemp("vx_model"))


@pytest.fixture(scope="module")
def backend(model_dir):
    import torch

    from ctlanguage.backends import voxtell

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield voxtell.load(None, device="cpu", model_dir=model_dir, network_cls=H.tiny_network_class())
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def volume():
    return H.phantom()


def _liver(backend, state):
    return backend.answer(state, Request(text="liver", kind="anatomy", anatomies=("liver",)))


def test_backend_conforms_to_the_contract(backend, volume):
    from test_backend_contract import check_backend

    check_backend(backend, volume)
    caps = backend.capabilities
    assert caps.free_text_masks and caps.finding_masks and not caps.scores
    assert caps.device == "gpu-recommended" and "liver" in caps.anatomy
    assert backend.info.kind == "voxtell" and len(backend.info.sha256) == 64
    assert "not stated" in backend.info.license


def test_masks_equal_the_package_predict_single_image(backend, volume):
    """On an RAS volume our path (preprocess -> logits on the cropped grid -> resample at 0.5)
    gives exactly the package's own end-to-end mask."""
    engine = Engine.load(backend, device="cpu")
    enc = engine.encode(volume)
    for prompt, text in (("liver", "liver"), ("pleural effusion", "Pleural effusion")):
        (f,) = engine.query(enc, prompt, absent_masks=True)
        ref = backend.predictor.predict_single_image(volume.array, [text])[0]
        assert f.mask_model == "voxtell" and f.probability is None
        assert 0 < ref.sum() < ref.size
        assert np.array_equal(f.mask, ref)


def test_our_predictor_equals_the_package_constructor(backend, model_dir, monkeypatch, volume):
    """Our constructor (no pickle, no Hub) sets what the package's own constructor sets; the
    package's constructor is run on the same folder with the same network class."""
    import torch
    import voxtell.inference.predictor as VP

    tiny, seen = H.tiny_network_class(), []

    class Recording(tiny):
        def __init__(self, **kw):
            seen.append(dict(kw))
            super().__init__(**kw)

    from ctlanguage.backends import voxtell_weights as W

    monkeypatch.setattr(VP, "VoxTellModel", Recording)
    bank = model_dir.parent / "embeddings" / "voxtell_v1.1" / "text_embeddings.npz"
    ref = VP.VoxTellPredictor(model_dir=str(model_dir), device=torch.device("cpu"),
                              embedding_bank=str(bank))
    ours = backend.predictor
    W.build_network(W.read_plans(model_dir), Recording)
    assert len(seen) == 2 and seen[0] == seen[1]        # the same published sizes and plans
    assert set(vars(ours)) == set(vars(ref))
    for k, v in vars(ref).items():
        if k not in ("network", "embedding_bank", "normalization"):
            assert getattr(ours, k) == v, k
    assert set(ours.embedding_bank) == set(ref.embedding_bank)
    a, b = ours.network.state_dict(), ref.network.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(ours.predict_single_image(volume.array, ["spleen"]),
                          ref.predict_single_image(volume.array, ["spleen"]))


def _reoriented(volume: CTVolume, order, flips) -> CTVolume:
    """The same voxels stored with array axes permuted (``order``) and flipped."""
    arr = volume.array.transpose(order)
    n_old = volume.shape[::-1]                # voxels along the old i, j, k
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for new_ax, old_ax in enumerate(order):   # array axes -> voxel axes (2 - axis)
        a_new, a_old = 2 - new_ax, 2 - old_ax
        if flips[new_ax]:
            arr = np.flip(arr, axis=new_ax)
            m[a_old, a_new], m[a_old, 3] = -1.0, n_old[a_old] - 1
        else:
            m[a_old, a_new] = 1.0
    return CTVolume(np.ascontiguousarray(arr), volume.ijk_to_ras @ m)


def _same_voxels(src: CTVolume, dst: CTVolume, mask_dst: np.ndarray) -> np.ndarray:
    """``mask_dst`` (on dst's grid) read back at src's voxel positions."""
    k, j, i = np.indices(src.shape).reshape(3, -1)
    ras = src.ijk_to_ras_points(np.stack([i, j, k], 1))
    q = np.rint(dst.ras_to_ijk_points(ras)).astype(int)
    return mask_dst[q[:, 2], q[:, 1], q[:, 0]].reshape(src.shape)


@pytest.mark.parametrize("order,flips", [((0, 1, 2), (1, 0, 0)), ((2, 0, 1), (0, 1, 1)),
                                         ((1, 2, 0), (1, 1, 1)), ((2, 1, 0), (0, 0, 1))])
def test_every_reoriented_copy_gets_the_mask_on_the_same_physical_voxels(backend, volume, order, flips):
    engine = Engine.load(backend, device="cpu")
    (ref,) = engine.query(engine.encode(volume), "liver")
    assert 0 < ref.mask.sum() < ref.mask.size
    assert not np.array_equal(ref.mask, ref.mask[:, :, ::-1])   # a flip would be seen
    copy = _reoriented(volume, order, flips)
    assert np.array_equal(_same_voxels(volume, copy, copy.array), volume.array)
    r = closest_ras(copy)
    assert np.array_equal(r.array, volume.array) and np.allclose(r.ijk_to_ras, volume.ijk_to_ras)
    (f,) = engine.query(engine.encode(copy), "liver")
    assert f.mask.shape == copy.shape
    assert np.array_equal(_same_voxels(volume, copy, f.mask), ref.mask)


def test_oblique_volume_keeps_its_grid(backend):
    """An oblique scan is re-indexed, never resampled: the mask lands on its own voxels."""
    base = H.phantom()
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.eye(4)
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    vol = CTVolume(base.array, rot @ base.ijk_to_ras)
    flipped = _reoriented(vol, (1, 0, 2), (0, 1, 0))
    engine = Engine.load(backend, device="cpu")
    (a,) = engine.query(engine.encode(vol), "liver")
    (b,) = engine.query(engine.encode(flipped), "liver")
    assert np.array_equal(_same_voxels(vol, flipped, b.mask), a.mask) and a.mask.any()


def test_encoding_round_trip_and_cached_prompts(backend, volume, tmp_path):
    from ctlanguage.engine import Encoding

    engine = Engine.load(backend, device="cpu")
    enc = engine.encode(volume)
    (a,) = engine.query(enc, "spleen")
    path = enc.save(tmp_path / "vx.safetensors")
    again = Encoding.load(path, engine, volume=volume)
    (b,) = engine.query(again, "spleen")
    assert np.array_equal(a.mask, b.mask)
    state = enc.parts["voxtell"]
    assert len(state._logits) >= 1 and state.nbytes() == state.image.numel() * 4


def test_progress_reports_patches_and_time_left_and_cancel_stops(backend, volume):
    state = backend.encode(volume)
    seen = []
    backend.progress = lambda f, m: seen.append((f, m))
    try:
        backend.answer(state, Request(text="right lung", kind="anatomy", anatomies=("lung_right",)))
        assert seen[-1][0] == 1.0 and "patch" in seen[-1][1] and "s left" in seen[-1][1]
        assert len(seen) == state.patches > 1

        def stop(f, m):
            raise CancelledError("stop")

        backend.progress = stop
        with pytest.raises(CancelledError):
            backend.answer(state, Request(text="left lung", kind="anatomy", anatomies=("lung_left",)))
    finally:
        backend.progress = None


def test_prompt_outside_the_bank_without_the_text_model_is_one_clear_error(backend, volume, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("VOXTELL_TEXT_MODEL", str(tmp_path / "nowhere"))
    state = backend.encode(volume)
    req = Request(text="left kidney cyst", kind="finding", anatomies=("kidney_left",),
                  finding="kidney_cyst", laterality="left")
    with pytest.raises(InputError) as e:
        backend.answer(state, req)
    msg = str(e.value)
    assert "Qwen/Qwen3-Embedding-4B" in msg and "hf download Qwen/Qwen3-Embedding-4B" in msg and "\n" not in msg


def test_typed_text_is_used_when_only_it_is_in_the_bank(backend):
    req = Request(text="Pleural  Effusion", kind="finding", anatomies=("pleural_space_left",),
                  finding="pleural_effusion", laterality="left")
    assert backend.prompts(req) == ["pleural effusion"]      # "left pleural effusion" is not in it
    req2 = Request(text="lungs", kind="anatomy", anatomies=("lung_left", "lung_right"))
    assert backend.prompts(req2) == ["left lung", "right lung"]
    req3 = Request(text="cardiomegaly", kind="finding", anatomies=("heart",), finding="cardiomegaly")
    assert backend.prompts(req3) == ["heart"]                  # its extent is the organ


# ---- weights ---------------------------------------------------------------------------------

def test_missing_weights_one_sentence_and_nothing_written(env, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as C

    from ctlanguage.backends import voxtell

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "no_hub_cache"))
    from ctlanguage.cli import main

    with pytest.raises(InputError, match="hf download mrokuss/VoxTell"):
        voxtell.load(None, device="cpu")
    with pytest.raises(InputError, match="not a VoxTell model folder"):
        voxtell.load(None, device="cpu", model_dir=tmp_path)
    img = tmp_path / "ct.nii.gz"
    from ctlanguage.io import write_volume

    write_volume(H.phantom(), img)
    out = tmp_path / "out"
    code = main(["--quiet", "query", str(img), "-p", "liver", "--out", str(out), "--model", "voxtell"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "VOXTELL_MODEL" in err[0], err
    assert not out.exists()
    code = main(["--quiet", "models", "download", "voxtell"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "hf download mrokuss/VoxTell" in err[0], err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no|none is available"):
            voxtell.load(None, device="cuda", model_dir=H.make_model_dir(tmp_path / "m"))
    caps = voxtell.describe(None)
    assert not caps.weights_present and "hf download" in caps.weights_hint


def test_weights_are_unpickled_once_weights_only_then_read_as_safetensors(model_dir, monkeypatch):
    import torch

    from ctlanguage.backends import voxtell, voxtell_weights as W
    from ctlanguage.catalog import cache_dir, sha256_file

    first = voxtell.load(None, device="cpu", model_dir=model_dir, network_cls=H.tiny_network_class())
    sha = sha256_file(model_dir / W.CHECKPOINT)
    assert first.info.sha256 == sha
    assert (cache_dir() / "voxtell" / sha[:16] / "network.safetensors").is_file()

    def no_pickle(path):
        raise AssertionError("the pickle was opened again")

    monkeypatch.setattr(W, "read_checkpoint", no_pickle)
    again = voxtell.load(None, device="cpu", model_dir=model_dir, network_cls=H.tiny_network_class())
    a, b = first.predictor.network.state_dict(), again.predictor.network.state_dict()
    assert again.info.sha256 == sha and all(torch.equal(a[k], b[k]) for k in a)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("case", ["foreign_keys", "missing_keys", "code", "catalog_sha"])
def test_tampered_checkpoints_are_refused(env, tmp_path, case):
    import torch

    from ctlanguage.backends import voxtell
    from ctlanguage.catalog import ModelEntry

    root = tmp_path / case
    d = H.make_model_dir(root, seed=7 if case != "catalog_sha" else 8)
    ckpt = d / "fold_0" / "checkpoint_final.pth"
    c = torch.load(ckpt, weights_only=False)
    entry = None
    if case == "foreign_keys":
        c["network_weights"]["head.extra.weight"] = torch.zeros(2)
    elif case == "missing_keys":
        c["network_weights"].pop(next(iter(c["network_weights"])))
    elif case == "code":
        c["trainer_name"] = _Boom()
    else:
        entry = ModelEntry(id="voxtell", version="1.1", backend="voxtell",
                           extra={"checkpoint_sha256": "0" * 64})
    torch.save(c, ckpt)
    with pytest.raises(CheckpointError) as e:
        voxtell.load(entry, device="cpu", model_dir=d, network_cls=H.tiny_network_class())
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg
    expect = {"foreign_keys": "unexpected keys", "missing_keys": "missing keys",
              "code": "weights-only", "catalog_sha": "sha256"}[case]
    assert expect in msg


def test_plans_may_only_name_torch_or_network_classes(env, tmp_path):
    from ctlanguage.backends import voxtell

    d = H.make_model_dir(tmp_path)
    plans = json.loads((d / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (d / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="refusing to import"):
        voxtell.load(None, device="cpu", model_dir=d, network_cls=H.tiny_network_class())


def test_catalog_and_registry_know_voxtell():
    from ctlanguage import catalog
    from ctlanguage.backends import EXTRAS, backend_module

    e = catalog.find_entry("voxtell")
    assert e is not None and e.backend == "voxtell" and "not stated" in e.license
    assert catalog.resolve_model("voxtell") == (None, e)
    assert backend_module("voxtell").KIND == "voxtell" and EXTRAS["voxtell"] == "voxtell"


def test_prompts_outside_the_bank_load_a_local_text_model_only_then(model_dir, volume, tmp_path,
                                                                     monkeypatch):
    from ctlanguage.backends import voxtell

    monkeypatch.setenv("VOXTELL_TEXT_MODEL", str(H.make_text_model(tmp_path / "qwen")))
    b = voxtell.load(None, device="cpu", model_dir=model_dir, network_cls=H.tiny_network_class())
    seen = []
    b.progress = lambda f, m: seen.append(m)
    state = b.encode(volume)
    b.answer(state, Request(text="liver", kind="anatomy", anatomies=("liver",)))
    assert b.predictor.text_backbone is None                    # the bank had it
    ans = b.answer(state, Request(text="left kidney cyst", kind="finding", anatomies=("kidney_left",),
                                  finding="kidney_cyst", laterality="left"))
    assert b.predictor.text_backbone is not None and "left kidney cyst" in b.predictor.embedding_bank
    assert any("text model" in m for m in seen)
    assert ans.logit.shape == state.grid.shape and (ans.logit > 0).any()


def test_weights_are_found_in_the_hugging_face_cache(env, tmp_path, monkeypatch):
    """`hf download` without --local-dir leaves them in the Hub cache: found there, offline."""
    import huggingface_hub.constants as C

    from ctlanguage.backends import voxtell_weights as W

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mrokuss--VoxTell"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    d = H.make_model_dir(repo / "snapshots" / rev)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert W.model_dir_for(None) == d
    assert W.bank_path_for(d).name == "text_embeddings.npz"
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert W.model_dir_for(None) is None
