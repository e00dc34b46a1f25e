//! The one table of objectives: the names users type, their configurations, their loss
//! functions, what each needs (loop, data, reference, judge, ...) and their one-line help.
//! Adding an objective adds one row to the `objectives!` table; the enum, `NAMES`, `SPECS`,
//! `default_for`, `validate` and `compute` are generated from it.

use serde::{Deserialize, Serialize};

use crate::objectives::{
    copg, dac_kl, dno, dpo, grpo, hindsight, inpo, kd, kdrl, kto, nft, orpo, rdpo, reward, rpo, sft, simpo, sinkd, spo,
    text2grad, ObjectiveOutput, PairLogps, PairScores, SequenceLogps, StepScale,
};
use crate::{AlignError, Result};

/// Generates, from the table's rows, the `Objective` enum (serde tag = the name) and everything
/// that follows a row: `SPECS`, `NAMES`, `spec`, `name`, `default_for`, `validate`, `compute`.
macro_rules! objectives {
    ($($name:literal => $variant:ident($config:ty), $input:ident => $loss:path, $facts:expr, $help:literal;)*) => {
        /// A training objective and its hyper-parameters (TOML: `[objective] name = "dpo"`, ...).
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "name")]
        pub enum Objective {
            $(#[doc = $help] #[serde(rename = $name)] $variant($config),)*
        }

        impl Objective {
            /// Every objective's row of the registry, in registry order.
            pub const SPECS: &'static [ObjectiveSpec] = &[$(ObjectiveSpec { name: $name, help: $help, ..$facts }),*];

            /// Every objective name, in registry order, with a one-line description.
            pub const NAMES: &'static [(&'static str, &'static str)] = &[$(($name, $help)),*];

            /// This objective's row of the registry.
            pub fn spec(&self) -> &'static ObjectiveSpec {
                match self {
                    $(Objective::$variant(_) => {
                        const SPEC: ObjectiveSpec = ObjectiveSpec { name: $name, help: $help, ..$facts };
                        &SPEC
                    })*
                }
            }

            /// The objective with its paper defaults, by name.
            pub fn default_for(name: &str) -> Result<Self> {
                match name {
                    $($name => Ok(Objective::$variant(Default::default())),)*
                    other => Err(unknown_objective(other)),
                }
            }

            /// Check the hyper-parameters.
            pub fn validate(&self) -> Result<()> {
                match self {
                    $(Objective::$variant(c) => c.validate(),)*
                }
            }

            /// Loss and metrics of one micro-batch.
            pub fn compute(&self, input: &ObjectiveInput, scale: &StepScale) -> Result<ObjectiveOutput> {
                match (self, input) {
                    $((Objective::$variant(c), ObjectiveInput::$input(x)) => $loss(x, c, scale),)*
                    _ => Err(AlignError::InvalidConfig {
                        objective: self.name(),
                        field: "data",
                        reason: format!("needs {}", self.data_need().description()),
                    }),
                }
            }
        }
    };
}

