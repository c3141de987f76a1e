"""STE and CD decoding and validation (IHI 0070 §5.2, §5.4): a raw structure becomes either a
decoded configuration or the reason it is ILLEGAL. SMMU-specific; the walker stays generic."""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.arch.registers import OAS_BITS
from pkvm_smmu.arch.strtab import CD, STE, Eats, SteConfig, Strw
from pkvm_smmu.arch.vmsa import Granule, granule_from_tg0, granule_from_tg1
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.types import WalkConfig

WORLD_EL1 = "el1"
WORLD_EL2 = "el2"
_T0SZ_MAX = 39  # without IDR3.STT
_VA_BITS_MAX = 48  # 4K/16K without DS; 64K without LVA


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """A fetched STE as the SMMU uses it. ``illegal`` is None for a valid, legal STE."""

    sid: int
    ste: int
    address: int  # PA the STE was read from
    sources: tuple[int, ...]  # PAs of every structure read to reach it (L1STD, STE)
    illegal: str | None
    config: SteConfig
    s1: bool = False
    s2: bool = False
    s1_context_ptr: int = 0
    s1_fmt: int = 0
    s1_cdmax: int = 0
    s1_dss: int = 0
    vmid: int = 0
    s2_walk: WalkConfig | None = None
    s2_record: bool = False
    s2_ptw: bool = False
    eats: int = 0
    world: str = WORLD_EL1
    shcfg: int = 0
    privcfg: int = 0
    instcfg: int = 0


@dataclass(frozen=True, slots=True)
class ContextConfig:
    """A fetched CD. ``illegal`` is None for a valid, legal CD."""

    sid: int
    index: int  # CD table index (SubstreamID, or 0)
    cd: int
    address: int  # PA the CD was read from
    sources: tuple[int, ...]
    illegal: str | None
    asid: int | None = None  # None: EL2 StreamWorld, ASID ignored
    ttb0: WalkConfig | None = None  # None when EPD0 (translation faults without a walk)
    ttb1: WalkConfig | None = None
    tbi0: bool = False
    tbi1: bool = False
    record: bool = False  # CD.R
    abort: bool = False  # CD.A
    mair: int = 0


def effective_oas(code: int, features: SmmuFeatures) -> int:
    """An IPS/S2PS encoding capped by the implemented OAS (reserved encodings behave as OAS)."""
    return min(OAS_BITS.get(code, features.oas_bits), features.oas_bits)


