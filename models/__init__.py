"""Model construction: the one place that turns options into network arguments."""
from __future__ import annotations

from models.networks import init_weights
from models.pose_transfer_model import PoseTransferModel


def create_model(opt) -> PoseTransferModel:
    """Build the model --model names, with its published initialisation (xavier, gain 0.02).

    Args:
        opt: parsed BaseOptions (TrainOptions adds the loss weights).
    """
    model = PoseTransferModel(ngf=opt.ngf, netG=opt.netG,
                              lambda_rec=getattr(opt, "lambda_rec", 1000.0),
                              lambda_edge=getattr(opt, "lambda_edge", 0.5),
                              ot=opt.ot, precision=opt.precision)
    init_weights(model, opt.init_type, opt.init_variance)
    if opt.compile == "on":
        model.G.compile()  # in place: the state_dict keys stay the published ones
    return model
