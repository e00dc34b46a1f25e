//! TRL's dataset formats: parsing every kind and form, tokenization rules, truncation, and an
//! error naming file, line and field for every kind of bad row.

mod common;

use std::io::Write;

use candor::data::{read_jsonl, Example, SequenceTokenizer, Text, Truncation, TruncationMode};
use candor::load::{ChatTemplate, Message, TextTokenizer};
use common::fixture;

fn write_jsonl(lines: &[&str]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    f
}

fn tiny_tokenizer() -> (TextTokenizer, ChatTemplate) {
    let tok = TextTokenizer::from_hf_files(
        &fixture("tokenizer/tokenizer.json"),
        Some(&fixture("tokenizer/tokenizer_config.json")),
    )
    .unwrap();
    let src = std::fs::read_to_string(fixture("tokenizer/chat_template.jinja")).unwrap();
    let tmpl = ChatTemplate::new(&src, None, Some("<|endoftext|>")).unwrap();
    (tok, tmpl)
}

fn user(content: &str) -> Message {
    Message { role: "user".into(), content: content.into() }
}

fn assistant(content: &str) -> Message {
    Message { role: "assistant".into(), content: content.into() }
}

#[test]
fn parses_every_kind_in_both_forms() {
    let f = write_jsonl(&[
        r#"{"prompt": "Q:", "chosen": " yes", "rejected": " no", "id": 7}"#,
        r#"{"prompt": "Q:", "completion": " yes"}"#,
        r#"{"prompt": "Q:", "completion": " yes", "label": false}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
        r#"{"text": "plain text"}"#,
        r#"{"prompt": [{"role": "user", "content": "hi"}]}"#,
        "",
        r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
    ]);
    let d = read_jsonl(f.path(), false).unwrap();
    let kinds: Vec<&str> = d.rows.iter().map(|r| r.example.kind()).collect();
    assert_eq!(
        kinds,
        [
            "preference",
            "prompt-completion",
            "unpaired",
            "conversation",
            "language-modeling",
            "prompt-only",
            "preference"
        ]
    );
    assert_eq!(d.rows[0].fields["id"], 7);
    assert_eq!(d.rows[6].line, 8, "blank lines still count");
    assert!(matches!(&d.rows[2].example, Example::Unpaired { label: false, .. }));
}

#[test]
fn implicit_prompt_is_the_common_prefix_as_in_trl() {
    let f = write_jsonl(&[
        r#"{"chosen": "The sky is blue.", "rejected": "The sky is green."}"#,
        r#"{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}"#,
    ]);
    let d = read_jsonl(f.path(), false).unwrap();
    let Example::Preference { prompt, chosen, rejected } = &d.rows[0].example else { panic!() };
    // The split backs off before the space, so completions keep their leading space.
    assert_eq!(prompt, &Text::Plain("The sky is".into()));
    assert_eq!(chosen, &Text::Plain(" blue.".into()));
    assert_eq!(rejected, &Text::Plain(" green.".into()));
    let Example::Preference { prompt, chosen, .. } = &d.rows[1].example else { panic!() };
    assert_eq!(prompt, &Text::Chat(vec![user("hi")]));
    assert_eq!(chosen, &Text::Chat(vec![assistant("a")]));
}

