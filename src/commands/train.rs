//! `candor train`: resolve the configuration (recipe < `--set` < flags), then run the loop;
//! `--help-objective` describes the objectives from the registry's table.

use anyhow::{Context, Result};
use candor_alignment::{JudgeNeed, LoopKind, Objective};

use crate::cli::{GlobalArgs, TrainArgs, TRAIN_FLAGS};
use crate::train::config::parse_set;
use crate::train::{train, RunOptions, TrainConfig};

/// Run `candor train`.
pub fn run(args: &TrainArgs, global: &GlobalArgs) -> Result<()> {
    if args.help_objective {
        print!("{}", objective_help(args.objective.objective.as_deref())?);
        return Ok(());
    }
    let cfg = resolve(args, global)?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let timeout = std::time::Duration::from_secs_f64(cfg.run.collective_timeout);
    let on_gpu = cfg.model.device.starts_with("cuda");
    let dist = crate::distributed::from_environment(timeout, on_gpu)?;
    let opts = RunOptions { quiet: args.quiet, resume: args.resume.is_some(), dist: dist.clone() };
    match train(&cfg, &opts) {
        Ok(summary) => {
            if dist.is_main() {
                println!("trained {} steps; final model: {}", summary.steps, summary.final_dir.display());
            }
            Ok(())
        }
        Err(err) if dist.world_size() > 1 => {
            // The other ranks may be waiting in a collective this one will never reach: say
            // what failed here, then end them all.
            eprintln!("error: rank {}: {err}", dist.rank());
            for cause in err.chain().skip(1) {
                eprintln!("  Caused by: {cause}");
            }
            dist.abort(2)
        }
        Err(err) => Err(err),
    }
}

/// The configuration a command line asks for.
pub fn resolve(args: &TrainArgs, global: &GlobalArgs) -> Result<TrainConfig> {
    let recipe = match &args.resume {
        Some(run) => Some(run.join("config.toml")),
        None => args.config.clone(),
    };
    // `--set` first, so that flags, pushed after, win over it.
    let mut overrides: Vec<(String, toml::Value)> = args.set.iter().map(|a| parse_set(a)).collect::<Result<_>>()?;
    if args.resume.is_none() {
        // A resumed run keeps its own device, dtype and kernels.
        overrides.extend(global_settings(global, args.config.is_some()));
    }
    overrides.extend(flag_settings(args)?);
    TrainConfig::resolve(recipe.as_deref(), &overrides).with_context(|| match &recipe {
        Some(p) => format!("cannot build the training configuration from `{}`", p.display()),
        None => "cannot build the training configuration".to_string(),
    })
}

/// `--device`, `--dtype` and `--kernels` as settings: all of them without a recipe, with one
/// only those not at their command-line defaults (the recipe's own win over the defaults);
/// `--chat-template` and `--base-quant` whenever they are given.
fn global_settings(global: &GlobalArgs, recipe: bool) -> Vec<(String, toml::Value)> {
    let default_kernels = crate::model::Kernels::default().to_string();
    [
        ("model.device", global.device.clone(), "cpu".to_string()),
        ("model.dtype", global.dtype.clone(), "f32".to_string()),
        ("model.kernels", global.kernels.to_string(), default_kernels),
    ]
    .into_iter()
    .filter(|(_, value, default)| !recipe || value != default)
    .map(|(key, value, _)| (key.to_string(), toml::Value::String(value)))
    .chain(
        global
            .chat_template
            .iter()
            .map(|p| ("model.chat_template".to_string(), toml::Value::String(p.display().to_string()))),
    )
    .chain(
        global.base_quant.map(|k| {
            ("model.base_quant".to_string(), toml::Value::String(crate::model::packed::kind_name(k).to_string()))
        }),
    )
    .collect()
}

/// The settings the flags give, through [`TRAIN_FLAGS`]: every flag given and every switch on.
fn flag_settings(args: &TrainArgs) -> Result<Vec<(String, toml::Value)>> {
    // TOML, not JSON: a flag given as NaN must reach validation as NaN, and a flag not given
    // (`None`) is simply absent.
    let fields = match toml::Value::try_from(args)? {
        toml::Value::Table(fields) => fields,
        other => anyhow::bail!("the training flags serialize as a map, not {other}"),
    };
    let mut settings = Vec::new();
    for (field, key) in TRAIN_FLAGS {
        match fields.get(*field) {
            None | Some(toml::Value::Boolean(false)) => {}
            Some(value) => settings.push((key.to_string(), value.clone())),
        }
    }
    Ok(settings)
}

/// `--help-objective`: one objective described, or (without a name) the list of them.
pub fn objective_help(name: Option<&str>) -> Result<String> {
    let Some(name) = name else {
        let mut out = "Objectives (`candor train --objective NAME --help-objective` describes one):\n".to_string();
        let width = Objective::SPECS.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in Objective::SPECS {
            out += &format!("  {:width$}  {:8} {}\n", s.name, s.loop_kind.name(), s.help);
        }
        return Ok(out);
    };
    let objective = Objective::default_for(name)?;
    let spec = objective.spec();
    let mut out = format!("{}: {}\n", spec.name, spec.help);
    out += &format!("loop: {}: {}\n", spec.loop_kind.name(), spec.loop_kind.description());
    out += &format!("data: {}\n", spec.data_need.description());
    for fact in objective_facts(&objective) {
        out += &format!("{fact}\n");
    }
    out += "\nSettings (`--set objective.KEY=VALUE`, or the flag), with their defaults:\n";
    let settings = objective_settings(&objective)?;
    let width = settings.iter().map(|(s, _)| s.chars().count()).max().unwrap_or(0);
    for (setting, flag) in &settings {
        out += format!("  {setting:width$}  {flag}").trim_end();
        out += "\n";
    }
    if settings.is_empty() {
        out += "  (none)\n";
    }
    Ok(out)
}

