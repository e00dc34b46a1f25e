//! SPO: Self-supervised Preference Optimization — a preference loss plus a self-supervised
//! "preference degree" classifier over key-content-deleted copies of each response.
//!
//! Li et al., "Self-supervised Preference Optimization: Enhance Your Language Model with
//! Preference Degree Awareness", arXiv 2409.17791 (Findings of EMNLP 2024). The official
//! repository (lijian16/SPO) holds no code; the construction below follows the paper and the
//! spec (§5), with every unverified detail a configuration field:
//!
//! * key content: RAKE key phrases (stop-word and punctuation delimited runs, scored by word
//!   degree / frequency); variant `k` of `K` deletes the `round(k·n/(K−1))` best-scored of the
//!   `n` phrases from the text (then it is re-tokenized), so variant 0 is intact and variant
//!   `K−1` has lost all its key content;
//! * the policy encodes `(x, variant)`; the hidden state at its last token goes through a
//!   linear head (`K × d`, one for chosen-derived and one for rejected-derived variants);
//! * `L = L_align + λ · mean_variants CE(head(h), k)`, `L_align` the base objective (DPO's
//!   sigmoid, IPO or hinge).

use std::collections::HashMap;

use candle::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::dpo::{self, DpoConfig, DpoLossType};
use super::{invalid, reduce_pairs, ObjectiveOutput, PairLogps, StepScale};
use crate::Result;

/// SPO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoConfig {
    /// β of the base preference loss.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// The base preference loss: `dpo` (sigmoid), `ipo` or `hinge`.
    #[serde(default)]
    pub base_objective: BaseObjective,
    /// Weight λ of the self-supervised term (spec: start at 0.1).
    #[serde(default = "default_weight")]
    pub spo_weight: f64,
    /// Degrees of key-content removal K (classes of each head; spec: 3–5).
    #[serde(default = "default_degrees")]
    pub degrees: usize,
    /// The degree heads' learning rate as a multiple of the policy's (they start from scratch).
    #[serde(default = "default_head_lr_multiplier")]
    pub head_lr_multiplier: f64,
}

/// The pairwise loss SPO is added to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseObjective {
    /// DPO's sigmoid loss.
    #[default]
    Dpo,
    /// IPO.
    Ipo,
    /// SLiC's hinge loss.
    Hinge,
}

fn default_beta() -> f64 {
    0.1
}
fn default_weight() -> f64 {
    0.1
}
fn default_degrees() -> usize {
    3
}
fn default_head_lr_multiplier() -> f64 {
    1.0
}

impl Default for SpoConfig {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            base_objective: BaseObjective::default(),
            spo_weight: default_weight(),
            degrees: default_degrees(),
            head_lr_multiplier: default_head_lr_multiplier(),
        }
    }
}

impl SpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.spo_weight >= 0.0 && self.spo_weight.is_finite()) {
            return Err(invalid("spo", "spo_weight", "must be ≥ 0"));
        }
        if !(self.head_lr_multiplier > 0.0 && self.head_lr_multiplier.is_finite()) {
            return Err(invalid("spo", "head_lr_multiplier", "must be a positive number"));
        }
        if self.degrees < 2 {
            return Err(invalid("spo", "degrees", "needs at least 2 degrees (intact and stripped)"));
        }
        self.base().validate()
    }

    fn base(&self) -> DpoConfig {
        let loss_type = match self.base_objective {
            BaseObjective::Dpo => DpoLossType::Sigmoid,
            BaseObjective::Ipo => DpoLossType::Ipo,
            BaseObjective::Hinge => DpoLossType::Hinge,
        };
        DpoConfig { beta: self.beta, loss_type, ..Default::default() }
    }
}

/// The self-supervised part of an SPO micro-batch.
#[derive(Debug, Clone)]
pub struct DegreeBatch {
    /// `[N, d]` hidden states at the last token of each corrupted variant (with gradient).
    pub features: Tensor,
    /// `[N]` u32 removal degree `k` of each variant (the class).
    pub labels: Tensor,
    /// `[N]` u32 head of each variant: 0 = from a chosen response, 1 = from a rejected one.
    pub heads: Tensor,
    /// `[2, K, d]` the two classification heads (trainable).
    pub weights: Tensor,
}

