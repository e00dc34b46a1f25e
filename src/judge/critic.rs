//! Critics: natural-language critiques with word-level span scores, Text2Grad's reward
//! signal. The format is the official natural-language reward model's output:
//!
//! ```text
//! {"textual_feedback": "…", "word_score_list": [["word", 1], ["other", -1], …]}
//! ```
//! (1 for words in good spans, −1 in poor spans, 0 elsewhere). Chosen by `objective.critic`:
//! - `rule`: candor's verifiable tasks checked by the verifier, the offending or the decisive
//!   words marked (deterministic; also the annotator of the critique model's training data);
//! - `llm:MODEL`: a local model asked with [`critique_request`] (greedy), its reply parsed; a
//!   critique model trained on `candor critique` data is used this way;
//! - `openai:BASE_URL`: the same request to a chat-completions server (`judge_model`).
//!
//! Replies are parsed as the official code does: the first JSON object that parses, its
//! `word_score_list`; failing that, `"word": n`, `word: n` and `(word, n)` patterns. Words are
//! trimmed of surrounding punctuation; a reply with no usable pair is unparsed (`None`).

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::verifier::Verifier;
use crate::data::{SequenceTokenizer, Text, Truncation};
use crate::load::{LoadedModel, Message};

/// A critique: the feedback text and a score per word.
#[derive(Debug, Clone, PartialEq)]
pub struct Critique {
    /// The natural-language feedback.
    pub feedback: String,
    /// `(word, score)` with score in {−1, 0, 1}, in the answer's order.
    pub word_scores: Vec<(String, f64)>,
}

impl Critique {
    /// The official target format (what a critique model learns to write).
    pub fn to_json(&self) -> String {
        let list: Vec<Value> = self.word_scores.iter().map(|(w, s)| json!([w, *s as i64])).collect();
        format!(
            "{{\n  \"textual_feedback\": {},\n  \"word_score_list\": {}\n}}",
            Value::from(self.feedback.as_str()),
            Value::Array(list)
        )
    }

    /// Read a critic's reply; `None` when it holds no usable word score.
    pub fn parse(reply: &str) -> Option<Critique> {
        let from_json = json_objects(reply).into_iter().find_map(|v| {
            let list = v.get("word_score_list")?.as_array()?.clone();
            let feedback = v.get("textual_feedback").and_then(Value::as_str).unwrap_or_default().to_string();
            Some((feedback, list))
        });
        let mut pairs: Vec<(String, f64)> = Vec::new();
        let feedback = match from_json {
            Some((feedback, list)) => {
                for item in list {
                    if let Some([w, s]) = item.as_array().map(Vec::as_slice) {
                        if let (Some(w), Some(s)) = (w.as_str(), s.as_f64()) {
                            pairs.push((w.to_string(), s));
                        }
                    }
                }
                feedback
            }
            None => String::new(),
        };
        if pairs.is_empty() {
            let patterns = [
                r#""([^"]+)"\s*:\s*(-?\d+(?:\.\d+)?)"#,
                r"(\w+)\s*:\s*(-?\d+(?:\.\d+)?)",
                r#"\(\s*["']?([^"',()]+)["']?\s*,\s*(-?\d+(?:\.\d+)?)\s*\)"#,
            ];
            for p in patterns {
                let re = regex::Regex::new(p).expect("valid pattern");
                for c in re.captures_iter(reply) {
                    if let Ok(s) = c[2].parse::<f64>() {
                        pairs.push((c[1].to_string(), s));
                    }
                }
            }
        }
        let word_scores: Vec<(String, f64)> =
            pairs.into_iter().filter_map(|(w, s)| Some((clean_word(&w)?, s.clamp(-1.0, 1.0)))).collect();
        (!word_scores.is_empty()).then_some(Critique { feedback, word_scores })
    }
}

