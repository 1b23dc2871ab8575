//! Events for the guest (exceptions, NMIs, external and software
//! interrupts), the queue that holds them until the guest can take them,
//! and the choice of the one to deliver at the next entry.
//!
//! The hardware takes one event per entry (VT-x: the VM-entry
//! interruption-information field, SDM Vol. 3C 25.8.3; AMD-V: EVENTINJ,
//! APM Vol. 2 15.20), so a second `inject` must not overwrite the first: the
//! backends keep an [`EventQueue`] and call [`plan_entry`] before every
//! entry. The rules live here once, for both backends and the test mock.

use serde::{Deserialize, Serialize};

/// Something delivered to the guest through its IDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A hardware exception; the error code when the vector takes one.
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// An external (maskable) interrupt.
    Interrupt {
        vector: u8,
    },
    Nmi,
    /// INT n, INT3, INTO or INT1 whose delivery is pending: RIP is at the
    /// instruction, `len` bytes long, and the handler returns after it.
    SoftwareInterrupt {
        vector: u8,
        len: u8,
    },
}

impl Event {
    /// #GP(0), what the guest gets for a refused MSR access.
    pub const GP0: Event = Event::Exception { vector: 13, error_code: Some(0) };
    /// #UD.
    pub const UD: Event = Event::Exception { vector: 6, error_code: None };
    /// #MC: a machine check (the cause is in the MCA banks).
    pub const MC: Event = Event::Exception { vector: 18, error_code: None };
    /// #DB (a fault or trap; the cause is in DR6).
    pub const DB: Event = Event::Exception { vector: 1, error_code: None };

    /// Whether exception `vector` pushes an error code (SDM Vol. 3A table
    /// 6-1): #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP.
    pub fn vector_has_error_code(vector: u8) -> bool {
        matches!(vector, 8 | 10..=14 | 17 | 21)
    }

    /// The error code the CPU pushes when it delivers this event: only for
    /// an exception that has one, and only in protected mode (real-mode
    /// delivery pushes none; VT-x refuses an entry that says otherwise, SDM
    /// Vol. 3C 27.2.1.3).
    pub fn delivered_error_code(self, protected_mode: bool) -> Option<u32> {
        match self {
            Event::Exception { vector, error_code } if protected_mode && Self::vector_has_error_code(vector) => {
                Some(error_code.unwrap_or(0))
            }
            _ => None,
        }
    }

    /// Why the hardware could not deliver this event at all, if so.
    pub fn check(self) -> Result<(), &'static str> {
        match self {
            Event::Exception { vector, .. } if vector > 31 || vector == 2 => {
                Err("an exception's vector must be 0-31 and not 2 (the NMI's)")
            }
            Event::SoftwareInterrupt { len, .. } if !(1..=15).contains(&len) => {
                Err("a software interrupt's instruction is 1 to 15 bytes long")
            }
            _ => Ok(()),
        }
    }

    /// Priority class (SDM Vol. 3A 6.9): events the current instruction
    /// raised (exceptions, software interrupts) before NMIs before maskable
    /// interrupts.
    fn class(self) -> u8 {
        match self {
            Event::Exception { .. } | Event::SoftwareInterrupt { .. } => 0,
            Event::Nmi => 1,
            Event::Interrupt { .. } => 2,
        }
    }
}

/// How many events wait at most. A guest cannot grow the queue: exceptions
/// are delivered at the next entry (at most one per exit is raised),
/// there is at most one NMI (a second one merges, as the CPU latches only
/// one, SDM Vol. 3A 6.7.1), and a vector waits at most once (one IRR bit).
pub const QUEUE_LEN: usize = 8;

/// Events waiting for delivery, in arrival order (packed from the front).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventQueue {
    slots: [Option<Event>; QUEUE_LEN],
}

