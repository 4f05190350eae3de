"""Benchmarks: engine overhead, EMA updates, the data pipeline and (on CUDA) the GTA-Seg step at paper scale.

Writes bench-results/bench.json and bench-results/bench.md (the tables) and prints the tables; with --mlflow
the numbers and both files are also logged as an MLflow run (experiment "bench").

  engine  iterations/s of the Trainer vs a hand-written loop calling the same method's training_step with
          an update that only does backward + step (same models, same pre-made batches, same process)
  ema     the fused EMA of a DeepLabV3+ ResNet-101 (ema_model_) vs a per-tensor Python loop
  data    images/s of the training loader on VOC-sized JPEGs with the paper's augmentation, per worker count
  ddp     2 CPU processes over gloo, one model's update (forward, backward, gradient average, SGD step): the
          engine's DistributedDataParallel, whose all-reduces run during the backward pass, against the same
          all-reduces started after the backward, and against no communication at all
  step    CUDA only: GTA-Seg pairs/s, peak memory and MFU at 513 crops, DeepLabV3+ ResNet-101 OS 8, 3+3 images,
          in fp32, bf16, bf16 + channels_last and + compile

Usage: python scripts/bench.py [--only engine,ema,data,ddp,step] [--device auto|cpu|cuda] [--mlflow] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from gta.contract import Batch, Method, Progress, Update
from gta.data import Loaders, SegmentationFolder, build_loaders, select_split
from gta.engine.config import TrainerConfig
from gta.engine.distributed import Distributed
from gta.engine.evaluate import EvalProtocol, Validation
from gta.engine.runtime import configure_cuda, resolve_device
from gta.engine.trainer import Trainer
from gta.methods import GTASeg
from gta.methods.ema import EMA, ema_model_
from gta.methods.reweight import Confidence
from gta.models import Segmenter
from gta.tracking import NullLogger

#: the checkout this script belongs to
ROOT = Path(__file__).resolve().parents[1]

SECTIONS = ("engine", "ema", "data", "ddp", "step")
#: dense bf16 tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


# --- shared pieces ---------------------------------------------------------------------------------------
class InMemory:
    """Stands in for a training DataLoader: the same pre-made batches every epoch, no loading at all."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.batch_size = batches, batches[0][0].shape[0]
        self.sampler = self

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


