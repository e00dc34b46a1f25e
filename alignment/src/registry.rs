//! The one list of objectives: the names users type, their configurations, what each needs,
//! and dispatch. Adding an objective adds one variant here.

use serde::{Deserialize, Serialize};

use crate::objectives::{
    copg, dac_kl, dno, dpo, hindsight, inpo, kd, kdrl, nft, rdpo, reward, rpo, sft, sinkd, spo, text2grad,
    ObjectiveOutput, PairLogps, PairScores, SequenceLogps, StepScale,
};
use crate::{AlignError, Result};

/// A training objective and its hyper-parameters (TOML: `[objective] name = "dpo"`, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Objective {
    /// Supervised fine-tuning: NLL of completion tokens.
    Sft(sft::SftConfig),
    /// Direct Preference Optimization (sigmoid / IPO / hinge; label smoothing = cDPO).
    Dpo(dpo::DpoConfig),
    /// Provably robust DPO under label flips.
    Rdpo(rdpo::RdpoConfig),
    /// DPO plus NLL on the chosen completions.
    Rpo(rpo::RpoConfig),
    /// Self-supervised Preference Optimization: a preference loss plus a degree classifier.
    Spo(spo::SpoConfig),
    /// Contrastive Policy Gradient on pairs with scalar rewards.
    Copg(copg::CopgConfig),
    /// Chain of hindsight: feedback-conditioned sequences, NLL on the answers.
    Hindsight(hindsight::HindsightConfig),
    /// Reward model: Bradley-Terry on a scalar head.
    Reward(reward::RewardConfig),
    /// Iterative Nash Policy Optimization on the policy's own judged samples (online).
    Inpo(inpo::InpoConfig),
    /// Direct Nash Optimization (DNO-Prct): contrastive pairs against the previous iterate (online).
    Dno(dno::DnoConfig),
    /// Negative-aware Fine-Tuning on verifier-labelled samples (online).
    Nft(nft::NftConfig),
    /// Text2Grad: span-level rewards from natural-language critiques, token-level PPO (online).
    Text2grad(text2grad::Text2GradConfig),
    /// Knowledge distillation: forward KL, reverse KL or GKD's generalized JSD to a teacher.
    Kd(kd::KdConfig),
    /// SinKD: Sinkhorn distance between teacher and student distributions (+ KD and CE).
    Sinkd(sinkd::SinkdConfig),
    /// DAC-KL: KL on the teacher's adaptively clipped high-density region (+ SFT and spans).
    DacKl(dac_kl::DacKlConfig),
    /// KDRL: GRPO on verifier rewards plus a reverse-KL pull towards a teacher (online).
    Kdrl(kdrl::KdrlConfig),
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
    /// The policy's own samples with per-token sampling log-probs and verifier labels (NFT).
    Rollouts,
    /// The policy's own samples with per-token advantages, returns and rollout values (PPO).
    TokenRewards,
    /// Single completions scored by a frozen teacher over the whole vocabulary (distillation).
    Distill,
    /// The policy's own samples with group advantages and the teacher's token log-probs (KDRL).
    TeacherRollouts,
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
    /// For [`DataNeed::Rollouts`].
    Tokens(nft::NftTokens),
    /// For [`DataNeed::TokenRewards`].
    Ppo(text2grad::PpoTokens),
    /// For [`DataNeed::Distill`].
    Distill(kd::DistillTokens),
    /// For [`DataNeed::TeacherRollouts`].
    Kdrl(kdrl::KdrlTokens),
}

