"""qcrypt agrees with its peers on the images they handle: QEMU's exact LUKS1 layout rules, headers qcrypt
cannot parse or unlock (one error everywhere), LUKS1 ciphers qcrypt does not implement, small legacy clusters,
and the smaller cases (external data files, empty LUKS payloads).

qemu-img, qemu-io and cryptsetup build every image and judge every output.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import _images as im
from tests.conftest import require_tool
from tests.test_migrate import TOOL_TIMEOUT, cryptsetup, qcrypt, qemu_check, secret_file

PASSPHRASE = "agreeing with the peers"
OLD_LAYOUTS = {
    # cryptsetup 1.0: key material from sector 2, slots 1 KiB aligned (126 sectors for a 128-bit key)
    "cryptsetup-1.0": ([2 + 126 * i for i in range(8)], 1010),
    # material from sector 8 but slots closer than QEMU's 4 KiB rounding allows
    "packed": ([8 + 126 * i for i in range(8)], 1024),
}


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def qemu_opens(path: Path, driver: str, pw: Path, plain: Path) -> None:
    """qemu-img opens ``path`` and reads exactly the guest view in the raw file ``plain``."""
    key = "key-secret" if driver == "luks" else "encrypt.key-secret"
    out = qemu_img("compare", "--object", f"secret,id=s,file={pw}", "--image-opts",
                   f"driver={driver},file.filename={path},{key}=s", f"driver=raw,file.filename={plain}")
    assert out.returncode == 0 and "identical" in out.stdout, out.stdout + out.stderr


def info_json(path: Path) -> tuple[int, dict[str, object] | None, str]:
    result = qcrypt("info", "--format", "json", str(path), check=False)
    report = json.loads(result.stdout) if result.returncode == 0 else None
    return result.returncode, report, result.stderr.decode()


# -- QEMU's LUKS1 layout rules ------------------------------------------------------------------------------


def _old_layout_luks(tmp_path: Path, layout: str) -> tuple[Path, Path, Path]:
    """A raw LUKS1 file laid out as an older cryptsetup did (cryptsetup opens it, QEMU refuses it), its
    passphrase file, and its guest view as a raw file (read by qemu-img before the header edit)."""
    path = tmp_path / f"{layout}.luks"
    image = im.make_luks_cryptsetup(path, 1 << 20, cipher="aes-cbc-essiv:sha256", key_bits=128,
                                    hash_name="sha256", passphrase=PASSPHRASE)
    im.zero_fill(image, 1 << 20)
    im.write_pattern(image, 4096, 65536, 0xAB)
    im.write_data(image, 300 * 512, b"guest sector 300" * 32)
    plain = tmp_path / "plain.raw"
    pw = secret_file(tmp_path, "pw", PASSPHRASE)
    out = qemu_img("convert", "--object", f"secret,id=s,file={pw}", "--image-opts",
                   f"driver=luks,file.filename={path},key-secret=s", "-O", "raw", str(plain))
    assert out.returncode == 0, out.stderr
    offsets, payload = OLD_LAYOUTS[layout]
    im.relayout_luks1(path, offsets, payload)
    assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(path)).returncode == 0
    refused = qemu_img("info", "--object", f"secret,id=s,file={pw}", "--image-opts",
                       f"driver=luks,file.filename={path},key-secret=s")
    assert refused.returncode != 0 and "overlapping" in refused.stderr
    return path, pw, plain


@pytest.mark.interop
@pytest.mark.parametrize("layout", sorted(OLD_LAYOUTS))
def test_old_cryptsetup_layouts_are_reported_and_migrated_to_what_qemu_opens(tmp_path: Path, layout: str) -> None:
    source, pw, plain = _old_layout_luks(tmp_path, layout)
    code, report, _ = info_json(source)
    assert code == 0 and report is not None
    refusal = [f for f in report["findings"] if f["code"] == "luks1-qemu-refuses-layout"]  # type: ignore[index]
    assert refusal and "overlap" in refusal[0]["message"]
    if layout == "cryptsetup-1.0":
        assert "before sector 8" in refusal[0]["message"]
    for target, driver in (("luks", "luks"), ("qcow2-luks", "qcow2")):
        out = tmp_path / f"out-{target}"
        result = qcrypt("migrate", str(source), "--to", target, "-o", str(out), "--passphrase-file", str(pw))
        assert b"verified" in result.stdout and b"carried over" in result.stdout
        qemu_opens(out, driver, pw, plain)
        if target == "qcow2-luks":
            qemu_check(out, pw)
        else:
            assert cryptsetup("open", "--test-passphrase", "--key-file", str(pw), str(out)).returncode == 0
        code, report, _ = info_json(out)
        assert code == 0 and report is not None
        assert "luks1-qemu-refuses-layout" not in [f["code"] for f in report["findings"]]  # type: ignore[index]


@pytest.mark.interop
def test_unaligned_payload_text_does_not_call_cryptsetup_layouts_qemu_ones(tmp_path: Path) -> None:
    source, _pw, _plain = _old_layout_luks(tmp_path, "cryptsetup-1.0")
    _, report, _ = info_json(source)
    assert report is not None
    texts = [f["message"] for f in report["findings"] if f["code"] == "luks1-unaligned-payload"]  # type: ignore[index]
    assert texts and "QEMU" not in texts[0] and "1010 sectors" in texts[0]
