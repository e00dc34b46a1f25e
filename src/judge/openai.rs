//! `openai:BASE_URL` with `--judge-model NAME`: any OpenAI-compatible chat-completions server
//! (llama.cpp's or vLLM's server, or a hosted API) as a pairwise judge, asked in both orders.
//!
//! - `POST {BASE_URL}/chat/completions`, temperature 0, the key from `OPENAI_API_KEY` if set;
//! - at most `--judge-concurrency` requests in flight;
//! - 429, 5xx, timeouts and connection errors are retried with exponential backoff (honouring
//!   `Retry-After`), up to [`ATTEMPTS`] tries; what still fails is recorded as unparsed;
//! - replies are cached on disk under the SHA-256 of the request, so a rerun sends nothing;
//! - the verdict is the first standalone "A" or "B" in the reply; anything else (malformed
//!   JSON, a reply naming neither) is recorded as unparsed, never guessed;
//! - a request that gets no usable reply is recorded as unparsed with its status only (never
//!   the server's body); the first failure's status and server message (truncated) are kept
//!   for the error report ([`Judge::failure`]);
//! - the API key, `Authorization` values and credentials in the URL are redacted from
//!   everything the judge returns, caches, names or reports.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::llm::{prompt_text, JudgeTemplate};
use super::{combine_orders, redact_url_credentials, Asked, Case, Judge, JudgeOptions, Judgment, Preference};

/// What one question to the server gives: the preference and the raw reply.
type Answer = Result<(Preference, String)>;

/// Tries per request before it is recorded as unparsed.
pub const ATTEMPTS: u32 = 5;

/// Most characters of a server's error message kept in a report.
pub const MESSAGE_CHARS: usize = 200;

/// Most bytes of an error body read from the server.
const ERROR_BODY_BYTES: u64 = 64 * 1024;

/// Why one request got no usable reply.
struct Failure {
    /// What the annotations record: the status or connection error, never the server's body.
    record: String,
    /// What the error report says: also the server's message, truncated (secrets redacted).
    report: String,
}

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
    /// Requests that got no usable reply, and the first one's report.
    failures: Mutex<(usize, Option<String>)>,
}

