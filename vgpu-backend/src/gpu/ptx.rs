//! Module images: format sniffing, bounds checks for binary images, and a
//! small PTX parser that finds kernel entry points, their packed parameter
//! layouts and module-scope variables.
//!
//! Everything here reads guest-supplied bytes: no input makes it panic, loop
//! forever or recurse. The parser understands the declarations nvcc emits
//! (`.entry`, `.param`, `.global`, `.const`) and skips function bodies
//! without interpreting them.

use std::collections::{HashMap, HashSet};

use thiserror::Error;
use vgpu_spec::{MAX_PARAMS, MAX_PARAM_BYTES};

use super::ParamLayout;

/// The format of a module image, as far as its first bytes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// PTX assembly text.
    Ptx,
    /// An ELF cubin.
    Elf,
    /// A fatbin container, or the `__fatBinC_Wrapper_t` that points at one.
    Fatbin,
    /// Anything else.
    Unknown,
}

/// Magic of a fatbin container (`0xBA55ED50`, little-endian).
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// Magic of `__fatBinC_Wrapper_t`, which holds host pointers to a fatbin.
pub const FATBIN_WRAPPER_MAGIC: u32 = 0x4662_43b1;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// Tells PTX, ELF cubins and fatbins apart.
pub fn image_kind(bytes: &[u8]) -> ImageKind {
    if bytes.starts_with(&ELF_MAGIC) {
        return ImageKind::Elf;
    }
    match read_u32(bytes, 0) {
        Some(FATBIN_MAGIC) | Some(FATBIN_WRAPPER_MAGIC) => return ImageKind::Fatbin,
        _ => {}
    }
    let text = strip_trailing_nuls(bytes);
    if skip_space_and_comments(text).starts_with(b".version") || contains(text, b".target") {
        ImageKind::Ptx
    } else {
        ImageKind::Unknown
    }
}

/// True if the image is a `__fatBinC_Wrapper_t`, which holds pointers into
/// the address space of the process that built it and so cannot be loaded
/// anywhere else.
pub fn is_fatbin_wrapper(bytes: &[u8]) -> bool {
    read_u32(bytes, 0) == Some(FATBIN_WRAPPER_MAGIC)
}

/// `bytes` without the NUL terminator(s) a PTX image may carry.
pub fn strip_trailing_nuls(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    &bytes[..end]
}

/// Checks that a binary image (ELF cubin or fatbin) lies entirely inside
/// `bytes`: the driver reads these formats by the offsets and sizes in their
/// headers, not by the buffer length, so a lying header would make it read
/// past the buffer. PTX and unknown images return true (the driver reads PTX
/// up to its NUL terminator). Fatbin wrappers return false.
pub fn binary_fits(bytes: &[u8]) -> bool {
    match image_kind(bytes) {
        ImageKind::Elf => elf_fits(bytes),
        ImageKind::Fatbin if is_fatbin_wrapper(bytes) => false,
        ImageKind::Fatbin => {
            // struct { u32 magic; u16 version; u16 header_size; u64 fat_size; }
            let (Some(header), Some(fat)) = (read_u16(bytes, 6), read_u64(bytes, 8)) else {
                return false;
            };
            u64::from(header) >= 16 && fits(bytes, u64::from(header), fat)
        }
        ImageKind::Ptx | ImageKind::Unknown => true,
    }
}

