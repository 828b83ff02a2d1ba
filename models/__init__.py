"""Model construction: the one place that turns options into network arguments.

MODELS maps --model to its class: "ver2ver" is 3D-CoreNet (the published name of its model), "npt" the NPT
baseline. Each class carries its published training settings (OPTIMIZER, LR_DECAY, LOSS_WEIGHTS), which
the options use as defaults.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from models.cuda_graphs import GraphedTransfer, TransferFunction
from models.networks import init_weights
from models.networks.npt import init_npt_weights
from models.npt_model import NPTModel
from models.pose_transfer_model import PoseTransferModel

MODELS = {"ver2ver": PoseTransferModel, "npt": NPTModel}


def disable_tf32() -> None:
    """Keep float32 convolutions and matrix products exact on GPUs (PyTorch lets cuDNN use TF32 by default).

    The correspondence similarity C enters exp(C / 0.03), so TF32's ~1e-3 relative error in the feature
    convolutions would be magnified about 33 times; the fp32 path must also match the published numbers.
    Mixed precision (--precision fp16/bf16) is chosen explicitly for the generator instead. Also silences
    Inductor's advice to turn TF32 on when it compiles a float32 matrix product (--compile on): here it is
    off on purpose, and the advice would mislead.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication",
                            category=UserWarning)


def create_model(opt) -> nn.Module:
    """Build the model --model names, with its published initialisation; turns TF32 off (disable_tf32).

    Args:
        opt: parsed BaseOptions (TrainOptions adds the loss weights; other scripts get the defaults).
    """
    disable_tf32()
    model_class = MODELS[opt.model]
    weights = {name: getattr(opt, name, default) for name, default in model_class.LOSS_WEIGHTS.items()}
    if opt.model == "npt":
        model = NPTModel(variant=opt.npt_variant, precision=opt.precision, **weights)
        init_npt_weights(model)
    else:
        model = PoseTransferModel(ngf=opt.ngf, netG=opt.netG, ot=opt.ot, precision=opt.precision,
                                  fold_linear=opt.fold_linear == "on", **weights)
        init_weights(model, opt.init_type, opt.init_variance)
    if opt.compile == "on":
        model.compile_networks()
    return model


def inference_transfer(model: nn.Module, opt) -> TransferFunction:
    """model.transfer for test.py and transfer.py: replayed from CUDA graphs when --cuda_graphs is on.

    Args:
        model: in eval mode, on the device of opt.
        opt: parsed options with cuda_graphs resolved to "on" or "off".
    """
    return GraphedTransfer(model) if opt.cuda_graphs == "on" else model.transfer
