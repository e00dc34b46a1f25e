//! IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"):
//! rows with `instruction_id_list` and list-aligned `kwargs`, as in IFEval's
//! `input_data.jsonl`, checked by the 25 verifiable instruction types of the official code.
//!
//! A row is scored two ways. **Strict**: each instruction checked on the response as it is.
//! **Loose**: an instruction passes when any of eight variants passes: the response, without
//! its first line, without its last, without both, and each of those with every `*` removed
//! (blank variants are skipped). The prompt-level result is whether all instructions pass; a
//! [`Report`] holds prompt- and instruction-level accuracy, strict and loose, overall and per
//! instruction type, as IFEval reports them.

pub mod instructions;
pub mod text;

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use instructions::Instruction;

/// Whether `row` is an IFEval row (it has `instruction_id_list`).
pub fn is_ifeval_row(row: &Map<String, Value>) -> bool {
    row.contains_key("instruction_id_list")
}

/// The instructions of an IFEval row.
#[derive(Debug, Clone)]
pub struct IfevalRow {
    ids: Vec<String>,
    instructions: Vec<Instruction>,
}

impl IfevalRow {
    /// The row's instructions; `None` for a row that is not an IFEval row. An error names the
    /// field (`instruction_id_list[i]`, `kwargs[i]`) and what is wrong with it.
    pub fn from_row(row: &Map<String, Value>) -> Result<Option<Self>> {
        let Some(list) = row.get("instruction_id_list") else { return Ok(None) };
        let ids: Vec<String> = list
            .as_array()
            .and_then(|ids| ids.iter().map(|id| id.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| anyhow!("field `instruction_id_list`: expected a list of instruction ids, got {list}"))?;
        if ids.is_empty() {
            anyhow::bail!("field `instruction_id_list`: empty");
        }
        let no_args = Map::new();
        let kwargs: Vec<&Map<String, Value>> = match row.get("kwargs") {
            None | Some(Value::Null) => vec![&no_args; ids.len()],
            Some(Value::Array(items)) if items.len() == ids.len() => items
                .iter()
                .enumerate()
                .map(|(i, k)| match k {
                    Value::Object(o) => Ok(o),
                    Value::Null => Ok(&no_args),
                    other => Err(anyhow!("field `kwargs[{i}]`: expected an object, got {other}")),
                })
                .collect::<Result<_>>()?,
            Some(Value::Array(items)) => anyhow::bail!(
                "field `kwargs`: {} entries, but `instruction_id_list` has {} (they are list-aligned)",
                items.len(),
                ids.len()
            ),
            Some(other) => anyhow::bail!("field `kwargs`: expected a list of objects, got {other}"),
        };
        let instructions = ids
            .iter()
            .zip(kwargs)
            .enumerate()
            .map(|(i, (id, args))| {
                let field =
                    if instructions::INSTRUCTION_IDS.contains(&id.as_str()) { "kwargs" } else { "instruction_id_list" };
                Instruction::parse(id, args).map_err(|e| anyhow!("field `{field}[{i}]`: {e}"))
            })
            .collect::<Result<_>>()?;
        Ok(Some(Self { ids, instructions }))
    }

    /// The strict and loose results of `response`.
    pub fn evaluate(&self, response: &str) -> RowResult {
        let variants = loose_variants(response);
        let follows = |inst: &Instruction, r: &str| !r.trim().is_empty() && inst.check(r);
        let strict: Vec<bool> = self.instructions.iter().map(|i| follows(i, response)).collect();
        let loose: Vec<bool> = self.instructions.iter().map(|i| variants.iter().any(|r| follows(i, r))).collect();
        RowResult {
            instruction_id_list: self.ids.clone(),
            prompt_level_strict: strict.iter().all(|&b| b),
            prompt_level_loose: loose.iter().all(|&b| b),
            strict,
            loose,
        }
    }
}

/// The eight responses the loose score tries: the response, without its first line, without
/// its last, without both (those three trimmed), and each with every `*` removed.
fn loose_variants(response: &str) -> Vec<String> {
    let lines: Vec<&str> = response.split('\n').collect();
    let n = lines.len();
    let join = |part: &[&str]| part.join("\n").trim().to_string();
    let cut = [
        response.to_string(),
        join(&lines[1..]),
        join(&lines[..n - 1]),
        join(if n >= 2 { &lines[1..n - 1] } else { &[] }),
    ];
    let unstarred = cut.clone().map(|r| r.replace('*', ""));
    cut.into_iter().chain(unstarred).collect()
}

/// One IFEval row's results for one response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowResult {
    /// The row's instruction ids, in order.
    pub instruction_id_list: Vec<String>,
    /// Strict: whether each instruction is followed.
    pub strict: Vec<bool>,
    /// Loose: whether each instruction is followed by some variant of the response.
    pub loose: Vec<bool>,
    /// All instructions followed, strict.
    pub prompt_level_strict: bool,
    /// All instructions followed, loose.
    pub prompt_level_loose: bool,
}