/// What the objective needs beyond its data, one line each, from its row of the registry.
fn objective_facts(objective: &Objective) -> Vec<String> {
    let spec = objective.spec();
    let mut needs = Vec::new();
    if objective.needs_reference() {
        needs.push("a frozen reference (`--ref-model`; default: a copy of the starting policy)");
    }
    if objective.needs_teacher() {
        needs.push("a frozen teacher (`--teacher`, `[distill]`)");
    }
    if spec.value_head {
        needs.push("a scalar value head, trained with the policy");
    }
    if spec.previous_iterate {
        needs.push("the previous iterate's log-probs of every pair");
    }
    if spec.pair_rewards {
        needs.push("scalar rewards on every pair (`reward_chosen`/`reward_rejected`, or `objective.reward_judge`)");
    }
    let mut facts: Vec<String> = needs.into_iter().map(|n| format!("needs: {n}")).collect();
    match spec.judge {
        JudgeNeed::None => {}
        JudgeNeed::Any => facts.push("judge: `--judge` verifier:NAME, rm:DIR, llm:MODEL or openai:URL".into()),
        JudgeNeed::Verifier => facts.push("judge: `--judge verifier:NAME` (right and wrong answers)".into()),
    }
    if spec.loop_kind == LoopKind::Online {
        facts.push(format!("samples per prompt: at least {} (`--samples-per-prompt`)", spec.fewest_samples_per_prompt));
    }
    if spec.teacher_pool {
        facts.push("teacher answers may join the pools: `--teacher-outputs FILE`, `--teacher-model MODEL`".into());
    }
    facts
}

/// Every `objective.KEY = default` of the objective's default configuration (serialized), each
/// with the flag that sets it, if one does.
fn objective_settings(objective: &Objective) -> Result<Vec<(String, String)>> {
    let serde_json::Value::Object(fields) = serde_json::to_value(objective)? else {
        anyhow::bail!("objective `{}` does not serialize as a table", objective.name());
    };
    let mut settings = Vec::new();
    for (key, value) in fields.iter().filter(|(key, _)| *key != "name") {
        let setting = match value {
            serde_json::Value::Null => format!("objective.{key} (unset)"),
            value => format!("objective.{key} = {}", toml::Value::try_from(value)?),
        };
        let config_key = format!("objective.{key}");
        let flag = TRAIN_FLAGS.iter().find(|(_, k)| *k == config_key).map(|(field, _)| field.replace('_', "-"));
        settings.push((setting, flag.map(|f| format!("--{f}")).unwrap_or_default()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn resolved(flags: &[&str]) -> TrainConfig {
        let cli = Cli::try_parse_from([&["candor", "train"], flags].concat()).unwrap();
        let Command::Train(args) = cli.command else { panic!("not train") };
        resolve(&args, &cli.global).unwrap()
    }

    #[test]
    fn flags_set_their_keys_and_win_over_set() {
        let cfg = resolved(&[
            "--objective=rdpo",
            "--epsilon=0.2",
            "--beta=1",
            "--set=objective.beta=0.5",
            "--data=t.jsonl",
            "--output=out",
            "--lr=1e-5",
            "--max-steps=7",
            "--lora-r=4",
            "--lora-targets=q_proj,k_proj",
            "--scheduler=constant",
            "--save-only-model",
        ]);
        let Objective::Rdpo(r) = &cfg.objective else { panic!("{:?}", cfg.objective) };
        assert_eq!((r.epsilon, r.beta), (0.2, 1.0));
        assert_eq!(cfg.data.train.as_deref(), Some(std::path::Path::new("t.jsonl")));
        assert_eq!((cfg.optim.lr, cfg.run.max_steps), (1e-5, Some(7)));
        assert_eq!(cfg.optim.scheduler, crate::train::optim::Scheduler::Constant);
        assert!(cfg.run.save_only_model && !cfg.run.packing);
        let lora = cfg.lora.unwrap();
        assert_eq!((lora.r, lora.targets), (4, vec!["q_proj".to_string(), "k_proj".to_string()]));
        assert_eq!(cfg.model.device, "cpu");
    }

    #[test]
    fn help_objective_lists_every_setting_with_its_default_and_flag() {
        let dpo = objective_help(Some("dpo")).unwrap();
        for line in ["dpo: Direct Preference", "loop: offline", "data: preference pairs", "needs: a frozen reference"] {
            assert!(dpo.contains(line), "{line}: {dpo}");
        }
        assert!(dpo.lines().any(|l| l.contains("objective.beta = 0.1") && l.ends_with("--beta")), "{dpo}");
        assert!(dpo.contains("objective.reference_free = false"), "{dpo}");
        let nft = objective_help(Some("nft")).unwrap();
        assert!(nft.contains("loop: online") && nft.contains("verifier:NAME") && nft.contains("at least 2"), "{nft}");
        assert!(objective_help(Some("copg")).unwrap().contains("objective.reward_judge (unset)"));
        assert!(objective_help(Some("sft")).unwrap().contains("(none)"));
        let all = objective_help(None).unwrap();
        assert_eq!(all.lines().count(), 1 + Objective::NAMES.len(), "{all}");
        let err = objective_help(Some("dpoo")).unwrap_err().to_string();
        assert!(err.contains("known: sft, dpo"), "{err}");
    }
}
