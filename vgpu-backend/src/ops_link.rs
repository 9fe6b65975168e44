//! `MODULE_LINK` on a session: the link runs in the header's context, and
//! its logs and image go to the guest's output buffer (layout in
//! [`vgpu_spec::link`]).

use vgpu_spec::link::{fit_log, image_capacity, image_offset, LinkParts};
use vgpu_spec::wire::{LinkReq, LinkResp};
use vgpu_spec::Status;

use crate::gpu::{HostBuf, LinkJob};
use crate::guest::{host_buffers, GuestMemoryMmap};
use crate::ops::OpResult;
use crate::reply::Reply;
use crate::session::Session;

/// Copies `bytes` into the concatenation of `bufs` at `offset`.
/// `INVALID_VALUE`, with nothing written, if it does not fit.
fn write_scattered(bufs: &[HostBuf], mut offset: usize, mut bytes: &[u8]) -> Result<(), Status> {
    let total = bufs
        .iter()
        .fold(0usize, |sum, b| sum.saturating_add(b.len()));
    if offset
        .checked_add(bytes.len())
        .is_none_or(|end| end > total)
    {
        return Err(Status::INVALID_VALUE);
    }
    for buf in bufs {
        if bytes.is_empty() {
            return Ok(());
        }
        if offset >= buf.len() {
            offset -= buf.len();
            continue;
        }
        let n = bytes.len().min(buf.len() - offset);
        buf.write_at(offset, &bytes[..n])?;
        bytes = &bytes[n..];
        offset = 0;
    }
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(Status::INVALID_VALUE)
    }
}

/// Writes a log into its area at `offset` of `area` bytes: the text that
/// fits and a NUL; nothing into an empty area.
fn write_log(bufs: &[HostBuf], offset: usize, area: usize, text: &[u8]) -> Result<(), Status> {
    if area == 0 {
        return Ok(());
    }
    let text = fit_log(text, area);
    write_scattered(bufs, offset, text)?;
    write_scattered(bufs, offset + text.len(), &[0])
}

