//! cloud-hypervisor (v53+) boot arguments: `--generic-vhost-user` and `--memory ..,shared=on`.
//!
//! The option syntax is cloud-hypervisor's `OptionParser` (crate `option_parser`): `key=value`
//! pairs split at commas outside brackets and double quotes; a value in double quotes may hold
//! commas, brackets and `=`, and `""` inside quotes is one literal `"`. v53 renamed the generic
//! device's `virtio_id` key to `device_type` (the old name still parses, with a deprecation
//! warning).

use std::path::Path;

use crate::device::{DEVICE_TYPE, QUEUE_SIZES};
use crate::size::MemorySize;
use crate::ArgsError;

/// `socket=<path>,device_type=64,queue_sizes=[1024,1024,64]` and `,id=<id>` when given: the value
/// of one `--generic-vhost-user` option (also what `ch-remote add-generic-vhost-user` takes).
pub fn generic_vhost_user_value(socket: &Path, id: Option<&str>) -> Result<String, ArgsError> {
    let socket_text = socket
        .to_str()
        .ok_or_else(|| ArgsError::NotUtf8(socket.to_path_buf()))?;
    let sizes: Vec<String> = QUEUE_SIZES.iter().map(u16::to_string).collect();
    let mut value = format!(
        "socket={},device_type={DEVICE_TYPE},queue_sizes=[{}]",
        quote(socket_text),
        sizes.join(",")
    );
    if let Some(id) = id {
        check_id(id)?;
        value.push_str(",id=");
        value.push_str(&quote(id));
    }
    Ok(value)
}

/// `["--generic-vhost-user", <value>]`: attaches the slice behind `socket` at boot.
pub fn device_args(socket: &Path, id: Option<&str>) -> Result<Vec<String>, ArgsError> {
    Ok(vec![
        "--generic-vhost-user".to_owned(),
        generic_vhost_user_value(socket, id)?,
    ])
}

/// `["--memory", "size=<N>M,shared=on"]`: guest RAM the vhost-user backend can map.
pub fn memory_args(size: MemorySize) -> Vec<String> {
    vec!["--memory".to_owned(), format!("size={size},shared=on")]
}

/// [`memory_args`] followed by [`device_args`]: what a VM with one slice adds to its command line.
pub fn boot_args(
    memory: MemorySize,
    socket: &Path,
    id: Option<&str>,
) -> Result<Vec<String>, ArgsError> {
    let mut args = memory_args(memory);
    args.extend(device_args(socket, id)?);
    Ok(args)
}

/// cloud-hypervisor refuses device ids that start with `__` (reserved for its own devices).
pub(crate) fn check_id(id: &str) -> Result<(), ArgsError> {
    if id.is_empty() || id.starts_with("__") {
        return Err(ArgsError::BadDeviceId(id.to_owned()));
    }
    Ok(())
}

/// The value as is when `OptionParser` reads it back unchanged, else in double quotes with each
/// `"` doubled.
fn quote(value: &str) -> String {
    let plain =
        !value.is_empty() && value.trim() == value && !value.contains([',', '"', '[', ']', '=']);
    if plain {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    fn mib(n: u64) -> MemorySize {
        MemorySize::from_mib(n).unwrap()
    }

    #[test]
    fn boot_arguments_are_exact() {
        let args = boot_args(mib(4096), Path::new("/run/vgpu/tenant-a.sock"), None).unwrap();
        assert_eq!(
            args,
            [
                "--memory",
                "size=4096M,shared=on",
                "--generic-vhost-user",
                "socket=/run/vgpu/tenant-a.sock,device_type=64,queue_sizes=[1024,1024,64]",
            ]
        );
    }

    #[test]
    fn device_id_is_appended_when_given() {
        let args = device_args(Path::new("/run/vgpu/a.sock"), Some("vgpu0")).unwrap();
        assert_eq!(
            args,
            [
                "--generic-vhost-user",
                "socket=/run/vgpu/a.sock,device_type=64,queue_sizes=[1024,1024,64],id=vgpu0",
            ]
        );
    }

    #[test]
    fn paths_with_separators_are_quoted_and_quotes_doubled() {
        let value =
            generic_vhost_user_value(Path::new("/tmp/a,b [x]/\"q\".sock"), Some("my,id")).unwrap();
        assert_eq!(
            value,
            "socket=\"/tmp/a,b [x]/\"\"q\"\".sock\",device_type=64,\
             queue_sizes=[1024,1024,64],id=\"my,id\""
        );
        assert_eq!(quote(" lead"), "\" lead\"");
        assert_eq!(quote("a=b"), "\"a=b\"");
    }

    #[test]
    fn non_utf8_socket_paths_are_refused() {
        let path = Path::new(OsStr::from_bytes(b"/run/vgpu/\xff.sock"));
        assert_eq!(
            generic_vhost_user_value(path, None),
            Err(ArgsError::NotUtf8(path.to_path_buf()))
        );
    }

    #[test]
    fn reserved_and_empty_ids_are_refused() {
        let socket = Path::new("/run/vgpu/a.sock");
        assert_eq!(
            device_args(socket, Some("__x")),
            Err(ArgsError::BadDeviceId("__x".to_owned()))
        );
        assert_eq!(
            device_args(socket, Some("")),
            Err(ArgsError::BadDeviceId(String::new()))
        );
    }
}