impl EventQueue {
    pub fn len(&self) -> usize {
        self.slots.iter().take_while(|e| e.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.slots[0].is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.slots.iter().map_while(|e| *e)
    }

    /// Queues `e`; an NMI or interrupt vector already waiting merges with
    /// it. False if the queue is full (the event is dropped).
    pub fn push(&mut self, e: Event) -> bool {
        if matches!(e, Event::Nmi | Event::Interrupt { .. }) && self.iter().any(|q| q == e) {
            return true;
        }
        let n = self.len();
        if n == QUEUE_LEN {
            return false;
        }
        self.slots[n] = Some(e);
        true
    }

    pub fn has_nmi(&self) -> bool {
        self.iter().any(|e| e == Event::Nmi)
    }

    pub fn has_interrupt(&self) -> bool {
        self.iter().any(|e| matches!(e, Event::Interrupt { .. }))
    }

    /// Removes and returns the event to deliver next: the oldest of the
    /// highest priority class the guest can take (`nmi_ok`, `interrupt_ok`).
    pub fn take_next(&mut self, nmi_ok: bool, interrupt_ok: bool) -> Option<Event> {
        let ok = |c: u8| c == 0 || (c == 1 && nmi_ok) || (c == 2 && interrupt_ok);
        let i = (0..3).filter(|&c| ok(c)).find_map(|c| self.iter().position(|e| e.class() == c))?;
        let e = self.slots[i];
        self.slots.copy_within(i + 1.., i);
        self.slots[QUEUE_LEN - 1] = None;
        e
    }

    /// The first event no CPU could deliver, if any.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.slots[self.len()..].iter().any(|e| e.is_some()) {
            return Err("the event queue has a gap");
        }
        self.iter().try_for_each(Event::check)
    }
}

/// What keeps the guest from taking an event now (SDM Vol. 3A 6.8.1-6.8.3,
/// 6.7.1; APM Vol. 2 8.5, 15.21).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Blocking {
    /// RFLAGS.IF is 0, or the STI/MOV SS shadow is on.
    pub interrupt: bool,
    /// An NMI handler runs (until IRET), or the shadow is on.
    pub nmi: bool,
}

/// Window exits the layer above asked for (`request_*_window`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    pub interrupt: bool,
    pub nmi: bool,
}

/// The plan for one entry: the event to inject, and which window exits to
/// arm so the rest (or what the layer above waits for) goes in as soon as
/// the guest can take it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryPlan {
    pub event: Option<Event>,
    pub windows: Windows,
}

