"""A new user's first hour: the command line's help, and the one line each common mistake ends with (an unknown
key or option, a package Python cannot find, weights the network cannot give, a missing dataset root, a crop
larger than the images), and the summary of a run that ends inside the warm-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import SIZE, free_port, gta, tiny

from gta.cli import COMMANDS, DOCS_DIR, main
from gta.data import Sample, SegmentationSource, crop_warning, select_split
from gta.data.synthetic import SyntheticShapes
from gta.errors import MissingPathError


def run_main(monkeypatch, capsys, *argv: str, argv0: str = "/usr/bin/gta") -> tuple[int, str, str]:
    """``main(argv)`` in this process as ``argv0`` called it: its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", [argv0, *argv])
    try:
        main(list(argv))
        status = 0
    except SystemExit as end:
        status = end.code or 0
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(("argv0", "prog"), [("/venv/bin/gta", "gta"), ("/src/gta/__main__.py", "python -m gta")])
def test_help_gives_each_command_what_it_does_and_an_example_named_as_it_was_called(argv0, prog, monkeypatch, capsys):
    status, out, _ = run_main(monkeypatch, capsys, "--help", argv0=argv0)
    assert status == 0 and out.startswith(f"usage: {prog} <command>")
    for name, command in COMMANDS.items():
        assert f"  {name}  " in out and command.summary in out
        assert f"{prog} {name} {command.example}".rstrip() in out
    assert str(DOCS_DIR) in out


def test_bare_gta_prints_the_help_and_fails(monkeypatch, capsys):
    status, out, err = run_main(monkeypatch, capsys)
    assert status == 2 and out == "" and err.startswith("usage: gta <command>") and "  docs  " in err


def test_train_help_lists_the_groups_and_their_options_but_no_schema(monkeypatch, capsys):
    status, out, _ = run_main(monkeypatch, capsys, "train", "--help")
    assert status == 0 and out.startswith("usage: gta train")
    groups = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "," in line}
    assert "mean_teacher" in groups["method"] and "deeplabv3plus_lite0" in groups["model"]
    assert "schema_" not in out and "method_recipe" not in groups
    assert f"documentation: {DOCS_DIR} (gta docs)" in out
    assert len(out.splitlines()) < 40  # not the whole config


def test_gta_docs_prints_where_the_shipped_documentation_is(monkeypatch, capsys):
    status, out, _ = run_main(monkeypatch, capsys, "docs")
    assert status == 0 and out.splitlines()[0] == f"gta's documentation: {DOCS_DIR}"
    assert (DOCS_DIR / "extending.md").is_file() and "extending.md" in out


@pytest.mark.parametrize(("override", "line"), [
    ("method.dorp=0.3", "method.dorp: no such key of method=gta; did you mean drop? Its keys: ema, reweight, "),
    ("trainer.itres=3", "trainer.itres: no such key of trainer; did you mean iters? Its keys: epochs, iters, "),
    ("sead=1", "sead: no such key of the train config; did you mean seed? Its keys: dataset, split, "),
    ("method=mean_teachr",
     "method=mean_teachr: no such option of method; did you mean mean_teacher? Its options: cps, cutmix_seg, gta, "),
    ("+experiment=tabel4", "experiment=tabel4: no such option of experiment; did you mean table4? Its options: "),
])
def test_an_unknown_key_or_option_ends_with_one_line_naming_the_nearest(override, line, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(monkeypatch, capsys, "train", override, "logger=none")
    assert status == 1 and err.startswith(line) and len(err.strip().splitlines()) == 1, err
    assert "schema_" not in err and f"+{override}" not in err and "HYDRA_FULL_ERROR" not in err


def test_appending_is_suggested_only_for_a_key_the_target_takes(monkeypatch, capsys, tmp_path):
    """A config of the user's that leaves out an argument of its class: adding it with + is what works."""
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "plain.yaml").write_text("_target_: gta.methods.SupOnly\n")
    monkeypatch.chdir(tmp_path)
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    _, _, err = run_main(monkeypatch, capsys, "train", search, "method=plain", "method.ignore_index=3")
    assert err.strip() == ("method.ignore_index: method=plain does not set it, though gta.methods.SupOnly takes it: "
                           "add it with +method.ignore_index=VALUE, or in a config file")
    _, _, err = run_main(monkeypatch, capsys, "train", search, "method=plain", "method.drop=0.3")
    assert err.startswith("method.drop: no such key of method=plain. Its keys:") and "+method" not in err


