//! A fake of cloud-hypervisor's API socket, for tests here and in other crates (no VM can boot
//! on machines without KVM, so this is what the REST client is tested against).
//!
//! It answers the way cloud-hypervisor v53's server does: micro_http framing (status line with
//! no reason phrase, `Connection: keep-alive`, `Content-Length` on every answer but 204, the
//! connection left open after an answer), errors as JSON arrays of messages, 400 for a body that
//! does not parse, 500 for a failed action. It checks methods, paths and bodies strictly (unknown
//! fields in an add are refused, where cloud-hypervisor would ignore them, to catch misspelt
//! names), and records every request.

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::api::PciDeviceInfo;

/// How long a connection may stay idle before the fake drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target, such as `/api/v1/vm.info`.
    pub path: String,
    /// The body parsed as JSON, when there was one that parses.
    pub body: Option<Value>,
}

/// A device the fake holds, as added.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeDevice {
    /// Its id and address.
    pub info: PciDeviceInfo,
    /// The add request's body.
    pub config: Value,
}

#[derive(Debug)]
struct State {
    memory_shared: bool,
    booted: bool,
    add_failure: Option<(u16, String)>,
    next_slot: u8,
    next_auto_id: u32,
    devices: Vec<FakeDevice>,
    requests: Vec<RecordedRequest>,
}

/// The body `vm.add-generic-vhost-user` accepts (v53 `GenericVhostUserConfig`, flattened PCI
/// fields included).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed to be checked; the fake keeps the raw JSON.
struct AddBody {
    socket: String,
    device_type: u32,
    queue_sizes: Vec<u16>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    iommu: bool,
    #[serde(default)]
    pci_segment: u16,
    #[serde(default)]
    pci_device_id: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    id: String,
}

