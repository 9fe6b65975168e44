//! Virtqueue processing: gathering a chain's request bytes, writing its
//! response, and the notification-suppression loop.
//!
//! Nothing a guest puts in a chain can make this panic: descriptors are read
//! and written only through vm-memory's checked accessors, and a chain that
//! cannot be read gets an error response (or, with nowhere to write one, a
//! zero-length used entry).

use std::sync::Arc;

use thiserror::Error;
use vgpu_spec::{response, Status, MAX_REQUEST_BYTES};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::connection::request_id_of;
use crate::guest::GuestMemoryMmap;

/// Size of a response header; a response is only written if this fits.
const RESP_HEADER_BYTES: usize = std::mem::size_of::<vgpu_spec::wire::RespHeader>();

/// Request buffers above this are released after use rather than kept.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

/// A queue could not be serviced.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The ring itself (not a chain) is unusable.
    #[error("Virtqueue {queue} is broken: {source}")]
    Ring {
        /// The queue index.
        queue: u16,
        /// What virtio-queue reported.
        source: virtio_queue::Error,
    },
}

/// Handles one request: the readable bytes in, the full response out.
pub trait RequestHandler {
    /// Handles the readable bytes of one chain that arrived on `queue`,
    /// writing the response into `out` (empty on entry).
    fn handle(&mut self, queue: u16, request: &[u8], mem: &GuestMemoryMmap, out: &mut Vec<u8>);
}

/// What one [`QueueWorker::process`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processed {
    /// Chains returned to the used ring.
    pub handled: usize,
    /// True if the driver asked to be notified of them.
    pub notify: bool,
}

/// Reusable buffers for processing a queue.
#[derive(Default)]
pub struct QueueWorker {
    request: Vec<u8>,
    response: Vec<u8>,
    writable: Vec<(GuestAddress, usize)>,
}

impl QueueWorker {
    /// A worker with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Processes every available chain of `queue`, re-checking after
    /// enabling notifications. `mem` serves the ring itself; each chain's
    /// buffers and guest ranges are resolved against `latest()`, loaded after
    /// the chain is popped, because a frontend may add a memory region
    /// (`ADD_MEM_REG`, acknowledged before it uses it) while this pass runs.
    pub fn process(
        &mut self,
        queue_index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        latest: &dyn Fn() -> Arc<GuestMemoryMmap>,
        handler: &mut dyn RequestHandler,
    ) -> Result<Processed, QueueError> {
        let ring = |source| QueueError::Ring {
            queue: queue_index,
            source,
        };
        let mut total = 0usize;
        let mut idle_rounds = 0;
        loop {
            queue.disable_notification(mem).map_err(ring)?;
            let mut handled = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let current = latest();
                let len = self.process_chain(queue_index, chain, &current, handler);
                queue.add_used(mem, head, len).map_err(ring)?;
                handled += 1;
            }
            total += handled;
            if !queue.enable_notification(mem).map_err(ring)? {
                break;
            }
            // More is pending. If two rounds in a row find "more" but pop
            // nothing, the available index is corrupt: stop rather than spin.
            if handled == 0 {
                idle_rounds += 1;
                if idle_rounds >= 2 {
                    tracing::warn!(
                        queue = queue_index,
                        "Available ring index is invalid; ignoring the queue until the next kick"
                    );
                    break;
                }
            } else {
                idle_rounds = 0;
            }
        }
        let notify = total > 0 && queue.needs_notification(mem).map_err(ring)?;
        Ok(Processed {
            handled: total,
            notify,
        })
    }

    /// Busy-polls the available ring for up to `budget` with kicks
    /// suppressed, so a driver issuing calls back to back is served without
    /// a kick and a thread wake-up each time. Returns true as soon as a new
    /// chain is available; false, with notifications enabled again, when
    /// the budget runs out.
    pub fn poll_for_more(
        queue_index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        budget: std::time::Duration,
    ) -> Result<bool, QueueError> {
        let ring = |source| QueueError::Ring {
            queue: queue_index,
            source,
        };
        queue.disable_notification(mem).map_err(ring)?;
        let start = std::time::Instant::now();
        while start.elapsed() < budget {
            let avail = queue
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(ring)?;
            if avail.0 != queue.next_avail() {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        // Arrivals between the last look and re-enabling are reported here.
        queue.enable_notification(mem).map_err(ring)
    }

    /// Processes one chain; returns the used length.
    fn process_chain(
        &mut self,
        queue: u16,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        handler: &mut dyn RequestHandler,
    ) -> u32 {
        // The descriptors were read through the ring's table; their buffers
        // are read through `mem`, the table current for this chain.
        self.request.clear();
        self.response.clear();
        self.writable.clear();
        let fault = self.gather(chain, mem);
        match fault {
            Some(status) => {
                tracing::debug!(queue, %status, "Malformed descriptor chain");
                response::encode_status(status, request_id_of(&self.request), &mut self.response);
            }
            None => handler.handle(queue, &self.request, mem, &mut self.response),
        }
        let used = self.write_response(queue, mem);
        if self.request.capacity() > KEEP_BUFFER_BYTES {
            self.request = Vec::new();
        }
        used
    }

    /// Reads the readable descriptors into `self.request` and records the
    /// writable ones. Returns the status to answer with if the chain is bad.
    fn gather(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<Status> {
        let mut fault = None;
        let mut seen_writable = false;
        let mut writable_ok = true;
        for desc in chain {
            let addr = desc.addr();
            let len = desc.len() as usize;
            if desc.is_write_only() {
                seen_writable = true;
                // The response goes to the writable prefix that is all
                // inside guest memory.
                if writable_ok && GuestMemoryBackend::check_range(mem, addr, len) {
                    self.writable.push((addr, len));
                } else {
                    writable_ok = false;
                    fault = fault.or(Some(Status::INVALID_VALUE));
                }
                continue;
            }
            if seen_writable {
                // Readable after writable breaks the virtio layout.
                fault = fault.or(Some(Status::INVALID_VALUE));
                continue;
            }
            if fault.is_some() {
                continue;
            }
            let start = self.request.len();
            if (start + len) as u64 > MAX_REQUEST_BYTES {
                fault = Some(Status::INVALID_VALUE);
                continue;
            }
            if !GuestMemoryBackend::check_range(mem, addr, len) {
                fault = Some(Status::INVALID_VALUE);
                continue;
            }
            self.request.resize(start + len, 0);
            if mem.read_slice(&mut self.request[start..], addr).is_err() {
                self.request.truncate(start);
                fault = Some(Status::INVALID_VALUE);
            }
        }
        fault
    }

    /// Writes `self.response` across the writable descriptors; returns the
    /// bytes written (zero if not even the header fits).
    fn write_response(&mut self, queue: u16, mem: &GuestMemoryMmap) -> u32 {
        let capacity: usize = self.writable.iter().map(|(_, len)| *len).sum();
        if capacity < RESP_HEADER_BYTES.min(self.response.len()) {
            tracing::warn!(
                queue,
                capacity,
                "No room for a response header; chain returned with no response"
            );
            return 0;
        }
        if capacity < self.response.len() {
            tracing::warn!(
                queue,
                capacity,
                needed = self.response.len(),
                "Response truncated to the chain's writable space"
            );
        }
        let mut written = 0usize;
        for (addr, len) in &self.writable {
            if written == self.response.len() {
                break;
            }
            let n = (*len).min(self.response.len() - written);
            if mem
                .write_slice(&self.response[written..written + n], *addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        written as u32
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
