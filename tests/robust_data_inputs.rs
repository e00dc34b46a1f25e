//! Bad input gives a clear error that names the file, the line and the field, never a panic
//! and never silent nonsense (issue 16, sections 2 and 6): optimizer settings, the run
//! directory, device and dtype names, unused dataset columns, over-long rows, byte-order
//! marks, conversation roles; and randomized inputs to the JSONL and TOML recipe readers.

mod common;

use std::path::{Path, PathBuf};

use candor::data::{read_jsonl, Example, SequenceTokenizer, Text, Truncation, TruncationMode};
use candor::load::{ChatTemplate, Message, TextTokenizer};
use candor::train::config::parse_set;
use candor::train::TrainConfig;
use common::{fixture, scratch};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

// ---------------------------------------------------------------------------------------------
// Helpers

fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A recipe that resolves, with `extra` lines appended to the section each one names.
fn recipe(optim: &str, model: &str, run: &str) -> String {
    format!(
        "[model]\ndevice = \"cpu\"\n{model}\n\n[data]\ntrain = \"t.jsonl\"\n\n[objective]\nname = \"sft\"\n\n[optim]\nlr = 1e-5\n{optim}\n\n[run]\noutput = \"runs/x\"\n{run}\n"
    )
}

/// The 1-based line of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("`{needle}` not in recipe")) + 1
}

fn resolve_err(path: &Path, overrides: &[&str]) -> String {
    let overrides: Vec<_> = overrides.iter().map(|s| parse_set(s).unwrap()).collect();
    format!("{:#}", TrainConfig::resolve(Some(path), &overrides).expect_err("the configuration should be refused"))
}

fn candor(args: &[&str]) -> std::process::Output {
    common::candor(args)
}

fn tiny_tokenizer() -> (TextTokenizer, ChatTemplate) {
    let tok = TextTokenizer::from_hf_files(
        &fixture("tokenizer/tokenizer.json"),
        Some(&fixture("tokenizer/tokenizer_config.json")),
    )
    .unwrap();
    let src = std::fs::read_to_string(fixture("tokenizer/chat_template.jinja")).unwrap();
    (tok, ChatTemplate::new(&src, None, Some("<|endoftext|>")).unwrap())
}

fn msg(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into() }
}

// ---------------------------------------------------------------------------------------------
// 1. Settings: non-finite and out-of-range optimizer values, an empty output, device/dtype typos

