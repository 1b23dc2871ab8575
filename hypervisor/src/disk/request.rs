//! One request at a time to a polled disk queue, each with a deadline.
//!
//! A device that never completes a request must not hang the kernel: at
//! boot the swap set-up and the self-check would wait forever, with the
//! console not yet up. So every request — read, write and flush alike — is
//! submitted, then polled until it completes or its deadline passes. A
//! request that times out disables the disk for good: the device may still
//! own the request's buffers and write them later, so nothing is reused
//! and no further request is sent.
//!
//! The driver supplies the device through [`Device`] (submit, poll,
//! complete, clock); the loop here is the same for every driver and is
//! tested on the host with devices that never answer.

use core::fmt;

/// What a request asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `bytes` starting at `block` into the driver's buffer.
    Read { block: u64, bytes: usize },
    /// Write `bytes` from the driver's buffer starting at `block`.
    Write { block: u64, bytes: usize },
    /// Make every completed write durable.
    Flush,
}

impl Request {
    /// The block the request starts at, for `mm::Error::BlockIo` (0 for a
    /// flush).
    pub fn block(&self) -> u64 {
        match *self {
            Request::Read { block, .. } | Request::Write { block, .. } => block,
            Request::Flush => 0,
        }
    }

    /// Does the request change the medium? (A flush counts as a write.)
    pub fn is_write(&self) -> bool {
        !matches!(self, Request::Read { .. })
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Read { block, bytes } => write!(f, "read of {bytes} bytes at block {block}"),
            Request::Write { block, bytes } => write!(f, "write of {bytes} bytes at block {block}"),
            Request::Flush => f.write_str("flush"),
        }
    }
}

/// A device queue as the deadline loop drives it.
pub trait Device {
    /// Names a submitted request.
    type Token: Copy + PartialEq + fmt::Debug;
    type Error: fmt::Display;

    /// Hands `req` to the device. Its buffers belong to the device from
    /// now until [`complete`](Self::complete), or forever if it never
    /// completes.
    fn submit(&mut self, req: Request) -> Result<Self::Token, Self::Error>;

    /// The token of the next completed request, if any, without taking it.
    fn poll(&mut self) -> Option<Self::Token>;

    /// Takes completed request `token` back and returns its status.
    fn complete(&mut self, token: Self::Token, req: Request) -> Result<(), Self::Error>;

    /// Microseconds on a monotonic clock.
    fn now_us(&self) -> u64;
}

/// How long a request may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// Microseconds from submission.
    pub timeout_us: u64,
    /// Polls before giving up even if the clock says otherwise: a clock
    /// that does not advance (an uncalibrated TSC) must not hang us either.
    pub max_polls: u64,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError<E> {
    /// An earlier request timed out; the disk takes no more.
    Disabled,
    /// The device refused the request.
    Submit(E),
    /// The device completed it with an error.
    Failed(E),
    /// No completion within the deadline: the disk is now disabled.
    TimedOut { req: Request, waited_us: u64, polls: u64 },
}

impl<E: fmt::Display> fmt::Display for RequestError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Disabled => f.write_str("the disk was disabled after an earlier time-out"),
            RequestError::Submit(e) => write!(f, "the device refused the request: {e}"),
            RequestError::Failed(e) => write!(f, "the device failed the request: {e}"),
            RequestError::TimedOut { req, waited_us, polls } => {
                write!(f, "{req} not completed after {} ms ({polls} polls); the disk is disabled", waited_us / 1000)
            }
        }
    }
}

/// A device driven one request at a time, each with a [`Deadline`].
pub struct Requests<D> {
    dev: D,
    deadline: Deadline,
    disabled: bool,
}

impl<D: Device> Requests<D> {
    pub fn new(dev: D, deadline: Deadline) -> Self {
        Requests { dev, deadline, disabled: false }
    }