fn elf_fits(b: &[u8]) -> bool {
    // Cubins are 64-bit little-endian ELF.
    if b.len() < 64 || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let field = |off| read_u64(b, off);
    let half = |off| read_u16(b, off).map(u64::from);
    let (Some(phoff), Some(shoff), Some(phentsize), Some(phnum), Some(shentsize), Some(shnum)) = (
        field(0x20),
        field(0x28),
        half(0x36),
        half(0x38),
        half(0x3a),
        half(0x3c),
    ) else {
        return false;
    };
    if (phnum > 0 && phentsize < 56) || (shnum > 0 && shentsize < 64) {
        return false;
    }
    if shnum == 0 && shoff != 0 {
        return false; // extended section numbering: not something nvcc emits
    }
    if (phnum > 0 && !fits(b, phoff, phnum * phentsize))
        || (shnum > 0 && !fits(b, shoff, shnum * shentsize))
    {
        return false;
    }
    let sections = (0..shnum).all(|i| {
        let at = (shoff + i * shentsize) as usize;
        match (
            read_u32(b, at + 4),
            read_u64(b, at + 0x18),
            read_u64(b, at + 0x20),
        ) {
            // SHT_NULL and SHT_NOBITS occupy no file bytes.
            (Some(0), _, _) | (Some(8), _, _) => true,
            (Some(_), Some(off), Some(size)) => fits(b, off, size),
            _ => false,
        }
    });
    let segments = (0..phnum).all(|i| {
        let at = (phoff + i * phentsize) as usize;
        matches!((read_u64(b, at + 8), read_u64(b, at + 0x20)), (Some(off), Some(size)) if fits(b, off, size))
    });
    sections && segments
}

fn fits(bytes: &[u8], offset: u64, len: u64) -> bool {
    offset
        .checked_add(len)
        .is_some_and(|end| end <= bytes.len() as u64)
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn skip_space_and_comments(mut s: &[u8]) -> &[u8] {
    loop {
        let trimmed = s.trim_ascii_start();
        s = if let Some(rest) = trimmed.strip_prefix(b"//") {
            rest.iter()
                .position(|b| *b == b'\n')
                .map_or(&[][..], |i| &rest[i..])
        } else if let Some(rest) = trimmed.strip_prefix(b"/*") {
            rest.windows(2)
                .position(|w| w == b"*/")
                .map_or(&[][..], |i| &rest[i + 2..])
        } else {
            return trimmed;
        };
    }
}

/// A kernel entry point and its packed parameter layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxEntry {
    /// The (mangled) entry name.
    pub name: String,
    /// One layout per parameter, in declaration order.
    pub params: Vec<ParamLayout>,
}

impl PtxEntry {
    /// Size of the packed parameter block: the end of the last parameter.
    pub fn param_bytes(&self) -> u32 {
        self.params
            .iter()
            .map(|p| p.offset + p.size)
            .max()
            .unwrap_or(0)
    }
}

/// What a PTX module declares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtxModule {
    /// Kernel entry points, in order of appearance.
    pub entries: Vec<PtxEntry>,
    /// Module-scope `.global` and `.const` variables: (name, size in bytes).
    pub globals: Vec<(String, u64)>,
}

/// Why a PTX image could not be parsed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PtxError {
    /// A `/*` comment never ends.
    #[error("Block comment starting on line {line} is never closed")]
    UnterminatedComment { line: u32 },
    /// A string literal never ends.
    #[error("String starting on line {line} is never closed")]
    UnterminatedString { line: u32 },
    /// A byte that cannot appear in PTX outside comments.
    #[error("Unexpected byte 0x{byte:02x} on line {line}")]
    UnexpectedByte { line: u32, byte: u8 },
    /// A closing bracket without an opening one, or the reverse.
    #[error("Unbalanced '{ch}' on line {line}")]
    Unbalanced { line: u32, ch: char },
    /// The text ends in the middle of a statement.
    #[error("Text ends inside the statement starting on line {line}")]
    UnexpectedEnd { line: u32 },
    /// A token that does not fit the declaration.
    #[error("Expected {expected} on line {line}, found '{found}'")]
    Expected {
        line: u32,
        expected: &'static str,
        found: String,
    },
    /// A type directive this parser does not know.
    #[error("Unknown type '{ty}' on line {line}")]
    UnknownType { line: u32, ty: String },
    /// A number that does not parse.
    #[error("Invalid number '{text}' on line {line}")]
    InvalidNumber { line: u32, text: String },
    /// An `.align` that is not a power of two.
    #[error("Invalid alignment {align} on line {line}")]
    InvalidAlignment { line: u32, align: u64 },
    /// A declaration whose size overflows or is zero.
    #[error("Size of '{name}' is invalid or overflows")]
    InvalidSize { name: String },
    /// A kernel whose parameters exceed the driver's limit.
    #[error("Parameters of entry '{entry}' exceed {MAX_PARAM_BYTES} bytes")]
    ParamsTooLarge { entry: String },
    /// A kernel with too many parameters.
    #[error("Entry '{entry}' has more than {MAX_PARAMS} parameters")]
    TooManyParams { entry: String },
    /// Two different definitions of one symbol.
    #[error("Symbol '{name}' is defined twice")]
    DuplicateSymbol { name: String },
}