def test_a_key_appended_against_the_advice_fails_naming_the_arguments_the_class_takes(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(monkeypatch, capsys, "train", "+method.dorp=0.3", "logger=none")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    # GTASeg passes **options on to SelfTraining, whose arguments count too
    assert err.startswith("method.dorp: gta.methods.GTASeg takes no argument dorp; did you mean drop? Its arguments: "
                          "model, ema, reweight, transmit, assistant_data, student_data, ignore_index, drop, ")


def test_a_target_python_cannot_find_names_pythonpath_and_pip_install(monkeypatch, capsys, tmp_path):
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "mine.yaml").write_text("_target_: my_fixmatch.FixMatch\n")
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(monkeypatch, capsys, "train", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                              "method=mine", "logger=none")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("method._target_=my_fixmatch.FixMatch: Python finds no module my_fixmatch; ")
    assert "PYTHONPATH" in err and "pip install -e" in err


class Listed(SegmentationSource):
    """A user's dataset class that lists whatever images lie under its root (none where there is no root)."""

    def pools(self):
        samples = [Sample(p.stem, p, p) for p in sorted(self.root.glob("*.png"))]
        return {"labeled": samples, "unlabeled": [], "val": samples}


class Opening(SegmentationSource):
    """A user's dataset class that opens a list file under its root."""

    def pools(self):
        ids = (self.root / "list.txt").read_text().split()
        return {"labeled": [Sample(i, self.root / i, self.root / i) for i in ids], "unlabeled": [], "val": []}


@pytest.mark.parametrize("cls", [Listed, Opening])
def test_a_users_dataset_class_fails_on_a_missing_root_naming_it(cls, tmp_path):
    with pytest.raises(MissingPathError) as error:
        select_split(cls(tmp_path / "nowhere", num_classes=3), "all")
    assert str(error.value).startswith(f"Dataset root {tmp_path / 'nowhere'} does not exist")


def test_a_crop_larger_than_the_images_is_warned_about_with_their_size(source):
    samples = select_split(source, "all").labeled
    big = SyntheticShapes(source.root, num_labeled_pool=len(samples), num_unlabeled=0, num_val=4, image_size=SIZE,
                          crop_size=513)
    warning = crop_warning(big, samples)
    assert warning is not None and warning.startswith(f"dataset.crop_size=513 is larger than {len(samples)} of ")
    assert f"(typically {SIZE}x{SIZE})" in warning and warning.endswith(f"set dataset.crop_size={SIZE}")
    assert crop_warning(source, samples) is None  # the crop is the image


@pytest.mark.slow
def test_weights_the_hub_cannot_give_fail_at_once_naming_the_model_and_what_works_offline(tmp_path):
    """The hub does not answer (a port nobody listens on) and its cache is empty: one line, no retry loop."""
    hub = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = gta("train", *tiny(tmp_path / "data"), "model=deeplabv3plus_r101", cwd=tmp_path, returncode=1, **hub)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("model.encoder_weights=imagenet: the resnet101 encoder's pretrained weights come from "
                           f"{hub['HF_ENDPOINT']}, which does not answer, and are not in its cache {tmp_path / 'hub'}")
    assert "model=deeplabv3plus_lite0" in line and "model.encoder_weights=null" in line and "model.weights_path=" in line
    assert "Retry" not in result.stderr and "full_key: method" not in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory) -> Path:
    """Two iterations of GTA-Seg, inside its one-epoch warm-up, on crops twice the images' size."""
    where = tmp_path_factory.mktemp("warmup")
    return gta("train", *tiny(where / "data", crop=2 * SIZE), "trainer.progress=none", cwd=where)


@pytest.mark.slow
def test_a_run_that_ends_inside_the_warm_up_says_the_teacher_is_untrained(warmup_run):
    teacher = next(line for line in warmup_run.stdout.splitlines() if "val mIoU teacher" in line)
    assert "not reported: the run ended inside the warm-up, this is still the untrained copy" in teacher
    assert "<- reported" in next(line for line in warmup_run.stdout.splitlines() if "val mIoU student" in line)


@pytest.mark.slow
def test_a_run_on_a_crop_larger_than_its_images_warns_in_one_line(warmup_run):
    (line,) = [line for line in warmup_run.stderr.splitlines() if "dataset.crop_size" in line]
    assert line.startswith(f"warning: dataset.crop_size={2 * SIZE} is larger than ")
    assert line.endswith(f"set dataset.crop_size={SIZE}")


def test_every_example_of_the_help_is_a_valid_command_line():
    """What the help shows can be typed: each Hydra command's example parses as overrides and composes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gta.cli import COMMANDS
    from gta.config import CONF_DIR
    from gta.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for command in COMMANDS.values():
            if command.config is not None:
                OverridesParser.create().parse_overrides(command.example.split())
                compose(command.config, overrides=command.example.split())
