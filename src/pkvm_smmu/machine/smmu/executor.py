"""Executing one command from the Non-secure command queue (IHI 0070 §4.1–§4.7).

Each command either has its architected effect on the configuration cache, the TLB, the ATS
endpoints or the CMD_SYNC completion signal, or is CERROR_ILL: a reserved opcode, a Secure-only
command, SSec=1, a command for a feature this SMMU does not implement, or an ILLEGAL parameter.

CONSTRAINED UNPREDICTABLE choices made here:
- RES0 fields of commands are not checked (they are ignored).
- TLBI_NH_* on an SMMU without stage 2: the RES0 VMID is taken as 0.
- CMD_ATC_INV with Size > 52 is CERROR_ILL. CMD_ATC_INV and CMD_PREFETCH_CONFIG with SSV=1 when
  SubstreamIDs are not implemented behave as SSV=0. CMD_PREFETCH_ADDR prefetches nothing.
- Out-of-range StreamID/SubstreamID parameters are passed on unchanged (they match nothing cached).
- A CERROR_ATC_INV_SYNC reports the failed ATC invalidations once: the SMMU gives up on them, so
  re-issuing the CMD_SYNC after the acknowledgement completes unless a new ATC_INV fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pkvm_smmu.arch.commands import (
    CMD_ATC_INV,
    CMD_CFGI_CD,
    CMD_CFGI_STE,
    CMD_CFGI_STE_RANGE,
    CMD_COMMON,
    CMD_PREFETCH_CONFIG,
    CMD_PRI_RESP,
    CMD_SYNC,
    CMD_TLBI_EL2_ASID,
    CMD_TLBI_NH_ALL,
    CMD_TLBI_NH_ASID,
    CMD_TLBI_NH_VA,
    CMD_TLBI_S2_IPA,
    COMMAND_LAYOUTS,
    Opcode,
    PriResp,
    SyncCs,
    TlbiTg,
    pretty_command,
)
from pkvm_smmu.arch.registers import IDR5, CmdqError

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_MASK128 = (1 << 128) - 1
_SSEC_BIT = CMD_COMMON.SSEC.in_place_mask
_SSEC_OPCODES = frozenset(
    op for op, layout in COMMAND_LAYOUTS.items() if any(f.name == "SSEC" for f in layout.FIELDS)
)
_GRANULE = {TlbiTg.G4K: 4096, TlbiTg.G16K: 16384, TlbiTg.G64K: 65536}
_ATC_SIZE_ALL = 52  # a 2^64-byte span

Handler = Callable[[int], CmdqError]


class AtcClient(Protocol):
    """A PCIe ATS endpoint's Address Translation Cache, as the SMMU's ATC_INV reaches it."""

    def atc_invalidate(self, ssid: int | None, address: int, size: int) -> bool:
        """Invalidate ``[address, address + size)``; False if the endpoint did not complete it."""
        ...


class CommandExecutor:
    """``execute(command)`` for each consumed command; ``complete()`` once CONS has moved past it."""

    def __init__(self, smmu: SmmuV3) -> None:
        self.smmu = smmu
        f = smmu.features
        self._vmid_mask = 0xFFFF if f.vmid16 else 0xFF
        self._asid_mask = 0xFFFF if f.asid16 else 0xFF
        self._scale_mask = 0x3F if IDR5.DS.get(f.idr5()) else 0x1F
        self._atc_failed = False
        self._completion: tuple[SyncCs, int, int] | None = None
        self._handlers = self._build_handlers()

    def _build_handlers(self) -> dict[int, Handler]:
        f = self.smmu.features
        h: dict[int, Handler] = {
            Opcode.PREFETCH_CONFIG: self._prefetch_config,
            Opcode.PREFETCH_ADDR: self._nop,  # a hint; no TLB prefetch is modeled
            Opcode.CFGI_STE: self._cfgi_ste,
            Opcode.CFGI_STE_RANGE: self._cfgi_ste_range,
            Opcode.TLBI_NSNH_ALL: self._tlbi_nsnh_all,
            Opcode.SYNC: self._sync,
        }
        if f.stage1:
            h[Opcode.CFGI_CD] = self._cfgi_cd
            h[Opcode.CFGI_CD_ALL] = self._cfgi_cd_all
            h[Opcode.TLBI_NH_ALL] = self._tlbi_nh_all
            h[Opcode.TLBI_NH_ASID] = self._tlbi_nh_asid
            h[Opcode.TLBI_NH_VA] = self._tlbi_nh_va
            h[Opcode.TLBI_NH_VAA] = self._tlbi_nh_vaa
            if f.hyp:
                h[Opcode.TLBI_EL2_ALL] = self._tlbi_el2_all
                h[Opcode.TLBI_EL2_ASID] = self._tlbi_el2_asid
                h[Opcode.TLBI_EL2_VA] = self._tlbi_el2_va
                h[Opcode.TLBI_EL2_VAA] = self._tlbi_el2_vaa
        if f.stage2:
            h[Opcode.TLBI_S12_VMALL] = self._tlbi_s12_vmall
            h[Opcode.TLBI_S2_IPA] = self._tlbi_s2_ipa
        if f.ats:
            h[Opcode.ATC_INV] = self._atc_inv
        if f.pri:
            h[Opcode.PRI_RESP] = self._pri_resp
        if f.stall_model != 0b01:
            h[Opcode.RESUME] = self._nop  # no transaction is ever stalled in this model
            h[Opcode.STALL_TERM] = self._nop
        # Everything else is CERROR_ILL: reserved and IMPLEMENTATION DEFINED opcodes, the EL3 and
        # Secure commands (Secure queue only), CFGI_VMS_PIDM (no MPAM), DPTI_* (no DPT).
        return h

    # ---- entry points ------------------------------------------------------------------------
    def execute(self, command: int) -> CmdqError:
        command &= _MASK128
        opcode = command & 0xFF
        handler = self._handlers.get(opcode)
        if handler is None or (opcode in _SSEC_OPCODES and command & _SSEC_BIT):
            error = CmdqError.ILL
        else:
            error = handler(command)
        trace = self.smmu.trace
        if trace.enabled:
            try:
                name = Opcode(opcode).name
            except ValueError:
                name = f"{opcode:#04x}"
            trace.emit(self.smmu.name, "cmd", opcode=name, command=pretty_command(command), error=error.name)
        return error

    def complete(self) -> None:
        """Send the completion signal of the CMD_SYNC just consumed, if it asked for one."""
        completion, self._completion = self._completion, None
        if completion is None:
            return
        cs, msi_address, msi_data = completion
        if cs is SyncCs.IRQ:
            self.smmu.interrupts.cmd_sync(msi_address, msi_data)
        elif cs is SyncCs.SEV and self.smmu.features.sev:
            self.smmu.signal_sev()

    # ---- helpers -----------------------------------------------------------------------------
    def _vmid(self, command: int) -> int:
        if not self.smmu.features.stage2:
            return 0
        return CMD_TLBI_NH_ALL.VMID.get(command) & self._vmid_mask

    def _asid(self, command: int) -> int:
        return CMD_TLBI_NH_ASID.ASID.get(command) & self._asid_mask

    def _range(self, command: int) -> tuple[int, int, bool, int] | None:
        """(address, size, leaf, ttl) of an address-based TLBI; None if the parameters are ILLEGAL.

        The address field is at the same place for VA and IPA forms; the IPA form's is narrower,
        so the IPA handler masks it.
        """
        layout = CMD_TLBI_NH_VA
        address = layout.ADDR.get_address(command)
        leaf = bool(layout.LEAF.get(command))
        tg = layout.TG.get(command)
        if not self.smmu.features.ril or tg == TlbiTg.ANY:
            return address, 0, leaf, 0  # no range and no TTL hint (the fields are RES0)
        ttl = layout.TTL.get(command)
        if tg == TlbiTg.G16K and ttl == 1 and self._scale_mask == 0x1F:
            ttl = 0  # reserved without DS: treated as "any level"
        num = layout.NUM.get(command)
        scale = layout.SCALE.get(command) & self._scale_mask
        if num == 0 and scale == 0 and ttl == 0:
            return None  # reserved encoding (§4.4.1.1)
        return address, (num + 1) * (1 << scale) * _GRANULE[TlbiTg(tg)], leaf, ttl

    @staticmethod
    def _nop(command: int) -> CmdqError:
        return CmdqError.NONE

    # ---- prefetch and configuration invalidation -----------------------------------------------
    def _prefetch_config(self, command: int) -> CmdqError:
        smmu = self.smmu
        if smmu.smmu_enabled:
            layout = CMD_PREFETCH_CONFIG
            ssv = layout.SSV.get(command) and smmu.features.ssid_bits > 0
            ssid = layout.SSID.get(command) if ssv else None
            smmu.config_cache.prefetch(layout.SID.get(command), ssid)
        return CmdqError.NONE

    def _cfgi_ste(self, command: int) -> CmdqError:
        self.smmu.config_cache.invalidate_ste(
            CMD_CFGI_STE.SID.get(command), bool(CMD_CFGI_STE.LEAF.get(command))
        )
        return CmdqError.NONE

    def _cfgi_ste_range(self, command: int) -> CmdqError:
        range_ = CMD_CFGI_STE_RANGE.RANGE.get(command)
        if range_ == 31:
            self.smmu.config_cache.invalidate_all()  # CMD_CFGI_ALL
        else:
            self.smmu.config_cache.invalidate_ste_range(CMD_CFGI_STE_RANGE.SID.get(command), range_)
        return CmdqError.NONE

    def _cfgi_cd(self, command: int) -> CmdqError:
        layout = CMD_CFGI_CD
        self.smmu.config_cache.invalidate_cd(
            layout.SID.get(command), layout.SSID.get(command), bool(layout.LEAF.get(command))
        )
        return CmdqError.NONE

    def _cfgi_cd_all(self, command: int) -> CmdqError:
        self.smmu.config_cache.invalidate_cd_all(CMD_CFGI_STE.SID.get(command))
        return CmdqError.NONE

    # ---- TLB invalidation --------------------------------------------------------------------
    def _tlbi_nh_all(self, command: int) -> CmdqError:
        self.smmu.tlb.invalidate_nh_all(self._vmid(command))
        return CmdqError.NONE

    def _tlbi_nh_asid(self, command: int) -> CmdqError:
        self.smmu.tlb.invalidate_nh_asid(self._vmid(command), self._asid(command))
        return CmdqError.NONE

    def _tlbi_nh_va(self, command: int) -> CmdqError:
        parsed = self._range(command)
        if parsed is None:
            return CmdqError.ILL
        address, size, leaf, ttl = parsed
        self.smmu.tlb.invalidate_nh_va(self._vmid(command), self._asid(command), address, size, leaf, ttl)
        return CmdqError.NONE

    def _tlbi_nh_vaa(self, command: int) -> CmdqError:
        parsed = self._range(command)
        if parsed is None:
            return CmdqError.ILL
        address, size, leaf, ttl = parsed
        self.smmu.tlb.invalidate_nh_vaa(self._vmid(command), address, size, leaf, ttl)
        return CmdqError.NONE

    def _tlbi_el2_all(self, command: int) -> CmdqError:
        self.smmu.tlb.invalidate_el2_all()
        return CmdqError.NONE

    def _tlbi_el2_asid(self, command: int) -> CmdqError:
        self.smmu.tlb.invalidate_el2_asid(CMD_TLBI_EL2_ASID.ASID.get(command) & self._asid_mask)
        return CmdqError.NONE

    def _tlbi_el2_va(self, command: int) -> CmdqError:
        parsed = self._range(command)
        if parsed is None:
            return CmdqError.ILL
        address, size, leaf, ttl = parsed
        self.smmu.tlb.invalidate_el2_va(self._asid(command), address, size, leaf, ttl)
        return CmdqError.NONE

    def _tlbi_el2_vaa(self, command: int) -> CmdqError:
        parsed = self._range(command)
        if parsed is None:
            return CmdqError.ILL
        address, size, leaf, ttl = parsed
        self.smmu.tlb.invalidate_el2_vaa(address, size, leaf, ttl)
        return CmdqError.NONE

    def _tlbi_s12_vmall(self, command: int) -> CmdqError:
        self.smmu.tlb.invalidate_s12_vmall(self._vmid(command))
        return CmdqError.NONE

    def _tlbi_s2_ipa(self, command: int) -> CmdqError:
        parsed = self._range(command)
        if parsed is None:
            return CmdqError.ILL
        _, size, leaf, ttl = parsed
        address = CMD_TLBI_S2_IPA.ADDR.get_address(command)  # IPA[55:12]
        self.smmu.tlb.invalidate_s2_ipa(self._vmid(command), address, size, leaf, ttl)
        return CmdqError.NONE

    def _tlbi_nsnh_all(self, command: int) -> CmdqError:
        self.smmu.tlb.invalidate_nsnh_all()
        return CmdqError.NONE

    # ---- ATS and PRI -------------------------------------------------------------------------
    def _atc_inv(self, command: int) -> CmdqError:
        layout = CMD_ATC_INV
        size = layout.SIZE.get(command)
        if size > _ATC_SIZE_ALL:
            return CmdqError.ILL
        smmu = self.smmu
        if not smmu.smmu_enabled:
            return CmdqError.NONE  # IGNORED while SMMUEN=0
        span = 1 << (12 + size)
        address = layout.ADDR.get_address(command) & ~(span - 1)  # the span is aligned to its size
        ssv = layout.SSV.get(command) and smmu.features.ssid_bits > 0
        ssid = layout.SSID.get(command) if ssv else None
        endpoint = smmu.ats_endpoints.get(layout.SID.get(command))
        if endpoint is not None and not endpoint.atc_invalidate(ssid, address, span):
            self._atc_failed = True
        return CmdqError.NONE

    def _pri_resp(self, command: int) -> CmdqError:
        if CMD_PRI_RESP.RESP.get(command) not in tuple(PriResp):
            return CmdqError.ILL
        return CmdqError.NONE  # no page request is outstanding in this model

    # ---- synchronisation ---------------------------------------------------------------------
    def _sync(self, command: int) -> CmdqError:
        layout = CMD_SYNC
        cs = layout.CS.get(command)
        if cs not in tuple(SyncCs):
            return CmdqError.ILL
        if self._atc_failed:
            # CONS stays on the CMD_SYNC and no completion is signalled.
            self._atc_failed = False
            return CmdqError.ATC_INV_SYNC
        self._completion = (SyncCs(cs), layout.MSIADDR.get_address(command), layout.MSIDATA.get(command))
        return CmdqError.NONE
