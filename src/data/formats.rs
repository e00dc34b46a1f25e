//! TRL's dataset formats, read from JSONL with errors that name the file, the line and the field.
//!
//! | kind              | columns                                  |
//! |-------------------|------------------------------------------|
//! | preference        | `prompt`, `chosen`, `rejected` (or implicit prompt: `chosen`, `rejected`) |
//! | prompt-completion | `prompt`, `completion`                   |
//! | unpaired          | `prompt`, `completion`, `label` (bool)   |
//! | conversation      | `messages`                               |
//! | language modeling | `text`                                   |
//! | prompt only       | `prompt`                                 |
//!
//! Each text column is either standard (a string) or conversational (a list of
//! `{"role", "content"}` messages); one row may not mix the two.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::load::Message;

/// A column's value: plain text or a list of chat messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    /// Standard format: a string.
    Plain(String),
    /// Conversational format: messages rendered through the chat template.
    Chat(Vec<Message>),
}

impl Text {
    fn is_chat(&self) -> bool {
        matches!(self, Text::Chat(_))
    }
}

/// One dataset row, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// A preferred and a dispreferred completion of one prompt.
    Preference {
        /// The shared prompt.
        prompt: Text,
        /// The preferred completion.
        chosen: Text,
        /// The dispreferred completion.
        rejected: Text,
    },
    /// A prompt and its completion.
    PromptCompletion {
        /// The prompt.
        prompt: Text,
        /// The completion.
        completion: Text,
    },
    /// A single completion labelled desirable (`true`) or not.
    Unpaired {
        /// The prompt.
        prompt: Text,
        /// The completion.
        completion: Text,
        /// Whether the completion is desirable.
        label: bool,
    },
    /// A whole conversation.
    Conversation {
        /// The messages, in order.
        messages: Vec<Message>,
    },
    /// Plain text for language modeling.
    LanguageModeling {
        /// The text.
        text: String,
    },
    /// A prompt alone (generation, on-policy sampling).
    Prompt {
        /// The prompt.
        prompt: Text,
    },
}

impl Example {
    /// The row kind's name, as used in error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Example::Preference { .. } => "preference",
            Example::PromptCompletion { .. } => "prompt-completion",
            Example::Unpaired { .. } => "unpaired",
            Example::Conversation { .. } => "conversation",
            Example::LanguageModeling { .. } => "language-modeling",
            Example::Prompt { .. } => "prompt-only",
        }
    }
}

/// A parsed row with its origin and any extra columns (carried through to outputs).
#[derive(Debug, Clone)]
pub struct Row {
    /// 1-based line number in the file.
    pub line: usize,
    /// The example.
    pub example: Example,
    /// All columns of the original JSON object.
    pub fields: Map<String, Value>,
}

/// A bad row: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {}{message}", file.display(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct DataError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// The offending column, when one is to blame.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// The rows of a file and the bad rows that were skipped.
#[derive(Debug)]
pub struct Dataset {
    /// Good rows in file order.
    pub rows: Vec<Row>,
    /// Errors of skipped rows (empty unless skipping was asked for).
    pub skipped: Vec<DataError>,
}