/// The SPO loss of a micro-batch: the base loss's TRL metrics plus `spo/ssl_loss` and
/// `spo/ssl_accuracy`.
pub fn loss(x: &PairLogps, cfg: &SpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let mut out = reduce_pairs(x, &dpo::per_pair(x, &cfg.base())?, scale)?;
    let degrees = x.degrees.as_ref().ok_or_else(|| invalid("spo", "data", "the loop gave no corrupted variants"))?;
    let (ce, correct) = degree_cross_entropy(degrees, cfg.degrees)?;
    // Every pair brings K variants of each response: the mean over the step's variants.
    let variants = scale.examples * 2.0 * cfg.degrees as f64;
    let ssl = (ce.sum(D::Minus1)? / variants)?;
    let total = |t: &Tensor| -> Result<f64> { Ok(t.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    out.metrics.push(("spo/ssl_loss".into(), total(&ssl)?));
    out.metrics.push(("spo/ssl_accuracy".into(), total(&correct)? / variants));
    out.loss = (out.loss + (ssl * cfg.spo_weight)?)?;
    Ok(out)
}

/// Per-variant cross-entropy `[N]` of each variant's own head, and `[N]` 1.0 where the head's
/// arg-max is the label.
pub fn degree_cross_entropy(b: &DegreeBatch, degrees: usize) -> Result<(Tensor, Tensor)> {
    let (heads, k, d) = b.weights.dims3()?;
    if k != degrees || heads != 2 {
        return Err(crate::AlignError::ShapeMismatch {
            objective: "spo",
            what: "heads",
            expected: vec![2, degrees, d],
            got: vec![heads, k, d],
        });
    }
    // Logits of both heads, then the other head's K entries pushed out of the softmax.
    let all = b.features.to_dtype(DType::F32)?.matmul(&b.weights.reshape((2 * k, d))?.t()?)?; // [N, 2K]
    let n = all.dim(0)?;
    let head_of: Vec<u32> = b.heads.to_vec1()?;
    let labels: Vec<u32> = b.labels.to_vec1()?;
    let mut outside = vec![0f32; n * 2 * k];
    for (row, &h) in head_of.iter().enumerate() {
        for j in 0..2 * k {
            if j / k != h as usize {
                outside[row * 2 * k + j] = -1e9;
            }
        }
    }
    let masked = (all + Tensor::from_vec(outside, (n, 2 * k), b.features.device())?)?;
    let log_probs = crate::tensor_ops::log_softmax(&masked)?;
    let targets: Vec<u32> = head_of.iter().zip(&labels).map(|(&h, &l)| h * k as u32 + l).collect();
    let targets = Tensor::from_vec(targets.clone(), (n, 1), b.features.device())?;
    let ce = log_probs.gather(&targets, 1)?.squeeze(1)?.neg()?;
    let predicted = masked.detach().argmax(D::Minus1)?;
    let correct = predicted.eq(&targets.squeeze(1)?)?.to_dtype(DType::F32)?;
    Ok((ce, correct))
}

// -------------------------------------------------------------------------------------------
// Key-content corruption (RAKE)

/// English stop words (NLTK's list): RAKE's phrase delimiters.
const STOP_WORDS: &[&str] = &[
    "i",
    "me",
    "my",
    "myself",
    "we",
    "our",
    "ours",
    "ourselves",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "he",
    "him",
    "his",
    "himself",
    "she",
    "her",
    "hers",
    "herself",
    "it",
    "its",
    "itself",
    "they",
    "them",
    "their",
    "theirs",
    "themselves",
    "what",
    "which",
    "who",
    "whom",
    "this",
    "that",
    "these",
    "those",
    "am",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "having",
    "do",
    "does",
    "did",
    "doing",
    "a",
    "an",
    "the",
    "and",
    "but",
    "if",
    "or",
    "because",
    "as",
    "until",
    "while",
    "of",
    "at",
    "by",
    "for",
    "with",
    "about",
    "against",
    "between",
    "into",
    "through",
    "during",
    "before",
    "after",
    "above",
    "below",
    "to",
    "from",
    "up",
    "down",
    "in",
    "out",
    "on",
    "off",
    "over",
    "under",
    "again",
    "further",
    "then",
    "once",
    "here",
    "there",
    "when",
    "where",
    "why",
    "how",
    "all",
    "any",
    "both",
    "each",
    "few",
    "more",
    "most",
    "other",
    "some",
    "such",
    "no",
    "nor",
    "not",
    "only",
    "own",
    "same",
    "so",
    "than",
    "too",
    "very",
    "s",
    "t",
    "can",
    "will",
    "just",
    "don",
    "should",
    "now",
    "d",
    "ll",
    "m",
    "o",
    "re",
    "ve",
    "y",
];

/// A candidate key phrase: its byte span in the text and its words (lower case).
#[derive(Debug, Clone)]
struct Phrase {
    span: (usize, usize),
    words: Vec<String>,
}

/// RAKE's candidate phrases: maximal runs of words with no stop word and no punctuation
/// between them.
fn candidate_phrases(text: &str) -> Vec<Phrase> {
    let mut phrases = Vec::new();
    let mut current: Option<Phrase> = None;
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_alphanumeric() {
            let mut end = start;
            while let Some(&(i, c)) = chars.peek() {
                if c.is_alphanumeric() || c == '\'' || c == '-' {
                    end = i + c.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let word = text[start..end].to_lowercase();
            if STOP_WORDS.contains(&word.as_str()) {
                phrases.extend(current.take());
            } else {
                let p = current.get_or_insert(Phrase { span: (start, end), words: Vec::new() });
                p.span.1 = end;
                p.words.push(word);
            }
        } else {
            if !c.is_whitespace() {
                phrases.extend(current.take());
            }
            chars.next();
        }
    }
    phrases.extend(current);
    phrases
}

/// A distinct key phrase: its RAKE score, its first position, and the spans of every occurrence.
type DistinctPhrase = (f64, usize, Vec<(usize, usize)>);

/// The text's key phrases, best RAKE score first (ties: earlier first), each with its spans.
fn ranked_key_phrases(text: &str) -> Vec<Vec<(usize, usize)>> {
    let phrases = candidate_phrases(text);
    let mut frequency: HashMap<&str, f64> = HashMap::new();
    let mut degree: HashMap<&str, f64> = HashMap::new();
    for p in &phrases {
        for w in &p.words {
            *frequency.entry(w).or_default() += 1.0;
            *degree.entry(w).or_default() += p.words.len() as f64;
        }
    }
    // Distinct phrases (same words), scored by Σ degree/frequency of their words.
    // (score, first position, spans of every occurrence)
    let mut distinct: Vec<DistinctPhrase> = Vec::new();
    let mut index: HashMap<Vec<String>, usize> = HashMap::new();
    for (order, p) in phrases.iter().enumerate() {
        match index.get(&p.words) {
            Some(&i) => distinct[i].2.push(p.span),
            None => {
                let score = p.words.iter().map(|w| degree[w.as_str()] / frequency[w.as_str()]).sum();
                index.insert(p.words.clone(), distinct.len());
                distinct.push((score, order, vec![p.span]));
            }
        }
    }
    distinct.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    distinct.into_iter().map(|(_, _, spans)| spans).collect()
}

/// Variant `k` of `degrees` of `text`: the `round(k·n/(degrees−1))` best key phrases deleted
/// (every occurrence), spaces tidied. Variant 0 is the text itself.
pub fn remove_key_content(text: &str, k: usize, degrees: usize) -> String {
    let ranked = ranked_key_phrases(text);
    let remove = ((k * ranked.len()) as f64 / (degrees - 1).max(1) as f64).round() as usize;
    let mut spans: Vec<(usize, usize)> = ranked.into_iter().take(remove).flatten().collect();
    spans.sort();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e) in spans {
        out.push_str(&text[at..s]);
        at = e;
    }
    out.push_str(&text[at..]);
    out.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::one_pair;
    use candle::Device;

    #[test]
    fn spec_example_cross_entropy_and_total() {
        // One head with logits [2.0, 0.5, −1.0]: features = e₁..e₃ picked by identity weights.
        let dev = Device::Cpu;
        let eye = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        let weights = Tensor::stack(&[&eye, &eye], 0).unwrap();
        let features = Tensor::new(&[[2f32, 0.5, -1.0], [2.0, 0.5, -1.0]], &dev).unwrap();
        let batch = DegreeBatch {
            features,
            labels: Tensor::new(&[0u32, 2], &dev).unwrap(),
            heads: Tensor::new(&[0u32, 1], &dev).unwrap(),
            weights,
        };
        let (ce, correct) = degree_cross_entropy(&batch, 3).unwrap();
        let ce: Vec<f32> = ce.to_vec1().unwrap();
        assert!((ce[0] - 0.241_311).abs() < 1e-5 && (ce[1] - 3.241_31).abs() < 1e-4, "{ce:?}");
        assert_eq!(correct.to_vec1::<f32>().unwrap(), [1.0, 0.0]);

        // DPO example 1 (0.598139) + 0.1 × CE: a step of one pair whose 2K = 6 variants all
        // have CE 0.241311 gives 0.598139 + 0.0241311 = 0.622270.
        let features = Tensor::new(&[[2f32, 0.5, -1.0]; 6], &dev).unwrap();
        let mut x = one_pair([-10.0, -12.0, -11.0, -11.0], [4.0, 5.0]);
        x.degrees = Some(DegreeBatch {
            features,
            labels: Tensor::new(&[0u32; 6], &dev).unwrap(),
            heads: Tensor::new(&[0u32, 0, 0, 1, 1, 1], &dev).unwrap(),
            weights: batch.weights.clone(),
        });
        let out = loss(&x, &SpoConfig::default(), &StepScale::single(1, 4.0)).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() - 0.622_270).abs() < 1e-5);
    }

    #[test]
    fn heads_are_separate_and_the_loss_reaches_features_and_heads() {
        let dev = Device::Cpu;
        let w = candle::Var::from_tensor(
            &Tensor::new(&[[[0.5f32, -0.2], [0.1, 0.3]], [[1.0, 0.0], [0.0, 1.0]]], &dev).unwrap(),
        )
        .unwrap();
        let f = candle::Var::from_tensor(&Tensor::new(&[[1f32, 2.0]], &dev).unwrap()).unwrap();
        let b = DegreeBatch {
            features: f.as_tensor().clone(),
            labels: Tensor::new(&[1u32], &dev).unwrap(),
            heads: Tensor::new(&[1u32], &dev).unwrap(),
            weights: w.as_tensor().clone(),
        };
        let (ce, _) = degree_cross_entropy(&b, 2).unwrap();
        // Head 1 logits: [1, 2] → CE(label 1) = log(e + e²) − 2.
        let want = ((1f32).exp() + (2f32).exp()).ln() - 2.0;
        assert!((ce.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-6);
        let g = ce.sum_all().unwrap().backward().unwrap();
        let gw: Vec<Vec<Vec<f32>>> = g.get(w.as_tensor()).unwrap().to_vec3().unwrap();
        assert_eq!(gw[0], [[0.0, 0.0], [0.0, 0.0]], "the chosen head gets nothing from a rejected variant");
        // dCE/dlogit = softmax − onehot = [σ₀, σ₁ − 1]; times features [1, 2].
        let p0 = (1f32).exp() / ((1f32).exp() + (2f32).exp());
        assert!((gw[1][0][1] - p0 * 2.0).abs() < 1e-6);
        assert!(g.get(f.as_tensor()).is_some());
    }

    #[test]
    fn rake_ranks_longer_content_phrases_first_and_deletes_by_degree() {
        let text = "The deep blue ocean covers most of the planet, and the ocean is deep.";
        // Phrases: "deep blue ocean covers" (score 5/2 + 4 + 5/2 + 4 = 13), "planet" (1),
        // "ocean" (5/2), "deep" (5/2): ranked covers-phrase, ocean, deep, planet.
        let ranked = ranked_key_phrases(text);
        assert_eq!(&text[ranked[0][0].0..ranked[0][0].1], "deep blue ocean covers");
        assert_eq!(remove_key_content(text, 0, 3), text);
        // 4 distinct phrases: degree 1 drops round(4/2) = 2, degree 2 drops all 4.
        assert_eq!(remove_key_content(text, 1, 3), "The most of the planet, and the is deep.");
        assert_eq!(remove_key_content(text, 2, 3), "The most of the , and the is .");
        assert_eq!(remove_key_content("444", 2, 3), "");
    }
}
