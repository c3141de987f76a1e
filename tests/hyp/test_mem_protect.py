"""Page ownership: every transition from every relevant state, with pKVM's results and resulting states.

Expected values come from pKVM's rules (``mem_protect.c`` and its ownership selftest, v4 patches 01
and 02), not from running the model: a transition checks host state, hyp state and guest state, and
refuses with -EPERM on a mismatch, -EBUSY on a pinned page (unshare) or a hyp-mapped page (MMIO
donation), -ENOENT for an unmapped guest page (unshare), -EINVAL for a range that is not within one
memory or non-memory run or lies outside the PA range.
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EBUSY, EEXIST, EINVAL, ENOENT, EPERM

import pytest

from pkvm_smmu.hyp.contracts import (
    HOST,
    HYP,
    PAGE_HYP,
    PAGE_HYP_DEVICE,
    PAGE_HYP_NC,
    KvmPgtableProt,
    Owner,
    PageState,
    guest,
)
from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, SystemBus
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.trace import RecordingSink, TraceBus, TraceEvent

OWNED = PageState.OWNED
SO = PageState.SHARED_OWNED
SB = PageState.SHARED_BORROWED
NOPAGE = PageState.NOPAGE

RAM_BASE = 0x4000_0000
RAM_PFN = RAM_BASE >> 12
RAM2_BASE = 0x8000_0000  # a second memory region, 1 MiB, followed by a hole
MMIO_BASE = 0x0900_0000
MMIO_PFN = MMIO_BASE >> 12
HOLE_PFN = 0x0800_0000 >> 12
VM_A, VM_B = 0x1000, 0x1001
G0, G1 = 0x10, 0x11
RW = KvmPgtableProt.R | KvmPgtableProt.W


class NullDevice:
    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        return 0

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        return None


def make_bus() -> SystemBus:
    bus = SystemBus()
    bus.add_ram(RAM_BASE, 16 << 20)
    bus.add_ram(RAM2_BASE, 1 << 20)
    bus.add_mmio(MMIO_BASE, 0x2_0000, NullDevice(), "dev")
    return bus


def make_mp(strict: bool = False) -> tuple[MemProtect, list[TraceEvent]]:
    trace = TraceBus()
    sink = trace.attach(RecordingSink())
    mp = MemProtect(make_bus(), trace, pa_bits=40, strict_mmio_checks=strict)
    assert mp.init_vm(VM_A, protected=True) == 0
    assert mp.init_vm(VM_B, protected=True) == 0
    return mp, sink.events


# -- the starting states ------------------------------------------------------------------------
P = RAM_PFN + 0x20  # the RAM page under test


def _owned(mp: MemProtect) -> int:
    return P


def _shared_hyp(mp: MemProtect) -> int:
    assert mp.host_share_hyp(P) == 0
    return P


def _pinned(mp: MemProtect) -> int:
    assert mp.host_share_hyp(P) == 0
    assert mp.hyp_pin_shared_mem(P << 12, (P + 1) << 12) == 0
    return P


def _hyp(mp: MemProtect) -> int:
    assert mp.host_donate_hyp(P, 1) == 0
    return P


def _guest(mp: MemProtect) -> int:
    assert mp.host_donate_guest(VM_A, P, G0) == 0
    return P


def _shared_guest(mp: MemProtect) -> int:
    assert mp.host_share_guest(VM_A, P, G0, RW) == 0
    return P


def _pending(mp: MemProtect) -> int:
    assert mp.host_donate_guest(VM_B, P, G0) == 0
    assert mp.teardown_vm(VM_B) == 0
    return P


def _mmio(mp: MemProtect) -> int:
    return MMIO_PFN


def _mmio_hyp(mp: MemProtect) -> int:
    assert mp.host_donate_hyp_mmio(MMIO_PFN) == 0
    return MMIO_PFN


def _hole(mp: MemProtect) -> int:
    return HOLE_PFN


STATES = {
    "owned": _owned,
    "shared-hyp": _shared_hyp,
    "pinned": _pinned,
    "hyp": _hyp,
    "guest": _guest,
    "shared-guest": _shared_guest,
    "pending-reclaim": _pending,
    "mmio": _mmio,
    "mmio-hyp": _mmio_hyp,
    "hole": _hole,
}


@dataclass(frozen=True)
class View:
    """Everything a transition may change about one page: host state and owner, hyp state, pins,
    and guest A's view at G0 and G1."""

    host: PageState
    owner: Owner
    hyp: PageState
    pins: int
    g0: PageState
    g1: PageState