/// Parses a PTX image. Reading stops at the first NUL byte, as the driver's
/// does.
pub fn parse(image: &[u8]) -> Result<PtxModule, PtxError> {
    let end = image.iter().position(|b| *b == 0).unwrap_or(image.len());
    let mut lexer = Lexer::new(&image[..end]);
    let mut builder = Builder::default();
    let mut stmt = Vec::new();
    while lexer.statement(&mut stmt)? {
        builder.statement(&stmt)?;
    }
    Ok(builder.module)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind<'a> {
    Word(&'a str),
    Punct(u8),
    Str,
}

#[derive(Clone, Copy, Debug)]
struct Tok<'a> {
    kind: Kind<'a>,
    line: u32,
}

impl Tok<'_> {
    fn is(&self, p: u8) -> bool {
        self.kind == Kind::Punct(p)
    }

    fn word(&self) -> Option<&str> {
        match self.kind {
            Kind::Word(w) => Some(w),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self.kind {
            Kind::Word(w) => w.chars().take(40).collect(),
            Kind::Punct(p) => char::from(p).to_string(),
            Kind::Str => "string".to_string(),
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'%' | b'.')
}

/// Splits PTX text into tokens on demand, so function bodies are skipped
/// without being stored.
struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: u32,
    /// A token read ahead, returned by the next `next_token`.
    peeked: Option<Tok<'a>>,
}

/// Directives that end at the end of their line (or at the next directive)
/// rather than at a `;`.
fn is_line_directive(tok: &Tok<'_>) -> bool {
    matches!(
        tok.word(),
        Some(".version" | ".target" | ".address_size" | ".file" | ".loc")
    )
}

impl<'a> Lexer<'a> {
    fn new(src: &'a [u8]) -> Self {
        Lexer {
            src,
            pos: 0,
            line: 1,
            peeked: None,
        }
    }

    fn next_token(&mut self) -> Result<Option<Tok<'a>>, PtxError> {
        if let Some(tok) = self.peeked.take() {
            return Ok(Some(tok));
        }
        while let Some(&b) = self.src.get(self.pos) {
            let rest = &self.src[self.pos..];
            let line = self.line;
            if b == b'\n' {
                self.line = self.line.saturating_add(1);
                self.pos += 1;
            } else if b.is_ascii_whitespace() || b == 0x0b {
                self.pos += 1;
            } else if rest.starts_with(b"//") {
                self.pos += rest.iter().position(|c| *c == b'\n').unwrap_or(rest.len());
            } else if rest.starts_with(b"/*") {
                let len = rest[2..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .ok_or(PtxError::UnterminatedComment { line })?;
                let newlines = rest[..len + 4].iter().filter(|c| **c == b'\n').count();
                self.line = line.saturating_add(u32::try_from(newlines).unwrap_or(u32::MAX));
                self.pos += len + 4;
            } else if b == b'"' {
                let mut j = 1;
                loop {
                    match rest.get(j) {
                        None | Some(b'\n') => return Err(PtxError::UnterminatedString { line }),
                        Some(b'\\') => j += 2,
                        Some(b'"') => break,
                        Some(_) => j += 1,
                    }
                }
                self.pos += j + 1;
                return Ok(Some(Tok {
                    kind: Kind::Str,
                    line,
                }));
            } else if is_word_byte(b) {
                // A directive ends at the next dot, so run-together
                // directives split: `.param.u32` is `.param`, `.u32`.
                let directive = b == b'.' && rest.get(1).is_some_and(u8::is_ascii_alphabetic);
                let len = rest
                    .iter()
                    .skip(1)
                    .position(|c| !is_word_byte(*c) || (directive && *c == b'.'))
                    .map_or(rest.len(), |i| i + 1);
                let word = std::str::from_utf8(&rest[..len])
                    .map_err(|_| PtxError::UnexpectedByte { line, byte: b })?;
                self.pos += len;
                return Ok(Some(Tok {
                    kind: Kind::Word(word),
                    line,
                }));
            } else if b.is_ascii_graphic() {
                self.pos += 1;
                return Ok(Some(Tok {
                    kind: Kind::Punct(b),
                    line,
                }));
            } else {
                return Err(PtxError::UnexpectedByte { line, byte: b });
            }
        }
        Ok(None)
    }

