//! The answer to the CUDA runtime's driver integrity check (export table
//! `d4082055…`, slot 1). The runtime calls it with its version, the current
//! Unix time and a 16-byte result buffer, and compares the result with what
//! it computes itself from what the driver told it.
//!
//! Public reverse-engineering notes (ZLUDA's `dark_api`) establish the
//! computation: for a version ending in 0 or 1 a fixed pair of words; for
//! any other, an HMAC over MD2 (RFC 1319, 16-byte blocks, so the HMAC pads
//! are one block) keyed with a fixed 16-byte key, of a 48-byte record
//! (driver version, runtime version, process id, thread id, the addresses
//! of the runtime interface table, of the integrity table and of the check
//! function, and the time) followed by one 28-byte record per device (UUID,
//! PCI domain, bus and device). Every input here is this library's own:
//! its table addresses and the identity it reports for the device.

/// MD2's substitution table (RFC 1319: a permutation of 0..=255 built from
/// the digits of pi).
const PI_SUBST: [u8; 256] = [
    41, 46, 67, 201, 162, 216, 124, 1, 61, 54, 84, 161, 236, 240, 6, 19, 98, 167, 5, 243, 192, 199,
    115, 140, 152, 147, 43, 217, 188, 76, 130, 202, 30, 155, 87, 60, 253, 212, 224, 22, 103, 66,
    111, 24, 138, 23, 229, 18, 190, 78, 196, 214, 218, 158, 222, 73, 160, 251, 245, 142, 187, 47,
    238, 122, 169, 104, 121, 145, 21, 178, 7, 63, 148, 194, 16, 137, 11, 34, 95, 33, 128, 127, 93,
    154, 90, 144, 50, 39, 53, 62, 204, 231, 191, 247, 151, 3, 255, 25, 48, 179, 72, 165, 181, 209,
    215, 94, 146, 42, 172, 86, 170, 198, 79, 184, 56, 210, 150, 164, 125, 182, 118, 252, 107, 226,
    156, 116, 4, 241, 69, 157, 112, 89, 100, 113, 135, 32, 134, 91, 207, 101, 230, 45, 168, 2, 27,
    96, 37, 173, 174, 176, 185, 246, 28, 70, 97, 105, 52, 64, 126, 15, 85, 71, 163, 35, 221, 81,
    175, 58, 195, 92, 249, 206, 186, 197, 234, 38, 44, 83, 13, 110, 133, 40, 132, 9, 211, 223, 205,
    244, 65, 129, 77, 82, 106, 220, 55, 200, 108, 193, 171, 250, 36, 225, 123, 8, 12, 189, 177, 74,
    120, 136, 149, 139, 227, 99, 232, 109, 233, 203, 213, 254, 59, 0, 29, 57, 242, 239, 183, 14,
    102, 88, 208, 228, 166, 119, 114, 248, 235, 117, 75, 10, 49, 68, 80, 180, 143, 237, 31, 26,
    219, 153, 141, 51, 159, 17, 131, 20,
];

/// The HMAC key of the check.
const KEY: [u8; 16] = [
    0x14, 0x6A, 0xDD, 0xAE, 0x53, 0xA9, 0xA7, 0x52, 0xAA, 0x08, 0x41, 0x36, 0x0B, 0xF5, 0x5A, 0x9F,
];

/// The answers for versions ending in 0 and 1.
const FIXED: [[u64; 2]; 2] = [
    [0x3341_181C_03CB_675C, 0x8ED3_83AA_1F4C_D1E8],
    [0x1841_181C_03CB_675C, 0x8ED3_83AA_1F4C_D1E8],
];

/// An MD2 computation in progress.
#[derive(Clone)]
struct Md2 {
    /// The 48-byte state; the digest is its first 16 bytes.
    x: [u8; 48],
    /// The running checksum.
    checksum: [u8; 16],
    /// The last checksum byte.
    last: u8,
    /// The partial block.
    block: [u8; 16],
    /// Bytes in the partial block.
    filled: usize,
}

impl Md2 {
    fn new() -> Md2 {
        Md2 {
            x: [0; 48],
            checksum: [0; 16],
            last: 0,
            block: [0; 16],
            filled: 0,
        }
    }

