"""RELIABILITY.md C1 off the server: the bad-image corpus (I1-I12 kinds) through the CLI.

``lensforge predict`` and ``data inspect`` (and evaluate, and the training loader) apply the
server's header checks — format allow-list, pixel cap, aspect cap — before decoding; a bad
image is one line naming it and the run goes on with the others. The 65535x1 PNG that once
made ``predict`` hang and climb past 7 GB is refused in a real process with bounded memory.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.cli import main
from lensforge.data.image import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any declared size, cheap to build (65535x1: 88 bytes)."""
    row = bytes(1 + (width + 7) // 8)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _animated(frames: int) -> bytes:
    imgs = [Image.new("P", (8, 8), i % 4) for i in range(frames)]
    for im in imgs:
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return _encode(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=10)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_photo((40, 60)), "JPEG", exif=exif)


# name -> (bytes, the error fragment expected, or None when the image must be predicted)
def corpus() -> dict[str, tuple[bytes, str | None]]:
    jpeg = _encode(_photo(), "JPEG", quality=90)
    png = _encode(_photo(seed=1), "PNG")
    bad_crc = bytearray(png)
    bad_crc[30] ^= 0xFF  # inside the IHDR chunk: its CRC no longer matches
    return {
        # I1 empty; I2 not an image (text, HTML, PDF, SVG, EPS)
        "i1-empty.png": (b"", "empty image"),
        "i2-text.jpg": (b"just some text\n", "not an image"),
        "i2-html.png": (b"<!doctype html><html><body>hi</body></html>", "not an image"),
        "i2-pdf.png": (b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n", "not an image"),
        "i2-svg.png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image"),
        # I3 truncated, bad CRC
        "i3-truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt or truncated image"),
        "i3-truncated.png": (png[: len(png) // 2], "corrupt or truncated image"),
        "i3-bad-crc.png": (bytes(bad_crc), "corrupt or truncated image"),
        # I4 pixel bomb (100 MP declared, ~12 KB); I5 aspect extremes
        "i4-bomb.png": (blank_png(10_000, 10_000), f"image too large: 10000x10000 > {DEFAULT_MAX_PIXELS} pixels"),
        "i5-wide.png": (blank_png(65_535, 1), f"65535x1 has an aspect ratio over {DEFAULT_MAX_ASPECT}:1"),
        "i5-tall.png": (blank_png(1, 65_535), f"1x65535 has an aspect ratio over {DEFAULT_MAX_ASPECT}:1"),
        # I11/I12 formats outside the allow-list, named .png
        "i12-tiff.png": (_encode(_photo(), "TIFF"), "unsupported image format: TIFF"),
        "i12-eps.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "unsupported image format: EPS"),
        # I6 tiny; I7 animated (frame 0 only); I8 modes; I9 EXIF orientation: all predicted
        "i6-1x1.png": (_encode(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"), None),
        "i6-2x2.png": (_encode(Image.new("RGB", (2, 2), (200, 8, 9)), "PNG"), None),
        "i7-animated.gif": (_animated(300), None),
        "i8-cmyk.jpg": (_encode(_photo().convert("CMYK"), "JPEG"), None),
        "i8-p.png": (_encode(_photo().convert("P"), "PNG"), None),
        "i8-rgba.png": (_encode(_photo().convert("RGBA"), "PNG"), None),
        "i8-la.png": (_encode(_photo().convert("LA"), "PNG"), None),
        "i8-1bit.png": (_encode(_photo().convert("1"), "PNG"), None),
        "i8-i16.png": (_encode(Image.fromarray(np.full((20, 30), 40_000, np.uint16)), "PNG"), None),
        "i9-exif6.jpg": (_exif_rotated(), None),
        "ok.jpg": (jpeg, None),
    }


def write_corpus(folder: Path) -> dict[str, str | None]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (data, fragment) in corpus().items():
        (folder / name).write_bytes(data)
        expected[name] = fragment
    return expected


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_reports_each_bad_image_in_one_line_and_predicts_the_rest(
    tmp_path: Path, shapes_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = write_corpus(tmp_path / "corpus")
    code, out, err = run_cli(["predict", shapes_bundle, tmp_path / "corpus", "--json"], capsys)
    assert code == 0, err
    docs = {Path(d["path"]).name: d for d in map(json.loads, out.strip().splitlines())}
    assert set(docs) == set(expected)  # every file answered, none twice
    for name, fragment in expected.items():
        doc = docs[name]
        if fragment is None:
            assert "error" not in doc and doc["labels"], (name, doc)
        else:
            assert set(doc) == {"path", "error"}, name
            assert fragment in doc["error"] and name in doc["error"], (name, doc["error"])
            assert "\n" not in doc["error"] and " at 0x" not in doc["error"]  # no object reprs
    assert "Traceback" not in err


def test_predict_on_the_65535x1_png_is_quick_with_bounded_memory(tmp_path: Path, shapes_bundle: Path) -> None:
    """A real process (the report's command): refused from the header, peak RSS far below
    the 7+ GB the resize used to reach. The timeout only guards against the old hang."""
    wide = tmp_path / "wide.png"
    wide.write_bytes(blank_png(65_535, 1))
    assert wide.stat().st_size < 300  # the report's file was 275 bytes
    # VmHWM is this process image's own peak; ru_maxrss is not: Linux carries the parent's
    # high-water mark through fork and exec, so under a grown pytest process it reads the parent's
    script = (
        "import json, re, sys\n"
        "from lensforge.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "print(json.dumps({'peak_kb': hwm}), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(shapes_bundle), str(wide), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # nothing could be predicted: one error line
    (line,) = proc.stdout.strip().splitlines()
    assert json.loads(line) == {"path": str(wide),
                                "error": f"{wide}: image too large: 65535x1 has an aspect ratio over {DEFAULT_MAX_ASPECT}:1"}
    peak_mb = json.loads(proc.stderr.strip().splitlines()[-1])["peak_kb"] / 1024
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB"


def test_data_inspect_reports_the_corpus_without_decoding_the_bombs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    expected = write_corpus(root / "odd")
    for i in range(3):
        (root / "plain" / f"{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / "plain" / f"{i}.jpg").write_bytes(_encode(_photo(seed=10 + i), "JPEG"))
    bad = {name: fragment for name, fragment in expected.items() if fragment}
    for fast in (False, True):
        code, out, err = run_cli(["data", "inspect", root, "--json", *(["--fast"] if fast else [])], capsys)
        assert code == 0, err
        report = json.loads(out)
        assert report["total_images"] == len(expected) + 3
        found = {Path(e["path"]).name: e for e in report["unreadable"]["examples"]}
        if not fast:  # headers alone cannot see truncation
            assert report["unreadable"]["count"] == len(bad)
        for name, e in found.items():
            assert bad[name] in e["reason"], (name, e)
        for name in ("i4-bomb.png", "i5-wide.png", "i5-tall.png", "i12-tiff.png", "i12-eps.png", "i1-empty.png"):
            if name in found:
                assert found[name]["code"] in ("too_large", "unsupported_format", "empty")
    # the console report names them too
    code, out, _ = run_cli(["data", "inspect", root], capsys)
    assert code == 0 and "unreadable" in out and "i1-empty.png" in out


def test_evaluate_leaves_bad_images_out_and_goes_on(
    tmp_path: Path, shapes_dir: Path, shapes_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lensforge.evaluation import evaluate

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "circle" / "wide.png").write_bytes(blank_png(65_535, 1))
    (data / "cross" / "bomb.png").write_bytes(blank_png(10_000, 10_000))
    with caplog.at_level("WARNING"):
        res = evaluate(shapes_bundle, data, split="all", out_dir=tmp_path / "eval")
    assert res.failed == 2  # the 40 shapes are evaluated, the two bad files left out
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("2 image(s) could not be read and were left out, e.g. ")
    assert "circle/wide.png: image too large: 65535x1 has an aspect ratio over" in warning


def test_the_training_loader_skips_the_corpus_bad_images(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from lensforge.data.records import Record
    from lensforge.runtime.preprocess import InputSpec
    from lensforge.training.dataset import load_images

    expected = write_corpus(tmp_path / "corpus")
    records = [Record(path=tmp_path / "corpus" / name, labels=(0,)) for name in sorted(expected)]
    good, images, bad = load_images(records, InputSpec(size=32, resize=36))
    assert sorted(r.path.name for r in good) == sorted(n for n, f in expected.items() if f is None)
    assert images is not None and all(im.mode == "RGB" for im in images)
    for record, why in bad:
        assert expected[record.path.name] in why


def test_evaluate_refuses_data_outside_its_folder_unless_allowed(
    tmp_path: Path, shapes_dir: Path, shapes_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensforge.evaluation import evaluate

    data = tmp_path / "data"
    rows = []
    for cls in ("circle", "cross"):
        for src in sorted((shapes_dir / cls).glob("*.jpg"))[:2]:
            (data / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, data / cls / src.name)
            rows.append(f"{cls}/{src.name},{cls}")
    rows.append(f"{sorted((shapes_dir / 'square').glob('*.jpg'))[0]},square")  # outside data/
    (data / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, _, err = run_cli(["evaluate", shapes_bundle, data, "--split", "all", "--out", tmp_path / "eval"], capsys)
    assert code == 2 and "1 path listed in labels.csv resolves outside the data folder" in err
    res = evaluate(shapes_bundle, data, split="all", out_dir=tmp_path / "eval", allow_outside_root=True)
    assert res.failed == 0 and res.split == "all images"