// THE table: one row per objective. `name => Variant(config), input => loss, row facts, help;`
// The name is also the serde tag, the help also the variant's documentation.
objectives! {
    "sft" => Sft(sft::SftConfig), Sequences => sft::loss, offline(DataNeed::Sequences),
        "supervised fine-tuning: NLL of the completion tokens";
    "dpo" => Dpo(dpo::DpoConfig), Pairs => dpo::loss, offline(DataNeed::Pairs).with_reference(),
        "Direct Preference Optimization (sigmoid / ipo / hinge; label smoothing = cDPO)";
    "rdpo" => Rdpo(rdpo::RdpoConfig), Pairs => rdpo::loss, offline(DataNeed::Pairs).with_reference(),
        "provably robust DPO under preference-label flips at an assumed rate epsilon";
    "rpo" => Rpo(rpo::RpoConfig), Pairs => rpo::loss, offline(DataNeed::Pairs).with_reference(),
        "DPO + alpha x NLL on the chosen completions (TRL's rpo_alpha)";
    "spo" => Spo(spo::SpoConfig), Pairs => spo::loss, offline(DataNeed::Pairs).with_reference(),
        "Self-supervised Preference Optimization: base loss + key-content degree classifier";
    "simpo" => Simpo(simpo::SimpoConfig), Pairs => simpo::loss, offline(DataNeed::Pairs),
        "SimPO: reference-free, length-normalised log-probs with a target margin gamma (TRL's CPO loss_type simpo)";
    "orpo" => Orpo(orpo::OrpoConfig), Pairs => orpo::loss, offline(DataNeed::Pairs).with_prompt_nll(),
        "ORPO: NLL on the chosen answers plus beta x the log odds ratio, no reference model";
    "kto" => Kto(kto::KtoConfig), Unpaired => kto::loss, offline(DataNeed::Unpaired).with_reference(),
        "KTO: unpaired desirable/undesirable answers against a batch-level KL reference point";
    "copg" => Copg(copg::CopgConfig), Pairs => copg::loss,
        offline(DataNeed::Pairs).with_reference().with_pair_rewards(),
        "Contrastive Policy Gradient on pairs with scalar rewards (reward_chosen/reward_rejected)";
    "hindsight" => Hindsight(hindsight::HindsightConfig), Sequences => hindsight::loss,
        offline(DataNeed::Hindsight),
        "Chain of Hindsight: feedback-conditioned sequences, NLL on the answers";
    "reward" => Reward(reward::RewardConfig), Scores => reward::loss, offline(DataNeed::ScoredPairs),
        "reward model: Bradley-Terry on a scalar head (margin, centering)";
    "inpo" => Inpo(inpo::InpoConfig), Pairs => inpo::loss,
        online(DataNeed::Pairs, JudgeNeed::Any, 2).with_reference().with_previous_iterate(),
        "Iterative Nash Policy Optimization against the reference and the previous iterate";
    "dno" => Dno(dno::DnoConfig), Pairs => dno::loss, online(DataNeed::Pairs, JudgeNeed::Any, 2).with_teacher_pool(),
        "Direct Nash Optimization, best-vs-worst judged samples against the previous iterate";
    "nft" => Nft(nft::NftConfig), Tokens => nft::loss, online(DataNeed::Rollouts, JudgeNeed::Verifier, 2),
        "NFT: Negative-aware Fine-Tuning on verifier-labelled samples";
    "text2grad" => Text2grad(text2grad::Text2GradConfig), Ppo => text2grad::loss,
        online(DataNeed::TokenRewards, JudgeNeed::Any, 1).with_reference().with_value_head(),
        "Text2Grad: span-level rewards from natural-language critiques, token-level PPO with a value head";
    "grpo" => Grpo(grpo::GrpoConfig), Grpo => grpo::loss, online(DataNeed::GroupRollouts, JudgeNeed::Any, 2),
        "GRPO: group-relative advantages from any judge (or a weighted sum), clipped token surrogate, optional KL (TRL's loss types dapo / grpo / dr_grpo / bnpo)";
    "kd" => Kd(kd::KdConfig), Distill => kd::loss, distill(),
        "knowledge distillation: forward KL (beta 0), reverse KL (beta 1) or generalized JSD to a frozen teacher";
    "sinkd" => Sinkd(sinkd::SinkdConfig), Distill => sinkd::loss, distill(),
        "SinKD: Sinkhorn distance between teacher and student distributions, with KD and CE";
    "dac_kl" => DacKl(dac_kl::DacKlConfig), Distill => dac_kl::loss, distill(),
        "DAC-KL: KL on the teacher's adaptively clipped high-density region, with SFT and span terms";
    "kdrl" => Kdrl(kdrl::KdrlConfig), Kdrl => kdrl::loss,
        online(DataNeed::TeacherRollouts, JudgeNeed::Verifier, 2),
        "KDRL: GRPO on verifier rewards plus a reverse-KL pull towards a teacher (k2/k3, annealed, reward-masked)";
}