    /// Reads the next statement into `out`: tokens up to a `;`, or up to a
    /// body in braces (the body itself is skipped). False at the end.
    fn statement(&mut self, out: &mut Vec<Tok<'a>>) -> Result<bool, PtxError> {
        out.clear();
        let (mut parens, mut init_braces) = (0u32, 0u32);
        while let Some(t) = self.next_token()? {
            let new_line_or_directive = t.line != out.first().map_or(t.line, |f| f.line)
                || t.word().is_some_and(|w| w.starts_with('.'));
            if new_line_or_directive && out.first().is_some_and(is_line_directive) {
                self.peeked = Some(t);
                return Ok(true);
            }
            match t.kind {
                Kind::Punct(b'(') => parens += 1,
                Kind::Punct(b')') => {
                    parens = parens.checked_sub(1).ok_or(PtxError::Unbalanced {
                        line: t.line,
                        ch: ')',
                    })?;
                }
                Kind::Punct(b';') if parens == 0 && init_braces == 0 => return Ok(true),
                Kind::Punct(b'{') if init_braces > 0 || out.last().is_some_and(|p| p.is(b'=')) => {
                    init_braces += 1;
                }
                Kind::Punct(b'}') if init_braces > 0 => init_braces -= 1,
                Kind::Punct(b'{') if parens == 0 => {
                    self.skip_body(t.line)?;
                    return Ok(true);
                }
                Kind::Punct(b'{') => {
                    return Err(PtxError::Unbalanced {
                        line: t.line,
                        ch: '{',
                    })
                }
                Kind::Punct(b'}') => {
                    return Err(PtxError::Unbalanced {
                        line: t.line,
                        ch: '}',
                    })
                }
                _ => {}
            }
            out.push(t);
        }
        match out.first() {
            None => Ok(false),
            Some(first) if is_line_directive(first) => Ok(true),
            Some(first) => Err(PtxError::UnexpectedEnd { line: first.line }),
        }
    }

    /// Skips past the `}` matching a `{` just read.
    fn skip_body(&mut self, line: u32) -> Result<(), PtxError> {
        let mut depth = 1u32;
        while let Some(t) = self.next_token()? {
            if t.is(b'{') {
                depth += 1;
            } else if t.is(b'}') {
                depth -= 1;
                if depth == 0 {
                    return Ok(());
                }
            }
        }
        Err(PtxError::Unbalanced { line, ch: '{' })
    }
}

/// Collects entries and globals, rejecting duplicate definitions.
#[derive(Default)]
struct Builder {
    module: PtxModule,
    entry_index: HashMap<String, usize>,
    global_names: HashSet<String>,
}

