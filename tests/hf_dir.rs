//! Local transformers directories: sharded weights, chat templates from each place
//! transformers keeps them, and `generation_config.json` stop tokens.

mod common;

use std::collections::HashMap;

use candle::{DType, Device, Tensor};
use candor::load::{load_hf_dir, Message, ModelSource};
use common::*;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn logits(m: &candor::load::LoadedModel) -> Tensor {
    let ids = Tensor::new(&[[320u32, 29, 335, 269, 382, 266]], &Device::Cpu).unwrap();
    m.model.forward(&ids, Default::default(), None).unwrap()
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let dir = common::scratch();
    copy_dir(&fixture("llama-tiny/policy"), dir.path());
    let single = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let weights = candle::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let shard: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
        candle::safetensors::save(&shard, dir.path().join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let diff =
        (logits(&single) - logits(&sharded)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn chat_template_comes_from_jinja_file_or_tokenizer_config() {
    let msgs = [Message { role: "user".into(), content: "hi".into() }];
    let dir = common::scratch();
    copy_dir(&fixture("llama-tiny/policy"), dir.path());
    let from_file = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let want = from_file.chat_template.as_ref().unwrap().render(&msgs, true).unwrap();
    assert_eq!(want, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    let src = std::fs::read_to_string(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    for value in [
        serde_json::json!(src),
        serde_json::json!([{"name": "tool_use", "template": "x"}, {"name": "default", "template": src}]),
    ] {
        cfg["chat_template"] = value;
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.chat_template.as_ref().unwrap().render(&msgs, true).unwrap(), want);
    }
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap().chat_template.is_none());
}

#[test]
fn generation_config_adds_stop_tokens() {
    let dir = common::scratch();
    copy_dir(&fixture("llama-tiny/policy"), dir.path());
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [1, 2]}"#).unwrap();
    let m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.eos_token_ids, vec![1, 2]);
}

#[test]
fn model_sources_are_told_apart() {
    let dir = fixture("llama-tiny/policy");
    assert_eq!(ModelSource::parse("default").unwrap(), ModelSource::Preset(&candor::load::default_model::PRESETS[0]));
    assert_eq!(
        ModelSource::parse("gemma3-270m").unwrap(),
        ModelSource::Preset(&candor::load::default_model::PRESETS[1])
    );
    assert_eq!(ModelSource::parse(dir.to_str().unwrap()).unwrap(), ModelSource::Dir(dir.clone()));
    assert_eq!(ModelSource::parse("org/name@v1.0").unwrap(), ModelSource::Hub("org/name@v1.0".into()));
    assert!(ModelSource::parse("missing.gguf").unwrap_err().to_string().contains("not found"));
    let cfg = dir.join("config.json");
    assert!(ModelSource::parse(cfg.to_str().unwrap()).unwrap_err().to_string().contains("not a `.gguf`"));
}
