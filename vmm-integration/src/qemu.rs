//! QEMU arguments: the generic vhost-user PCI device and guest RAM the backend can map.
//!
//! The device is QEMU's `vhost-user-test-device-pci` (`hw/virtio/vhost-user-test-device-pci.c`
//! over `hw/virtio/vhost-user-base.c`), configured entirely by properties: `chardev`,
//! `virtio-id`, `num_vqs`, `vq_size` (one size for every queue) and `config_size`. Older QEMUs call
//! it `vhost-user-device-pci` and refuse to create it from the command line unless patched, as
//! `images/build-qemu.sh` does for the CI build of QEMU 10.0.
//!
//! Values go through QEMU's option syntax (QemuOpts): `key=value` pairs split at commas, where a
//! literal comma in a value is written `,,`.

use std::path::Path;

use crate::device::{CONFIG_SIZE, DEVICE_TYPE, QUEUE_SIZES};
use crate::size::MemorySize;
use crate::ArgsError;

/// The id of the shared memory backend that [`memory_args`] creates.
pub const MEMORY_BACKEND_ID: &str = "mem";

/// Which generic vhost-user PCI device model to ask QEMU for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceModel {
    /// `vhost-user-test-device-pci`: current QEMU (the issue targets 11.1 and later).
    TestDevice,
    /// `vhost-user-device-pci`: the older name, user-creatable only in a patched build such as the
    /// QEMU 10.0 that `images/build-qemu.sh` makes for CI.
    LegacyDevice,
}

impl DeviceModel {
    /// The `-device` driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DeviceModel::TestDevice => "vhost-user-test-device-pci",
            DeviceModel::LegacyDevice => "vhost-user-device-pci",
        }
    }
}

/// `-chardev socket,id=<id>-chr,path=<socket>` and
/// `-device vhost-user-test-device-pci,id=<id>,chardev=<id>-chr,virtio-id=64,num_vqs=3,vq_size=1024,config_size=256`.
pub fn device_args(socket: &Path, id: &str) -> Result<Vec<String>, ArgsError> {
    device_args_for(DeviceModel::TestDevice, socket, id)
}

/// [`device_args`] for a given device model.
pub fn device_args_for(
    model: DeviceModel,
    socket: &Path,
    id: &str,
) -> Result<Vec<String>, ArgsError> {
    check_id(id)?;
    let socket_text = socket
        .to_str()
        .ok_or_else(|| ArgsError::NotUtf8(socket.to_path_buf()))?;
    let chardev = format!("{id}-chr");
    let num_vqs = QUEUE_SIZES.len();
    // QEMU has one size for all queues: the largest (the driver may pick smaller ones).
    let vq_size = QUEUE_SIZES.iter().copied().max().unwrap_or(0);
    Ok(vec![
        "-chardev".to_owned(),
        format!("socket,id={chardev},path={}", escape(socket_text)),
        "-device".to_owned(),
        format!(
            "{},id={id},chardev={chardev},virtio-id={DEVICE_TYPE},num_vqs={num_vqs},\
             vq_size={vq_size},config_size={CONFIG_SIZE}",
            model.driver()
        ),
    ])
}

/// `-m <N>M -object memory-backend-memfd,id=mem,size=<N>M,share=on -numa node,memdev=mem`: guest
/// RAM in a shared memfd, which QEMU hands to the vhost-user backend with `SET_MEM_TABLE`.
pub fn memory_args(size: MemorySize) -> Vec<String> {
    vec![
        "-m".to_owned(),
        size.to_string(),
        "-object".to_owned(),
        format!("memory-backend-memfd,id={MEMORY_BACKEND_ID},size={size},share=on"),
        "-numa".to_owned(),
        format!("node,memdev={MEMORY_BACKEND_ID}"),
    ]
}

/// [`memory_args`] followed by [`device_args`].
pub fn boot_args(memory: MemorySize, socket: &Path, id: &str) -> Result<Vec<String>, ArgsError> {
    let mut args = memory_args(memory);
    args.extend(device_args(socket, id)?);
    Ok(args)
}

/// QEMU ids start with a letter and hold only letters, digits, `-`, `.` and `_`
/// (`id_wellformed()` in QEMU's `util/id.c`).
fn check_id(id: &str) -> Result<(), ArgsError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        Ok(())
    } else {
        Err(ArgsError::BadDeviceId(id.to_owned()))
    }
}

fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_arguments_are_exact() {
        let args = boot_args(
            MemorySize::from_mib(2048).unwrap(),
            Path::new("/run/vgpu/tenant-a.sock"),
            "vgpu0",
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "-m",
                "2048M",
                "-object",
                "memory-backend-memfd,id=mem,size=2048M,share=on",
                "-numa",
                "node,memdev=mem",
                "-chardev",
                "socket,id=vgpu0-chr,path=/run/vgpu/tenant-a.sock",
                "-device",
                "vhost-user-test-device-pci,id=vgpu0,chardev=vgpu0-chr,virtio-id=64,num_vqs=3,\
                 vq_size=1024,config_size=256",
            ]
        );
    }

    #[test]
    fn legacy_model_differs_only_in_the_driver_name() {
        let args =
            device_args_for(DeviceModel::LegacyDevice, Path::new("/tmp/s.sock"), "g").unwrap();
        assert_eq!(
            args[3],
            "vhost-user-device-pci,id=g,chardev=g-chr,virtio-id=64,num_vqs=3,vq_size=1024,\
             config_size=256"
        );
    }

    #[test]
    fn commas_in_socket_paths_are_doubled() {
        let args = device_args(Path::new("/tmp/a,b.sock"), "vgpu0").unwrap();
        assert_eq!(args[1], "socket,id=vgpu0-chr,path=/tmp/a,,b.sock");
    }

    #[test]
    fn ids_qemu_would_refuse_are_refused() {
        for id in ["", "0gpu", "a,b", "a b", "é"] {
            assert_eq!(
                device_args(Path::new("/tmp/s.sock"), id),
                Err(ArgsError::BadDeviceId(id.to_owned())),
                "{id:?}"
            );
        }
    }
}
