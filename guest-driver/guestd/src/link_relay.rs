//! `MODULE_LINK`, relayed. Its output buffer (the info log area, the error
//! log area, then the image area) is guest memory the device writes, named
//! by the client's sg entries, which are client addresses and not physical
//! ones: it never goes to the device as is. The relay checks each entry
//! against the client's memory, lays the whole buffer in one DMA bounce
//! area, sends the link with entries naming that area, and then copies back
//! what the device may have written: the log areas whatever the status (the
//! device writes the logs once the link has run, failed or not), and the
//! image, on success, if it fit its area. The log areas are first filled
//! from the client's buffer, so a request the device refuses before
//! linking (which leaves the buffer untouched) leaves the client's logs as
//! they were; nothing else of the client's buffer is written.

use vgpu_spec::link::{image_capacity, image_offset, LinkParts};
use vgpu_spec::wire::{LinkReq, LinkResp, ReqHeader, SgEntry, FLAG_ASYNC};
use vgpu_spec::{Request, Response, Status, MAX_REQUEST_BYTES, MAX_SG_ENTRIES};

use super::{
    bounce_in, bounce_out, dma_entries, Client, GuestMemoryMmap, MAX_RESPONSE, RESP_HEADER,
};
use crate::device_queue::DeviceLink;
use crate::dma::DmaError;
use crate::heap::BLOCK;
use crate::sg::{self, Backing};

/// A link being relayed.
pub(super) struct LinkJob<'a> {
    /// The client queue it came on.
    pub queue: u16,
    /// Its header.
    pub header: ReqHeader,
    /// The client's writable space for the response.
    pub resp_cap: usize,
    /// The client's memory.
    pub mem: &'a GuestMemoryMmap,
}

/// Bytes of a link request whose output buffer takes `nsegs` entries.
fn request_len(parts: &LinkParts<'_>, nsegs: usize) -> Option<usize> {
    let entries = parts.options.len() + parts.inputs.len() + nsegs;
    (std::mem::size_of::<ReqHeader>() + std::mem::size_of::<LinkReq>())
        .checked_add(entries.checked_mul(std::mem::size_of::<SgEntry>())?)?
        .checked_add(parts.data.len())
}

/// The image length of a successful link's response.
fn linked_image_len(resp: &[u8]) -> Option<u64> {
    let resp = Response::decode(resp).ok()?;
    if resp.status() != Status::SUCCESS {
        return None;
    }
    let (body, _) = resp.fixed::<LinkResp>().ok()?;
    Some(body.image_len.get())
}

impl<L: DeviceLink + ?Sized> Client<L> {
    /// Relays a link with its output buffer bounced; the device's answer
    /// goes to `out`.
    pub(super) fn link(
        &self,
        job: &LinkJob<'_>,
        body: &LinkReq,
        parts: &LinkParts<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Status> {
        let mem = job.mem;
        // Every entry must lie in client memory; all of it is bounced, so
        // no page is ever translated.
        let mut pieces = Vec::new();
        sg::pieces(
            parts.segs,
            &mut |gpa, len| self.resolve(mem, gpa, len).map(|_| Backing::Plain),
            &mut |_| Err(DmaError::NoPfn),
            &mut pieces,
        )?;
        // Buffer layout: the output area, the request, the response.
        let out_len = usize::try_from(body.out_len.get()).map_err(|_| Status::OUT_OF_MEMORY)?;
        // Entries of the output area: at most one per block, plus one.
        let max_entries = (out_len.div_ceil(BLOCK) + 1).min(MAX_SG_ENTRIES as usize);
        let req_at = out_len
            .checked_next_multiple_of(64)
            .ok_or(Status::OUT_OF_MEMORY)?;
        let resp_len = job.resp_cap.clamp(RESP_HEADER, MAX_RESPONSE);
        let resp_at = request_len(parts, max_entries)
            .and_then(|n| req_at.checked_add(n))
            .and_then(|end| end.checked_next_multiple_of(64))
            .ok_or(Status::OUT_OF_MEMORY)?;
        let total = resp_at.checked_add(resp_len).ok_or(Status::OUT_OF_MEMORY)?;
        let mut buf = self.link.alloc(total).map_err(|e| self.device_failed(e))?;
        let mut entries = Vec::new();
        dma_entries(&buf, 0..out_len, &mut entries).map_err(|e| self.device_failed(e.into()))?;
        if entries.len() > max_entries {
            tracing::warn!(
                client = self.id,
                out_len,
                entries = entries.len(),
                "Link output area takes too many entries"
            );
            return Err(Status::OUT_OF_MEMORY);
        }
        let logs = image_offset(body);
        bounce_in(mem, &pieces, 0..logs, &mut buf.as_mut_slice()[..out_len])?;

        let mut header = job.header;
        // The link is synchronous; its output is copied out before the
        // client hears back.
        header.flags = (header.flags.get() & !FLAG_ASYNC).into();
        let req = LinkReq {
            nsegs: (entries.len() as u32).into(),
            ..*body
        };
        let parts = LinkParts {
            segs: &entries,
            ..*parts
        };
        let mut bytes = Vec::with_capacity(resp_at - req_at);
        Request::ModuleLink(req, parts).encode(header, &mut bytes);
        if bytes.len() as u64 > MAX_REQUEST_BYTES {
            tracing::debug!(
                client = self.id,
                len = bytes.len(),
                "Rewritten link request is over the device's limit"
            );
            return Err(Status::INVALID_VALUE);
        }
        let req_len = bytes.len();
        buf.as_mut_slice()[req_at..req_at + req_len].copy_from_slice(&bytes);
        drop(bytes);
        self.exchange(job.queue, &buf, (req_at, req_len), (resp_at, resp_len), out)?;

        let area = &buf.as_slice()[..out_len];
        bounce_out(mem, &pieces, 0..logs, area)?;
        if let Some(image_len) = linked_image_len(out).filter(|n| *n <= image_capacity(body)) {
            bounce_out(mem, &pieces, logs..logs + image_len, area)?;
        }
        Ok(())
    }
}
