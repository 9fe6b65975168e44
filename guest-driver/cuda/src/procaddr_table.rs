//! The `cuGetProcAddress` table of the real driver: for a (name, CUDA
//! version, flags) request, the versioned symbol NVIDIA's driver answers
//! with, or the symbol status it reports instead. The data was probed from
//! driver 580.159.04 by `scripts/procaddr/generate.sh` and is committed in
//! `data/`; it is parsed once, on first use.
//!
//! Each data row reads `name flags first_version last_version symbol
//! symbol_status rc`: over the versions `first..=last` (in steps of 10) a
//! request for `name` with `flags` resolves to `symbol` (`-`: nothing;
//! aliases of one entry point separated by commas) with that status. The
//! flags are `CU_GET_PROC_ADDRESS_DEFAULT` (0), `..._LEGACY_STREAM` (1) and
//! `..._PER_THREAD_DEFAULT_STREAM` (2), which selects the `_ptsz` / `_ptds`
//! variants.

use std::collections::HashMap;
use std::sync::OnceLock;

use thiserror::Error;

/// The probed table, as committed.
const DATA: &str = include_str!("../data/procaddr-580.159.04.tsv");

/// `CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND`.
pub(crate) const STATUS_SYMBOL_NOT_FOUND: i32 = crate::types::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
/// `CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT`.
pub(crate) const STATUS_VERSION_NOT_SUFFICIENT: i32 = 2;

/// A malformed line of the table data.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("Proc-address table line {line} is malformed: {why}")]
pub(crate) struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub why: &'static str,
}

/// One run of versions that resolve alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row<'a> {
    /// The request flags (0, 1 or 2).
    pub flags: u8,
    /// First CUDA version of the run.
    pub first: i32,
    /// Last CUDA version of the run.
    pub last: i32,
    /// The symbol(s) the request resolves to, comma separated; `None` when
    /// nothing is returned.
    pub symbols: Option<&'a str>,
    /// The `CUdriverProcAddressQueryResult` reported.
    pub status: i32,
}

/// The parsed table: every base name's rows, in file order (ascending
/// versions per flag).
#[derive(Debug, Default)]
pub(crate) struct Table<'a> {
    rows: HashMap<&'a str, Vec<Row<'a>>>,
}

/// What the real driver answers for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer<'a> {
    /// The entry point: its exported symbol and aliases, comma separated.
    Symbol(&'a str),
    /// No entry point, with this symbol status.
    Missing(i32),
}

impl Answer<'_> {
    /// The symbol names of a found entry point.
    pub(crate) fn symbols(&self) -> impl Iterator<Item = &str> {
        let list = match self {
            Answer::Symbol(list) => *list,
            Answer::Missing(_) => "",
        };
        list.split(',').filter(|s| !s.is_empty())
    }
}

fn field<'a>(
    fields: &mut impl Iterator<Item = &'a str>,
    line: usize,
    why: &'static str,
) -> Result<&'a str, ParseError> {
    fields.next().ok_or(ParseError { line, why })
}

fn number<T: std::str::FromStr>(
    text: &str,
    line: usize,
    why: &'static str,
) -> Result<T, ParseError> {
    text.parse().map_err(|_| ParseError { line, why })
}

