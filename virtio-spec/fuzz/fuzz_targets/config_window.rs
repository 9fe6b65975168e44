//! `VgpuConfig::read_window` with an arbitrary config, offset and size of at
//! most 4096: always exactly `size` bytes, the config where the window
//! overlaps it and zeros elsewhere.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vgpu_spec::{VgpuConfig, CONFIG_SPACE_SIZE, CONFIG_WINDOW};
use zerocopy::{FromBytes, IntoBytes};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let offset = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let size = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) % (CONFIG_WINDOW + 1);
    let rest = &data[8..];
    let config = match VgpuConfig::read_from_prefix(rest) {
        Ok((config, _)) => config,
        Err(_) => VgpuConfig::new(),
    };
    let full = config.as_bytes();
    assert_eq!(full.len(), CONFIG_SPACE_SIZE);

    let window = config.read_window(offset, size);
    assert_eq!(window.len(), size as usize);
    for (i, byte) in window.iter().enumerate() {
        let at = offset as u64 + i as u64;
        let expect = if at < CONFIG_SPACE_SIZE as u64 {
            full[at as usize]
        } else {
            0
        };
        assert_eq!(*byte, expect, "byte {i} of window at {offset}+{size}");
    }
});