impl Objective {
    /// Every objective name, in registry order, with a one-line description.
    pub const NAMES: &'static [(&'static str, &'static str)] = &[
        ("sft", "supervised fine-tuning: NLL of the completion tokens"),
        ("dpo", "Direct Preference Optimization (sigmoid / ipo / hinge; label smoothing = cDPO)"),
        ("rdpo", "provably robust DPO under preference-label flips (--epsilon)"),
        ("rpo", "DPO + alpha x NLL on the chosen completions (TRL's rpo_alpha)"),
        ("spo", "Self-supervised Preference Optimization: base loss + key-content degree classifier"),
        ("copg", "Contrastive Policy Gradient on pairs with scalar rewards (reward_chosen/reward_rejected)"),
        ("hindsight", "Chain of Hindsight: feedback-conditioned sequences, NLL on the answers"),
        ("reward", "reward model: Bradley-Terry on a scalar head (margin, centering)"),
        ("inpo", "online: Iterative Nash Policy Optimization against the reference and the previous iterate (--eta, --tau)"),
        ("dno", "online: Direct Nash Optimization, best-vs-worst judged samples against the previous iterate"),
        ("nft", "online: Negative-aware Fine-Tuning on verifier-labelled samples"),
        ("text2grad", "online: span-level rewards from natural-language critiques, token-level PPO with a value head"),
        ("kd", "distillation: forward KL (--beta 0), reverse KL (1) or generalized JSD to a frozen teacher"),
        ("sinkd", "distillation: Sinkhorn distance between teacher and student distributions, with KD and CE"),
        ("dac_kl", "distillation: KL on the teacher's adaptively clipped high-density region, with SFT and span terms"),
        ("kdrl", "online: GRPO on verifier rewards plus a reverse-KL pull towards a teacher (k2/k3, annealed, reward-masked)"),
    ];

    /// The registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Sft(_) => "sft",
            Objective::Dpo(_) => "dpo",
            Objective::Rdpo(_) => "rdpo",
            Objective::Rpo(_) => "rpo",
            Objective::Spo(_) => "spo",
            Objective::Copg(_) => "copg",
            Objective::Hindsight(_) => "hindsight",
            Objective::Reward(_) => "reward",
            Objective::Inpo(_) => "inpo",
            Objective::Dno(_) => "dno",
            Objective::Nft(_) => "nft",
            Objective::Text2grad(_) => "text2grad",
            Objective::Kd(_) => "kd",
            Objective::Sinkd(_) => "sinkd",
            Objective::DacKl(_) => "dac_kl",
            Objective::Kdrl(_) => "kdrl",
        }
    }

    /// The objective with its paper defaults, by name.
    pub fn default_for(name: &str) -> Result<Self> {
        Ok(match name {
            "sft" => Objective::Sft(Default::default()),
            "dpo" => Objective::Dpo(Default::default()),
            "rdpo" => Objective::Rdpo(Default::default()),
            "rpo" => Objective::Rpo(Default::default()),
            "spo" => Objective::Spo(Default::default()),
            "copg" => Objective::Copg(Default::default()),
            "hindsight" => Objective::Hindsight(Default::default()),
            "reward" => Objective::Reward(Default::default()),
            "inpo" => Objective::Inpo(Default::default()),
            "dno" => Objective::Dno(Default::default()),
            "nft" => Objective::Nft(Default::default()),
            "text2grad" => Objective::Text2grad(Default::default()),
            "kd" => Objective::Kd(Default::default()),
            "sinkd" => Objective::Sinkd(Default::default()),
            "dac_kl" => Objective::DacKl(Default::default()),
            "kdrl" => Objective::Kdrl(Default::default()),
            other => {
                let names: Vec<&str> = Self::NAMES.iter().map(|n| n.0).collect();
                return Err(AlignError::InvalidConfig {
                    objective: "registry",
                    field: "name",
                    reason: format!("unknown objective `{other}` (known: {})", names.join(", ")),
                });
            }
        })
    }

    /// Which data a batch must hold.
    pub fn data_need(&self) -> DataNeed {
        match self {
            Objective::Sft(_) => DataNeed::Sequences,
            Objective::Dpo(_)
            | Objective::Rdpo(_)
            | Objective::Rpo(_)
            | Objective::Spo(_)
            | Objective::Copg(_)
            | Objective::Inpo(_)
            | Objective::Dno(_) => DataNeed::Pairs,
            Objective::Reward(_) => DataNeed::ScoredPairs,
            Objective::Hindsight(_) => DataNeed::Hindsight,
            Objective::Nft(_) => DataNeed::Rollouts,
            Objective::Text2grad(_) => DataNeed::TokenRewards,
            Objective::Kd(_) | Objective::Sinkd(_) | Objective::DacKl(_) => DataNeed::Distill,
            Objective::Kdrl(_) => DataNeed::TeacherRollouts,
        }
    }

    /// Whether the objective learns from the policy's own samples, round by round (the online
    /// loop), rather than from a fixed dataset.
    pub fn is_online(&self) -> bool {
        matches!(
            self,
            Objective::Inpo(_) | Objective::Dno(_) | Objective::Nft(_) | Objective::Text2grad(_) | Objective::Kdrl(_)
        )
    }

    /// Whether a frozen teacher (`[distill] teacher`) scores the data.
    pub fn needs_teacher(&self) -> bool {
        matches!(self.data_need(), DataNeed::Distill | DataNeed::TeacherRollouts)
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
        matches!(self, Objective::Text2grad(_))
    }

    /// Whether pairs carry the previous iterate's log-probs (INPO). DNO's previous iterate is
    /// its pairs' reference instead.
    pub fn needs_previous_iterate(&self) -> bool {
        matches!(self, Objective::Inpo(_))
    }

    /// Whether every pair must carry scalar rewards (`reward_chosen` / `reward_rejected`).
    pub fn needs_pair_rewards(&self) -> bool {
        matches!(self, Objective::Copg(_))
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

    /// Whether a frozen reference model's log-probs are needed.
    pub fn needs_reference(&self) -> bool {
        match self {
            Objective::Sft(_)
            | Objective::Hindsight(_)
            | Objective::Reward(_)
            | Objective::Dno(_)
            | Objective::Nft(_) => false,
            Objective::Kd(_) | Objective::Sinkd(_) | Objective::DacKl(_) | Objective::Kdrl(_) => false,
            Objective::Dpo(c) => !c.reference_free,
            Objective::Inpo(c) => c.tau > 0.0,
            Objective::Text2grad(_) => true,
            Objective::Rdpo(_) | Objective::Rpo(_) | Objective::Spo(_) | Objective::Copg(_) => true,
        }
    }

    /// Check the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            Objective::Sft(c) => c.validate(),
            Objective::Dpo(c) => c.validate(),
            Objective::Rdpo(c) => c.validate(),
            Objective::Rpo(c) => c.validate(),
            Objective::Spo(c) => c.validate(),
            Objective::Copg(c) => c.validate(),
            Objective::Hindsight(c) => c.validate(),
            Objective::Reward(c) => c.validate(),
            Objective::Inpo(c) => c.validate(),
            Objective::Dno(c) => c.validate(),
            Objective::Nft(c) => c.validate(),
            Objective::Text2grad(c) => c.validate(),
            Objective::Kd(c) => c.validate(),
            Objective::Sinkd(c) => c.validate(),
            Objective::DacKl(c) => c.validate(),
            Objective::Kdrl(c) => c.validate(),
        }
    }

    /// Loss and metrics of one micro-batch.
    pub fn compute(&self, input: &ObjectiveInput, scale: &StepScale) -> Result<ObjectiveOutput> {
        let wrong = |need: &str| AlignError::InvalidConfig {
            objective: self.name(),
            field: "data",
            reason: format!("needs {need}"),
        };
        match (self, input) {
            (Objective::Sft(c), ObjectiveInput::Sequences(x)) => sft::loss(x, c, scale),
            (Objective::Dpo(c), ObjectiveInput::Pairs(x)) => dpo::loss(x, c, scale),
            (Objective::Rdpo(c), ObjectiveInput::Pairs(x)) => rdpo::loss(x, c, scale),
            (Objective::Rpo(c), ObjectiveInput::Pairs(x)) => rpo::loss(x, c, scale),
            (Objective::Spo(c), ObjectiveInput::Pairs(x)) => spo::loss(x, c, scale),
            (Objective::Copg(c), ObjectiveInput::Pairs(x)) => copg::loss(x, c, scale),
            (Objective::Hindsight(c), ObjectiveInput::Sequences(x)) => hindsight::loss(x, c, scale),
            (Objective::Reward(c), ObjectiveInput::Scores(x)) => reward::loss(x, c, scale),
            (Objective::Inpo(c), ObjectiveInput::Pairs(x)) => inpo::loss(x, c, scale),
            (Objective::Dno(c), ObjectiveInput::Pairs(x)) => dno::loss(x, c, scale),
            (Objective::Nft(c), ObjectiveInput::Tokens(x)) => nft::loss(x, c, scale),
            (Objective::Text2grad(c), ObjectiveInput::Ppo(x)) => text2grad::loss(x, c, scale),
            (Objective::Kd(c), ObjectiveInput::Distill(x)) => kd::loss(x, c, scale),
            (Objective::Sinkd(c), ObjectiveInput::Distill(x)) => sinkd::loss(x, c, scale),
            (Objective::DacKl(c), ObjectiveInput::Distill(x)) => dac_kl::loss(x, c, scale),
            (Objective::Kdrl(c), ObjectiveInput::Kdrl(x)) => kdrl::loss(x, c, scale),
            _ => Err(wrong(match self.data_need() {
                DataNeed::Sequences | DataNeed::Hindsight => "single sequences",
                DataNeed::Pairs => "preference pairs",
                DataNeed::ScoredPairs => "scored preference pairs",
                DataNeed::Rollouts => "verifier-labelled samples with their sampling log-probs",
                DataNeed::TokenRewards => "samples with token advantages and returns",
                DataNeed::Distill => "completions scored by the teacher",
                DataNeed::TeacherRollouts => "samples with group advantages and teacher log-probs",
            })),
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
        for (name, _) in Objective::NAMES {
            let o = Objective::default_for(name).unwrap();
            assert_eq!(o.name(), *name);
            o.validate().unwrap();
        }
        assert!(Objective::default_for("nope").unwrap_err().to_string().contains("known: sft, dpo"));
    }

    fn toml_like(json: &str) -> Objective {
        serde_json::from_str(json).unwrap()
    }
}
