//! `vgpuctl`: the command-line client of the vgpu scheduler's REST API.
//!
//! - [`cli`]: the command line and the request each command sends.
//! - [`client`]: HTTP to the scheduler over its Unix socket (or TCP), errors with the
//!   scheduler's own message.
//! - [`api`]: request bodies and answers of the REST API.
//! - [`run`]: running a command, VM hotplug included (through `vgpu_vmm::attach`).
//! - [`table`], [`size`]: tables and byte sizes.
//! - [`usage`]: `vgpuctl usage` and `vgpuctl usage export`.

pub mod api;
pub mod cli;
pub mod client;
pub mod run;
pub mod size;
pub mod table;
pub mod usage;

pub use cli::Cli;
pub use run::{run, CtlError};
