//! `openai:BASE_URL` with `--judge-model NAME`: any OpenAI-compatible chat-completions server
//! (llama.cpp's or vLLM's server, or a hosted API) as a pairwise judge, asked in both orders.
//!
//! - `POST {BASE_URL}/chat/completions`, temperature 0, the key from `OPENAI_API_KEY` if set;
//! - at most `--judge-concurrency` requests in flight;
//! - 429, 5xx, timeouts and connection errors are retried with exponential backoff (honouring
//!   `Retry-After`), up to [`ATTEMPTS`] tries; what still fails is recorded as unparsed;
//! - replies are cached on disk under the SHA-256 of the request, so a rerun sends nothing;
//! - the verdict is the first standalone "A" or "B" in the reply; anything else (malformed
//!   JSON, a reply naming neither) is recorded as unparsed, never guessed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::llm::{prompt_text, JudgeTemplate};
use super::{combine_orders, Asked, Case, Judge, JudgeOptions, Judgment, Preference};

/// What one question to the server gives: the preference and the raw reply.
type Answer = Result<(Preference, String)>;

/// Tries per request before it is recorded as unparsed.
pub const ATTEMPTS: u32 = 5;

/// A chat-completions server as a judge.
pub struct OpenAiJudge {
    base_url: String,
    model: String,
    key: Option<String>,
    template: JudgeTemplate,
    cache_dir: PathBuf,
    concurrency: usize,
    agent: ureq::Agent,
    /// First backoff; doubles per retry.
    backoff: Duration,
}

impl OpenAiJudge {
    /// A judge for the server at `base_url` (e.g. `http://localhost:8080/v1`).
    pub fn new(base_url: &str, opts: &JudgeOptions) -> Result<Self> {
        let Some(model) = opts.judge_model.clone() else {
            bail!("`--judge openai:{base_url}` needs `--judge-model NAME` (the model the server should use)");
        };
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            bail!("`--judge openai:{base_url}`: expected an http(s) base URL such as http://localhost:8080/v1");
        }
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            model,
            key: std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()),
            template: JudgeTemplate::load(opts.template.as_deref())?,
            cache_dir: opts
                .cache_dir
                .clone()
                .unwrap_or_else(|| crate::load::default_model::cache_dir().join("judgments")),
            concurrency: opts.concurrency.max(1),
            agent: ureq::AgentBuilder::new().timeout(opts.timeout.unwrap_or(Duration::from_secs(120))).build(),
            backoff: Duration::from_millis(500),
        })
    }

    /// The same judge with a shorter first backoff (tests).
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The reply text to one request body: from the cache, else from the server (retrying);
    /// `Err` carries what to record when no usable HTTP reply came.
    fn reply(&self, body: &Value) -> std::result::Result<String, String> {
        let text = body.to_string();
        let key = format!("{:x}", Sha256::digest(format!("{}\n{text}", self.base_url).as_bytes()));
        let cached = self.cache_dir.join(format!("{key}.json"));
        if let Ok(hit) = std::fs::read_to_string(&cached) {
            return Ok(hit);
        }
        let url = format!("{}/chat/completions", self.base_url);
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let mut req = self.agent.post(&url).set("Content-Type", "application/json");
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            match req.send_string(&text) {
                Ok(resp) => {
                    let reply = resp.into_string().map_err(|e| format!("cannot read the reply: {e}"))?;
                    // Only well-formed replies are cached; a malformed one may be transient.
                    if serde_json::from_str::<Value>(&reply).is_ok() {
                        let _ = std::fs::create_dir_all(&self.cache_dir);
                        let tmp = cached.with_extension("partial");
                        if std::fs::write(&tmp, &reply).is_ok() {
                            let _ = std::fs::rename(&tmp, &cached);
                        }
                    }
                    return Ok(reply);
                }
                Err(ureq::Error::Status(code, resp)) if code == 429 || code >= 500 => {
                    let retry_after = resp.header("Retry-After").and_then(|v| v.trim().parse::<f64>().ok());
                    last = format!("HTTP {code} after {attempt} attempt(s)");
                    if attempt < ATTEMPTS {
                        std::thread::sleep(
                            retry_after.map(Duration::from_secs_f64).unwrap_or(wait).min(Duration::from_secs(60)),
                        );
                    }
                }
                Err(ureq::Error::Status(code, resp)) => {
                    return Err(format!("HTTP {code}: {}", resp.into_string().unwrap_or_default()))
                }
                Err(ureq::Error::Transport(t)) => {
                    last = format!("{t} after {attempt} attempt(s)");
                    if attempt < ATTEMPTS {
                        std::thread::sleep(wait);
                    }
                }
            }
            wait *= 2;
        }
        Err(last)
    }

    /// One user message, answered greedily: the reply's content, or what to record when none
    /// came (no usable HTTP reply, or a reply without content).
    pub fn chat(&self, content: &str, max_tokens: usize) -> std::result::Result<String, String> {
        let body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": max_tokens,
        });
        let reply = self.reply(&body)?;
        serde_json::from_str::<Value>(&reply)
            .ok()
            .and_then(|v| v["choices"][0]["message"]["content"].as_str().map(str::to_string))
            .ok_or(reply)
    }

    /// Ask once; the reply's content read as a verdict.
    fn ask(&self, prompt: &str, first: &str, second: &str) -> Result<(Preference, String)> {
        Ok(match self.chat(&self.template.render(prompt, first, second)?, 16) {
            Ok(content) => (parse_verdict(&content), content),
            Err(why) => (Preference::Unparsed, why),
        })
    }
}

