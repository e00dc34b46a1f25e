//! Chain of Hindsight: preference pairs rendered as feedback-conditioned text, trained with the
//! language-modelling loss on the answer tokens only.
//!
//! Liu, Sferrazza, Abbeel, "Chain of Hindsight Aligns Language Models with Feedback",
//! arXiv 2302.02676 (ICLR 2024). Official code forhaoliu/chain-of-hindsight:
//! `coh/data/templates.py` (the templates below are its `webgpt_template`, both members of each
//! pair, so both orders occur) and `coh/data/hf_data.py` (a template is drawn per example; the
//! pieces are tokenized separately; loss on `{pos}`, `{neg}`, the verdict phrase "the first
//! one." / "the second one." and the appended EOS, never on the prompt or the feedback words).
//! Random masking of past tokens (the paper's 0–5 %, not in the released data pipeline) hides a
//! fraction `p ~ U(0, mask_past_max)` of the earlier answer's tokens from every later position.
//!
//! ```text
//! L = − Σ m_t log π(tok_t | tok_<t) / Σ m_t        (token mean over the step, as SFT)
//! ```

use candle::DType;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{invalid, sft, ObjectiveOutput, SequenceLogps, StepScale};
use crate::Result;

/// Chain-of-hindsight settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HindsightConfig {
    /// Templates with `{pos}`, `{neg}`, and optionally a final `{1st}` / `{2nd}` verdict; one
    /// is drawn per example. Unpaired rows use those with only `{pos}` (label true) or only
    /// `{neg}` (label false).
    #[serde(default = "default_templates")]
    pub templates: Vec<String>,
    /// Largest fraction of the earlier answer's tokens hidden from later positions.
    #[serde(default = "default_mask_past_max")]
    pub mask_past_max: f64,
    /// The feedback phrase to condition on at inference (`candor generate --hindsight-prefix`).
    #[serde(default = "default_positive_prefix")]
    pub positive_prefix: String,
}

fn default_mask_past_max() -> f64 {
    0.05
}

fn default_positive_prefix() -> String {
    "a good answer is ".into()
}

/// `webgpt_template` of the official code, flattened.
fn default_templates() -> Vec<String> {
    [
        "a good answer is {pos}",
        "a bad answer is {neg}",
        "the following is a good answer {pos}",
        "the following is a bad answer {neg}",
        "generate a good answer: {pos}",
        "generate a bad answer: {neg}",
        "good answer: {pos}",
        "bad answer: {neg}",
        "good: {pos}",
        "bad: {neg}",
        "good response: {pos}",
        "bad response: {neg}",
        "a good answer is given by {pos}",
        "a bad answer is given by {neg}",
        "a less preferred answer is {neg}, a more preferred answer is {pos}",
        "a more preferred answer is {pos}, a less preferred answer is {neg}",
        "a not so good answer is {neg}, a better answer is {pos}",
        "a good answer is {pos}, a worse answer is {neg}",
        "an answer is {neg}, a better answer is {pos}",
        "an answer is {pos}, a worse answer is {neg}",
        "the following is not the best answer {neg}, a better answer can be {pos}",
        "the following is a good answer {pos}, a worse answer can be {neg}",
        "a less preferred response is {neg}, a more preferred response is {pos}",
        "a more preferred response is {pos}, a less preferred response is {neg}",
        "a not so good response is {neg}, a better response is {pos}",
        "a good response is {pos}, a worse response is {neg}",
        "an response is {neg}, a better response is {pos}",
        "an response is {pos}, a worse response is {neg}",
        "the following is not the best response {neg}, a better response can be {pos}",
        "the following is a good response {pos}, a worse response can be {neg}",
        "For the following two answers {pos} and {neg}, which one is better? The answer is {1st}",
        "For the following two answers {neg} and {pos}, which one is better? The answer is {2nd}",
        "{pos} and {neg} are two answers, let's think about which one is better? The answer is {1st}",
        "{neg} and {pos} are two answers, let's think about which one is better? The answer is {2nd}",
        "For the following two answers {pos} and {neg}, which one is worse? The answer is {2nd}",
        "For the following two answers {neg} and {pos}, which one is worse? The answer is {1st}",
        "{pos} and {neg} are two answers, let's think about which one is worse? The answer is {2nd}",
        "{neg} and {pos} are two answers, let's think about which one is worse? The answer is {1st}",
    ]
    .map(String::from)
    .to_vec()
}

impl Default for HindsightConfig {
    fn default() -> Self {
        Self {
            templates: default_templates(),
            mask_past_max: default_mask_past_max(),
            positive_prefix: default_positive_prefix(),
        }
    }
}

