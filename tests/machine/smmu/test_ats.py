"""PCIe ATS through the SMMU (IHI 0070 §3.9.1, §5.2 STE.EATS, §7.3.6, §7.3.8, §13.6): Translation
Requests per effective EATS, Translated traffic with and without CR0.ATSCHK, split-stage ATS, and
CMD_ATC_INV reaching the endpoint's ATC."""

from __future__ import annotations

import os
import sys

from pkvm_smmu.arch.events import EventType
from pkvm_smmu.arch.strtab import CD, STE, Eats
from pkvm_smmu.machine.devices import DmaEndpoint, DmaFailure
from pkvm_smmu.machine.smmu.translate import AtsStatus
from pkvm_smmu.pgtable import IoPageTable, Prot

sys.path.insert(0, os.path.dirname(__file__))
from harness import RW, NestedStream, SmmuHarness, harness, map_pages, nested_stream

K4 = 4096
VA = 0x10_0000_0000


def _s1_stream(
    h: SmmuHarness, sid: int, eats: int, pages: int = 4, prot: int = RW
) -> tuple[IoPageTable, int]:
    pt = h.s1_table()
    buf = h.buffer(pages * K4)
    map_pages(pt, VA, buf, pages * K4, prot)
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt, asid=sid))
    h.write_ste(sid, h.ste_s1(cds, EATS=eats))
    return pt, buf


def _ats_ep(h: SmmuHarness, sid: int) -> DmaEndpoint:
    return DmaEndpoint(f"ats{sid}", h.smmu, sid, ats_capable=True)


def _nested_split(h: SmmuHarness) -> NestedStream:
    return nested_stream(h, sid=9, EATS=Eats.S1CHK)


# ---- Translation Requests ---------------------------------------------------------------------------


def test_eats0_translation_request_is_ur_with_event() -> None:
    h = harness()
    _s1_stream(h, 1, Eats.ABT)
    ep = _ats_ep(h, 1)
    response = ep.ats_translate(VA + 0x123, write=True)
    assert response.status is AtsStatus.UNSUPPORTED_REQUEST
    etype, f = h.one_event()
    assert etype is EventType.F_BAD_ATS_TREQ
    # §7.3.6: R is always 1 in a PCIe request, W == !NW, one STU requested, the page address.
    assert f["SID"] == 1 and f["SSV"] == 0 and f["INPUTADDR"] == VA
    assert f["R"] == 1 and f["W"] == 1 and f["X"] == 0 and f["P"] == 0 and f["SPAN"] == 1
    assert ep.atc_entries == {}
    # A DMA through the ATC fails without sending any traffic.
    result = ep.ats_write(VA, b"x")
    assert not result.ok and result.failure is DmaFailure.ATS_UNSUPPORTED


def test_eats0_request_with_pasid() -> None:
    h = harness()
    pt = h.s1_table()
    cds = h.cd_table(4)
    h.write_cd(cds, 2, h.cd(pt))
    h.write_ste(2, h.ste_s1(cds, cdmax=2, dss=1))
    _ats_ep(h, 2).ats_translate(VA, ssid=2, write=False, privileged=True)
    etype, f = h.one_event()
    assert etype is EventType.F_BAD_ATS_TREQ
    assert f["SSV"] == 1 and f["SSID"] == 2 and f["W"] == 0 and f["R"] == 1 and f["P"] == 1


def test_eats1_full_translation() -> None:
    h = harness()
    _, buf = _s1_stream(h, 3, Eats.TRANS)
    ep = _ats_ep(h, 3)
    response = ep.ats_translate(VA + K4 + 5)
    assert response.status is AtsStatus.SUCCESS
    assert response.output_address == buf + K4 and response.readable and response.writable
    assert ep.atc_lookup(VA + K4) is not None
    # Translated traffic uses the cached PA.
    assert ep.ats_write(VA + 2 * K4 - 4, b"12345678").ok
    assert h.read_mem(buf + 2 * K4 - 4, 8) == b"12345678"
    got = ep.ats_read(VA + 2 * K4 - 4, 8)
    assert got.ok and got.data == b"12345678"
    assert h.decoded_events() == []


def test_eats1_read_only_page_grants_read_only() -> None:
    h = harness()
    _s1_stream(h, 4, Eats.TRANS, prot=Prot.READ)
    ep = _ats_ep(h, 4)
    response = ep.ats_translate(VA, write=True)
    assert response.status is AtsStatus.SUCCESS and response.readable and not response.writable
    assert ep.ats_read(VA, 4).ok
    denied = ep.ats_write(VA, b"x")
    assert not denied.ok and denied.failure is DmaFailure.ATS_DENIED
    # §3.9.1: ATS translation failures are never recorded as SMMU events.
    assert h.decoded_events() == []