impl Session {
    /// Links the request's inputs in the `current` context; writes the logs
    /// (whatever the outcome) and the image (if it fits its area) to the
    /// output buffer.
    pub(crate) fn module_link(
        &mut self,
        r: &LinkReq,
        parts: &LinkParts<'_>,
        current: u64,
        mem: &GuestMemoryMmap,
    ) -> OpResult {
        let mut out = Vec::new();
        host_buffers(mem, parts.segs, &mut out)?;
        let info_area = r.info_log_len.get() as usize;
        let error_area = r.error_log_len.get() as usize;
        let job = LinkJob::new(parts.input_data(), parts.options, info_area, error_area)?;
        let linked = self.gpu_context(current)?.link(&job);
        write_log(&out, 0, info_area, &linked.info_log)?;
        write_log(&out, info_area, error_area, &linked.error_log)?;
        let image = linked.result?;
        let image_len = image.len() as u64;
        if image_len <= image_capacity(r) {
            let offset = usize::try_from(image_offset(r)).map_err(|_| Status::INVALID_VALUE)?;
            write_scattered(&out, offset, &image)?;
        }
        tracing::debug!(
            inputs = job.inputs.len(),
            image_len,
            capacity = image_capacity(r),
            "Linked"
        );
        Ok(Reply::Link(LinkResp {
            image_len: image_len.into(),
            info_log_used: linked.info_used.into(),
            error_log_used: linked.error_used.into(),
            wall_ms_bits: linked.wall_ms.to_bits().into(),
            _pad: 0.into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bufs(storage: &mut [Vec<u8>]) -> Vec<HostBuf> {
        storage
            .iter_mut()
            // SAFETY: each test keeps `storage` alive and untouched while
            // the buffers are used.
            .map(|v| unsafe { HostBuf::new(v.as_mut_ptr(), v.len()) })
            .collect()
    }

    #[test]
    fn scattered_writes_cross_buffer_boundaries_and_refuse_to_overrun() {
        let mut storage = vec![vec![0u8; 3], vec![0u8; 0], vec![0u8; 4]];
        let out = bufs(&mut storage);
        write_scattered(&out, 2, b"abcd").unwrap();
        assert_eq!(write_scattered(&out, 5, b"xyz"), Err(Status::INVALID_VALUE));
        drop(out);
        assert_eq!(storage[0], b"\0\0a");
        assert_eq!(storage[2], b"bcd\0");
    }

    #[test]
    fn logs_are_nul_terminated_and_truncated_to_their_area() {
        let mut storage = vec![vec![0xffu8; 8]];
        let out = bufs(&mut storage);
        write_log(&out, 0, 4, b"hello").unwrap();
        write_log(&out, 4, 0, b"ignored").unwrap();
        drop(out);
        assert_eq!(storage[0], b"hel\0\xff\xff\xff\xff");
    }

    mod through_a_connection {
        use vgpu_spec::link::LinkParts;
        use vgpu_spec::wire::{jit_input, JitOption, LinkInput, LinkReq, LinkResp, SgEntry};
        use vgpu_spec::{Request, Status};
        use vm_memory::{Bytes, GuestAddress};
        use zerocopy::FromBytes;

        use crate::testutil::{sg, Harness, GUEST_HIGH, PTX};

        /// Sends a link of `inputs` (kind, data) with logs of 64 bytes each
        /// and an output buffer `segs`; returns the status and response.
        fn link(
            h: &mut Harness,
            (session, ctx): (u64, u64),
            inputs: &[(u32, &[u8])],
            options: &[JitOption],
            segs: &[SgEntry],
        ) -> (Status, Option<LinkResp>) {
            let descs: Vec<LinkInput> = inputs
                .iter()
                .map(|(kind, data)| LinkInput {
                    kind: (*kind).into(),
                    name_len: 1.into(),
                    data_len: (data.len() as u64).into(),
                })
                .collect();
            let mut data = Vec::new();
            for (_, bytes) in inputs {
                data.push(b'n');
                data.extend_from_slice(bytes);
            }
            let req = LinkReq {
                input_count: (descs.len() as u32).into(),
                option_count: (options.len() as u32).into(),
                data_len: (data.len() as u64).into(),
                out_len: segs.iter().map(|s| s.len.get()).sum::<u64>().into(),
                info_log_len: 64.into(),
                error_log_len: 64.into(),
                nsegs: (segs.len() as u32).into(),
                _pad: 0.into(),
            };
            let parts = LinkParts {
                options,
                inputs: &descs,
                segs,
                data: &data,
            };
            let (status, body) = h.call(session, ctx, Request::ModuleLink(req, parts));
            let resp = LinkResp::read_from_prefix(&body).ok().map(|(r, _)| r);
            (status, resp)
        }

        fn guest(h: &Harness, gpa: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            h.mem.read_slice(&mut out, GuestAddress(gpa)).unwrap();
            out
        }

        fn setup() -> (Harness, (u64, u64)) {
            let mut h = Harness::new(1 << 30);
            let session = h.open();
            let ctx = h.context(session);
            (h, (session, ctx))
        }

        #[test]
        fn a_linked_ptx_image_lands_after_the_log_areas_and_loads() {
            let (mut h, sc) = setup();
            let ptx = PTX.as_bytes();
            // The buffer split over both guest regions.
            let segs = [sg(0x1000, 100), sg(GUEST_HIGH, 4000)];
            let (status, resp) = link(&mut h, sc, &[(jit_input::PTX, ptx)], &[], &segs);
            assert_eq!(status, Status::SUCCESS);
            let resp = resp.unwrap();
            assert_eq!(resp.image_len.get(), ptx.len() as u64 + 1);
            let mut out = guest(&h, 0x1000, 100);
            out.extend(guest(&h, GUEST_HIGH, 4000));
            assert_eq!(&out[0..1], b"\0", "empty info log");
            assert_eq!(&out[64..65], b"\0", "empty error log");
            let image = &out[128..128 + ptx.len() + 1];
            assert_eq!(&image[..ptx.len()], ptx);
            let module = h.handle(
                sc.0,
                sc.1,
                Request::ModuleLoad(
                    vgpu_spec::wire::ModuleLoadReq {
                        image_len: (image.len() as u64).into(),
                        kind: vgpu_spec::wire::image::PTX.into(),
                        _pad: 0.into(),
                    },
                    image,
                ),
            );
            assert_ne!(module, 0);
        }

        #[test]
        fn an_image_larger_than_its_area_is_not_written_but_its_size_is_returned() {
            let (mut h, sc) = setup();
            let ptx = PTX.as_bytes();
            let segs = [sg(0x2000, 128 + 16)];
            h.mem
                .write_slice(&[0xaa; 144], GuestAddress(0x2000))
                .unwrap();
            let (status, resp) = link(&mut h, sc, &[(jit_input::PTX, ptx)], &[], &segs);
            assert_eq!(status, Status::SUCCESS);
            assert_eq!(resp.unwrap().image_len.get(), ptx.len() as u64 + 1);
            assert_eq!(guest(&h, 0x2000 + 128, 16), vec![0xaa; 16]);
        }

        #[test]
        fn invalid_ptx_returns_invalid_ptx_with_the_error_log_in_guest_memory() {
            let (mut h, sc) = setup();
            let segs = [sg(0x3000, 4096)];
            let (status, resp) = link(
                &mut h,
                sc,
                &[(jit_input::PTX, b".version 8.0\n.target sm_90\n/* open")],
                &[],
                &segs,
            );
            assert_eq!(status, Status::INVALID_PTX);
            assert!(resp.is_none());
            let error = guest(&h, 0x3000 + 64, 64);
            let text = vgpu_spec::link::read_log(&error);
            assert!(
                text.starts_with(b"ptxas"),
                "{:?}",
                String::from_utf8_lossy(text)
            );
            assert_eq!(text.len(), 63, "truncated to the area");
        }

        #[test]
        fn pointer_options_unknown_kinds_and_outside_buffers_are_invalid_value() {
            let (mut h, sc) = setup();
            let ptx = PTX.as_bytes();
            let segs = [sg(0x3000, 4096)];
            let log_buffer = JitOption {
                option: 3.into(),
                _pad: 0.into(),
                value: 0x1000.into(),
            };
            let (status, _) = link(&mut h, sc, &[(jit_input::PTX, ptx)], &[log_buffer], &segs);
            assert_eq!(status, Status::INVALID_VALUE);
            let (status, _) = link(&mut h, sc, &[(9, ptx)], &[], &segs);
            assert_eq!(status, Status::INVALID_VALUE);
            let outside = [sg(GUEST_HIGH + (64 << 10) - 8, 4096)];
            let (status, _) = link(&mut h, sc, &[(jit_input::PTX, ptx)], &[], &outside);
            assert_eq!(status, Status::INVALID_VALUE);
        }

        #[test]
        fn link_without_a_context_or_with_two_inputs_on_emulated_fails() {
            let (mut h, sc) = setup();
            let ptx = PTX.as_bytes();
            let segs = [sg(0x3000, 4096)];
            let (status, _) = link(&mut h, (sc.0, 0), &[(jit_input::PTX, ptx)], &[], &segs);
            assert_eq!(status, Status::INVALID_CONTEXT);
            let two = [(jit_input::PTX, ptx), (jit_input::PTX, ptx)];
            let (status, _) = link(&mut h, sc, &two, &[], &segs);
            assert_eq!(status, Status::NOT_SUPPORTED);
            let (status, _) = link(&mut h, sc, &[], &[], &segs);
            assert_eq!(status, Status::INVALID_VALUE);
        }
    }
}
