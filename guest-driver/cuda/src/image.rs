//! Module image sizing. `cuModuleLoadData` receives a bare pointer, so the
//! library must work out how many bytes the image spans before it can ship
//! them: PTX up to and including its NUL, an ELF cubin to the end of its
//! furthest table, section or segment, a fatbin from its header. The
//! pointer is untrusted: header fields are read only after the magic
//! matched, byte by byte where the input may be a short string, and every
//! size is computed with checked arithmetic and capped at
//! [`vgpu_spec::MAX_MODULE_IMAGE`].

use thiserror::Error;
use vgpu_spec::wire::image;
use vgpu_spec::Status;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const FATBIN_MAGIC: [u8; 4] = 0xBA55_ED50u32.to_le_bytes();
const ELF_HEADER: usize = 64;
const ELF_PHDR: usize = 56;
const ELF_SHDR: usize = 64;
const FATBIN_HEADER: usize = 16;
const SHT_NOBITS: u32 = 8;

/// Why an image could not be sized.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub(crate) enum ImageError {
    /// Not PTX text, an ELF cubin or a fatbin.
    #[error("Module image is not PTX, an ELF cubin or a fatbin")]
    UnknownFormat,
    /// PTX with no NUL terminator within the size limit.
    #[error("PTX image has no NUL terminator within {0} bytes")]
    Unterminated(u64),
    /// A header field is inconsistent.
    #[error("Module image header is invalid: {0}")]
    BadHeader(&'static str),
    /// The image claims more bytes than the limit or than are present.
    #[error("Module image spans {0} bytes, more than allowed or present")]
    TooLarge(u64),
}

impl ImageError {
    /// The status a load of such an image fails with.
    pub(crate) fn status(&self) -> Status {
        Status::INVALID_IMAGE
    }
}

/// Bytes an image can be read from.
pub(crate) trait ImageBytes {
    /// Fills `out` from `offset`; false if those bytes are not available.
    fn read(&self, offset: usize, out: &mut [u8]) -> bool;
    /// The byte at `offset`, if available.
    fn byte(&self, offset: usize) -> Option<u8> {
        let mut b = [0u8];
        self.read(offset, &mut b).then_some(b[0])
    }
    /// The offset of the first NUL below `max`: `Ok(None)` if there is none
    /// below `max`, `Err(n)` if the bytes end at `n` before a NUL.
    fn find_nul(&self, max: usize) -> Result<Option<usize>, usize> {
        for offset in 0..max {
            match self.byte(offset) {
                None => return Err(offset),
                Some(0) => return Ok(Some(offset)),
                Some(_) => {}
            }
        }
        Ok(None)
    }
}

impl ImageBytes for [u8] {
    fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        match offset
            .checked_add(out.len())
            .and_then(|end| self.get(offset..end))
        {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn find_nul(&self, max: usize) -> Result<Option<usize>, usize> {
        match self.iter().take(max).position(|b| *b == 0) {
            Some(nul) => Ok(Some(nul)),
            None if self.len() < max => Err(self.len()),
            None => Ok(None),
        }
    }
}

/// An image behind a raw pointer from the application, readable up to
/// [`vgpu_spec::MAX_MODULE_IMAGE`] bytes.
pub(crate) struct RawImage(*const u8);

impl RawImage {
    /// # Safety
    /// `ptr` must point at a module image as the CUDA API defines it: every
    /// byte the sizing rules reach (which stay inside a well-formed image)
    /// must be readable.
    pub(crate) unsafe fn new(ptr: *const u8) -> RawImage {
        RawImage(ptr)
    }
}

impl ImageBytes for RawImage {
    fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        let limit = vgpu_spec::MAX_MODULE_IMAGE as usize;
        if offset.checked_add(out.len()).is_none_or(|end| end > limit) {
            return false;
        }
        // SAFETY: `RawImage::new`'s contract makes every byte the sizing
        // rules read available; the range is below the image size limit and
        // `out` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.add(offset), out.as_mut_ptr(), out.len());
        }
        true
    }

    fn find_nul(&self, max: usize) -> Result<Option<usize>, usize> {
        // SAFETY: a PTX image is a NUL-terminated string (`RawImage::new`'s
        // contract); `strnlen` reads no further than its NUL or `max` bytes.
        let n = unsafe { libc::strnlen(self.0.cast(), max) };
        Ok((n < max).then_some(n))
    }
}