def view(mp: MemProtect, pfn: int) -> View:
    return View(
        mp.host_state(pfn),
        mp.owner_of(pfn),
        mp.hyp_state(pfn),
        mp.pin_count(pfn),
        mp.guest_state(VM_A, G0),
        mp.guest_state(VM_A, G1),
    )


def v(
    host: PageState,
    owner: Owner = HOST,
    hyp: PageState = NOPAGE,
    pins: int = 0,
    g0: PageState = NOPAGE,
    g1: PageState = NOPAGE,
) -> View:
    return View(host, owner, hyp, pins, g0, g1)


# The state each starting point is in, written from pKVM's rules.
START = {
    "owned": v(OWNED),
    "shared-hyp": v(SO, hyp=SB),
    "pinned": v(SO, hyp=SB, pins=1),
    "hyp": v(NOPAGE, HYP, OWNED),
    "guest": v(NOPAGE, guest(VM_A), g0=OWNED),
    "shared-guest": v(SO, g0=SB),
    "pending-reclaim": v(NOPAGE, guest(VM_B)),
    "mmio": v(OWNED),
    "mmio-hyp": v(NOPAGE, HYP, OWNED),
    "hole": v(OWNED),
}

TRANSITIONS = {
    "host_share_hyp": lambda mp, pfn: mp.host_share_hyp(pfn),
    "host_unshare_hyp": lambda mp, pfn: mp.host_unshare_hyp(pfn),
    "host_donate_hyp": lambda mp, pfn: mp.host_donate_hyp(pfn, 1),
    "hyp_donate_host": lambda mp, pfn: mp.hyp_donate_host(pfn, 1),
    "hyp_pin_shared_mem": lambda mp, pfn: mp.hyp_pin_shared_mem(pfn << 12, (pfn << 12) + 0x800),
    "hyp_unpin_shared_mem": lambda mp, pfn: mp.hyp_unpin_shared_mem(pfn << 12, (pfn + 1) << 12),
    "host_share_guest": lambda mp, pfn: mp.host_share_guest(VM_A, pfn, G1, RW),
    "host_unshare_guest": lambda mp, pfn: mp.host_unshare_guest(VM_A, G0),
    "host_donate_guest": lambda mp, pfn: mp.host_donate_guest(VM_A, pfn, G1),
    "guest_relinquish_to_host": lambda mp, pfn: mp.guest_relinquish_to_host(VM_A, G0),
    "host_reclaim_page": lambda mp, pfn: mp.host_reclaim_page(pfn),
    "host_donate_hyp_mmio": lambda mp, pfn: mp.host_donate_hyp_mmio(pfn),
    "hyp_donate_host_mmio": lambda mp, pfn: mp.hyp_donate_host_mmio(pfn),
}

