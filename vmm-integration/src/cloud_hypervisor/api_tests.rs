//! The REST client against the fake cloud-hypervisor API, and against scripted servers for the
//! answers the fake never gives.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use serde_json::json;

use super::*;
use crate::cloud_hypervisor::fake::FakeCloudHypervisor;

fn fake() -> (tempfile::TempDir, FakeCloudHypervisor) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCloudHypervisor::start(dir.path().join("api.sock")).unwrap();
    (dir, fake)
}

fn client(fake: &FakeCloudHypervisor) -> ApiClient {
    ApiClient::new(fake.socket()).with_timeout(Duration::from_secs(10))
}

/// A server that answers one connection with `response` after reading the request head and its
/// `Content-Length` body; returns what it read.
fn scripted_server(path: PathBuf, response: &'static [u8]) -> JoinHandle<String> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(&stream);
        let mut request = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = v.trim().parse().unwrap();
            }
            request.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        std::io::Read::read_exact(&mut reader, &mut body).unwrap();
        request.push_str(&String::from_utf8(body).unwrap());
        (&stream).write_all(response).unwrap();
        request
    })
}

#[test]
fn add_body_has_the_fields_cloud_hypervisor_expects() {
    let config = GenericVhostUserConfig::vgpu("/run/vgpu/a.sock", None);
    assert_eq!(
        serde_json::to_string(&config).unwrap(),
        r#"{"socket":"/run/vgpu/a.sock","device_type":64,"queue_sizes":[1024,1024,64]}"#
    );
    let config = GenericVhostUserConfig::vgpu("/run/vgpu/a.sock", Some("vgpu0".to_owned()));
    assert_eq!(
        serde_json::to_value(&config).unwrap(),
        json!({"socket": "/run/vgpu/a.sock", "device_type": 64,
               "queue_sizes": [1024, 1024, 64], "id": "vgpu0"})
    );
}

#[test]
fn hotplug_checks_shared_memory_then_adds_and_returns_id_and_bdf() {
    let (_dir, fake) = fake();
    let outcome = client(&fake)
        .hotplug_vgpu(Path::new("/run/vgpu/a.sock"), Some("vgpu0"))
        .unwrap();
    assert_eq!(
        outcome,
        AddOutcome::Hotplugged(PciDeviceInfo {
            id: "vgpu0".to_owned(),
            bdf: "0000:00:06.0".to_owned(),
        })
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("GET", "/api/v1/vm.info")
    );
    assert_eq!(requests[0].body, None);
    assert_eq!(
        (requests[1].method.as_str(), requests[1].path.as_str()),
        ("PUT", "/api/v1/vm.add-generic-vhost-user")
    );
    assert_eq!(
        requests[1].body,
        Some(json!({"socket": "/run/vgpu/a.sock", "device_type": 64,
                    "queue_sizes": [1024, 1024, 64], "id": "vgpu0"}))
    );
    assert_eq!(fake.devices().len(), 1);
}

#[test]
fn hotplug_without_an_id_returns_the_one_cloud_hypervisor_chose() {
    let (_dir, fake) = fake();
    let api = client(&fake);
    let first = api
        .hotplug_vgpu(Path::new("/run/vgpu/a.sock"), None)
        .unwrap();
    let second = api
        .hotplug_vgpu(Path::new("/run/vgpu/b.sock"), None)
        .unwrap();
    let AddOutcome::Hotplugged(first) = first else {
        panic!("{first:?}")
    };
    let AddOutcome::Hotplugged(second) = second else {
        panic!("{second:?}")
    };
    assert_eq!(first.id, "_generic_vhost_user0");
    assert_eq!(second.id, "_generic_vhost_user1");
    assert_ne!(first.bdf, second.bdf);
    let add = &fake.requests()[1];
    assert!(add.body.as_ref().unwrap().get("id").is_none());
}

