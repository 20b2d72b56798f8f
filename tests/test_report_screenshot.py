"""The report page as a browser shows it: docs/scripts/screenshot_report.py renders it in headless
Chromium. Runs only where Chromium is installed (``apt-get install chromium``)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "scripts"))

import screenshot_report  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_script_says_what_is_missing_without_chromium(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(screenshot_report, "find_browser", lambda: None)
    assert screenshot_report.main(["--logdir", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 3
    assert "apt-get install chromium" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(screenshot_report.find_browser() is None,
                    reason="no Chromium on PATH (apt-get install chromium): the report is not rendered in a browser")
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    out = tmp_path / "report.png"
    assert screenshot_report.main(["--logdir", str(tmp_path / "run"), "--max-steps", "120", "--output", str(out),
                                   "--window-size", "1000,1400"]) == 0
    assert _png_size(out) == (1000, 1400)
    from PIL import Image

    img = Image.open(out).convert("L")
    # the page was drawn, not left blank: charts and text give many grey levels
    assert len(set(img.getdata())) > 50
    assert (tmp_path / "run" / "report.html").is_file()