/// The IFEval results of `response` to `row`; `None` for a row that is not an IFEval row.
pub fn evaluate(row: &Map<String, Value>, response: &str) -> Result<Option<RowResult>> {
    Ok(IfevalRow::from_row(row)?.map(|r| r.evaluate(response)))
}

/// Strict and loose accuracy over some instructions (or prompts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    /// How many were counted.
    pub count: usize,
    /// The fraction followed, strict.
    pub strict_acc: f64,
    /// The fraction followed, loose.
    pub loose_acc: f64,
}

/// Pass counts, turned into an [`Accuracy`].
#[derive(Default)]
struct Tally {
    count: usize,
    strict: usize,
    loose: usize,
}

impl Tally {
    fn add(&mut self, strict: bool, loose: bool) {
        self.count += 1;
        self.strict += usize::from(strict);
        self.loose += usize::from(loose);
    }

    fn accuracy(&self) -> Accuracy {
        let rate = |k: usize| k as f64 / self.count.max(1) as f64;
        Accuracy { count: self.count, strict_acc: rate(self.strict), loose_acc: rate(self.loose) }
    }
}

/// IFEval's numbers over a dataset's responses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Prompt-level: the fraction of responses that follow all their instructions.
    pub prompt_level: Accuracy,
    /// Instruction-level: the fraction of all instructions followed.
    pub instruction_level: Accuracy,
    /// Instruction-level accuracy per instruction id (`keywords:existence`, ...).
    pub per_instruction: BTreeMap<String, Accuracy>,
    /// Instruction-level accuracy per category (the id before `:`).
    pub per_category: BTreeMap<String, Accuracy>,
}