def test_translation_fault_gives_success_without_permissions_and_no_event() -> None:
    h = harness()
    _s1_stream(h, 5, Eats.TRANS)
    ep = _ats_ep(h, 5)
    response = ep.ats_translate(VA + 0x100_0000)  # unmapped
    assert response.status is AtsStatus.SUCCESS and not response.readable and not response.writable
    assert ep.atc_entries == {}
    assert h.decoded_events() == []


def test_configuration_error_gives_completer_abort_without_event() -> None:
    """§3.9.1.2: a TR meeting C_BAD_STE / C_BAD_CD / F_CD_FETCH completes with CA; the event is
    recorded only with CR2.REC_CFG_ATS (not implemented here, so never)."""
    h = harness()
    h.write_ste(6, h.ste_bypass() & ~STE.V.in_place_mask)
    assert _ats_ep(h, 6).ats_translate(VA).status is AtsStatus.COMPLETER_ABORT
    h.write_ste(7, h.ste_s1(0x1_0000_0000, EATS=Eats.TRANS))  # CD in unmapped PA
    assert _ats_ep(h, 7).ats_translate(VA).status is AtsStatus.COMPLETER_ABORT
    cds = h.cd_table()
    h.write_ste(8, h.ste_s1(cds, EATS=Eats.TRANS))  # CD V = 0
    assert _ats_ep(h, 8).ats_translate(VA).status is AtsStatus.COMPLETER_ABORT
    assert h.decoded_events() == []


def test_walk_external_abort_gives_completer_abort() -> None:
    """§3.9.1.2: F_WALK_EABT on a TR is a CA completion, not a permission-less success."""
    h = harness()
    pt = h.s1_table()
    cds = h.cd_table()
    h.write_cd(cds, 0, CD.TTB0.set_address(h.cd(pt), 0x1_0000_0000))
    h.write_ste(16, h.ste_s1(cds, EATS=Eats.TRANS))
    assert _ats_ep(h, 16).ats_translate(VA).status is AtsStatus.COMPLETER_ABORT
    assert h.decoded_events() == []


def test_config_abort_request_is_silent_ur() -> None:
    h = harness()
    h.write_ste(10, STE.encode(V=1, CONFIG=0, EATS=Eats.TRANS))
    assert _ats_ep(h, 10).ats_translate(VA).status is AtsStatus.UNSUPPORTED_REQUEST
    assert h.decoded_events() == []


def test_bypass_request_is_ur_with_event() -> None:
    """STE.Config == 0b100: EATS is IGNORED (effective 0b00), even 0b10, which is then not ILLEGAL."""
    h = harness()
    for sid, eats in ((11, Eats.TRANS), (12, Eats.S1CHK)):
        h.write_ste(sid, h.ste_bypass(EATS=eats))
        assert _ats_ep(h, sid).ats_translate(VA).status is AtsStatus.UNSUPPORTED_REQUEST
        etype, f = h.one_event()
        assert etype is EventType.F_BAD_ATS_TREQ and f["SID"] == sid
    buf = h.buffer()
    assert DmaEndpoint("dev", h.smmu, 12).write(buf, b"ok").ok  # the stream itself works


def test_eats3_without_dpt_behaves_as_eats0() -> None:
    h = harness()
    _, buf = _s1_stream(h, 13, Eats.TRANS_DPT)
    assert _ats_ep(h, 13).ats_translate(VA).status is AtsStatus.UNSUPPORTED_REQUEST
    assert h.one_event()[0] is EventType.F_BAD_ATS_TREQ
    assert DmaEndpoint("dev", h.smmu, 13).write(VA, b"ok").ok  # not an ILLEGAL STE
    assert h.read_mem(buf, 2) == b"ok"


def test_smmu_disabled_request_is_ur_with_event() -> None:
    h = harness()
    _s1_stream(h, 14, Eats.TRANS)
    h.enable(False)
    assert _ats_ep(h, 14).ats_translate(VA).status is AtsStatus.UNSUPPORTED_REQUEST
    etype, f = h.one_event()
    assert etype is EventType.F_BAD_ATS_TREQ and f["SID"] == 14


