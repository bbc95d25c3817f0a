//! Tests of the rules loader: the examples from the design, each kind of mistake with its
//! position and message, several mistakes at once, and reading a directory.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{NaiveTime, TimeDelta, Weekday};
use serde_json::json;

use super::*;

fn exists(name: &str) -> bool {
    ["thank-you", "follow-up", "anniversary", "news"].contains(&name)
}

/// The valid rules and the mistakes as `line:column: message`.
fn check(source: &str) -> (Vec<Rule>, Vec<String>) {
    let (rules, diags) = parse_file(Path::new("r.toml"), source, &exists);
    for d in &diags {
        assert_eq!(d.file, Path::new("r.toml"));
    }
    (
        rules,
        diags
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
            .collect(),
    )
}

/// The mistakes of a file expected to have exactly one.
fn one_error(source: &str) -> String {
    let (rules, errors) = check(source);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(rules.is_empty(), "{rules:#?}");
    errors.into_iter().next().unwrap_or_default()
}

/// The single rule of a file expected to be valid.
fn one_rule(source: &str) -> Rule {
    let (mut rules, errors) = check(source);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(rules.len(), 1);
    rules.remove(0)
}

fn time(h: u32, m: u32) -> NaiveTime {
    NaiveTime::from_hms_opt(h, m, 0).unwrap()
}

/// A valid rule's lines before its `when`, to which tests add the part they look at.
const HEAD: &str = "[[rule]]\nname = \"r\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n";

const DESIGN_EXAMPLES: &str = r#"[[rule]]
name = "thank-you-after-purchase"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "2h" }
send_window = { from = "09:00", to = "18:00" }   # in the customer's time zone
expire_after = "2d"                               # too late to be polite: skip, don't send

[[rule]]
name = "discovery-call-follow-up"
template = "follow-up"
subject = "As promised: next steps"
when = { event = "discovery_call", after = "3d" }
unless = [{ event = "purchase", since = "trigger" }]

[[rule]]
name = "wedding-anniversary"
template = "anniversary"
subject = "Happy anniversary, {{customer.first_name}}!"
when = { anniversary_of = "wedding", at = "09:00" }
"#;

#[test]
fn design_examples_parse_into_the_right_types() {
    let (rules, errors) = check(DESIGN_EXAMPLES);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(rules.len(), 3);

    let thanks = &rules[0];
    assert_eq!(thanks.name, "thank-you-after-purchase");
    assert_eq!(thanks.description, None);
    assert_eq!(thanks.template, "thank-you");
    assert_eq!(
        thanks.subject,
        "Thank you for your order, {{customer.first_name}}"
    );
    assert!(thanks.enabled);
    assert_eq!(
        thanks.trigger,
        Trigger::Event {
            kind: "purchase".into(),
            after: TimeDelta::hours(2)
        }
    );
    assert!(thanks.unless.is_empty());
    assert!(thanks.only_if.is_empty());
    assert_eq!(
        thanks.send_window,
        Some(SendWindow {
            from: time(9, 0),
            to: time(18, 0),
            days: None,
            skip_dates: Vec::new(),
        })
    );
    assert_eq!(thanks.expire_after, Some(TimeDelta::days(2)));
    assert_eq!(
        thanks.origin,
        Origin {
            file: "r.toml".into(),
            line: 1,
            column: 1
        }
    );
    assert_eq!(
        thanks.template_origin,
        Origin {
            file: "r.toml".into(),
            line: 3,
            column: 12
        }
    );
    assert_eq!(
        thanks.subject_origin,
        Origin {
            file: "r.toml".into(),
            line: 4,
            column: 11
        }
    );

    let follow_up = &rules[1];
    assert_eq!(follow_up.name, "discovery-call-follow-up");
    assert_eq!(
        follow_up.trigger,
        Trigger::Event {
            kind: "discovery_call".into(),
            after: TimeDelta::days(3)
        }
    );
    assert_eq!(
        follow_up.unless,
        vec![Unless::SinceTrigger {
            event: "purchase".into()
        }]
    );
    assert_eq!(follow_up.send_window, None);
    assert_eq!(follow_up.expire_after, None);
    assert_eq!(follow_up.origin.line, 9);

    let anniversary = &rules[2];
    assert_eq!(
        anniversary.trigger,
        Trigger::Anniversary {
            kind: "wedding".into(),
            at: time(9, 0)
        }
    );
    assert_eq!(anniversary.origin.line, 16);
    assert_eq!(anniversary.subject_origin.line, 19);
}

#[test]
fn every_option_is_read() {
    let rule = one_rule(
        r#"
[[rule]]
name = "win-back.v2"
description = "Customers who have gone quiet"
template = "news"
subject = "{{#if customer.first_name}}Hi {{customer.first_name}}{{else}}Hello{{/if}}"
enabled = false
when = { schedule = "0 9 * * mon" }
unless = [
  { event = "purchase", within = "30d" },
  { event = "unsubscribe", within = "1w" },
]
only_if = [
  { attribute = "plan", equals = "gold" },
  { attribute = "seats", equals = 3 },
  { attribute = "score", equals = 0.5 },
  { attribute = "vip", equals = true },
  { attribute = "country", in = ["FR", "BE", 7] },
  { attribute = "email_bounced", exists = false },
]
send_window = { from = "20:00", to = "08:00", days = ["Mon", "TUESDAY", "fri", "mon"] }
expire_after = "1d12h"
"#,
    );
    assert_eq!(rule.name, "win-back.v2");
    assert_eq!(
        rule.description.as_deref(),
        Some("Customers who have gone quiet")
    );
    assert!(!rule.enabled);
    match &rule.trigger {
        Trigger::Schedule { expression, .. } => {
            assert_eq!(expression, "0 9 * * mon");
        }
        other => panic!("expected a schedule, got {other:?}"),
    }
    assert_eq!(
        rule.unless,
        vec![
            Unless::Within {
                event: "purchase".into(),
                within: TimeDelta::days(30)
            },
            Unless::Within {
                event: "unsubscribe".into(),
                within: TimeDelta::weeks(1)
            },
        ]
    );
    let condition = |attribute: &str, test| AttributeCondition {
        attribute: attribute.into(),
        test,
        event_field: false,
    };
    assert_eq!(
        rule.only_if,
        vec![
            condition("plan", AttributeTest::Equals(json!("gold"))),
            condition("seats", AttributeTest::Equals(json!(3))),
            condition("score", AttributeTest::Equals(json!(0.5))),
            condition("vip", AttributeTest::Equals(json!(true))),
            condition(
                "country",
                AttributeTest::In(vec![json!("FR"), json!("BE"), json!(7)])
            ),
            condition("email_bounced", AttributeTest::Exists(false)),
        ]
    );
    assert_eq!(
        rule.send_window,
        Some(SendWindow {
            from: time(20, 0),
            to: time(8, 0),
            days: Some(vec![Weekday::Mon, Weekday::Tue, Weekday::Fri]),
            skip_dates: Vec::new(),
        })
    );
    assert_eq!(rule.expire_after, Some(TimeDelta::hours(36)));
    assert_eq!(rule.origin.line, 2);
}

