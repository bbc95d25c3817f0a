//! A rules file as an operator (or a careless editor) writes it: any UTF-8 text. Besides not
//! panicking, every mistake must point inside the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use touchpoint::rules::parse_file;

fuzz_target!(|source: &str| {
    let path = Path::new("rules/fuzz.toml");
    let (rules, diagnostics) = parse_file(path, source, &|name| name != "missing");
    let lines: Vec<&str> = source.split('\n').collect();
    for d in &diagnostics {
        if d.line == 0 {
            assert_eq!(d.column, 0, "{d}");
            continue;
        }
        let line = lines.get(d.line - 1).unwrap_or_else(|| panic!("line out of the file: {d}"));
        assert!(
            (1..=line.chars().count() + 1).contains(&d.column),
            "column out of its line: {d}"
        );
    }
    for rule in &rules {
        assert!(rule.origin.line >= 1 && rule.origin.line <= lines.len());
    }
});