def test_stage1_skipped_by_s1dss_gives_identity() -> None:
    """§13.6.4: S1-only stream, no PASID, S1DSS=bypass: identity completion with R = W = 1."""
    h = harness()
    cds = h.cd_table(4)
    h.write_ste(15, h.ste_s1(cds, cdmax=2, dss=1, EATS=Eats.TRANS))
    response = _ats_ep(h, 15).ats_translate(0x8765_4000)
    assert response.status is AtsStatus.SUCCESS and response.output_address == 0x8765_4000
    assert response.readable and response.writable


# ---- Translated transactions -------------------------------------------------------------------------


def test_atschk0_lets_any_translated_address_through() -> None:
    """ATSCHK = 0 ("fast mode"): a Translated transaction reaches whatever PA it names, even from a
    stream with ATS disabled or an aborting STE. This is the hole the attack catalogue uses."""
    h = harness(atschk=False)
    secret = h.buffer()
    h.write_mem(secret, b"secret")
    h.write_ste(20, h.ste_abort())
    _s1_stream(h, 21, Eats.ABT)
    for sid in (20, 21, 0x55):  # aborting STE, EATS = 0, never-configured SID
        evil = DmaEndpoint("evil", h.smmu, sid)
        got = evil.issue_translated(secret, 6)
        assert got.ok and got.data == b"secret"
        assert evil.issue_translated(secret + 8, data=b"pwned").ok
    assert h.read_mem(secret + 8, 5) == b"pwned"
    assert h.decoded_events() == []


def test_atschk1_eats0_translated_is_forbidden() -> None:
    h = harness(atschk=True)
    secret = h.buffer()
    _s1_stream(h, 22, Eats.ABT)
    evil = DmaEndpoint("evil", h.smmu, 22)
    result = evil.issue_translated(secret + 0x18, data=b"pwned")
    assert not result.ok and result.failure is DmaFailure.ABORT
    assert h.read_mem(secret + 0x18, 5) == bytes(5)
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSL_FORBIDDEN
    assert f == {"SID": 22, "RNW": 0, "INPUTADDR": secret + 0x18}


