"""The generic VMSAv8-64 translation table walker, stage 1 and stage 2 (Arm ARM D8; IHI 0070 §3.4).

Like QEMU's smmu-common.c next to smmuv3.c, this module knows granules and descriptors, not STEs
or CDs: the caller decodes its configuration into a ``WalkConfig``, selects TTB0/TTB1, strips the
top byte, and checks permission with ``check_permission`` on the returned leaf.

Every descriptor read goes through ``read_desc(pa)`` (rule 4: the caller routes it through the
bus), except that a caller may hand ``walk_raw`` a ``RamView`` for reads that are plain RAM reads
nobody observes, which it then does inline (the reads are most of a walk's cost). For a nested
stage 1, ``cfg.ttb`` and every next-level table address are IPAs, and ``translate_table(ipa)``
turns each descriptor's IPA into the PA to read, or returns the stage-2 fault unchanged for the
caller to report with CLASS=TT.

Fault order within one walk (IHI 0070 §7.3.22): input range, then per level {F_WALK_EABT,
F_TRANSLATION, F_ADDR_SIZE}, then F_ACCESS on the leaf. Not modelled: HTTU (AF=0 always faults
unless AFFD), the contiguous hint (each entry is cached at its own size), FEAT_LPA2 and level -1,
FEAT_XNX (SMMU_IDR3.XNX = 0: stage-2 bit 53 is RES0 and XN[1], bit 54, forbids execution at every
EL), PAN/EPAN and UWXN (the caller's business), a TTB above the output size (an ILLEGAL CD/STE,
rejected before the walk).

Hot path (DESIGN rule 9): no tracing, no helper objects, inline arithmetic on plain ints.
``walk_raw`` is the walker itself and returns the leaf as a plain tuple of ``WalkLeaf``'s fields
(the translator turns it straight into a TLB entry); ``walk`` wraps it in a ``WalkLeaf``.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from pkvm_smmu.arch.events import EventType, FaultClass
from pkvm_smmu.arch.vmsa import S1_LEAF, S2_LEAF, TABLE_DESC
from pkvm_smmu.machine.bus import ExternalAbort
from pkvm_smmu.machine.memory import PAGE_MASK, PAGE_SHIFT
from pkvm_smmu.machine.smmu.types import WalkConfig, WalkFault, WalkLeaf

__all__ = ["NO_RAM", "RamView", "RawLeaf", "check_permission", "walk", "walk_raw"]

# WalkLeaf's fields, in declaration order: WalkLeaf(*raw) is the leaf.
RawLeaf = tuple[int, int, int, int, int, int, tuple[int, ...], bool, bool, bool, bool, bool, bool, int]
# (page_of, first, last): a descriptor at a PA in [first, last] is the little-endian u64 at
# pa & PAGE_MASK of page_of(pa >> PAGE_SHIFT) (None: an untouched page, reads zero). Valid only
# where that is exactly what read_desc would return (RAM, and nobody observing the bus).
RamView = tuple[Callable[[int], "bytearray | None"], int, int]
NO_RAM: RamView = (lambda pfn: None, 0, -1)  # every read through read_desc
_read_u64 = struct.Struct("<Q").unpack_from

# Descriptor bits, taken from the arch layouts (the one source of truth for encodings).
_VALID = TABLE_DESC.VALID.in_place_mask
_TYPE = TABLE_DESC.TYPE.in_place_mask  # 1: table (L0-2) or page (L3); 0: block
_VALID_TYPE = _VALID | _TYPE
_OA_BITS = TABLE_DESC.NLTA.hi + 1
_OA_END = 1 << _OA_BITS  # addresses held in bits [47:G]
_OA_HI = S1_LEAF.OA_HI.in_place_mask  # OA[51:48] in bits [15:12] (64 KiB granule, 52-bit OA)
_OA_HI_SHIFT = 48 - S1_LEAF.OA_HI.lo
_AF = S1_LEAF.AF.in_place_mask
_NG = S1_LEAF.NG.in_place_mask
_AP_RO = 1 << S1_LEAF.AP.hi  # AP[2]: read-only
_AP_EL0 = 1 << S1_LEAF.AP.lo  # AP[1]: EL0 access
_PXN = S1_LEAF.PXN.in_place_mask
_UXN = S1_LEAF.UXN.in_place_mask  # XN in a regime with one privilege level
_ATTRINDX_LO = S1_LEAF.ATTRINDX.lo
_ATTRINDX_MASK = S1_LEAF.ATTRINDX.mask
_PXNTABLE = TABLE_DESC.PXNTABLE.in_place_mask
_XNTABLE = TABLE_DESC.XNTABLE.in_place_mask  # UXNTable at EL1&0, XNTable at EL2
_APTABLE_NO_EL0 = 1 << TABLE_DESC.APTABLE.lo  # APTable[0]
_APTABLE_RO = 1 << TABLE_DESC.APTABLE.hi  # APTable[1]
_S2AP_R = 1 << S2_LEAF.S2AP.lo
_S2AP_W = 1 << S2_LEAF.S2AP.hi
_S2_XN = 1 << S2_LEAF.XN.hi  # XN[1]; XN[0] (bit 53) is RES0 without FEAT_XNX
_MEMATTR_LO = S2_LEAF.MEMATTR.lo
_MEMATTR_MASK = S2_LEAF.MEMATTR.mask


def _fast_leaf_constructor() -> Callable[..., WalkLeaf]:
    """A WalkLeaf constructor that fills the slots directly.

    The frozen dataclass ``__init__`` goes through ``object.__setattr__`` once per field, about
    half the cost of a whole walk; the result here is the same object (same fields, equality and
    hash). If WalkLeaf's fields change, fall back to the dataclass constructor.
    """
    expected = (
        "input_base", "output_base", "level", "size", "descriptor", "descriptor_address", "path",
        "readable", "writable", "unpriv", "executable", "priv_executable", "global_entry", "attr",
    )  # fmt: skip
    if tuple(f.name for f in dataclasses.fields(WalkLeaf)) != expected:
        return WalkLeaf
    setters = [getattr(WalkLeaf, name).__set__ for name in expected]
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13 = setters
    new = object.__new__

    def leaf(
        input_base: int, output_base: int, level: int, size: int, descriptor: int,
        descriptor_address: int, path: tuple[int, ...], readable: bool, writable: bool,
        unpriv: bool, executable: bool, priv_executable: bool, global_entry: bool, attr: int,
    ) -> WalkLeaf:  # fmt: skip
        obj = new(WalkLeaf)
        s0(obj, input_base)
        s1(obj, output_base)
        s2(obj, level)
        s3(obj, size)
        s4(obj, descriptor)
        s5(obj, descriptor_address)
        s6(obj, path)
        s7(obj, readable)
        s8(obj, writable)
        s9(obj, unpriv)
        s10(obj, executable)
        s11(obj, priv_executable)
        s12(obj, global_entry)
        s13(obj, attr)
        return obj

    return leaf


_leaf = _fast_leaf_constructor()

_F_TRANSLATION = EventType.F_TRANSLATION
_F_ADDR_SIZE = EventType.F_ADDR_SIZE
_F_ACCESS = EventType.F_ACCESS
_F_WALK_EABT = EventType.F_WALK_EABT
_IN = FaultClass.IN
_TT = FaultClass.TT


def walk(
    cfg: WalkConfig,
    address: int,
    read_desc: Callable[[int], int | ExternalAbort],
    translate_table: Callable[[int], int | WalkFault] | None = None,
) -> WalkLeaf | WalkFault:
    """Walk ``cfg``'s tables for ``address`` (already reduced to the region: no TTB1 bits, no tag).

    ``cfg`` must be consistent (start level 0-3, concatenation as the decode computed it); the
    configuration decoders reject ILLEGAL combinations before any walk.
    """
    result = walk_raw(cfg, address, read_desc, translate_table)
    if isinstance(result, WalkFault):
        return result
    return _leaf(*result)


def walk_raw(
    cfg: WalkConfig,
    address: int,
    read_desc: Callable[[int], int | ExternalAbort],
    translate_table: Callable[[int], int | WalkFault] | None = None,
    ram: RamView = NO_RAM,
) -> RawLeaf | WalkFault:
    """``walk``, with the leaf as a ``RawLeaf`` tuple (building a WalkLeaf costs a third of a walk),
    and descriptor reads in ``ram`` done inline. Descriptors are 8-byte aligned: never split."""
    page_of, ram_first, ram_last = ram
    geometry = cfg.geometry or _geometry(cfg)
    (stage, level, input_bits, stride, output_bits, oa52, first_block, table_mask, shift3, mask8, table,
     next8, narrow) = geometry  # fmt: skip
    # Stage-2 faults report the IPA being translated; stage 1 has none.
    ipa = address if stage == 2 else 0
    if address >> input_bits:
        return WalkFault(_F_TRANSLATION, stage, level, _IN, ipa)
    # Byte offset of the descriptor in its table: the level's index bits, shifted left by 3.
    offset = (address >> shift3) & mask8

    path: list[int] = []
    table_bits = 0  # OR of every table descriptor on the way (only bits [62:59] are used)
    while True:
        if translate_table is None:
            pa = table + offset
        else:
            translated = translate_table(table + offset)
            if isinstance(translated, WalkFault):
                return translated
            pa = translated
        path.append(pa)
        if ram_first <= pa <= ram_last:
            page = page_of(pa >> PAGE_SHIFT)
            desc = 0 if page is None else _read_u64(page, pa & PAGE_MASK)[0]
        else:
            read = read_desc(pa)
            if isinstance(read, ExternalAbort):
                return WalkFault(_F_WALK_EABT, stage, level, _TT if stage == 1 else _IN, ipa, pa)
            desc = read
        kind = desc & _VALID_TYPE
        if kind == _VALID_TYPE:
            if level == 3:
                break  # page
            next_table = desc & table_mask
            if oa52:
                next_table |= (desc & _OA_HI) << _OA_HI_SHIFT
            if narrow and next_table >> output_bits:
                return WalkFault(_F_ADDR_SIZE, stage, level, _IN, ipa)
            table_bits |= desc
            table = next_table
            level += 1
            shift3 -= stride
            offset = (address >> shift3) & next8
            continue
        if kind != _VALID:
            return WalkFault(_F_TRANSLATION, stage, level, _IN, ipa)
        if level == 3 or level < first_block:
            return WalkFault(_F_TRANSLATION, stage, level, _IN, ipa)  # reserved encoding
        break  # block

    size = 8 << shift3
    output = desc & (_OA_END - size)
    if oa52:
        output |= (desc & _OA_HI) << _OA_HI_SHIFT
    if narrow and output >> output_bits:
        return WalkFault(_F_ADDR_SIZE, stage, level, _IN, ipa)
    if not desc & _AF and not cfg.affd:
        return WalkFault(_F_ACCESS, stage, level, _IN, ipa)

    if stage == 2:
        execute = not desc & _S2_XN
        return (
            address & -size,
            output,
            level,
            size,
            desc,
            pa,
            tuple(path),
            desc & _S2AP_R != 0,
            desc & _S2AP_W != 0,
            True,
            execute,
            execute,
            True,
            (desc >> _MEMATTR_LO) & _MEMATTR_MASK,
        )

    if not cfg.hierarchical_attrs:
        table_bits = 0
    writable = not (desc & _AP_RO or table_bits & _APTABLE_RO)
    if cfg.single_privilege:
        # EL2 (E2H=0): AP[1], APTable[0], PXN and PXNTable are ignored; bit 54 is XN.
        unpriv = True
        executable = priv_executable = not (desc & _UXN or table_bits & _XNTABLE)
        global_entry = True
    else:
        unpriv = desc & _AP_EL0 != 0 and not table_bits & _APTABLE_NO_EL0
        executable = not (desc & _UXN or table_bits & _XNTABLE)
        # VMSAv8-64 treats every EL0-writable region as PXN.
        priv_executable = not (desc & _PXN or table_bits & _PXNTABLE or (unpriv and writable))
        global_entry = not desc & _NG
    if writable and cfg.wxn:
        executable = priv_executable = False
    return (
        address & -size,
        output,
        level,
        size,
        desc,
        pa,
        tuple(path),
        True,
        writable,
        unpriv,
        executable,
        priv_executable,
        global_entry,
        (desc >> _ATTRINDX_LO) & _ATTRINDX_MASK,
    )


def _geometry(cfg: WalkConfig) -> tuple[int, ...]:
    """What every walk of ``cfg`` starts from, computed once per configuration and kept on it."""
    gshift = cfg.granule.shift
    stride = gshift - 3
    output_bits = cfg.output_bits
    oa52 = gshift == 16 and output_bits > 48
    # Blocks: 4 KiB at L1/L2; 16/64 KiB at L2 only, plus L1 for 64 KiB with a 52-bit OA.
    first_block_level = 1 if gshift == 12 or oa52 else 2
    table_mask = _OA_END - (1 << gshift)
    level = cfg.start_level
    input_bits = cfg.input_bits
    # The start-level table resolves input bits [input_bits-1 : shift], spanning every
    # concatenated table; its base is aligned to its size (the low TTB bits are treated as zero).
    shift = gshift + (3 - level) * stride
    entries = cfg.concatenated << stride
    if input_bits - shift < stride:
        entries = 1 << (input_bits - shift) if input_bits > shift else 1
    # With a 52-bit OA the start table is at least 64-byte aligned (IHI 0070 CD.TTB0).
    table = cfg.ttb & -(entries << 3 if not oa52 or entries >= 8 else 64)
    geometry = (
        cfg.stage, level, input_bits, stride, output_bits, oa52, first_block_level, table_mask, shift - 3,
        (entries - 1) << 3, table, ((1 << stride) - 1) << 3,
        # Whether a next-level table address can exceed the output size (a 4/16 KiB granule's
        # table descriptor holds bits [47:G] only).
        oa52 or output_bits < _OA_BITS,
    )  # fmt: skip
    object.__setattr__(cfg, "geometry", geometry)  # a derived cache on a frozen configuration
    return geometry


def check_permission(leaf: WalkLeaf, stage: int, is_write: bool, privileged: bool, instruction: bool) -> bool:
    """Whether ``leaf`` permits the access at ``stage``. Writes are always data (IHI 0070 §13.1.2).

    Stage 1: an unprivileged (EL0) data access needs AP[1]; a write needs AP[2] clear; an
    instruction fetch needs only execute permission for its privilege (AArch64 lets EL0 execute
    what it cannot read). Stage 2: S2AP read/write; an instruction fetch needs XN clear only.
    """
    if stage == 2:
        if is_write:
            return leaf.writable
        return leaf.executable if instruction else leaf.readable
    if is_write:
        return leaf.writable and (privileged or leaf.unpriv)
    if instruction:
        return leaf.priv_executable if privileged else leaf.executable
    return leaf.readable and (privileged or leaf.unpriv)
