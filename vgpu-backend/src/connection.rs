//! One frontend connection's requests: decoding, queue checks, the control
//! opcodes, and routing to sessions.

use std::collections::HashMap;
use std::sync::Arc;

use vgpu_spec::wire::{op, ReqHeader};
use vgpu_spec::{Request, Status, CONTROL_QUEUE, PROTOCOL_VERSION, SUBMISSION_QUEUE};
use zerocopy::FromBytes;

use crate::guest::GuestMemoryMmap;
use crate::reply::{self, Reply};
use crate::session::Session;
use crate::shared::DeviceShared;

/// The request id of a chain that could not be decoded, if its header got
/// through.
pub fn request_id_of(bytes: &[u8]) -> u64 {
    ReqHeader::read_from_prefix(bytes)
        .map(|(h, _)| h.request_id.get())
        .unwrap_or(0)
}

/// The sessions of one frontend connection.
pub struct Connection {
    shared: Arc<DeviceShared>,
    sessions: HashMap<u64, Session>,
    next_session: u64,
}

impl Connection {
    /// A connection with no sessions.
    pub fn new(shared: Arc<DeviceShared>) -> Self {
        Connection {
            shared,
            sessions: HashMap::new(),
            next_session: 1,
        }
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A session, for inspection.
    pub fn session(&self, id: u64) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// Handles the readable bytes of one chain that arrived on `queue` and
    /// writes the whole response (header and body) into `out`.
    pub fn handle(&mut self, queue: u16, bytes: &[u8], mem: &GuestMemoryMmap, out: &mut Vec<u8>) {
        let (header, req) = match Request::decode(bytes) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::debug!(queue, error = %e, "Undecodable request");
                reply::encode(Err(e.status()), request_id_of(bytes), out);
                return;
            }
        };
        let request_id = header.request_id.get();
        let opcode = header.opcode.get();
        let expected = if op::is_control(opcode) {
            CONTROL_QUEUE
        } else {
            SUBMISSION_QUEUE
        };
        let result = if queue != expected {
            tracing::debug!(queue, opcode, "Request on the wrong queue");
            Err(Status::INVALID_VALUE)
        } else {
            self.dispatch(&header, &req, mem)
        };
        if let Err(status) = result {
            tracing::trace!(opcode, session = header.session.get(), %status, "Request failed");
            if status.is_sticky() {
                self.shared.poison(status);
            }
        }
        reply::encode(result, request_id, out);
    }

    fn dispatch(
        &mut self,
        header: &ReqHeader,
        req: &Request<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<Reply, Status> {
        match req {
            Request::GetDeviceInfo => {
                let (resp, attrs) = self.shared.device_info();
                Ok(Reply::DeviceInfo(resp, attrs))
            }
            Request::SessionOpen(r) => {
                if r.version.get() != PROTOCOL_VERSION {
                    return Err(Status::NOT_SUPPORTED);
                }
                if self.sessions.len() >= self.shared.max_sessions as usize {
                    return Err(Status::DEVICE_UNAVAILABLE);
                }
                let id = self.next_session;
                self.next_session += 1;
                let session = Session::new(
                    id,
                    r.pid.get(),
                    self.shared.gpu.clone(),
                    self.shared.slice.clone(),
                )
                .with_throttle(self.shared.throttle.clone())
                .with_meter(self.shared.meters.open_session())
                .with_claimer(self.shared.claimer.clone());
                tracing::debug!(
                    session = id,
                    meter = session.meter().id(),
                    pid = r.pid.get(),
                    "Session opened"
                );
                self.sessions.insert(id, session);
                crate::elastic::session_opened();
                Ok(Reply::Session(id))
            }
            Request::SessionClose => {
                let session = self
                    .sessions
                    .remove(&header.session.get())
                    .ok_or(Status::INVALID_HANDLE)?;
                drop(session);
                Ok(Reply::Empty)
            }
            _ => {
                // About to be held by the grant board: close every open in-flight batch
                // first, so the hold is not timed as GPU work of this connection's sessions.
                if crate::ops::is_gpu_work(req) && self.shared.throttle.would_hold() {
                    self.end_batch();
                }
                self.sessions
                    .get_mut(&header.session.get())
                    .ok_or(Status::INVALID_HANDLE)?
                    .execute(header, req, mem)
            }
        }
    }

    /// Marks the end of a queue batch in every context (in-flight
    /// tracking; only with a grant board).
    pub fn end_batch(&mut self) {
        for session in self.sessions.values_mut() {
            session.end_batch();
        }
    }

    /// Waits for all work of all sessions, before guest memory is unmapped.
    pub fn synchronize_all(&mut self) {
        for session in self.sessions.values_mut() {
            session.synchronize_all();
        }
    }

    /// Swaps every session's device memory out; bytes moved.
    pub fn swap_out_all(&mut self) -> Result<u64, Status> {
        self.each_session(Session::swap_out_all)
    }

    /// Swaps every session's device memory back in; bytes moved.
    pub fn swap_in_all(&mut self) -> Result<u64, Status> {
        self.each_session(Session::swap_in_all)
    }

    fn each_session(
        &mut self,
        step: impl Fn(&mut Session) -> Result<u64, Status>,
    ) -> Result<u64, Status> {
        self.sessions
            .values_mut()
            .try_fold(0u64, |acc, s| step(s).map(|n| acc.saturating_add(n)))
    }

    /// Every session's device memory.
    pub fn memory_usage(&self) -> crate::gpu::MemoryUsage {
        self.sessions
            .values()
            .fold(crate::gpu::MemoryUsage::default(), |acc, s| {
                acc + s.memory_usage()
            })
    }

    /// Closes every session, freeing all they hold.
    pub fn close_all(&mut self) {
        let n = self.sessions.len();
        self.sessions.clear();
        if n > 0 {
            tracing::info!(
                sessions = n,
                "Closed the sessions of a disconnected frontend"
            );
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_all();
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
