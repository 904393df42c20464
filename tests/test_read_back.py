"""Raw LUKS outputs are read back chunk by chunk while they are written (qcrypt.migrate.read_back); after writing,
the header on disk, the coverage of the checked ranges and an end-to-end sample complete the verification.

Every check here is made to fire: digests doctored after a real migration (a range missing, a range twice, other
parameters), a chunk that reads back differently, and a migration whose output the read-back judged."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from qcrypt.errors import VerificationError
from qcrypt.guest.stream import KnownMasterKey
from qcrypt.migrate import read_back, verification
from qcrypt.migrate import run as mig
from qcrypt.migrate.writing import Digests
from tests import _images as im
from tests._cli import qemu_compare, secret_file

pytestmark = pytest.mark.interop

PASSPHRASE = "read back while writing"
CHUNK = 1 << 20
SIZE = 12 * CHUNK  # more ranges than the end-to-end sample reads
RAW = ("aes", "xts-plain64", 64, "payload sector", 2 << 20)  # what a raw LUKS output is checked with


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("read-back") / "legacy.qcow2"
    image = im.make_qcow2(path, SIZE, encrypt="aes", passphrase=PASSPHRASE)
    im.fill_image(image, SIZE, 65536)
    return path


def _options(out: Path) -> mig.MigrateOptions:
    return mig.MigrateOptions(
        target="luks", output=str(out), passphrase=PASSPHRASE.encode(), iterations=1000, workers=1, chunk_bytes=CHUNK
    )


def _migrate_keeping_digests(
    source: Path, out: Path, monkeypatch: pytest.MonkeyPatch, target: str = "luks"
) -> tuple[Digests, bytearray, mig.MigrateResult]:
    """A real migration; returns the digests the writing recorded, a copy of the master key and the result."""
    kept: dict[str, object] = {}
    real_verify = mig.verify

    def keeping(path: str, key: KnownMasterKey, digests: Digests, **kw: object) -> int:
        kept["digests"] = copy.deepcopy(digests)
        kept["key"] = bytearray(key.key)
        return real_verify(path, key, digests, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mig, "verify", keeping)
    opts = dataclasses.replace(_options(out), target=target)
    result = mig.migrate(str(source), opts)
    assert result.verified
    return kept["digests"], kept["key"], result  # type: ignore[return-value]


def test_every_chunk_is_read_back_and_a_sample_is_read_again_end_to_end(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[tuple[int, int]] = []
    real_plaintext = read_back.ReadBack.stored_plaintext

    def recording(self: read_back.ReadBack, host_offset: int, length: int, guest_offset: int) -> bytes:
        assert host_offset == (2 << 20) + guest_offset  # past the 2 MiB header area
        read.append((guest_offset, length))
        return real_plaintext(self, host_offset, length, guest_offset)

    sampled: list[int] = []
    real_check = verification._check_ranges

    def counting(read_fn: object, ranges: list, *args: object, **kw: object) -> int:
        sampled.append(len(ranges))
        return real_check(read_fn, ranges, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(read_back.ReadBack, "stored_plaintext", recording)
    monkeypatch.setattr(verification, "_check_ranges", counting)
    out = tmp_path / "out.luks"
    result = mig.migrate(str(legacy), _options(out))
    assert read == [(offset, CHUNK) for offset in range(0, SIZE, CHUNK)]
    assert sampled == [verification.READ_BACK_SAMPLE_RANGES]
    assert result.verified and result.verified_bytes == SIZE
    qemu_compare((out, "luks", True), (legacy, "qcow2", True), secret_file(tmp_path, "pw", PASSPHRASE))


def test_a_chunk_that_reads_back_differently_stops_the_migration(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_plaintext = read_back.ReadBack.stored_plaintext

    def damaged(self: read_back.ReadBack, host_offset: int, length: int, guest_offset: int) -> bytes:
        plain = bytearray(real_plaintext(self, host_offset, length, guest_offset))
        if guest_offset == 5 * CHUNK:  # not among the ranges the final sample reads
            plain[100] ^= 1
        return bytes(plain)

    monkeypatch.setattr(read_back.ReadBack, "stored_plaintext", damaged)
    out = tmp_path / "out.luks"
    with pytest.raises(VerificationError, match=f"guest bytes {5 * CHUNK}..{6 * CHUNK} differ from the source"):
        mig.migrate(str(legacy), _options(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "doctor, message",
    [
        (lambda d: d.read_back.pop(3), "do not cover"),
        (lambda d: d.read_back.insert(3, d.read_back[3]), "do not cover"),
        (lambda d: d.read_back.append((-1, SIZE, CHUNK, (2 << 20) + SIZE)), "do not cover"),
        (lambda d: d.read_back.__setitem__(3, (*d.read_back[3][:3], d.read_back[3][3] + 512)), "do not cover"),
        (lambda d: setattr(d, "read_back_with", ("aes", "cbc-essiv:sha256", 64, *RAW[3:])), "header written describes"),
        (lambda d: setattr(d, "read_back_with", (*RAW[:4], 4 << 20)), "header written describes"),
        (lambda d: setattr(d, "read_back_with", (*RAW[:3], "host sector", 0)), "header written describes"),
    ],
    ids=[
        "a range missing",
        "a range twice",
        "past the end",
        "stored elsewhere",
        "another mode",
        "another payload offset",
        "other IVs",
    ],
)
def test_the_final_check_refuses_what_the_read_back_did_not_establish(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doctor: object, message: str
) -> None:
    out = tmp_path / "out.luks"
    digests, key, _ = _migrate_keeping_digests(legacy, out, monkeypatch)
    assert digests.read_back_with == RAW
    _assert_doctored_refused(out, "luks", digests, key, doctor, message)


def _assert_doctored_refused(
    out: Path, target: str, digests: Digests, key: bytearray, doctor: object, message: str
) -> None:
    """The output passes verification with the digests the writing recorded, and not with doctored ones."""

    def check(d: Digests) -> int:
        key_copy = KnownMasterKey(bytearray(key))
        return verification.verify(str(out), key_copy, d, target=target, snapshots=[], direct_io=True)

    assert check(copy.deepcopy(digests)) == digests.total_bytes  # the output as written passes
    doctored = copy.deepcopy(digests)
    doctor(doctored)  # type: ignore[operator]
    with pytest.raises(VerificationError, match=message):
        check(doctored)


def test_without_read_back_the_whole_output_is_read_again(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second pass stays for digests recorded without a read-back (e.g. by an older writer)."""
    out = tmp_path / "out.luks"
    digests, key, _ = _migrate_keeping_digests(legacy, out, monkeypatch)
    second_pass = Digests()
    second_pass.ranges = list(digests.ranges)
    assert (
        verification.verify(str(out), KnownMasterKey(bytearray(key)), second_pass, target="luks", snapshots=[]) == SIZE
    )
    damaged = Digests()
    damaged.ranges = [(t, o, n, bytes(16)) if o == 7 * CHUNK else (t, o, n, d) for t, o, n, d in digests.ranges]
    with pytest.raises(VerificationError, match=f"guest bytes {7 * CHUNK}..{8 * CHUNK} differ"):
        verification.verify(str(out), KnownMasterKey(bytearray(key)), damaged, target="luks", snapshots=[])


