//! Helpers shared by the integration tests: fixture paths, JSON access, tolerances.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle::{DType, Device};
use candor::load::{load_hf_dir, LoadedModel};
use candor::model::Kernels;
use serde_json::Value;

/// A fresh temporary directory under cargo's per-target scratch space (`CARGO_TARGET_TMPDIR`),
/// on the disk that already holds the build, not on a possibly small `/tmp`: the SmolLM2 runs
/// write checkpoints of hundreds of megabytes.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("cannot create a scratch directory")
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Parse a JSON fixture.
pub fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

/// A JSON array of numbers as f64.
pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

/// A JSON array of integers as u32.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The device the golden tests run on: the CPU, or `CANDOR_TEST_DEVICE` (`cuda`, `cuda:N`,
/// `metal`; `scripts/gpu-check.sh` sets it on a GPU machine).
pub fn test_device() -> Device {
    let name = std::env::var("CANDOR_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match name.as_str() {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0).unwrap(),
        cuda => Device::new_cuda(cuda.strip_prefix("cuda:").map_or(0, |n| n.parse().unwrap())).unwrap(),
    }
}

/// Load a fixture model directory in f32 on [`test_device`].
pub fn load(rel: &str) -> LoadedModel {
    load_hf_dir(&fixture(rel), DType::F32, &test_device()).unwrap()
}

/// Both kernel paths: every golden test runs on each.
pub const KERNELS: [Kernels; 2] = [Kernels::Plain, Kernels::Fused];

/// [`load`] with the given kernels.
pub fn load_kernels(rel: &str, kernels: Kernels) -> LoadedModel {
    let mut m = load(rel);
    m.model.set_kernels(kernels);
    m
}

/// Every value of `t` (flattened), as f64.
pub fn values(t: &candle::Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// The first `n` values of `t` (flattened), as f64.
pub fn first_values(t: &candle::Tensor, n: usize) -> Vec<f64> {
    values(&t.flatten_all().unwrap().narrow(0, 0, n).unwrap())
}

pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w} (tolerance {tol})");
    }
}

/// Assert `|a - b| <= tol * max(|b|, 1e-12)` elementwise.
pub fn assert_rel(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1e-12), "{what}[{i}]: got {g}, want {w} (relative tolerance {tol})");
    }
}

/// The lines of a run's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first `n` lines of a repository file `src`, written to `dest`.
pub fn head_lines(src: &str, n: usize, dest: &Path) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(src)).unwrap();
    std::fs::write(dest, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// `candor train --quiet` from the repository root with `args`; panics with its stderr on
/// failure.
pub fn candor_train(args: &[&str]) {
    let o = candor(&[&["train", "--quiet"], args].concat());
    assert!(o.status.success(), "candor train {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Run the `candor` binary from the repository root.
pub fn candor(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_candor"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

/// A metric of every line that has it.
pub fn series(lines: &[Value], key: &str) -> Vec<f64> {
    lines.iter().filter_map(|l| l.get(key)?.as_f64()).collect()
}

/// The tiny Llama fixture's three preference pairs (`expected.json`'s `examples`) as JSONL.
pub fn write_examples(path: &Path) {
    let exp = json("llama-tiny/expected.json");
    let rows: String = exp["examples"].as_array().unwrap().iter().map(|ex| format!("{ex}\n")).collect();
    std::fs::write(path, rows).unwrap();
}

/// A scripted HTTP server on 127.0.0.1 for tests (an OpenAI-compatible judge that fails, say):
/// the n-th request (0-based) is answered with `reply(n, head)` as `(status, JSON body)`, where
/// `head` is the request line and headers. It serves at most `max_requests` requests and stops
/// accepting after `lifetime`; every answer carries `Retry-After: 0`. Returns the base URL
/// (`http://127.0.0.1:PORT/v1`) and the count of requests served.
pub fn http_server(
    max_requests: usize,
    lifetime: std::time::Duration,
    reply: impl Fn(usize, &str) -> (u16, String) + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served = count.clone();
    let reply = std::sync::Arc::new(reply);
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + lifetime;
        while served.load(Ordering::SeqCst) < max_requests && std::time::Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    continue;
                }
            };
            let n = served.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            std::thread::spawn(move || {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut head, mut length) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length.min(1 << 20)];
                let _ = reader.read_exact(&mut body);
                let (status, body) = reply(n, &head);
                let reason = match status {
                    200 => "OK",
                    401 => "Unauthorized",
                    429 => "Too Many Requests",
                    500 => "Internal Server Error",
                    _ => "Status",
                };
                let _ = write!(stream, "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 0\r\nConnection: close\r\n\r\n{body}", body.len());
            });
        }
    });
    (url, count)
}

/// A chat completion whose message content is `text` (what an OpenAI-compatible server sends).
pub fn chat_completion(text: &str) -> String {
    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": text}}]}).to_string()
}

/// The value of header `name` (case-insensitive) in a request head, or "".
pub fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
        .unwrap_or("")
}

/// Greedy decoding of `user` (as a chat turn, then `prefix` tokenized on its own, as
/// `candor generate --hindsight-prefix` builds it) recomputed without a KV cache: each new
/// token is the argmax of a full forward pass over everything so far.
pub fn greedy_by_full_forward(
    model: &Path,
    user: &str,
    prefix: Option<&str>,
    max_new_tokens: usize,
) -> (Vec<u32>, String) {
    use candor::data::{SequenceTokenizer, Text, Truncation};
    let m = candor::load::load_model(model.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let tok = SequenceTokenizer {
        tokenizer: &m.tokenizer,
        chat_template: m.chat_template.as_ref(),
        truncation: Truncation::default(),
    };
    let mut ids =
        tok.prompt_ids(&Text::Chat(vec![candor::load::Message { role: "user".into(), content: user.into() }])).unwrap();
    if let Some(prefix) = prefix {
        ids.extend(m.tokenizer.encode(prefix, false).unwrap());
    }
    let mut new = Vec::new();
    while new.len() < max_new_tokens {
        let input = candle::Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = m.model.forward(&input, Default::default(), None).unwrap();
        let last: Vec<f32> = logits.get(0).unwrap().get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let next = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
        if m.eos_token_ids.contains(&next) {
            break;
        }
        new.push(next);
        ids.push(next);
    }
    let text = m.tokenizer.decode(&new, true).unwrap();
    (new, text)
}

/// Prompts whose regex constraint the tiny model's random answers meet about half the time.
pub fn tiny_prompts(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let lines: Vec<String> = ["apple", "river", "stone", "cloud", "green", "light"]
        .iter()
        .map(|w| format!("{{\"prompt\": \"Say {w}\", \"constraint\": {{\"type\": \"regex\", \"value\": \"[ae]\"}}}}"))
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}
