//! `candor train --help-objective`: every objective described from the registry's table, the
//! list without `--objective`, and an unknown name refused with the names.

use std::process::{Command, Output};

use candor_alignment::Objective;

fn candor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_candor")).args(args).output().expect("run candor")
}

#[test]
fn every_objective_is_described_with_its_settings() {
    for (name, help) in Objective::NAMES {
        let o = candor(&["train", "--objective", name, "--help-objective"]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        let loop_kind = Objective::default_for(name).unwrap().loop_kind().name();
        assert!(text.starts_with(&format!("{name}: {help}\n")), "{text}");
        assert!(text.contains(&format!("loop: {loop_kind}: ")), "{text}");
        assert!(text.contains("data: ") && text.contains("Settings (`--set objective.KEY=VALUE`"), "{text}");
    }
    let rdpo = candor(&["train", "--objective", "rdpo", "--help-objective"]);
    let text = String::from_utf8_lossy(&rdpo.stdout);
    assert!(text.lines().any(|l| l.contains("objective.epsilon = 0.1") && l.ends_with("--epsilon")), "{text}");
}

#[test]
fn without_a_name_it_lists_the_objectives_and_refuses_unknown_ones() {
    let o = candor(&["train", "--help-objective"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for (name, _) in Objective::NAMES {
        assert!(text.lines().any(|l| l.split_whitespace().next() == Some(name)), "{name}: {text}");
    }
    let o = candor(&["train", "--objective", "dpoo", "--help-objective"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dpoo") && err.contains("sft, dpo, rdpo"), "{err}");
}

#[test]
fn hidden_method_flags_still_set_their_keys() {
    let o = candor(&[
        "train",
        "--objective=spo",
        "--spo-weight=0.3",
        "--base-objective=ipo",
        "--data=t.jsonl",
        "--output=out",
        "--print-config",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("spo_weight = 0.3") && text.contains("base_objective = \"ipo\""), "{text}");
    let help = String::from_utf8_lossy(&candor(&["train", "--help"]).stdout).into_owned();
    assert!(help.contains("--beta") && help.contains("--help-objective") && !help.contains("--spo-weight"), "{help}");
}