impl OpenAiJudge {
    /// A judge for the server at `base_url` (e.g. `http://localhost:8080/v1`).
    pub fn new(base_url: &str, opts: &JudgeOptions) -> Result<Self> {
        let shown = redact_url_credentials(base_url);
        let Some(model) = opts.judge_model.clone() else {
            bail!("`--judge openai:{shown}` needs `--judge-model NAME` (the model the server should use)");
        };
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            bail!("`--judge openai:{shown}`: expected an http(s) base URL such as http://localhost:8080/v1");
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
            failures: Mutex::new((0, None)),
        })
    }

    /// The same judge with a shorter first backoff (tests).
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// `text` with the API key and URL credentials replaced by `***`: whatever a server echoes
    /// never reaches a file or a terminal.
    pub fn redact(&self, text: &str) -> String {
        redact_secrets(text, self.key.as_deref())
    }

    /// [`Self::redact`], and also `Authorization` values (`Bearer ...`, `Basic ...`): for error
    /// bodies and connection errors, never for a judge's reply.
    fn redact_report(&self, text: &str) -> String {
        let auth = regex::Regex::new(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+").expect("valid pattern");
        auth.replace_all(&self.redact(text), "$1$2***").into_owned()
    }

    /// The reply text to one request body: from the cache, else from the server (retrying);
    /// `Err` carries what to record when no usable HTTP reply came (never the server's body).
    fn reply(&self, body: &Value) -> std::result::Result<String, String> {
        self.fetch(body).map_err(|f| {
            let mut failures = self.failures.lock().expect("failure record");
            failures.0 += 1;
            failures.1.get_or_insert(f.report);
            f.record
        })
    }

    fn fetch(&self, body: &Value) -> std::result::Result<String, Failure> {
        let text = body.to_string();
        let key = format!("{:x}", Sha256::digest(format!("{}\n{text}", self.base_url).as_bytes()));
        let cached = self.cache_dir.join(format!("{key}.json"));
        if let Ok(hit) = std::fs::read_to_string(&cached) {
            return Ok(hit);
        }
        let url = format!("{}/chat/completions", self.base_url);
        let mut wait = self.backoff;
        let mut last = Failure { record: String::new(), report: String::new() };
        for attempt in 1..=ATTEMPTS {
            let mut req = self.agent.post(&url).set("Content-Type", "application/json");
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            match req.send_string(&text) {
                Ok(resp) => {
                    let reply = resp.into_string().map_err(|e| {
                        let why = self.redact_report(&format!("cannot read the reply: {e}"));
                        Failure { record: why.clone(), report: why }
                    })?;
                    let reply = self.redact(&reply);
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
                    last = self.status_failure(code, resp, &format!(" after {attempt} attempt(s)"));
                    if attempt < ATTEMPTS {
                        std::thread::sleep(
                            retry_after.map(Duration::from_secs_f64).unwrap_or(wait).min(Duration::from_secs(60)),
                        );
                    }
                }
                Err(ureq::Error::Status(code, resp)) => return Err(self.status_failure(code, resp, " (not retried)")),
                Err(ureq::Error::Transport(t)) => {
                    let why = self.redact_report(&format!("{t} after {attempt} attempt(s)"));
                    last = Failure { record: why.clone(), report: why };
                    if attempt < ATTEMPTS {
                        std::thread::sleep(wait);
                    }
                }
            }
            wait *= 2;
        }
        Err(last)
    }

    /// An HTTP error status: the record names the status; the report adds the server's message.
    fn status_failure(&self, code: u16, resp: ureq::Response, tail: &str) -> Failure {
        let status = format!("HTTP {code} {}", resp.status_text()).trim_end().to_string();
        let mut body = String::new();
        let _ = resp.into_reader().take(ERROR_BODY_BYTES).read_to_string(&mut body);
        let message = server_message(&self.redact_report(&body));
        let report = if message.is_empty() { format!("{status}{tail}") } else { format!("{status}{tail}: {message}") };
        Failure { record: format!("HTTP {code}{tail}"), report }
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
            .and_then(|v| v["choices"][0]["message"]["content"].as_str().map(|c| self.redact(c)))
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

/// The message of an error body: OpenAI's `{"error": {"message": ...}}` (or a top-level
/// `message`, `detail` or string `error`), else the text itself; on one line, cut to
/// [`MESSAGE_CHARS`] characters.
pub fn server_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        [&v["error"]["message"], &v["message"], &v["detail"], &v["error"]]
            .into_iter()
            .find_map(|m| m.as_str().map(str::to_string))
    });
    let text = match (from_json, &parsed) {
        (Some(m), _) => m,
        (None, Some(Value::Object(o))) if o.is_empty() => String::new(),
        _ => body.to_string(),
    };
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &one_line[..cut]),
        None => one_line,
    }
}

/// `text` with `key` (when set) and URL credentials replaced by `***`.
pub fn redact_secrets(text: &str, key: Option<&str>) -> String {
    let out = redact_url_credentials(text);
    match key.filter(|k| !k.is_empty()) {
        Some(k) => out.replace(k, "***"),
        None => out,
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
        format!("openai:{} ({})", redact_url_credentials(&self.base_url), self.model)
    }

    fn failure(&self) -> Option<String> {
        let failures = self.failures.lock().expect("failure record");
        failures.1.as_ref().map(|first| format!("{} request(s) to the server failed; the first: {first}", failures.0))
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
                    let Some(&(i, model_first)) = questions.get(q) else {
                        break;
                    };
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

    #[test]
    fn error_bodies_are_cut_to_their_message_and_secrets_are_redacted() {
        assert_eq!(
            server_message(r#"{"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}"#),
            "Incorrect API key"
        );
        assert_eq!(server_message(r#"{"detail": "Not Found"}"#), "Not Found");
        assert_eq!(server_message("{}"), "");
        assert_eq!(server_message("<html>\n  bad gateway\n</html>"), "<html> bad gateway </html>");
        let long = server_message(&"é".repeat(500));
        assert_eq!(long.chars().count(), MESSAGE_CHARS + 3);
        let text = "key sk-abc123456 at http://me:pw@h:1/v1 and https://tok@h/v1";
        assert_eq!(redact_secrets(text, Some("sk-abc123456")), "key *** at http://me:***@h:1/v1 and https://***@h/v1");
        assert_eq!(redact_secrets("nothing secret", None), "nothing secret");
    }
}
