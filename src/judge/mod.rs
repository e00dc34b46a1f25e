//! Judges: who decides which of two outputs is better. One trait, chosen by `--judge`:
//! `rm:MODEL` (a reward model), `verifier:NAME` (rule-based checks), `llm:MODEL` (a local model
//! asked pairwise), `openai:BASE_URL` (an OpenAI-compatible chat-completions server).
//!
//! Pairwise judges are asked in both orders (model first, then baseline first) and the two
//! verdicts averaged, which cancels a judge's position bias; pointwise judges score each output
//! on its own.

pub mod critic;
pub mod ifeval;
pub mod llm;
pub mod openai;
pub mod reward_model;
pub mod verifier;
pub mod weighted;

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::data::Text;

/// The judge's preference of one comparison, model against baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The model's output is preferred.
    Win,
    /// Neither is preferred.
    Tie,
    /// The baseline's output is preferred.
    Loss,
}

impl Outcome {
    /// 1 for a win, ½ for a tie, 0 for a loss.
    pub fn score(self) -> f64 {
        match self {
            Outcome::Win => 1.0,
            Outcome::Tie => 0.5,
            Outcome::Loss => 0.0,
        }
    }
}

/// One comparison: a prompt (with its row, for verifiers) and the two outputs.
#[derive(Debug, Clone, Copy)]
pub struct Case<'a> {
    /// The prompt as the models saw it.
    pub prompt: &'a Text,
    /// The dataset row (`answer`, `constraint`, `task`, ...).
    pub row: &'a Map<String, Value>,
    /// The evaluated model's output.
    pub model: &'a str,
    /// The baseline's output.
    pub baseline: &'a str,
}

/// Which of two outputs, in the order shown, a judge preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preference {
    /// The first output shown.
    First,
    /// The second output shown.
    Second,
    /// Neither.
    Tie,
    /// The reply could not be read (recorded, never guessed).
    Unparsed,
}

/// One question put to a pairwise judge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Asked {
    /// `model_first` or `baseline_first`.
    pub order: &'static str,
    /// What it preferred, in that order.
    pub preference: Preference,
    /// Its raw reply (or the two choice log-probs).
    pub raw: String,
}

/// A judge's decision on one [`Case`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgment {
    /// Win / tie / loss for the model; `None` when no reply could be read.
    pub outcome: Option<Outcome>,
    /// Pointwise scores `(model, baseline)`: rewards, or 1/0 for pass/fail.
    pub scores: Option<(f64, f64)>,
    /// Pairwise judges: each order asked.
    pub asked: Vec<Asked>,
}

/// Pointwise scores, each with its component judges' own scores (empty for a single judge).
pub type ScoredParts = Vec<(f64, Vec<f64>)>;

/// Decides between two outputs.
pub trait Judge: Send + Sync {
    /// The `--judge` value it was built from.
    fn name(&self) -> String;

    /// Judge every case (in order).
    fn judge(&self, cases: &[Case]) -> Result<Vec<Judgment>>;

    /// Pointwise scores of single outputs (`(prompt, row, output)`), for judges that have them
    /// (verifier: 1/0, reward model: the reward); `None` for pairwise-only judges.
    fn score(&self, _outputs: &[(&Text, &Map<String, Value>, &str)]) -> Result<Option<Vec<f64>>> {
        Ok(None)
    }

    /// The component judges' names of a weighted sum (`score_parts`' columns); empty otherwise.
    fn part_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Pointwise scores with each component judge's own score (weighted sums of judges); by
    /// default the score alone.
    fn score_parts(&self, outputs: &[(&Text, &Map<String, Value>, &str)]) -> Result<Option<ScoredParts>> {
        Ok(self.score(outputs)?.map(|scores| scores.into_iter().map(|s| (s, Vec::new())).collect()))
    }

    /// Remote judges: how many requests got no usable reply and why the first did (its HTTP
    /// status and the server's message, truncated, secrets redacted); `None` when none failed.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// `text` with the credentials of every URL in it hidden: `scheme://user:pass@` becomes
/// `scheme://user:***@`, and a bare `scheme://token@` becomes `scheme://***@`.
pub fn redact_url_credentials(text: &str) -> String {
    let re = regex::Regex::new(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@\s]*)@").expect("valid pattern");
    re.replace_all(text, |c: &regex::Captures| match c[2].split_once(':') {
        Some((user, _)) => format!("{}{user}:***@", &c[1]),
        None => format!("{}***@", &c[1]),
    })
    .into_owned()
}

/// Win / tie / loss from two pointwise scores: a tie within `tie_margin`.
pub fn compare_scores(model: f64, baseline: f64, tie_margin: f64) -> Outcome {
    if (model - baseline).abs() <= tie_margin {
        Outcome::Tie
    } else if model > baseline {
        Outcome::Win
    } else {
        Outcome::Loss
    }
}

