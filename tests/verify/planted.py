"""Purpose-broken policies the fuzz tests must catch (registered in ``POLICIES`` by ``planted()``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pkvm_smmu.hyp.smmuv3 import POLICIES, IdentityS2, RegisterRule, ShadowHow, SmmuContext, V4Policy
from pkvm_smmu.hyp.smmuv3.policy import GBPA


class SteUntransformed(V4Policy):
    """The host's STE goes into the shadow stream table as it is: no identity stage 2."""

    name = "planted-ste"

    def transform_ste(self, smmu: SmmuContext, host_ste: int, s2: IdentityS2) -> tuple[int, ShadowHow]:
        return host_ste, ShadowHow.UNCHANGED


class GbpaPassThrough(V4Policy):
    """The host's GBPA reaches the SMMU."""

    name = "planted-gbpa"

    def gbpa_write(self, smmu: SmmuContext, value: int) -> int:
        smmu.write_reg(0x44, value)  # type: ignore[attr-defined]
        return value & ~GBPA.UPDATE.in_place_mask


class ByteAccessCrash(V4Policy):
    """Raises on a host value, as the hyp must never do: a 1-byte register access (Linux makes none)."""

    name = "planted-crash"

    def register_access(self, offset: int, size: int, is_write: bool) -> RegisterRule:
        if size == 1:
            raise ZeroDivisionError("planted")
        return super().register_access(offset, size, is_write)


PLANTED = {cls.name: cls for cls in (SteUntransformed, GbpaPassThrough, ByteAccessCrash)}


@contextmanager
def planted() -> Iterator[None]:
    """The planted policies registered for the duration (inherited by forked runs)."""
    POLICIES.update(PLANTED)
    try:
        yield
    finally:
        for name in PLANTED:
            POLICIES.pop(name, None)