#[test]
fn standard_tables_dotted_keys_and_inline_rule_arrays_are_accepted() {
    let rule = one_rule(
        r#"[[rule]]
name = "r"
template = "thank-you"
subject = "Hi"

[rule.when]
event = "purchase"
after = "0s"

[[rule.unless]]
event = "refund"
since = "trigger"

[rule.send_window]
from = "9:00"
to = "17:30"
"#,
    );
    assert_eq!(
        rule.trigger,
        Trigger::Event {
            kind: "purchase".into(),
            after: TimeDelta::zero()
        }
    );
    assert_eq!(
        rule.unless,
        vec![Unless::SinceTrigger {
            event: "refund".into()
        }]
    );
    assert_eq!(
        rule.send_window.map(|w| (w.from, w.to)),
        Some((time(9, 0), time(17, 30)))
    );

    let dotted = one_rule(&format!(
        "{HEAD}when.anniversary_of = \"birthday\"\nwhen.at = \"08:30\"\n"
    ));
    assert_eq!(
        dotted.trigger,
        Trigger::Anniversary {
            kind: "birthday".into(),
            at: time(8, 30)
        }
    );

    let (rules, errors) = check(
        "rule = [\n  { name = \"a\", template = \"news\", subject = \"s\", when = { schedule = \"*/15 * * * *\" } },\n]\n",
    );
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(rules.len(), 1);
    assert_eq!((rules[0].origin.line, rules[0].origin.column), (2, 3));
}

#[test]
fn cron_schedules_with_five_or_six_fields() {
    for ok in [
        "0 9 * * *",
        "*/5 * * * *",
        "30 0 9 * * mon-fri",
        "0 0 1 jan *",
        "@daily",
    ] {
        let rule = one_rule(&format!("{HEAD}when = {{ schedule = \"{ok}\" }}\n"));
        assert!(matches!(rule.trigger, Trigger::Schedule { .. }), "{ok}");
    }
    let err = one_error(&format!(
        "{HEAD}when = {{ schedule = \"0 9 * * * 2030\" }}\n"
    ));
    assert!(
        err.starts_with("5:21: bad cron schedule \"0 9 * * * 2030\": "),
        "{err}"
    );
    assert!(err.contains("expected 5 fields"), "{err}");
    let err = one_error(&format!("{HEAD}when = {{ schedule = \"99 9 * * *\" }}\n"));
    assert!(
        err.starts_with("5:21: bad cron schedule \"99 9 * * *\": "),
        "{err}"
    );
    for bad in [
        "",
        "*",
        "a b c d e",
        "1-99999999999999999999 * * * *",
        "*/0 * * * *",
        "L L L L L",
    ] {
        let (rules, errors) = check(&format!("{HEAD}when = {{ schedule = \"{bad}\" }}\n"));
        assert!(rules.is_empty(), "{bad}");
        assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        assert!(errors[0].contains("bad cron schedule"), "{bad}: {errors:?}");
    }
}

#[test]
fn toml_syntax_errors_give_one_diagnostic_at_the_place() {
    assert_eq!(
        one_error("[[rule]]\nname = 'a\n"),
        "2:10: invalid TOML: invalid literal string"
    );
    let err = one_error("[[rule]]\nname = \"a\"\nnamé = 1\n");
    assert!(err.starts_with("3:4: invalid TOML"), "{err}");
    let err = one_error("[[rule]]\nname = \"a\"\nname = \"b\"\n");
    assert!(err.starts_with("3:1: invalid TOML: duplicate key"), "{err}");
    assert!(!err.contains('\n'));
}

#[test]
fn files_without_rules_and_stray_top_level_keys() {
    let (_, errors) = check("");
    assert_eq!(
        errors,
        ["0:0: no rules: a rules file holds one or more [[rule]] tables"]
    );
    let (_, errors) = check("# only a comment\n");
    assert_eq!(errors.len(), 1);

    let err = one_error("[rule]\nname = \"a\"\n");
    assert!(
        err.starts_with("1:1: expected [[rule]] tables for `rule`, found a single [rule] table"),
        "{err}"
    );
    let err = one_error("rule = 3\n");
    assert_eq!(
        err,
        "1:8: expected [[rule]] tables for `rule`, found an integer"
    );
    let err = one_error("rule = [1]\n");
    assert_eq!(err, "1:9: expected a table in `rule`, found an integer");

    let (rules, errors) = check(&format!(
        "name = \"x\"\n{HEAD}when = {{ event = \"e\", after = \"1h\" }}\n"
    ));
    assert_eq!(rules.len(), 1);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("1:1: unknown top-level key `name`"),
        "{errors:?}"
    );
    let (_, errors) = check("name = \"x\"\n");
    assert_eq!(errors.len(), 2, "{errors:?}");
}

