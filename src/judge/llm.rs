//! `llm:MODEL`: a local causal LM as a pairwise judge. The prompt template (minijinja:
//! `{{ prompt }}`, `{{ first }}`, `{{ second }}`; `--judge-template FILE`, default below) is
//! sent as a user message through the judge's chat template, and the verdict read from the
//! log-probabilities of the two choice tokens ("A" and "B") at the answer position: no sampling,
//! no parsing of free text. Asked in both orders.

use std::path::Path;

use anyhow::{Context, Result};
use candle::Tensor;

use super::{combine_orders, Asked, Case, Judge, Judgment, Preference};
use crate::data::{SequenceTokenizer, Text, Truncation};
use crate::load::{LoadedModel, Message};
use crate::model::ForwardOptions;

/// The default pairwise prompt.
pub const DEFAULT_TEMPLATE: &str = "Two assistants answered the same request. Decide which answer is better: correct, \
following every instruction in the request, and concise.\n\nRequest:\n{{ prompt }}\n\nAnswer A:\n{{ first }}\n\n\
Answer B:\n{{ second }}\n\nWhich answer is better? Reply with one letter, A or B.";

/// A prompt template with `prompt`, `first` and `second`.
pub struct JudgeTemplate {
    env: minijinja::Environment<'static>,
}

impl JudgeTemplate {
    /// The template in `path`, or [`DEFAULT_TEMPLATE`].
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let source = match path {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("cannot read judge template `{}`", p.display()))?
            }
            None => DEFAULT_TEMPLATE.to_string(),
        };
        let mut env = minijinja::Environment::new();
        env.add_template_owned("judge", source).context("invalid judge template")?;
        Ok(Self { env })
    }

    /// The question for one ordering.
    pub fn render(&self, prompt: &str, first: &str, second: &str) -> Result<String> {
        let t = self.env.get_template("judge").expect("added in load");
        Ok(t.render(minijinja::context! { prompt => prompt, first => first, second => second })?)
    }
}

/// The text of a prompt for a judge: the string, or the conversation's turns.
pub fn prompt_text(prompt: &Text) -> String {
    match prompt {
        Text::Plain(p) => p.clone(),
        Text::Chat(messages) => messages
            .iter()
            .map(|m| if messages.len() == 1 { m.content.clone() } else { format!("{}: {}", m.role, m.content) })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// A local model judging pairs from its choice-token log-probs.
pub struct LocalLlmJudge {
    spec: String,
    model: LoadedModel,
    template: JudgeTemplate,
    choices: [u32; 2],
}

impl LocalLlmJudge {
    /// Load the judge model `spec` and the template.
    pub fn load(spec: &str, template: Option<&Path>, load: &crate::load::LoadOptions) -> Result<Self> {
        let model = load.load(spec)?;
        let first_token = |s: &str| -> Result<u32> {
            model
                .tokenizer
                .encode(s, false)?
                .first()
                .copied()
                .context("the judge's tokenizer gives no token for a choice letter")
        };
        let choices = [first_token("A")?, first_token("B")?];
        Ok(Self { spec: spec.to_string(), template: JudgeTemplate::load(template)?, model, choices })
    }

    /// Ask once: which of `first`, `second` is better, with the two log-probs as the raw reply.
    fn ask(&self, prompt: &str, first: &str, second: &str) -> Result<(Preference, String)> {
        let question = self.template.render(prompt, first, second)?;
        let tok = SequenceTokenizer {
            tokenizer: &self.model.tokenizer,
            chat_template: self.model.chat_template.as_ref(),
            truncation: Truncation::default(),
        };
        let text = match self.model.chat_template {
            Some(_) => Text::Chat(vec![Message { role: "user".into(), content: question }]),
            None => Text::Plain(format!("{question}\nAnswer:")),
        };
        let ids = tok.prompt_ids(&text)?;
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), self.model.model.device())?;
        let hidden = self.model.model.forward_hidden(&input, ForwardOptions::default(), None)?;
        let logits = self.model.model.lm_logits(&hidden.narrow(1, n - 1, 1)?)?.flatten_all()?;
        let logps: Vec<f32> = candor_alignment::tensor_ops::log_softmax(&logits)?.to_vec1()?;
        let (a, b) = (logps[self.choices[0] as usize], logps[self.choices[1] as usize]);
        let preference = if a > b {
            Preference::First
        } else if b > a {
            Preference::Second
        } else {
            Preference::Tie
        };
        Ok((preference, format!("logp(A)={a:.4} logp(B)={b:.4}")))
    }
}

impl Judge for LocalLlmJudge {
    fn name(&self) -> String {
        format!("llm:{}", self.spec)
    }

    fn judge(&self, cases: &[Case]) -> Result<Vec<Judgment>> {
        cases
            .iter()
            .map(|c| {
                let prompt = prompt_text(c.prompt);
                let (p1, raw1) = self.ask(&prompt, c.model, c.baseline)?;
                let (p2, raw2) = self.ask(&prompt, c.baseline, c.model)?;
                Ok(Judgment {
                    outcome: combine_orders(p1, p2),
                    scores: None,
                    asked: vec![
                        Asked { order: "model_first", preference: p1, raw: raw1 },
                        Asked { order: "baseline_first", preference: p2, raw: raw2 },
                    ],
                })
            })
            .collect()
    }
}