# (transition, state) -> (result, resulting view, or None when the state must be unchanged).
# Every pair not listed is -EPERM with no change.
EXPECTED: dict[tuple[str, str], tuple[int, View | None]] = {
    ("host_share_hyp", "owned"): (0, v(SO, hyp=SB)),
    ("host_unshare_hyp", "shared-hyp"): (0, v(OWNED)),
    ("host_unshare_hyp", "pinned"): (-EBUSY, None),
    ("host_donate_hyp", "owned"): (0, v(NOPAGE, HYP, OWNED)),
    ("hyp_donate_host", "hyp"): (0, v(OWNED)),
    ("hyp_pin_shared_mem", "shared-hyp"): (0, v(SO, hyp=SB, pins=1)),
    ("hyp_pin_shared_mem", "pinned"): (0, v(SO, hyp=SB, pins=2)),
    # Unpinning what is not pinned: pKVM BUGs; the model refuses.
    **{("hyp_unpin_shared_mem", s): (-EINVAL, None) for s in STATES if s != "pinned"},
    ("hyp_unpin_shared_mem", "pinned"): (0, v(SO, hyp=SB)),
    ("host_share_guest", "owned"): (0, v(SO, g1=SB)),
    ("host_share_guest", "shared-guest"): (0, v(SO, g0=SB, g1=SB)),  # host-to-guest multi-share
    # Unshare looks at the guest's G0 first: nothing mapped there is -ENOENT.
    **{("host_unshare_guest", s): (-ENOENT, None) for s in STATES if s not in ("guest", "shared-guest")},
    ("host_unshare_guest", "shared-guest"): (0, v(OWNED)),
    ("host_donate_guest", "owned"): (0, v(NOPAGE, guest(VM_A), g1=OWNED)),
    # Relinquishing an unmapped gfn succeeds and does nothing; a borrowed page cannot be given back.
    **{("guest_relinquish_to_host", s): (0, None) for s in STATES if s not in ("guest", "shared-guest")},
    ("guest_relinquish_to_host", "guest"): (0, v(OWNED)),
    # Reclaim: a page the host owns is a no-op; only pages a teardown released come back.
    ("host_reclaim_page", "owned"): (0, None),
    ("host_reclaim_page", "mmio"): (0, None),
    ("host_reclaim_page", "hole"): (0, None),
    ("host_reclaim_page", "pending-reclaim"): (0, v(OWNED)),
    # MMIO donation as posted: the host leaf must be valid or empty (-EPERM), the hyp VA unmapped
    # (-EBUSY); the pfn is not checked to be MMIO, so RAM and holes go through too.
    ("host_donate_hyp_mmio", "owned"): (0, v(NOPAGE, HYP, OWNED)),
    ("host_donate_hyp_mmio", "shared-hyp"): (-EBUSY, None),
    ("host_donate_hyp_mmio", "pinned"): (-EBUSY, None),
    ("host_donate_hyp_mmio", "shared-guest"): (0, v(NOPAGE, HYP, OWNED, g0=SB)),
    ("host_donate_hyp_mmio", "mmio"): (0, v(NOPAGE, HYP, OWNED)),
    ("host_donate_hyp_mmio", "hole"): (0, v(NOPAGE, HYP, OWNED)),
    # Returning MMIO as posted checks nothing: the hyp mapping goes and the host leaf is reset.
    ("hyp_donate_host_mmio", "owned"): (0, None),
    ("hyp_donate_host_mmio", "shared-hyp"): (0, v(SO)),
    ("hyp_donate_host_mmio", "pinned"): (0, v(SO, pins=1)),
    ("hyp_donate_host_mmio", "hyp"): (0, v(OWNED)),
    ("hyp_donate_host_mmio", "guest"): (0, v(OWNED, g0=OWNED)),
    ("hyp_donate_host_mmio", "shared-guest"): (0, None),
    ("hyp_donate_host_mmio", "pending-reclaim"): (0, v(OWNED)),
    ("hyp_donate_host_mmio", "mmio"): (0, None),
    ("hyp_donate_host_mmio", "mmio-hyp"): (0, v(OWNED)),
    ("hyp_donate_host_mmio", "hole"): (0, None),
}

# With Will's checks (strict_mmio_checks): only MMIO pages, and only hyp-owned ones come back.
EXPECTED_STRICT: dict[tuple[str, str], tuple[int, View | None]] = {
    **{("host_donate_hyp_mmio", s): (-EINVAL, None) for s in STATES if s not in ("mmio", "mmio-hyp")},
    ("host_donate_hyp_mmio", "mmio"): (0, v(NOPAGE, HYP, OWNED)),
    ("host_donate_hyp_mmio", "mmio-hyp"): (-EPERM, None),
    **{("hyp_donate_host_mmio", s): (-EINVAL, None) for s in STATES if s not in ("mmio", "mmio-hyp")},
    ("hyp_donate_host_mmio", "mmio"): (-EPERM, None),
    ("hyp_donate_host_mmio", "mmio-hyp"): (0, v(OWNED)),
}


