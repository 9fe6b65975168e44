//! Compute policy: who may dispatch GPU work now.
//!
//! A policy is pure: it sees the slices and what they consumed, and the time as an input, and
//! answers one [`Grant`] per slice. It does no I/O and reads no clock; the arbiter
//! (`crate::arbiter`) feeds it from the grant board and writes its answers back. That keeps
//! the mechanism apart, so other policies (MPS spatial sharing, a utility-guided split) can
//! implement [`Policy`] later.
pub mod share;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use share::{SharePolicy, SharePolicyConfig};
pub use vgpu_board::Grant;

use crate::slice::SliceClass;

/// What a policy knows about one attached slice at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceInput {
    /// Stable identity (the board slot).
    pub id: usize,
    /// Changes when the identity is reused by another slice (the board slot's generation);
    /// the policy forgets what it knew when it changes.
    pub generation: u64,
    /// GPU index.
    pub gpu: u32,
    /// Priority class.
    pub class: SliceClass,
    /// Guaranteed compute %.
    pub guarantee_pct: u32,
    /// Maximum compute %.
    pub max_pct: u32,
    /// Weight when sharing time beyond guarantees (≥ 1).
    pub weight: u32,
    /// The slice has GPU work queued, waiting or in flight.
    pub busy: bool,
    /// GPU time it consumed so far, nanoseconds (a counter that only grows; a drop means it
    /// was reset).
    pub busy_ns: u64,
}

/// A compute policy.
pub trait Policy: Send {
    /// Decides the grants at time `now_ns` (a monotonic clock, nanoseconds): one per slice, in
    /// the order of `slices`. Called every tick with every attached slice.
    fn decide(&mut self, now_ns: u64, slices: &[SliceInput]) -> Vec<Grant>;
}