/// The first standalone `A` or `B` in a reply ("A", "Answer B", "**B**."); otherwise unparsed.
pub fn parse_verdict(content: &str) -> Preference {
    let re = regex::Regex::new(r"\b([AB])\b").expect("valid pattern");
    match re.captures(content).map(|c| c.get(1).expect("group").as_str().to_string()) {
        Some(x) if x == "A" => Preference::First,
        Some(_) => Preference::Second,
        None => Preference::Unparsed,
    }
}

impl Judge for OpenAiJudge {
    fn name(&self) -> String {
        format!("openai:{} ({})", self.base_url, self.model)
    }

    fn judge(&self, cases: &[Case]) -> Result<Vec<Judgment>> {
        // Every question (two per case), answered by `concurrency` workers.
        let questions: Vec<(usize, bool)> = (0..cases.len()).flat_map(|i| [(i, true), (i, false)]).collect();
        let answers: Vec<std::sync::Mutex<Option<Answer>>> =
            questions.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..self.concurrency.min(questions.len()) {
                scope.spawn(|| loop {
                    let q = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(i, model_first)) = questions.get(q) else { break };
                    let c = &cases[i];
                    let prompt = prompt_text(c.prompt);
                    let (first, second) = if model_first { (c.model, c.baseline) } else { (c.baseline, c.model) };
                    *answers[q].lock().expect("answer slot") = Some(self.ask(&prompt, first, second));
                });
            }
        });
        let mut answers =
            answers.into_iter().map(|m| m.into_inner().expect("answer slot").expect("every question answered"));
        let mut out = Vec::with_capacity(cases.len());
        for _ in cases {
            let (p1, raw1) = answers.next().expect("model-first answer")?;
            let (p2, raw2) = answers.next().expect("baseline-first answer")?;
            out.push(Judgment {
                outcome: combine_orders(p1, p2),
                scores: None,
                asked: vec![
                    Asked { order: "model_first", preference: p1, raw: raw1 },
                    Asked { order: "baseline_first", preference: p2, raw: raw2 },
                ],
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_strictly() {
        assert_eq!(parse_verdict("A"), Preference::First);
        assert_eq!(parse_verdict("**B**."), Preference::Second);
        assert_eq!(parse_verdict("Answer B is better"), Preference::Second);
        assert_eq!(parse_verdict("Both are fine."), Preference::Unparsed);
        assert_eq!(parse_verdict("ABBA"), Preference::Unparsed);
    }
}