def test_starting_states_are_what_pkvm_says() -> None:
    for name, setup in STATES.items():
        mp, _ = make_mp()
        assert view(mp, setup(mp)) == START[name], name


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_transition_table(transition: str, state: str) -> None:
    mp, events = make_mp()
    pfn = STATES[state](mp)
    before = view(mp, pfn)
    events.clear()
    result, after = EXPECTED.get((transition, state), (-EPERM, None))
    assert TRANSITIONS[transition](mp, pfn) == result
    assert view(mp, pfn) == (after if after is not None else before)
    ownership = [e for e in events if e.kind == "ownership"]
    assert [(e.component, e.fields["transition"], e.fields["result"]) for e in ownership] == [
        ("hyp", transition, result)
    ]


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("transition", ["host_donate_hyp_mmio", "hyp_donate_host_mmio"])
def test_mmio_transition_table_strict(transition: str, state: str) -> None:
    mp, _ = make_mp(strict=True)
    pfn = STATES[state](mp)
    before = view(mp, pfn)
    result, after = EXPECTED_STRICT[(transition, state)]
    assert TRANSITIONS[transition](mp, pfn) == result
    assert view(mp, pfn) == (after if after is not None else before)


# -- details the table does not show -----------------------------------------------------------
def test_donate_hyp_prot_normal_nc_allowed_exec_refused() -> None:
    mp, _ = make_mp()
    assert mp.host_donate_hyp(P, 1, PAGE_HYP_NC) == 0
    assert mp.hyp_prot(P) == PAGE_HYP_NC
    assert mp.host_donate_hyp(P + 1, 1, PAGE_HYP | KvmPgtableProt.X) == -EPERM
    assert mp.host_state(P + 1) is OWNED and mp.hyp_state(P + 1) is NOPAGE
    assert mp.host_donate_hyp_mmio(MMIO_PFN) == 0
    assert mp.hyp_prot(MMIO_PFN) == PAGE_HYP_DEVICE


def test_multi_page_donation_checks_every_page_before_changing_any() -> None:
    mp, _ = make_mp()
    assert mp.host_share_hyp(P + 2) == 0
    assert mp.host_donate_hyp(P, 4) == -EPERM
    assert [mp.host_state(P + i) for i in range(4)] == [OWNED, OWNED, SO, OWNED]
    assert mp.non_host_owned_count() == 0
    assert mp.host_donate_hyp(P + 3, 4) == 0
    assert [mp.owner_of(P + 3 + i) for i in range(4)] == [HYP] * 4
    assert mp.hyp_donate_host(P + 2, 3) == -EPERM  # P+2 is only shared with the hyp
    assert mp.hyp_state(P + 3) is OWNED and mp.hyp_state(P + 2) is SB


def test_ranges_must_stay_in_one_memory_or_non_memory_run() -> None:
    mp, _ = make_mp()
    last_ram2 = (RAM2_BASE >> 12) + 255
    assert mp.host_donate_hyp(last_ram2, 2) == -EINVAL  # memory then hole
    assert mp.host_donate_hyp(last_ram2, 1) == 0
    assert mp.host_donate_hyp(RAM_PFN - 1, 2) == -EINVAL  # hole then memory
    assert mp.host_donate_hyp(MMIO_PFN, 1) == -EPERM  # not memory at all
    assert mp.host_donate_hyp(mp.max_pfn - 1, 2) == -EINVAL  # beyond the PA range
    assert mp.host_donate_hyp(-1, 1) == -EINVAL
    assert mp.host_donate_hyp(P, 0) == -EINVAL


def test_share_guest_rules() -> None:
    mp, _ = make_mp()
    assert mp.host_share_guest(VM_A, P, G0, RW | KvmPgtableProt.DEVICE) == -EINVAL  # beyond RWX
    assert mp.host_share_guest(VM_A, MMIO_PFN, G0, RW) == -EPERM
    assert mp.host_share_guest(0x999, P, G0, RW) == -ENOENT
    assert mp.host_share_guest(VM_A, P, G0, RW) == 0
    assert mp.host_share_guest(VM_A, P + 1, G0, RW) == -EPERM  # gfn taken
    assert mp.host_share_guest(VM_B, P, G0, KvmPgtableProt.R) == 0  # a second guest
    assert mp.share_guest_count(P) == 2
    assert mp.guest_pte(VM_B, G0).prot == KvmPgtableProt.R
    assert mp.host_unshare_guest(VM_A, G0) == 0
    assert mp.host_state(P) is SO  # still shared with VM_B
    assert mp.host_unshare_guest(VM_B, G0) == 0
    assert mp.host_state(P) is OWNED and mp.share_guest_count(P) == 0


