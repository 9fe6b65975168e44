//! Memory arbitration (decision 7): each slice has a memory guarantee and a limit; above its
//! guarantee it uses idle memory, which the scheduler reclaims when another slice needs memory
//! within its own guarantee.
//!
//! Reclaim is the board's `evict` bit: the victim's backend freezes it, drains its work, swaps
//! its memory out to host memory and publishes `mem_resident` 0 (see `vgpu-backend`'s
//! `memctl`). The scheduler clears the bit again once the GPU has room for the victim's
//! swapped bytes; its backend then maps them back at the same addresses and it runs on.
//!
//! Victims are chosen by [`choose_victims`]: slices on the same GPU holding memory above their
//! guarantee, best-effort before latency-critical, most recently idle first.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::service::{Core, ServiceError};
use crate::slice::SliceClass;

/// How long a reclaim or restore request waits for the backend.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often it looks.
const POLL: Duration = Duration::from_millis(1);

/// One slice's memory, as the board shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SliceMemory {
    /// The slice.
    pub name: String,
    /// Its GPU.
    pub gpu: u32,
    /// Its class.
    pub class: SliceClass,
    /// Its memory guarantee, bytes.
    pub guarantee: u64,
    /// Its memory limit, bytes.
    pub limit: u64,
    /// On the GPU now, bytes.
    pub resident: u64,
    /// Swapped out to host memory, bytes.
    pub swapped: u64,
    /// Reclaims so far.
    pub reclaims: u64,
    /// The scheduler asks it to give its memory back.
    pub evicted: bool,
    /// Reclaimed for a claim: restored by itself once that claim's memory is given back.
    pub claimed: Option<Claimed>,
    /// It has GPU work now (an idle slice is reclaimed first).
    pub busy: bool,
    /// GPU time in the last second, %.
    pub busy_pct: f64,
}

/// Why a slice was reclaimed for another's claim, and so when it may come back: once the
/// claimant has taken what it claimed and then holds no more than it did when it claimed
/// (what it took is back), or once the GPU, with the victim's bytes, is at most
/// `level - bytes` (the level the GPU held when it turned out full, less the claim: known to
/// fit even with the claim still held).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claimed {
    /// The claimant has been seen holding what it claimed (or [`CLAIM_GRACE`] passed without).
    pub taken: bool,
    /// When the claim was made (milliseconds on the scheduler's monotonic clock).
    #[serde(skip)]
    pub at_ms: u64,
    /// The slice that claimed.
    pub claimant: String,
    /// What it held when it claimed, bytes.
    pub claimant_resident: u64,
    /// What the GPU held then, bytes.
    pub level: u64,
    /// What it claimed, bytes.
    pub bytes: u64,
}

/// How long a claimant has to take what it claimed before its victims stop waiting for it.
pub const CLAIM_GRACE: Duration = Duration::from_secs(5);

/// Whether a reclaimed slice's `swapped` bytes may come back, given the GPU's resident bytes
/// now (`used`) and the claimant's.
pub fn may_return(claimed: &Claimed, swapped: u64, used: u64, claimant_resident: u64) -> bool {
    (claimed.taken && claimant_resident <= claimed.claimant_resident)
        || used.saturating_add(swapped) <= claimed.level.saturating_sub(claimed.bytes)
}

/// Milliseconds on a monotonic clock.
pub fn now_ms() -> u64 {
    vgpu_board::monotonic_ns() / 1_000_000
}

/// A claim for memory within a slice's guarantee.
#[derive(Debug, Clone, Deserialize)]
pub struct Claim {
    /// Bytes the slice needs beyond what it holds.
    pub bytes: u64,
}

/// What a reclaim, restore or claim did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The slices whose memory was taken (reclaim, claim) or given back (restore).
    pub slices: Vec<String>,
    /// Bytes moved (swapped out or back in).
    pub bytes: u64,
    /// Time from the request to the backends' confirmation, milliseconds.
    pub ms: f64,
}

/// Picks the slices to reclaim so that `needed` bytes come free for `claimant`: slices on its
/// GPU with memory above their guarantee (what they hold beyond it is what can be taken),
/// best-effort first, then the idle before the busy, the least recently busy first. Returns
/// the victims' names, or `None` when even all of them would not free enough.
pub fn choose_victims(all: &[SliceMemory], claimant: &str, needed: u64) -> Option<Vec<String>> {
    let me = all.iter().find(|s| s.name == claimant)?;
    let mut candidates: Vec<&SliceMemory> = all
        .iter()
        .filter(|s| s.name != claimant && s.gpu == me.gpu && !s.evicted && s.resident > s.guarantee)
        .collect();
    candidates.sort_by(|a, b| {
        let rank = |s: &SliceMemory| (s.class == SliceClass::LatencyCritical, s.busy);
        rank(a)
            .cmp(&rank(b))
            .then(a.busy_pct.total_cmp(&b.busy_pct))
    });
    let mut freed = 0u64;
    let mut victims = Vec::new();
    for c in candidates {
        if freed >= needed {
            break;
        }
        // The whole slice is swapped out, so all it holds comes free.
        freed = freed.saturating_add(c.resident);
        victims.push(c.name.clone());
    }
    (freed >= needed).then_some(victims)
}

