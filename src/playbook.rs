//! The running rules and templates, loaded and checked together so they always agree. The
//! daemon holds one `Arc<Playbook>` and swaps it whole on reload; a playbook with a mistake is
//! never swapped in.

use std::collections::HashMap;

use crate::config::Config;
use crate::diag::Diagnostics;
use crate::render::{Business, Templates};
use crate::rules::{self, Rule, RuleSet};

#[derive(Debug)]
pub struct Playbook {
    pub rules: RuleSet,
    pub templates: Templates,
    /// What templates say about the business (from the config, reloaded with the rules).
    pub business: Business,
    /// The business's own databases and their queries, reloaded with the rules.
    pub sources: std::sync::Arc<crate::sources::Sources>,
    by_name: HashMap<String, usize>,
}

impl Playbook {
    /// Loads templates, then rules (which must name existing templates), then renders every
    /// rule with sample data. Every mistake of every file is reported together.
    pub fn load(config: &Config) -> Result<Playbook, Diagnostics> {
        let templates = Templates::load(&config.templates.dir)?;
        let rules = rules::load_dir(&config.rules.dir, &|name| templates.exists(name))?;
        let templates = templates.with_subjects(&rules)?;
        let problems = templates.check(&rules, &config.business);
        if !problems.is_empty() {
            return Err(Diagnostics(problems));
        }
        let sources = crate::sources::Sources::from_config(&config.sources, &config.base_dir)
            .map_err(|message| {
                Diagnostics(vec![crate::diag::Diagnostic::whole_file(
                    &config.path,
                    message,
                )])
            })?;
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
            by_name,
        })
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.by_name.get(name).map(|&i| &self.rules.rules[i])
    }
}
