//! Errors of asynchronous work, kept per context as CUDA keeps them.
//!
//! Work queued without waiting (launches, async copies, event records)
//! fails after its call returned; the transport hands the failure over under
//! the context the request ran in. From then on:
//! - a *sticky* error (an illegal address, a trap: [`Status::is_sticky`])
//!   poisons its context: every later call in it returns the error, until
//!   the context is destroyed;
//! - any other error is returned once, by the next synchronizing call in
//!   that context.
//!
//! Calls in other contexts never see it.

use std::collections::HashMap;

use vgpu_spec::Status;

/// What a context has pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Returned by the next synchronizing call, then cleared.
    Once(Status),
    /// Returned by every call until the context is destroyed.
    Sticky(Status),
}

/// The pending asynchronous error of every context that has one.
#[derive(Debug, Default)]
pub(crate) struct ContextErrors {
    pending: HashMap<u64, Pending>,
}

impl ContextErrors {
    /// Records that work of `ctx` failed with `status`. A sticky error
    /// replaces a pending one-time error (the context is lost anyway); a
    /// context keeps its first sticky error, and its first one-time error.
    pub(crate) fn record(&mut self, ctx: u64, status: Status) {
        if status.is_success() {
            return;
        }
        let new = if status.is_sticky() {
            Pending::Sticky(status)
        } else {
            Pending::Once(status)
        };
        match (self.pending.get(&ctx), new) {
            (None, _) | (Some(Pending::Once(_)), Pending::Sticky(_)) => {
                self.pending.insert(ctx, new);
            }
            _ => {}
        }
    }

    /// The sticky error of `ctx`, if it is poisoned.
    pub(crate) fn sticky(&self, ctx: u64) -> Option<Status> {
        match self.pending.get(&ctx) {
            Some(Pending::Sticky(status)) => Some(*status),
            _ => None,
        }
    }

    /// What a synchronizing call in `ctx` returns: its sticky error (which
    /// stays), or its one-time error (which is cleared).
    pub(crate) fn take(&mut self, ctx: u64) -> Option<Status> {
        match self.pending.get(&ctx).copied()? {
            Pending::Sticky(status) => Some(status),
            Pending::Once(status) => {
                self.pending.remove(&ctx);
                Some(status)
            }
        }
    }

    /// Drops whatever `ctx` had pending: the context is destroyed.
    pub(crate) fn forget(&mut self, ctx: u64) {
        self.pending.remove(&ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 1;
    const B: u64 = 2;

    #[test]
    fn a_context_without_failures_has_nothing_pending() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::SUCCESS);
        assert_eq!(errors.sticky(A), None);
        assert_eq!(errors.take(A), None);
    }

    #[test]
    fn a_sticky_error_is_returned_by_every_call_of_its_context() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::ILLEGAL_ADDRESS);
        for _ in 0..3 {
            assert_eq!(errors.sticky(A), Some(Status::ILLEGAL_ADDRESS));
            assert_eq!(errors.take(A), Some(Status::ILLEGAL_ADDRESS));
        }
    }

    #[test]
    fn an_error_of_one_context_is_never_returned_in_another() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::LAUNCH_FAILED);
        errors.record(A, Status::INVALID_VALUE);
        assert_eq!(errors.sticky(B), None);
        assert_eq!(errors.take(B), None);
        assert_eq!(errors.sticky(A), Some(Status::LAUNCH_FAILED));
    }

    #[test]
    fn a_non_sticky_error_is_returned_once_and_does_not_poison_the_context() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::INVALID_VALUE);
        assert_eq!(errors.sticky(A), None);
        assert_eq!(errors.take(A), Some(Status::INVALID_VALUE));
        assert_eq!(errors.take(A), None);
    }

    #[test]
    fn a_context_keeps_its_first_non_sticky_error() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::INVALID_VALUE);
        errors.record(A, Status::OUT_OF_MEMORY);
        assert_eq!(errors.take(A), Some(Status::INVALID_VALUE));
        assert_eq!(errors.take(A), None);
    }

    #[test]
    fn a_sticky_error_overrides_a_pending_non_sticky_one_and_stays_first() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::INVALID_VALUE);
        errors.record(A, Status::ILLEGAL_ADDRESS);
        errors.record(A, Status::LAUNCH_FAILED);
        errors.record(A, Status::OUT_OF_MEMORY);
        assert_eq!(errors.sticky(A), Some(Status::ILLEGAL_ADDRESS));
        assert_eq!(errors.take(A), Some(Status::ILLEGAL_ADDRESS));
    }

    #[test]
    fn destroying_a_poisoned_context_clears_its_error_and_no_other() {
        let mut errors = ContextErrors::default();
        errors.record(A, Status::ILLEGAL_ADDRESS);
        errors.record(B, Status::LAUNCH_FAILED);
        errors.forget(A);
        assert_eq!(errors.sticky(A), None);
        assert_eq!(errors.take(A), None);
        assert_eq!(errors.sticky(B), Some(Status::LAUNCH_FAILED));
    }
}
