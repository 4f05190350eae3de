"""The data's typed config (``data.`` in the config tree): loaders, splits, bad samples and the views of the
unlabeled images, read by ``train`` key by key."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ViewConfig:
    """A view of the unlabeled images besides the weak one (the dataset's crop, rescale and flip): the same
    crop through photometric changes (gta.data.transforms.photometric_view). The defaults are UniMatch's
    strong view."""

    _target_: str = "gta.data.transforms.photometric_view"
    #: colour jitter: brightness, contrast, saturation, hue
    jitter: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.25])
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    #: the Gaussian blur's standard deviation is drawn uniformly from this range (pixels)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class DataConfig:
    #: labeled images per iteration, and as many unlabeled ones
    batch_size: int = 3
    num_workers: int = 2
    #: batches each worker keeps ready (null: PyTorch's default, 2); needs num_workers > 0
    prefetch_factor: int | None = None
    #: validation images per forward (at most: images of different sizes are never batched together)
    val_batch_size: int = 1
    #: which labeled lists split=NAME names: "paper" (the lists the paper trains on), "cps" (those of
    #: CPS / UniMatch), both shipped in gta/data/splits/; "random": split=N draws N with split_seed
    splits: str = "random"
    split_seed: int = 0
    #: a directory with labeled.txt / unlabeled.txt that fixes the split exactly (data.splits is then unused)
    split_dir: str | None = None
    #: a sample whose files cannot be used (corrupt image, mask of another size, label outside the classes)
    #: when it is loaded: "skip" (warn once per file, record it in <run dir>/bad_samples.jsonl and the
    #: data/bad_samples metric; training draws the next sample, validation leaves it out) or "stop" (fail
    #: naming the file). Skip, so that one bad file among thousands does not end a long run; check a
    #: dataset beforehand with python -m gta check
    on_bad_sample: str = "skip"
    #: the views of the unlabeled images a method may read besides the weak one, by name; only those the
    #: method names (Method.views) are made
    views: dict[str, ViewConfig] = field(default_factory=lambda: {"strong1": ViewConfig(), "strong2": ViewConfig()})
