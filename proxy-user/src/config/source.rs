//! Reading a parsed TOML tree with positions: typed getters that accept the spellings real
//! fly.toml files use (ports as strings, durations as milliseconds or "1m30s", one table where
//! an array of tables is meant), and that record a positioned diagnostic instead of failing,
//! so one run of `spliced check` reports every problem in a file.

use std::{fmt, ops::Range, time::Duration};

use serde::Serialize;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::words::{did_you_mean, parse_duration};

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// A message about one place in a file: `file:line:column: field: message`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Field path such as `services[1].ports[0].port`; empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// One file being read: its text for positions, and what was found wrong so far.
pub(crate) struct Reader<'a> {
    file: &'a str,
    text: &'a str,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

/// A table of the file and the field path that leads to it.
#[derive(Clone, Copy)]
pub(crate) struct Table<'t, 'i> {
    pub path: &'t str,
    pub entries: &'t DeTable<'i>,
    pub span: (usize, usize),
}

impl<'t, 'i> Table<'t, 'i> {
    pub fn new(path: &'t str, table: &'t DeTable<'i>, span: Range<usize>) -> Self {
        Self {
            path,
            entries: table,
            span: (span.start, span.end),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'t Value<'i>> {
        self.entries.get(key)
    }

    /// The path of `key` in this table.
    pub fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = (&'t str, Range<usize>)> {
        self.entries
            .iter()
            .map(|(k, _)| (k.get_ref().as_ref(), k.span()))
    }
}

impl<'a> Reader<'a> {
    pub fn new(file: &'a str, text: &'a str) -> Self {
        Self {
            file,
            text,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Line and column, both from 1, of a byte offset; the column counts characters.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    pub fn diagnostic(&self, at: usize, field: &str, message: String) -> Diagnostic {
        let (line, column) = self.position(at);
        Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message,
        }
    }

    pub fn error(&mut self, at: usize, field: &str, message: impl Into<String>) {
        let d = self.diagnostic(at, field, message.into());
        self.errors.push(d);
    }

    pub fn warn(&mut self, at: usize, field: &str, message: impl Into<String>) {
        let d = self.diagnostic(at, field, message.into());
        self.warnings.push(d);
    }

    /// Warns about every key of `table` outside `known`, suggesting the closest known one.
    pub fn unknown_keys(&mut self, table: Table<'_, '_>, known: &[&str]) {
        for (key, span) in table.keys() {
            if known.contains(&key) {
                continue;
            }
            let message = match did_you_mean(key, known) {
                Some(s) => format!("unknown key, ignored; did you mean `{s}`?"),
                None => "unknown key, ignored".to_owned(),
            };
            self.warn(span.start, &table.field(key), message);
        }
    }

    fn wrong_type(&mut self, v: &Value<'_>, field: &str, expected: &str) {
        let found = v.get_ref().type_str();
        self.error(
            v.span().start,
            field,
            format!("expected {expected}, found {found}"),
        );
    }

    pub fn string(&mut self, v: &Value<'_>, field: &str) -> Option<String> {
        if let DeValue::String(s) = v.get_ref() {
            Some(s.to_string())
        } else {
            self.wrong_type(v, field, "a string");
            None
        }
    }

    pub fn bool(&mut self, v: &Value<'_>, field: &str) -> Option<bool> {
        if let DeValue::Boolean(b) = v.get_ref() {
            Some(*b)
        } else {
            self.wrong_type(v, field, "true or false");
            None
        }
    }

    /// An integer, written as a number or as a string of digits.
    pub fn integer(&mut self, v: &Value<'_>, field: &str) -> Option<i64> {
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            DeValue::String(s) => s.trim().parse::<i64>().ok(),
            _ => {
                self.wrong_type(v, field, "an integer");
                return None;
            }
        };
        if parsed.is_none() {
            self.error(
                v.span().start,
                field,
                format!("{} is not an integer", show(v)),
            );
        }
        parsed
    }

    /// A TCP or UDP port, 1-65535, written as a number or a string.
    pub fn port(&mut self, v: &Value<'_>, field: &str) -> Option<u16> {
        let n = self.integer(v, field)?;
        match u16::try_from(n) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                self.error(
                    v.span().start,
                    field,
                    format!("{} is not a port (1-65535)", show(v)),
                );
                None
            }
        }
    }