    /// Has a request timed out? Then the device may still own buffers.
    pub fn disabled(&self) -> bool {
        self.disabled
    }

    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Submits `req` and polls until it completes or its deadline passes.
    pub fn run(&mut self, req: Request) -> Result<(), RequestError<D::Error>> {
        if self.disabled {
            return Err(RequestError::Disabled);
        }
        let token = self.dev.submit(req).map_err(RequestError::Submit)?;
        let start = self.dev.now_us();
        let mut polls = 0u64;
        loop {
            // Only one request is ever in flight, so another token in the
            // used ring would be a device bug: treated as no completion.
            if self.dev.poll() == Some(token) {
                return self.dev.complete(token, req).map_err(RequestError::Failed);
            }
            polls += 1;
            let waited_us = self.dev.now_us().wrapping_sub(start);
            if waited_us > self.deadline.timeout_us || polls >= self.deadline.max_polls {
                self.disabled = true;
                return Err(RequestError::TimedOut { req, waited_us, polls });
            }
            core::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use core::cell::Cell;

    /// A device whose requests complete after `after` polls (or never),
    /// with a clock that moves `tick` us per reading.
    struct Sim {
        after: Option<u64>,
        tick: u64,
        clock: Cell<u64>,
        polls: u64,
        submitted: Vec<Request>,
        completed: Vec<Request>,
        next_token: u16,
        fail_status: bool,
    }

    impl Sim {
        fn new(after: Option<u64>, tick: u64) -> Self {
            Sim {
                after,
                tick,
                clock: Cell::new(0),
                polls: 0,
                submitted: Vec::new(),
                completed: Vec::new(),
                next_token: 0,
                fail_status: false,
            }
        }
    }

    impl Device for Sim {
        type Token = u16;
        type Error = &'static str;
        fn submit(&mut self, req: Request) -> Result<u16, &'static str> {
            self.submitted.push(req);
            self.polls = 0;
            self.next_token += 1;
            Ok(self.next_token)
        }
        fn poll(&mut self) -> Option<u16> {
            self.polls += 1;
            match self.after {
                Some(n) if self.polls > n => Some(self.next_token),
                _ => None,
            }
        }
        fn complete(&mut self, token: u16, req: Request) -> Result<(), &'static str> {
            assert_eq!(token, self.next_token);
            self.completed.push(req);
            if self.fail_status { Err("I/O error") } else { Ok(()) }
        }
        fn now_us(&self) -> u64 {
            self.clock.set(self.clock.get() + self.tick);
            self.clock.get()
        }
    }

    const LIMIT: Deadline = Deadline { timeout_us: 5_000_000, max_polls: 1_000_000 };

    #[test]
    fn a_request_that_completes_in_time_succeeds() {
        let mut r = Requests::new(Sim::new(Some(3), 10), LIMIT);
        for req in [Request::Read { block: 5, bytes: 512 }, Request::Write { block: 6, bytes: 1024 }, Request::Flush] {
            assert_eq!(r.run(req), Ok(()));
        }
        assert_eq!(r.device().completed.len(), 3);
        assert!(!r.disabled());
        r.device().fail_status = true;
        assert_eq!(r.run(Request::Flush), Err(RequestError::Failed("I/O error")));
        // A failed status is the device answering: the disk stays usable.
        assert!(!r.disabled());
    }

    #[test]
    fn a_flush_that_never_completes_times_out_and_disables_the_disk() {
        // 1 ms per clock reading: the 5 s deadline passes after 5000 polls.
        let mut r = Requests::new(Sim::new(None, 1000), LIMIT);
        let err = r.run(Request::Flush).unwrap_err();
        let RequestError::TimedOut { req: Request::Flush, waited_us, polls } = err else { panic!("{err:?}") };
        assert!((5_000_001..=5_001_000).contains(&waited_us), "{waited_us}");
        assert_eq!(polls, 5001);
        assert_eq!(
            RequestError::<&str>::TimedOut { req: Request::Flush, waited_us, polls }.to_string(),
            "flush not completed after 5001 ms (5001 polls); the disk is disabled"
        );
        assert!(r.disabled());
        // Nothing more reaches the device, not even a read.
        assert_eq!(r.run(Request::Read { block: 0, bytes: 512 }), Err(RequestError::Disabled));
        assert_eq!(r.device().submitted, [Request::Flush]);
        assert!(r.device().completed.is_empty());
    }

    #[test]
    fn reads_and_writes_have_the_same_deadline() {
        for req in [Request::Read { block: 9, bytes: 4096 }, Request::Write { block: 9, bytes: 4096 }] {
            let mut r = Requests::new(Sim::new(None, 1000), LIMIT);
            assert!(matches!(r.run(req), Err(RequestError::TimedOut { polls: 5001, .. })));
            assert!(r.disabled());
        }
        // A completion just inside the deadline is taken.
        let mut r = Requests::new(Sim::new(Some(4999), 1000), LIMIT);
        assert_eq!(r.run(Request::Flush), Ok(()));
    }

    #[test]
    fn a_stopped_clock_still_times_out_by_poll_count() {
        let mut r = Requests::new(Sim::new(None, 0), Deadline { timeout_us: 5_000_000, max_polls: 10_000 });
        let err = r.run(Request::Flush).unwrap_err();
        assert_eq!(err, RequestError::TimedOut { req: Request::Flush, waited_us: 0, polls: 10_000 });
        assert!(r.disabled());
    }

    #[test]
    fn requests_say_where_they_were() {
        assert_eq!(Request::Flush.block(), 0);
        assert!(Request::Flush.is_write());
        assert!(!Request::Read { block: 3, bytes: 512 }.is_write());
        assert_eq!(Request::Write { block: 3, bytes: 512 }.to_string(), "write of 512 bytes at block 3");
    }
}