impl HindsightConfig {
    /// Reject templates that could not be rendered and out-of-range masking.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.mask_past_max) {
            return Err(invalid("hindsight", "mask_past_max", "must be in [0, 1]"));
        }
        if self.templates.is_empty() {
            return Err(invalid("hindsight", "templates", "needs at least one template"));
        }
        for t in &self.templates {
            let verdict = t.ends_with("{1st}") || t.ends_with("{2nd}");
            let (pos, neg) = (t.matches("{pos}").count(), t.matches("{neg}").count());
            if pos > 1 || neg > 1 || pos + neg == 0 || (verdict && pos + neg != 2) {
                return Err(invalid(
                    "hindsight",
                    "templates",
                    &format!("`{t}`: needs {{pos}} and/or {{neg}} once each (both before a final {{1st}}/{{2nd}})"),
                ));
            }
        }
        Ok(())
    }
}

/// Which kind of text a piece of a rendered example is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceKind {
    /// Feedback words of the template: no loss.
    Feedback,
    /// The preferred answer: loss, class "positive".
    Positive,
    /// The dispreferred answer: loss, class "negative".
    Negative,
    /// "the first one." / "the second one.": loss, class "positive".
    Verdict,
    /// An answer quoted inside a verdict question: no loss.
    Quoted,
}

impl PieceKind {
    /// The token class the loop gives this piece: 0 = no loss, 1 = positive, 2 = negative.
    pub fn loss_class(self) -> u8 {
        match self {
            PieceKind::Feedback | PieceKind::Quoted => 0,
            PieceKind::Positive | PieceKind::Verdict => 1,
            PieceKind::Negative => 2,
        }
    }
}

/// One example rendered from a template: the pieces after the prompt, in order, and the
/// fraction of the earlier answer to hide from later positions.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// `(text, kind)` pieces, each tokenized on its own.
    pub pieces: Vec<(String, PieceKind)>,
    /// Fraction of the first answer's tokens (when a second answer follows) to hide.
    pub mask_past_fraction: f64,
}

/// What a row gives: a pair, or one answer with a label (unpaired data).
#[derive(Debug, Clone, Copy)]
pub enum Feedback<'a> {
    /// Preferred and dispreferred answers.
    Pair {
        /// The preferred answer.
        pos: &'a str,
        /// The dispreferred answer.
        neg: &'a str,
    },
    /// A single answer, desirable or not.
    Single {
        /// The answer.
        answer: &'a str,
        /// Whether it is desirable.
        desirable: bool,
    },
}

/// Render one example: draw a template usable for `feedback` with the seeded generator
/// (`seed` mixes the run seed and the row) and fill it.
pub fn render(cfg: &HindsightConfig, feedback: Feedback, seed: u64) -> Result<Rendered> {
    let usable: Vec<&String> = cfg
        .templates
        .iter()
        .filter(|t| match feedback {
            Feedback::Pair { .. } => true,
            Feedback::Single { desirable, .. } => {
                let (pos, neg) = (t.contains("{pos}"), t.contains("{neg}"));
                if desirable {
                    pos && !neg
                } else {
                    neg && !pos
                }
            }
        })
        .collect();
    if usable.is_empty() {
        return Err(invalid("hindsight", "templates", "no template has a single answer of this row's label"));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let template = usable[rng.random_range(0..usable.len())];
    let (pos, neg) = match feedback {
        Feedback::Pair { pos, neg } => (pos, neg),
        Feedback::Single { answer, .. } => (answer, answer),
    };
    let mask_past_fraction = rng.random_range(0.0..=cfg.mask_past_max.max(0.0));
    Ok(Rendered { pieces: fill(template, pos, neg), mask_past_fraction })
}

/// Split a template into its pieces with the answers filled in.
fn fill(template: &str, pos: &str, neg: &str) -> Vec<(String, PieceKind)> {
    let verdict = template
        .strip_suffix("{1st}")
        .map(|t| (t, "the first one."))
        .or_else(|| template.strip_suffix("{2nd}").map(|t| (t, "the second one.")));
    if let Some((question, answer)) = verdict {
        let question = question.replace("{pos}", pos).replace("{neg}", neg);
        return vec![(question, PieceKind::Quoted), (answer.to_string(), PieceKind::Verdict)];
    }
    let mut pieces = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let next = [("{pos}", PieceKind::Positive, pos), ("{neg}", PieceKind::Negative, neg)]
            .into_iter()
            .filter_map(|(slot, kind, text)| rest.find(slot).map(|at| (at, slot, kind, text)))
            .min_by_key(|x| x.0);
        match next {
            Some((at, slot, kind, text)) => {
                if at > 0 {
                    pieces.push((rest[..at].to_string(), PieceKind::Feedback));
                }
                pieces.push((text.to_string(), kind));
                rest = &rest[at + slot.len()..];
            }
            None => {
                pieces.push((rest.to_string(), PieceKind::Feedback));
                rest = "";
            }
        }
    }
    pieces
}

