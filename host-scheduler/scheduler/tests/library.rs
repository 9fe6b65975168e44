//! The library API: a scheduler started in-process, serving the API on TCP too.
#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::net::TcpStream;

use vgpu_scheduler::config::{Config, DeviceKind};
use vgpu_scheduler::slice::SliceRequest;
use vgpu_scheduler::Scheduler;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_started_in_process_serves_tcp_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        slices: vec![],
        ..Config::default()
    };
    let scheduler = Scheduler::builder(dir.path())
        .config(config)
        .device(DeviceKind::Emulated)
        .backend("/bin/false")
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let addr = scheduler.tcp_addr().unwrap();
    let req: SliceRequest =
        serde_json::from_str(r#"{"name":"a","tenant":"t","compute_guarantee_pct":40}"#).unwrap();
    scheduler.core().create(req).unwrap();
    let (status, health, slices) = tokio::task::spawn_blocking(move || {
        let (status, health) = get(addr, "/healthz");
        (status, health, get(addr, "/v1/slices").1)
    })
    .await
    .unwrap();
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    assert_eq!(slices[0]["name"], "a");
    assert_eq!(slices[0]["compute_guarantee_pct"], 40);
    let socket = scheduler.api_socket().to_path_buf();
    assert!(socket.exists());
    scheduler.shutdown().await;
    assert!(!socket.exists());
    assert!(dir.path().join("slices.json").exists());
}