#[test]
fn missing_required_keys_are_reported_at_the_rule_header() {
    let (rules, errors) = check("\n\n[[rule]]\ndescription = \"nothing else\"\n");
    assert!(rules.is_empty());
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].starts_with("3:1: rule is missing `name`"));
    assert!(errors[1].starts_with("3:1: rule is missing `template`"));
    assert!(errors[2].starts_with("3:1: rule is missing `subject`"));
    assert!(errors[3].starts_with("3:1: rule is missing `when`: expected one of { event = KIND"));

    let err = one_error("[[rule]]\nname = \"n\"\ntemplate = \"news\"\nsubject = \"s\"\n");
    assert!(err.starts_with("1:1: rule `n` is missing `when`"), "{err}");
}

#[test]
fn names_templates_and_subjects() {
    let gone = HEAD.replace("template = \"thank-you\"", "template = \"gone\"");
    let err = one_error(&format!(
        "{gone}when = {{ event = \"e\", after = \"1h\" }}\n"
    ));
    assert_eq!(
        err,
        "3:12: no template `gone`: expected templates/gone.html.hbs and templates/gone.txt.hbs"
    );

    let with_name = |name: &str| {
        format!(
            "[[rule]]\nname = {name}\ntemplate = \"news\"\nsubject = \"s\"\nwhen = {{ schedule = \"0 9 * * *\" }}\n"
        )
    };
    assert_eq!(
        one_error(&with_name("\"\"")),
        "2:8: bad rule name \"\": it is empty"
    );
    assert!(
        one_error(&with_name("\"a b\""))
            .starts_with("2:8: bad rule name \"a b\": ' ' is not allowed")
    );
    assert!(one_error(&with_name("\"a/b\"")).contains("'/' is not allowed"));
    assert!(one_error(&with_name("\"..\"")).contains("must start with a letter or a digit"));
    assert_eq!(
        one_error(&with_name("42")),
        "2:8: expected a string for `name`, found an integer"
    );
    assert_eq!(one_rule(&with_name("\"A-b_c.9\"")).name, "A-b_c.9");

    let err = one_error(
        "[[rule]]\nname = \"n\"\ntemplate = \"../x\"\nsubject = \"s\"\nwhen = { schedule = \"0 9 * * *\" }\n",
    );
    assert!(err.starts_with("3:12: bad template name \"../x\""), "{err}");

    let with_subject = |subject: &str| {
        format!(
            "[[rule]]\nname = \"n\"\ntemplate = \"news\"\nsubject = {subject}\nwhen = {{ schedule = \"0 9 * * *\" }}\n"
        )
    };
    let err = one_error(&with_subject("\"Hi {{customer.first_name\""));
    assert!(err.starts_with("4:11: bad Handlebars in subject"), "{err}");
    let err = one_error(&with_subject("\"{{#if a}}x\""));
    assert!(err.starts_with("4:11: bad Handlebars in subject"), "{err}");
    assert_eq!(
        one_error(&with_subject("\"  \"")),
        "4:11: the subject is empty: expected the text of the email's subject line"
    );
    assert_eq!(
        one_error(&with_subject("\"a\\nb\"")),
        "4:11: the subject has a line break: a subject must be one line"
    );
    assert_eq!(
        one_error(&with_subject("\"a\\u001bb\"")),
        "4:11: the subject contains a control character (U+001B): a subject must be one line of text"
    );
    assert_eq!(
        one_error(&with_subject("true")),
        "4:11: expected a string for `subject`, found a boolean"
    );

    let err = one_error(&format!(
        "{HEAD}enabled = \"yes\"\nwhen = {{ event = \"e\", after = \"1h\" }}\n"
    ));
    assert_eq!(
        err,
        "5:11: expected a boolean (true or false) for `enabled`, found a string"
    );
}

#[test]
fn when_mistakes() {
    let when = |w: &str| one_error(&format!("{HEAD}when = {w}\n"));
    let err = when("{ event = \"purchase\", after = \"2x\" }");
    assert_eq!(
        err,
        "5:38: bad duration \"2x\" for after: expected a number followed by s, m, h, d or w (like 90s, 15m, 2h, 3d, 1w, or 1d12h)"
    );
    let err = when("{ event = \"purchase\", anniversary_of = \"wedding\" }");
    assert!(err.starts_with("5:8: `when` needs exactly one kind of trigger but mixes `event`, `anniversary_of`; expected one of { event = KIND, after = DURATION }, { anniversary_of = KIND, at = \"HH:MM\" } or { schedule = CRON }"), "{err}");
    let err = when("{ event = \"purchase\", at = \"09:00\" }");
    assert!(err.contains("mixes `event`, `at`"), "{err}");
    let err = when("{ schedule = \"0 9 * * *\", after = \"1h\" }");
    assert!(err.contains("exactly one kind of trigger"), "{err}");
    let err = when("{}");
    assert!(
        err.starts_with("5:8: `when` needs exactly one kind of trigger but has none"),
        "{err}"
    );
    let err = when("{ event = \"purchase\" }");
    assert!(
        err.starts_with("5:8: `when` with `event` is missing `after`"),
        "{err}"
    );
    let err = when("{ after = \"1h\" }");
    assert!(
        err.starts_with("5:8: `when` has `after` but no `event`"),
        "{err}"
    );
    let err = when("{ anniversary_of = \"wedding\" }");
    assert!(
        err.starts_with("5:8: `when` with `anniversary_of` is missing `at`"),
        "{err}"
    );
    let err = when("{ anniversary_of = \"wedding\", at = \"9am\" }");
    assert!(
        err.starts_with("5:43: bad time \"9am\" for at: expected a time of day as HH:MM"),
        "{err}"
    );
    let err = when("{ anniversary_of = \"wedding\", at = \"24:00\" }");
    assert!(err.contains("24:00 is not a time of day"), "{err}");
    let err = when("{ event = \"\", after = \"1h\" }");
    assert!(err.starts_with("5:18: `event` is empty"), "{err}");
    let err = when("{ event = \" purchase\", after = \"1h\" }");
    assert!(err.starts_with("5:18: `event` has spaces around"), "{err}");
    let err = when("{ anniversary_of = 3, at = \"09:00\" }");
    assert_eq!(
        err,
        "5:27: expected a string for `anniversary_of`, found an integer"
    );
    let err = when("\"purchase\"");
    assert!(err.starts_with("5:8: expected a table for `when`, like { event = \"purchase\", after = \"2h\" }, found a string"), "{err}");
    let err = when("{ event = \"p\", after = \"99999999999w\" }");
    assert!(
        err.starts_with("5:31: bad duration \"99999999999w\" for after: too long"),
        "{err}"
    );
}