/// The pointwise judges' pairwise verdicts: score both sides, compare.
fn judge_by_scores(judge: &dyn Judge, cases: &[Case], tie_margin: f64) -> Result<Vec<Judgment>> {
    let outputs: Vec<(&Text, &Map<String, Value>, &str)> =
        cases.iter().flat_map(|c| [(c.prompt, c.row, c.model), (c.prompt, c.row, c.baseline)]).collect();
    let scores = judge.score(&outputs)?.expect("a pointwise judge scores outputs");
    Ok(scores
        .chunks(2)
        .map(|s| Judgment {
            outcome: Some(compare_scores(s[0], s[1], tie_margin)),
            scores: Some((s[0], s[1])),
            asked: Vec::new(),
        })
        .collect())
}

/// Combine the two orders of a pairwise judge: each read as a preference for the model (1, ½,
/// 0) and averaged; unreadable replies are left out, and with none left the outcome is `None`.
pub fn combine_orders(model_first: Preference, baseline_first: Preference) -> Option<Outcome> {
    let as_model = |p: Preference, model_is_first: bool| match (p, model_is_first) {
        (Preference::First, true) | (Preference::Second, false) => Some(1.0),
        (Preference::Second, true) | (Preference::First, false) => Some(0.0),
        (Preference::Tie, _) => Some(0.5),
        (Preference::Unparsed, _) => None,
    };
    let votes: Vec<f64> =
        [as_model(model_first, true), as_model(baseline_first, false)].into_iter().flatten().collect();
    if votes.is_empty() {
        return None;
    }
    let mean = votes.iter().sum::<f64>() / votes.len() as f64;
    Some(if mean > 0.5 {
        Outcome::Win
    } else if mean < 0.5 {
        Outcome::Loss
    } else {
        Outcome::Tie
    })
}

/// Options every judge may use.
#[derive(Debug, Clone, Default)]
pub struct JudgeOptions {
    /// Reward models: rewards closer than this tie.
    pub tie_margin: f64,
    /// LLM judges: a prompt template file (minijinja, `{{ prompt }}`, `{{ first }}`, `{{ second }}`).
    pub template: Option<std::path::PathBuf>,
    /// `openai:` judges: the model name sent to the server.
    pub judge_model: Option<String>,
    /// `openai:` judges: where replies are cached.
    pub cache_dir: Option<std::path::PathBuf>,
    /// `openai:` judges: requests in flight at once.
    pub concurrency: usize,
    /// `openai:` judges: the timeout of one request (default 120 s).
    pub timeout: Option<std::time::Duration>,
}

/// Build the judge a `--judge` value names.
pub fn from_spec(spec: &str, opts: &JudgeOptions, load: &crate::load::LoadOptions) -> Result<Box<dyn Judge>> {
    // Errors show the spec with any URL credentials hidden.
    let shown = redact_url_credentials(spec);
    let terms = weighted::terms(spec)?;
    if terms.len() > 1 || terms[0].0 != 1.0 {
        return Ok(Box::new(weighted::WeightedJudge::new(&terms, opts, load)?));
    }
    let Some((kind, arg)) = spec.split_once(':') else {
        bail!("`--judge {shown}`: expected KIND:ARG with KIND one of rm, verifier, llm, openai (e.g. verifier:auto, rm:runs/reward/final)");
    };
    Ok(match kind {
        "verifier" => Box::new(verifier::VerifierJudge::new(arg)?),
        "rm" => Box::new(reward_model::RewardModelJudge::load(arg, opts.tie_margin, load)?),
        "llm" => Box::new(llm::LocalLlmJudge::load(arg, opts.template.as_deref(), load)?),
        "openai" => Box::new(openai::OpenAiJudge::new(arg, opts)?),
        other => bail!("`--judge {shown}`: unknown judge kind `{other}` (known: rm, verifier, llm, openai)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Preference::*;

    #[test]
    fn both_orders_cancel_position_bias() {
        // A judge that always prefers whatever it sees first: a tie every time.
        assert_eq!(combine_orders(First, First), Some(Outcome::Tie));
        assert_eq!(combine_orders(Second, Second), Some(Outcome::Tie));
        // Consistent verdicts stand; a tie and a win lean to the win.
        assert_eq!(combine_orders(First, Second), Some(Outcome::Win));
        assert_eq!(combine_orders(Second, First), Some(Outcome::Loss));
        assert_eq!(combine_orders(Tie, Second), Some(Outcome::Win));
        assert_eq!(combine_orders(Tie, Tie), Some(Outcome::Tie));
        // Unreadable replies are never guessed.
        assert_eq!(combine_orders(Unparsed, Unparsed), None);
        assert_eq!(combine_orders(Unparsed, First), Some(Outcome::Loss));
    }

    #[test]
    fn scores_tie_within_the_margin() {
        assert_eq!(compare_scores(1.0, 0.95, 0.1), Outcome::Tie);
        assert_eq!(compare_scores(1.0, 0.5, 0.1), Outcome::Win);
        assert_eq!(compare_scores(0.2, 0.5, 0.0), Outcome::Loss);
    }
}
