//! Printing rows for people (aligned tables) and for programs (CSV, JSON).

use chrono::{DateTime, Utc};

/// An aligned text table. Cells longer than `max_width` characters are cut with an ellipsis.
pub fn table(headers: &[&str], rows: &[Vec<String>], max_width: usize) -> String {
    let cut = |cell: &str| -> String {
        let flat = cell.replace(['\n', '\r'], " ");
        if flat.chars().count() > max_width {
            let kept: String = flat.chars().take(max_width.saturating_sub(1)).collect();
            format!("{kept}…")
        } else {
            flat
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cut(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| {
                format!(
                    "{cell}{}",
                    " ".repeat(width.saturating_sub(cell.chars().count()))
                )
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// CSV with a header row, quoted where needed, every cell made safe for a spreadsheet.
pub fn csv(headers: &[&str], rows: &[Vec<String>]) -> Result<String, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    write_csv_row(&mut writer, headers)?;
    for row in rows {
        write_csv_row(&mut writer, row)?;
    }
    let bytes = writer.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Writes one CSV row through [`spreadsheet_safe`]: every CSV touchpoint writes goes through
/// here.
pub fn write_csv_row<W: std::io::Write>(
    writer: &mut csv::Writer<W>,
    cells: &[impl AsRef<str>],
) -> Result<(), csv::Error> {
    writer.write_record(
        cells
            .iter()
            .map(|cell| spreadsheet_safe(cell.as_ref()).into_owned()),
    )
}

/// A cell a spreadsheet will not run as a formula. A cell that begins with `=`, `+`, `-`, `@`,
/// a tab or a carriage return gets a leading `'` (OWASP's advice against CSV injection): a
/// customer's name or a subject such as `=HYPERLINK(...)` is shown as text, not evaluated.
pub fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

/// A time for a table: `2026-11-23 09:00:00Z`; empty for none.
pub fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_cut_long_cells() {
        let rows = vec![
            vec!["1".into(), "a very long subject line".into()],
            vec!["22".into(), "short".into()],
        ];
        let text = table(&["id", "subject"], &rows, 10);
        assert_eq!(text, "id  subject\n1   a very lo…\n22  short\n");
    }

    #[test]
    fn cells_a_spreadsheet_would_run_as_formulas_are_neutralised() {
        for cell in ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(spreadsheet_safe(cell), format!("'{cell}"));
        }
        for cell in ["", "Ada", "1", "a=b", " =1", "2026-11-23 09:00:00Z"] {
            assert_eq!(spreadsheet_safe(cell), cell);
        }
        let text = csv(&["name"], &[vec!["=HYPERLINK(\"http://x\")".into()]]).unwrap();
        assert_eq!(text, "name\n\"'=HYPERLINK(\"\"http://x\"\")\"\n");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let text = csv(&["a", "b"], &[vec!["x,y".into(), "say \"hi\"".into()]]).unwrap();
        assert_eq!(text, "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n");
    }
}
