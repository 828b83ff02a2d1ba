"""Model construction: the one place that turns options into network arguments.

MODELS maps --model to its class: "ver2ver" is 3D-CoreNet (the published name of its model), "npt" the NPT
baseline. Each class carries its published training settings (OPTIMIZER, LR_DECAY, LOSS_WEIGHTS), which
the options use as defaults.
"""
from __future__ import annotations

import torch.nn as nn

from models.networks import init_weights
from models.networks.npt import init_npt_weights
from models.npt_model import NPTModel
from models.pose_transfer_model import PoseTransferModel

MODELS = {"ver2ver": PoseTransferModel, "npt": NPTModel}


def create_model(opt) -> nn.Module:
    """Build the model --model names, with its published initialisation.

    Args:
        opt: parsed BaseOptions (TrainOptions adds the loss weights; other scripts get the defaults).
    """
    model_class = MODELS[opt.model]
    weights = {name: getattr(opt, name, default) for name, default in model_class.LOSS_WEIGHTS.items()}
    if opt.model == "npt":
        model = NPTModel(variant=opt.npt_variant, **weights)
        init_npt_weights(model)
        compiled = model.npt
    else:
        model = PoseTransferModel(ngf=opt.ngf, netG=opt.netG, ot=opt.ot, precision=opt.precision, **weights)
        init_weights(model, opt.init_type, opt.init_variance)
        compiled = model.G
    if opt.compile == "on":
        compiled.compile()  # in place: the state_dict keys stay the published ones
    return model