impl Report {
    /// The report over `results`; `None` when there are none.
    pub fn new<'a>(results: impl IntoIterator<Item = &'a RowResult>) -> Option<Self> {
        let (mut prompts, mut all) = (Tally::default(), Tally::default());
        let (mut by_id, mut by_category) = (BTreeMap::<&str, Tally>::new(), BTreeMap::<&str, Tally>::new());
        for r in results {
            prompts.add(r.prompt_level_strict, r.prompt_level_loose);
            for ((id, &s), &l) in r.instruction_id_list.iter().zip(&r.strict).zip(&r.loose) {
                all.add(s, l);
                by_id.entry(id).or_default().add(s, l);
                by_category.entry(id.split(':').next().unwrap_or(id)).or_default().add(s, l);
            }
        }
        let table = |t: BTreeMap<&str, Tally>| t.into_iter().map(|(k, v)| (k.to_string(), v.accuracy())).collect();
        (prompts.count > 0).then(|| Report {
            prompt_level: prompts.accuracy(),
            instruction_level: all.accuracy(),
            per_instruction: table(by_id),
            per_category: table(by_category),
        })
    }

    /// The report as a printed table, headed `IFEval (<whose>)`.
    pub fn table(&self, whose: &str) -> String {
        let line = |name: &str, a: &Accuracy| {
            format!("{name:<48} {:>5} {:>7.1}% {:>7.1}%\n", a.count, 100.0 * a.strict_acc, 100.0 * a.loose_acc)
        };
        let mut out = format!("{:<48} {:>5} {:>8} {:>8}\n", format!("IFEval ({whose})"), "n", "strict", "loose");
        out.push_str(&line("prompt-level", &self.prompt_level));
        out.push_str(&line("instruction-level", &self.instruction_level));
        for (category, a) in &self.per_category {
            out.push_str(&line(&format!("  {category}"), a));
            for (id, a) in self.per_instruction.iter().filter(|(id, _)| id.split(':').next() == Some(category)) {
                out.push_str(&line(&format!("    {id}"), a));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn result(row_value: Value, response: &str) -> RowResult {
        evaluate(&row(row_value), response).unwrap().unwrap()
    }

    #[test]
    fn loose_forgives_a_first_or_last_line_and_asterisks() {
        let no_comma = json!({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]});
        // An intro line with a comma: strict fails, loose drops the first line.
        let r = result(no_comma.clone(), "Sure, here it is:\nno commas here");
        assert_eq!((r.strict, r.loose), (vec![false], vec![true]));
        let r = result(no_comma.clone(), "no commas\nhere\nHope that helps, bye");
        assert_eq!((r.strict, r.loose), (vec![false], vec![true]));
        // One line: the cut variants are blank and skipped (a blank response has no comma).
        let r = result(no_comma.clone(), "a, b");
        assert_eq!((r.prompt_level_strict, r.prompt_level_loose), (false, false));
        // A blank response follows nothing.
        let r = result(no_comma, "  \n ");
        assert_eq!((r.strict, r.loose), (vec![false], vec![false]));
        // Markdown stars removed.
        let quoted = json!({"instruction_id_list": ["startend:quotation"], "kwargs": [{}]});
        let r = result(quoted, "*\"Hi there\"*");
        assert_eq!((r.strict, r.loose), (vec![false], vec![true]));
    }

    #[test]
    fn prompt_level_needs_every_instruction() {
        let both = json!({
            "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
            "kwargs": [{"keywords": null}, {"keywords": ["moon"], "num_words": null}],
        });
        let r = result(both.clone(), "The moon rises");
        assert_eq!((r.strict.clone(), r.prompt_level_strict, r.prompt_level_loose), (vec![true, true], true, true));
        let r = result(both, "The sun rising");
        assert_eq!((r.strict, r.prompt_level_strict), (vec![true, false], false));
        // Not an IFEval row.
        assert_eq!(evaluate(&row(json!({"answer": "4"})), "4").unwrap(), None);
    }

    #[test]
    fn bad_rows_name_the_field() {
        let err = |v: Value| IfevalRow::from_row(&row(v)).unwrap_err();
        let e = err(json!({"instruction_id_list": ["a:b"], "kwargs": [{}]})).to_string();
        assert!(e.starts_with("field `instruction_id_list[0]`: unknown instruction `a:b`"), "{e}");
        let e = err(json!({"instruction_id_list": ["punctuation:no_comma", "keywords:existence"], "kwargs": [{}, {}]}))
            .to_string();
        assert!(e.contains("field `kwargs[1]`: instruction `keywords:existence`: argument `keywords`: missing"), "{e}");
        let e = err(json!({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]})).to_string();
        assert!(e.contains("`kwargs`: 2 entries, but `instruction_id_list` has 1"), "{e}");
        let e = err(json!({"instruction_id_list": "punctuation:no_comma"})).to_string();
        assert!(e.contains("expected a list of instruction ids"), "{e}");
        let e = err(json!({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [3]})).to_string();
        assert!(e.contains("field `kwargs[0]`: expected an object"), "{e}");
        // Without `kwargs`, instructions that take no arguments still work.
        assert!(IfevalRow::from_row(&row(json!({"instruction_id_list": ["punctuation:no_comma"]}))).unwrap().is_some());
    }

    #[test]
    fn report_aggregates_as_ifeval_does() {
        let r = |ids: &[&str], strict: &[bool], loose: &[bool]| RowResult {
            instruction_id_list: ids.iter().map(|s| s.to_string()).collect(),
            strict: strict.to_vec(),
            loose: loose.to_vec(),
            prompt_level_strict: strict.iter().all(|&b| b),
            prompt_level_loose: loose.iter().all(|&b| b),
        };
        let results = [
            r(&["a:x", "b:y"], &[true, false], &[true, true]),
            r(&["a:x"], &[true], &[true]),
            r(&["a:z", "b:y"], &[false, false], &[false, true]),
        ];
        let report = Report::new(&results).unwrap();
        let acc = |count, strict_acc, loose_acc| Accuracy { count, strict_acc, loose_acc };
        // Prompts: strict 1 of 3, loose 2 of 3. Instructions: strict 2 of 5, loose 4 of 5.
        assert_eq!(report.prompt_level, acc(3, 1.0 / 3.0, 2.0 / 3.0));
        assert_eq!(report.instruction_level, acc(5, 0.4, 0.8));
        assert_eq!(report.per_instruction["a:x"], acc(2, 1.0, 1.0));
        assert_eq!(report.per_instruction["b:y"], acc(2, 0.0, 1.0));
        assert_eq!(report.per_instruction["a:z"], acc(1, 0.0, 0.0));
        assert_eq!(report.per_category["a"], acc(3, 2.0 / 3.0, 2.0 / 3.0));
        assert_eq!(report.per_category["b"], acc(2, 0.0, 1.0));
        let table = report.table("model");
        assert!(table.contains("IFEval (model)") && table.contains("    a:z"), "{table}");
        assert!(table.lines().nth(2).unwrap().ends_with("40.0%    80.0%"), "{table}");
        assert_eq!(Report::new(&[]), None);
    }
}
