//! The running rules and templates, loaded and checked together so they always agree. The
//! daemon holds one `Arc<Playbook>` and swaps it whole on reload; a playbook with a mistake is
//! never swapped in.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::diag::Diagnostic;
use crate::diag::Diagnostics;
use crate::render::{Business, Templates};
use crate::rules::{self, Recipient, Rule, RuleSet};
use crate::sources::SourceConfig;

#[derive(Debug)]
pub struct Playbook {
    pub rules: RuleSet,
    pub templates: Templates,
    /// What templates say about the business (from the config, reloaded with the rules).
    pub business: Business,
    /// The business's own databases and their queries, reloaded with the rules.
    pub sources: std::sync::Arc<crate::sources::Sources>,
    /// The owner's digest, when `[digest]` is written and enabled (reloaded with the rules).
    pub digest: Option<crate::digest::Digest>,
    by_name: HashMap<String, usize>,
}

/// What a playbook is loaded from: the parts of the config it needs (the config module turns a
/// whole `&Config` into one).
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub rules_dir: &'a Path,
    pub templates_dir: &'a Path,
    pub business: &'a Business,
    pub sources: &'a BTreeMap<String, SourceConfig>,
    /// What relative source paths are relative to: the config file's directory.
    pub base_dir: &'a Path,
    /// The config file, named in messages about sources.
    pub config_path: &'a Path,
    /// What `[defaults]` says about every rule (frequency limit, quiet dates).
    pub defaults: rules::RuleDefaults,
    /// `[digest]`, if written.
    pub digest: Option<&'a crate::digest::DigestConfig>,
    /// `defaults.timezone`: the digest's schedule is read in it.
    pub default_timezone: chrono_tz::Tz,
}

impl Playbook {
    /// Loads templates, then rules (which must name existing templates), then renders every
    /// rule with sample data. Every mistake of every file is reported together.
    pub fn load<'a>(origin: impl Into<Origin<'a>>) -> Result<Playbook, Diagnostics> {
        let config = origin.into();
        let templates = Templates::load(config.templates_dir)?;
        let mut rules = rules::load_dir(config.rules_dir, &|name| templates.exists(name))?;
        rules.apply_defaults(&config.defaults);
        owner_email_for(&rules, config.business, config.config_path)?;
        let templates = templates.with_subjects(&rules)?;
        let problems = templates.check(&rules, config.business);
        if !problems.is_empty() {
            return Err(Diagnostics(problems));
        }
        let sources = crate::sources::Sources::from_config(config.sources, config.base_dir)
            .map_err(|message| {
                Diagnostics(vec![crate::diag::Diagnostic::whole_file(
                    config.config_path,
                    message,
                )])
            })?;
        let digest = crate::digest::Digest::load(
            config.digest,
            config.business,
            config.templates_dir,
            config.default_timezone,
            config.config_path,
        )?;
        let by_name = rules
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        Ok(Playbook {
            rules,
            templates,
            business: config.business.clone(),
            sources: std::sync::Arc::new(sources),
            digest,
            by_name,
        })
    }

    /// Where a rule's messages go: the customer's address, or `business.owner_email` for a
    /// rule written `to = "owner"` (which loading made sure is set).
    pub fn recipient<'a>(&'a self, rule: &Rule, customer_email: &'a str) -> &'a str {
        match (rule.to, &self.business.owner_email) {
            (Recipient::Owner, Some(owner)) => owner,
            _ => customer_email,
        }
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.by_name.get(name).map(|&i| &self.rules.rules[i])
    }
}

/// Rules written `to = "owner"` need `business.owner_email`, a valid address.
fn owner_email_for(
    rules: &RuleSet,
    business: &Business,
    config_path: &Path,
) -> Result<(), Diagnostics> {
    if let Some(owner) = &business.owner_email
        && owner.trim().parse::<lettre::Address>().is_err()
    {
        let message = format!(
            "[business] owner_email {owner:?} is not an email address: write it like owner_email = \"owner@acme.example\""
        );
        return Err(Diagnostics(vec![Diagnostic::whole_file(
            config_path,
            message,
        )]));
    }
    let missing: Vec<Diagnostic> = rules
        .rules
        .iter()
        .filter(|r| r.to == Recipient::Owner && business.owner_email.is_none())
        .map(|r| Diagnostic {
            file: r.origin.file.clone(),
            line: r.origin.line,
            column: r.origin.column,
            message: format!(
                "the rule {:?} writes to the owner (to = \"owner\") but [business] in {} has no owner_email: add owner_email = \"owner@acme.example\"",
                r.name,
                config_path.display()
            ),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics(missing))
    }
}