    fn transform(&mut self) {
        for j in 0..16 {
            self.x[16 + j] = self.block[j];
            self.x[32 + j] = self.block[j] ^ self.x[j];
            self.checksum[j] ^= PI_SUBST[usize::from(self.block[j] ^ self.last)];
            self.last = self.checksum[j];
        }
        let mut t = 0u8;
        for round in 0..18u8 {
            for byte in &mut self.x {
                *byte ^= PI_SUBST[usize::from(t)];
                t = *byte;
            }
            t = t.wrapping_add(round);
        }
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.block[self.filled] = b;
            self.filled += 1;
            if self.filled == 16 {
                self.transform();
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> [u8; 16] {
        let pad = 16 - self.filled;
        // 1..=16, so it fits a byte.
        let pad_byte = pad as u8;
        self.update(&vec![pad_byte; pad]);
        let checksum = self.checksum;
        self.update(&checksum);
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&self.x[..16]);
        digest
    }
}

/// HMAC-MD2 of `parts` (concatenated) under [`KEY`].
fn hmac(parts: &[&[u8]]) -> [u8; 16] {
    let mut inner = Md2::new();
    inner.update(&KEY.map(|k| k ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finish();
    let mut outer = Md2::new();
    outer.update(&KEY.map(|k| k ^ 0x5c));
    outer.update(&inner);
    outer.finish()
}

/// A device as the check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceIdentity {
    /// `cuDeviceGetUuid`.
    pub uuid: [u8; 16],
    /// `CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID`.
    pub pci_domain: i32,
    /// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`.
    pub pci_bus: i32,
    /// `CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID`.
    pub pci_device: i32,
}

/// Everything the check mixes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inputs {
    /// The runtime's version argument.
    pub version: u32,
    /// The time argument.
    pub unix_seconds: u64,
    /// What `cuDriverGetVersion` reports.
    pub driver_version: u32,
    /// The process id.
    pub process: u32,
    /// The low 32 bits of `pthread_self()`.
    pub thread: u32,
    /// Address of the `6bd5fb6c…` table.
    pub cudart_table: u64,
    /// Address of the `d4082055…` table.
    pub integrity_table: u64,
    /// Address of the check function (slot 1 of that table).
    pub check_fn: u64,
    /// Every device, in ordinal order.
    pub devices: Vec<DeviceIdentity>,
}

/// The 16-byte answer, as two native-endian words.
pub(crate) fn answer(inputs: &Inputs) -> [u64; 2] {
    match inputs.version % 10 {
        0 => return FIXED[0],
        1 => return FIXED[1],
        _ => {}
    }
    let mut record = Vec::with_capacity(48);
    record.extend_from_slice(&inputs.driver_version.to_ne_bytes());
    record.extend_from_slice(&inputs.version.to_ne_bytes());
    record.extend_from_slice(&inputs.process.to_ne_bytes());
    record.extend_from_slice(&inputs.thread.to_ne_bytes());
    record.extend_from_slice(&inputs.cudart_table.to_ne_bytes());
    record.extend_from_slice(&inputs.integrity_table.to_ne_bytes());
    record.extend_from_slice(&inputs.check_fn.to_ne_bytes());
    record.extend_from_slice(&inputs.unix_seconds.to_ne_bytes());
    let mut devices = Vec::with_capacity(28 * inputs.devices.len());
    for dev in &inputs.devices {
        devices.extend_from_slice(&dev.uuid);
        devices.extend_from_slice(&dev.pci_domain.to_ne_bytes());
        devices.extend_from_slice(&dev.pci_bus.to_ne_bytes());
        devices.extend_from_slice(&dev.pci_device.to_ne_bytes());
    }
    let digest = hmac(&[&record, &devices]);
    let mut words = [0u64; 2];
    for (word, chunk) in words.iter_mut().zip(digest.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md2_hex(data: &[u8]) -> String {
        let mut h = Md2::new();
        h.update(data);
        h.finish().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn md2_matches_the_rfc_1319_test_suite() {
        assert_eq!(md2_hex(b""), "8350e5a3e24c153df2275c9f80692773");
        assert_eq!(md2_hex(b"a"), "32ec01ec4a6dac72c0ab96fb34c0b5d1");
        assert_eq!(md2_hex(b"abc"), "da853b0d3f88d99b30283a69e6ded6bb");
        assert_eq!(
            md2_hex(b"message digest"),
            "ab4f496bfb2a530b219ff33031fe06b0"
        );
        assert_eq!(
            md2_hex(b"abcdefghijklmnopqrstuvwxyz"),
            "4e8ddff3650292ab5a4108c3aa47940b"
        );
    }

    #[test]
    fn inner_pad_block_gives_the_documented_state() {
        // The state after the key block, as recorded by the public notes.
        let mut h = Md2::new();
        h.update(&KEY.map(|k| k ^ 0x36));
        assert_eq!(
            &h.x[..16],
            &[
                0x8b, 0x21, 0x9a, 0x49, 0xe8, 0x6d, 0x1a, 0xee, 0xf2, 0x37, 0xf9, 0xb5, 0x4a, 0x8c,
                0x3c, 0x75
            ]
        );
        assert_eq!(h.last, 0x3d);
    }

    fn inputs(version: u32, uuid: [u8; 16]) -> Inputs {
        Inputs {
            version,
            unix_seconds: 0x682b_9cee,
            driver_version: 13000,
            process: 4242,
            thread: 0xf79c_1000,
            cudart_table: 0x7fff_f695_8240,
            integrity_table: 0x7fff_f695_8220,
            check_fn: 0x7fff_f2aa_f4a0,
            devices: vec![DeviceIdentity {
                uuid,
                pci_domain: 0,
                pci_bus: 0x1b,
                pci_device: 0,
            }],
        }
    }

    #[test]
    fn versions_ending_in_0_or_1_get_the_fixed_answers() {
        assert_eq!(answer(&inputs(13000, [1; 16])), FIXED[0]);
        assert_eq!(answer(&inputs(13001, [1; 16])), FIXED[1]);
    }

    #[test]
    fn hash_is_deterministic_and_depends_on_every_input() {
        let base = inputs(13002, [1; 16]);
        let h = answer(&base);
        assert_eq!(h, answer(&base.clone()));
        assert_ne!(h, FIXED[0]);
        assert_ne!(h, answer(&inputs(13002, [2; 16])), "the UUID");
        let mut other = base.clone();
        other.unix_seconds += 1;
        assert_ne!(h, answer(&other), "the time");
        let mut other = base.clone();
        other.cudart_table += 8;
        assert_ne!(h, answer(&other), "a table address");
        let mut other = base.clone();
        other.devices[0].pci_bus = 0x1c;
        assert_ne!(h, answer(&other), "the PCI bus");
        let mut other = base;
        other.devices.clear();
        assert_ne!(h, answer(&other), "the device count");
    }
}
