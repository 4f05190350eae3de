"""The engine's typed config: the ``Trainer`` takes a ``TrainerConfig`` whole (``trainer.`` in the config tree)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainerConfig:
    #: an epoch is one pass over the unlabeled set
    epochs: int = 80
    #: total iterations; overrides ``epochs`` when set
    iters: int | None = None
    #: evaluate every N iterations (0: only at the end)
    eval_every: int = 0
    log_every: int = 20
    #: learning-rate multiplier of everything but the encoder (decoder and classifier)
    decoder_lr_mult: float = 10.0
    #: poly schedule: lr = lr0 * (1 - t/T) ** power
    poly_power: float = 0.9
    #: write <run dir>/checkpoints/last.pt every N iterations (0: only at the end and on stop signals)
    checkpoint_every: int = 500
    #: on a NaN/inf loss: "stop" (fail naming model, loss and iteration; checked without a per-step host sync
    #: at log steps and before evaluations and checkpoints) or "skip" the optimiser step (one sync per update)
    on_nonfinite: str = "stop"
    #: "auto" (a bar on a terminal, else a plain line every log_every iterations), "bar", "lines", "none"
    progress: str = "auto"
    #: pictures logged with each evaluation (gta/engine/snapshots.py): this many validation images and
    #: unlabeled ones, with IoU and confusion charts; 0: none
    snapshot_images: int = 4
    #: data-parallel runs: BatchNorm normalises with the statistics of the global batch (CUDA only)
    sync_bn: bool = False
    #: data-parallel runs: check every N iterations (and at the end) that all ranks hold identical models
    #: (0: never; null: whenever the run evaluates)
    check_sync_every: int | None = None
    #: "fp32", "bf16" or "fp16" (autocast; fp16 also scales the losses): gta/engine/precision.py
    precision: str = "fp32"
    #: models and input batches in the channels_last memory layout
    channels_last: bool = False
    #: torch.compile every model in place (nn.Module.compile: state_dict keys unchanged)
    compile: bool = False
    #: on CUDA, let cuDNN time the convolution algorithms for each new input shape and keep the fastest
    cudnn_benchmark: bool = True