# -- LUKS inside qcow2 ----------------------------------------------------------------------------------------

QCOW2 = ("aes", "xts-plain64", 64, "host sector", 0)  # IVs from host sectors, no payload offset


def test_qcow2_luks_data_runs_are_read_back_where_the_tables_map_them(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.qcow2"
    digests, _, _ = _migrate_keeping_digests(legacy, out, monkeypatch, "qcow2-luks")
    assert digests.read_back_with == QCOW2
    data_runs = {(t, g, n) for t, g, n, _ in digests.read_back}
    assert len(data_runs) >= 4
    # every run not read back was a zero run, written as zero clusters (read again in full after writing)
    assert all(d == digests_of_zeros(n) for t, g, n, d in digests.ranges if (t, g, n) not in data_runs)
    qemu_compare((out, "qcow2", True), (legacy, "qcow2", True), secret_file(tmp_path, "pw", PASSPHRASE))


def digests_of_zeros(length: int) -> bytes:
    from qcrypt.plumbing import checksum

    return checksum.digest(bytes(length))


@pytest.mark.parametrize(
    "doctor, message",
    [
        (
            lambda d: d.read_back.__setitem__(2, (*d.read_back[2][:3], d.read_back[2][3] + (1 << 40))),
            "not mapped where",
        ),
        (lambda d: d.read_back.__setitem__(2, (*d.read_back[2][:3], d.read_back[1][3])), "share host byte"),
        (lambda d: setattr(d, "read_back_with", (*QCOW2[:3], "payload sector", 0)), "header written describes"),
        (lambda d: setattr(d, "read_back_with", ("aes", "xts-plain", 64, *QCOW2[3:])), "header written describes"),
    ],
    ids=["stored elsewhere", "two runs on one host cluster", "other IVs", "another mode"],
)
def test_the_final_qcow2_check_refuses_what_the_read_back_did_not_establish(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doctor: object, message: str
) -> None:
    out = tmp_path / "out.qcow2"
    digests, key, _ = _migrate_keeping_digests(legacy, out, monkeypatch, "qcow2-luks")
    assert digests.read_back_with == QCOW2
    _assert_doctored_refused(out, "qcow2-luks", digests, key, doctor, message)


def test_a_qcow2_run_that_reads_back_differently_stops_the_migration(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third data run reads back with one byte changed (the disk is intact, so only the comparison made
    while writing can notice; the end-to-end sample reads through the ordinary reader)."""
    real = read_back.ReadBack.stored_plaintext
    calls: list[int] = []

    def damaged(self: read_back.ReadBack, host_offset: int, length: int, guest_offset: int) -> bytes:
        calls.append(guest_offset)
        plain = bytearray(real(self, host_offset, length, guest_offset))
        if len(calls) == 3:
            plain[7] ^= 0x80
        return bytes(plain)

    monkeypatch.setattr(read_back.ReadBack, "stored_plaintext", damaged)
    out = tmp_path / "out.qcow2"
    opts = mig.MigrateOptions(
        target="qcow2-luks", output=str(out), passphrase=PASSPHRASE.encode(), iterations=1000, workers=1
    )
    with pytest.raises(VerificationError, match="differ from the source"):
        mig.migrate(str(legacy), opts)
    assert len(calls) == 3 and not out.exists()


def test_sharable_runs_are_split_where_clusters_were_written_before() -> None:
    """A snapshot's run that mixes clusters an earlier table wrote with new ones: the new parts go to the workers
    (and are read back there), the rest is only mapped, each part with a digest of its own."""
    from qcrypt.migrate.writing import _split_seen

    written_before = {"b", "c", "f"}
    runs = [
        ("data", 10, 6, ["a", "b", "c", "d", "e", "f"]),
        ("zero", 16, 2, [None, None]),
        ("data", 18, 2, [None, None]),  # not sharable: never split
        ("data", 20, 2, ["b", "c"]),
    ]
    parts = list(_split_seen(runs, written_before.__contains__))
    assert parts == [
        ("data", 10, 1, ["a"]),
        ("data", 11, 2, ["b", "c"]),
        ("data", 13, 2, ["d", "e"]),
        ("data", 15, 1, ["f"]),
        ("zero", 16, 2, [None, None]),
        ("data", 18, 2, [None, None]),
        ("data", 20, 2, ["b", "c"]),
    ]


def test_a_digest_computed_for_the_key_is_not_computed_again_on_that_header_only(
    legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification opens the output with the master key and the header it built: a header on disk that carries
    that header's digest fields is accepted without the ~125 ms PBKDF2; one whose digest differs (a byte of it
    flipped on disk) is checked by the PBKDF2 and refused."""
    from qcrypt.errors import BadPassphraseError
    from qcrypt.guest.stream import RawLuksReader
    from qcrypt.luks import header as luks_header
    from qcrypt.luks import keyslots

    out = tmp_path / "out.luks"
    _digests, key, _result = _migrate_keeping_digests(legacy, out, monkeypatch)
    size = out.stat().st_size
    with open(out, "rb") as fh:
        built = luks_header.read_header(luks_header.file_reader(fh, 0, size, path=str(out)), size, path=str(out))
    pbkdf2_calls: list[int] = []
    real_pbkdf2 = keyslots.pbkdf2
    monkeypatch.setattr(keyslots, "pbkdf2", lambda *a: pbkdf2_calls.append(1) or real_pbkdf2(*a))
    RawLuksReader(str(out), KnownMasterKey(key, proven_by=built)).close()
    assert pbkdf2_calls == []
    RawLuksReader(str(out), KnownMasterKey(key)).close()  # without a header that proves it: the PBKDF2 runs
    assert pbkdf2_calls == [1]
    digest_at = 112  # LUKS1 phdr: mk_digest follows the payload offset and key bytes fields
    with open(out, "r+b") as fh:
        fh.seek(digest_at)
        byte = fh.read(1)
        fh.seek(digest_at)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BadPassphraseError, match="does not match the header's digest"):
        RawLuksReader(str(out), KnownMasterKey(key, proven_by=built)).close()
    assert pbkdf2_calls == [1, 1]
