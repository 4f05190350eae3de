"""The extension points: what a method, a segmentation network and a batch are. The one module that the
engine, the methods, the networks and the data all import.

A method owns its networks and the algorithm; the engine owns everything else (devices, precision,
optimisers, schedules, data, evaluation, logging, checkpoints). The engine hands ``training_step`` an
``update`` callback: ``update(name, loss)`` back-propagates ``loss`` and steps the optimiser of the
model ``name``, so the method decides *when* each model learns (Algorithm 1 interleaves steps and EMA
updates) while the engine decides *how* a step is taken.

Each is built from a config node's ``_target_``: ``method._target_`` must name a :class:`Method` subclass
that implements its abstract members, ``model._target_`` a class (or function) that returns a
:class:`SegmentationNetwork`. ``train`` checks both before training and names what is missing
(:func:`check_method`, :func:`check_network`).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from gta.errors import ContractError

Update = Callable[[str, Tensor], None]

#: ImageNet's channel statistics: the input normalisation most pretrained encoders expect, and so the default
#: of the networks and the datasets (the network's config states its own: ``model.mean`` / ``model.std``)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Progress:
    """Where training is: the global iteration (0-based), the length of an epoch and, for a method whose
    settings move over training (U2PL's thresholds), the run's length in iterations (None where the caller
    does not know it)."""

    iteration: int
    iters_per_epoch: int
    total: int | None = None

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch

    @property
    def epochs(self) -> int:
        """The run's length in epochs, the last one counted even where it is cut short."""
        if self.total is None:
            raise ValueError("Progress.total is unknown: the run's length was not given")
        return -(-self.total // self.iters_per_epoch)


@dataclass
class Unlabeled:
    """An unlabeled batch: its weak view, which of its pixels are crop padding, and its further views."""

    image: Tensor
    mask: Tensor
    views: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """A labeled batch (x_l, y_l) and, for semi-supervised methods, an unlabeled batch x_u.

    Images are N x 3 x H x W, normalised with the dataset's mean and std; masks N x H x W class indices,
    the ignore index where there is no label. x_u is the *weak* view of the unlabeled images: the dataset's
    crop, rescale and flip. ``views`` holds the further views a method names in ``Method.views``, by name:
    the same crop of the same images, each through its own pipeline (``data.views``; e.g. a strong view's
    colour jitter, grayscale and blur), so a pseudo-label made on x_u is aligned with every view.
    ``unlabeled_mask`` holds the ignore index where the crop is padding and 0 elsewhere: it carries no
    ground truth, only which pixels are real image. ``second`` is another, independent unlabeled batch with
    the same views, for a method that asks for one (``Method.second_unlabeled``), e.g. to mix its images
    into the first's.
    """

    image: Tensor
    mask: Tensor
    unlabeled: Tensor | None = None
    unlabeled_mask: Tensor | None = None
    views: dict[str, Tensor] = field(default_factory=dict)
    second: Unlabeled | None = None


class SegmentationNetwork(Protocol):
    """What a segmentation network must offer (``model._target_``; ``gta.models.Segmenter`` is one).

    The paper splits a network into a feature extractor f and a mask predictor g: GTA-Seg moves f alone
    from the assistant into the student (Eq. 9), Unbiased ST puts a second g on the same f. A method makes
    its networks by calling the model node with no argument (the config's keys are the constructor's), so
    every model of a run starts from one network's copies. Beyond these members a network is a plain
    ``nn.Module``: its ``state_dict`` is what ``train`` saves and ``eval`` / ``predict`` / ``export`` load.
    A network whose constructor loads pretrained weights may list those arguments in a class attribute
    ``pretrained_arguments``: a saved model is rebuilt with them set to None, its weights coming from the
    checkpoint.
    """

    def forward(self, x: Tensor, mask_predictor: nn.Module | None = None) -> Tensor:
        """Logits N x C x H x W for images N x 3 x H x W of any size; with ``mask_predictor``, that g on
        this network's f in place of its own."""
        ...

    def feature_extractor_parameters(self) -> list[nn.Parameter]:
        """f: every parameter outside the mask predictor."""
        ...

    def mask_predictor_parameters(self) -> list[nn.Parameter]:
        """g: the parameters of the mask predictor."""
        ...

    def new_mask_predictor(self) -> nn.Module:
        """A freshly initialised g for this network's f, for ``forward(x, mask_predictor=...)``."""
        ...

    def param_groups(self, decoder_lr_mult: float) -> list[dict]:
        """The optimiser's parameter groups, covering every parameter once: ``{"params": [...], "lr_mult":
        m, "name": ...}``, ``m`` scaling the optimiser's learning rate (pretrained parts 1, parts trained
        from scratch ``decoder_lr_mult``, ``trainer.decoder_lr_mult``)."""
        ...


#: the members of :class:`SegmentationNetwork`, in the order its docstring gives them
NETWORK_MEMBERS = tuple(name for name in vars(SegmentationNetwork) if not name.startswith("_"))


def check_network(network: object, origin: str) -> nn.Module:
    """``network`` if it offers every member of :class:`SegmentationNetwork`, else a ContractError naming what
    it lacks; ``origin`` says where it came from (``model._target_=...``)."""
    missing = [name for name in NETWORK_MEMBERS if not callable(getattr(network, name, None))]
    if not isinstance(network, nn.Module):
        missing.insert(0, "nn.Module as its base class")
    elif "forward" not in missing and "mask_predictor" not in inspect.signature(network.forward).parameters:
        missing.append("the mask_predictor argument of forward")
    if missing:
        raise ContractError(
            f"{origin} built a {type(network).__name__}, which lacks {', '.join(missing)}: a segmentation network "
            f"must offer {', '.join(NETWORK_MEMBERS)} (gta.contract.SegmentationNetwork)"
        )
    return network


def check_method(cls: object, origin: str) -> None:
    """Nothing if ``cls`` is a :class:`Method` subclass that implements every abstract member, else a
    ContractError naming what it lacks; ``origin`` says where it came from (``method._target_=...``)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ContractError(f"{origin} is {cls!r}, not a subclass of gta.contract.Method")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ContractError(
            f"{origin}: {cls.__name__} does not implement {', '.join(missing)}, which a method must offer "
            "(gta.contract.Method)"
        )


class Method(nn.Module, ABC):
    """Base class: the networks are submodules, so ``state_dict`` holds every model of the method.

    A method must implement ``trained_models``, ``evaluated_models`` and ``training_step``, and may set
    ``reported``, ``uses_unlabeled``, ``scheduled``, ``scheduled_span`` and ``inspect``. Its constructor takes ``model``, the
    factory of its network (:class:`SegmentationNetwork`), and its own options as keyword arguments: the
    config schema is read from that signature (gta/schema.py).
    """

    #: the model whose validation mIoU is the method's result (``val/miou``)
    reported: str = "teacher"
    #: whether the engine must load unlabeled images at all
    uses_unlabeled: bool = True
    #: the views of the unlabeled images besides the weak one that ``training_step`` reads
    #: (``Batch.views``), each named in ``data.views``
    views: tuple[str, ...] = ()
    #: whether ``training_step`` reads a second unlabeled batch (``Batch.second``)
    second_unlabeled: bool = False
    ignore_index: int = 255

    @abstractmethod
    def trained_models(self) -> dict[str, nn.Module]:
        """The models that have an optimiser, by name (the names ``update`` accepts); a model's
        ``param_groups`` (a network's, or a wrapper's) sets its learning rates, else one group holds all."""

    @abstractmethod
    def evaluated_models(self) -> dict[str, nn.Module]:
        """The models evaluated on the validation set, by name (``val/<name>/miou``)."""

    def reported_at(self, progress: Progress) -> str:
        """The model whose mIoU is the result after ``progress.iteration`` iterations: ``reported``, unless
        that model is not yet worth reporting (a teacher that is still a copy of the untrained network)."""
        return self.reported

    def scheduled(self, name: str) -> bool:
        """Whether the learning-rate schedule applies to model ``name``'s optimiser."""
        return True

    def scheduled_span(self, name: str, total: int) -> tuple[int, int]:
        """The iterations [start, stop) of a run of ``total`` over which model ``name``'s learning rate runs
        the schedule from its beginning to its end: the whole run, unless the method trains a fresh model in
        each stage of the run (ST++)."""
        return 0, total

    @abstractmethod
    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        """One iteration; returns the scalars worth logging (detached)."""

    def inspect(self, batch: Batch) -> dict[str, Tensor]:
        """Per-pixel maps (B x H x W) of what the method makes of ``batch.unlabeled``, by title, for the
        pictures logged at each evaluation: integer maps are classes (the ignore index: none), boolean maps
        a selection, float maps values >= 0. It must change no state and draw no random numbers."""
        return {}

    def labeled_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """L_l (Eq. 10): the cross-entropy of ``model``, in train mode, on the labeled batch."""
        model.train()
        return F.cross_entropy(model(batch.image), batch.mask, ignore_index=self.ignore_index)


@runtime_checkable
class PerturbedDecoding(Protocol):
    """A network that can decode its features after a perturbation, besides decoding them as they are
    (UniMatch's feature perturbation): a capability beyond :class:`SegmentationNetwork` that a method may
    require. ``Segmenter`` offers it; a method that needs it checks with :func:`require`."""

    def perturbed_forward(self, x: Tensor, perturb: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """The logits of ``x``, and those decoded from ``x``'s features after ``perturb``: one encoder pass,
        one decoder pass over both (so that the decoder's normalisation sees both, as in one forward)."""
        ...


@runtime_checkable
class DecoderFeatures(Protocol):
    """A network that returns, with its logits, the features its mask predictor reads (U2PL's representation
    head reads them too): a capability beyond :class:`SegmentationNetwork` that a method may require.
    ``Segmenter`` offers it; a method that needs it checks with :func:`require`."""

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The logits of ``x`` (N x C x H x W) and the features they are predicted from (N x D x h x w, at the
        decoder's resolution, covering the image), from one forward."""
        ...

    def feature_channels(self) -> int:
        """D: the number of channels of those features."""
        ...


def require(network: nn.Module, capability: type, method: str) -> None:
    """Fail, naming what is missing, unless ``network`` offers ``capability`` (a runtime Protocol)."""
    if not isinstance(network, capability):
        members = [name for name in vars(capability) if not name.startswith("_")]
        missing = [name for name in members if not callable(getattr(network, name, None))]
        raise ContractError(
            f"method {method} needs a network that offers {capability.__name__} (gta/contract.py); "
            f"{type(network).__name__} lacks {', '.join(missing)}"
        )
