"""An SMMU instance's implemented feature set, and the ID registers derived from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pkvm_smmu.arch.registers import AIDR, IDR0, IDR1, IDR3, IDR5, IIDR, oas_encoding

GRANULE_SIZES = (4096, 16384, 65536)


@dataclass(frozen=True)
class SmmuFeatures:
    """What an implementation supports. Defaults resemble a modern server SMMUv3.2."""

    stage1: bool = True
    stage2: bool = True
    granules: frozenset[int] = field(default_factory=lambda: frozenset(GRANULE_SIZES))
    oas_bits: int = 48
    sid_bits: int = 16
    ssid_bits: int = 20
    two_level_strtab: bool = True
    two_level_cd: bool = True
    coherent: bool = True  # COHACC
    ats: bool = True
    msi: bool = True
    sev: bool = True
    ril: bool = True  # range invalidation
    bbml: int = 2
    hyp: bool = True  # EL2 StreamWorld and TLBI_EL2_* commands
    vmid16: bool = True
    asid16: bool = True
    # Terminate-only: this model does not stall transactions (STALL_MODEL=0b01).
    stall_model: int = 1
    term_model: int = 0  # 0: terminate may be RAZ/WI (CD.A / STE fault config decides)
    cmdq_log2_max: int = 19
    eventq_log2_max: int = 19
    priq_log2_max: int = 0  # no PRI queue modeled
    arch_minor: int = 2  # SMMUv3.2
    product_id: int = 0x5B0
    implementer: int = 0x43B  # Arm

    def __post_init__(self) -> None:
        bad = set(self.granules) - set(GRANULE_SIZES)
        if bad or not self.granules:
            raise ValueError(
                f"granules must be a non-empty subset of {GRANULE_SIZES}, got {sorted(self.granules)}"
            )
        if not (self.stage1 or self.stage2):
            raise ValueError("an SMMU implements at least one translation stage")
        oas_encoding(self.oas_bits)  # rejects sizes the architecture cannot encode
        if not 0 <= self.sid_bits <= 32 or not 0 <= self.ssid_bits <= 20:
            raise ValueError("sid_bits must be 0..32 and ssid_bits 0..20")
        for name in ("cmdq_log2_max", "eventq_log2_max", "priq_log2_max"):
            if not 0 <= getattr(self, name) <= 19:
                raise ValueError(f"{name} must be 0..19")

    @property
    def ias_bits(self) -> int:
        """Input address size: OAS for an AArch64-only implementation (no AArch32 tables)."""
        return self.oas_bits

    @property
    def pri(self) -> bool:
        return self.priq_log2_max > 0

    def idr0(self) -> int:
        return IDR0.encode(
            S2P=self.stage2,
            S1P=self.stage1,
            TTF=0b10,  # AArch64 tables only
            COHACC=self.coherent,
            HYP=self.hyp and self.stage1,  # EL2 contexts are stage-1 contexts
            ATS=self.ats,
            ASID16=self.asid16,
            MSI=self.msi,
            SEV=self.sev,
            PRI=self.pri,
            VMID16=self.vmid16,
            CD2L=self.two_level_cd,
            TTENDIAN=0b10,  # little-endian only
            STALL_MODEL=self.stall_model,
            TERM_MODEL=self.term_model,
            ST_LEVEL=1 if self.two_level_strtab else 0,
        )

    def idr1(self) -> int:
        return IDR1.encode(
            SIDSIZE=self.sid_bits,
            SSIDSIZE=self.ssid_bits,
            PRIQS=self.priq_log2_max,
            EVENTQS=self.eventq_log2_max,
            CMDQS=self.cmdq_log2_max,
        )

    def idr3(self) -> int:
        return IDR3.encode(RIL=self.ril, BBML=self.bbml)

    def idr5(self) -> int:
        return IDR5.encode(
            OAS=oas_encoding(self.oas_bits),
            GRAN4K=4096 in self.granules,
            GRAN16K=16384 in self.granules,
            GRAN64K=65536 in self.granules,
        )

    def iidr(self) -> int:
        return IIDR.encode(IMPLEMENTER=self.implementer, PRODUCTID=self.product_id)

    def aidr(self) -> int:
        return AIDR.encode(ARCHMAJORREV=0, ARCHMINORREV=self.arch_minor)
