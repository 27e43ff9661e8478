//! Plain-text formatting: aligned columns for lists, `key: value` blocks for
//! single resources, and short timestamps. Hand-written because the needs are
//! small and the output must stay stable for people who `grep`/`awk` it.

use chrono::{DateTime, Utc};

/// Columns are separated by this many spaces, like `docker ps`/`kubectl get`.
const GAP: usize = 3;

/// Rendered for missing values so columns never collapse.
pub(crate) const NONE: &str = "-";

/// An aligned table with a header row.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Left-aligned columns; the last column is not padded so lines carry no
    /// trailing spaces.
    pub(crate) fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().take(columns).enumerate() {
                widths[i] = widths[i].max(width(cell));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                line.push_str(cell);
                if i + 1 < columns {
                    line.push_str(&" ".repeat(w - width(cell) + GAP));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A `key: value` block with aligned values; multi-line values are indented
/// under their first line.
pub(crate) fn details(pairs: &[(&str, String)]) -> String {
    let key_width = pairs.iter().map(|(k, _)| width(k) + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let label = format!("{key}:");
        let mut lines = value.lines();
        let first = lines.next().unwrap_or("");
        let line = format!("{label:<key_width$}  {first}");
        out.push_str(line.trim_end());
        out.push('\n');
        for rest in lines {
            out.push_str(&" ".repeat(key_width + 2));
            out.push_str(rest);
            out.push('\n');
        }
    }
    out
}

fn width(text: &str) -> usize {
    text.chars().count()
}

fn parse(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `2026-03-21 10:11:12` (UTC, no fractions); unparseable input is shown as is.
pub(crate) fn timestamp(raw: Option<&str>) -> String {
    match raw {
        None | Some("") => NONE.to_owned(),
        Some(raw) => parse(raw)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| raw.to_owned()),
    }
}

/// How long ago `raw` was, relative to `now` (`12s ago`, `4m ago`): what
/// matters for heartbeats is freshness, not the wall-clock time.
pub(crate) fn age(raw: Option<&str>, now: DateTime<Utc>) -> String {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return NONE.to_owned();
    };
    let Some(then) = parse(raw) else {
        return raw.to_owned();
    };
    let secs = (now - then).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// The last 12 characters of an id, for columns where the id is only a hint
/// and the full value is available via `--json` or `show`. The hub's ids are
/// UUIDv7, whose leading digits are a timestamp shared by everything created
/// around the same time; the trailing ones are random and tell ids apart.
pub(crate) fn short_id(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    chars[chars.len().saturating_sub(12)..].iter().collect()
}

/// `None`/empty as `-`, so every cell has something in it.
pub(crate) fn or_none(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => NONE.to_owned(),
    }
}

/// Cuts long free text (error messages) to fit a table cell on one line.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if width(&one_line) <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// A command line as a user could paste it into a POSIX shell.
pub(crate) fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let mut table = Table::new(&["ID", "NAME", "STATUS"]);
        table.row(vec!["1".into(), "edge-long".into(), "online".into()]);
        table.row(vec!["22".into(), "e".into(), "-".into()]);
        assert_eq!(
            table.render(),
            "ID   NAME        STATUS\n\
             1    edge-long   online\n\
             22   e           -\n"
        );
    }

    #[test]
    fn table_pads_by_characters_not_bytes() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec!["héé".into(), "x".into()]);
        assert_eq!(table.render(), "A     B\nhéé   x\n");
    }

    #[test]
    fn details_align_and_indent_continuations() {
        let text = details(&[
            ("id", "abc".into()),
            ("env", "A=1\nB=2".into()),
            ("error", String::new()),
        ]);
        assert_eq!(text, "id:     abc\nenv:    A=1\n        B=2\nerror:\n");
    }

    #[test]
    fn timestamps_are_shortened_to_utc_seconds() {
        assert_eq!(
            timestamp(Some("2026-03-21T10:11:12.123456Z")),
            "2026-03-21 10:11:12"
        );
        assert_eq!(
            timestamp(Some("2026-03-21T12:11:12+02:00")),
            "2026-03-21 10:11:12"
        );
        assert_eq!(timestamp(None), "-");
        assert_eq!(timestamp(Some("yesterday")), "yesterday");
    }

    #[test]
    fn ages_are_coarse() {
        let now = parse("2026-03-21T10:00:00Z").expect("valid");
        assert_eq!(age(Some("2026-03-21T09:59:48Z"), now), "12s ago");
        assert_eq!(age(Some("2026-03-21T09:55:00Z"), now), "5m ago");
        assert_eq!(age(Some("2026-03-21T07:00:00Z"), now), "3h ago");
        assert_eq!(age(Some("2026-03-19T10:00:00Z"), now), "2d ago");
        // Clock skew between hub and client must not print negative ages.
        assert_eq!(age(Some("2026-03-21T10:00:05Z"), now), "0s ago");
        assert_eq!(age(None, now), "-");
    }

    #[test]
    fn truncate_keeps_one_line() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("a\nb", 10), "a b");
        assert_eq!(truncate("0123456789abc", 10), "0123456...");
    }

    #[test]
    fn shell_words_quote_only_when_needed() {
        let words = ["sh", "-c", "echo 'hi' > out", ""].map(String::from);
        assert_eq!(shell_words(&words), r"sh -c 'echo '\''hi'\'' > out' ''");
    }

    #[test]
    fn short_ids_and_placeholders() {
        assert_eq!(
            short_id("01a217dc-0ad2-7730-acfb-8f692ad4c82f"),
            "8f692ad4c82f"
        );
        assert_eq!(short_id("r1"), "r1");
        assert_eq!(or_none(Some("")), "-");
        assert_eq!(or_none(None), "-");
        assert_eq!(or_none(Some("x")), "x");
    }
}
