//! Host-device copies of a [`CudaContext`]: scatter-gather lists of guest memory, queued or
//! synchronous, and the snapshot of a bounce buffer the guest reuses once answered.

use vgpu_spec::Status;

use super::{check, cu, stream_ptr, CudaContext, GpuResult, HostBuf, StreamRef};

/// Device address `base + offset`, or INVALID_VALUE on overflow.
fn device_offset(base: u64, offset: usize) -> GpuResult<u64> {
    base.checked_add(offset as u64).ok_or(Status::INVALID_VALUE)
}

impl CudaContext {
    pub(super) fn htod(
        &mut self,
        dst: u64,
        src: &[HostBuf],
        stream: StreamRef,
        asynchronous: bool,
        snapshot: bool,
    ) -> GpuResult<()> {
        self.enter_work(stream)?;
        let s = stream_ptr(stream);
        if asynchronous && snapshot {
            // The source is a bounce buffer the guest reuses once we answer:
            // copy it into pageable memory, which the driver stages before
            // cuMemcpyHtoDAsync returns, so `staged` may be dropped after.
            let total = src
                .iter()
                .try_fold(0usize, |acc, b| acc.checked_add(b.len()));
            let total = total.ok_or(Status::INVALID_VALUE)?;
            let mut staged = Vec::new();
            staged
                .try_reserve_exact(total)
                .map_err(|_| Status::OUT_OF_MEMORY)?;
            staged.resize(total, 0u8);
            let mut at = 0;
            for buf in src {
                buf.read_at(0, &mut staged[at..at + buf.len()])?;
                at += buf.len();
            }
            // SAFETY: staged holds total bytes and outlives the call.
            return check(unsafe {
                cu::cuMemcpyHtoDAsync_v2(dst, staged.as_ptr().cast(), total, s)
            });
        }
        let queued = asynchronous || stream.is_some();
        let mut offset = 0usize;
        for buf in src {
            let to = device_offset(dst, offset)?;
            // SAFETY: HostBuf guarantees its range stays mapped for as long
            // as any queued work may read it.
            check(unsafe {
                if queued {
                    cu::cuMemcpyHtoDAsync_v2(to, buf.ptr().cast(), buf.len(), s)
                } else {
                    cu::cuMemcpyHtoD_v2(to, buf.ptr().cast(), buf.len())
                }
            })?;
            offset = offset.checked_add(buf.len()).ok_or(Status::INVALID_VALUE)?;
        }
        if queued {
            self.finish(stream, asynchronous)?;
        }
        Ok(())
    }

    pub(super) fn dtoh(
        &mut self,
        dst: &[HostBuf],
        src: u64,
        stream: StreamRef,
        asynchronous: bool,
    ) -> GpuResult<()> {
        self.enter_work(stream)?;
        let s = stream_ptr(stream);
        let queued = asynchronous || stream.is_some();
        let mut offset = 0usize;
        for buf in dst {
            let from = device_offset(src, offset)?;
            // SAFETY: HostBuf guarantees its range stays mapped and
            // writable for as long as any queued work may write it.
            check(unsafe {
                if queued {
                    cu::cuMemcpyDtoHAsync_v2(buf.ptr().cast(), from, buf.len(), s)
                } else {
                    cu::cuMemcpyDtoH_v2(buf.ptr().cast(), from, buf.len())
                }
            })?;
            offset = offset.checked_add(buf.len()).ok_or(Status::INVALID_VALUE)?;
        }
        if queued {
            self.finish(stream, asynchronous)?;
        }
        Ok(())
    }
}