#[test]
fn non_finite_or_out_of_range_optimizer_values_are_refused_naming_file_line_and_key() {
    let dir = scratch();
    // Each of these was accepted before: NaN compares false with every bound, so `nan` acted as
    // 0 (no clipping, no decay); betas and epsilon were not checked at all.
    let cases = [
        ("max_grad_norm = nan", "optim.max_grad_norm"),
        ("weight_decay = nan", "optim.weight_decay"),
        ("max_grad_norm = inf", "optim.max_grad_norm"),
        ("weight_decay = -0.1", "optim.weight_decay"),
        ("adam_beta1 = nan", "optim.adam_beta1"),
        ("adam_beta1 = 1.0", "optim.adam_beta1"),
        ("adam_beta2 = -0.5", "optim.adam_beta2"),
        ("adam_beta2 = inf", "optim.adam_beta2"),
        ("adam_epsilon = nan", "optim.adam_epsilon"),
        ("adam_epsilon = -1e-8", "optim.adam_epsilon"),
        ("warmup_steps = -3", "optim.warmup_steps"),
        ("warmup_steps = 2.5", "optim.warmup_steps"),
        ("scheduler = \"cosin\"", "optim.scheduler"),
    ];
    for (line, key) in cases {
        let text = recipe(line, "", "");
        let path = write(dir.path(), "bad.toml", &text);
        let err = resolve_err(&path, &[]);
        let at = format!("{}:{}", path.display(), line_of(&text, line));
        assert!(err.contains(&at) && err.contains(&format!("`{key}`")), "{line}: {err}");
    }
    // `lr = nan` sits on its own line after the default one is replaced.
    let text = recipe("", "", "").replace("lr = 1e-5", "lr = nan");
    let path = write(dir.path(), "lr.toml", &text);
    let err = resolve_err(&path, &[]);
    assert!(
        err.contains(&format!("{}:{}", path.display(), line_of(&text, "lr = nan"))) && err.contains("`optim.lr`"),
        "{err}"
    );
    // From the command line, the error says so instead of naming a recipe line.
    let path = write(dir.path(), "ok.toml", recipe("", "", ""));
    let err = resolve_err(&path, &["optim.max_grad_norm=nan"]);
    assert!(err.contains("command line") && err.contains("`optim.max_grad_norm`") && err.contains("NaN"), "{err}");
    let o = candor(&["train", "--config", path.to_str().unwrap(), "--weight-decay", "NaN", "--print-config"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("optim.weight_decay"), "{o:?}");
    // In range is fine.
    let path = write(
        dir.path(),
        "fine.toml",
        recipe("max_grad_norm = 0.0\nweight_decay = 0.1\nadam_beta1 = 0.0\nadam_epsilon = 0.0", "", ""),
    );
    TrainConfig::resolve(Some(&path), &[]).unwrap();
}

#[test]
fn an_empty_output_directory_is_refused() {
    let dir = scratch();
    let text = recipe("", "", "").replace("output = \"runs/x\"", "output = \"\"");
    let path = write(dir.path(), "empty.toml", &text);
    let err = resolve_err(&path, &[]);
    assert!(
        err.contains(&format!("{}:{}", path.display(), line_of(&text, "output = \"\"")))
            && err.contains("`run.output`"),
        "{err}"
    );
    let ok = write(dir.path(), "ok.toml", recipe("", "", ""));
    // `--output ""` is refused by the argument parser already; `--set` reaches the check.
    let o = candor(&["train", "--config", ok.to_str().unwrap(), "--set", "run.output=\"\"", "--print-config"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("run.output")
            && stderr.contains("empty")
            && stderr.contains("command line"),
        "{stderr}"
    );
    let err = resolve_err(&ok, &["run.output=\"  \""]);
    assert!(err.contains("`run.output`"), "{err}");
}

#[test]
fn device_and_dtype_typos_are_refused_listing_the_accepted_values() {
    let dir = scratch();
    let ok = write(dir.path(), "ok.toml", recipe("", "", ""));
    for (flag, value, accepted) in
        [("--device", "cdu", "cpu, cuda"), ("--device", "cuda:x", "cuda:N"), ("--dtype", "f33", "f32, bf16 or f16")]
    {
        let o = candor(&["train", "--config", ok.to_str().unwrap(), flag, value, "--print-config"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(value) && stderr.contains(accepted), "{flag} {value}: {stderr}");
    }
    // In a recipe, and with `--set`: refused at config resolution, naming the line or the command line.
    for (model, key, accepted) in
        [("dtype = \"f33\"", "model.dtype", "f32, bf16 or f16"), ("dtype = \"F32\"", "model.dtype", "f32")]
    {
        let text = recipe("", model, "");
        let path = write(dir.path(), "typo.toml", &text);
        let err = resolve_err(&path, &[]);
        assert!(
            err.contains(&format!("{}:{}", path.display(), line_of(&text, model)))
                && err.contains(key)
                && err.contains(accepted),
            "{err}"
        );
        let o = candor(&["train", "--config", path.to_str().unwrap(), "--print-config"]);
        assert!(!o.status.success(), "--print-config must refuse {model}");
    }
    let text = recipe("", "", "").replace("device = \"cpu\"", "device = \"cdu\"");
    let path = write(dir.path(), "device.toml", &text);
    let err = resolve_err(&path, &[]);
    assert!(
        err.contains(&format!("{}:2", path.display())) && err.contains("model.device") && err.contains("metal or auto"),
        "{err}"
    );
    let err = resolve_err(&ok, &["model.device=\"gpu\""]);
    assert!(err.contains("command line") && err.contains("model.device") && err.contains("cpu, cuda"), "{err}");
    // Every accepted spelling still resolves.
    for (key, v) in
        [("model.device", "cuda:1"), ("model.device", "auto"), ("model.dtype", "bfloat16"), ("model.dtype", "f16")]
    {
        TrainConfig::resolve(Some(&ok), &[parse_set(&format!("{key}=\"{v}\"")).unwrap()]).unwrap();
    }
}

#[test]
fn type_errors_in_a_recipe_name_the_line_and_the_key() {
    let dir = scratch();
    let text = recipe("", "", "batch_size = \"four\"");
    let path = write(dir.path(), "types.toml", &text);
    let err = resolve_err(&path, &[]);
    assert!(
        err.contains(&format!("{}:{}", path.display(), line_of(&text, "batch_size"))) && err.contains("run.batch_size"),
        "{err}"
    );
    let text = recipe("", "", "batch_size = 0");
    let path = write(dir.path(), "zero.toml", &text);
    let err = resolve_err(&path, &[]);
    assert!(
        err.contains(&format!("{}:{}", path.display(), line_of(&text, "batch_size"))) && err.contains("run.batch_size"),
        "{err}"
    );
    let path = write(dir.path(), "syntax.toml", "[optim]\nlr = 1e-5\nmax_grad_norm = = 1\n");
    let err = resolve_err(&path, &[]);
    assert!(err.contains(&format!("{}:3", path.display())), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 2. Columns an objective does not use are ignored

/// DPO does not read `reward_chosen` / `reward_rejected` (CoPG does) nor `margin` (the reward
/// model does): odd values there must not stop a DPO run, as they do not stop `logprobs`.
#[test]
fn dpo_ignores_odd_columns_it_does_not_use() {
    let dir = scratch();
    let data = write(
        dir.path(),
        "odd.jsonl",
        "{\"prompt\": \"Q: sky?\\nA:\", \"chosen\": \" blue\", \"rejected\": \" green\", \"reward_chosen\": 1.0}\n\
         {\"prompt\": \"Q: grass?\\nA:\", \"chosen\": \" green\", \"rejected\": \" red\", \"margin\": \"x\"}\n",
    );
    let out = dir.path().join("run");
    let o = candor(&[
        "train",
        "--quiet",
        "--objective",
        "dpo",
        "--model",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--ref-model",
        fixture("llama-tiny/reference").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // CoPG reads the rewards: there the missing one is still an error naming file, line and field.
    let o = candor(&[
        "train",
        "--quiet",
        "--objective",
        "copg",
        "--model",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--ref-model",
        fixture("llama-tiny/reference").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        dir.path().join("copg").to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("odd.jsonl:1") && stderr.contains("reward_rejected"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 3. Tokenization bounded by the length limit, with the same result

/// What the unbounded path gives: tokenize everything, then cut to `max` at the kept end.
fn truncated(mut ids: Vec<u32>, mut mask: Vec<u8>, max: usize, mode: TruncationMode) -> (Vec<u32>, Vec<u8>) {
    if ids.len() > max {
        match mode {
            TruncationMode::KeepStart => {
                ids.truncate(max);
                mask.truncate(max);
            }
            TruncationMode::KeepEnd => {
                let cut = ids.len() - max;
                ids.drain(..cut);
                mask.drain(..cut);
            }
        }
    }
    (ids, mask)
}

/// A long text with everything that makes tokenizers context-dependent: long whitespace runs,
/// words without spaces, digits, punctuation, multi-byte characters and special-token text.
fn long_text(bytes: usize, seed: u64) -> String {
    let parts = [
        "The quick brown fox ",
        "jumps",
        "      ",
        "\n\n",
        "\t",
        "1234567",
        "!!?",
        "héllo wörld ",
        "日本語のテキスト",
        "😀",
        "<|endoftext|>",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "                                                  ",
        " over the lazy dog. ",
        "'s",
        "don't",
    ];
    let mut s = String::new();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    while s.len() < bytes {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push_str(parts[(x >> 33) as usize % parts.len()]);
    }
    s
}

fn check_bounded_equals_unbounded(
    tok: &TextTokenizer,
    tmpl: &ChatTemplate,
    text: &str,
    max: usize,
    mode: TruncationMode,
) {
    let bounded = SequenceTokenizer {
        tokenizer: tok,
        chat_template: Some(tmpl),
        truncation: Truncation { max_length: Some(max), max_prompt_length: None, mode },
    };
    let whole = SequenceTokenizer { tokenizer: tok, chat_template: Some(tmpl), truncation: Truncation::default() };
    let what = format!("{} bytes, max_length {max}, {mode:?}", text.len());
    // `text` rows: either end.
    let w = whole.text(text).unwrap();
    let b = bounded.text(text).unwrap();
    assert_eq!((b.ids, b.completion_mask), truncated(w.ids, w.completion_mask, max, mode), "text row: {what}");
    // Prompt-completion rows in both forms, and conversations.
    let (p, c) = text.split_at((0..=text.len() / 3).rev().find(|&i| text.is_char_boundary(i)).unwrap());
    let pairs = [
        (Text::Plain(p.into()), Text::Plain(c.into())),
        (Text::Chat(vec![msg("user", p)]), Text::Chat(vec![msg("assistant", c)])),
        (Text::Plain("Q: short?\nA:".into()), Text::Plain(text.into())),
    ];
    for (prompt, completion) in &pairs {
        let w = whole.prompt_completion(prompt, completion).unwrap();
        let b = bounded.prompt_completion(prompt, completion).unwrap();
        assert_eq!(
            (b.ids, b.completion_mask),
            truncated(w.ids, w.completion_mask, max, mode),
            "prompt-completion: {what}"
        );
    }
    let conversation =
        [msg("system", "Be brief."), msg("user", p), msg("assistant", c), msg("user", "more"), msg("assistant", p)];
    let w = whole.conversation(&conversation, true).unwrap();
    let b = bounded.conversation(&conversation, true).unwrap();
    assert_eq!((b.ids, b.completion_mask), truncated(w.ids, w.completion_mask, max, mode), "conversation: {what}");
}

#[test]
fn bounded_tokenization_equals_tokenizing_everything_then_truncating() {
    let (tok, tmpl) = tiny_tokenizer();
    for mode in [TruncationMode::KeepStart, TruncationMode::KeepEnd] {
        // Normal rows (shorter than the limit, and a bit longer).
        for (text, max) in [("Question: hi\nAnswer: yes", 64), ("Question: hi\nAnswer: yes", 5), ("a b c", 1), ("", 3)]
        {
            check_bounded_equals_unbounded(&tok, &tmpl, text, max, mode);
        }
        // Long rows: far past the windows the bounded path starts with.
        for (bytes, max, seed) in [(200_000, 64, 1), (60_000, 1, 2), (120_000, 500, 3), (30_000, 2_000, 4)] {
            check_bounded_equals_unbounded(&tok, &tmpl, &long_text(bytes, seed), max, mode);
        }
    }
    // One long whitespace run and one long word: pre-tokens that span the windows' cuts.
    for text in [format!("start{}end", " ".repeat(100_000)), format!("x{}y", "ab".repeat(50_000)), "é".repeat(40_000)]
    {
        for mode in [TruncationMode::KeepStart, TruncationMode::KeepEnd] {
            check_bounded_equals_unbounded(&tok, &tmpl, &text, 64, mode);
        }
    }
}

#[test]
fn randomized_bounded_tokenization_equals_the_unbounded_path() {
    let (tok, tmpl) = tiny_tokenizer();
    let piece = prop::sample::select(vec![
        "a",
        "b",
        "ab",
        " ",
        "  ",
        "\n",
        "\t",
        "é",
        "😀",
        "1",
        "23",
        ".",
        "'s",
        "<|endoftext|>",
        "word ",
        "    x",
    ]);
    let strategy = (prop::collection::vec(piece, 0..1500), 1usize..40, any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 200, failure_persistence: None, ..Config::default() });
    runner
        .run(&strategy, |(pieces, max, keep_end)| {
            let mode = if keep_end { TruncationMode::KeepEnd } else { TruncationMode::KeepStart };
            check_bounded_equals_unbounded(&tok, &tmpl, &pieces.concat(), max, mode);
            Ok(())
        })
        .unwrap();
}

/// Peak resident memory of the largest finished child process, in bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss as u64 * 1024
}

/// A 16 MB `text` line with `--max-length 64`: the whole line used to be tokenized before
/// truncation (a 50 MB line peaked at 12.5 GB); now only a window of the kept end is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_huge_row_is_tokenized_only_as_far_as_the_limit_needs() {
    let dir = scratch();
    let text = long_text(16 << 20, 9);
    let data = write(
        dir.path(),
        "huge.jsonl",
        format!("{}\n{}\n", serde_json::json!({"text": text}), serde_json::json!({"text": "short row"})),
    );
    for mode in ["keep-start", "keep-end"] {
        let o = candor(&[
            "logprobs",
            "--model",
            fixture("llama-tiny/policy").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-length",
            "64",
            "--truncation-mode",
            mode,
        ]);
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        let rows: Vec<serde_json::Value> =
            String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2);
        let peak = children_peak_rss();
        assert!(peak < 1 << 30, "{mode}: peak memory {} MB for a 16 MB row at max_length 64", peak >> 20);
    }
    // Where no limit bounds the work (keep_end and a prompt limit), a row over 4 MiB is refused
    // with its file and line instead of being tokenized whole.
    let data = write(
        dir.path(),
        "huge_prompt.jsonl",
        format!("{}\n", serde_json::json!({"prompt": long_text(5 << 20, 3), "completion": " ok"})),
    );
    let o = candor(&[
        "logprobs",
        "--model",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("huge_prompt.jsonl:1") && stderr.contains("4 MiB"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 4. Byte-order marks, line ends, bytes that are not UTF-8, conversation roles

#[test]
fn a_byte_order_mark_and_crlf_line_ends_are_accepted() {
    let dir = scratch();
    let path = write(dir.path(), "bom.jsonl", "\u{feff}{\"text\": \"first\"}\r\n{\"text\": \"second\"}\r\n");
    let d = read_jsonl(&path, false).unwrap();
    assert_eq!(d.rows.len(), 2);
    assert!(matches!(&d.rows[0].example, Example::LanguageModeling { text } if text == "first"));
    // Only at the very start: elsewhere it is part of the line, which is then not JSON.
    let path = write(dir.path(), "bom2.jsonl", "{\"text\": \"first\"}\n\u{feff}{\"text\": \"second\"}\n");
    let err = read_jsonl(&path, false).unwrap_err();
    assert_eq!(err.line, 2);
}

#[test]
fn a_line_that_is_not_utf8_is_a_bad_row_with_its_line() {
    let dir = scratch();
    let path =
        write(dir.path(), "latin1.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n{\"text\": \"also ok\"}\n");
    let err = read_jsonl(&path, false).unwrap_err();
    assert_eq!(err.line, 2, "{err}");
    assert!(err.to_string().contains("latin1.jsonl:2") && err.to_string().contains("UTF-8"), "{err}");
    let d = read_jsonl(&path, true).unwrap();
    assert_eq!(d.rows.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(d.skipped.iter().map(|e| e.line).collect::<Vec<_>>(), [2]);
}

#[test]
fn conversations_without_an_assistant_turn_or_with_unknown_roles_name_the_row_and_the_role() {
    let dir = scratch();
    let cases = [
        (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, "no `assistant` turn", "user"),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "hello"}]}"#,
            "`Assistant`",
            "did you mean `assistant`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hello"}]}"#,
            "`wizard`",
            "system, developer, user, assistant, tool",
        ),
        (r#"{"messages": []}"#, "no `assistant` turn", "none"),
    ];
    for (row, what, detail) in cases {
        let path = write(dir.path(), "chat.jsonl", format!("{{\"text\": \"fine\"}}\n{row}\n"));
        let err = read_jsonl(&path, false).unwrap_err();
        let text = err.to_string();
        assert_eq!((err.line, err.field.as_deref()), (2, Some("messages")), "{text}");
        assert!(text.contains("chat.jsonl:2") && text.contains(what) && text.contains(detail), "{text}");
    }
    // Roles are checked in every conversational column, each naming its own.
    let path = write(
        dir.path(),
        "pairs.jsonl",
        r#"{"prompt": [{"role": "User", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
    );
    let err = read_jsonl(&path, false).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("prompt"), "{err}");
    assert!(err.to_string().contains("did you mean `user`"), "{err}");
    // The same conversation through `candor logprobs` is refused at reading, not as "raise max_length".
    let path = write(dir.path(), "no_assistant.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    let o = candor(&[
        "logprobs",
        "--model",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--data",
        path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("no_assistant.jsonl:1")
            && stderr.contains("no `assistant` turn")
            && !stderr.contains("max_length"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Randomized inputs: no panic, and every error names the file

/// One random edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Replace(usize, u8),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len();
        match e {
            Edit::Insert(at, b) => {
                let at = at % (n + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Delete(at, len) if n > 0 => {
                let at = at % n;
                bytes.drain(at..(at + len).min(n));
            }
            Edit::Replace(at, b) if n > 0 => bytes[at % n] = *b,
            Edit::Duplicate(at, len) if n > 0 => {
                let at = at % n;
                let span = bytes[at..(at + len).min(n)].to_vec();
                bytes.splice(at..at, span);
            }
            Edit::Truncate(at) => bytes.truncate(at % (n + 1)),
            _ => {}
        }
    }
    bytes
}

/// Edits drawn from bytes that matter to the format (`alphabet`) and arbitrary bytes.
fn edits(alphabet: &'static [&'static str]) -> impl Strategy<Value = Vec<Edit>> {
    let chunk = prop_oneof![
        3 => prop::sample::select(alphabet).prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ];
    let edit = prop_oneof![
        4 => (any::<usize>(), chunk).prop_map(|(a, b)| Edit::Insert(a, b)),
        3 => (any::<usize>(), 1usize..12).prop_map(|(a, l)| Edit::Delete(a, l)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Replace(a, b)),
        1 => (any::<usize>(), 1usize..40).prop_map(|(a, l)| Edit::Duplicate(a, l)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..6)
}

const JSON_BITS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "\n",
    "\r\n",
    "\u{feff}",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "1e999",
    "-0",
    "\"role\"",
    "\"content\"",
    "\"assistant\"",
    "\"Assistant\"",
    "\"wizard\"",
    "\"messages\"",
    "\"prompt\"",
    "\"chosen\"",
    "\"rejected\"",
    "\"completion\"",
    "\"label\"",
    "\"text\"",
    "[{\"role\": \"user\", \"content\": \"x\"}]",
    "\"reward_chosen\"",
    "\"margin\"",
    "é",
    "\u{0}",
    "\u{ff}",
    "    ",
];

#[test]
fn randomized_jsonl_inputs_never_panic_and_errors_name_the_file() {
    let dir = scratch();
    let path = dir.path().join("mutated.jsonl");
    let shown = path.display().to_string();
    let take = |rel: &str, n: usize| -> String {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap();
        text.lines().take(n).map(|l| format!("{l}\n")).collect()
    };
    let seeds: Vec<String> = vec![
        take("tests/fixtures/shipped-v1/preference/train.jsonl", 2),
        take("tests/fixtures/shipped-v1/sft/train.jsonl", 2),
        [
            r#"{"prompt": "Q:", "chosen": " yes", "rejected": " no", "reward_chosen": 1, "reward_rejected": 0, "margin": 0.5}"#,
            r#"{"prompt": "Q:", "completion": " yes", "label": true}"#,
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
            r#"{"text": "plain text"}"#,
            r#"{"chosen": "The sky is blue.", "rejected": "The sky is green."}"#,
            r#"{"prompt": [{"role": "user", "content": "hi"}]}"#,
        ]
        .join("\n"),
    ];
    let (tok, tmpl) = tiny_tokenizer();
    let st = SequenceTokenizer {
        tokenizer: &tok,
        chat_template: Some(&tmpl),
        truncation: Truncation { max_length: Some(16), max_prompt_length: None, mode: TruncationMode::KeepStart },
    };
    let strategy = (0..seeds.len(), edits(JSON_BITS), any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 2_000, failure_persistence: None, ..Config::default() });
    runner
        .run(&strategy, |(seed, edits, skip)| {
            let bytes = apply(seeds[seed].as_bytes().to_vec(), &edits);
            std::fs::write(&path, &bytes).unwrap();
            let lines = bytes.split(|&b| b == b'\n').count();
            match read_jsonl(&path, skip) {
                Ok(d) => {
                    for e in &d.skipped {
                        prop_assert_eq!(&e.file, &path);
                        prop_assert!(e.to_string().starts_with(&format!("{shown}:{}:", e.line)), "{}", e);
                        prop_assert!(e.line >= 1 && e.line <= lines, "{}", e);
                    }
                    // Whatever was read also tokenizes without a panic (errors are fine).
                    for row in &d.rows {
                        let _ = candor::scoring::row_sequences(&st, &row.example);
                    }
                }
                Err(e) => {
                    prop_assert_eq!(&e.file, &path);
                    prop_assert!(e.to_string().starts_with(&shown), "{}", e);
                    prop_assert!(e.line <= lines, "{}", e);
                }
            }
            Ok(())
        })
        .unwrap();
}

const TOML_BITS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "=",
    "\"",
    "'",
    "\"\"\"",
    ".",
    ",",
    "\n",
    "#",
    "{",
    "}",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e400",
    "9223372036854775807",
    "18446744073709551616",
    "true",
    "1979-05-27T07:32:00Z",
    "\u{feff}",
    "\\",
    "\\u0000",
    "objective",
    "name",
    "\"dpo\"",
    "\"sft\"",
    "optim",
    "run",
    "model",
    "data",
    "lora",
    "online",
    "distill",
    "device",
    "dtype",
    "\"cdu\"",
    "output",
    "\"\"",
    "max_steps",
    "batch_size",
    "r",
    "alpha",
    "é",
];

#[test]
fn randomized_toml_recipes_never_panic_and_errors_name_the_file() {
    let dir = scratch();
    let path = dir.path().join("mutated.toml");
    let shown = path.display().to_string();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seeds: Vec<String> = std::fs::read_dir(&configs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "the recipes in configs/");
    let strategy = (0..seeds.len(), edits(TOML_BITS));
    let mut runner = TestRunner::new(Config { cases: 2_000, failure_persistence: None, ..Config::default() });
    runner
        .run(&strategy, |(seed, edits)| {
            let bytes = apply(seeds[seed].as_bytes().to_vec(), &edits);
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = TrainConfig::resolve(Some(&path), &[]) {
                // The headline names the file (a reader sees it first).
                prop_assert!(e.to_string().contains(&shown), "{:#}", e);
            }
            Ok(())
        })
        .unwrap();
}
