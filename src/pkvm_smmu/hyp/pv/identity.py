"""``pv-identity`` (v3, "only DMA isolation"): the host switches each StreamID between blocked and
identity; the hyp builds every STE, the identity ones over the shared identity stage-2 (VMID 0)
that mirrors what the host may access.

Hypercalls (each argument validated, nothing raises, each traced by the hypercall interface and
by the STE it installs):

=========================================  ===================================================
``__pkvm_host_iommu_attach_identity``      ``(iommu, sid)``: S2-only STE on the identity stage-2
``__pkvm_host_iommu_attach_blocking``      ``(iommu, sid)``: ABORT STE
``__pkvm_host_iommu_caps``                 ``(iommu, what)``: IDENTITY | BLOCKING
=========================================  ===================================================

Errors: -ENODEV for an IOMMU index the hyp did not take over (or before pKVM is up), -EINVAL for a
StreamID beyond the SMMU's stream table, -ENOMEM when the pool has no page for an L2 table,
-ETIMEDOUT when CFGI_STE + CMD_SYNC did not complete. Both return only after the SMMU consumed the
CMD_SYNC, so the host can rely on the new configuration.
"""

from __future__ import annotations

import errno

from pkvm_smmu.arch.pv_iommu_abi import HVC_ATTACH_BLOCKING, HVC_ATTACH_IDENTITY, Caps
from pkvm_smmu.hyp.hypercalls import Arg
from pkvm_smmu.hyp.pv.driver import Hypercall, PvIommu
from pkvm_smmu.hyp.pv.smmu import abort_ste, s2_ste


class PvIdentityIommu(PvIommu):
    design = "pv-identity"
    caps_flags = Caps.IDENTITY | Caps.BLOCKING

    def hypercalls(self) -> list[Hypercall]:
        return [
            *super().hypercalls(),
            (HVC_ATTACH_IDENTITY, self.attach_identity, (Arg.U64, Arg.U64)),
            (HVC_ATTACH_BLOCKING, self.attach_blocking, (Arg.U64, Arg.U64)),
        ]

    def attach_identity(self, iommu_id: int, sid: int) -> int:
        smmu = self.smmu(iommu_id)
        idmap = self.iommu.idmap
        if smmu is None or idmap is None:
            return -errno.ENODEV
        if not smmu.sid_valid(sid):
            return -errno.EINVAL
        return smmu.install_ste(sid, s2_ste(idmap.config, idmap.root, 0), "attach_identity")

    def attach_blocking(self, iommu_id: int, sid: int) -> int:
        smmu = self.smmu(iommu_id)
        if smmu is None:
            return -errno.ENODEV
        if not smmu.sid_valid(sid):
            return -errno.EINVAL
        return smmu.install_ste(sid, abort_ste(), "attach_blocking")


__all__ = ["PvIdentityIommu"]
