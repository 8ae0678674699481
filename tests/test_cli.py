"""The ``facemetric`` command: parsing, exit codes and what it prints."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facemetric import __version__
from facemetric.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_align_reports_failures_and_exit_code(tmp_path, capsys):
    src = tmp_path / "src" / "person"
    src.mkdir(parents=True)
    Image.fromarray(np.full((120, 100, 3), 128, np.uint8)).save(src / "grey.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dst = tmp_path / "dst"

    code = main(["align", str(tmp_path / "src"), str(dst), "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1  # no face in the grey image, the JPEG is corrupt
    assert "2 images" in out and "0 written" in out and "2 failed" in out
    assert "no_face 1" in out and "load_error 1" in out

    code = main(["align", str(tmp_path / "src"), str(dst), "--workers", "1", "--fallback"])
    out = capsys.readouterr().out
    assert code == 1  # the corrupt file still fails; the grey image is centre-cropped
    assert "fallback_centre_crop 1" in out
    assert (dst / "person" / "grey.jpg").exists() or (dst / "person" / "grey.png").exists()
