//! `rm:MODEL`: a reward model (candor's or any transformers `*ForSequenceClassification` with
//! one label) scores each output after its prompt; the higher reward wins, rewards within
//! `--tie-margin` tie.

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use super::{judge_by_scores, Case, Judge, Judgment};
use crate::data::{SequenceTokenizer, Text, Truncation};
use crate::load::{LoadedModel, Message};
use crate::scoring::score_rewards;

/// A reward model as a judge.
pub struct RewardModelJudge {
    spec: String,
    model: LoadedModel,
    tie_margin: f64,
}

impl RewardModelJudge {
    /// Load the reward model `spec`.
    pub fn load(spec: &str, tie_margin: f64, load: &crate::load::LoadOptions) -> Result<Self> {
        let model = load.load(spec)?;
        if model.model.config().num_labels != Some(1) {
            bail!("`rm:{spec}`: not a reward model (a one-label `*ForSequenceClassification` model; train one with `candor train --objective reward`)");
        }
        Ok(Self { spec: spec.to_string(), model, tie_margin })
    }
}

/// An output as the completion of `prompt`: an assistant message for chat prompts.
pub fn completion_of(prompt: &Text, output: &str) -> Text {
    match prompt {
        Text::Chat(_) => Text::Chat(vec![Message { role: "assistant".into(), content: output.to_string() }]),
        Text::Plain(_) => Text::Plain(output.to_string()),
    }
}

impl Judge for RewardModelJudge {
    fn name(&self) -> String {
        format!("rm:{}", self.spec)
    }

    fn judge(&self, cases: &[Case]) -> Result<Vec<Judgment>> {
        judge_by_scores(self, cases, self.tie_margin)
    }

    fn score(&self, outputs: &[(&Text, &Map<String, Value>, &str)]) -> Result<Option<Vec<f64>>> {
        let tok = SequenceTokenizer {
            tokenizer: &self.model.tokenizer,
            chat_template: self.model.chat_template.as_ref(),
            truncation: Truncation::default(),
        };
        let seqs = outputs
            .iter()
            .map(|(prompt, _, out)| tok.prompt_completion(prompt, &completion_of(prompt, out)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(score_rewards(&self.model.model, &seqs, self.model.tokenizer.pad_id(), 8)?))
    }
}