def test_pins_are_counted_and_block_unshare_until_the_last_unpin() -> None:
    mp, _ = make_mp()
    for pfn in (P, P + 1):
        assert mp.host_share_hyp(pfn) == 0
    start, end = P << 12, (P + 2) << 12
    assert mp.hyp_pin_shared_mem(start + 8, end - 8) == 0  # rounded out to both pages
    assert mp.hyp_pin_shared_mem(start, start + 1) == 0
    assert (mp.pin_count(P), mp.pin_count(P + 1)) == (2, 1)
    assert mp.hyp_pin_shared_mem(start, end + 1) == -EPERM  # P+2 is not shared
    assert mp.pin_count(P) == 2
    assert mp.hyp_unpin_shared_mem(start, end) == 0
    assert mp.host_unshare_hyp(P) == -EBUSY
    assert mp.host_unshare_hyp(P + 1) == 0
    assert mp.hyp_unpin_shared_mem(start, end) == -EINVAL  # P+1 no longer pinned: nothing changes
    assert mp.pin_count(P) == 1
    assert mp.hyp_unpin_shared_mem(start, start + 4096) == 0
    assert mp.host_unshare_hyp(P) == 0


def test_relinquish_poisons_before_the_host_gets_the_page_back() -> None:
    mp, _ = make_mp()
    mp.bus.ram.write(P << 12, b"guest secret")
    assert mp.host_donate_guest(VM_A, P, G0) == 0
    assert mp.guest_relinquish_to_host(VM_A, G0) == 0
    assert mp.bus.ram.read(P << 12, 12) == bytes(12)
    assert mp.host_state(P) is OWNED


def test_teardown_then_reclaim() -> None:
    mp, _ = make_mp()
    mp.bus.ram.write((P + 1) << 12, b"guest secret")
    assert mp.host_donate_guest(VM_B, P + 1, G0) == 0
    assert mp.host_share_guest(VM_B, P + 2, G1, RW) == 0
    assert mp.host_reclaim_page(P + 1) == -EPERM  # guest still alive
    assert mp.teardown_vm(VM_B) == 0
    assert mp.teardown_vm(VM_B) == -ENOENT
    assert not mp.vm_exists(VM_B)
    assert mp.owner_of(P + 1) == guest(VM_B)  # still out of the host's reach
    assert mp.host_state(P + 2) is SO  # shared: the host never lost it, but must reclaim it
    assert mp.host_share_hyp(P + 2) == -EPERM
    assert mp.host_reclaim_page(P + 1) == 0
    assert mp.bus.ram.read((P + 1) << 12, 12) == bytes(12)
    assert mp.host_reclaim_page(P + 2) == 0
    assert (mp.host_state(P + 1), mp.host_state(P + 2)) == (OWNED, OWNED)
    assert not mp.is_pending_reclaim(P + 1)


def test_init_vm_twice_is_eexist() -> None:
    mp, _ = make_mp()
    assert mp.init_vm(VM_A) == -EEXIST


def test_queries() -> None:
    mp, _ = make_mp()
    assert mp.is_memory(P) and not mp.is_mmio(P)
    assert mp.is_mmio(MMIO_PFN) and not mp.is_memory(MMIO_PFN)
    assert not mp.is_mmio(HOLE_PFN) and not mp.is_memory(HOLE_PFN)
    assert mp.memory_runs() == [(RAM_PFN, 4096), (RAM2_BASE >> 12, 256)]
    assert mp.host_can_access(P)
    assert mp.host_donate_hyp(P, 2) == 0
    assert mp.host_donate_guest(VM_A, P + 2, G0) == 0
    assert mp.host_donate_hyp(P + 3, 1) == 0
    assert mp.host_donate_hyp_mmio(MMIO_PFN) == 0
    assert not mp.host_can_access(P)
    assert list(mp.non_host_owned_ranges()) == [
        (MMIO_PFN, 1, HYP),
        (P, 2, HYP),
        (P + 2, 1, guest(VM_A)),
        (P + 3, 1, HYP),
    ]
    assert mp.guest_pages(VM_A)[G0].pfn == P + 2