/// Read a JSONL dataset. Blank lines are ignored, and so is a UTF-8 byte-order mark at the start
/// of the file and a `\r` before each line end. With `skip_bad_rows`, bad rows (including lines
/// that are not UTF-8) are collected in [`Dataset::skipped`]; without it, the first bad row is
/// the error.
pub fn read_jsonl(path: &Path, skip_bad_rows: bool) -> Result<Dataset, DataError> {
    let err = |line: usize, field: Option<&str>, message: String| DataError {
        file: path.to_path_buf(),
        line,
        field: field.map(str::to_string),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| err(0, None, format!("cannot open: {e}")))?;
    let mut reader = std::io::BufReader::new(file);
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut bytes = Vec::new();
    let mut line_no = 0;
    loop {
        bytes.clear();
        let n =
            reader.read_until(b'\n', &mut bytes).map_err(|e| err(line_no + 1, None, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let mut line: &[u8] = &bytes;
        if line_no == 1 {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        line = line.strip_suffix(b"\n").unwrap_or(line);
        line = line.strip_suffix(b"\r").unwrap_or(line);
        let parsed = match std::str::from_utf8(line) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => parse_row(text),
            Err(e) => Err((None, format!("not UTF-8 text (invalid byte at column {})", e.valid_up_to() + 1))),
        };
        match parsed.map_err(|(field, message)| err(line_no, field, message)) {
            Ok((example, fields)) => rows.push(Row { line: line_no, example, fields }),
            Err(e) if skip_bad_rows => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if rows.is_empty() && skipped.is_empty() {
        return Err(err(0, None, "the file has no rows".into()));
    }
    Ok(Dataset { rows, skipped })
}

type FieldError = (Option<&'static str>, String);

fn parse_row(text: &str) -> Result<(Example, Map<String, Value>), FieldError> {
    let value: Value = serde_json::from_str(text).map_err(|e| (None, format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err((None, "expected a JSON object".into()));
    };
    let text_field = |name: &'static str| -> Result<Option<Text>, FieldError> {
        obj.get(name).map(|v| parse_text(v).map_err(|m| (Some(name), m))).transpose()
    };
    let prompt = text_field("prompt")?;
    let chosen = text_field("chosen")?;
    let rejected = text_field("rejected")?;
    let completion = text_field("completion")?;
    let example = if chosen.is_some() || rejected.is_some() {
        let chosen = chosen.ok_or((Some("chosen"), "missing (the row has `rejected`)".to_string()))?;
        let rejected = rejected.ok_or((Some("rejected"), "missing (the row has `chosen`)".to_string()))?;
        let (prompt, chosen, rejected) = match prompt {
            Some(p) => (p, chosen, rejected),
            None => extract_prompt(chosen, rejected)?,
        };
        same_form(&prompt, &[("chosen", &chosen), ("rejected", &rejected)])?;
        Example::Preference { prompt, chosen, rejected }
    } else if let Some(completion) = completion {
        let prompt = prompt.ok_or((Some("prompt"), "missing (the row has `completion`)".to_string()))?;
        same_form(&prompt, &[("completion", &completion)])?;
        match obj.get("label") {
            None => Example::PromptCompletion { prompt, completion },
            Some(Value::Bool(label)) => Example::Unpaired { prompt, completion, label: *label },
            Some(other) => return Err((Some("label"), format!("expected true or false, got {other}"))),
        }
    } else if let Some(messages) = obj.get("messages") {
        match parse_text(messages).map_err(|m| (Some("messages"), m))? {
            Text::Chat(messages) if !messages.iter().any(|m| m.role == "assistant") => {
                let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
                let roles = if roles.is_empty() { "none".to_string() } else { roles.join(", ") };
                return Err((
                    Some("messages"),
                    format!("the conversation has no `assistant` turn to learn from or score (its roles: {roles})"),
                ));
            }
            Text::Chat(messages) => Example::Conversation { messages },
            Text::Plain(_) => return Err((Some("messages"), "expected a list of {role, content} messages".into())),
        }
    } else if let Some(text) = obj.get("text") {
        match text {
            Value::String(text) => Example::LanguageModeling { text: text.clone() },
            _ => return Err((Some("text"), "expected a string".into())),
        }
    } else if let Some(prompt) = prompt {
        Example::Prompt { prompt }
    } else {
        return Err((
            None,
            "no known columns: expected `prompt`/`chosen`/`rejected`, `chosen`/`rejected`, \
             `prompt`/`completion` (+ `label`), `messages`, `text` or `prompt`"
                .into(),
        ));
    };
    Ok((example, obj))
}

fn parse_text(v: &Value) -> Result<Text, String> {
    match v {
        Value::String(s) => Ok(Text::Plain(s.clone())),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = m.get("role").and_then(Value::as_str);
                let content = m.get("content").and_then(Value::as_str);
                match (role, content) {
                    (Some(role), Some(_)) if !ROLES.contains(&role) => Err(unknown_role(i, role)),
                    (Some(role), Some(content)) => Ok(Message { role: role.into(), content: content.into() }),
                    _ => Err(format!("message {i} must be an object with string `role` and `content`, got {m}")),
                }
            })
            .collect::<Result<_, _>>()
            .map(Text::Chat),
        other => Err(format!("expected a string or a list of messages, got {}", json_kind(other))),
    }
}

/// The message roles chat templates know.
const ROLES: [&str; 7] = ["system", "developer", "user", "assistant", "tool", "function", "ipython"];

fn unknown_role(i: usize, role: &str) -> String {
    let lower = role.trim().to_lowercase();
    let hint = if ROLES.contains(&lower.as_str()) {
        format!(" (did you mean `{lower}`? roles are lower case)")
    } else {
        String::new()
    };
    format!("message {i} has the unknown role `{role}`{hint}; expected one of {}", ROLES.join(", "))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn same_form(prompt: &Text, others: &[(&'static str, &Text)]) -> Result<(), FieldError> {
    for (name, t) in others {
        if t.is_chat() != prompt.is_chat() {
            let form = |c: bool| {
                if c {
                    "conversational (a list of messages)"
                } else {
                    "standard (a string)"
                }
            };
            return Err((Some(name), format!("is {} but `prompt` is {}", form(t.is_chat()), form(prompt.is_chat()))));
        }
    }
    Ok(())
}

/// TRL's `extract_prompt`: the longest common prefix of chosen and rejected is the prompt
/// (for strings, backing off one character when the split lands right after a space's
/// position, so the completions keep their leading space; for conversations, whole messages).
fn extract_prompt(chosen: Text, rejected: Text) -> Result<(Text, Text, Text), FieldError> {
    match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let mut idx = cc.iter().zip(&rc).take_while(|(a, b)| a == b).count();
            if idx < cc.len().min(rc.len()) && idx > 0 && cc[idx - 1] == ' ' {
                idx -= 1;
            }
            let split = |s: &[char]| (s[..idx].iter().collect::<String>(), s[idx..].iter().collect::<String>());
            let (p, c) = split(&cc);
            let (_, r) = split(&rc);
            Ok((Text::Plain(p), Text::Plain(c), Text::Plain(r)))
        }
        (Text::Chat(c), Text::Chat(r)) => {
            let idx = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if idx == 0 {
                return Err((
                    Some("chosen"),
                    "implicit prompt: `chosen` and `rejected` share no leading message".into(),
                ));
            }
            Ok((Text::Chat(c[..idx].to_vec()), Text::Chat(c[idx..].to_vec()), Text::Chat(r[idx..].to_vec())))
        }
        _ => Err((Some("rejected"), "`chosen` and `rejected` must both be strings or both be message lists".into())),
    }
}