#[test]
fn unknown_keys_at_every_level_name_the_place_and_the_expected_keys() {
    let err = one_error(&format!(
        "{HEAD}tempalte = \"x\"\nwhen = {{ event = \"e\", after = \"1h\" }}\n"
    ));
    assert_eq!(
        err,
        "5:1: unknown key `tempalte` in rule (did you mean `template`?); expected one of: name, description, template, subject, enabled, when, unless, only_if, send_window, expire_after, track_opens, track_clicks, frequency_limit, priority, ignore_frequency_limit, rating, to"
    );
    let (_, errors) = check(&format!(
        "{HEAD}when = {{ event = \"e\", after = \"1h\", delay = \"2h\" }}\n"
    ));
    assert_eq!(
        errors,
        [
            "5:37: unknown key `delay` in when; expected one of: event, after, anniversary_of, at, schedule"
        ]
    );
    let (_, errors) = check(&format!(
        "{HEAD}when = {{ event = \"e\", after = \"1h\" }}\nsend_window = {{ from = \"09:00\", to = \"17:00\", tz = \"UTC\" }}\n"
    ));
    assert_eq!(
        errors,
        ["6:47: unknown key `tz` in send_window; expected one of: from, to, days, skip_dates"]
    );
    let (_, errors) = check(&format!(
        "{HEAD}when = {{ event = \"e\", after = \"1h\" }}\nunless = [\n  {{ event = \"x\", since = \"trigger\", sinse = 1 }},\n]\n"
    ));
    assert_eq!(
        errors,
        [
            "7:37: unknown key `sinse` in unless (did you mean `since`?); expected one of: event, since, within"
        ]
    );
    let (_, errors) = check(&format!(
        "{HEAD}when = {{ event = \"e\", after = \"1h\" }}\nonly_if = [{{ attribute = \"a\", exists = true, equal = 1 }}]\n"
    ));
    assert_eq!(
        errors,
        [
            "6:46: unknown key `equal` in only_if (did you mean `equals`?); expected one of: attribute, event_field, equals, in, exists, at_most, at_least"
        ]
    );
    let (_, errors) = check(&format!(
        "{HEAD}[rule.when]\nevent = \"e\"\nafter = \"1h\"\nwhen = 2\n"
    ));
    assert!(
        errors[0].starts_with("8:1: unknown key `when` in when"),
        "{errors:?}"
    );
}

#[test]
fn unless_mistakes() {
    let event_rule = |unless: &str| {
        format!("{HEAD}when = {{ event = \"e\", after = \"1h\" }}\nunless = {unless}\n")
    };
    let err = one_error(&event_rule("[{ event = \"x\", since = \"yesterday\" }]"));
    assert_eq!(
        err,
        "6:34: bad since \"yesterday\": expected since = \"trigger\" (for a period, use within = DURATION)"
    );
    let err = one_error(&event_rule(
        "[{ event = \"x\", since = \"trigger\", within = \"1d\" }]",
    ));
    assert!(
        err.starts_with("6:11: unless condition has both `since` and `within`"),
        "{err}"
    );
    let err = one_error(&event_rule("[{ event = \"x\" }]"));
    assert!(
        err.starts_with("6:11: unless condition needs `since` or `within`"),
        "{err}"
    );
    let err = one_error(&event_rule("[{ within = \"1d\" }]"));
    assert!(
        err.starts_with("6:11: unless condition is missing `event`"),
        "{err}"
    );
    let err = one_error(&event_rule("[{ event = \"x\", within = \"0s\" }]"));
    assert_eq!(err, "6:35: within must be longer than 0s");
    let err = one_error(&event_rule("[{ event = \"x\", within = \"1 day\" }]"));
    assert!(
        err.starts_with("6:35: bad duration \"1 day\" for within"),
        "{err}"
    );
    let err = one_error(&event_rule("{ event = \"x\", since = \"trigger\" }"));
    assert_eq!(
        err,
        "6:10: expected an array of tables for `unless`, found a table"
    );
    let err = one_error(&event_rule("[\"purchase\"]"));
    assert_eq!(err, "6:11: expected a table in `unless`, found a string");

    let anniversary = format!(
        "{HEAD}when = {{ anniversary_of = \"wedding\", at = \"09:00\" }}\nunless = [{{ event = \"divorce\", since = \"trigger\" }}]\n"
    );
    let err = one_error(&anniversary);
    assert_eq!(
        err,
        "6:40: since = \"trigger\" needs an event trigger, but this rule's trigger is an anniversary, which has no triggering event: use within = DURATION instead"
    );
    let schedule = format!(
        "{HEAD}when = {{ schedule = \"0 9 * * *\" }}\nunless = [{{ event = \"x\", since = \"trigger\" }}]\n"
    );
    assert!(one_error(&schedule).contains("this rule's trigger is a schedule"));
}