/// A fake cloud-hypervisor API listening on a Unix socket; stops when dropped (drop it before
/// removing the socket's directory, or its accept thread stays behind).
#[derive(Debug)]
pub struct FakeCloudHypervisor {
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeCloudHypervisor {
    /// Listens on `socket` as the API of a running VM with shared memory.
    pub fn start(socket: impl Into<PathBuf>) -> io::Result<FakeCloudHypervisor> {
        let socket = socket.into();
        let listener = UnixListener::bind(&socket)?;
        let state = Arc::new(Mutex::new(State {
            memory_shared: true,
            booted: true,
            add_failure: None,
            next_slot: 6,
            next_auto_id: 0,
            devices: Vec::new(),
            requests: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("fake-cloud-hypervisor".to_owned())
                .spawn(move || accept_loop(&listener, &state, &stop))?
        };
        Ok(FakeCloudHypervisor {
            socket,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether `vm.info` reports `memory.shared: true` (and adds pass validation).
    pub fn set_memory_shared(&self, shared: bool) {
        self.lock().memory_shared = shared;
    }

    /// Whether the VM is booted: adds to a VM that is only created answer 204.
    pub fn set_booted(&self, booted: bool) {
        self.lock().booted = booted;
    }

    /// Makes every later add fail with `status` and `body`.
    pub fn fail_adds(&self, status: u16, body: &str) {
        self.lock().add_failure = Some((status, body.to_owned()));
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The devices currently added.
    pub fn devices(&self) -> Vec<FakeDevice> {
        self.lock().devices.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for FakeCloudHypervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag. When the socket is already gone (its
        // directory removed first), nothing can wake it: the thread is left blocked in accept.
        let woken = UnixStream::connect(&self.socket).is_ok();
        if let Some(thread) = self.thread.take() {
            if woken {
                let _ = thread.join();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: &UnixListener, state: &Arc<Mutex<State>>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let state = Arc::clone(state);
        // One thread per connection: a client that keeps its connection open blocks nobody.
        let spawned = std::thread::Builder::new()
            .name("fake-cloud-hypervisor-conn".to_owned())
            .spawn(move || serve_connection(stream, &state));
        if let Err(e) = spawned {
            tracing::warn!("fake cloud-hypervisor cannot spawn a connection thread: {e}");
        }
    }
}

/// Serves requests on one connection until the client closes it (keep-alive, as micro_http).
fn serve_connection(stream: UnixStream, state: &Mutex<State>) {
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
        return;
    }
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    loop {
        let (status, body) = match read_request(&mut reader) {
            Ok(Some((method, path, raw_body))) => handle(state, &method, &path, &raw_body),
            Ok(None) | Err(_) => return,
        };
        if writer
            .write_all(&encode_response(status, body.as_deref()))
            .is_err()
        {
            return;
        }
    }
}

/// One request: method, target and body (by `Content-Length`); `None` when the client closed.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<(String, String, Vec<u8>)>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad length"))?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some((method, path, body)))
}

/// micro_http's framing: no reason phrase, keep-alive, a length on everything but 204.
fn encode_response(status: u16, body: Option<&str>) -> Vec<u8> {
    let mut text =
        format!("HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n");
    if status != 204 {
        let body = body.unwrap_or_default();
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        text.push_str("\r\n");
    }
    text.into_bytes()
}

fn error_body(messages: &[&str]) -> Option<String> {
    Some(json!(messages).to_string())
}

fn handle(state: &Mutex<State>, method: &str, path: &str, raw: &[u8]) -> (u16, Option<String>) {
    let mut state = lock(state);
    state.requests.push(RecordedRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        body: serde_json::from_slice(raw).ok(),
    });
    match (method, path) {
        ("GET", "/api/v1/vm.info") => (200, Some(vm_info(&state).to_string())),
        ("PUT", "/api/v1/vm.add-generic-vhost-user") => add(&mut state, raw),
        ("PUT", "/api/v1/vm.remove-device") => remove(&mut state, raw),
        (
            _,
            "/api/v1/vm.info" | "/api/v1/vm.add-generic-vhost-user" | "/api/v1/vm.remove-device",
        ) => (400, error_body(&["Bad Request"])),
        _ => (404, error_body(&["Not Found"])),
    }
}

fn vm_info(state: &State) -> Value {
    let devices: Vec<Value> = state
        .devices
        .iter()
        .map(|d| {
            let mut config = d.config.clone();
            if let Some(map) = config.as_object_mut() {
                map.insert("id".to_owned(), json!(d.info.id));
            }
            config
        })
        .collect();
    json!({
        "config": {
            "cpus": { "boot_vcpus": 1, "max_vcpus": 1 },
            "memory": {
                "size": 1u64 << 30,
                "mergeable": false,
                "hotplug_method": "Acpi",
                "shared": state.memory_shared,
                "hugepages": false,
                "prefault": false,
                "thp": true
            },
            "payload": { "kernel": "/images/vmlinux" },
            "generic_vhost_user": devices
        },
        "state": if state.booted { "Running" } else { "Created" },
        "memory_actual_size": 1u64 << 30
    })
}

fn add(state: &mut State, raw: &[u8]) -> (u16, Option<String>) {
    let parsed: AddBody = match serde_json::from_slice(raw) {
        Ok(body) => body,
        Err(e) => {
            return (
                400,
                error_body(&[&format!("Cannot deserialize request: {e}")]),
            )
        }
    };
    if let Some((status, body)) = &state.add_failure {
        return (*status, Some(body.clone()));
    }
    let mut failure = None;
    if !state.memory_shared {
        failure = Some("Using vhost-user requires using shared memory or huge pages".to_owned());
    } else if parsed.queue_sizes.iter().any(|s| !s.is_power_of_two()) {
        failure = Some("Invalid queue size".to_owned());
    } else if let Some(id) = &parsed.id {
        let ids: BTreeSet<&str> = state.devices.iter().map(|d| d.info.id.as_str()).collect();
        if id.starts_with("__") {
            failure = Some(format!("Invalid identifier: {id}"));
        } else if ids.contains(id.as_str()) {
            failure = Some(format!("Identifier {id} is not unique"));
        }
    }
    if let Some(reason) = failure {
        return (
            500,
            error_body(&[
                "The generic vhost-user device could not be added to the VM",
                "Failed to validate config",
                &reason,
            ]),
        );
    }
    let id = parsed.id.clone().unwrap_or_else(|| {
        let id = format!("_generic_vhost_user{}", state.next_auto_id);
        state.next_auto_id += 1;
        id
    });
    let info = PciDeviceInfo {
        id,
        bdf: format!("0000:00:{:02x}.0", state.next_slot),
    };
    state.next_slot = state.next_slot.wrapping_add(1);
    let config = serde_json::from_slice(raw).unwrap_or(Value::Null);
    state.devices.push(FakeDevice {
        info: info.clone(),
        config,
    });
    if state.booted {
        (
            200,
            Some(json!({ "id": info.id, "bdf": info.bdf }).to_string()),
        )
    } else {
        (204, None)
    }
}

fn remove(state: &mut State, raw: &[u8]) -> (u16, Option<String>) {
    let parsed: RemoveBody = match serde_json::from_slice(raw) {
        Ok(body) => body,
        Err(e) => {
            return (
                400,
                error_body(&[&format!("Cannot deserialize request: {e}")]),
            )
        }
    };
    let before = state.devices.len();
    state.devices.retain(|d| d.info.id != parsed.id);
    if state.devices.len() == before {
        return (
            500,
            error_body(&[
                "The device could not be removed from the VM",
                &format!("No device with id {} found", parsed.id),
            ]),
        );
    }
    (204, None)
}
