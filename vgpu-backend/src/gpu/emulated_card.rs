//! The physical memory of one emulated GPU, shared by every backend process on it.
//!
//! A real GPU runs out of memory for everyone at once; for the scheduler's memory arbitration
//! (a claim that reclaims other slices) to be testable without one, the emulated device's
//! elastic memory takes its chunks from a budget kept in a small shared file next to the
//! emulated GPU's lock (`emulated-gpu-N.mem`). Each process counts its own bytes in a row
//! tagged with its pid; the total is the sum of the rows of live processes, so a process that
//! dies (a killed worker) leaves nothing counted.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::shm::{Atomics, SharedMap};

/// Processes one emulated GPU can count.
const ROWS: usize = 256;

#[repr(C)]
struct Row {
    pid: AtomicU64,
    bytes: AtomicU64,
}

#[repr(C)]
struct Layout {
    rows: [Row; ROWS],
}

const LEN: usize = std::mem::size_of::<Layout>();
const _: () = assert!(LEN == 4096);

// SAFETY: `Layout` is a `#[repr(C)]` array of rows of atomics only.
unsafe impl Atomics for Layout {}

/// This process's share of an emulated GPU's memory.
pub struct EmulatedCard {
    map: SharedMap<Layout>,
    total: u64,
    row: usize,
}

impl Drop for EmulatedCard {
    fn drop(&mut self) {
        let row = &self.layout().rows[self.row];
        row.bytes.store(0, Ordering::Release);
        row.pid.store(0, Ordering::Release);
    }
}

fn alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl EmulatedCard {
    /// Opens (creating it if needed) the budget file of an emulated GPU with `total` bytes and
    /// takes a row for this process.
    pub fn open(path: &Path, total: u64) -> io::Result<EmulatedCard> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < LEN as u64 {
            file.set_len(LEN as u64)?;
        }
        let map = SharedMap::map(&file)?;
        let me = u64::from(std::process::id());
        let mut card = EmulatedCard {
            map,
            total,
            row: ROWS,
        };
        for (i, row) in card.layout().rows.iter().enumerate() {
            let pid = row.pid.load(Ordering::Acquire);
            if (pid == 0 || !alive(pid))
                && row
                    .pid
                    .compare_exchange(pid, me, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                row.bytes.store(0, Ordering::Release);
                card.row = i;
                break;
            }
        }
        if card.row == ROWS {
            return Err(io::Error::other(format!(
                "All {ROWS} rows of {} are taken by live processes",
                path.display()
            )));
        }
        Ok(card)
    }

    fn layout(&self) -> &Layout {
        self.map.get()
    }

    /// Bytes taken by live processes.
    pub fn used(&self) -> u64 {
        self.layout()
            .rows
            .iter()
            .filter(|r| {
                let pid = r.pid.load(Ordering::Acquire);
                pid != 0 && alive(pid)
            })
            .map(|r| r.bytes.load(Ordering::Acquire))
            .fold(0u64, u64::saturating_add)
    }

    /// Takes `bytes` if the GPU has them; false (nothing taken) when it is full.
    pub fn try_take(&self, bytes: u64) -> bool {
        let mine = &self.layout().rows[self.row].bytes;
        mine.fetch_add(bytes, Ordering::AcqRel);
        if self.used() > self.total {
            mine.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives `bytes` back.
    pub fn give(&self, bytes: u64) {
        let mine = &self.layout().rows[self.row].bytes;
        let _ = mine.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            Some(b.saturating_sub(bytes))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_on_one_emulated_gpu_share_its_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.mem");
        let a = EmulatedCard::open(&path, 100).unwrap();
        let b = EmulatedCard::open(&path, 100).unwrap();
        assert!(a.try_take(60));
        assert!(!b.try_take(41), "only 40 bytes left");
        assert!(b.try_take(40));
        assert_eq!(a.used(), 100);
        a.give(60);
        assert!(b.try_take(60));
        drop(b);
        assert_eq!(a.used(), 0, "a dropped share counts nothing");
    }

    #[test]
    fn a_dead_processes_row_counts_nothing_and_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.mem");
        let a = EmulatedCard::open(&path, 100).unwrap();
        // A row left by a process that no longer exists (pid far beyond pid_max).
        a.layout().rows[ROWS - 1]
            .pid
            .store(u64::from(u32::MAX), Ordering::Release);
        a.layout().rows[ROWS - 1].bytes.store(90, Ordering::Release);
        assert_eq!(a.used(), 0);
        assert!(a.try_take(100));
    }
}