#[test]
fn only_if_mistakes() {
    let rule = |only_if: &str| {
        format!("{HEAD}when = {{ event = \"e\", after = \"1h\" }}\nonly_if = [{only_if}]\n")
    };
    let err = one_error(&rule("{ attribute = \"a\" }"));
    assert!(
        err.starts_with(
            "6:12: only_if condition needs one of `equals`, `in`, `exists`, `at_most` or `at_least`"
        ),
        "{err}"
    );
    let err = one_error(&rule("{ attribute = \"a\", equals = 1, exists = true }"));
    assert!(
        err.starts_with("6:12: only_if condition has `equals` and `exists`: use exactly one"),
        "{err}"
    );
    let err = one_error(&rule("{ equals = 1 }"));
    assert!(
        err.starts_with("6:12: only_if condition is missing `attribute`"),
        "{err}"
    );
    let err = one_error(&rule("{ attribute = \"\", equals = 1 }"));
    assert!(err.starts_with("6:26: `attribute` is empty"), "{err}");
    let err = one_error(&rule("{ attribute = \"a\", equals = [1] }"));
    assert_eq!(
        err,
        "6:40: expected a string, number or boolean for `equals`, found an array"
    );
    let err = one_error(&rule("{ attribute = \"a\", equals = 1979-05-27 }"));
    assert_eq!(
        err,
        "6:40: expected a string, number or boolean for `equals`, found a date-time"
    );
    let err = one_error(&rule("{ attribute = \"a\", equals = nan }"));
    assert_eq!(
        err,
        "6:40: expected a finite number for `equals`, found NaN"
    );
    let err = one_error(&rule("{ attribute = \"a\", in = [] }"));
    assert!(err.starts_with("6:36: `in` is an empty list"), "{err}");
    let err = one_error(&rule("{ attribute = \"a\", in = \"gold\" }"));
    assert!(err.starts_with("6:36: expected a list for `in`"), "{err}");
    let err = one_error(&rule("{ attribute = \"a\", in = [\"x\", { y = 1 }] }"));
    assert_eq!(
        err,
        "6:42: expected a string, number or boolean for `in`, found a table"
    );
    let err = one_error(&rule("{ attribute = \"a\", exists = \"yes\" }"));
    assert_eq!(
        err,
        "6:40: expected a boolean (true or false) for `exists`, found a string"
    );
}

#[test]
fn send_window_and_expiry_mistakes() {
    let rule = |extra: &str| format!("{HEAD}when = {{ event = \"e\", after = \"1h\" }}\n{extra}\n");
    let err = one_error(&rule("send_window = { from = \"09:00\", to = \"09:00\" }"));
    assert_eq!(
        err,
        "6:15: empty window: from and to are both 09:00; for an overnight window make from later than to"
    );
    let err = one_error(&rule("send_window = { from = \"09:00\" }"));
    assert!(
        err.starts_with("6:15: send_window is missing `to`"),
        "{err}"
    );
    let err = one_error(&rule("send_window = { from = \"09:00\", to = \"25:00\" }"));
    assert!(err.starts_with("6:38: bad time \"25:00\" for to"), "{err}");
    let err = one_error(&rule(
        "send_window = { from = \"09:00\", to = \"17:00\", days = [\"mon\", \"funday\"] }",
    ));
    assert!(
        err.starts_with("6:62: bad day \"funday\": expected mon, tue"),
        "{err}"
    );
    let err = one_error(&rule(
        "send_window = { from = \"09:00\", to = \"17:00\", days = [] }",
    ));
    assert!(err.starts_with("6:54: `days` is an empty list"), "{err}");
    let err = one_error(&rule(
        "send_window = { from = \"09:00\", to = \"17:00\", days = \"mon\" }",
    ));
    assert!(
        err.starts_with("6:54: expected a list of days for `days`"),
        "{err}"
    );
    let err = one_error(&rule("send_window = \"9-5\""));
    assert!(
        err.starts_with("6:15: expected a table for `send_window`"),
        "{err}"
    );
    let err = one_error(&rule("expire_after = \"0s\""));
    assert_eq!(err, "6:16: expire_after must be longer than 0s");
    let err = one_error(&rule("expire_after = 2"));
    assert_eq!(
        err,
        "6:16: expected a string for `expire_after`, found an integer"
    );
    let all_days = one_rule(&rule(
        "send_window = { from = \"09:00\", to = \"17:00\", days = [\"Monday\", \"tue\", \"WED\", \"thursday\", \"Fri\", \"sat\", \"sunday\"] }",
    ));
    assert_eq!(
        all_days.send_window.and_then(|w| w.days).map(|d| d.len()),
        Some(7)
    );
}

#[test]
fn several_mistakes_in_one_file_are_all_reported_in_order() {
    let source = r#"[[rule]]
name = "first"
template = "missing"
subject = "ok"
when = { event = "purchase", after = "2x" }

[[rule]]
name = "fine"
template = "news"
subject = "ok"
when = { schedule = "0 9 * * *" }

[[rule]]
name = "third"
template = "news"
subject = "{{oops"
when = { anniversary_of = "wedding", at = "9" }
send_window = { from = "10:00", to = "10:00", days = ["mon"] }
colour = "blue"
"#;
    let (rules, errors) = check(source);
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["fine"]
    );
    let places: Vec<&str> = errors
        .iter()
        .map(|e| e.split(": ").next().unwrap_or(""))
        .collect();
    assert_eq!(
        places,
        ["3:12", "5:38", "16:11", "17:43", "18:15", "19:1"],
        "{errors:#?}"
    );
}

#[test]
fn duplicate_names_in_one_file() {
    let rule = |line_name: &str| {
        format!(
            "[[rule]]\nname = \"{line_name}\"\ntemplate = \"news\"\nsubject = \"s\"\nwhen = {{ schedule = \"0 9 * * *\" }}\n"
        )
    };
    let source = rule("same") + &rule("other") + &rule("same");
    let (rules, errors) = check(&source);
    assert_eq!(rules.len(), 2);
    assert_eq!(
        errors,
        ["12:8: duplicate rule name `same`: already used at r.toml:2"]
    );
}

