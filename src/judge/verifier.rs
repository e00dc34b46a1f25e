//! Rule-based verification of an answer against a row's `answer` or `constraint`.
//!
//! | check | row | passes when |
//! |---|---|---|
//! | `numeric` | `answer` (a number), optional `tolerance` | the last number in the output is within `tolerance` (default 1e-6, absolute) |
//! | `exact` | `answer` | equal after lower-casing, trimming punctuation and collapsing spaces |
//! | `regex` | `constraint: {type: "regex", value}` | the pattern matches somewhere in the output |
//! | `max_words` / `max_chars` | `constraint: {type, value}` | non-empty and within the limit |
//! | `uppercase` / `lowercase` | `constraint: {type}` | has letters, all of that case |
//! | `keywords` | `constraint: {type, value: [..]}` | every keyword appears (case-insensitive) |
//! | `json` / `json_keys` | `constraint: {type, value: [..]}` | the output is JSON (an object with those keys) |
//!
//! `auto` picks the check from the row: its constraint's type, else `numeric` when the answer
//! is a number, else `exact`.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// Every check's name, `auto` first.
pub const CHECKS: &[&str] = &[
    "auto",
    "numeric",
    "exact",
    "regex",
    "max_words",
    "max_chars",
    "uppercase",
    "lowercase",
    "keywords",
    "json",
    "json_keys",
];

/// A verifier: which check to run (`auto` = from each row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    check: String,
}

impl Verifier {
    /// The verifier named `name` (one of [`CHECKS`]).
    pub fn new(name: &str) -> Result<Self> {
        if !CHECKS.contains(&name) {
            bail!("unknown verifier `{name}` (known: {})", CHECKS.join(", "));
        }
        Ok(Self { check: name.to_string() })
    }

    /// Whether `output` satisfies `row`; an error when the row lacks what the check needs.
    pub fn passes(&self, row: &Map<String, Value>, output: &str) -> Result<bool> {
        let constraint = row.get("constraint").and_then(Value::as_object);
        let check = match self.check.as_str() {
            "auto" => match (constraint.and_then(|c| c.get("type")).and_then(Value::as_str), row.get("answer")) {
                (Some(kind), _) => kind.to_string(),
                (None, Some(answer)) if number(&answer_text(answer)).is_some() => "numeric".into(),
                (None, Some(_)) => "exact".into(),
                (None, None) => {
                    bail!("the row has neither `answer` nor `constraint` to verify against")
                }
            },
            named => named.to_string(),
        };
        let value = || {
            constraint
                .and_then(|c| c.get("value"))
                .ok_or_else(|| anyhow!("field `constraint.value`: missing (check `{check}`)"))
        };
        let answer =
            || row.get("answer").map(answer_text).ok_or_else(|| anyhow!("field `answer`: missing (check `{check}`)"));
        let limit = || {
            value()?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("field `constraint.value`: expected a whole number"))
        };
        let strings = || -> Result<Vec<String>> {
            match value()? {
                Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| anyhow!("field `constraint.value`: expected strings"))
                    })
                    .collect(),
                Value::String(s) => Ok(vec![s.clone()]),
                _ => bail!("field `constraint.value`: expected a list of strings"),
            }
        };
        let out = output.trim();
        Ok(match check.as_str() {
            "numeric" => {
                let want = number(&answer()?).ok_or_else(|| anyhow!("field `answer`: not a number"))?;
                let tolerance = row.get("tolerance").and_then(Value::as_f64).unwrap_or(1e-6);
                last_number(out).is_some_and(|got| (got - want).abs() <= tolerance)
            }
            "exact" => normalize(out) == normalize(&answer()?),
            "regex" => {
                let pattern =
                    value()?.as_str().ok_or_else(|| anyhow!("field `constraint.value`: expected a pattern string"))?;
                regex::Regex::new(pattern)
                    .map_err(|e| anyhow!("field `constraint.value`: bad pattern: {e}"))?
                    .is_match(out)
            }
            "max_words" => !out.is_empty() && out.split_whitespace().count() <= limit()?,
            "max_chars" => !out.is_empty() && out.chars().count() <= limit()?,
            "uppercase" => out.chars().any(char::is_alphabetic) && !out.chars().any(char::is_lowercase),
            "lowercase" => out.chars().any(char::is_alphabetic) && !out.chars().any(char::is_uppercase),
            "keywords" => {
                let lower = out.to_lowercase();
                strings()?.iter().all(|k| lower.contains(&k.to_lowercase()))
            }
            "json" => parse_json(out).is_some(),
            "json_keys" => {
                let keys = strings()?;
                parse_json(out)
                    .and_then(|v| v.as_object().cloned())
                    .is_some_and(|o| keys.iter().all(|k| o.contains_key(k)))
            }
            other => bail!("field `constraint.type`: unknown check `{other}` (known: {})", CHECKS[1..].join(", ")),
        })
    }
}

