//! The vGPU vhost-user device backend.
//!
//! A [`Backend`] listens on a vhost-user socket and serves any number of
//! frontends at once, each with its own sessions, all sharing one executor
//! ([`gpu::Gpu`]) and one slice's memory accounting.
//!
//! Layout: [`server`] accepts connections; [`device`] is the vhost-user
//! device of one connection; [`queue`] walks descriptor chains;
//! [`connection`] decodes requests and handles the control queue;
//! [`session`] and [`ops`] hold and check every guest handle and device
//! address; [`guest`] translates guest memory; [`gpu`] executes.
//! [`metering`] counts each session's usage, [`reporting`] sends it to the
//! scheduler's ledger once a second, and [`signals`] stops the backend
//! cleanly on SIGTERM.
//!
//! In-process use (tests):
//! ```no_run
//! use vgpu_backend::{Backend, BackendConfig, DeviceSpec};
//! let backend = Backend::new(BackendConfig::new("/tmp/vgpu.sock", DeviceSpec::Emulated))?;
//! let running = backend.spawn()?;
//! // ... connect frontends to /tmp/vgpu.sock ...
//! running.stop()?;
//! # Ok::<(), vgpu_backend::Error>(())
//! ```

pub mod config;
pub mod connection;
pub mod device;
pub mod devmem;
pub mod elastic;
pub mod gpu;
pub mod guest;
pub mod memctl;
pub mod metering;
pub mod ops;
mod ops_link;
pub mod queue;
pub mod reply;
pub mod reporting;
pub mod server;
pub mod session;
pub mod shared;
mod shm;
pub mod signals;
pub mod slice;
#[cfg(test)]
mod testutil;
pub mod throttle;
pub mod workers;

pub use config::{BackendConfig, ConfigError, DeviceSpec, Isolation, SliceUuid, WorkerRole};
pub use server::{Backend, Error, RunningBackend, StopHandle};
pub use slice::SliceMemory;
pub use throttle::Throttle;
pub use workers::{PoolStopHandle, WorkerPool};