/// An image's kind (a [`vgpu_spec::wire::image`] value) and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sized {
    /// One of [`vgpu_spec::wire::image`].
    pub kind: u32,
    /// Bytes the image spans.
    pub len: usize,
}

/// True if the bytes start with `magic`, reading one byte at a time and
/// stopping at the first mismatch (a short NUL-terminated string is never
/// read past its terminator).
fn starts_with(img: &(impl ImageBytes + ?std::marker::Sized), magic: &[u8]) -> bool {
    magic
        .iter()
        .enumerate()
        .all(|(i, want)| img.byte(i) == Some(*want))
}

fn le_u16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

fn limit() -> u64 {
    vgpu_spec::MAX_MODULE_IMAGE
}

/// `a + b * c`, failing past the image size limit.
fn table_end(start: u64, count: u64, entry: u64) -> Result<u64, ImageError> {
    count
        .checked_mul(entry)
        .and_then(|n| n.checked_add(start))
        .filter(|end| *end <= limit())
        .ok_or(ImageError::TooLarge(u64::MAX))
}

/// Sizes the image at the start of `img`.
pub(crate) fn size_image(
    img: &(impl ImageBytes + ?std::marker::Sized),
) -> Result<Sized, ImageError> {
    if starts_with(img, &ELF_MAGIC) {
        return size_elf(img);
    }
    if starts_with(img, &FATBIN_MAGIC) {
        return size_fatbin(img);
    }
    size_ptx(img)
}

fn is_text(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | b'\r' | 0x0c | b' '..=b'~')
}

fn size_ptx(img: &(impl ImageBytes + ?std::marker::Sized)) -> Result<Sized, ImageError> {
    match img.byte(0) {
        Some(b) if is_text(b) => {}
        _ => return Err(ImageError::UnknownFormat),
    }
    match img.find_nul(limit() as usize) {
        Ok(Some(nul)) => Ok(Sized {
            kind: image::PTX,
            len: nul + 1,
        }),
        Ok(None) => Err(ImageError::Unterminated(limit())),
        Err(end) => Err(ImageError::Unterminated(end as u64)),
    }
}

fn size_fatbin(img: &(impl ImageBytes + ?std::marker::Sized)) -> Result<Sized, ImageError> {
    let mut h = [0u8; FATBIN_HEADER];
    if !img.read(0, &mut h) {
        return Err(ImageError::BadHeader("fatbin header is truncated"));
    }
    let header_size = le_u16(&h, 6);
    let fat_size = le_u64(&h, 8);
    if header_size < FATBIN_HEADER as u64 {
        return Err(ImageError::BadHeader("fatbin header size is below 16"));
    }
    let len = header_size
        .checked_add(fat_size)
        .filter(|len| *len <= limit())
        .ok_or(ImageError::TooLarge(fat_size))?;
    finish(img, image::FATBIN, len)
}