/// Per-class log-prob sums of a chain-of-hindsight micro-batch.
#[derive(Debug, Clone)]
pub struct ClassLogps {
    /// `[B, 2]` summed log-probs of positive (and verdict) tokens, then negative tokens.
    pub sums: candle::Tensor,
    /// `[B, 2]` their token counts (f32).
    pub tokens: candle::Tensor,
}

/// The loss (SFT's token mean) with `nll/positive` and `nll/negative`: the token-mean NLL of
/// each class over the micro-batch, weighted by its share of the step's examples.
pub fn loss(x: &SequenceLogps, cfg: &HindsightConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let mut out = sft::loss(x, &sft::SftConfig::default(), scale)?;
    if let Some(classes) = &x.classes {
        let sums: Vec<f64> = classes.sums.detach().to_dtype(DType::F64)?.sum(0)?.to_vec1()?;
        let tokens: Vec<f64> = classes.tokens.to_dtype(DType::F64)?.sum(0)?.to_vec1()?;
        let share = classes.sums.dim(0)? as f64 / scale.examples;
        for (i, name) in ["nll/positive", "nll/negative"].into_iter().enumerate() {
            if tokens[i] > 0.0 {
                out.metrics.push((name.into(), -sums[i] / tokens[i] * share));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Tensor};

    #[test]
    fn templates_split_into_feedback_and_answers_in_their_order() {
        let p = fill("a less preferred answer is {neg}, a more preferred answer is {pos}", "GOOD", "BAD");
        assert_eq!(
            p,
            [
                ("a less preferred answer is ".to_string(), PieceKind::Feedback),
                ("BAD".to_string(), PieceKind::Negative),
                (", a more preferred answer is ".to_string(), PieceKind::Feedback),
                ("GOOD".to_string(), PieceKind::Positive),
            ]
        );
        let v =
            fill("For the following two answers {neg} and {pos}, which one is better? The answer is {2nd}", "G", "B");
        assert_eq!(v[0].0, "For the following two answers B and G, which one is better? The answer is ");
        assert_eq!(v[1], ("the second one.".to_string(), PieceKind::Verdict));
        assert_eq!(v.iter().map(|p| p.1.loss_class()).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn unpaired_rows_draw_single_answer_templates_of_their_label() {
        let cfg = HindsightConfig::default();
        for seed in 0..50 {
            let good = render(&cfg, Feedback::Single { answer: "yes", desirable: true }, seed).unwrap();
            assert!(
                good.pieces.iter().all(|p| p.1 != PieceKind::Negative)
                    && good.pieces.iter().any(|p| p.1 == PieceKind::Positive)
            );
            let bad = render(&cfg, Feedback::Single { answer: "no", desirable: false }, seed).unwrap();
            assert!(bad.pieces.iter().all(|p| p.1 != PieceKind::Positive));
            assert!((0.0..=0.05).contains(&good.mask_past_fraction));
        }
        // The same seed draws the same template; pairs reach both orders.
        let pair = Feedback::Pair { pos: "G", neg: "B" };
        assert_eq!(render(&cfg, pair, 7).unwrap(), render(&cfg, pair, 7).unwrap());
        let first_kinds: std::collections::HashSet<_> = (0..200)
            .map(|s| render(&cfg, pair, s).unwrap().pieces.iter().find(|p| p.1.loss_class() > 0).unwrap().1)
            .collect();
        assert!(first_kinds.contains(&PieceKind::Positive) && first_kinds.contains(&PieceKind::Negative));
    }

    #[test]
    fn bad_templates_are_named() {
        let cfg = HindsightConfig { templates: vec!["no slots here".into()], ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("no slots here"));
    }

    #[test]
    fn loss_is_the_token_mean_and_classes_are_reported_apart() {
        // Positive tokens sum −1.0 over 2, negative −3.0 over 1: loss 4/3, NLLs 0.5 and 3.
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let x = SequenceLogps {
            policy: t(&[-4.0]),
            tokens: t(&[3.0]),
            classes: Some(ClassLogps {
                sums: Tensor::new(&[[-1f32, -3.0]], &Device::Cpu).unwrap(),
                tokens: Tensor::new(&[[2f32, 1.0]], &Device::Cpu).unwrap(),
            }),
        };
        let out = loss(&x, &HindsightConfig::default(), &StepScale::single(1, 3.0)).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() - 4.0 / 3.0).abs() < 1e-6);
        let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
        assert!((m["nll/positive"] - 0.5).abs() < 1e-9 && (m["nll/negative"] - 3.0).abs() < 1e-9);
    }
}
