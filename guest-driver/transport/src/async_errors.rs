//! Failures of asynchronous requests, kept per context.
//!
//! An async request is answered after [`crate::Device::submit`] returned, so
//! a failure can only be reported later. It belongs to the context named in
//! the request's header: the driver asks for the failures of one context
//! (the one a synchronizing call runs in) and leaves every other context's
//! alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vgpu_spec::Status;

use crate::queue::lock;

/// The first failed async status of each context not yet taken, in the
/// order they arrived.
#[derive(Default)]
pub struct AsyncErrors {
    pending: Mutex<Vec<(u64, Status)>>,
    /// `pending.len()`, read without the lock by the common "nothing
    /// failed" path.
    count: AtomicUsize,
}

impl AsyncErrors {
    /// Remembers that an async request of `context` failed with `status`.
    /// Success is ignored; a context that already has a failure pending
    /// keeps its first one.
    pub fn record(&self, context: u64, status: Status) {
        if status.is_success() {
            return;
        }
        let mut pending = lock(&self.pending);
        if pending.iter().all(|&(c, _)| c != context) {
            pending.push((context, status));
            self.count.store(pending.len(), Ordering::Release);
        }
    }

    /// The pending failure of `context`, cleared.
    pub fn take(&self, context: u64) -> Option<Status> {
        self.take_where(|c| c == context)
    }

    /// The earliest pending failure of any context, cleared.
    pub fn take_any(&self) -> Option<Status> {
        self.take_where(|_| true)
    }

    fn take_where(&self, wanted: impl Fn(u64) -> bool) -> Option<Status> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut pending = lock(&self.pending);
        let index = pending.iter().position(|&(c, _)| wanted(c))?;
        let (_, status) = pending.remove(index);
        self.count.store(pending.len(), Ordering::Release);
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_pending_until_a_request_fails() {
        let errors = AsyncErrors::default();
        errors.record(1, Status::SUCCESS);
        assert_eq!(errors.take(1), None);
        assert_eq!(errors.take_any(), None);
    }

    #[test]
    fn a_failure_is_returned_only_for_its_own_context_and_only_once() {
        let errors = AsyncErrors::default();
        errors.record(7, Status::ILLEGAL_ADDRESS);
        assert_eq!(errors.take(8), None);
        assert_eq!(errors.take(7), Some(Status::ILLEGAL_ADDRESS));
        assert_eq!(errors.take(7), None);
    }

    #[test]
    fn a_context_keeps_its_first_failure() {
        let errors = AsyncErrors::default();
        errors.record(7, Status::INVALID_VALUE);
        errors.record(7, Status::LAUNCH_FAILED);
        assert_eq!(errors.take(7), Some(Status::INVALID_VALUE));
        assert_eq!(errors.take(7), None);
    }

    #[test]
    fn take_any_returns_the_earliest_failure_of_any_context() {
        let errors = AsyncErrors::default();
        errors.record(2, Status::LAUNCH_FAILED);
        errors.record(1, Status::INVALID_VALUE);
        assert_eq!(errors.take_any(), Some(Status::LAUNCH_FAILED));
        assert_eq!(errors.take_any(), Some(Status::INVALID_VALUE));
        assert_eq!(errors.take_any(), None);
    }

    #[test]
    fn taking_one_context_leaves_the_others_pending() {
        let errors = AsyncErrors::default();
        errors.record(1, Status::INVALID_VALUE);
        errors.record(2, Status::ILLEGAL_ADDRESS);
        assert_eq!(errors.take(2), Some(Status::ILLEGAL_ADDRESS));
        assert_eq!(errors.take(1), Some(Status::INVALID_VALUE));
        assert_eq!(errors.take_any(), None);
    }
}
