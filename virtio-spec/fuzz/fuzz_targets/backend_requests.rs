//! A whole backend connection on the emulated device, fed a sequence of
//! arbitrary requests (the input is split into length-prefixed chunks, each
//! sent on the queue its first byte selects). Sessions, handles and guest
//! ranges persist between requests, so the fuzzer can open a session and
//! then attack it. Never panics, and every request gets a response header.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vgpu_backend::config::SliceUuid;
use vgpu_backend::connection::Connection;
use vgpu_backend::gpu::emulated::EmulatedGpu;
use vgpu_backend::shared::DeviceShared;
use vgpu_backend::SliceMemory;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let gpu = Arc::new(EmulatedGpu::new(64 << 20));
    let shared = Arc::new(DeviceShared::new(
        gpu,
        Arc::new(SliceMemory::new(16 << 20)),
        "fuzz",
        SliceUuid([1; 16]),
        8,
        vgpu_spec::MAX_QUEUE_SIZE,
    ));
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let mut conn = Connection::new(shared);
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let queue = u16::from(rest[0] % 3);
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        rest = &rest[3..];
        let take = len.min(rest.len());
        let (request, tail) = rest.split_at(take);
        rest = tail;
        out.clear();
        conn.handle(queue, request, &mem, &mut out);
        assert!(out.len() >= 16, "no response header");
    }
    conn.close_all();
});