/// Why a memory request failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// From the registry or board.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The slice holds no board slot (not attached).
    #[error("Slice {0} is not attached")]
    NotAttached(String),
    /// A claim beyond the slice's guarantee: such memory is only lent when idle.
    #[error("Slice {name} asks for {bytes} bytes beyond its memory guarantee of {guarantee} bytes (it holds {resident}); memory above the guarantee is only lent, not reclaimed for")]
    BeyondGuarantee {
        /// The slice.
        name: String,
        /// Bytes asked for.
        bytes: u64,
        /// Its guarantee.
        guarantee: u64,
        /// What it holds.
        resident: u64,
    },
    /// Not enough memory above other slices' guarantees.
    #[error("No slice on GPU {gpu} holds {bytes} bytes above its guarantee to give back")]
    NothingToReclaim {
        /// The GPU.
        gpu: u32,
        /// Bytes asked for.
        bytes: u64,
    },
    /// The backends did not confirm in time.
    #[error("The backends of {0:?} did not confirm within {WAIT:?}")]
    Timeout(Vec<String>),
}

impl Core {
    /// Reclaims every named slice's memory and waits until their backends confirm (nothing
    /// resident).
    pub async fn reclaim(&self, names: &[String]) -> Result<Outcome, MemoryError> {
        self.reclaim_for(names, None).await
    }

    async fn reclaim_for(
        &self,
        names: &[String],
        claimed: Option<Claimed>,
    ) -> Result<Outcome, MemoryError> {
        self.set_and_wait(names, true, claimed).await
    }

    /// Gives the named slices their memory back and waits until their backends confirm.
    pub async fn restore(&self, names: &[String]) -> Result<Outcome, MemoryError> {
        self.set_and_wait(names, false, None).await
    }

    /// Sets (or clears) `evict` for the named slices and waits until their backends confirm:
    /// nothing resident once evicted, nothing swapped once restored. The outcome's bytes are
    /// what was to move (resident, or swapped) when asked.
    async fn set_and_wait(
        &self,
        names: &[String],
        evict: bool,
        claimed: Option<Claimed>,
    ) -> Result<Outcome, MemoryError> {
        let start = Instant::now();
        let moving = |m: &SliceMemory| if evict { m.resident } else { m.swapped };
        let before: u64 = self.memory_of(names)?.iter().map(moving).sum();
        for name in names {
            self.set_evicted(name, evict, claimed.clone())?;
        }
        self.wait_for(names, |m| moving(m) == 0 && m.evicted == evict)
            .await?;
        Ok(Outcome {
            slices: names.to_vec(),
            bytes: before,
            ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// A slice needs `bytes` more within its guarantee and the GPU is full: reclaims what the
    /// policy picks from other slices.
    pub async fn claim(&self, name: &str, bytes: u64) -> Result<Outcome, MemoryError> {
        let all = self.memory();
        let me = all
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| MemoryError::NotAttached(name.to_string()))?;
        if me.resident.saturating_add(bytes) > me.guarantee {
            return Err(MemoryError::BeyondGuarantee {
                name: name.to_string(),
                bytes,
                guarantee: me.guarantee,
                resident: me.resident,
            });
        }
        let victims = choose_victims(&all, name, bytes)
            .ok_or(MemoryError::NothingToReclaim { gpu: me.gpu, bytes })?;
        // The GPU held this much when it turned out full for `bytes` more: the victims fit
        // again once the GPU is back at or below it with them.
        let level: u64 = all
            .iter()
            .filter(|m| m.gpu == me.gpu)
            .map(|m| m.resident)
            .sum();
        tracing::info!(slice = %name, bytes, ?victims, level, "reclaiming memory for a slice within its guarantee");
        let claimed = Claimed {
            taken: false,
            at_ms: now_ms(),
            claimant: name.to_string(),
            claimant_resident: me.resident,
            level,
            bytes,
        };
        self.reclaim_for(&victims, Some(claimed)).await
    }

    /// Clears `evict` for slices reclaimed for a claim once their memory may come back
    /// ([`may_return`]); never before they have swapped out. A backend that still cannot map
    /// it stays frozen and retries. Called periodically.
    pub fn restore_when_room(&self) {
        let all = self.memory();
        for m in &all {
            let Some(claimed) = m.claimed.as_ref().filter(|_| m.evicted && m.resident == 0) else {
                continue;
            };
            let used: u64 = all
                .iter()
                .filter(|o| o.gpu == m.gpu)
                .map(|o| o.resident)
                .sum();
            let claimant = all
                .iter()
                .find(|o| o.name == claimed.claimant)
                .map_or(0, |o| o.resident);
            if !claimed.taken
                && (claimant >= claimed.claimant_resident.saturating_add(claimed.bytes)
                    || now_ms().saturating_sub(claimed.at_ms) > CLAIM_GRACE.as_millis() as u64)
            {
                let mut taken = claimed.clone();
                taken.taken = true;
                if let Err(e) = self.set_evicted(&m.name, true, Some(taken)) {
                    tracing::warn!(slice = %m.name, "cannot update its claim: {e}");
                }
                continue;
            }
            if may_return(claimed, m.swapped, used, claimant) {
                if let Err(e) = self.set_evicted(&m.name, false, None) {
                    tracing::warn!(slice = %m.name, "cannot restore: {e}");
                } else {
                    tracing::info!(slice = %m.name, swapped = m.swapped, used, claimant, "the claim's memory is back: restoring");
                }
            }
        }
    }

    fn memory_of(&self, names: &[String]) -> Result<Vec<SliceMemory>, MemoryError> {
        let all = self.memory();
        names
            .iter()
            .map(|n| {
                all.iter()
                    .find(|m| &m.name == n)
                    .cloned()
                    .ok_or_else(|| MemoryError::NotAttached(n.clone()))
            })
            .collect()
    }

    async fn wait_for(
        &self,
        names: &[String],
        done: impl Fn(&SliceMemory) -> bool,
    ) -> Result<(), MemoryError> {
        let deadline = Instant::now() + WAIT;
        loop {
            let all = self.memory_of(names)?;
            if all.iter().all(&done) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MemoryError::Timeout(names.to_vec()));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