def decode_ste(
    sid: int, ste: int, address: int, sources: tuple[int, ...], features: SmmuFeatures
) -> StreamConfig:
    """Decode an STE; ILLEGAL combinations (§5.2.2) give ``illegal`` set and config ABORT."""
    config_raw = STE.CONFIG.get(ste)

    def illegal(reason: str) -> StreamConfig:
        return StreamConfig(sid, ste, address, sources, reason, SteConfig.ABORT)

    if not STE.V.get(ste):
        return illegal("V=0")
    if config_raw < SteConfig.BYPASS:  # 0b000 abort; 0b001..0b011 reserved, behave as abort
        return StreamConfig(sid, ste, address, sources, None, SteConfig.ABORT)
    config = SteConfig(config_raw)
    s1 = config in (SteConfig.S1_TRANS, SteConfig.NESTED)
    s2 = config in (SteConfig.S2_TRANS, SteConfig.NESTED)
    if s1 and not features.stage1:
        return illegal("stage 1 selected but not implemented")
    if s2 and not features.stage2:
        return illegal("stage 2 selected but not implemented")

    s1_cdmax = STE.S1CDMAX.get(ste)
    s1_fmt = STE.S1FMT.get(ste)
    s1_dss = STE.S1DSS.get(ste)
    if s1:
        if s1_cdmax > features.ssid_bits:
            return illegal(f"S1CDMax {s1_cdmax} > SSIDSIZE {features.ssid_bits}")
        if s1_cdmax:
            if s1_fmt == 3:
                s1_fmt = 0  # reserved, behaves as linear
            if s1_fmt and not features.two_level_cd:
                return illegal("two-level CD table without IDR0.CD2L")
            if s1_dss == 3:
                return illegal("S1DSS reserved value")
        if STE.S1STALLD.get(ste) and features.stall_model != 0:
            return illegal("S1STALLD set but the stall model is not configurable")

    eats = STE.EATS.get(ste) if features.ats else 0
    if config == SteConfig.BYPASS or eats == Eats.TRANS_DPT:
        # EATS is IGNORED when Config[1:0] == 0b00 (effective 0b00), and 0b11 is reserved and
        # behaves as 0b00 without SMMU_IDR3.DPT (§5.2 STE.EATS): neither makes the STE ILLEGAL.
        eats = Eats.ABT
    if eats == Eats.S1CHK and config != SteConfig.NESTED:
        return illegal("EATS=S1CHK requires nested configuration")

    world = WORLD_EL1
    if not s2:
        strw = STE.STRW.get(ste)
        if strw == Strw.EL2 and features.hyp and features.stage1:
            world = WORLD_EL2
        elif strw != Strw.NSEL1:
            return illegal(f"STRW {strw:#b} not valid for a Non-secure stream")

    vmid = STE.S2VMID.get(ste) if features.stage2 else 0
    if not features.vmid16:
        vmid &= 0xFF
    s2_walk = None
    if s2:
        result = _decode_s2(ste, features)
        if isinstance(result, str):
            return illegal(result)
        s2_walk = result

    return StreamConfig(
        sid,
        ste,
        address,
        sources,
        None,
        config,
        s1=s1,
        s2=s2,
        s1_context_ptr=STE.S1CONTEXTPTR.get_address(ste),
        s1_fmt=s1_fmt,
        s1_cdmax=s1_cdmax,
        s1_dss=s1_dss,
        vmid=vmid,
        s2_walk=s2_walk,
        s2_record=bool(STE.S2R.get(ste)),
        s2_ptw=bool(STE.S2PTW.get(ste)),
        eats=eats,
        world=world,
        shcfg=STE.SHCFG.get(ste),
        privcfg=STE.PRIVCFG.get(ste),
        instcfg=STE.INSTCFG.get(ste),
    )


def _decode_s2(ste: int, features: SmmuFeatures) -> WalkConfig | str:
    granule = granule_from_tg0(STE.S2TG.get(ste))
    if granule is None or granule.size not in features.granules:
        return f"S2TG {STE.S2TG.get(ste)} not supported"
    if not STE.S2AA64.get(ste):
        return "S2AA64=0 (AArch32 tables not implemented)"
    if STE.S2ENDI.get(ste):
        return "S2ENDI=1 (big-endian tables not implemented)"
    if STE.S2HA.get(ste) or STE.S2HD.get(ste):
        return "S2HA/S2HD without HTTU"
    if STE.S2S.get(ste) and features.stall_model == 1:
        return "S2S=1 with a terminate-only stall model"
    t0sz = STE.S2T0SZ.get(ste)
    ias = 64 - t0sz
    if t0sz > _T0SZ_MAX or ias > min(features.ias_bits, _VA_BITS_MAX):
        return f"S2T0SZ {t0sz} out of range"
    start_level = granule.s2_start_level(STE.S2SL0.get(ste))
    if start_level is None:
        return f"S2SL0 {STE.S2SL0.get(ste)} reserved"
    concatenated = granule.s2_concatenated_tables(ias, start_level)
    if concatenated is None:
        return f"S2SL0/S2T0SZ/S2TG inconsistent (start level {start_level}, {ias}-bit IPA)"
    output_bits = min(effective_oas(STE.S2PS.get(ste), features), _VA_BITS_MAX)
    ttb = _aligned_ttb(STE.S2TTB.get_address(ste), granule, ias, start_level, concatenated)
    if ttb >> output_bits:
        return f"S2TTB {ttb:#x} beyond the {output_bits}-bit output size"
    return WalkConfig(
        stage=2,
        granule=granule,
        ttb=ttb,
        start_level=start_level,
        concatenated=concatenated,
        input_bits=ias,
        output_bits=output_bits,
        affd=bool(STE.S2AFFD.get(ste)),
        hierarchical_attrs=False,
    )


def _aligned_ttb(ttb: int, granule: Granule, ia_bits: int, start_level: int, concatenated: int) -> int:
    """Table base with the bits below the start table's size treated as zero."""
    index_bits = granule.start_level_index_bits(ia_bits, start_level)
    table_bytes = max(64, (1 << index_bits) * 8) if concatenated <= 1 else concatenated * granule.size
    return ttb & ~(table_bytes - 1)