#[test]
fn every_bad_row_names_file_line_and_field() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("not json", None, "invalid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        (r#"{"foo": 1}"#, None, "no known columns"),
        (r#"{"prompt": "q", "chosen": "a"}"#, Some("rejected"), "missing"),
        (r#"{"prompt": "q", "rejected": "a"}"#, Some("chosen"), "missing"),
        (r#"{"prompt": 3, "completion": "a"}"#, Some("prompt"), "got a number"),
        (r#"{"prompt": "q", "completion": "a", "label": "yes"}"#, Some("label"), "expected true or false"),
        (r#"{"completion": "a"}"#, Some("prompt"), "missing"),
        (r#"{"messages": "hi"}"#, Some("messages"), "list of"),
        (r#"{"messages": [{"role": "user"}]}"#, Some("messages"), "message 0"),
        (r#"{"text": 5}"#, Some("text"), "expected a string"),
        (r#"{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}"#, Some("completion"), "conversational"),
        (r#"{"chosen": "a", "rejected": [{"role": "user", "content": "q"}]}"#, Some("rejected"), "both"),
    ];
    for (line, field, message) in cases {
        let f = write_jsonl(&[r#"{"prompt": "fine", "completion": "ok"}"#, line]);
        let err = read_jsonl(f.path(), false).unwrap_err();
        assert_eq!(err.line, 2, "{line}");
        assert_eq!(err.field.as_deref(), *field, "{line}: {err}");
        let text = err.to_string();
        assert!(text.contains(&f.path().display().to_string()) && text.contains(":2:"), "{text}");
        if let Some(field) = field {
            assert!(text.contains(&format!("field `{field}`")), "{text}");
        }
        assert!(text.contains(message), "{line}: {text}");
    }
}

#[test]
fn skip_bad_rows_keeps_the_good_ones_and_reports_the_rest() {
    let f = write_jsonl(&[r#"{"text": "a"}"#, "oops", r#"{"text": 1}"#, r#"{"text": "b"}"#]);
    let d = read_jsonl(f.path(), true).unwrap();
    assert_eq!(d.rows.len(), 2);
    assert_eq!(d.skipped.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 3]);
    assert!(read_jsonl(f.path(), false).is_err());
    let empty = write_jsonl(&[]);
    assert!(read_jsonl(empty.path(), false).unwrap_err().to_string().contains("no rows"));
}

#[test]
fn standard_tokenization_appends_eos_and_masks_the_prompt() {
    let (tok, _) = tiny_tokenizer();
    let st = SequenceTokenizer { tokenizer: &tok, chat_template: None, truncation: Truncation::default() };
    let seq = st.prompt_completion(&Text::Plain("Question: hi\nAnswer:".into()), &Text::Plain(" yes".into())).unwrap();
    let prompt_len = tok.encode("Question: hi\nAnswer:", true).unwrap().len();
    assert_eq!(*seq.ids.last().unwrap(), 1, "EOS appended");
    assert_eq!(seq.ids[..prompt_len], tok.encode("Question: hi\nAnswer:", true).unwrap()[..]);
    assert!(seq.completion_mask[..prompt_len].iter().all(|&m| m == 0));
    assert!(seq.completion_mask[prompt_len..].iter().all(|&m| m == 1));
    assert_eq!(tok.decode(&seq.ids[prompt_len..], false).unwrap(), " yes<|endoftext|>");
}

#[test]
fn truncation_keeps_prompt_end_and_the_chosen_side_of_the_sequence() {
    let (tok, _) = tiny_tokenizer();
    let prompt = Text::Plain("one two three four five six seven".into());
    let completion = Text::Plain(" eight nine ten".into());
    let base = SequenceTokenizer { tokenizer: &tok, chat_template: None, truncation: Truncation::default() };
    let full = base.prompt_completion(&prompt, &completion).unwrap();
    let n_prompt = full.completion_mask.iter().take_while(|&&m| m == 0).count();
    let limited = |t: Truncation| {
        SequenceTokenizer { tokenizer: &tok, chat_template: None, truncation: t }
            .prompt_completion(&prompt, &completion)
            .unwrap()
    };
    let p = limited(Truncation { max_prompt_length: Some(3), ..Default::default() });
    assert_eq!(p.ids[..3], full.ids[n_prompt - 3..n_prompt], "prompt keeps its last tokens");
    assert_eq!(p.ids[3..], full.ids[n_prompt..]);
    let start = limited(Truncation { max_length: Some(5), ..Default::default() });
    assert_eq!(start.ids, full.ids[..5]);
    let end = limited(Truncation { max_length: Some(5), mode: TruncationMode::KeepEnd, ..Default::default() });
    assert_eq!(end.ids, full.ids[full.ids.len() - 5..]);
    assert_eq!(end.completion_mask, full.completion_mask[full.ids.len() - 5..]);
}

#[test]
fn conversational_rows_go_through_the_chat_template() {
    let (tok, tmpl) = tiny_tokenizer();
    let st = SequenceTokenizer { tokenizer: &tok, chat_template: Some(&tmpl), truncation: Truncation::default() };
    let prompt = Text::Chat(vec![user("hi")]);
    let seq = st.prompt_completion(&prompt, &Text::Chat(vec![assistant("hello")])).unwrap();
    let text = tok.decode(&seq.ids, false).unwrap();
    assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n");
    let completion: Vec<u32> =
        seq.ids.iter().zip(&seq.completion_mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
    assert_eq!(tok.decode(&completion, false).unwrap(), "hello<|im_end|>\n", "no extra EOS for chat rows");
    let conv = st.conversation(&[user("hi"), assistant("A"), user("more"), assistant("B")], true).unwrap();
    let marked: Vec<u32> =
        conv.ids.iter().zip(&conv.completion_mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
    assert_eq!(tok.decode(&marked, false).unwrap(), "A<|im_end|>\nB<|im_end|>\n", "assistant turns only");
    let no_template = SequenceTokenizer { tokenizer: &tok, chat_template: None, truncation: Truncation::default() };
    assert!(no_template.prompt_ids(&prompt).unwrap_err().to_string().contains("chat template"));
}

#[test]
fn tiny_tokenizer_round_trips() {
    let (tok, _) = tiny_tokenizer();
    for text in ["Question: What color is the sky?", "  spaces\tand tabs\n", "ümlaut ✓"] {
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
    }
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [2]);
    assert_eq!((tok.pad, tok.eos.as_ref().map(|e| e.1)), (Some(0), Some(1)));
}
