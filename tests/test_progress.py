"""Progress output: a bar on a terminal, plain self-contained lines in logs and pipes."""

from __future__ import annotations

import io

import pytest
from helpers import gta, tiny

from gta.engine.progress import ProgressReport


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    report = ProgressReport(0, 10, every=5, stream=out)
    assert report.mode == "lines"
    report.set({"student/loss_l": 0.41234, "lr": 0.05})
    for step in range(1, 11):
        if step == 7:
            report.set({"mIoU": 45.06}, ".1f")
        report.advance(step)
    report.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("train 5/10 (50%) |") and "eta" in lines[0]
    assert "student/loss_l 0.412" in lines[0] and "lr 0.05" in lines[0] and "mIoU" not in lines[0]
    assert lines[1].startswith("train 10/10 (100%)") and "mIoU 45.1" in lines[1]


def test_a_bar_on_a_terminal_and_nothing_with_none():
    tty = Terminal()
    report = ProgressReport(3, 10, every=5, stream=tty)
    assert report.mode == "bar"
    report.set({"loss": 1.5})
    for step in range(4, 11):
        report.advance(step)
    report.write("step 10: teacher mIoU 50.00%")
    report.close()
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue() and "step 10: teacher" in tty.getvalue()

    quiet = io.StringIO()
    report = ProgressReport(0, 4, every=1, mode="none", stream=quiet)
    for step in range(1, 5):
        report.advance(step)
    report.write("step 4")
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="trainer.progress"):
        ProgressReport(0, 4, every=1, mode="fancy")


@pytest.mark.slow
def test_a_run_in_a_pipe_logs_lines(tmp_path):
    result = gta("train", *tiny(tmp_path / "data", iters=4), "trainer.log_every=2", f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in result.stderr.splitlines() if line.startswith("train ")]
    assert [line.split(" (")[0] for line in lines] == ["train 2/4", "train 4/4"]
    assert "student/loss_l" in lines[-1] and "mIoU" in lines[-1] and "\r" not in result.stderr
