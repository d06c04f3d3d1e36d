"""A TotalSegmentator weights folder made at test time: nnU-Net v2 results folders (dataset.json,
plans.json, fold_0/checkpoint_final.pth) of a tiny random-weight PlainConvUNet under the folder
names TotalSegmentator 2.18.0 looks for, so its real ``totalsegmentator()`` runs offline.
The labels it predicts are arbitrary; what is real is every line of TotalSegmentator and
nnU-Net between our input file and the label map it writes."""

from __future__ import annotations

import json
from pathlib import Path

TRAINER = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
ARCH = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def _plans(name: str, spacing: float) -> dict:
    arch_kwargs = {
        "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3000.0, "mean": 100.0, "median": 80.0, "min": -1024.0,
            "percentile_00_5": -1000.0, "percentile_99_5": 1500.0, "std": 300.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [32, 32, 32], "median_image_size_in_voxels": [64, 64, 64],
            "spacing": [spacing] * 3, "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": ARCH, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


def make_weights(root: Path, task_ids=(297,)) -> Path:
    """Write random-weight models for TotalSegmentator task ids (297: fast 3 mm, 298: 6 mm crop
    model used by roi_subset) below ``root``; return ``root``."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0, **{name: int(i) for i, name in class_map["total"].items()}}
    for tid in task_ids:
        name = TASK_ID_WEIGHTS_CONFIGS[tid]["foldername"]
        spacing = {297: 3.0, 298: 6.0}[tid]
        folder = Path(root) / name / TRAINER
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        plans = _plans(name, spacing)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
            "file_ending": ".nii.gz"}))
        arch = plans["configurations"]["3d_fullres"]["architecture"]
        torch.manual_seed(tid)
        net = get_network_from_plans(ARCH, arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, len(labels), deep_supervision=False)
        # the trainer name the real weights carry (our runner hands nnU-Net its class)
        torch.save({"network_weights": net.state_dict(), "trainer_name": TRAINER.split("__")[0],
                    "init_args": {"configuration": "3d_fullres"},
                    "inference_allowed_mirroring_axes": None}, folder / "fold_0" / "checkpoint_final.pth")
    return Path(root)
