//! The shipped datasets (`data/`) against candor's own verifier: every chosen (and SFT) answer
//! passes its row's checks, every rejected answer fails them, and no prompt appears twice across
//! the four files.

use std::collections::HashSet;
use std::path::Path;

use candor::judge::verifier::Verifier;
use serde_json::{Map, Value};

fn rows(rel: &str) -> Vec<Map<String, Value>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn content(v: &Value) -> &str {
    v[0]["content"].as_str().unwrap()
}

#[test]
fn chosen_answers_pass_and_rejected_answers_fail_the_verifier() {
    let verifier = Verifier::new("auto").unwrap();
    let mut instruction_ids = HashSet::new();
    for file in ["data/preference/train.jsonl", "data/preference/test.jsonl"] {
        for (i, row) in rows(file).iter().enumerate() {
            let (chosen, rejected) = (content(&row["chosen"]), content(&row["rejected"]));
            assert!(verifier.passes(row, chosen).unwrap(), "{file}:{}: chosen fails: {chosen:?}", i + 1);
            assert!(!verifier.passes(row, rejected).unwrap(), "{file}:{}: rejected passes: {rejected:?}", i + 1);
            for id in row.get("instruction_id_list").and_then(Value::as_array).into_iter().flatten() {
                instruction_ids.insert(id.as_str().unwrap().to_string());
            }
        }
    }
    for file in ["data/sft/train.jsonl", "data/sft/test.jsonl"] {
        for (i, row) in rows(file).iter().enumerate() {
            let answer = content(&row["completion"]);
            assert!(verifier.passes(row, answer).unwrap(), "{file}:{}: completion fails: {answer:?}", i + 1);
        }
    }
    assert!(instruction_ids.len() >= 15, "IFEval instruction types used: {instruction_ids:?}");
}

#[test]
fn no_prompt_is_shared_between_files_or_rows() {
    let mut seen = HashSet::new();
    for file in
        ["data/sft/train.jsonl", "data/sft/test.jsonl", "data/preference/train.jsonl", "data/preference/test.jsonl"]
    {
        for (i, row) in rows(file).iter().enumerate() {
            assert!(seen.insert(content(&row["prompt"]).to_string()), "{file}:{}: a repeated prompt", i + 1);
        }
    }
    assert_eq!(seen.len(), 1500);
}