#[test]
fn private_memory_is_refused_before_any_add() {
    let (_dir, fake) = fake();
    fake.set_memory_shared(false);
    let err = client(&fake)
        .hotplug_vgpu(Path::new("/run/vgpu/a.sock"), None)
        .unwrap_err();
    assert!(matches!(err, ApiError::MemoryNotShared), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cloud-hypervisor VM memory is not shared (--memory shared=on); vhost-user devices need it"
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/api/v1/vm.info");
    assert!(fake.devices().is_empty());
}

#[test]
fn memory_counts_as_shared_with_shared_hugepages_or_all_zones_shared() {
    let memory = |v: serde_json::Value| serde_json::from_value::<MemoryInfo>(v).unwrap();
    assert!(memory(json!({"size": 1024, "shared": true})).is_shared());
    assert!(memory(json!({"size": 1024, "hugepages": true})).is_shared());
    assert!(!memory(json!({"size": 1024})).is_shared());
    assert!(!memory(json!({"size": 1024, "shared": false, "thp": true})).is_shared());
    let zones =
        json!([{"id": "a", "size": 1, "shared": true}, {"id": "b", "size": 1, "hugepages": true}]);
    assert!(memory(json!({"size": 0, "zones": zones})).is_shared());
    let zones = json!([{"id": "a", "size": 1, "shared": true}, {"id": "b", "size": 1}]);
    assert!(!memory(json!({"size": 0, "zones": zones})).is_shared());
}

#[test]
fn vm_info_is_parsed_from_the_fake() {
    let (_dir, fake) = fake();
    let info = client(&fake).vm_info().unwrap();
    assert_eq!(info.state, "Running");
    assert!(info.config.memory.shared);
    assert_eq!(info.config.memory.size, 1 << 30);
}

#[test]
fn failed_add_carries_status_and_body() {
    let (_dir, fake) = fake();
    let body = r#"["The generic vhost-user device could not be added to the VM","Failed to connect to the vhost-user backend"]"#;
    fake.fail_adds(500, body);
    let err = client(&fake)
        .hotplug_vgpu(Path::new("/run/vgpu/a.sock"), None)
        .unwrap_err();
    match &err {
        ApiError::Status {
            endpoint,
            status,
            body: got,
        } => {
            assert_eq!(endpoint, "vm.add-generic-vhost-user");
            assert_eq!(*status, 500);
            assert_eq!(got, body);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "cloud-hypervisor answered vm.add-generic-vhost-user with HTTP 500: The generic \
         vhost-user device could not be added to the VM: Failed to connect to the vhost-user backend"
    );
}

#[test]
fn duplicate_ids_are_refused_by_the_vm() {
    let (_dir, fake) = fake();
    let api = client(&fake);
    api.hotplug_vgpu(Path::new("/run/vgpu/a.sock"), Some("vgpu0"))
        .unwrap();
    let err = api
        .hotplug_vgpu(Path::new("/run/vgpu/b.sock"), Some("vgpu0"))
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::Status { status: 500, body, .. } if body.contains("not unique")),
        "{err:?}"
    );
}

#[test]
fn created_but_not_booted_vm_takes_the_device_into_its_config() {
    let (_dir, fake) = fake();
    fake.set_booted(false);
    let outcome = client(&fake)
        .hotplug_vgpu(Path::new("/run/vgpu/a.sock"), Some("vgpu0"))
        .unwrap();
    assert_eq!(outcome, AddOutcome::AddedToConfig);
    assert_eq!(fake.devices().len(), 1);
}

#[test]
fn remove_sends_the_id_and_accepts_no_content() {
    let (_dir, fake) = fake();
    let api = client(&fake);
    api.hotplug_vgpu(Path::new("/run/vgpu/a.sock"), Some("vgpu0"))
        .unwrap();
    api.remove_device("vgpu0").unwrap();
    let last = fake.requests().pop().unwrap();
    assert_eq!(last.method, "PUT");
    assert_eq!(last.path, "/api/v1/vm.remove-device");
    assert_eq!(last.body, Some(json!({"id": "vgpu0"})));
    assert!(fake.devices().is_empty());
}

