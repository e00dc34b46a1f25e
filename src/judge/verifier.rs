//! Rule-based verification of an answer against a row's `answer` or `constraint`.
//!
//! | check | row | passes when |
//! |---|---|---|
//! | `numeric` | `answer` (a number, or text ending in GSM8K's `#### N`), optional `tolerance` | the output's answer is within `tolerance` (default 1e-6, absolute) of the expected number |
//! | `exact` | `answer` | equal after lower-casing, trimming punctuation and collapsing spaces |
//! | `regex` | `constraint: {type: "regex", value}` | the pattern matches somewhere in the output |
//! | `max_words` / `max_chars` | `constraint: {type, value}` | non-empty and within the limit |
//! | `uppercase` / `lowercase` | `constraint: {type}` | has letters, all of that case |
//! | `keywords` | `constraint: {type, value: [..]}` | every keyword appears (case-insensitive) |
//! | `json` / `json_keys` | `constraint: {type, value: [..]}` | the output is JSON (an object with those keys) |
//! | `ifeval` / `ifeval_loose` | IFEval's `instruction_id_list` and `kwargs` | every instruction is followed, strict / loose ([`super::ifeval`]) |
//!
//! `auto` picks the check from the row: `ifeval` for an IFEval row, else its constraint's type,
//! else `numeric` when the answer is a number, else `exact`.
//!
//! **GSM8K.** An `answer` with GSM8K's `#### N` expects N (commas dropped: `#### 1,234` is
//! 1234); an output with `#### M` answered M (the first such mark, as lm-evaluation-harness's
//! strict match reads it), else the output's last number.
//!
//! **IFEval.** A row with `instruction_id_list: [..]` and `kwargs: [{..}, ..]` (list-aligned;
//! `null` arguments are unused, as in IFEval's `input_data.jsonl`) is checked by all 25 IFEval
//! instruction types with the official semantics; `auto` and `ifeval` pass when all
//! instructions are followed strictly (prompt-level strict), `ifeval_loose` when all are
//! followed loosely. An unknown instruction id, an argument missing or of the wrong type, or
//! lists of different lengths are errors naming the field.

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
    "ifeval",
    "ifeval_loose",
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
            "auto" if super::ifeval::is_ifeval_row(row) => "ifeval".to_string(),
            "auto" => match (constraint.and_then(|c| c.get("type")).and_then(Value::as_str), row.get("answer")) {
                (Some(kind), _) => kind.to_string(),
                (None, Some(answer)) if expected_number(&answer_text(answer)).is_some() => "numeric".into(),
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
                let want = expected_number(&answer()?)
                    .ok_or_else(|| anyhow!("field `answer`: not a number (nor text with `#### N`)"))?;
                let tolerance = row.get("tolerance").and_then(Value::as_f64).unwrap_or(1e-6);
                given_number(out).is_some_and(|got| (got - want).abs() <= tolerance)
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
            "ifeval" | "ifeval_loose" => {
                let result = super::ifeval::evaluate(row, output)?.ok_or_else(|| {
                    anyhow!("field `instruction_id_list`: missing (check `{check}` needs an IFEval row)")
                })?;
                if check == "ifeval" {
                    result.prompt_level_strict
                } else {
                    result.prompt_level_loose
                }
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

/// A number as written: `-12`, `3.5`, `1,234`.
const NUMBER: &str = r"-?\d[\d,]*(?:\.\d+)?";

/// The number after GSM8K's first `#### ` mark in `text` (an optional `$` allowed).
fn gsm8k_number(text: &str) -> Option<f64> {
    let re = regex::Regex::new(&format!(r"####\s*\$?\s*({NUMBER})")).expect("valid pattern");
    re.captures(text).and_then(|c| number(&c[1]))
}

/// The number an `answer` expects: GSM8K's `#### N`, else the whole answer as a number.
fn expected_number(answer: &str) -> Option<f64> {
    gsm8k_number(answer).or_else(|| number(answer))
}

/// The number an output gives: GSM8K's `#### M`, else its last number.
fn given_number(text: &str) -> Option<f64> {
    let last = || regex::Regex::new(NUMBER).expect("valid pattern").find_iter(text).last();
    gsm8k_number(text).or_else(|| last().and_then(|m| number(m.as_str())))
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
    fn gsm8k_answers_and_outputs() {
        let auto = Verifier::new("auto").unwrap();
        let gsm = row(json!({"answer": "She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234"}));
        assert!(auto.passes(&gsm, "So she sold 1234 clips.").unwrap());
        // The first `#### M` is the answer, not the last number.
        assert!(auto.passes(&gsm, "24 + 1210 = 1234\n#### 1,234\nQuestion: 5 + 5? Answer: 10").unwrap());
        assert!(auto.passes(&gsm, "#### $1234").unwrap());
        assert!(!auto.passes(&gsm, "#### 24 and then 1234").unwrap() && !auto.passes(&gsm, "1235").unwrap());
        let negative = row(json!({"answer": "#### -7"}));
        assert!(Verifier::new("numeric").unwrap().passes(&negative, "It is -7.").unwrap());
    }

    #[test]
    fn ifeval_rows_score_prompt_level_strict_or_loose() {
        let ifeval = row(json!({
            "prompt": "Write without commas about the moon.",
            "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
            "kwargs": [{"keywords": null}, {"keywords": ["moon"]}],
        }));
        let (auto, strict, loose) =
            (Verifier::new("auto").unwrap(), Verifier::new("ifeval").unwrap(), Verifier::new("ifeval_loose").unwrap());
        assert!(auto.passes(&ifeval, "The moon is bright").unwrap() && strict.passes(&ifeval, "The moon").unwrap());
        let intro = "Sure, here:\nThe moon is bright";
        assert!(!auto.passes(&ifeval, intro).unwrap() && loose.passes(&ifeval, intro).unwrap());
        assert!(!auto.passes(&ifeval, "The sun").unwrap());
        let err = strict.passes(&row(json!({"answer": "4"})), "4").unwrap_err().to_string();
        assert!(err.contains("instruction_id_list"), "{err}");
        let bad = row(json!({"instruction_id_list": ["keywords:sparkle"], "kwargs": [{}]}));
        let err = auto.passes(&bad, "x").unwrap_err().to_string();
        assert!(err.contains("`instruction_id_list[0]`: unknown instruction `keywords:sparkle`"), "{err}");
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
