"""``python -m gta predict`` and ``python -m gta export``: a saved model applied to image files, and written
out for use outside Python."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gta
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from gta.data import voc_palette
from gta.export import run as export
from gta.predict import run as predict

NUM_CLASSES = 6  # the synthetic dataset's


pytestmark = pytest.mark.usefixtures("hydra_conf")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as ``train`` leaves it (config.yaml, teacher.pt, checkpoints/last.pt), with an untrained
    network: these commands only need the files."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose("train", overrides=[f"dataset.root={run_dir / 'data'}", "model=deeplabv3plus_small"])
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(0)
    state = instantiate(cfg.model).state_dict()
    torch.save(state, run_dir / "teacher.pt")
    (run_dir / "checkpoints").mkdir()
    torch.save({"models": {"teacher": state, "student": state}}, run_dir / "checkpoints" / "last.pt")
    return run_dir


def images(directory: Path) -> Path:
    """An odd-sized RGB JPEG, a greyscale PNG, an RGBA PNG, a text file and an image in a sub-directory."""
    rng = np.random.default_rng(0)
    (directory / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(directory / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(directory / "grey.png")
    Image.fromarray(rng.integers(0, 256, (33, 65, 4), dtype=np.uint8), "RGBA").save(directory / "rgba.png")
    (directory / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(directory / "deeper" / "sub.png")
    return directory


def test_predict_writes_a_palette_mask_and_an_overlay_per_image(run_dir, tmp_path):
    inputs, output = images(tmp_path / "in"), tmp_path / "out"
    overrides = [f"checkpoint={run_dir / 'teacher.pt'}", f"input={inputs}", f"output={output}", "device=cpu"]
    with pytest.warns(UserWarning, match=r"notes\.txt skipped: not an image"):
        assert predict(compose("predict", overrides=overrides)) == 3
    written = sorted(p.name for p in output.iterdir())
    assert written == sorted(f"{stem}{end}" for stem in ("photo", "grey", "rgba") for end in (".png", "_overlay.jpg"))
    for stem in ("photo", "grey", "rgba"):
        source = next(inputs.glob(f"{stem}.*"))
        with Image.open(output / f"{stem}.png") as mask, Image.open(source) as image:
            assert mask.mode == "P" and mask.size == image.size
            assert np.asarray(mask).max() < NUM_CLASSES
            assert np.asarray(mask.getpalette()).reshape(-1, 3)[:NUM_CLASSES].tolist() == voc_palette(NUM_CLASSES)
        with Image.open(output / f"{stem}_overlay.jpg") as overlay:
            assert overlay.size == image.size


def test_predict_recurses_on_request_and_reads_training_state_checkpoints(run_dir, tmp_path):
    inputs, output = images(tmp_path / "in"), tmp_path / "in" / "predictions"
    overrides = [f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "model_name=student", f"input={inputs}",
                 f"output={output}", "recursive=true", "device=cpu"]  # fmt: skip
    with pytest.warns(UserWarning, match="notes.txt"):
        assert predict(compose("predict", overrides=overrides)) == 4
    assert (output / "deeper" / "sub.png").is_file() and (output / "deeper" / "sub_overlay.jpg").is_file()
    with pytest.warns(UserWarning, match="notes.txt"):  # a re-run does not segment its own results
        assert predict(compose("predict", overrides=overrides)) == 4


def test_predict_errors_name_the_culprit(run_dir, tmp_path):
    inputs = images(tmp_path / "in")
    common = [f"input={inputs}", f"output={tmp_path / 'out'}", "device=cpu"]
    with pytest.raises(FileNotFoundError, match=r"checkpoint: no file at .*absent\.pt"):
        predict(compose("predict", overrides=[f"checkpoint={tmp_path / 'absent.pt'}", *common]))
    checkpoint = f"checkpoint={run_dir / 'teacher.pt'}"
    with pytest.raises(FileNotFoundError, match=r"input: no file or directory at .*nowhere"):
        predict(compose("predict", overrides=[checkpoint, f"input={tmp_path / 'nowhere'}", common[1]]))
    with pytest.raises(ValueError, match=r"input: no image PIL can read at .*notes\.txt"), pytest.warns(UserWarning):
        predict(compose("predict", overrides=[checkpoint, f"input={inputs / 'notes.txt'}", common[1]]))
    with pytest.raises(ValueError, match="is the input directory"):
        predict(compose("predict", overrides=[checkpoint, f"input={inputs}", f"output={inputs}"]))


def saved_model(run_dir: Path):
    """The run's teacher as the exported network should compute it: RGB in [0, 1], normalised, -> logits."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = instantiate(cfg.model)
    model.load_state_dict(torch.load(run_dir / "teacher.pt", weights_only=True))
    model.eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.dataset.mean, cfg.dataset.std))
    return lambda rgb: model((rgb - mean) / std)


#: a multiple of the network's stride and not, a batch of one and of three (the program is traced with two)
SHAPES = [(1, 3, 64, 64), (3, 3, 37, 53)]


@pytest.mark.slow  # tracing the network with torch.export: about 15 s
def test_exported_program_gives_the_models_logits_at_any_batch_and_size(run_dir, tmp_path):
    """The default format, a torch.export program, with a free batch size, height and width; written without
    a deprecation warning (TorchScript's tracer, which it replaced, warns that it is deprecated)."""
    output = tmp_path / "model.pt2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(compose("export", overrides=[f"checkpoint={run_dir / 'teacher.pt'}", f"output={output}"]))
    deprecated = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecated == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecated]
    exported, model = torch.export.load(output).module(), saved_model(run_dir)
    for shape in SHAPES:
        rgb = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(rgb), model(rgb))


@pytest.mark.slow
def test_onnx_export_gives_the_models_logits(run_dir, tmp_path):
    """The same program as ONNX, run by ONNX Runtime (where the onnx packages are installed)."""
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package)
    onnxruntime = pytest.importorskip("onnxruntime")
    output = tmp_path / "model.onnx"
    export(compose("export", overrides=[f"checkpoint={run_dir / 'teacher.pt'}", f"output={output}", "format=onnx"]))
    session, model = onnxruntime.InferenceSession(str(output)), saved_model(run_dir)
    for shape in SHAPES:
        rgb = torch.rand(shape)
        with torch.no_grad():
            expected = model(rgb)
        logits = torch.from_numpy(session.run(None, {"rgb": rgb.numpy()})[0])
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_without_onnx_says_what_to_install(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails, whether or not it is installed
    overrides = [f"checkpoint={run_dir / 'teacher.pt'}", f"output={tmp_path / 'model.onnx'}", "format=onnx"]
    with pytest.raises(ImportError, match="pip install onnx"):
        export(compose("export", overrides=overrides))
    with pytest.raises(ValueError, match="format must be one of"):
        export(compose("export", overrides=[*overrides[:2], "format=tflite"]))
    with pytest.raises(ValueError, match="TorchScript is no longer written"):
        export(compose("export", overrides=[*overrides[:2], "format=torchscript"]))


@pytest.mark.slow
def test_predict_command_line(run_dir, tmp_path):
    inputs = images(tmp_path / "in")
    done = gta("predict", f"checkpoint={run_dir / 'teacher.pt'}", f"input={inputs}", f"output={tmp_path / 'out'}",
               f"hydra.run.dir={tmp_path / 'hydra'}")  # fmt: skip
    assert "notes.txt skipped" in done.stderr and "3 of 4 files segmented" in done.stdout
    assert len(list((tmp_path / "out").glob("*_overlay.jpg"))) == 3