#[test]
fn removing_an_unknown_device_fails_with_the_vm_message() {
    let (_dir, fake) = fake();
    let err = client(&fake).remove_device("nope").unwrap_err();
    assert!(
        matches!(&err, ApiError::Status { status: 500, endpoint, .. } if endpoint == "vm.remove-device"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("No device with id nope found"),
        "{err}"
    );
}

#[test]
fn refused_and_missing_sockets_are_connect_errors() {
    let dir = tempfile::tempdir().unwrap();
    let refused = dir.path().join("dead.sock");
    drop(UnixListener::bind(&refused).unwrap());
    for path in [refused, dir.path().join("missing.sock")] {
        let err = ApiClient::new(&path).vm_info().unwrap_err();
        match &err {
            ApiError::Connect { socket, .. } => assert_eq!(socket, &path),
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("Cannot connect to the cloud-hypervisor API socket"),
            "{err}"
        );
    }
}

#[test]
fn success_with_a_body_that_is_not_the_expected_json_is_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let server = scripted_server(
        path.clone(),
        b"HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"id\": 42}\n",
    );
    let config = GenericVhostUserConfig::vgpu("/run/vgpu/a.sock", None);
    let err = ApiClient::new(&path)
        .add_generic_vhost_user(&config)
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::BadJson { endpoint, body, .. }
            if endpoint == "vm.add-generic-vhost-user" && body == "{\"id\": 42}\n"),
        "{err:?}"
    );
    assert!(server
        .join()
        .unwrap()
        .starts_with("PUT /api/v1/vm.add-generic-vhost-user HTTP/1.1\r\n"));
}

#[test]
fn chunked_answers_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let server = scripted_server(
        path.clone(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          e\r\n{\"id\":\"vgpu0\",\r\n15\r\n\"bdf\":\"0000:00:07.0\"}\r\n0\r\n\r\n",
    );
    let config = GenericVhostUserConfig::vgpu("/run/vgpu/a.sock", Some("vgpu0".to_owned()));
    let outcome = ApiClient::new(&path)
        .add_generic_vhost_user(&config)
        .unwrap();
    assert_eq!(
        outcome,
        AddOutcome::Hotplugged(PciDeviceInfo {
            id: "vgpu0".to_owned(),
            bdf: "0000:00:07.0".to_owned()
        })
    );
    let request = server.join().unwrap();
    assert!(request.ends_with(
        r#"{"socket":"/run/vgpu/a.sock","device_type":64,"queue_sizes":[1024,1024,64],"id":"vgpu0"}"#
    ));
}

#[test]
fn a_silent_server_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // Accepts (the kernel does, on bind) and never answers.
    let _listener = UnixListener::bind(&path).unwrap();
    let err = ApiClient::new(&path)
        .with_timeout(Duration::from_millis(100))
        .vm_info()
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Transport(HttpError::Timeout { .. })),
        "{err:?}"
    );
}

#[test]
fn fake_refuses_misspelt_fields_and_wrong_methods() {
    let (_dir, fake) = fake();
    let http = UnixHttpClient::new(fake.socket());
    let old_name = br#"{"socket":"/s","virtio_id":64,"queue_sizes":[1024]}"#;
    let r = http
        .request("PUT", "/api/v1/vm.add-generic-vhost-user", Some(old_name))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body_text());
    let r = http
        .request("GET", "/api/v1/vm.add-generic-vhost-user", None)
        .unwrap();
    assert_eq!(r.status, 400);
    let r = http.request("GET", "/api/v1/vm.nope", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(fake.devices().is_empty());
}

#[test]
fn non_utf8_backend_sockets_are_refused_before_any_request() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let (_dir, fake) = fake();
    let path = Path::new(OsStr::from_bytes(b"/run/vgpu/\xff.sock"));
    let err = client(&fake).hotplug_vgpu(path, None).unwrap_err();
    assert!(matches!(err, ApiError::NotUtf8(_)), "{err:?}");
    assert!(fake.requests().is_empty());
}
