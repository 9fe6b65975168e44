//! Running a parsed command: scheduler requests, VM hotplug, and what is printed.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use vgpu_vmm::attach::{self, AttachError, Options};
use vgpu_vmm::cloud_hypervisor::AddOutcome;
use vgpu_vmm::target::{TargetError, VmTarget};

use crate::api::{slice_path, ApiRequest, Slice, Util};
use crate::cli::{Cli, Command, VmArgs};
use crate::client::{Client, ClientError, Endpoint};
use crate::size::format_size;
use crate::table::{number, slices_table, util_table};
use crate::usage::{run_usage, UsageError};

/// Errors of a vgpuctl command; printed as `vgpuctl: <message>`, exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The scheduler refused or could not be reached.
    #[error(transparent)]
    Scheduler(#[from] ClientError),
    /// The VM hotplug or unplug failed.
    #[error(transparent)]
    Vm(#[from] AttachError),
    /// A slice argument that is neither a name nor an absolute path.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The scheduler says a slice is attached but gives no socket.
    #[error("The scheduler reported no backend socket for slice {0}")]
    NoSocket(String),
    /// Unplugging by socket path, without a device id.
    #[error("Detaching {0} from a VM needs --id (the id attach printed)")]
    NeedId(String),
    /// Writing the output failed.
    #[error("Cannot write the output: {0}")]
    Output(#[from] io::Error),
}

impl From<UsageError> for CtlError {
    fn from(e: UsageError) -> CtlError {
        match e {
            UsageError::Scheduler(e) => CtlError::Scheduler(e),
            UsageError::Output(e) => CtlError::Output(e),
        }
    }
}

impl CtlError {
    /// Output that cannot be written because the reader went away (`vgpuctl util --watch | head`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CtlError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Runs `cli`; `env_scheduler` is `$VGPU_SCHEDULER`. Output goes to `out`.
pub fn run(cli: Cli, env_scheduler: Option<&str>, out: &mut dyn Write) -> Result<(), CtlError> {
    let endpoint = Endpoint::resolve(cli.scheduler.as_deref(), env_scheduler)?;
    let client = Client::new(endpoint);
    let command = cli.command;
    match &command {
        Command::Create { .. } | Command::Resize { .. } => {
            let slice: Slice = client.send_json(&command.request())?;
            let verb = if matches!(command, Command::Create { .. }) {
                "created"
            } else {
                "resized"
            };
            writeln!(out, "{verb} {}: {}", slice.name, describe(&slice))?;
            if slice.attached {
                writeln!(out, "{}", attached_line(&slice))?;
            }
        }
        Command::List { json } => {
            let request = command.request();
            if *json {
                print_raw(out, &client.send(&request)?.body)?;
            } else {
                let slices: Vec<Slice> = client.send_json(&request)?;
                out.write_all(slices_table(&slices).as_bytes())?;
            }
        }
        Command::Delete { name } => {
            client.send(&command.request())?;
            writeln!(out, "deleted {name}")?;
        }
        Command::Attach { name, vm } => match &vm.vm {
            None => {
                let slice: Slice = client.send_json(&command.request())?;
                writeln!(out, "{}", attached_line(&slice))?;
            }
            Some(target) => attach_to_vm(&client, name, target, vm, out)?,
        },
        Command::Detach { name, vm } => {
            if let Some(target) = &vm.vm {
                let path = socket_path(name)?;
                let id = match (&vm.id, &path) {
                    (Some(id), _) => id.clone(),
                    (None, None) => name.clone(),
                    (None, Some(_)) => return Err(CtlError::NeedId(name.clone())),
                };
                attach::detach(target, &id, vm_options(vm))?;
                writeln!(out, "unplugged {id} from {target}")?;
                if path.is_some() {
                    return Ok(());
                }
            }
            client.send(&command.request())?;
            writeln!(out, "detached {name}")?;
        }
        Command::Util { watch, json } => util(&client, &command.request(), *watch, *json, out)?,
        Command::Reclaim { name } | Command::Restore { name } => {
            let done: serde_json::Value = client.send_json(&command.request())?;
            let verb = if matches!(command, Command::Reclaim { .. }) {
                "reclaimed"
            } else {
                "restored"
            };
            let mib = done["bytes"].as_u64().unwrap_or(0) as f64 / f64::from(1u32 << 20);
            let ms = done["ms"].as_f64().unwrap_or(0.0);
            writeln!(out, "{verb} {name}: {mib:.0} MiB in {ms:.1} ms")?;
        }
        Command::Memory { json } => {
            let request = command.request();
            if *json {
                print_raw(out, &client.send(&request)?.body)?;
            } else {
                let rows: Vec<serde_json::Value> = client.send_json(&request)?;
                out.write_all(crate::table::memory_table(&rows).as_bytes())?;
            }
        }
        Command::Usage { export, args } => {
            run_usage(&client, args, export.as_ref(), out, &mut io::stderr())?
        }
    }
    Ok(())
}

/// `Some(path)` for an absolute socket path, `None` for a slice name.
fn socket_path(name: &str) -> Result<Option<PathBuf>, TargetError> {
    if name.starts_with('/') {
        Ok(Some(PathBuf::from(name)))
    } else if name.is_empty() || name.contains(['/', '\0']) {
        Err(TargetError::BadSlice(name.to_owned()))
    } else {
        Ok(None)
    }
}

fn vm_options(vm: &VmArgs) -> Options {
    Options {
        timeout: Duration::from_secs(vm.timeout),
    }
}

/// Starts the slice's backend through the scheduler (unless it runs already), then hotplugs its
/// socket into the VM. A backend started here is stopped again when the hotplug fails.
fn attach_to_vm(
    client: &Client,
    name: &str,
    target: &VmTarget,
    vm: &VmArgs,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if let Some(socket) = socket_path(name)? {
        let outcome = attach::attach(target, &socket, vm.id.as_deref(), vm_options(vm))?;
        return print_outcome(out, &outcome, vm.id.as_deref());
    }
    let current: Slice = client.send_json(&ApiRequest::new("GET", slice_path(name)))?;
    let (slice, started) = if current.attached && current.socket.is_some() {
        (current, false)
    } else {
        let attach = ApiRequest::new("POST", format!("{}/attach", slice_path(name)));
        (client.send_json::<Slice>(&attach)?, true)
    };
    writeln!(out, "{}", attached_line(&slice))?;
    let id = vm.id.clone().unwrap_or_else(|| name.to_owned());
    let result = match &slice.socket {
        Some(socket) => attach::attach(target, socket.as_ref(), Some(&id), vm_options(vm))
            .map_err(CtlError::from),
        None => Err(CtlError::NoSocket(name.to_owned())),
    };
    match result {
        Ok(outcome) => print_outcome(out, &outcome, Some(&id)),
        Err(e) => {
            if started {
                let detach = ApiRequest::new("POST", format!("{}/detach", slice_path(name)));
                match client.send(&detach) {
                    Ok(_) => writeln!(out, "detached {name} again")?,
                    Err(undo) => tracing::warn!("cannot detach {name} again: {undo}"),
                }
            }
            Err(e)
        }
    }
}

fn print_outcome(
    out: &mut dyn Write,
    outcome: &AddOutcome,
    id: Option<&str>,
) -> Result<(), CtlError> {
    match outcome {
        AddOutcome::Hotplugged(info) => writeln!(out, "id={} bdf={}", info.id, info.bdf)?,
        AddOutcome::AddedToConfig => writeln!(
            out,
            "id={} bdf=none (the VM is not booted: the device appears when it boots)",
            id.unwrap_or("none")
        )?,
    }
    Ok(())
}

/// `GPU 0, latency-critical, compute 30% (max 100%), memory 8GiB (limit 16GiB), weight 1`.
pub fn describe(slice: &Slice) -> String {
    format!(
        "GPU {}, {}, compute {}% (max {}%), memory {} (limit {}), weight {}",
        slice.gpu,
        slice.class,
        number(slice.compute_guarantee_pct),
        number(slice.compute_max_pct),
        format_size(slice.memory_guarantee),
        format_size(slice.memory_limit),
        number(slice.weight)
    )
}

/// `attached lc: socket /var/lib/vgpu/slices/lc.sock, backend pid 1234`.
pub fn attached_line(slice: &Slice) -> String {
    let mut line = format!(
        "attached {}: socket {}",
        slice.name,
        slice.socket.as_deref().unwrap_or("unknown")
    );
    if let Some(pid) = slice.backend_pid {
        line.push_str(&format!(", backend pid {pid}"));
    }
    line
}

fn print_raw(out: &mut dyn Write, body: &[u8]) -> io::Result<()> {
    out.write_all(body)?;
    if body.last() != Some(&b'\n') {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// `util`, once or every `watch` seconds until interrupted or the scheduler fails.
fn util(
    client: &Client,
    request: &ApiRequest,
    watch: Option<f64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let terminal = io::stdout().is_terminal();
    loop {
        let body = client.send(request)?.body;
        let utils: Vec<Util> = if json {
            Vec::new()
        } else {
            serde_json::from_slice(&body).map_err(|source| ClientError::BadJson {
                method: request.method,
                path: request.path.clone(),
                source,
            })?
        };
        let Some(seconds) = watch else {
            if json {
                print_raw(out, &body)?;
            } else {
                out.write_all(util_table(&utils).as_bytes())?;
            }
            return Ok(());
        };
        if json {
            // One document a line, whatever the scheduler's formatting.
            let value: serde_json::Value =
                serde_json::from_slice(&body).map_err(|source| ClientError::BadJson {
                    method: request.method,
                    path: request.path.clone(),
                    source,
                })?;
            writeln!(out, "{value}")?;
        } else {
            if terminal {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            writeln!(
                out,
                "Every {seconds}s: vgpuctl util ({})",
                client.endpoint()
            )?;
            out.write_all(util_table(&utils).as_bytes())?;
            if !terminal {
                writeln!(out)?;
            }
        }
        out.flush()?;
        std::thread::sleep(Duration::from_secs_f64(seconds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_described_in_one_line() {
        let slice = Slice {
            name: "lc".to_owned(),
            gpu: 1,
            class: "latency-critical".to_owned(),
            compute_guarantee_pct: 30.0,
            compute_max_pct: 100.0,
            memory_guarantee: 8 << 30,
            memory_limit: 16 << 30,
            weight: 1.0,
            ..Slice::default()
        };
        assert_eq!(
            describe(&slice),
            "GPU 1, latency-critical, compute 30% (max 100%), memory 8GiB (limit 16GiB), weight 1"
        );
        assert_eq!(attached_line(&slice), "attached lc: socket unknown");
    }

    #[test]
    fn slice_arguments_are_names_or_absolute_paths() {
        assert_eq!(socket_path("lc").unwrap(), None);
        assert_eq!(
            socket_path("/run/a.sock").unwrap(),
            Some(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(
            socket_path("rel/a.sock"),
            Err(TargetError::BadSlice("rel/a.sock".to_owned()))
        );
    }
}