impl<'a> Table<'a> {
    /// Parses table data; `#` lines and blank lines are skipped.
    pub(crate) fn parse(data: &'a str) -> Result<Table<'a>, ParseError> {
        let mut rows: HashMap<&'a str, Vec<Row<'a>>> = HashMap::new();
        for (index, text) in data.lines().enumerate() {
            let line = index + 1;
            let text = text.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let mut fields = text.split_ascii_whitespace();
            let name = field(&mut fields, line, "no name")?;
            let flags: u8 = number(field(&mut fields, line, "no flags")?, line, "bad flags")?;
            let first = number(
                field(&mut fields, line, "no first version")?,
                line,
                "bad version",
            )?;
            let last = number(
                field(&mut fields, line, "no last version")?,
                line,
                "bad version",
            )?;
            let symbol = field(&mut fields, line, "no symbol")?;
            let status = number(field(&mut fields, line, "no status")?, line, "bad status")?;
            let _rc: u32 = number(field(&mut fields, line, "no rc")?, line, "bad rc")?;
            if fields.next().is_some() {
                return Err(ParseError {
                    line,
                    why: "too many fields",
                });
            }
            if flags > 2 {
                return Err(ParseError {
                    line,
                    why: "flags above 2",
                });
            }
            if first > last {
                return Err(ParseError {
                    line,
                    why: "versions out of order",
                });
            }
            let symbols = (symbol != "-").then_some(symbol);
            if symbols.is_none() && status == 0 {
                return Err(ParseError {
                    line,
                    why: "no symbol but success",
                });
            }
            rows.entry(name).or_default().push(Row {
                flags,
                first,
                last,
                symbols,
                status,
            });
        }
        Ok(Table { rows })
    }

    /// The number of distinct names.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every symbol any request can resolve to.
    #[cfg(test)]
    pub(crate) fn all_symbols(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.rows
            .values()
            .flatten()
            .filter_map(|row| row.symbols)
            .flat_map(|list| list.split(','))
    }

    /// What the real driver answers for `name` at `version` with `flags`
    /// (0, 1 or 2). A version between two probed ones falls in the run
    /// below it; one past the newest probed version resolves as the newest.
    pub(crate) fn lookup(&self, name: &str, version: i32, flags: u64) -> Answer<'a> {
        let Some(rows) = self.rows.get(name) else {
            return Answer::Missing(STATUS_SYMBOL_NOT_FOUND);
        };
        let row = rows
            .iter()
            .filter(|row| u64::from(row.flags) == flags && row.first <= version)
            .max_by_key(|row| row.first);
        match row {
            Some(Row {
                symbols: Some(list),
                ..
            }) => Answer::Symbol(list),
            Some(row) => Answer::Missing(row.status),
            None if rows.iter().any(|row| u64::from(row.flags) == flags) => {
                Answer::Missing(STATUS_VERSION_NOT_SUFFICIENT)
            }
            None => Answer::Missing(STATUS_SYMBOL_NOT_FOUND),
        }
    }
}

/// The table of driver 580.159.04, parsed on first use. A parse failure
/// (impossible for the committed data, which a test parses) leaves it empty.
pub(crate) fn table() -> &'static Table<'static> {
    static TABLE: OnceLock<Table<'static>> = OnceLock::new();
    TABLE.get_or_init(|| {
        Table::parse(DATA).unwrap_or_else(|err| {
            crate::logging::report_once(&format!("Internal error: {err}"));
            Table::default()
        })
    })
}

