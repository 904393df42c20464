"""The wrong-passphrase guard of legacy AES (qcrypt.audit.plausibility): sound on samples smaller than 4 KiB.

Images are made by qemu-img and written by qemu-io; qemu-img judges the outputs. The measured rates in
docs/PLAUSIBILITY.md come from scripts/plausibility-rates; the test below runs a smaller measurement at
every cluster size.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcrypt.audit import plausibility
from tests import _images as im
from tests import _plausibility as rates
from tests._cli import qcrypt, qemu_compare, secret_file

PASSPHRASE = "small clusters, right passphrase"
REPO = Path(__file__).resolve().parent.parent


def _source_text(length: int) -> bytes:
    """Real text without a zero byte or a disk signature: this repository's own Python sources."""
    text = b"".join(path.read_bytes() for path in sorted((REPO / "qcrypt").rglob("*.py")))
    assert len(text) >= length
    return text[:length]


def _judged_layouts(tmp_path: Path, layout: str) -> tuple[im.Image, str]:
    """A legacy image whose data clusters (or subclusters) are smaller than 4 KiB; its driver for qemu-img."""
    if layout.startswith("qcow2-c"):
        cluster_size = int(layout.removeprefix("qcow2-c"))
        return im.make_qcow2(
            tmp_path / "small.qcow2", 1 << 20, cluster_size=cluster_size, encrypt="aes", passphrase=PASSPHRASE
        ), "qcow2"
    if layout == "qcow2-extl2-c32k":  # 1 KiB subclusters
        return im.make_qcow2(
            tmp_path / "ext.qcow2", 1 << 20, cluster_size=32768, extended_l2=True, encrypt="aes", passphrase=PASSPHRASE
        ), "qcow2"
    assert layout == "qcow1-overlay"  # QEMU gives qcow v1 overlays 512-byte clusters
    base = im.make_qcow1(tmp_path / "base.qcow", 1 << 20)
    return im.make_qcow1(tmp_path / "over.qcow", 1 << 20, passphrase=PASSPHRASE, backing=base), "qcow"


LAYOUTS = ["qcow2-c512", "qcow2-c1024", "qcow2-c2048", "qcow2-extl2-c32k", "qcow1-overlay"]


@pytest.mark.interop
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("content", ["pattern", "text"])
def test_right_passphrase_accepted_on_small_clusters(tmp_path: Path, layout: str, content: str) -> None:
    image, driver = _judged_layouts(tmp_path, layout)
    # the reported case is 64 KiB of one byte value; extended L2 gets every other 1 KiB subcluster only
    pieces = [(2048 * i, 1024) for i in range(32)] if "extl2" in layout else [(8192, 65536)]
    if content == "pattern":
        im.qemu_io(image, *(f"write -q -P 0xab {offset} {length}" for offset, length in pieces))
    else:
        text = _source_text(sum(length for _, length in pieces))
        for offset, length in pieces:
            im.write_data(image, offset, text[:length])
            text = text[length:]
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    wrong = secret_file(tmp_path, "wrong", "not the passphrase at all")
    out = tmp_path / "out.qcow2"
    refused = qcrypt(
        "migrate",
        str(image.path),
        "--to",
        "qcow2-luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(wrong),
        "--pbkdf-force-iterations",
        "1000",
        check=False,
    )
    assert refused.returncode == 4 and b"probably wrong" in refused.stderr and not out.exists()
    qcrypt(
        "migrate",
        str(image.path),
        "--to",
        "qcow2-luks",
        "-o",
        str(out),
        "--passphrase-file",
        str(pw),
        "--pbkdf-force-iterations",
        "1000",
    )
    qemu_compare((out, "qcow2", True), (image.path, driver, True), pw)


def test_random_sectors_stay_far_from_the_thresholds() -> None:
    mean, std, lowest, repeats = rates.random_sector_statistics(50_000)
    assert lowest > plausibility.SECTOR_RANDOM_ENTROPY_BITS + 0.3 and mean - 10 * std > 7.2
    assert repeats < plausibility.SECTOR_MAX_REPEATS - 8
    assert not plausibility.judge([(4096 * i, os.urandom(512)) for i in range(64)]).plausible


@pytest.mark.parametrize("kind", ["ext4", "text", "executables", "compressed", "random"])
def test_measured_rates_at_every_cluster_size(kind: str) -> None:
    """A smaller run of scripts/plausibility-rates: no false acceptance anywhere, and no false refusal on
    file systems, text or executables at any cluster size (compressed and random content need --force)."""
    data = rates.content(kind, 8 << 20)
    for cluster_size in rates.CLUSTER_SIZES:
        cell = rates.measure(kind, data, cluster_size, trials=4, wrong_trials=2, seed=cluster_size)
        assert cell.false_acceptances == 0, cell
        if kind in ("ext4", "text", "executables"):
            assert cell.false_refusals == 0, cell
        elif kind == "random":
            assert cell.false_refusals == cell.trials, cell