def decode_cd(
    sid: int,
    index: int,
    cd: int,
    address: int,
    sources: tuple[int, ...],
    features: SmmuFeatures,
    world: str,
) -> ContextConfig:
    """Decode a CD (§5.4); ILLEGAL combinations give ``illegal`` set."""

    def illegal(reason: str) -> ContextConfig:
        return ContextConfig(sid, index, cd, address, sources, reason)

    if not CD.V.get(cd):
        return illegal("V=0")
    if not CD.AA64.get(cd):
        return illegal("AA64=0 (AArch32 tables not implemented)")
    if CD.ENDI.get(cd):
        return illegal("ENDI=1 (big-endian tables not implemented)")
    if CD.HA.get(cd) or CD.HD.get(cd):
        return illegal("HA/HD without HTTU")
    if CD.S.get(cd) and features.stall_model == 1:
        return illegal("S=1 with a terminate-only stall model")
    asid: int | None = CD.ASID.get(cd)
    if asid is not None and asid >> 8 and not features.asid16:
        return illegal("ASID[15:8] set without ASID16")
    regime = _Stage1Regime(
        output_bits=min(effective_oas(CD.IPS.get(cd), features), _VA_BITS_MAX),
        affd=bool(CD.AFFD.get(cd)),
        wxn=bool(CD.WXN.get(cd)),
        # EL2 (non-E2H) has a single privilege level.
        single_privilege=world == WORLD_EL2,
    )

    ttb0 = None
    if not CD.EPD0.get(cd):
        result = _decode_ttb(
            granule_from_tg0(CD.TG0.get(cd)),
            CD.T0SZ.get(cd),
            CD.TTB0.get_address(cd),
            regime,
            features,
        )
        if isinstance(result, str):
            return illegal("TTB0: " + result)
        ttb0 = result
    ttb1 = None
    if world == WORLD_EL2:
        asid = None  # EL2 (non-E2H) has only TTB0 and no ASIDs
    elif not CD.EPD1.get(cd):
        result = _decode_ttb(
            granule_from_tg1(CD.TG1.get(cd)),
            CD.T1SZ.get(cd),
            CD.TTB1.get_address(cd),
            regime,
            features,
        )
        if isinstance(result, str):
            return illegal("TTB1: " + result)
        ttb1 = result

    return ContextConfig(
        sid,
        index,
        cd,
        address,
        sources,
        None,
        asid=asid,
        ttb0=ttb0,
        ttb1=ttb1,
        tbi0=bool(CD.TBI0.get(cd)),
        tbi1=bool(CD.TBI1.get(cd)) and world != WORLD_EL2,
        record=bool(CD.R.get(cd)),
        abort=bool(CD.A.get(cd)) or features.term_model == 1,
        mair=CD.MAIR0.get(cd) | CD.MAIR1.get(cd) << 32,
    )


@dataclass(frozen=True, slots=True)
class _Stage1Regime:
    """CD fields shared by the TTB0 and TTB1 walks."""

    output_bits: int
    affd: bool
    wxn: bool
    single_privilege: bool


def _decode_ttb(
    granule: Granule | None, tsz: int, ttb: int, regime: _Stage1Regime, features: SmmuFeatures
) -> WalkConfig | str:
    if granule is None or granule.size not in features.granules:
        return "granule not supported"
    ia_bits = 64 - tsz
    if tsz > _T0SZ_MAX or ia_bits > _VA_BITS_MAX:
        return f"TxSZ {tsz} out of range"
    start_level = granule.s1_start_level(ia_bits)
    if start_level is None:
        return f"no start level for a {ia_bits}-bit input"
    ttb = _aligned_ttb(ttb, granule, ia_bits, start_level, 1)
    if ttb >> regime.output_bits:
        return f"TTB {ttb:#x} beyond the {regime.output_bits}-bit IPS"
    return WalkConfig(
        stage=1,
        granule=granule,
        ttb=ttb,
        start_level=start_level,
        concatenated=1,
        input_bits=ia_bits,
        output_bits=regime.output_bits,
        affd=regime.affd,
        single_privilege=regime.single_privilege,
        wxn=regime.wxn,
    )