/// A fresh empty directory under the system's temporary directory.
fn temp_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "touchpoint-rules-{}-{label}-{n}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn load_dir_reads_toml_files_in_name_order_and_ignores_others() {
    let dir = temp_dir("ok");
    let rule = |name: &str| {
        format!(
            "[[rule]]\nname = \"{name}\"\ntemplate = \"news\"\nsubject = \"s\"\nwhen = {{ schedule = \"0 9 * * *\" }}\n"
        )
    };
    fs::write(dir.join("b.toml"), rule("from-b")).unwrap();
    fs::write(dir.join("a.toml"), rule("from-a") + &rule("from-a-2")).unwrap();
    fs::write(dir.join("README.md"), "not rules = [").unwrap();
    fs::write(dir.join("c.toml.bak"), "not rules = [").unwrap();
    fs::write(dir.join(".#a.toml"), "not rules = [").unwrap();
    fs::create_dir(dir.join("sub.toml")).unwrap();
    fs::write(dir.join("sub.toml").join("d.toml"), rule("nested")).unwrap();

    let set = load_dir(&dir, &exists).unwrap();
    let names: Vec<&str> = set.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["from-a", "from-a-2", "from-b"]);
    assert_eq!(set.rules[2].origin.file, dir.join("b.toml"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn load_dir_reports_mistakes_across_files_and_duplicate_names() {
    let dir = temp_dir("bad");
    fs::write(
        dir.join("1-first.toml"),
        "[[rule]]\nname = \"shared\"\ntemplate = \"nope\"\nsubject = \"s\"\nwhen = { schedule = \"0 9 * * *\" }\n",
    )
    .unwrap();
    fs::write(
        dir.join("2-second.toml"),
        "\n[[rule]]\nname = \"shared\"\ntemplate = \"news\"\nsubject = \"s\"\nwhen = { event = \"e\" }\n",
    )
    .unwrap();
    fs::write(dir.join("3-broken.toml"), "[[rule]\n").unwrap();
    fs::write(dir.join("4-invalid-utf8.toml"), [0xff, 0xfe, b'\n']).unwrap();

    let errors = load_dir(&dir, &exists).unwrap_err().0;
    let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let first = dir.join("1-first.toml").display().to_string();
    let second = dir.join("2-second.toml").display().to_string();
    let broken = dir.join("3-broken.toml").display().to_string();
    let invalid = dir.join("4-invalid-utf8.toml").display().to_string();
    assert_eq!(rendered.len(), 5, "{rendered:#?}");
    assert_eq!(
        rendered[0],
        format!(
            "{first}:3:12: no template `nope`: expected templates/nope.html.hbs and templates/nope.txt.hbs"
        )
    );
    assert_eq!(
        rendered[1],
        format!("{second}:3:8: duplicate rule name `shared`: already used at {first}:2")
    );
    assert!(
        rendered[2].starts_with(&format!(
            "{second}:6:8: `when` with `event` is missing `after`"
        )),
        "{}",
        rendered[2]
    );
    assert!(
        rendered[3].starts_with(&format!("{broken}:1:7: invalid TOML")),
        "{}",
        rendered[3]
    );
    assert!(
        rendered[4].starts_with(&format!("{invalid}: cannot read: ")),
        "{}",
        rendered[4]
    );
    // The whole set is rejected: loading is all or nothing.
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn load_dir_reports_a_missing_or_empty_directory() {
    let dir = temp_dir("gone");
    let missing = dir.join("no-such-dir");
    let errors = load_dir(&missing, &exists).unwrap_err().0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, missing);
    assert_eq!(errors[0].line, 0);
    assert!(
        errors[0]
            .message
            .starts_with("cannot read the rules directory: "),
        "{}",
        errors[0].message
    );

    let file = dir.join("file.toml");
    fs::write(&file, "").unwrap();
    let errors = load_dir(&file, &exists).unwrap_err().0;
    assert!(
        errors[0]
            .message
            .starts_with("cannot read the rules directory"),
        "{errors:?}"
    );

    fs::remove_file(&file).unwrap();
    let errors = load_dir(&dir, &exists).unwrap_err().0;
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].message,
        "no rules files (*.toml) in the rules directory"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn odd_input_never_panics() {
    let samples = [
        "",
        "\u{feff}",
        "[[rule]]",
        "[[rule]]\n[[rule]]\n",
        "rule = []",
        "rule = [{}]",
        "rule = {}",
        "[[rule]]\nwhen = {}\nunless = []\nonly_if = []\n",
        "[[rule]]\nwhen = []\n",
        "[[rule]]\nwhen = { event = {}, after = [] }\n",
        "[[rule]]\nunless = [[]]\nonly_if = [[1]]\n",
        "[[rule]]\nsend_window = { days = [[]] }\n",
        "[[rule]]\n\"\" = 1\n",
        "[[rule]]\nname = \"\u{1F600}\"\n",
        "[[rule]]\nsubject = \"{{\"\n",
        "[[rule]]\nsubject = \"{{{{raw}}}}\"\n",
        "[[rule.when]]\nevent = 1\n",
        "[rule.x]\n",
        "[[rule]]\nwhen = { schedule = \"\u{1F600} \u{1F600} * * *\" }\n",
        "[[rule]]\nwhen = { schedule = \"0-0/0 * * * *\" }\n",
        "[[rule]]\nexpire_after = \"\u{1F600}\"\n",
    ];
    for sample in samples {
        let (rules, errors) = check(sample);
        assert!(rules.is_empty(), "{sample:?}");
        assert!(!errors.is_empty(), "{sample:?}");
    }
}

/// A limit full only with a message whose body is going out right now waits a few seconds
/// for it to settle (it may fail and not count); one full with settled messages waits out the
/// window.
#[test]
fn a_limit_full_only_with_a_message_in_flight_waits_seconds_not_the_window() {
    let rule = format!(
        "{HEAD}when = {{ event = \"e\", after = \"1h\" }}\nfrequency_limit = {{ max = 1, per = \"3d\" }}\n"
    );
    let rule = one_rule(&rule);
    let limit = rule.limited().expect("limited");
    let now = chrono::Utc::now();
    let going_out = now - TimeDelta::seconds(2);
    let tz = chrono_tz::UTC;
    let decide = |usage: &FrequencyUsage| -> Option<Decision<()>> {
        limit_decision(&rule, &limit, usage, None, tz, now)
    };
    let in_flight = FrequencyUsage {
        counted: vec![going_out],
        in_flight: vec![going_out],
        outranked_by: Vec::new(),
    };
    match decide(&in_flight) {
        Some(Decision::Release { at, reason }) => {
            assert!(at <= now + TimeDelta::minutes(1), "{at} {reason}");
            assert!(reason.contains("going out right now"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let settled = FrequencyUsage {
        in_flight: Vec::new(),
        ..in_flight.clone()
    };
    match decide(&settled) {
        Some(Decision::Release { at, .. }) => assert_eq!(at, going_out + TimeDelta::days(3)),
        other => panic!("{other:?}"),
    }
    assert!(
        decide(&FrequencyUsage::default()).is_none(),
        "nothing counted"
    );
}

#[test]
fn frequency_limit_priority_and_skip_dates_are_read() {
    let rule = |extra: &str| format!("{HEAD}when = {{ event = \"e\", after = \"1h\" }}\n{extra}\n");
    let limited = one_rule(&rule(
        "frequency_limit = { max = 2, per = \"3d\" }\npriority = -3",
    ));
    assert_eq!(
        limited.frequency_limit,
        Some(FrequencyLimit {
            max: 2,
            per: TimeDelta::days(3)
        })
    );
    assert_eq!(
        (limited.priority, limited.ignore_frequency_limit),
        (-3, false)
    );
    let plain = one_rule(&rule(""));
    assert_eq!(
        (
            plain.frequency_limit,
            plain.priority,
            plain.ignore_frequency_limit
        ),
        (None, 0, false)
    );
    let alert = one_rule(&rule("ignore_frequency_limit = true\npriority = 100"));
    assert!(alert.ignore_frequency_limit && alert.limited().is_none());
    assert_eq!(alert.to, super::Recipient::Customer);
    let owner = one_rule(&rule("to = \"owner\""));
    assert_eq!(owner.to, super::Recipient::Owner);
    assert!(
        owner.ignore_frequency_limit,
        "the owner's mail never counts"
    );
    let quiet = one_rule(&rule(
        "send_window = { from = \"09:00\", to = \"17:00\", skip_dates = [\"12-25\", \"2026-12-31\", \"12-25\"] }",
    ));
    let dates: Vec<String> = quiet
        .send_window
        .map(|w| w.skip_dates.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    assert_eq!(dates, ["12-25", "2026-12-31"]);
}

#[test]
fn frequency_limit_priority_and_skip_dates_mistakes() {
    let rule = |extra: &str| format!("{HEAD}when = {{ event = \"e\", after = \"1h\" }}\n{extra}\n");
    let cases = [
        (
            "frequency_limit = { max = 0, per = \"3d\" }",
            "6:27: bad frequency_limit: `max` must be a whole number from 1 up, found 0",
        ),
        (
            "frequency_limit = { max = 1, per = \"0s\" }",
            "6:36: bad frequency_limit: `per` must be longer than 0s",
        ),
        (
            "frequency_limit = { max = 1, per = \"3x\" }",
            "6:36: bad duration \"3x\" for per",
        ),
        (
            "frequency_limit = { max = \"1\", per = \"3d\" }",
            "6:27: expected a whole number for `max`, like max = 1, found a string",
        ),
        (
            "frequency_limit = { max = 1 }",
            "6:19: frequency_limit is missing `per`: expected { max = 1, per = \"3d\" }",
        ),
        (
            "frequency_limit = { max = 1, per = \"3d\", every = 2 }",
            "6:42: unknown key `every` in frequency_limit",
        ),
        (
            "frequency_limit = 1",
            "6:19: expected a table for `frequency_limit`, like { max = 1, per = \"3d\" }, found an integer",
        ),
        (
            "priority = \"high\"",
            "6:12: expected a whole number for `priority` (higher goes first, default 0), like priority = 10, found a string",
        ),
        (
            "priority = 99999999999",
            "6:12: expected a whole number for `priority` (higher goes first, default 0), like priority = 10, found 99999999999",
        ),
        (
            "ignore_frequency_limit = \"yes\"",
            "6:26: expected a boolean (true or false) for `ignore_frequency_limit`, found a string",
        ),
        (
            "frequency_limit = { max = 1, per = \"3d\" }\nignore_frequency_limit = true",
            "7:26: the rule sets both `frequency_limit` and `ignore_frequency_limit = true`: keep one",
        ),
        (
            "send_window = { from = \"09:00\", to = \"17:00\", skip_dates = [\"12-25\", \"12-32\"] }",
            "6:70: in `skip_dates`: no such date \"12-32\"",
        ),
        (
            "send_window = { from = \"09:00\", to = \"17:00\", skip_dates = [\"25.12.\"] }",
            "6:61: in `skip_dates`: bad date \"25.12.\": expected \"MM-DD\"",
        ),
        (
            "send_window = { from = \"09:00\", to = \"17:00\", skip_dates = [1225] }",
            "6:61: expected a date string in `skip_dates`, like \"12-25\", found an integer",
        ),
        (
            "send_window = { from = \"09:00\", to = \"17:00\", skip_dates = \"12-25\" }",
            "6:60: expected a list of dates for `skip_dates`",
        ),
        (
            "to = \"boss\"",
            "6:6: expected \"customer\" or \"owner\" for `to`, found a string",
        ),
        (
            "to = \"owner\"\nfrequency_limit = { max = 1, per = \"3d\" }",
            "7:19: a rule with to = \"owner\" writes to the business, not the customer",
        ),
    ];
    for (extra, expected) in cases {
        let err = one_error(&rule(extra));
        assert!(
            err.starts_with(expected),
            "{extra}\n  got: {err}\n want: {expected}"
        );
    }
}

#[test]
fn defaults_fill_in_the_limit_and_quiet_dates() {
    let source = format!(
        "{HEAD}when = {{ event = \"e\", after = \"1h\" }}\n\
         [[rule]]\nname = \"own\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = {{ event = \"e\", after = \"1h\" }}\nfrequency_limit = {{ max = 3, per = \"7d\" }}\n\
         send_window = {{ from = \"09:00\", to = \"17:00\", skip_dates = [\"01-01\"] }}\n\
         [[rule]]\nname = \"alert\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = {{ event = \"e\", after = \"1h\" }}\nignore_frequency_limit = true\n"
    );
    let (rules, errors) = check(&source);
    assert!(errors.is_empty(), "{errors:#?}");
    let mut set = RuleSet { rules };
    let quiet = crate::calendar::QuietDate::parse("12-25").unwrap();
    let daily = FrequencyLimit {
        max: 1,
        per: TimeDelta::days(3),
    };
    set.apply_defaults(&RuleDefaults {
        frequency_limit: Some(daily),
        quiet_dates: vec![quiet],
    });
    let [plain, own, alert] = &set.rules[..] else {
        panic!("three rules");
    };
    assert_eq!(plain.limited(), Some(daily));
    assert_eq!(own.limited().map(|l| l.max), Some(3), "its own limit stays");
    assert_eq!(alert.limited(), None, "ignoring rules get no default");
    // A rule without a window gets one open all day, closed on the quiet dates.
    let window = plain.send_window.as_ref().unwrap();
    assert_eq!((window.from, window.to), (time(0, 0), time(0, 0)));
    assert_eq!(window.skip_dates, [quiet]);
    let own_dates = &own.send_window.as_ref().unwrap().skip_dates;
    assert_eq!(own_dates.len(), 2);
    assert_eq!(set.ignoring_frequency_limit(), ["alert"]);
    assert!(
        explain::conditions(plain)
            .iter()
            .any(|l| l == "at most 1 message to a customer within 3d, across all rules")
    );
    assert!(
        explain::conditions(plain)
            .iter()
            .any(|l| l == "only at any time except on 12-25, in the customer's time zone")
    );
}

#[test]
fn the_next_allowed_moment_waits_for_enough_to_leave_the_window() {
    let limit = FrequencyLimit::new(2, TimeDelta::days(1)).unwrap();
    let now: chrono::DateTime<chrono::Utc> = "2026-03-10T12:00:00Z".parse().unwrap();
    let hours_ago = |h: i64| now - TimeDelta::hours(h);
    assert_eq!(limit.next_allowed(&[], now), now);
    assert_eq!(
        limit.next_allowed(&[hours_ago(3)], now),
        now,
        "one of two used"
    );
    // Three within the day (in any order): two must leave, the second oldest at 10 h ago.
    let counted = [hours_ago(3), hours_ago(20), hours_ago(10)];
    assert_eq!(
        limit.next_allowed(&counted, now),
        hours_ago(10) + TimeDelta::days(1)
    );
    // Exactly `per` ago has left the window.
    let edge = [hours_ago(24), hours_ago(1)];
    assert_eq!(limit.next_allowed(&edge, now), now);
    assert!(FrequencyLimit::new(0, TimeDelta::days(1)).is_err());
    assert!(FrequencyLimit::new(i64::from(u32::MAX) + 1, TimeDelta::days(1)).is_err());
    assert!(FrequencyLimit::new(1, TimeDelta::zero()).is_err());
}

#[test]
fn rating_and_event_field_conditions() {
    let rule = one_rule(&format!(
        "{HEAD}when = {{ event = \"rated\", after = \"0s\" }}\n\
         rating = {{ scale = \"nps\", question = \"Recommend us?\" }}\n\
         only_if = [{{ event_field = \"score\", at_most = 2 }}, {{ attribute = \"n\", at_least = 1.5 }}]\n"
    ));
    let rating = rule.rating.clone().unwrap();
    assert_eq!(rating.scale, super::RatingScale::Nps);
    assert_eq!(rating.question(), "Recommend us?");
    assert!(rule.only_if[0].event_field && !rule.only_if[1].event_field);
    assert_eq!(rule.only_if[0].test, AttributeTest::AtMost(2.0));
    let attrs = json!({ "n": "2", "score": 9 });
    let low = json!({ "score": 2 });
    assert!(super::conditions_match(&rule.only_if, &attrs, Some(&low)));
    assert!(!super::conditions_match(
        &rule.only_if,
        &attrs,
        Some(&json!({ "score": 3 }))
    ));
    // No event, or no such field: an event_field condition fails (the attribute is not used).
    assert!(!super::conditions_match(&rule.only_if, &attrs, None));
    assert!(!super::conditions_match(
        &rule.only_if,
        &attrs,
        Some(&json!({}))
    ));
    assert!(!super::conditions_match(
        &rule.only_if,
        &json!({ "n": 1 }),
        Some(&low)
    ));
}

#[test]
fn rating_and_event_field_mistakes() {
    let rule = |extra: &str| format!("{HEAD}when = {{ event = \"e\", after = \"1h\" }}\n{extra}\n");
    let err = one_error(&rule("rating = { scale = \"stars\" }"));
    assert!(
        err.starts_with("6:20: unknown rating scale \"stars\": expected { scale = \"csat\" }"),
        "{err}"
    );
    let err = one_error(&rule("rating = { question = \"How?\" }"));
    assert!(err.starts_with("6:10: rating is missing `scale`"), "{err}");
    let err = one_error(&rule("rating = \"csat\""));
    assert!(err.contains("expected a table for `rating`"), "{err}");
    let err = one_error(&rule(
        "only_if = [{ event_field = \"score\", at_most = \"2\" }]",
    ));
    assert!(
        err.contains("expected a number for `at_most`, like at_most = 2"),
        "{err}"
    );
    let err = one_error(&rule(
        "only_if = [{ event_field = \"score\", attribute = \"a\", equals = 1 }]",
    ));
    assert!(
        err.contains("has both `attribute` and `event_field`"),
        "{err}"
    );
}
