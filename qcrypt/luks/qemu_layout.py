"""QEMU's LUKS1 layout rules, stricter than cryptsetup's: keyslots start at 4 KiB, each slot's key material
is rounded up to 4 KiB, and the payload lies past all of it. One place for the rule, used by the grading,
the output layout and the re-layout of old containers.

Reference: qemu crypto/block-luks.c (qcrypto_block_luks_check_header).
"""

from __future__ import annotations

import itertools

from qcrypt.formats import luks1 as luks1_fmt
from qcrypt.luks.header import LuksHeader, material_sectors_for, round_up


def slot_sectors(key_bytes: int) -> int:
    """THE rule: sectors QEMU reserves for one slot's key material, cryptsetup's count rounded up to 4 KiB."""
    return round_up(material_sectors_for(key_bytes, luks1_fmt.STRIPES), luks1_fmt.ALIGN_KEYSLOTS_SECTORS)


def qemu_material_sectors(header: LuksHeader) -> int:
    """Sectors QEMU reserves for each of ``header``'s slots (:func:`slot_sectors`)."""
    return slot_sectors(header.key_bytes)


def qemu_keyslot_problems(header: LuksHeader) -> list[str]:
    """Why QEMU's luks driver refuses the keyslot placement (empty when it accepts it).

    QEMU checks every slot, active or not: its key material must start at or after sector 8 (the first
    4 KiB hold the header), and no two slots may overlap once each is rounded up to 4 KiB. cryptsetup only
    needs sector 2 and the unrounded size, so layouts of older cryptsetup versions open there but not in QEMU.
    """
    problems = []
    length = qemu_material_sectors(header)
    early = [s.index for s in header.keyslots if s.key_material_offset < luks1_fmt.ALIGN_KEYSLOTS_SECTORS]
    if early:
        problems.append(
            f"keyslot(s) {early} start before sector {luks1_fmt.ALIGN_KEYSLOTS_SECTORS} (QEMU: overlapping "
            "with the LUKS header)"
        )
    pairs = [
        (a.index, b.index)
        for a, b in itertools.combinations(header.keyslots, 2)
        if a.key_material_offset < b.key_material_offset + length
        and b.key_material_offset < a.key_material_offset + length
    ]
    if pairs:
        shown = ", ".join(f"{a}/{b}" for a, b in pairs[:4]) + (" ..." if len(pairs) > 4 else "")
        problems.append(f"keyslots {shown} overlap once QEMU rounds key material to 4 KiB")
    return problems


def qemu_payload_problems(header: LuksHeader) -> list[str]:
    """Why QEMU refuses where the payload starts (detached header, or key material reaching the payload)."""
    if header.payload_offset == 0:
        return ["detached header (payload offset 0)"]
    length = qemu_material_sectors(header)
    reaching = [s.index for s in header.keyslots if s.key_material_offset + length > header.payload_offset]
    if reaching:
        return [f"keyslot(s) {reaching} reach the payload once QEMU rounds key material to 4 KiB"]
    return []


def qemu_keyslot_offsets(key_bytes: int) -> list[int]:
    """Where QEMU (and today's cryptsetup) place the 8 slots' key material: from sector 8, 4 KiB apart."""
    return keyslot_layout(key_bytes, 1)[0]


def keyslot_layout(key_bytes: int, payload_align_sectors: int) -> tuple[list[int], int]:
    """cryptsetup's layout: slot offsets from sector 8, each 4 KiB aligned; payload aligned up."""
    step = slot_sectors(key_bytes)
    offsets = [luks1_fmt.ALIGN_KEYSLOTS_SECTORS + i * step for i in range(luks1_fmt.NUM_KEYSLOTS)]
    end = offsets[-1] + step
    return offsets, round_up(end, payload_align_sectors)