/// Which training loop runs an objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopKind {
    /// Epochs over a fixed dataset.
    Offline,
    /// Rounds of sample → judge → train on the policy's own answers to `online.prompts`.
    Online,
    /// Epochs over a dataset scored by a frozen teacher (`[distill]`).
    Distill,
}

impl LoopKind {
    /// The loop's name in help texts.
    pub fn name(self) -> &'static str {
        match self {
            LoopKind::Offline => "offline",
            LoopKind::Online => "online",
            LoopKind::Distill => "distill",
        }
    }

    /// One line on what the loop does.
    pub fn description(self) -> &'static str {
        match self {
            LoopKind::Offline => "epochs over a fixed dataset (`data.train`)",
            LoopKind::Online => "rounds of sample -> judge -> train on the policy's own answers (`online.prompts`)",
            LoopKind::Distill => "epochs over sequences scored by a frozen teacher (`distill.teacher`)",
        }
    }
}

/// Which judge may score an objective's samples (`online.judge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeNeed {
    /// No judge: the objective does not sample.
    None,
    /// Any judge: `verifier:`, `rm:`, `llm:` or `openai:`.
    Any,
    /// A `verifier:`: the objective learns from right and wrong answers.
    Verifier,
}

/// One row of the registry: what the rest of candor knows about an objective before reading its
/// hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectiveSpec {
    /// The name users type (`--objective`, `[objective] name`).
    pub name: &'static str,
    /// One line for help texts.
    pub help: &'static str,
    /// Which training loop runs it.
    pub loop_kind: LoopKind,
    /// What a batch must hold.
    pub data_need: DataNeed,
    /// Whether a frozen reference scores the data under the default hyper-parameters (see
    /// [`Objective::needs_reference`] for the settings that change it).
    pub reference: bool,
    /// Which judge scores its samples (online objectives).
    pub judge: JudgeNeed,
    /// Fewest samples per prompt and round it learns from (online objectives; 0 otherwise).
    pub fewest_samples_per_prompt: usize,
    /// Whether a teacher's answers may join its pools of samples (`online.teacher_outputs`,
    /// `online.teacher_model`).
    pub teacher_pool: bool,
    /// Whether the policy carries a scalar value head (PPO).
    pub value_head: bool,
    /// Whether pairs carry the previous iterate's log-probs.
    pub previous_iterate: bool,
    /// Whether every pair must carry scalar rewards.
    pub pair_rewards: bool,
    /// Whether the chosen rows' prompt tokens are scored too (an NLL over whole sequences).
    pub prompt_nll: bool,
}

impl ObjectiveSpec {
    /// Whether a frozen teacher (`[distill] teacher`) scores the data.
    pub fn needs_teacher(&self) -> bool {
        matches!(self.data_need, DataNeed::Distill | DataNeed::TeacherRollouts)
    }

    /// The row needs the frozen reference.
    const fn with_reference(self) -> Self {
        Self { reference: true, ..self }
    }
    /// The row's pools may take a teacher's answers.
    const fn with_teacher_pool(self) -> Self {
        Self { teacher_pool: true, ..self }
    }
    /// The row trains a value head.
    const fn with_value_head(self) -> Self {
        Self { value_head: true, ..self }
    }
    /// The row's pairs carry the previous iterate.
    const fn with_previous_iterate(self) -> Self {
        Self { previous_iterate: true, ..self }
    }
    /// The row's pairs carry rewards.
    const fn with_pair_rewards(self) -> Self {
        Self { pair_rewards: true, ..self }
    }
    /// The row's chosen prompts are scored too.
    const fn with_prompt_nll(self) -> Self {
        Self { prompt_nll: true, ..self }
    }
}

