//! What a rule with `rating` gives its templates: `rating` in the context (`scale`,
//! `question`, `scores` with one signed `url` each), the `{{rating_url N}}` helper and the
//! built-in `{{> rating}}` partial, one row of scores in HTML and one line per score in text.

use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderErrorReason,
};
use serde_json::{Value, json};

use crate::rules::{AttributeCondition, AttributeTest, RatingRequest};

/// The built-in partial's name; a `partials/rating.hbs` of the operator's replaces it.
pub const PARTIAL: &str = "rating";

/// `{{> rating}}` in the HTML part: the question and a row of score buttons (nothing for a
/// rule without `rating`).
const HTML_PARTIAL: &str = r#"{{#if rating}}<table role="presentation" cellpadding="0" cellspacing="0" style="margin:1em 0;border-collapse:separate;border-spacing:4px">
<tr><td colspan="{{rating.count}}" style="padding-bottom:6px">{{rating.question}}</td></tr>
<tr>{{#each rating.scores}}<td><a href="{{url}}" style="display:inline-block;min-width:2em;padding:.4em .5em;border:1px solid #888;border-radius:4px;text-align:center;text-decoration:none;color:#222">{{score}}</a></td>{{/each}}</tr>
<tr><td colspan="{{rating.count}}" style="font-size:small;color:#666">{{rating.lowest}} = {{rating.low_label}}, {{rating.highest}} = {{rating.high_label}}</td></tr>
</table>{{/if}}"#;

/// `{{> rating}}` in the text part: the question, then one link per score.
const TEXT_PARTIAL: &str = "{{#if rating}}{{rating.question}} ({{rating.lowest}} = {{rating.low_label}}, \
{{rating.highest}} = {{rating.high_label}})\n{{#each rating.scores}}{{score}}: {{url}}\n{{/each}}{{/if}}";

/// Registers the helper and the partial in one registry (`html`: the HTML one).
pub fn register(registry: &mut Handlebars<'static>, html: bool) {
    registry.register_helper("rating_url", Box::new(RatingUrl));
    let partial = if html { HTML_PARTIAL } else { TEXT_PARTIAL };
    // A constant that compiles (a unit test renders it): registering cannot fail.
    if let Err(error) = registry.register_partial(PARTIAL, partial) {
        tracing::error!(%error, "the built-in rating partial does not compile");
    }
}

/// The context's `rating`: what the rule asks, and a link per score from `url`.
pub fn context(request: &RatingRequest, url: &dyn Fn(u8) -> String) -> Value {
    let scale = request.scale;
    let scores: Vec<Value> = scale
        .scores()
        .map(|score| json!({ "score": score, "url": url(score) }))
        .collect();
    let (low_label, high_label) = match scale {
        crate::rules::RatingScale::Csat => ("very unhappy", "very happy"),
        crate::rules::RatingScale::Nps => ("not likely to recommend us", "very likely"),
    };
    json!({
        "scale": scale.as_str(),
        "question": request.question(),
        "lowest": scale.lowest(),
        "highest": scale.highest(),
        "low_label": low_label,
        "high_label": high_label,
        "count": scores.len(),
        "scores": scores,
    })
}

/// The data of a sample triggering event: what is sure to be there. A `rated` event always
/// has `score`, `scale`, `rule` and `message_id` (a `comment` may be absent), and a field an
/// `only_if` condition tests must be there for the message to go; anything else may be absent.
pub fn with_event_fields(mut data: Value, only_if: &[AttributeCondition]) -> Value {
    for condition in only_if.iter().filter(|c| c.event_field) {
        if let Some(value) = sample_value(&condition.test) {
            data[condition.attribute.as_str()] = value;
        }
    }
    data
}

/// A value that meets `test`, for samples; `None` for `exists = false` (leave it out).
pub fn sample_value(test: &AttributeTest) -> Option<Value> {
    Some(match test {
        AttributeTest::Equals(value) => value.clone(),
        AttributeTest::In(values) => values.first().cloned().unwrap_or(json!("sample")),
        AttributeTest::AtMost(n) | AttributeTest::AtLeast(n) => json!(n),
        AttributeTest::Exists(true) => json!("sample"),
        AttributeTest::Exists(false) => return None,
    })
}

/// The stand-in link of a preview or a template check: a real message's links are signed.
pub fn sample_url(score: u8) -> String {
    format!("https://example.com/r/sample-{score}")
}

/// `{{rating_url 4}}`: the signed link that rates this message 4.
struct RatingUrl;

impl HelperDef for RatingUrl {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let other = |message: String| -> handlebars::RenderError {
            RenderErrorReason::Other(message).into()
        };
        let score = h
            .param(0)
            .and_then(|p| p.value().as_u64())
            .ok_or_else(|| other("rating_url needs a score, like {{rating_url 5}}".into()))?;
        let rating = &ctx.data()["rating"];
        if rating.is_null() {
            return Err(other(
                "rating_url is only for rules that ask for a rating: add rating = { scale = \
                 \"csat\" } (or \"nps\") to the rule"
                    .into(),
            ));
        }
        let url = rating["scores"]
            .as_array()
            .and_then(|scores| scores.iter().find(|s| s["score"].as_u64() == Some(score)))
            .and_then(|s| s["url"].as_str())
            .ok_or_else(|| {
                other(format!(
                    "rating_url {score} is outside the {} scale ({} to {})",
                    rating["scale"].as_str().unwrap_or_default(),
                    rating["lowest"],
                    rating["highest"]
                ))
            })?;
        out.write(url)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::render::{Business, Templates};
    use crate::rules::{RatingScale, RuleSet, parse_file};

    fn rules(rating: &str) -> RuleSet {
        let source = format!(
            "[[rule]]\nname = \"ask\"\ntemplate = \"t\"\nsubject = \"How did we do?\"\n\
             when = {{ event = \"purchase\", after = \"1d\" }}\n{rating}"
        );
        let (rules, errors) = parse_file(Path::new("r.toml"), &source, &|_| true);
        assert!(errors.is_empty(), "{errors:?}");
        RuleSet { rules }
    }

    fn load(html: &str, text: &str) -> (tempfile::TempDir, Templates) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.html.hbs"), html).unwrap();
        std::fs::write(dir.path().join("t.txt.hbs"), text).unwrap();
        let templates = Templates::load(dir.path()).unwrap();
        (dir, templates)
    }

    fn business() -> Business {
        Business {
            name: "Acme".into(),
            address: "1 Road".into(),
            website: None,
            owner_email: None,
        }
    }

    #[test]
    fn the_partial_renders_one_link_per_score_in_html_and_text() {
        let set = rules("rating = { scale = \"nps\", question = \"Would you <recommend> us?\" }");
        let rule = &set.rules[0];
        let (_dir, templates) = load("<p>{{> rating}}</p>", "{{> rating}}");
        assert!(templates.check(&set, &business()).is_empty());
        let mut context = crate::render::sample_context(rule, &business());
        let request = rule.rating.as_ref().unwrap();
        context["rating"] = context_for(request);
        let rendered = templates.render(rule, &context).unwrap();
        for score in 0..=10 {
            let url = format!("https://x.example/r/{score}");
            assert!(
                rendered.html.contains(&format!("href=\"{url}\"")),
                "{}",
                rendered.html
            );
            assert!(
                rendered.text.contains(&format!("{score}: {url}\n")),
                "{}",
                rendered.text
            );
        }
        assert!(rendered.html.contains("Would you &lt;recommend&gt; us?"));
        assert!(rendered.text.starts_with("Would you <recommend> us?"));
    }

    fn context_for(request: &RatingRequest) -> Value {
        context(request, &|score| format!("https://x.example/r/{score}"))
    }

    #[test]
    fn rating_url_gives_the_link_of_one_score_and_refuses_others() {
        let set = rules("rating = { scale = \"csat\" }");
        let rule = &set.rules[0];
        assert_eq!(rule.rating.as_ref().unwrap().scale, RatingScale::Csat);
        let (_dir, templates) = load("<a href=\"{{rating_url 5}}\">great</a>", "{{rating_url 1}}");
        let mut context = crate::render::sample_context(rule, &business());
        context["rating"] = context_for(rule.rating.as_ref().unwrap());
        let rendered = templates.render(rule, &context).unwrap();
        assert_eq!(rendered.html, "<a href=\"https://x.example/r/5\">great</a>");
        assert_eq!(rendered.text, "https://x.example/r/1");

        let (_dir, out_of_range) = load("{{rating_url 6}}", "");
        let found = out_of_range.check(&set, &business());
        assert!(
            found[0]
                .message
                .contains("rating_url 6 is outside the csat scale (1 to 5)"),
            "{found:?}"
        );
    }

    #[test]
    fn a_rule_without_rating_cannot_use_rating_url_and_the_partial_renders_nothing() {
        let set = rules("");
        let (_dir, with_url) = load("{{rating_url 5}}", "");
        let found = with_url.check(&set, &business());
        assert!(
            found[0]
                .message
                .contains("add rating = { scale = \"csat\" }"),
            "{found:?}"
        );
        let (_dir, with_partial) = load("[{{> rating}}]", "[{{> rating}}]");
        assert!(with_partial.check(&set, &business()).is_empty());
        let context = crate::render::sample_context(&set.rules[0], &business());
        let rendered = with_partial.render(&set.rules[0], &context).unwrap();
        assert_eq!(
            (rendered.html.as_str(), rendered.text.as_str()),
            ("[]", "[]")
        );
    }
}