fn size_elf(img: &(impl ImageBytes + ?std::marker::Sized)) -> Result<Sized, ImageError> {
    let mut h = [0u8; ELF_HEADER];
    if !img.read(0, &mut h) {
        return Err(ImageError::BadHeader("ELF header is truncated"));
    }
    if h[4] != 2 {
        return Err(ImageError::BadHeader("ELF image is not 64-bit"));
    }
    if h[5] != 1 {
        return Err(ImageError::BadHeader("ELF image is not little-endian"));
    }
    let phoff = le_u64(&h, 0x20);
    let shoff = le_u64(&h, 0x28);
    let phentsize = le_u16(&h, 0x36);
    let phnum = le_u16(&h, 0x38);
    let shentsize = le_u16(&h, 0x3a);
    let shnum = le_u16(&h, 0x3c);

    let mut end = ELF_HEADER as u64;
    if phnum > 0 {
        if phentsize < ELF_PHDR as u64 {
            return Err(ImageError::BadHeader(
                "ELF program header entries are too small",
            ));
        }
        end = end.max(table_end(phoff, phnum, phentsize)?);
        let mut ph = [0u8; ELF_PHDR];
        for i in 0..phnum {
            let at = table_end(phoff, i, phentsize)?;
            if !img.read(at as usize, &mut ph) {
                return Err(ImageError::TooLarge(at));
            }
            end = end.max(table_end(le_u64(&ph, 8), 1, le_u64(&ph, 32))?);
        }
    }
    if shnum > 0 {
        if shentsize < ELF_SHDR as u64 {
            return Err(ImageError::BadHeader(
                "ELF section header entries are too small",
            ));
        }
        end = end.max(table_end(shoff, shnum, shentsize)?);
        let mut sh = [0u8; ELF_SHDR];
        for i in 0..shnum {
            let at = table_end(shoff, i, shentsize)?;
            if !img.read(at as usize, &mut sh) {
                return Err(ImageError::TooLarge(at));
            }
            if le_u32(&sh, 4) != SHT_NOBITS {
                end = end.max(table_end(le_u64(&sh, 0x18), 1, le_u64(&sh, 0x20))?);
            }
        }
    }
    finish(img, image::CUBIN, end)
}

