//! Weighted sums of pointwise judges, TRL's `reward_funcs` with `reward_weights`:
//! `--judge "verifier:numeric + 0.5*rm:runs/rm/final"` scores each output with every term's judge
//! and adds the scores, each times its weight (1 when none is written).

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::{judge_by_scores, Case, Judge, JudgeOptions, Judgment, ScoredParts};
use crate::data::Text;

/// The `(weight, spec)` terms of a judge spec joined by ` + `; a plain spec is one term of weight 1.
pub fn terms(spec: &str) -> Result<Vec<(f64, String)>> {
    spec.split(" + ")
        .map(|term| {
            let term = term.trim();
            match term.split_once('*') {
                Some((w, rest)) if !w.contains(':') => {
                    let weight: f64 = w
                        .trim()
                        .parse()
                        .with_context(|| format!("judge term `{term}`: `{}` is not a weight", w.trim()))?;
                    if !weight.is_finite() {
                        bail!("judge term `{term}`: the weight must be a finite number");
                    }
                    Ok((weight, rest.trim().to_string()))
                }
                _ => Ok((1.0, term.to_string())),
            }
        })
        .collect()
}

/// Several pointwise judges whose scores are added with weights.
pub struct WeightedJudge {
    parts: Vec<(f64, Box<dyn Judge>)>,
}

impl WeightedJudge {
    /// Build every term's judge; only pointwise kinds (`verifier:`, `rm:`) can be summed.
    pub fn new(terms: &[(f64, String)], opts: &JudgeOptions, load: &crate::load::LoadOptions) -> Result<Self> {
        let mut parts = Vec::with_capacity(terms.len());
        for (weight, spec) in terms {
            if !(spec.starts_with("verifier:") || spec.starts_with("rm:")) {
                bail!("judge term `{spec}`: only pointwise judges (`verifier:`, `rm:`) can be summed");
            }
            parts.push((*weight, super::from_spec(spec, opts, load)?));
        }
        Ok(Self { parts })
    }
}

impl Judge for WeightedJudge {
    fn name(&self) -> String {
        self.parts.iter().map(|(w, j)| format!("{w}*{}", j.name())).collect::<Vec<_>>().join(" + ")
    }

    fn judge(&self, cases: &[Case]) -> Result<Vec<Judgment>> {
        judge_by_scores(self, cases, 0.0)
    }

    fn score(&self, outputs: &[(&Text, &Map<String, Value>, &str)]) -> Result<Option<Vec<f64>>> {
        Ok(self.score_parts(outputs)?.map(|scored| scored.into_iter().map(|(s, _)| s).collect()))
    }

    fn part_names(&self) -> Vec<String> {
        self.parts.iter().map(|(_, j)| j.name()).collect()
    }

    fn score_parts(&self, outputs: &[(&Text, &Map<String, Value>, &str)]) -> Result<Option<ScoredParts>> {
        let mut scored = vec![(0.0, Vec::with_capacity(self.parts.len())); outputs.len()];
        for (weight, judge) in &self.parts {
            let scores =
                judge.score(outputs)?.with_context(|| format!("`{}` gave no pointwise scores", judge.name()))?;
            for ((sum, parts), s) in scored.iter_mut().zip(scores) {
                *sum += weight * s;
                parts.push(s);
            }
        }
        Ok(Some(scored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_read_weights_and_plain_specs() {
        assert_eq!(terms("verifier:auto").unwrap(), vec![(1.0, "verifier:auto".to_string())]);
        let t = terms("verifier:numeric + 0.5*rm:runs/rm/final").unwrap();
        assert_eq!(t, vec![(1.0, "verifier:numeric".into()), (0.5, "rm:runs/rm/final".into())]);
        assert!(terms("x*verifier:auto").unwrap_err().to_string().contains("not a weight"));
    }

    #[test]
    fn verifiers_add_with_their_weights() {
        let t = terms("verifier:numeric + 0.5*verifier:exact").unwrap();
        let judge = WeightedJudge::new(&t, &JudgeOptions::default(), &Default::default()).unwrap();
        let row: Map<String, Value> = serde_json::from_str(r#"{"answer": "4"}"#).unwrap();
        let prompt = Text::Plain("2+2?".into());
        let scored = judge.score_parts(&[(&prompt, &row, "It is 4"), (&prompt, &row, "4")]).unwrap().unwrap();
        assert_eq!(scored, vec![(1.0, vec![1.0, 0.0]), (1.5, vec![1.0, 1.0])]);
        assert_eq!(judge.part_names(), ["verifier:numeric", "verifier:exact"]);
        let err =
            WeightedJudge::new(&terms("llm:x + verifier:auto").unwrap(), &Default::default(), &Default::default());
        assert!(err.err().unwrap().to_string().contains("pointwise"));
    }
}
