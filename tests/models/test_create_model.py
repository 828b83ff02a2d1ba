"""create_model's process-wide settings: exact float32 products, and no advice to undo that."""
import warnings

import torch

from models import disable_tf32


def test_disable_tf32_turns_tf32_off_and_silences_inductors_tf32_advice():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            disable_tf32()
            warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available but not "
                          "enabled. Consider setting `torch.set_float32_matmul_precision('high')`", UserWarning)
            warnings.warn("another warning", UserWarning)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert [str(w.message) for w in caught] == ["another warning"]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
