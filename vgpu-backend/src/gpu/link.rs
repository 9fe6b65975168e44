//! What a `MODULE_LINK` asks of an executor ([`LinkJob`]) and what it gets
//! back ([`Linked`]), and the JIT options a guest may forward.
//!
//! Only options whose value is a plain integer are forwarded: a pointer
//! option (log buffers, global symbol tables, name arrays) would make the
//! host's driver dereference a guest-chosen address. The log buffers are
//! the executor's own, sized by the guest's log areas.

use vgpu_spec::link::InputData;
use vgpu_spec::wire::{jit_input, JitOption};
use vgpu_spec::Status;

use super::ptx::{self, ImageKind};
use super::GpuResult;

pub use vgpu_spec::link::FORWARDED_OPTIONS;

/// True for a `CU_JIT_*` option the device accepts in a link request.
pub fn is_forwarded(option: u32) -> bool {
    FORWARDED_OPTIONS.contains(&option)
}

/// A link to run: inputs in order, the forwarded options, and the sizes of
/// the log buffers (0: no log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkJob<'a> {
    /// The inputs, each a `CUjitInputType` with an optional name.
    pub inputs: Vec<InputData<'a>>,
    /// (`CUjit_option`, value) pairs, each [`is_forwarded`].
    pub options: Vec<(u32, u32)>,
    /// Bytes of info log buffer, its NUL included.
    pub info_log_cap: usize,
    /// Bytes of error log buffer, its NUL included.
    pub error_log_cap: usize,
}

impl<'a> LinkJob<'a> {
    /// Checks a guest's link request: input kinds that `CUjitInputType`
    /// names, forwarded options with 32-bit values. `INVALID_VALUE`
    /// otherwise.
    pub fn new(
        inputs: impl Iterator<Item = InputData<'a>>,
        options: &[JitOption],
        info_log_cap: usize,
        error_log_cap: usize,
    ) -> GpuResult<LinkJob<'a>> {
        let inputs: Vec<InputData<'a>> = inputs.collect();
        if inputs.iter().any(|i| i.kind > jit_input::NVVM) {
            return Err(Status::INVALID_VALUE);
        }
        let options = options
            .iter()
            .map(|o| {
                let option = o.option.get();
                let value = u32::try_from(o.value.get()).map_err(|_| Status::INVALID_VALUE)?;
                if is_forwarded(option) {
                    Ok((option, value))
                } else {
                    Err(Status::INVALID_VALUE)
                }
            })
            .collect::<GpuResult<Vec<_>>>()?;
        Ok(LinkJob {
            inputs,
            options,
            info_log_cap,
            error_log_cap,
        })
    }
}

/// The outcome of a link: the image or the failure, and the logs either way.
#[derive(Debug, Clone, PartialEq)]
pub struct Linked {
    /// The linked image, or the linker's status.
    pub result: GpuResult<Vec<u8>>,
    /// Info log text (no NUL), at most `info_log_cap - 1` bytes.
    pub info_log: Vec<u8>,
    /// Error log text (no NUL), at most `error_log_cap - 1` bytes.
    pub error_log: Vec<u8>,
    /// The linker's `CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES` output.
    pub info_used: u32,
    /// The linker's `CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES` output.
    pub error_used: u32,
    /// The linker's `CU_JIT_WALL_TIME` output, milliseconds.
    pub wall_ms: f32,
}

impl Linked {
    /// A link that failed with `status` before the linker ran: no logs.
    pub fn failed(status: Status) -> Linked {
        Linked {
            result: Err(status),
            info_log: Vec::new(),
            error_log: Vec::new(),
            info_used: 0,
            error_used: 0,
            wall_ms: 0.0,
        }
    }

    /// A link that produced `image`, with no logs.
    pub fn image(image: Vec<u8>) -> Linked {
        Linked {
            result: Ok(image),
            ..Linked::failed(Status::SUCCESS)
        }
    }
}

