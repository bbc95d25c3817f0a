//! `touchpoint init DIR`: a working setup to start from, the same layout as the repository
//! (`config/touchpoint.toml`, `config/rules/`, `templates/`, `var/`), so the example config's
//! relative paths (`../var/touchpoint.db`, `../templates`, `../var/outbox`) hold. The files are
//! the repository's own, built into the binary, so an installed `touchpoint` needs no checkout.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Every file `init` writes: its path under DIR, and its text.
pub const FILES: &[(&str, &str)] = &[
    (
        "config/touchpoint.toml",
        include_str!("../../config/touchpoint.toml"),
    ),
    (
        "config/rules/thank-you.toml",
        include_str!("../../config/rules/thank-you.toml"),
    ),
    (
        "config/rules/follow-up.toml",
        include_str!("../../config/rules/follow-up.toml"),
    ),
    (
        "config/rules/anniversary.toml",
        include_str!("../../config/rules/anniversary.toml"),
    ),
    (
        "templates/thank-you.html.hbs",
        include_str!("../../templates/thank-you.html.hbs"),
    ),
    (
        "templates/thank-you.txt.hbs",
        include_str!("../../templates/thank-you.txt.hbs"),
    ),
    (
        "templates/follow-up.html.hbs",
        include_str!("../../templates/follow-up.html.hbs"),
    ),
    (
        "templates/follow-up.txt.hbs",
        include_str!("../../templates/follow-up.txt.hbs"),
    ),
    (
        "templates/anniversary.html.hbs",
        include_str!("../../templates/anniversary.html.hbs"),
    ),
    (
        "templates/anniversary.txt.hbs",
        include_str!("../../templates/anniversary.txt.hbs"),
    ),
    (
        "templates/partials/layout.hbs",
        include_str!("../../templates/partials/layout.hbs"),
    ),
    (
        "templates/partials/text-footer.hbs",
        include_str!("../../templates/partials/text-footer.hbs"),
    ),
];

/// Where the database and the file transport's outbox go.
const VAR_DIR: &str = "var";

/// `touchpoint init DIR`: writes [`FILES`] and `var/` into `dir` (created if missing). Refuses,
/// writing nothing, when any of the files exists already.
pub fn init(dir: &Path) -> Result<String> {
    let existing: Vec<&str> = FILES
        .iter()
        .map(|(path, _)| *path)
        .filter(|path| dir.join(path).symlink_metadata().is_ok())
        .collect();
    if !existing.is_empty() {
        bail!(
            "{} already holds {}; `touchpoint init` never overwrites a file: choose a new or \
             empty directory, or move these files away",
            dir.display(),
            existing.join(", ")
        );
    }
    for (path, text) in FILES {
        write_new(&dir.join(path), text)?;
    }
    let var = dir.join(VAR_DIR);
    std::fs::create_dir_all(&var).with_context(|| format!("cannot create {}", var.display()))?;
    Ok(next_steps(dir))
}

/// Creates `path` (and its directories) with `text`; fails rather than replace a file that
/// appeared since the check.
fn write_new(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the directory {}", parent.display()))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What was written, and the next three commands to try.
fn next_steps(dir: &Path) -> String {
    let shown = dir.display();
    let rules = FILES
        .iter()
        .filter(|(path, _)| path.starts_with("config/rules/"))
        .count();
    format!(
        "wrote a working setup into {shown}:\n\
         \x20 config/touchpoint.toml  the config: SQLite in var/, messages written as .eml files into var/outbox/\n\
         \x20 config/rules/           {rules} example rules (thank-you, follow-up, anniversary)\n\
         \x20 templates/              their email templates\n\
         \x20 var/                    the database and the outbox\n\
         \n\
         Next, in {shown} (cd {shown}), try:\n\
         \x20 touchpoint check   # what it loaded, where mail goes, where the owner's page is\n\
         \x20 touchpoint run     # the daemon (Ctrl-C stops it); the owner's page is at http://127.0.0.1:8025/\n\
         \x20 touchpoint preview --rule thank-you-after-purchase --customer ID --send-to YOU@EXAMPLE.COM   # a [TEST] copy to you, once a customer has a purchase (see the README's quick start)\n"
    )
}