# -- listeners ----------------------------------------------------------------------------------
class Recorder:
    """A listener that records each call together with the state it saw at that moment."""

    def __init__(self, mp: MemProtect) -> None:
        self.mp = mp
        self.calls: list[tuple[int, int, Prot, bool, PageState, PageState, bytes]] = []

    def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None:
        self.calls.append(
            (
                pfn,
                nr_pages,
                prot,
                is_mmio,
                self.mp.host_state(pfn),
                self.mp.guest_state(VM_A, G0),
                self.mp.bus.ram.read(pfn << 12, 4),
            )
        )


def test_listener_called_before_the_transition_returns_and_before_the_new_owner_maps() -> None:
    mp, _ = make_mp()
    rec = Recorder(mp)
    mp.add_host_ownership_listener(rec)
    mp.bus.ram.write(P << 12, b"data")
    assert mp.host_donate_guest(VM_A, P, G0) == 0
    # The host has lost the page, the guest does not have it yet, when the IOMMU is told.
    assert rec.calls == [(P, 1, Prot.NONE, False, NOPAGE, NOPAGE, b"data")]
    rec.calls.clear()
    assert mp.guest_relinquish_to_host(VM_A, G0) == 0
    # The guest has let go and the page is already poisoned when the host regains it.
    assert rec.calls == [(P, 1, Prot.READ | Prot.WRITE, False, OWNED, NOPAGE, bytes(4))]


def test_listener_calls_per_transition() -> None:
    mp, _ = make_mp()
    rec = Recorder(mp)
    mp.add_host_ownership_listener(rec)

    def calls() -> list[tuple[int, int, Prot, bool]]:
        out = [c[:4] for c in rec.calls]
        rec.calls.clear()
        return out

    assert mp.host_share_hyp(P) == 0
    assert mp.hyp_pin_shared_mem(P << 12, (P + 1) << 12) == 0
    assert mp.host_share_guest(VM_A, P + 1, G1, RW) == 0
    assert calls() == []  # sharing never changes what the host may access
    assert mp.host_donate_hyp(P + 4, 3) == 0
    assert calls() == [(P + 4, 3, Prot.NONE, False)]
    assert mp.hyp_donate_host(P + 4, 3) == 0
    assert calls() == [(P + 4, 3, Prot.READ | Prot.WRITE, False)]
    assert mp.host_donate_hyp_mmio(MMIO_PFN) == 0
    assert calls() == [(MMIO_PFN, 1, Prot.NONE, True)]
    assert mp.hyp_donate_host_mmio(MMIO_PFN) == 0
    assert calls() == [(MMIO_PFN, 1, Prot.READ | Prot.WRITE, True)]
    assert mp.host_donate_hyp(P, 1) == -EPERM
    assert calls() == []  # refused: nothing changed, nobody told
    mp.remove_host_ownership_listener(rec)
    assert mp.host_donate_hyp(P + 8, 1) == 0
    assert calls() == []


def test_ownership_trace_event_fields() -> None:
    mp, events = make_mp()
    events.clear()
    assert mp.host_donate_guest(VM_A, P, G0) == 0
    assert mp.host_donate_hyp(P, 1) == -EPERM
    assert [(e.kind, e.fields) for e in events] == [
        (
            "ownership",
            {"transition": "host_donate_guest", "pfn": P, "nr_pages": 1, "result": 0, "vm": VM_A, "gfn": G0},
        ),
        (
            "ownership",
            {
                "transition": "host_donate_hyp",
                "pfn": P,
                "nr_pages": 1,
                "result": -EPERM,
                "prot": int(PAGE_HYP),
            },
        ),
    ]