/// A word without the punctuation around it (`None` when nothing is left).
fn clean_word(w: &str) -> Option<String> {
    let keep = |c: char| c.is_alphanumeric() || "$￥&".contains(c);
    let trimmed = w.trim_matches(|c: char| !keep(c));
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// Every balanced `{…}` in `text` that parses as a JSON object, in order.
fn json_objects(text: &str) -> Vec<Value> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    for (start, _) in text.match_indices('{') {
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        for (i, &b) in bytes.iter().enumerate().skip(start) {
            match (in_string, escaped, b) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (true, false, b'"') => in_string = false,
                (false, _, b'"') => in_string = true,
                (false, _, b'{') => depth += 1,
                (false, _, b'}') => {
                    depth -= 1;
                    if depth == 0 {
                        if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(&text[start..=i]) {
                            out.push(v);
                        }
                        break;
                    }
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            break;
        }
    }
    out
}

/// The request a critic model answers (the user turn): the task, the answer, and the output
/// format of the official reward model.
pub fn critique_request(prompt: &str, response: &str) -> String {
    format!(
        "You review answers word by word. Critique the answer to the request, then score its words: 1 for words in \
good spans (correct, following the request), -1 for words in poor spans (wrong, or breaking an instruction), 0 for \
the rest. Keep spans short and meaningful.\n\n# Output format (JSON only)\n{{\"textual_feedback\": \"...\", \
\"word_score_list\": [[\"word\", 1], ...]}}\n\n# Input\n{}",
        json!({"request": prompt, "answer": response})
    )
}

/// Writes critiques of answers.
pub trait Critic: Send + Sync {
    /// The `critic` value it was built from.
    fn name(&self) -> String;

    /// One critique per `(prompt, row, answer)`, `None` where the reply could not be read.
    fn critique(&self, items: &[(&Text, &Map<String, Value>, &str)]) -> Result<Vec<Option<Critique>>>;
}

/// Build the critic a `critic` value names.
pub fn from_spec(spec: &str, judge_model: Option<&str>, load: &crate::load::LoadOptions) -> Result<Box<dyn Critic>> {
    if spec == "rule" {
        return Ok(Box::new(RuleCritic { verifier: Verifier::new("auto")? }));
    }
    let Some((kind, arg)) = spec.split_once(':') else {
        bail!("critic `{spec}`: expected `rule`, `llm:MODEL` or `openai:BASE_URL`");
    };
    Ok(match kind {
        "llm" => Box::new(LocalCritic { spec: spec.to_string(), model: load.load(arg)? }),
        "openai" => {
            let opts = super::JudgeOptions {
                judge_model: judge_model.map(str::to_string),
                concurrency: 1,
                ..Default::default()
            };
            Box::new(RemoteCritic { spec: spec.to_string(), server: super::openai::OpenAiJudge::new(arg, &opts)? })
        }
        other => bail!("critic `{spec}`: unknown kind `{other}` (known: rule, llm, openai)"),
    })
}

/// The rule-based critic of candor's verifiable tasks.
pub struct RuleCritic {
    verifier: Verifier,
}

impl RuleCritic {
    /// A critique of `answer` to the task in `row`: the words the verifier's check turns on are
    /// scored (the right number +1, a wrong one −1; wrongly cased words −1; words past a limit
    /// −1; required keywords +1), and a passing answer's remaining words +1.
    pub fn critique_one(&self, row: &Map<String, Value>, answer: &str) -> Result<Critique> {
        let passes = self.verifier.passes(row, answer)?;
        let words: Vec<&str> = answer.split_whitespace().collect();
        let constraint = row.get("constraint").and_then(Value::as_object);
        let kind = constraint
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
            .unwrap_or(if row.get("answer").is_some() { "answer" } else { "" });
        let base = if passes { 1.0 } else { 0.0 };
        let mut scores: Vec<f64> = vec![base; words.len()];
        let feedback: String;
        match kind {
            "uppercase" | "lowercase" => {
                let wrong = |w: &str| {
                    if kind == "uppercase" {
                        w.chars().any(char::is_lowercase)
                    } else {
                        w.chars().any(char::is_uppercase)
                    }
                };
                for (s, w) in scores.iter_mut().zip(&words) {
                    *s = if wrong(w) { -1.0 } else { 1.0 };
                }
                feedback = if passes {
                    format!("Every word is {kind}, as asked.")
                } else {
                    format!("Some words are not {kind}: the request asks for {kind} letters only.")
                };
            }
            "max_words" | "max_chars" => {
                let limit = constraint.and_then(|c| c.get("value")).and_then(Value::as_u64).unwrap_or(0) as usize;
                let mut chars = 0;
                for (i, (s, w)) in scores.iter_mut().zip(&words).enumerate() {
                    chars += w.chars().count() + usize::from(i > 0);
                    let over = if kind == "max_words" { i >= limit } else { chars > limit };
                    *s = if over { -1.0 } else { base };
                }
                feedback = if passes {
                    "The answer stays within the length limit.".into()
                } else {
                    "The answer runs past the length limit; the words beyond it should go.".into()
                };
            }
            "keywords" => {
                let wanted: Vec<String> = constraint
                    .and_then(|c| c.get("value"))
                    .and_then(Value::as_array)
                    .map(|v| v.iter().filter_map(Value::as_str).map(str::to_lowercase).collect())
                    .unwrap_or_default();
                for (s, w) in scores.iter_mut().zip(&words) {
                    if wanted.iter().any(|k| w.to_lowercase().contains(k.as_str())) {
                        *s = 1.0;
                    }
                }
                let missing: Vec<&String> =
                    wanted.iter().filter(|k| !answer.to_lowercase().contains(k.as_str())).collect();
                feedback = if missing.is_empty() {
                    "Every required keyword appears.".into()
                } else {
                    format!(
                        "Missing required keywords: {}.",
                        missing.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                    )
                };
            }
            "answer" => {
                // The decisive words: the last number (numeric answers) or the whole answer.
                let want = row
                    .get("answer")
                    .map(|a| a.as_str().map(str::to_string).unwrap_or_else(|| a.to_string()))
                    .unwrap_or_default();
                let last_number = words.iter().rposition(|w| w.chars().any(|c| c.is_ascii_digit()));
                match last_number {
                    Some(i) if want.chars().any(|c| c.is_ascii_digit()) => {
                        scores[i] = if passes { 1.0 } else { -1.0 };
                        feedback = if passes {
                            format!("The final answer {} is correct.", words[i])
                        } else {
                            format!("The final answer {} is wrong; it should be {want}.", words[i])
                        };
                    }
                    _ => {
                        scores.fill(if passes { 1.0 } else { -1.0 });
                        feedback = if passes {
                            "The answer is correct.".into()
                        } else {
                            format!("The answer is wrong; it should be {want}.")
                        };
                    }
                }
            }
            _ => {
                // JSON, regex and other whole-answer checks: the whole answer is the span.
                scores.fill(if passes { 1.0 } else { -1.0 });
                feedback = if passes {
                    "The answer has the requested form.".into()
                } else {
                    format!("The answer does not have the requested form ({kind}).")
                };
            }
        }
        let word_scores = words.iter().zip(scores).filter_map(|(w, s)| Some((clean_word(w)?, s))).collect();
        Ok(Critique { feedback, word_scores })
    }
}

impl Critic for RuleCritic {
    fn name(&self) -> String {
        "rule".into()
    }

    fn critique(&self, items: &[(&Text, &Map<String, Value>, &str)]) -> Result<Vec<Option<Critique>>> {
        items.iter().map(|(_, row, answer)| Ok(Some(self.critique_one(row, answer)?))).collect()
    }
}

/// A local model writing critiques (greedy), e.g. one trained on `candor critique` data.
pub struct LocalCritic {
    spec: String,
    model: LoadedModel,
}

impl Critic for LocalCritic {
    fn name(&self) -> String {
        self.spec.clone()
    }

    fn critique(&self, items: &[(&Text, &Map<String, Value>, &str)]) -> Result<Vec<Option<Critique>>> {
        let tok = SequenceTokenizer {
            tokenizer: &self.model.tokenizer,
            chat_template: self.model.chat_template.as_ref(),
            truncation: Truncation::default(),
        };
        let ids = items
            .iter()
            .map(|(prompt, _, answer)| {
                let request = critique_request(&super::llm::prompt_text(prompt), answer);
                tok.prompt_ids(&Text::Chat(vec![Message { role: "user".into(), content: request }]))
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = crate::generate::SamplingConfig { max_new_tokens: 256, ..Default::default() };
        let mut out = Vec::with_capacity(items.len());
        for chunk in ids.chunks(8) {
            for g in crate::generate::generate(
                &self.model.model,
                chunk,
                &self.model.eos_token_ids,
                self.model.tokenizer.pad_id(),
                &cfg,
                |_, _| {},
            )? {
                out.push(Critique::parse(&crate::generate::completion_text(&self.model.tokenizer, &g)?));
            }
        }
        Ok(out)
    }
}

/// An OpenAI-compatible server writing critiques.
pub struct RemoteCritic {
    spec: String,
    server: super::openai::OpenAiJudge,
}

impl Critic for RemoteCritic {
    fn name(&self) -> String {
        self.spec.clone()
    }

    fn critique(&self, items: &[(&Text, &Map<String, Value>, &str)]) -> Result<Vec<Option<Critique>>> {
        items
            .iter()
            .map(|(prompt, _, answer)| {
                let reply = self.server.chat(&critique_request(&super::llm::prompt_text(prompt), answer), 512);
                Ok(reply.ok().and_then(|content| Critique::parse(&content)))
            })
            .collect()
    }
}

/// Each answer token's span score: tokens (decoded one by one, trimmed) are matched greedily to
/// the critique's words as the official code does — up to 9 consecutive tokens joined must
/// equal the word (case-insensitive), trying 5 start positions before the word is skipped;
/// matched tokens take the word's score, except punctuation-only tokens (0); unmatched tokens 0.
pub fn token_scores(tokens: &[String], words: &[(String, f64)]) -> Vec<f64> {
    let n = tokens.len();
    let mut scores = vec![0.0; n];
    let mut tok = 0;
    for (word, score) in words {
        if tok >= n {
            break;
        }
        let target = word.to_lowercase();
        let mut found = None;
        'attempts: for start in tok..(tok + 5).min(n) {
            let mut joined = String::new();
            for (len, t) in tokens[start..n.min(start + 9)].iter().enumerate() {
                joined.push_str(&t.to_lowercase());
                if joined.len() > target.len() + 2 {
                    break;
                }
                if joined == target {
                    found = Some((start, len + 1));
                    break 'attempts;
                }
            }
        }
        if let Some((start, len)) = found {
            for (s, t) in scores[start..start + len].iter_mut().zip(&tokens[start..start + len]) {
                *s = if t.chars().any(char::is_alphanumeric) { *score } else { 0.0 };
            }
            tok = start + len;
        }
    }
    scores
}

/// The answer tokens as the matcher sees them: each decoded alone and trimmed.
pub fn decoded_tokens(tokenizer: &crate::load::TextTokenizer, ids: &[u32]) -> Result<Vec<String>> {
    ids.iter()
        .map(|&id| Ok(tokenizer.decode(&[id], false).context("cannot decode a token")?.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn replies_are_read_from_json_then_patterns() {
        let c = Critique::parse("Sure! {\"textual_feedback\": \"Good {start}.\", \"word_score_list\": [[\"The\", 0], [\"answer,\", 1], [\"!!\", 1], [\"x\", \"1\"]]} trailing").unwrap();
        assert_eq!(c.feedback, "Good {start}.");
        assert_eq!(c.word_scores, vec![("The".into(), 0.0), ("answer".into(), 1.0)]);
        let c = Critique::parse("scores: (\"Paris\", 1), (\"maybe\", -1)").unwrap();
        assert_eq!(c.word_scores, vec![("Paris".into(), 1.0), ("maybe".into(), -1.0)]);
        assert_eq!(Critique::parse("I think it is fine."), None);
        let back = Critique::parse(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn tokens_take_their_words_scores() {
        let tokens: Vec<String> =
            ["The", "ans", "wer", "is", "4", "4", "4", ".", "<|im_end|>"].iter().map(|s| s.to_string()).collect();
        let words = vec![
            ("answer".to_string(), -1.0),
            ("is".to_string(), 0.0),
            ("444".to_string(), 1.0),
            ("missing".to_string(), 1.0),
        ];
        assert_eq!(token_scores(&tokens, &words), vec![0.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        // Punctuation inside a matched word scores 0.
        let tokens: Vec<String> = ["3", ".", "5"].iter().map(|s| s.to_string()).collect();
        assert_eq!(token_scores(&tokens, &[("3.5".to_string(), 1.0)]), vec![1.0, 0.0, 1.0]);
    }

    #[test]
    fn the_rule_critic_marks_the_decisive_words() {
        let critic = RuleCritic { verifier: Verifier::new("auto").unwrap() };
        let c = critic.critique_one(&row(json!({"answer": "444"})), "It is 445.").unwrap();
        assert_eq!(c.word_scores, vec![("It".into(), 0.0), ("is".into(), 0.0), ("445".into(), -1.0)]);
        assert!(c.feedback.contains("wrong") && c.feedback.contains("444"));
        let c = critic.critique_one(&row(json!({"constraint": {"type": "uppercase"}})), "HELLO world").unwrap();
        assert_eq!(c.word_scores, vec![("HELLO".into(), 1.0), ("world".into(), -1.0)]);
        let c = critic
            .critique_one(&row(json!({"constraint": {"type": "max_words", "value": 2}})), "one two three")
            .unwrap();
        assert_eq!(c.word_scores.iter().map(|w| w.1).collect::<Vec<_>>(), vec![0.0, 0.0, -1.0]);
        let c = critic
            .critique_one(&row(json!({"constraint": {"type": "json_keys", "value": ["a"]}})), "{\"a\": 1}")
            .unwrap();
        assert!(c.word_scores.iter().all(|w| w.1 == 1.0));
    }
}