/// Chooses the event for the next entry: one whose delivery had begun
/// (`injected`) first, whatever the guest's blocking says (it was
/// deliverable when the delivery began); else the queue's next event the
/// guest can take. Interrupts and NMIs still waiting, or windows the layer
/// above asked for (`want`), arm the window exits. A second exception waits
/// for the next entry, which the next exit brings.
pub fn plan_entry(injected: &mut Option<Event>, queue: &mut EventQueue, blocked: Blocking, want: Windows) -> EntryPlan {
    let event = injected.take().or_else(|| queue.take_next(!blocked.nmi, !blocked.interrupt));
    EntryPlan {
        event,
        windows: Windows { interrupt: want.interrupt || queue.has_interrupt(), nmi: want.nmi || queue.has_nmi() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PF: Event = Event::Exception { vector: 14, error_code: Some(2) };

    #[test]
    fn a_second_event_does_not_overwrite_the_first() {
        let mut q = EventQueue::default();
        assert!(q.push(Event::Interrupt { vector: 0x30 }));
        assert!(q.push(Event::GP0));
        assert!(q.push(Event::Interrupt { vector: 0x31 }));
        assert_eq!(q.len(), 3);
        assert_eq!(q.iter().collect::<alloc::vec::Vec<_>>().len(), 3);
    }

    #[test]
    fn priority_exceptions_then_nmi_then_interrupts_oldest_first() {
        let mut q = EventQueue::default();
        for e in [Event::Interrupt { vector: 0x30 }, Event::Nmi, PF, Event::Interrupt { vector: 0x31 }, Event::GP0] {
            q.push(e);
        }
        let mut order = alloc::vec::Vec::new();
        while let Some(e) = q.take_next(true, true) {
            order.push(e);
        }
        assert_eq!(
            order,
            [PF, Event::GP0, Event::Nmi, Event::Interrupt { vector: 0x30 }, Event::Interrupt { vector: 0x31 }]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn blocked_events_wait_and_others_pass_them() {
        let mut q = EventQueue::default();
        q.push(Event::Interrupt { vector: 0x30 });
        q.push(Event::Nmi);
        assert_eq!(q.take_next(false, false), None, "IF = 0 and an NMI handler running");
        assert_eq!(q.take_next(false, true), Some(Event::Interrupt { vector: 0x30 }), "the blocked NMI waits");
        assert_eq!(q.take_next(true, false), Some(Event::Nmi));
    }

    #[test]
    fn nmis_and_vectors_merge_and_a_full_queue_refuses() {
        let mut q = EventQueue::default();
        assert!(q.push(Event::Nmi) && q.push(Event::Nmi));
        assert!(q.push(Event::Interrupt { vector: 0x40 }) && q.push(Event::Interrupt { vector: 0x40 }));
        assert_eq!(q.len(), 2);
        for v in 0..6 {
            assert!(q.push(Event::Interrupt { vector: 0x50 + v }));
        }
        assert!(!q.push(Event::GP0), "full");
        assert_eq!(q.len(), QUEUE_LEN);
        q.take_next(true, true);
        assert!(q.push(Event::GP0));
        assert_eq!(q.check(), Ok(()));
    }

    #[test]
    fn the_plan_redelivers_first_then_arms_windows_for_what_waits() {
        let mut q = EventQueue::default();
        q.push(Event::Interrupt { vector: 0x30 });
        q.push(Event::GP0);
        let mut injected = Some(Event::Interrupt { vector: 0x20 });
        let all_blocked = Blocking { interrupt: true, nmi: true };
        let p = plan_entry(&mut injected, &mut q, all_blocked, Windows::default());
        assert_eq!(p.event, Some(Event::Interrupt { vector: 0x20 }), "an interrupted delivery goes on");
        assert!(p.windows.interrupt && !p.windows.nmi);
        let p = plan_entry(&mut injected, &mut q, all_blocked, Windows::default());
        assert_eq!(p.event, Some(Event::GP0));
        let p = plan_entry(&mut injected, &mut q, all_blocked, Windows::default());
        assert_eq!(p.event, None, "IF = 0: the interrupt waits for its window");
        assert!(p.windows.interrupt);
        let p = plan_entry(&mut injected, &mut q, Blocking::default(), Windows { interrupt: false, nmi: true });
        assert_eq!(p.event, Some(Event::Interrupt { vector: 0x30 }));
        assert_eq!(p.windows, Windows { interrupt: false, nmi: true }, "only what the layer above asked for");
        let p = plan_entry(&mut injected, &mut q, Blocking::default(), Windows::default());
        assert_eq!(p, EntryPlan::default());
    }

    #[test]
    fn error_codes_follow_the_vector_and_the_mode() {
        assert_eq!(Event::GP0.delivered_error_code(true), Some(0));
        assert_eq!(Event::GP0.delivered_error_code(false), None, "real mode pushes no error code");
        assert_eq!(Event::Exception { vector: 13, error_code: None }.delivered_error_code(true), Some(0));
        assert_eq!(Event::UD.delivered_error_code(true), None);
        assert_eq!(Event::Exception { vector: 6, error_code: Some(5) }.delivered_error_code(true), None);
        assert_eq!(Event::Interrupt { vector: 14 }.delivered_error_code(true), None);
        assert!(Event::Exception { vector: 2, error_code: None }.check().is_err());
        assert!(Event::Exception { vector: 32, error_code: None }.check().is_err());
        assert!(Event::SoftwareInterrupt { vector: 0x80, len: 0 }.check().is_err());
        assert!(Event::SoftwareInterrupt { vector: 0x80, len: 2 }.check().is_ok());
    }
}