class Clock(NullLogger):
    """Notes when each log step's training metrics arrive (the Trainer syncs the device to compute them)."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def log_metrics(self, metrics, step):
        if any(key.startswith("train/") for key in metrics):
            self.times[step] = time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(count: int, batch: int, size: int, classes: int, pin: bool) -> list[list[tuple]]:
    """``count`` labeled and unlabeled (image, mask) batch pairs of random content."""
    generator = torch.Generator().manual_seed(0)
    made = []
    for _ in range(count):
        image = torch.randn(batch, 3, size, size, generator=generator)
        mask = torch.randint(0, classes, (batch, size, size), generator=generator)
        unlabeled = torch.randn(batch, 3, size, size, generator=generator)
        padding = torch.zeros(batch, size, size, dtype=torch.long)
        pair = [(image, mask), (unlabeled, padding)]
        made.append([tuple(t.pin_memory() if pin else t for t in part) for part in pair])
    return made


def in_memory_loaders(made: list[list[tuple]]) -> Loaders:
    labeled, unlabeled = InMemory([m[0] for m in made]), InMemory([m[1] for m in made])
    return Loaders(labeled, unlabeled, [made[0][0]], iters_per_epoch=len(made))


def make_trainer(method, made, classes: int, device, run_dir: Path, iters: int, log_every: int, **options) -> Trainer:
    """A Trainer that evaluates and checkpoints only after its last iteration (outside the timed span)."""
    loaders = in_memory_loaders(made)
    config = TrainerConfig(**{"iters": iters, "epochs": 1, "eval_every": 0, "log_every": log_every,
                              "decoder_lr_mult": 1.0, "checkpoint_every": 0, **options})
    validation = Validation(loaders.val, EvalProtocol(), classes, 255, [str(c) for c in range(classes)])
    return Trainer(
        config, method, loaders, partial(torch.optim.SGD, lr=0.001, momentum=0.9), validation, run_dir,
        logger=Clock(), dist=Distributed(device=device),
    )


def trainer_seconds_per_iter(trainer: Trainer, log_every: int) -> float:
    """Time per iteration between the first and the last log step."""
    trainer.fit()
    times = trainer.logger.times
    return (times[trainer.total_iters] - times[log_every]) / (trainer.total_iters - log_every)


def gta_method(model: Callable[[], torch.nn.Module]) -> GTASeg:
    """GTA-Seg past its warm-up from the first iteration, so every timed step is the full Algorithm 1."""
    return GTASeg(model=model, ema=EMA(0.99), reweight=Confidence(1.0), warmup_epochs=0)


def plain_update(method: Method) -> Update:
    """The update of a hand-written loop: backward and an SGD step, nothing else."""
    optimizers = {n: torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9) for n, m in method.trained_models().items()}

    def update(name: str, loss: torch.Tensor) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    return update


def hand_loop(method: Method, made, device: torch.device, iters: int, warm: int) -> float:
    """The minimal loop: batches to the device, training_step with :func:`plain_update`."""
    update = plain_update(method)
    method.train()
    for it in range(iters):
        if it == warm:
            sync(device)
            started = time.perf_counter()
        (image, mask), (unlabeled, padding) = made[it % len(made)]
        to = partial(torch.Tensor.to, device=device, non_blocking=True)
        batch = Batch(to(image), to(mask), *((to(unlabeled), to(padding)) if method.uses_unlabeled else ()))
        method.training_step(batch, Progress(it, len(made)), update)
    sync(device)
    return (time.perf_counter() - started) / (iters - warm)


# --- sections --------------------------------------------------------------------------------------------
class OneConvolution(Method):
    """A method whose step costs almost nothing (a 1x1 convolution on 4x4 pixels), so that timing it
    measures the loop around the step."""

    reported, uses_unlabeled = "student", False

    def __init__(self) -> None:
        super().__init__()
        self.student = torch.nn.Conv2d(3, 2, 1)

    def trained_models(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def evaluated_models(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self.student(batch.image), batch.mask)
        update("student", loss)
        return {"student/loss_l": loss.detach()}


def paired_runs(method: Method, made, classes: int, device: torch.device, iters: int, log_every: int, rounds: int,
                tmp: Path) -> tuple[list[float], list[float]]:
    """Seconds per iteration of the Trainer and of the hand loop, run alternately ``rounds`` times.

    The Trainer is timed from its first to its last log step (log steps included: a device sync and a
    NullLogger call every ``log_every`` iterations, and the progress bar, as in training); its final
    evaluation and checkpoint come after the last log step and are no per-iteration cost. The hand loop is
    timed over as many iterations after as many warm-up ones."""
    trainer_s, loop_s = [], []
    for r in range(rounds):
        trainer = make_trainer(method, made, classes, device, tmp / f"run{r}", iters, log_every)
        trainer_s.append(trainer_seconds_per_iter(trainer, log_every))
        loop_s.append(hand_loop(method, made, device, iters, warm=log_every))
    return trainer_s, loop_s


def bench_engine(device: torch.device, iters: int, log_every: int, rounds: int, size: int, batch: int) -> dict:
    """GTA-Seg with a small network, Trainer vs hand loop: the ratio of each round's adjacent pair, median
    over rounds (a shared machine's speed drifts; adjacent runs see about the same). Then the Trainer's own
    cost per iteration, with a step that costs almost nothing: Trainer minus hand loop, medians."""
    torch.manual_seed(0)
    model = partial(Segmenter, num_classes=6, encoder_name="tu-resnet10t", output_stride=16, decoder_channels=64)
    made = random_batches(4, batch=batch, size=size, classes=6, pin=device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        trainer_s, loop_s = paired_runs(gta_method(model), made, 6, device, iters, log_every, rounds, Path(tmp))
        tiny = random_batches(4, batch=2, size=4, classes=2, pin=device.type == "cuda")
        fixed_trainer, fixed_loop = paired_runs(OneConvolution(), tiny, 2, device, 2000, log_every, 3, Path(tmp))
    ratios = [t / h for t, h in zip(trainer_s, loop_s, strict=True)]
    overhead = statistics.median(fixed_trainer) - statistics.median(fixed_loop)
    return {
        "model": f"DeepLabV3+ ResNet-10-T (deeplabv3plus_small), {size}x{size}, {batch} labeled + {batch} unlabeled, "
                 "GTA-Seg past warm-up",
        "timed_iterations": iters - log_every, "log_every": log_every, "rounds": rounds,
        "trainer_it_s": 1 / statistics.median(trainer_s), "loop_it_s": 1 / statistics.median(loop_s),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "engine_us_per_iter": 1e6 * overhead,
        "engine_share_of_step": overhead / statistics.median(loop_s),
        "trivial_step_us": 1e6 * statistics.median(fixed_loop),
        "trainer_s_per_it_rounds": trainer_s, "loop_s_per_it_rounds": loop_s,
    }


def python_loop_ema_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """What ema_model_ replaces: one mul_ and one add_ per tensor (parameters and float buffers)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(decay).add_(s, alpha=1 - decay)
        for t, s in zip(target.buffers(), source.buffers(), strict=True):
            if t.is_floating_point():
                t.mul_(decay).add_(s, alpha=1 - decay)
            else:
                t.copy_(s)


def bench_ema(device: torch.device, repeats: int) -> dict:
    import segmentation_models_pytorch as smp

    target = smp.DeepLabV3Plus("resnet101", encoder_weights=None).to(device)
    source = copy.deepcopy(target)
    updates = {"fused": ema_model_, "loop": python_loop_ema_}
    times: dict[str, list[float]] = {name: [] for name in updates}
    for repeat in range(repeats + 1):  # alternately, so that a change in the machine's load hits both
        for name, fn in updates.items():
            sync(device)
            started = time.perf_counter()
            fn(target, source, 0.99)
            sync(device)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    best = {name: min(runs) for name, runs in times.items()}
    return {
        "model": "smp DeepLabV3Plus('resnet101'), parameters and BatchNorm statistics",
        "parameters": sum(p.numel() for p in target.parameters()),
        "tensors": len(list(target.parameters())) + len(list(target.buffers())),
        "fused_ms": 1000 * best["fused"], "loop_ms": 1000 * best["loop"], "speedup": best["loop"] / best["fused"],
        "repeats": repeats,
    }


def write_voc_like(root: Path, count: int, classes: int = 21) -> None:
    """``count`` 500x375 JPEGs (smooth random content, so they compress like photos) with PNG class masks."""
    rng = np.random.default_rng(0)
    for folder in ("train", "val"):
        (root / "images" / folder).mkdir(parents=True)
        (root / "masks" / folder).mkdir(parents=True)
    for i in range(count + 1):
        folder = "train" if i < count else "val"
        coarse = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (375, 500, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(root / "images" / folder / f"{i:04d}.jpg", quality=90)
        regions = Image.fromarray(rng.integers(0, classes, (6, 8), dtype=np.uint8)).resize((500, 375), Image.NEAREST)
        mask = np.asarray(regions).copy()
        mask[:4], mask[-4:] = 255, 255  # an ignored border, as VOC's object outlines are
        Image.fromarray(mask).save(root / "masks" / folder / f"{i:04d}.png")


def bench_data(workers: list[int], images: int, batch_size: int, epochs: int) -> dict:
    """The training loader (files, decoding, the paper's augmentation at crop 513, collation).

    Timed from the second batch to the end of ``epochs`` epochs, so worker start-up (reported on its own as
    the first batch's latency) is left out."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_voc_like(root, images)
        source = SegmentationFolder(root, num_classes=21, crop_size=513, scale_range=[0.5, 2.0])
        split = select_split(source, "all")
        for count in workers:
            loader = build_loaders(source, split, batch_size, count, seed=0, need_unlabeled=False).labeled
            started = time.perf_counter()
            loaded, first = 0, None
            for epoch in range(epochs):
                loader.sampler.set_epoch(epoch)
                for image, _ in loader:
                    if first is None:
                        first = time.perf_counter() - started
                        started = time.perf_counter()
                    else:
                        loaded += image.shape[0]
            rows.append({"workers": count, "images_s": loaded / (time.perf_counter() - started), "first_batch_s": first})
            del loader
    return {"images": images, "size": "500x375 JPEG + PNG mask", "crop": 513, "scale_range": [0.5, 2.0],
            "batch_size": batch_size, "timed_images": (images // batch_size * epochs - 1) * batch_size, "rows": rows}


DDP_WORLD = 2
DDP_VARIANTS = {"alone": "no communication (each process alone)", "after": "all-reduce after backward",
                "during": "DDP: all-reduce during backward (the engine)"}
#: after the backward, gradients all-reduced in buckets of this many bytes (DistributedDataParallel's size)
BUCKET_BYTES = 25 * 2**20


def all_reduce_after_backward(model: torch.nn.Module) -> None:
    """The gradients averaged once the whole backward has run: every bucket's all-reduce started, then
    waited for (what data parallelism without backward hooks does)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    buckets, bucket, size = [], [], 0
    for g in reversed(grads):  # the last layers first, as their gradients came
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES:
            buckets.append(bucket)
            bucket, size = [], 0
    buckets += [bucket] if bucket else []
    pending = [(b, flat, dist.all_reduce(flat, async_op=True)) for b in buckets for flat in [_flatten_dense_tensors(b)]]
    for b, flat, work in pending:
        work.wait()
        torch._foreach_copy_(b, _unflatten_dense_tensors(flat.div_(DDP_WORLD), b))


def _ddp_process(rank: int, port: int, out: Path, encoder: str, size: int, batch: int, iters: int, warm: int,
                 rounds: int) -> None:
    torch.set_num_threads(1)  # 2 processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DDP_WORLD)
    torch.manual_seed(0)
    model = Segmenter(num_classes=21, encoder_name=encoder, output_stride=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    data_parallel = Distributed(rank, DDP_WORLD).data_parallel(model)
    generator = torch.Generator().manual_seed(rank)
    image = torch.randn(batch, 3, size, size, generator=generator)
    mask = torch.randint(0, 21, (batch, size, size), generator=generator)

    def no_communication(loss):
        loss.backward()

    def after_backward(loss):
        loss.backward()
        all_reduce_after_backward(model)

    def during_backward(loss):
        data_parallel(loss).backward()

    variants = {"alone": no_communication, "after": after_backward, "during": during_backward}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    model.train()
    for _ in range(rounds):  # alternately, so that a change in the machine's load hits every variant
        for name, backward in variants.items():
            for it in range(warm + iters):
                if it == warm:
                    dist.barrier()
                    started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                backward(F.cross_entropy(model(image), mask))
                optimizer.step()
            dist.barrier()
            seconds[name].append((time.perf_counter() - started) / iters)
    if rank == 0:
        medians = {name: statistics.median(runs) for name, runs in seconds.items()}
        out.write_text(json.dumps({"s_per_step": medians, "rounds": seconds,
                                   "parameters": sum(p.numel() for p in model.parameters())}))
    dist.destroy_process_group()


def bench_ddp(encoder: str, size: int, batch: int, iters: int, rounds: int) -> dict:
    """Seconds per update of a DeepLabV3+ on 2 CPU processes (gloo, one thread each), medians over rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        mp.spawn(_ddp_process, args=(port, out, encoder, size, batch, iters, 2, rounds), nprocs=DDP_WORLD)
        result = json.loads(out.read_text())
    times, per_round = result["s_per_step"], result["rounds"]
    # differences within a round, whose variants ran back to back: a shared machine's drift between rounds cancels
    communication = [after - alone for after, alone in zip(per_round["after"], per_round["alone"], strict=True)]
    hidden = [after - during for after, during in zip(per_round["after"], per_round["during"], strict=True)]
    return {
        "model": f"DeepLabV3+ {encoder}, output stride 16", "parameters": result["parameters"],
        "gradient_mib": result["parameters"] * 4 / 2**20, "processes": DDP_WORLD, "backend": "gloo",
        "crop": size, "batch_per_process": batch, "timed_steps": iters, "rounds": rounds,
        "communication_s": statistics.median(communication), "hidden_s": statistics.median(hidden),
        "hidden_s_rounds": hidden,
        "rows": [{"variant": DDP_VARIANTS[name], "s_per_step": times[name], "rounds_s": per_round[name]}
                 for name in DDP_VARIANTS],
    }


STEP_VARIANTS = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
    "bf16 + channels_last + compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


def count_step_flops(model: Callable[[], torch.nn.Module], made, device: torch.device) -> float:
    """FLOPs of one GTA-Seg iteration (teacher forward, assistant and student forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    method = gta_method(model).to(device)
    update = plain_update(method)
    (image, mask), (unlabeled, padding) = made[0]
    batch = Batch(*(t.to(device) for t in (image, mask, unlabeled, padding)))
    with FlopCounterMode(display=False) as counter:
        method.training_step(batch, Progress(0, 1), update)
    return float(counter.get_total_flops())


def bench_step(device: torch.device, crop: int = 513, batch: int = 3, encoder: str = "resnet101",
               output_stride: int = 8, iters: int = 30, log_every: int = 10,
               variants: dict[str, dict] = STEP_VARIANTS, peak: float | None = None) -> dict:
    """The Trainer on pre-made batches in pinned memory: pairs/s between the first and last log step,
    peak memory over the run, MFU = counted FLOPs per step x steps/s / the device's dense bf16 peak."""
    model = partial(Segmenter, num_classes=21, encoder_name=encoder, output_stride=output_stride)
    made = random_batches(2, batch=batch, size=crop, classes=21, pin=device.type == "cuda")
    flops = count_step_flops(model, made, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak or next((value for key, value in PEAK_BF16.items() if key in name), None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in variants.items():
            torch.manual_seed(0)
            if device.type == "cuda":  # the previous variant's models and optimiser states are gone
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            trainer = make_trainer(gta_method(model), made, 21, device, Path(tmp) / "run", iters, log_every, **options)
            seconds = trainer_seconds_per_iter(trainer, log_every)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({
                "variant": label, "pairs_s": batch / seconds, "s_per_iter": seconds, "peak_memory_gib": memory,
                "mfu": flops / seconds / peak if peak else None,
            })
            del trainer
    return {
        "device": name, "model": f"DeepLabV3+ {encoder}, output stride {output_stride}", "crop": crop,
        "labeled_plus_unlabeled": f"{batch}+{batch}", "flops_per_iter": flops, "peak_bf16_flops": peak,
        "timed_iterations": iters - log_every, "rows": rows,
    }


# --- report ----------------------------------------------------------------------------------------------
def machine() -> dict:
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return {
        "cpu": model, "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, {m['torch_threads']} torch threads, "
             f"GPU: {m['cuda'] or 'none'}; torch {m['torch']}, Python {m['python']}.", ""]
    if "engine" in results:
        e = results["engine"]
        lines += [f"**Engine overhead** ({e['model']}; {e['timed_iterations']} timed iterations, "
                  f"{e['rounds']} rounds, medians)", "", "| loop | iterations/s |", "|---|---|",
                  f"| hand-written (training_step, backward + step) | {e['loop_it_s']:.2f} |",
                  f"| Trainer (log every {e['log_every']}) | {e['trainer_it_s']:.2f} |",
                  f"| time per iteration, Trainer / hand-written | {e['ratio']:.3f} (rounds: {e['ratio_min']:.3f} to "
                  f"{e['ratio_max']:.3f}) |", "",
                  f"The Trainer's own work per iteration, timed around a step of {e['trivial_step_us']:.0f} us (one "
                  f"1x1 convolution): {e['engine_us_per_iter']:.0f} us, {e['engine_share_of_step']:.2%} of the "
                  "hand-written loop's iteration above.", ""]
    if "ema" in results:
        e = results["ema"]
        lines += [f"**EMA update** ({e['model']}: {e['parameters'] / 1e6:.1f} M parameters, {e['tensors']} tensors; "
                  f"best of {e['repeats']})", "", "| update | ms |", "|---|---|",
                  f"| per-tensor Python loop (mul_, add_) | {e['loop_ms']:.1f} |",
                  f"| fused `ema_model_` (`_foreach_lerp_`) | {e['fused_ms']:.1f} |",
                  f"| speed-up | {e['speedup']:.2f}x |", ""]
    if "data" in results:
        d = results["data"]
        lines += [f"**Data pipeline** ({d['images']} {d['size']}, crop {d['crop']}, scale {d['scale_range']}, flip; "
                  f"batch {d['batch_size']}, {d['timed_images']} images timed)", "",
                  "| workers | images/s | first batch (s) |", "|---|---|---|"]
        lines += [f"| {r['workers']} | {r['images_s']:.1f} | {r['first_batch_s']:.2f} |" for r in d["rows"]]
        lines.append("")
    if "ddp" in results:
        d = results["ddp"]
        lines += [f"**Data parallelism** ({d['processes']} CPU processes over {d['backend']}, one torch thread each; "
                  f"{d['model']}, {d['parameters'] / 1e6:.1f} M parameters ({d['gradient_mib']:.0f} MiB of gradients), "
                  f"{d['batch_per_process']} images of {d['crop']} px per process; {d['timed_steps']} timed updates, "
                  f"median of {d['rounds']} rounds)", "", "| update | s/step |", "|---|---|"]
        lines += [f"| {r['variant']} | {r['s_per_step']:.3f} |" for r in d["rows"]]
        spread = ", ".join(f"{h:.3f}" for h in d["hidden_s_rounds"])
        lines += ["", f"Per round (variants back to back), medians: all-reduce after the backward costs "
                  f"{d['communication_s']:.3f} s a step over no communication; DDP saves {d['hidden_s']:.3f} s of it "
                  f"(rounds: {spread}).", ""]
    if "step" in results:
        s = results["step"]
        if "skipped" in s:
            lines += [f"**GTA-Seg step at paper scale**: not measured ({s['skipped']}).", ""]
        else:
            peak = f"{s['peak_bf16_flops'] / 1e12:.0f} TFLOPS" if s["peak_bf16_flops"] else "unknown (--peak-tflops)"
            lines += [f"**GTA-Seg step** on {s['device']} ({s['model']}, crop {s['crop']}, "
                      f"{s['labeled_plus_unlabeled']} images; {s['flops_per_iter'] / 1e12:.2f} TFLOP per iteration; "
                      f"MFU against the dense bf16 peak, {peak})", "",
                      "| variant | pairs/s | s/iteration | peak memory (GiB) | MFU |", "|---|---|---|---|---|"]
            for r in s["rows"]:
                memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
                lines.append(f"| {r['variant']} | {r['pairs_s']:.2f} | {r['s_per_iter']:.3f} | {memory} | {mfu} |")
            lines.append("")
    return "\n".join(lines)


def flat_metrics(results: dict) -> dict[str, float]:
    out = {}
    for section, values in results.items():
        if section == "machine":
            continue
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{section}/{key}"] = float(value)
        for row in values.get("rows", []):
            label = str(row.get("variant", row.get("workers"))).replace(" ", "").replace("+", "_")
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("workers",):
                    out[f"{section}/{label}/{key}"] = float(value)
    return out


def log_to_mlflow(results: dict, files: list[Path]) -> str:
    from gta.tracking.mlflow import MLflowLogger

    logger = MLflowLogger(tracking_uri=os.environ.get("GTA_TRACKING_URI"), experiment_name="bench",
                          run_name=f"bench-{results['machine']['cuda'] or 'cpu'}")
    logger.log_params({f"machine.{k}": v for k, v in results["machine"].items()})
    logger.log_metrics(flat_metrics(results), step=0)
    for path in files:
        logger.log_artifact(path)
    logger.close()
    return logger.location


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--mlflow", action="store_true", help="also log the results as an MLflow run")
    parser.add_argument("--engine-iters", type=int, default=60)
    parser.add_argument("--engine-rounds", type=int, default=4)
    parser.add_argument("--engine-size", type=int, default=32, help="image side of the engine benchmark")
    parser.add_argument("--engine-batch", type=int, default=4)
    parser.add_argument("--ema-repeats", type=int, default=10)
    parser.add_argument("--data-images", type=int, default=64)
    parser.add_argument("--data-workers", default="0,1,2")
    parser.add_argument("--ddp-encoder", default="resnet50")
    parser.add_argument("--ddp-size", type=int, default=64, help="image side of the data-parallel benchmark")
    parser.add_argument("--ddp-batch", type=int, default=2, help="images per process")
    parser.add_argument("--ddp-iters", type=int, default=8)
    parser.add_argument("--ddp-rounds", type=int, default=3)
    parser.add_argument("--step-iters", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for an unlisted GPU")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {SECTIONS}")
    device = resolve_device(args.device)
    configure_cuda(device)

    results: dict = {"machine": machine()}
    if "engine" in only:
        results["engine"] = bench_engine(device, args.engine_iters, log_every=10, rounds=args.engine_rounds,
                                         size=args.engine_size, batch=args.engine_batch)
    if "ema" in only:
        results["ema"] = bench_ema(device, args.ema_repeats)
    if "data" in only:
        workers = [int(w) for w in args.data_workers.split(",")]
        results["data"] = bench_data(workers, args.data_images, batch_size=8, epochs=2)
    if "ddp" in only:
        results["ddp"] = bench_ddp(args.ddp_encoder, args.ddp_size, args.ddp_batch, args.ddp_iters, args.ddp_rounds)
    if "step" in only:
        if device.type == "cuda":
            peak = args.peak_tflops * 1e12 if args.peak_tflops else None
            results["step"] = bench_step(device, iters=args.step_iters, peak=peak)
        else:
            results["step"] = {"skipped": f"needs CUDA; this run's device is {device}"}

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    files = [args.out / "bench.json", args.out / "bench.md"]
    files[0].write_text(json.dumps(results, indent=2) + "\n")
    files[1].write_text(table + "\n")
    print(table)
    print(f"written: {', '.join(map(str, files))}")
    if args.mlflow:
        print(f"logged to {log_to_mlflow(results, files)}")


if __name__ == "__main__":
    main()