/// Answers a request: the address `export` gives for the first symbol of
/// the driver's answer this library exports, or the symbol status. A
/// symbol the driver has but this library lacks is reported as not found
/// (the driver's answer for a name it does not know), logged once.
pub(crate) fn resolve(
    name: &str,
    version: i32,
    flags: u64,
    export: impl Fn(&str) -> Option<*mut std::ffi::c_void>,
) -> Result<*mut std::ffi::c_void, i32> {
    let answer = match table().lookup(name, version, flags) {
        Answer::Missing(status) => return Err(status),
        answer => answer,
    };
    if let Some(found) = answer.symbols().find_map(export) {
        return Ok(found);
    }
    if let Answer::Symbol(list) = answer {
        crate::logging::warn_once(&format!(
            "cuGetProcAddress({name}, {version}, {flags}): {list} is not implemented"
        ));
    }
    Err(STATUS_SYMBOL_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_table_parses_completely() {
        let table = Table::parse(DATA).unwrap();
        assert!(table.len() > 500, "only {} names", table.len());
        assert!(table.all_symbols().count() > 1000);
        assert!(table.all_symbols().any(|s| s == "cuLaunchKernel_ptsz"));
    }

    #[test]
    fn cu_mem_alloc_at_3020_is_the_v2_symbol() {
        let t = table();
        assert_eq!(
            t.lookup("cuMemAlloc", 3020, 0),
            Answer::Symbol("cuMemAlloc_v2")
        );
        assert_eq!(
            t.lookup("cuMemAlloc", 13000, 0),
            Answer::Symbol("cuMemAlloc_v2")
        );
        assert_eq!(
            t.lookup("cuMemAlloc", 2000, 0),
            Answer::Symbol("cuMemAlloc")
        );
        assert_eq!(
            t.lookup("cuCtxCreate", 12050, 0),
            Answer::Symbol("cuCtxCreate_v4")
        );
        assert_eq!(
            t.lookup("cuCtxCreate", 11040, 0),
            Answer::Symbol("cuCtxCreate_v3")
        );
    }

    #[test]
    fn per_thread_flag_selects_ptsz_and_ptds_variants() {
        let t = table();
        assert_eq!(
            t.lookup("cuLaunchKernel", 7000, 2),
            Answer::Symbol("cuLaunchKernel_ptsz")
        );
        assert_eq!(
            t.lookup("cuLaunchKernel", 7000, 0),
            Answer::Symbol("cuLaunchKernel")
        );
        assert_eq!(
            t.lookup("cuLaunchKernel", 7000, 1),
            Answer::Symbol("cuLaunchKernel")
        );
        assert_eq!(
            t.lookup("cuMemcpyHtoD", 7000, 2),
            Answer::Symbol("cuMemcpyHtoD_v2_ptds")
        );
    }

    #[test]
    fn too_old_version_is_not_sufficient_and_unknown_name_is_not_found() {
        let t = table();
        assert_eq!(
            t.lookup("cuMemAlloc", 1000, 0),
            Answer::Missing(STATUS_VERSION_NOT_SUFFICIENT)
        );
        assert_eq!(
            t.lookup("cuMemAlloc", 10, 0),
            Answer::Missing(STATUS_VERSION_NOT_SUFFICIENT)
        );
        assert_eq!(
            t.lookup("cuNoSuchThing", 12000, 0),
            Answer::Missing(STATUS_SYMBOL_NOT_FOUND)
        );
        assert_eq!(
            t.lookup("cuMemAlloc", 12000, 3),
            Answer::Missing(STATUS_SYMBOL_NOT_FOUND)
        );
    }

    #[test]
    fn versions_between_and_past_probed_ones_resolve_like_the_run_below() {
        let t = table();
        assert_eq!(
            t.lookup("cuMemAlloc", 3025, 0),
            Answer::Symbol("cuMemAlloc_v2")
        );
        assert_eq!(
            t.lookup("cuMemAlloc", 13100, 0),
            Answer::Symbol("cuMemAlloc_v2")
        );
    }

    #[test]
    fn aliases_are_listed_separately() {
        let answer = Answer::Symbol("cuA,cuB");
        assert_eq!(answer.symbols().collect::<Vec<_>>(), ["cuA", "cuB"]);
        assert_eq!(Answer::Missing(1).symbols().count(), 0);
    }

    #[test]
    fn malformed_lines_are_rejected_with_their_number() {
        let bad = "# header\ncuA 0 1000 2000 cuA 0 0\ncuB 0 1000\n";
        assert_eq!(
            Table::parse(bad).unwrap_err(),
            ParseError {
                line: 3,
                why: "no last version"
            }
        );
        let err = Table::parse("cuA 7 1000 2000 cuA 0 0").unwrap_err();
        assert_eq!(err.why, "flags above 2");
        let err = Table::parse("cuA 0 3000 2000 cuA 0 0").unwrap_err();
        assert_eq!(err.why, "versions out of order");
        let err = Table::parse("cuA 0 1000 2000 - 0 0").unwrap_err();
        assert_eq!(err.why, "no symbol but success");
        let err = Table::parse("cuA 0 1000 2000 cuA 0 0 extra").unwrap_err();
        assert_eq!(err.why, "too many fields");
    }
}
