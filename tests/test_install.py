"""The install must resolve a matching torch/torchvision pair (the local +cpu torch wheel breaks
torchvision) and every heavy dependency must import."""

import importlib


def test_torch_and_torchvision_import_together():
    import torch
    import torchvision

    assert "+cpu" not in torch.__version__ or torch.__version__.startswith("2.14"), torch.__version__
    # torchvision's compiled ops must load against this torch: this is what breaks with a mismatch.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]


def test_framework_dependencies_import():
    for name in ("lightning", "diffusers", "torchmetrics", "open_clip", "torch_fidelity", "safetensors",
                 "sklearn", "jsonargparse"):
        importlib.import_module(name)