/// `verifier:NAME` as a judge: pass scores 1, fail 0; both right or both wrong is a tie.
pub struct VerifierJudge {
    verifier: Verifier,
}

impl VerifierJudge {
    /// The judge for check `name` (one of [`CHECKS`]).
    pub fn new(name: &str) -> Result<Self> {
        Ok(Self { verifier: Verifier::new(name)? })
    }
}

impl super::Judge for VerifierJudge {
    fn name(&self) -> String {
        format!("verifier:{}", self.verifier.check)
    }

    fn judge(&self, cases: &[super::Case]) -> Result<Vec<super::Judgment>> {
        super::judge_by_scores(self, cases, 0.0)
    }

    fn score(&self, outputs: &[(&crate::data::Text, &Map<String, Value>, &str)]) -> Result<Option<Vec<f64>>> {
        outputs
            .iter()
            .map(|(_, row, out)| Ok(f64::from(u8::from(self.verifier.passes(row, out)?))))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn answer_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn number(s: &str) -> Option<f64> {
    s.trim().replace(',', "").parse().ok()
}

/// The last number written in `text` (`-12`, `3.5`, `1,234`).
fn last_number(text: &str) -> Option<f64> {
    let re = regex::Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("valid pattern");
    re.find_iter(text).last().and_then(|m| number(m.as_str()))
}

fn normalize(s: &str) -> String {
    s.to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
        .to_string()
}

/// JSON in the output, also inside a Markdown code fence.
fn parse_json(out: &str) -> Option<Value> {
    let inner = out.trim().trim_start_matches("```json").trim_start_matches("```").trim_end_matches("```").trim();
    serde_json::from_str(inner).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_check_against_known_answers() {
        let auto = Verifier::new("auto").unwrap();
        let arithmetic = row(json!({"answer": "444"}));
        assert!(auto.passes(&arithmetic, "37 * 12 = 444").unwrap());
        assert!(!auto.passes(&arithmetic, "445").unwrap());
        assert!(!auto.passes(&arithmetic, "no idea").unwrap());
        let tolerant = row(json!({"answer": 2.5, "tolerance": 0.01}));
        assert!(auto.passes(&tolerant, "about 2.504").unwrap() && !auto.passes(&tolerant, "2.52").unwrap());
        assert!(auto.passes(&row(json!({"answer": "1234"})), "It is 1,234.").unwrap());
        assert!(auto.passes(&row(json!({"answer": "Paris"})), "  paris. ").unwrap());
        let upper = row(json!({"constraint": {"type": "uppercase"}}));
        assert!(
            auto.passes(&upper, "RIVER PLANET").unwrap()
                && !auto.passes(&upper, "River planet").unwrap()
                && !auto.passes(&upper, "123").unwrap()
        );
        let words = row(json!({"constraint": {"type": "max_words", "value": 3}}));
        assert!(
            auto.passes(&words, "The moon glows.").unwrap()
                && !auto.passes(&words, "The moon glows softly.").unwrap()
                && !auto.passes(&words, "").unwrap()
        );
        let chars = row(json!({"constraint": {"type": "max_chars", "value": 5}}));
        assert!(auto.passes(&chars, "hello").unwrap() && !auto.passes(&chars, "hello!").unwrap());
        let kw = row(json!({"constraint": {"type": "keywords", "value": ["quiet"]}}));
        assert!(auto.passes(&kw, "Rain is Quiet.").unwrap() && !auto.passes(&kw, "Rain is nice.").unwrap());
        let keys = row(json!({"constraint": {"type": "json_keys", "value": ["name", "age"]}}));
        assert!(auto.passes(&keys, "{\"name\": \"Ana\", \"age\": 3}").unwrap());
        assert!(auto.passes(&keys, "```json\n{\"name\": \"Ana\", \"age\": 3}\n```").unwrap());
        assert!(!auto.passes(&keys, "{\"name\": \"Ana\"}").unwrap() && !auto.passes(&keys, "Ana is 3.").unwrap());
        let re = row(json!({"constraint": {"type": "regex", "value": "^[A-Z][a-z]+$"}}));
        assert!(auto.passes(&re, "Hello").unwrap() && !auto.passes(&re, "hello").unwrap());
        assert!(Verifier::new("lowercase").unwrap().passes(&row(json!({})), "all small").unwrap());
        assert!(Verifier::new("json").unwrap().passes(&row(json!({})), "[1, 2]").unwrap());
    }

    #[test]
    fn missing_fields_and_unknown_checks_are_named() {
        let err = Verifier::new("auto").unwrap().passes(&row(json!({})), "x").unwrap_err().to_string();
        assert!(err.contains("`answer`") && err.contains("`constraint`"), "{err}");
        let err = Verifier::new("max_words")
            .unwrap()
            .passes(&row(json!({"constraint": {"type": "max_words"}})), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("constraint.value"), "{err}");
        assert!(Verifier::new("spelling").unwrap_err().to_string().contains("known: auto"));
    }
}