/// The linker of a device that runs PTX and has no JIT linker (the
/// emulated one): exactly one PTX input is its own linked image (checked by
/// the same parser that loads modules, `INVALID_PTX` with the parser's
/// message in the error log otherwise), and one fatbin input is passed
/// through for the module loader to judge. No inputs is `INVALID_VALUE`;
/// anything else (several inputs, cubins, objects, libraries, NVVM) is
/// `NOT_SUPPORTED`. Options are ignored.
pub fn single_image(job: &LinkJob<'_>) -> Linked {
    let input = match job.inputs.as_slice() {
        [] => return Linked::failed(Status::INVALID_VALUE),
        [input] => input,
        _ => return Linked::failed(Status::NOT_SUPPORTED),
    };
    match input.kind {
        jit_input::PTX => {
            let text = ptx::strip_trailing_nuls(input.data);
            let parsed = match ptx::image_kind(text) {
                ImageKind::Ptx => ptx::parse(text).map_err(|e| e.to_string()),
                _ => Err("the input is not PTX text".to_string()),
            };
            match parsed {
                Ok(_) => {
                    let mut image = text.to_vec();
                    image.push(0);
                    Linked::image(image)
                }
                Err(message) => {
                    let text = format!("ptxas application ptx input: error: {message}");
                    let log = vgpu_spec::link::fit_log(text.as_bytes(), job.error_log_cap).to_vec();
                    Linked {
                        error_used: if log.is_empty() {
                            0
                        } else {
                            log.len() as u32 + 1
                        },
                        error_log: log,
                        ..Linked::failed(Status::INVALID_PTX)
                    }
                }
            }
        }
        jit_input::FATBINARY => Linked::image(input.data.to_vec()),
        _ => Linked::failed(Status::NOT_SUPPORTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(option: u32, value: u64) -> JitOption {
        JitOption {
            option: option.into(),
            _pad: 0.into(),
            value: value.into(),
        }
    }

    fn ptx(data: &[u8]) -> InputData<'_> {
        InputData {
            kind: jit_input::PTX,
            name: b"",
            data,
        }
    }

    #[test]
    fn integer_options_are_forwarded_and_pointer_options_are_refused() {
        let job = LinkJob::new([ptx(b"x")].into_iter(), &[opt(7, 3), opt(8, 0)], 0, 0).unwrap();
        assert_eq!(job.options, vec![(7, 3), (8, 0)]);
        for pointer_option in [2, 3, 4, 5, 6, 17, 18, 19, 25, 27, 34, 99] {
            assert_eq!(
                LinkJob::new([ptx(b"x")].into_iter(), &[opt(pointer_option, 1)], 0, 0),
                Err(Status::INVALID_VALUE),
                "option {pointer_option}"
            );
        }
    }

    #[test]
    fn option_values_beyond_32_bits_and_unknown_input_kinds_are_invalid() {
        assert_eq!(
            LinkJob::new([ptx(b"x")].into_iter(), &[opt(7, 1 << 32)], 0, 0),
            Err(Status::INVALID_VALUE)
        );
        let bad_kind = InputData {
            kind: 6,
            name: b"",
            data: b"x",
        };
        assert_eq!(
            LinkJob::new([bad_kind].into_iter(), &[], 0, 0),
            Err(Status::INVALID_VALUE)
        );
    }

    const PTX: &[u8] = b".version 7.0\n.target sm_75\n.address_size 64\n\n.visible .entry k(.param .u64 p)\n{\n    ret;\n}\n";

    #[test]
    fn one_ptx_input_links_to_itself_with_a_nul() {
        let job = LinkJob::new([ptx(PTX)].into_iter(), &[], 64, 64).unwrap();
        let linked = single_image(&job);
        let image = linked.result.unwrap();
        assert_eq!(&image[..PTX.len()], PTX);
        assert_eq!(image.last(), Some(&0));
        assert!(linked.error_log.is_empty());
    }

    #[test]
    fn invalid_ptx_fails_with_invalid_ptx_and_an_error_log() {
        let job = LinkJob::new([ptx(b"not ptx at all\0")].into_iter(), &[], 0, 32).unwrap();
        let linked = single_image(&job);
        assert_eq!(linked.result, Err(Status::INVALID_PTX));
        assert_eq!(linked.error_log.len(), 31);
        assert_eq!(linked.error_used, 32);
        assert!(linked.error_log.starts_with(b"ptxas"));
    }

    #[test]
    fn no_inputs_is_invalid_and_several_inputs_are_not_supported() {
        let none = LinkJob::new(std::iter::empty(), &[], 0, 0).unwrap();
        assert_eq!(single_image(&none).result, Err(Status::INVALID_VALUE));
        let two = LinkJob::new([ptx(PTX), ptx(PTX)].into_iter(), &[], 0, 0).unwrap();
        assert_eq!(single_image(&two).result, Err(Status::NOT_SUPPORTED));
        let cubin = InputData {
            kind: jit_input::CUBIN,
            name: b"",
            data: b"\x7fELF",
        };
        let one_cubin = LinkJob::new([cubin].into_iter(), &[], 0, 0).unwrap();
        assert_eq!(single_image(&one_cubin).result, Err(Status::NOT_SUPPORTED));
    }
}