    /// A count of at least `min`.
    pub fn count(&mut self, v: &Value<'_>, field: &str, min: u32) -> Option<u32> {
        let n = self.integer(v, field)?;
        match u32::try_from(n) {
            Ok(c) if c >= min => Some(c),
            _ => {
                self.error(
                    v.span().start,
                    field,
                    format!("{n} is out of range (at least {min})"),
                );
                None
            }
        }
    }

    /// A positive duration: an integer of milliseconds, or a string such as "1m30s" or
    /// "500ms". An empty string means unset, as fly reads it, and gives `None` as an error
    /// does.
    pub fn duration(&mut self, v: &Value<'_>, field: &str) -> Option<Duration> {
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|ms| u64::try_from(ms).map(Duration::from_millis).map_err(|_| ()))
                .ok_or(()),
            DeValue::String(s) if s.trim().is_empty() => return None,
            DeValue::String(s) => parse_duration(s.trim()).map(Ok).ok_or(()),
            _ => {
                self.wrong_type(v, field, "a duration (\"10s\", or milliseconds)");
                return None;
            }
        };
        match parsed {
            Ok(Ok(d)) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.error(
                    v.span().start,
                    field,
                    format!("{} is not a positive duration", show(v)),
                );
                None
            }
            Err(()) => {
                self.error(
                    v.span().start,
                    field,
                    format!(
                        "{} is not a duration (such as \"10s\", \"1m30s\", \"500ms\", or an integer of milliseconds)",
                        show(v)
                    ),
                );
                None
            }
        }
    }

    /// A list of strings, also accepted as a single string.
    pub fn strings(&mut self, v: &Value<'_>, field: &str) -> Option<Vec<Spanned<String>>> {
        match v.get_ref() {
            DeValue::String(s) => Some(vec![Spanned::new(v.span(), s.to_string())]),
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{field}[{i}]");
                    out.push(Spanned::new(item.span(), self.string(item, &at)?));
                }
                Some(out)
            }
            _ => {
                self.wrong_type(v, field, "a list of strings");
                None
            }
        }
    }

    /// A table, or the tables of an array: fly accepts `[x]` where `[[x]]` is meant and the
    /// other way round. Each comes with its path: `x[i]`.
    pub fn tables<'t, 'i>(
        &mut self,
        v: &'t Value<'i>,
        field: &str,
    ) -> Vec<(String, &'t DeTable<'i>, Range<usize>)> {
        match v.get_ref() {
            DeValue::Table(t) => vec![(format!("{field}[0]"), t, v.span())],
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{field}[{i}]");
                    if let DeValue::Table(t) = item.get_ref() {
                        out.push((at, t, item.span()));
                    } else {
                        self.wrong_type(item, &at, "a table");
                    }
                }
                out
            }
            _ => {
                self.wrong_type(v, field, "a table or an array of tables");
                Vec::new()
            }
        }
    }

    /// A single table.
    pub fn table<'t, 'i>(&mut self, v: &'t Value<'i>, field: &str) -> Option<&'t DeTable<'i>> {
        if let DeValue::Table(t) = v.get_ref() {
            Some(t)
        } else {
            self.wrong_type(v, field, "a table");
            None
        }
    }
}

/// How a value is shown in a message: strings quoted, numbers as written.
pub(crate) fn show(v: &Value<'_>) -> String {
    match v.get_ref() {
        DeValue::String(s) => format!("{s:?}"),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(_) => "an array".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

/// A scalar as text, as fly turns `[env]` and header values into strings.
pub(crate) fn scalar_text(v: &Value<'_>) -> Option<String> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => Some(i.to_string()),
        DeValue::Float(f) => Some(f.to_string()),
        DeValue::Boolean(b) => Some(b.to_string()),
        DeValue::Datetime(d) => Some(d.to_string()),
        DeValue::Array(_) | DeValue::Table(_) => None,
    }
}