/// Checks the last byte of a sized image is present.
fn finish(
    img: &(impl ImageBytes + ?std::marker::Sized),
    kind: u32,
    len: u64,
) -> Result<Sized, ImageError> {
    let len_usize = usize::try_from(len).map_err(|_| ImageError::TooLarge(len))?;
    if len_usize == 0 || img.byte(len_usize - 1).is_none() {
        return Err(ImageError::TooLarge(len));
    }
    Ok(Sized {
        kind,
        len: len_usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(phnum: u16, shnum: u16, phoff: u64, shoff: u64, total: usize) -> Vec<u8> {
        let mut v = vec![0u8; total];
        v[..4].copy_from_slice(&ELF_MAGIC);
        v[4] = 2;
        v[5] = 1;
        v[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        v[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        v[0x36..0x38].copy_from_slice(&(ELF_PHDR as u16).to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        v[0x3a..0x3c].copy_from_slice(&(ELF_SHDR as u16).to_le_bytes());
        v[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        v
    }

    fn set_u64(v: &mut [u8], at: usize, value: u64) {
        v[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Counts reads past a bound, to prove the sizer does not over-read.
    struct Guarded<'a>(&'a [u8], usize);
    impl ImageBytes for Guarded<'_> {
        fn read(&self, offset: usize, out: &mut [u8]) -> bool {
            assert!(offset + out.len() <= self.1, "read past {}", self.1);
            self.0.read(offset, out)
        }
    }

    #[test]
    fn ptx_is_sized_up_to_and_including_its_nul() {
        let ptx = b"//\n.version 8.0\n.target sm_90\n\0garbage";
        let sized = size_image(&ptx[..]).unwrap();
        assert_eq!(sized.kind, image::PTX);
        assert_eq!(sized.len, 31);
        assert_eq!(ptx[sized.len - 1], 0);
    }

    #[test]
    fn ptx_without_nul_is_invalid_image() {
        let err = size_image(&b".version 8.0"[..]).unwrap_err();
        assert!(matches!(err, ImageError::Unterminated(12)));
        assert_eq!(err.status(), Status::INVALID_IMAGE);
    }

    #[test]
    fn binary_garbage_is_unknown_format() {
        assert_eq!(
            size_image(&[0x01u8, 0x02, 0x03, 0][..]),
            Err(ImageError::UnknownFormat)
        );
        assert_eq!(size_image(&[0u8][..]), Err(ImageError::UnknownFormat));
    }

    #[test]
    fn short_strings_resembling_a_magic_are_not_over_read() {
        let s = [0x7fu8, b'E', 0];
        assert_eq!(size_image(&Guarded(&s, 3)), Err(ImageError::UnknownFormat));
        let p = [0x50u8, 0];
        let sized = size_image(&Guarded(&p, 2)).unwrap();
        assert_eq!((sized.kind, sized.len), (image::PTX, 2));
    }

    #[test]
    fn cubin_with_only_a_section_table_ends_after_it() {
        let v = elf(0, 3, 0, 0x100, 0x100 + 3 * ELF_SHDR);
        let sized = size_image(&v[..]).unwrap();
        assert_eq!(sized.kind, image::CUBIN);
        assert_eq!(sized.len, 0x100 + 3 * ELF_SHDR);
    }

    #[test]
    fn cubin_segment_beyond_the_tables_extends_the_size() {
        let mut v = elf(1, 1, 0x40, 0x80, 0x400);
        // Program header 0: p_offset 0x200, p_filesz 0x200.
        set_u64(&mut v, 0x40 + 8, 0x200);
        set_u64(&mut v, 0x40 + 32, 0x200);
        let sized = size_image(&v[..]).unwrap();
        assert_eq!(sized.len, 0x400);
    }

    #[test]
    fn cubin_section_data_beyond_the_tables_extends_the_size() {
        let mut v = elf(0, 1, 0, 0x40, 0x300);
        set_u64(&mut v, 0x40 + 0x18, 0x100);
        set_u64(&mut v, 0x40 + 0x20, 0x200);
        assert_eq!(size_image(&v[..]).unwrap().len, 0x300);
        // A NOBITS section (.bss) occupies no file bytes.
        v[0x44..0x48].copy_from_slice(&SHT_NOBITS.to_le_bytes());
        assert_eq!(size_image(&v[..]).unwrap().len, 0x80);
    }

    #[test]
    fn cubin_whose_header_claims_more_than_present_is_rejected() {
        let v = elf(0, 4, 0, 0x1000, 0x200);
        assert!(matches!(size_image(&v[..]), Err(ImageError::TooLarge(_))));
        let v = elf(0, 1, 0, u64::MAX - 8, 0x200);
        assert!(matches!(size_image(&v[..]), Err(ImageError::TooLarge(_))));
    }

    #[test]
    fn elf32_and_big_endian_are_rejected() {
        let mut v = elf(0, 0, 0, 0, 64);
        v[4] = 1;
        assert!(matches!(size_image(&v[..]), Err(ImageError::BadHeader(_))));
        let mut v = elf(0, 0, 0, 0, 64);
        v[5] = 2;
        assert!(matches!(size_image(&v[..]), Err(ImageError::BadHeader(_))));
        assert!(matches!(
            size_image(&ELF_MAGIC[..]),
            Err(ImageError::BadHeader(_))
        ));
    }

    #[test]
    fn fatbin_is_header_size_plus_fat_size() {
        let mut v = vec![0u8; 16 + 100 + 7];
        v[..4].copy_from_slice(&FATBIN_MAGIC);
        v[4..6].copy_from_slice(&1u16.to_le_bytes());
        v[6..8].copy_from_slice(&16u16.to_le_bytes());
        set_u64(&mut v, 8, 100);
        let sized = size_image(&v[..]).unwrap();
        assert_eq!((sized.kind, sized.len), (image::FATBIN, 116));
    }

    #[test]
    fn fatbin_with_bad_header_size_or_huge_size_is_rejected() {
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(&FATBIN_MAGIC);
        v[6..8].copy_from_slice(&8u16.to_le_bytes());
        assert!(matches!(size_image(&v[..]), Err(ImageError::BadHeader(_))));
        v[6..8].copy_from_slice(&16u16.to_le_bytes());
        set_u64(&mut v, 8, u64::MAX);
        assert!(matches!(size_image(&v[..]), Err(ImageError::TooLarge(_))));
        set_u64(&mut v, 8, 1000);
        assert!(matches!(size_image(&v[..]), Err(ImageError::TooLarge(_))));
    }

    #[test]
    fn raw_image_reads_like_a_slice() {
        let ptx = b".version 8.0\0";
        // SAFETY: the test image is a valid NUL-terminated string.
        let raw = unsafe { RawImage::new(ptx.as_ptr()) };
        assert_eq!(size_image(&raw).unwrap().len, ptx.len());
    }
}