/// A row's facts for a dataset objective (name and help come from the row).
const fn offline(data_need: DataNeed) -> ObjectiveSpec {
    ObjectiveSpec {
        name: "",
        help: "",
        loop_kind: LoopKind::Offline,
        data_need,
        reference: false,
        judge: JudgeNeed::None,
        fewest_samples_per_prompt: 0,
        teacher_pool: false,
        value_head: false,
        previous_iterate: false,
        pair_rewards: false,
        prompt_nll: false,
    }
}

/// A row's facts for an online objective.
const fn online(data_need: DataNeed, judge: JudgeNeed, fewest_samples_per_prompt: usize) -> ObjectiveSpec {
    ObjectiveSpec { loop_kind: LoopKind::Online, judge, fewest_samples_per_prompt, ..offline(data_need) }
}

/// A row's facts for a distillation objective over a dataset.
const fn distill() -> ObjectiveSpec {
    ObjectiveSpec { loop_kind: LoopKind::Distill, ..offline(DataNeed::Distill) }
}

/// The error for a name not in the table, listing the names that are.
fn unknown_objective(name: &str) -> AlignError {
    let names: Vec<&str> = Objective::NAMES.iter().map(|n| n.0).collect();
    AlignError::InvalidConfig {
        objective: "registry",
        field: "name",
        reason: format!("unknown objective `{name}` (known: {})", names.join(", ")),
    }
}

/// What a batch must hold for an objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataNeed {
    /// Single completions (`prompt`/`completion`, `messages`, `text`).
    Sequences,
    /// Preference pairs (`prompt`/`chosen`/`rejected`).
    Pairs,
    /// Preference pairs scored by the model's scalar head instead of its log-probs.
    ScoredPairs,
    /// Pairs or unpaired (`label`) rows rendered into feedback-conditioned sequences.
    Hindsight,
    /// Labelled completions (`label` rows; pairs are split into a desirable and an undesirable
    /// row), each with a mismatched completion from its micro-batch (KTO's KL estimate).
    Unpaired,
    /// The policy's own samples with per-token sampling log-probs and verifier labels (NFT).
    Rollouts,
    /// The policy's own samples with per-token advantages, returns and rollout values (PPO).
    TokenRewards,
    /// Single completions scored by a frozen teacher over the whole vocabulary (distillation).
    Distill,
    /// The policy's own samples with group advantages and the teacher's token log-probs (KDRL).
    TeacherRollouts,
    /// The policy's own samples with group-relative advantages, and the reference's token
    /// log-probs when a KL term needs them (GRPO).
    GroupRollouts,
}

impl DataNeed {
    /// What the data is, in words (help texts, errors).
    pub fn description(self) -> &'static str {
        match self {
            DataNeed::Sequences => "single completions (`prompt`/`completion`, `messages` or `text` rows)",
            DataNeed::Pairs => "preference pairs (`prompt`/`chosen`/`rejected` rows)",
            DataNeed::ScoredPairs => "preference pairs scored by a scalar head (`prompt`/`chosen`/`rejected` rows)",
            DataNeed::Hindsight => "preference pairs or `label`led rows, rendered as feedback-conditioned sequences",
            DataNeed::Unpaired => "labelled completions (`prompt`/`completion`/`label` rows; preference rows count as one desirable and one undesirable row)",
            DataNeed::Rollouts => "the policy's verifier-labelled samples with their sampling log-probs",
            DataNeed::TokenRewards => "the policy's samples with token advantages and returns",
            DataNeed::Distill => "completions scored by the teacher (`prompt`/`completion`, `messages` or `text` rows)",
            DataNeed::TeacherRollouts => "the policy's samples with group advantages and teacher log-probs",
            DataNeed::GroupRollouts => "the policy's judged samples with group-relative advantages",
        }
    }
}

/// Extra classification heads an objective trains beside the policy (`[heads, classes, hidden]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSpec {
    /// Separate heads.
    pub heads: usize,
    /// Classes of each head.
    pub classes: usize,
    /// Their learning rate as a multiple of the policy's.
    pub lr_multiplier: f64,
}