def test_atschk1_bypass_translated_is_forbidden() -> None:
    h = harness(atschk=True)
    secret = h.buffer()
    h.write_ste(23, h.ste_bypass(EATS=Eats.TRANS))
    assert not DmaEndpoint("evil", h.smmu, 23).issue_translated(secret, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSL_FORBIDDEN and f["RNW"] == 1 and f["INPUTADDR"] == secret


def test_atschk1_config_errors_abort_translated_silently() -> None:
    h = harness(atschk=True)
    secret = h.buffer()
    h.write_ste(24, STE.encode(V=1, CONFIG=0, EATS=Eats.TRANS))  # Config abort: silently aborted
    h.write_ste(25, h.ste_bypass() & ~STE.V.in_place_mask)  # C_BAD_STE: recorded only with REC_CFG_ATS
    for sid in (24, 25):
        assert not DmaEndpoint("evil", h.smmu, sid).issue_translated(secret, 4).ok
    assert h.decoded_events() == []


def test_atschk1_eats1_translated_passes() -> None:
    h = harness(atschk=True)
    _, buf = _s1_stream(h, 26, Eats.TRANS)
    ep = _ats_ep(h, 26)
    assert ep.ats_write(VA + 0x10, b"via-atc").ok
    assert h.read_mem(buf + 0x10, 7) == b"via-atc"


def test_smmu_disabled_translated_is_forbidden() -> None:
    h = harness()
    secret = h.buffer()
    h.enable(False)
    assert not DmaEndpoint("evil", h.smmu, 27).issue_translated(secret, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSL_FORBIDDEN and f["SID"] == 27


# ---- split-stage ATS (EATS = 0b10) ----------------------------------------------------------------------


def test_split_stage_returns_ipa_and_translated_traffic_goes_through_stage2() -> None:
    h = harness(atschk=True)
    n = _nested_split(h)
    ep = _ats_ep(h, n.sid)
    response = ep.ats_translate(n.va + K4 + 0x40)
    assert response.status is AtsStatus.SUCCESS and response.readable and response.writable
    assert response.output_address == n.ipa + K4  # the stage-1 output, an IPA
    assert ep.ats_write(n.va + K4 + 0x40, b"split").ok
    assert h.read_mem(n.pa + K4 + 0x40, 5) == b"split"  # stage 2 translated the IPA
    assert h.decoded_events() == []


def test_split_stage_permissions_combine_both_stages() -> None:
    h = harness(atschk=True)
    n = _nested_split(h)
    n.s2.unmap(n.ipa, K4)
    map_pages(n.s2, n.ipa, n.pa, K4, Prot.READ)
    response = _ats_ep(h, n.sid).ats_translate(n.va, write=True)
    assert response.status is AtsStatus.SUCCESS and response.readable and not response.writable


def test_split_stage_translated_ipa_faults_at_stage2() -> None:
    h = harness(atschk=True)
    n = _nested_split(h)
    hole = n.ipa + 0x100_0000
    result = DmaEndpoint("evil", h.smmu, n.sid).issue_translated(hole, data=b"x")
    assert not result.ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION and f["S2"] == 1 and f["IPA"] == hole


def test_split_stage_without_atschk_behaves_as_eats0() -> None:
    h = harness(atschk=False)
    n = _nested_split(h)
    assert _ats_ep(h, n.sid).ats_translate(n.va).status is AtsStatus.UNSUPPORTED_REQUEST
    assert h.one_event()[0] is EventType.F_BAD_ATS_TREQ


def test_full_ats_nested_returns_pa() -> None:
    h = harness(atschk=True)
    n = nested_stream(h, sid=10, EATS=Eats.TRANS)
    response = _ats_ep(h, n.sid).ats_translate(n.va)
    assert response.status is AtsStatus.SUCCESS and response.output_address == n.pa


# ---- CMD_ATC_INV ---------------------------------------------------------------------------------------


def test_atc_inv_drops_endpoint_entries() -> None:
    h = harness()
    _s1_stream(h, 30, Eats.TRANS, pages=4)
    ep = _ats_ep(h, 30)
    for i in range(4):
        assert ep.ats_translate(VA + i * K4).status is AtsStatus.SUCCESS
    assert len(ep.atc_entries) == 4
    # Size 1: an 8 KB span aligned to its size, covering pages 2 and 3.
    assert h.atc_inv(30, VA + 3 * K4, size=1).name == "NONE"
    assert sorted(page for _, page in ep.atc_entries) == [VA >> 12, (VA >> 12) + 1]
    assert h.atc_inv(30, 0, size=52).name == "NONE"  # everything
    assert ep.atc_entries == {}


def test_atc_inv_pasid_scope() -> None:
    h = harness()
    pt = h.s1_table()
    map_pages(pt, VA, h.buffer(), K4)
    cds = h.cd_table(4)
    for ssid in (1, 2):
        h.write_cd(cds, ssid, h.cd(pt, asid=ssid))
    h.write_ste(31, h.ste_s1(cds, cdmax=2, dss=1, EATS=Eats.TRANS))
    ep = _ats_ep(h, 31)
    for ssid in (1, 2):
        assert ep.ats_translate(VA, ssid=ssid).status is AtsStatus.SUCCESS
    h.atc_inv(31, VA, size=0, ssid=1)
    assert list(ep.atc_entries) == [(2, VA >> 12)]
    ep.ats_translate(VA, ssid=1)
    h.atc_inv(31, VA, size=0)  # without a PASID: every PASID's entries in the range
    assert ep.atc_entries == {}


def test_atc_inv_other_stream_untouched() -> None:
    h = harness()
    _s1_stream(h, 32, Eats.TRANS)
    _s1_stream(h, 33, Eats.TRANS)
    a, b = _ats_ep(h, 32), _ats_ep(h, 33)
    a.ats_translate(VA)
    b.ats_translate(VA)
    h.atc_inv(32)
    assert a.atc_entries == {} and len(b.atc_entries) == 1


def test_atc_keeps_stale_translation_until_invalidated() -> None:
    """The ATC is the device's: changing the tables (even with TLBI + SYNC) does not reach it;
    only CMD_ATC_INV does (§3.9.1, §4.5.1)."""
    h = harness()
    pt, buf = _s1_stream(h, 34, Eats.TRANS, pages=2)
    ep = _ats_ep(h, 34)
    assert ep.ats_write(VA, b"old").ok
    pt.unmap(VA, K4)
    map_pages(pt, VA, buf + K4, K4)
    h.tlbi_nh_all()
    assert ep.ats_write(VA, b"new").ok
    assert h.read_mem(buf, 3) == b"new"  # still the old page
    h.atc_inv(34, VA, size=0)
    assert ep.ats_write(VA, b"NEW").ok
    assert h.read_mem(buf + K4, 3) == b"NEW" and h.read_mem(buf, 3) == b"new"