impl Builder {
    fn statement(&mut self, stmt: &[Tok<'_>]) -> Result<(), PtxError> {
        const KINDS: [&str; 8] = [
            ".entry", ".func", ".global", ".const", ".shared", ".local", ".tex", ".param",
        ];
        let Some(k) = stmt
            .iter()
            .position(|t| t.word().is_some_and(|w| KINDS.contains(&w)))
        else {
            return Ok(()); // .version, .target, .file, .pragma, ...
        };
        if stmt[..k].iter().any(|t| t.word() == Some(".extern")) {
            return Ok(()); // declares a symbol defined elsewhere: no storage here
        }
        match stmt[k].word() {
            Some(".entry") => {
                let entry = parse_entry(&stmt[k + 1..], stmt[k].line)?;
                match self.entry_index.get(&entry.name) {
                    Some(&i) if self.module.entries[i] == entry => {}
                    Some(_) => return Err(PtxError::DuplicateSymbol { name: entry.name }),
                    None => {
                        self.entry_index
                            .insert(entry.name.clone(), self.module.entries.len());
                        self.module.entries.push(entry);
                    }
                }
            }
            Some(".global") | Some(".const") => {
                for (name, size) in parse_variables(&stmt[k + 1..], stmt[k].line)? {
                    if !self.global_names.insert(name.clone()) {
                        return Err(PtxError::DuplicateSymbol { name });
                    }
                    self.module.globals.push((name, size));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn expected(expected: &'static str, tok: Option<&Tok<'_>>, line: u32) -> PtxError {
    PtxError::Expected {
        line: tok.map_or(line, |t| t.line),
        expected,
        found: tok.map_or_else(|| "end of statement".to_string(), Tok::text),
    }
}

fn identifier<'a>(tok: Option<&Tok<'a>>, line: u32) -> Result<&'a str, PtxError> {
    match tok.map(|t| t.kind) {
        Some(Kind::Word(w))
            if !w.starts_with('.') && !w.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            Ok(w)
        }
        _ => Err(expected("a name", tok, line)),
    }
}

fn parse_entry(toks: &[Tok<'_>], line: u32) -> Result<PtxEntry, PtxError> {
    let name = identifier(toks.first(), line)?.to_string();
    let mut params = Vec::new();
    if toks.get(1).is_some_and(|t| t.is(b'(')) {
        let close = toks
            .iter()
            .position(|t| t.is(b')'))
            .ok_or(PtxError::Unbalanced { line, ch: '(' })?;
        let list = &toks[2..close];
        let mut cursor = 0u64;
        if !list.is_empty() {
            for decl in list.split(|t| t.is(b',')) {
                if params.len() >= MAX_PARAMS as usize {
                    return Err(PtxError::TooManyParams { entry: name });
                }
                let (size, align) = parse_param(decl, line)?;
                let offset = cursor.next_multiple_of(align);
                cursor = match offset.checked_add(size) {
                    Some(end) if end <= u64::from(MAX_PARAM_BYTES) => end,
                    _ => return Err(PtxError::ParamsTooLarge { entry: name }),
                };
                // Both fit in u32: cursor <= MAX_PARAM_BYTES.
                params.push(ParamLayout {
                    offset: offset as u32,
                    size: size as u32,
                });
            }
        }
    }
    Ok(PtxEntry { name, params })
}

/// Element type of a declaration: (element size, natural alignment).
#[derive(Default)]
struct TypeSpec {
    elem: Option<u64>,
    vector: u64,
    align: Option<u64>,
}

impl TypeSpec {
    /// Takes a directive at `toks[i]` if it belongs to the type; returns how
    /// many tokens it used (0 if it is not a type directive).
    fn take(&mut self, toks: &[Tok<'_>], i: usize, line: u32) -> Result<usize, PtxError> {
        let Some(word) = toks[i].word() else {
            return Ok(0);
        };
        let line = toks[i].line.max(line);
        match word {
            ".align" => {
                let align = number(toks.get(i + 1), line)?;
                if !align.is_power_of_two() || align > 1 << 16 {
                    return Err(PtxError::InvalidAlignment { line, align });
                }
                self.align = Some(align);
                Ok(2)
            }
            ".v2" | ".v4" | ".v8" => {
                self.vector = word[2..].parse().unwrap_or(1);
                Ok(1)
            }
            _ => match type_size(word) {
                Some(size) => {
                    self.elem = Some(size);
                    Ok(1)
                }
                None if is_type_like(word) => Err(PtxError::UnknownType {
                    line,
                    ty: word.to_string(),
                }),
                None => Ok(0),
            },
        }
    }

    /// (element size including vector width, alignment).
    fn finish(&self, tok: Option<&Tok<'_>>, line: u32) -> Result<(u64, u64), PtxError> {
        let elem = self.elem.ok_or_else(|| expected("a type", tok, line))? * self.vector.max(1);
        Ok((elem, self.align.unwrap_or(elem)))
    }
}

fn type_size(word: &str) -> Option<u64> {
    Some(match word {
        ".u8" | ".s8" | ".b8" => 1,
        ".u16" | ".s16" | ".b16" | ".f16" | ".bf16" => 2,
        ".u32" | ".s32" | ".b32" | ".f32" | ".f16x2" | ".bf16x2" | ".tf32" => 4,
        ".u64" | ".s64" | ".b64" | ".f64" | ".texref" | ".samplerref" | ".surfref" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

/// Directives shaped like a scalar type (`.u24`, `.pred`), so a typo is an
/// error rather than silently ignored.
fn is_type_like(word: &str) -> bool {
    word == ".pred"
        || (word.len() > 2
            && matches!(word.as_bytes()[1], b'u' | b's' | b'b' | b'f')
            && word[2..].bytes().all(|c| c.is_ascii_digit()))
}

fn number(tok: Option<&Tok<'_>>, line: u32) -> Result<u64, PtxError> {
    let word = tok
        .and_then(Tok::word)
        .ok_or_else(|| expected("a number", tok, line))?;
    let line = tok.map_or(line, |t| t.line);
    let digits = word.strip_suffix(['U', 'u']).unwrap_or(word);
    let parsed = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16)
    } else if let Some(bin) = digits
        .strip_prefix("0b")
        .or_else(|| digits.strip_prefix("0B"))
    {
        u64::from_str_radix(bin, 2)
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8)
    } else {
        digits.parse()
    };
    parsed.map_err(|_| PtxError::InvalidNumber {
        line,
        text: word.chars().take(40).collect(),
    })
}

/// One `.param` declaration: (size, alignment).
fn parse_param(decl: &[Tok<'_>], line: u32) -> Result<(u64, u64), PtxError> {
    if decl.first().and_then(Tok::word) != Some(".param") {
        return Err(expected(".param", decl.first(), line));
    }
    let mut spec = TypeSpec::default();
    let mut pointer = false;
    let mut i = 1;
    while i < decl.len() && decl[i].word().is_some_and(|w| w.starts_with('.')) {
        if pointer && decl[i].word() == Some(".align") {
            // `.ptr ... .align N` is the pointee's alignment, not the
            // parameter's: a pointer is laid out as a plain .u64.
            number(decl.get(i + 1), line)?;
            i += 2;
            continue;
        }
        let used = spec.take(decl, i, line)?;
        if used == 0 {
            match decl[i].word() {
                Some(".ptr") => pointer = true,
                Some(".global" | ".const" | ".shared" | ".local") => {}
                _ => return Err(expected("a parameter attribute", decl.get(i), line)),
            }
        }
        i += used.max(1);
    }
    let (elem, align) = spec.finish(decl.get(i), line)?;
    let name = identifier(decl.get(i), line)?;
    let (count, used) = dims(&decl[i + 1..], line, name, false)?;
    if let Some(extra) = decl.get(i + 1 + used) {
        return Err(expected("',' or ')'", Some(extra), line));
    }
    let size = elem
        .checked_mul(count.unwrap_or(1))
        .filter(|s| *s > 0)
        .ok_or_else(|| PtxError::InvalidSize {
            name: name.to_string(),
        })?;
    Ok((size, align))
}

/// Array dimensions `[N][M]...` at the start of `toks`: (element count, or
/// `None` if a dimension is left empty; tokens used).
fn dims(
    toks: &[Tok<'_>],
    line: u32,
    name: &str,
    allow_empty: bool,
) -> Result<(Option<u64>, usize), PtxError> {
    let mut count = Some(1u64);
    let mut i = 0;
    while toks.get(i).is_some_and(|t| t.is(b'[')) {
        if allow_empty && toks.get(i + 1).is_some_and(|t| t.is(b']')) {
            count = None;
            i += 2;
            continue;
        }
        let n = number(toks.get(i + 1), line)?;
        if !toks.get(i + 2).is_some_and(|t| t.is(b']')) {
            return Err(expected("']'", toks.get(i + 2), line));
        }
        count = match count {
            Some(c) => Some(c.checked_mul(n).ok_or_else(|| PtxError::InvalidSize {
                name: name.to_string(),
            })?),
            None => None,
        };
        i += 3;
    }
    Ok((count, i))
}

/// The declarators of a `.global`/`.const` statement (tokens after the
/// state space): (name, size) each.
fn parse_variables(toks: &[Tok<'_>], line: u32) -> Result<Vec<(String, u64)>, PtxError> {
    let mut spec = TypeSpec::default();
    let mut i = 0;
    // `.const[2]`: an old-style constant bank.
    if toks.first().is_some_and(|t| t.is(b'[')) {
        number(toks.get(1), line)?;
        if !toks.get(2).is_some_and(|t| t.is(b']')) {
            return Err(expected("']'", toks.get(2), line));
        }
        i = 3;
    }
    while let Some(t) = toks.get(i) {
        match t.word() {
            Some(".attribute") => {
                let close = toks[i..]
                    .iter()
                    .position(|t| t.is(b')'))
                    .ok_or(PtxError::Unbalanced { line, ch: '(' })?;
                i += close + 1;
            }
            Some(w) if w.starts_with('.') => {
                let used = spec.take(toks, i, line)?;
                i += used.max(1); // other qualifiers (.visible, .weak) carry no size
            }
            _ => break,
        }
    }
    let (elem, _) = spec.finish(toks.get(i), line)?;
    let mut vars = Vec::new();
    for decl in split_declarators(&toks[i..]) {
        let name = identifier(decl.first(), line)?;
        let (count, used) = dims(&decl[1..], line, name, true)?;
        let rest = &decl[1 + used..];
        let init = match rest.split_first() {
            None => None,
            Some((eq, init)) if eq.is(b'=') => Some(init),
            Some((other, _)) => return Err(expected("'=' or ';'", Some(other), line)),
        };
        let count = match count {
            Some(c) => c,
            None => init.map_or(0, count_leaves),
        };
        let size = elem
            .checked_mul(count)
            .ok_or_else(|| PtxError::InvalidSize {
                name: name.to_string(),
            })?;
        vars.push((name.to_string(), size));
    }
    Ok(vars)
}

/// Splits `a[2] = {1, 2}, b` at commas outside braces and parentheses.
fn split_declarators<'t, 'a>(toks: &'t [Tok<'a>]) -> Vec<&'t [Tok<'a>]> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i64, 0);
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            Kind::Punct(b'{' | b'(') => depth += 1,
            Kind::Punct(b'}' | b')') => depth -= 1,
            Kind::Punct(b',') if depth == 0 => {
                out.push(&toks[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&toks[start..]);
    out
}

/// Number of scalar values in an initializer (`{{1, 2}, {3, 4}}` → 4).
fn count_leaves(init: &[Tok<'_>]) -> u64 {
    let (mut count, mut pending, mut parens) = (0u64, false, 0i64);
    for t in init {
        match t.kind {
            Kind::Punct(b'(') => parens += 1,
            Kind::Punct(b')') => parens -= 1,
            Kind::Punct(b'{') if parens == 0 => pending = false,
            Kind::Punct(b',' | b'}') if parens == 0 => {
                count += u64::from(pending);
                pending = false;
            }
            _ => pending = true,
        }
    }
    count + u64::from(pending)
}

#[cfg(test)]
#[path = "ptx_tests.rs"]
mod tests;