/// The inputs of one micro-batch.
#[derive(Debug, Clone)]
pub enum ObjectiveInput {
    /// For [`DataNeed::Sequences`].
    Sequences(SequenceLogps),
    /// For [`DataNeed::Pairs`].
    Pairs(PairLogps),
    /// For [`DataNeed::ScoredPairs`].
    Scores(PairScores),
    /// For [`DataNeed::Unpaired`].
    Unpaired(kto::UnpairedLogps),
    /// For [`DataNeed::Rollouts`].
    Tokens(nft::NftTokens),
    /// For [`DataNeed::TokenRewards`].
    Ppo(text2grad::PpoTokens),
    /// For [`DataNeed::Distill`].
    Distill(kd::DistillTokens),
    /// For [`DataNeed::TeacherRollouts`].
    Kdrl(kdrl::KdrlTokens),
    /// For [`DataNeed::GroupRollouts`].
    Grpo(grpo::GrpoTokens),
}

impl Objective {
    /// The names of the objectives whose rows satisfy `keep`, in registry order.
    pub fn names_where(keep: impl Fn(&ObjectiveSpec) -> bool) -> Vec<&'static str> {
        Self::SPECS.iter().filter(|s| keep(s)).map(|s| s.name).collect()
    }

    /// The registry name.
    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    /// Which training loop runs it.
    pub fn loop_kind(&self) -> LoopKind {
        self.spec().loop_kind
    }

    /// Which data a batch must hold.
    pub fn data_need(&self) -> DataNeed {
        self.spec().data_need
    }

    /// Whether the objective learns from the policy's own samples, round by round (the online
    /// loop), rather than from a fixed dataset.
    pub fn is_online(&self) -> bool {
        self.loop_kind() == LoopKind::Online
    }

    /// Whether a frozen teacher (`[distill] teacher`) scores the data.
    pub fn needs_teacher(&self) -> bool {
        self.spec().needs_teacher()
    }

    /// DAC-KL's clipping network: its parameters' names and shapes, trained beside the policy.
    pub fn clip_net(&self) -> Option<[(&'static str, Vec<usize>); 4]> {
        match self {
            Objective::DacKl(c) if c.clip_net => Some(dac_kl::clip_net_shapes(c)),
            _ => None,
        }
    }

    /// Whether the policy carries a scalar value head (`v_head.summary`, TRL's layout) trained
    /// with it (PPO).
    pub fn needs_value_head(&self) -> bool {
        self.spec().value_head
    }

    /// Whether pairs carry the previous iterate's log-probs (INPO). DNO's previous iterate is
    /// its pairs' reference instead.
    pub fn needs_previous_iterate(&self) -> bool {
        self.spec().previous_iterate
    }

    /// Whether every pair must carry scalar rewards (`reward_chosen` / `reward_rejected`).
    pub fn needs_pair_rewards(&self) -> bool {
        self.spec().pair_rewards
    }

    /// The judge that scores pairs lacking rewards (CoPG's `reward_judge`).
    pub fn reward_judge(&self) -> Option<&str> {
        match self {
            Objective::Copg(c) => c.reward_judge.as_deref(),
            _ => None,
        }
    }

    /// SPO's classification heads the loop trains with the policy.
    pub fn degree_heads(&self) -> Option<HeadSpec> {
        match self {
            Objective::Spo(c) => Some(HeadSpec { heads: 2, classes: c.degrees, lr_multiplier: c.head_lr_multiplier }),
            _ => None,
        }
    }

    /// Whether a frozen reference model's log-probs are needed: the row's answer, unless a
    /// setting turns the reference off (DPO's `reference_free`, INPO's `tau = 0`).
    pub fn needs_reference(&self) -> bool {
        match self {
            Objective::Dpo(c) => !c.reference_free,
            Objective::Inpo(c) => c.tau > 0.0,
            Objective::Grpo(c) => c.beta > 0.0,
            _ => self.spec().reference,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_names_the_objective_and_rejects_unknown_keys() {
        let o: Objective = toml_like(r#"{"name": "dpo", "beta": 0.2, "loss_type": "ipo"}"#);
        assert_eq!(o.name(), "dpo");
        assert!(o.needs_reference());
        let err = serde_json::from_str::<Objective>(r#"{"name": "dpo", "betta": 0.2}"#).unwrap_err().to_string();
        assert!(err.contains("betta"), "{err}");
        let err = serde_json::from_str::<Objective>(r#"{"name": "dpoo"}"#).unwrap_err().to_string();
        assert!(err.contains("dpoo") && err.contains("rdpo"), "{err}");
    }

    #[test]
    fn every_name_has_defaults_and_round_trips() {
        for (name, help) in Objective::NAMES {
            let o = Objective::default_for(name).unwrap();
            assert_eq!(o.name(), *name);
            assert_eq!(o.spec().help, *help);
            o.validate().unwrap();
            let tagged = serde_json::to_value(&o).unwrap();
            assert_eq!(tagged["name"], *name, "the serde tag is the table's name");
            assert_eq!(serde_json::from_value::<Objective>(tagged).unwrap().name(), *name);
        }
        assert!(Objective::default_for("nope").unwrap_err().to_string().contains("known: sft, dpo"));
    }

    #[test]
    fn names_count_the_enum_variants() {
        // serde's own list of the variants, independent of the table's constants.
        let err = serde_json::from_str::<Objective>(r#"{"name": "?"}"#).unwrap_err().to_string();
        let listed = err.split("expected one of ").nth(1).unwrap().split(" at line").next().unwrap();
        let variants: Vec<&str> = listed.split(", ").map(|v| v.trim_matches('`')).collect();
        let names: Vec<&str> = Objective::NAMES.iter().map(|n| n.0).collect();
        assert_eq!(variants, names);
        assert_eq!(Objective::SPECS.len(), names.len());
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn loop_kinds_and_online_facts() {
        let kind = |name: &str| Objective::default_for(name).unwrap().loop_kind();
        assert_eq!(kind("dpo"), LoopKind::Offline);
        assert_eq!(kind("sft"), LoopKind::Offline);
        assert_eq!(kind("kd"), LoopKind::Distill);
        assert_eq!(kind("dac_kl"), LoopKind::Distill);
        assert_eq!(kind("kdrl"), LoopKind::Online);
        assert_eq!(
            Objective::names_where(|s| s.loop_kind == LoopKind::Online),
            ["inpo", "dno", "nft", "text2grad", "grpo", "kdrl"]
        );
        assert_eq!(Objective::names_where(|s| s.judge == JudgeNeed::Verifier), ["nft", "kdrl"]);
        assert_eq!(Objective::names_where(|s| s.teacher_pool), ["dno"]);
        assert_eq!(Objective::names_where(ObjectiveSpec::needs_teacher), ["kd", "sinkd", "dac_kl", "kdrl"]);
        for (name, _) in Objective::NAMES {
            let o = Objective::default_for(name).unwrap();
            let online = o.loop_kind() == LoopKind::Online;
            assert_eq!(o.is_online(), online, "{name}");
            assert_eq!(o.spec().judge != JudgeNeed::None, online, "{name}");
            assert_eq!(o.spec().fewest_samples_per_prompt > 0, online, "{name}");
            assert_eq!(o.needs_reference(), o.spec().reference, "{name}: defaults agree with the row");
        }
        assert_eq!(Objective::default_for("text2grad").unwrap().spec().fewest_samples_per_prompt, 1);
        assert_eq!(Objective::default_for("dno").unwrap().spec().fewest_samples_per_prompt, 2);
    }

    fn toml_like(json: &str) -> Objective {
        serde_json::from_str(json).unwrap()
    }
}
