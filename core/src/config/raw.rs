//! The raw configuration: exactly the TOML layout, key names and nesting of the
//! reference implementation's hydra YAML, before any check beyond types.
//!
//! Integers are `i64` (what TOML holds) so that negative or oversized values reach
//! [`validate`](super::validate) and are reported with their key and range together
//! with every other problem, instead of stopping at the first type error. Names
//! (backbone, loss type, ...) stay strings for the same reason.

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::cluster::RawCluster;
use super::metrics::RawMetrics;
use super::security::RawSecurity;
use super::types::{Config, WarmupSteps};

/// Root of the raw configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub infra: RawInfra,
    pub data: RawData,
    pub model: RawModel,
    pub training: RawTraining,
    pub eval: RawEval,
    pub cluster: RawCluster,
    pub metrics: RawMetrics,
    pub security: RawSecurity,
}

/// `[eval]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEval {
    pub knn_k: i64,
    pub knn_temperature: f64,
    pub batch_size: i64,
    pub threads: i64,
    /// Comma-separated attack names; `""` = none.
    pub attacks: String,
    /// Units of 1/255.
    pub eps: Vec<f64>,
    /// Units of 1/255.
    pub alpha: f64,
    pub steps: i64,
    /// Units of 1/255.
    pub fgsm_alpha: f64,
    pub mifgsm_decay: f64,
    pub apgd_steps: i64,
    pub apgd_restarts: i64,
    pub attack_target: String,
    pub knn_device: String,
    pub knn_memory_mb: i64,
}

/// `[infra]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInfra {
    pub seed: i64,
    pub out_dir: String,
    pub threads: i64,
    pub log_every: i64,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawData {
    pub source: String,
    pub image_size: i64,
    pub channels: i64,
    pub rand_aug_prob: f64,
    pub dynamic_aug: bool,
    /// The reference's dynamic-augmentation version; only "v0" (its scripts' value).
    pub dynamic_aug_version: String,
    pub balance_study_per_class: bool,
    /// `""` = not set.
    pub db_root: String,
    pub meta_json: String,
    pub meta_split_json: String,
    /// `""` = no manifest.
    pub manifest: String,
    pub hidisc: RawHidisc,
    pub synthetic: RawSynthetic,
    pub loader: RawLoader,
}

/// `[data.loader]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLoader {
    pub threads: i64,
    pub prefetch: i64,
}

/// `[data.hidisc]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHidisc {
    pub num_slide_samples: i64,
    pub num_patch_samples: i64,
    pub num_transforms: i64,
}

/// `[data.synthetic]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSynthetic {
    pub num_patients: i64,
    pub num_classes: i64,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub backbone: String,
    pub mlp_hidden: Vec<i64>,
    pub num_embedding_out: i64,
    pub proj_head: bool,
    /// `""` = no checkpoint.
    pub init_checkpoint: String,
}

/// `[training]`; plain values first, sub-tables after (TOML wants them in that order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTraining {
    pub batch_size: i64,
    pub num_epochs: i64,
    pub only_adv: bool,
    pub dynamic_weights_lamda: f64,
    pub optimizer: String,
    pub learn_rate: f64,
    pub save_checkpoint_interval: i64,
    pub keep_checkpoints: i64,
    pub keep_checkpoint_every: i64,
    pub async_checkpoints: bool,
    pub sync_bn: bool,
    pub loss_scope: String,
    pub adamw: RawAdamw,
    pub objective: RawObjective,
    pub attack: RawAttack,
    pub scheduler: RawScheduler,
}

/// `[training.adamw]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdamw {
    pub betas: Vec<f64>,
    pub eps: f64,
    pub weight_decay: f64,
}

/// `[training.objective]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawObjective {
    pub which: String,
    pub params: RawObjectiveParams,
}

/// `[training.objective.params]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawObjectiveParams {
    pub lambda_patient: f64,
    pub lambda_slide: f64,
    pub lambda_patch: f64,
    pub supcon_params: RawSupcon,
}

/// `[training.objective.params.supcon_params]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSupcon {
    pub temperature: f64,
    pub base_temperature: f64,
    pub contrast_mode: String,
}

/// `[training.attack]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAttack {
    pub name: String,
    /// Units of 1/255.
    pub eps: f64,
    /// Units of 1/255.
    pub alpha: f64,
    pub iters: i64,
    pub loss_type: String,
    pub warmup_epochs: i64,
}

/// `[training.scheduler]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScheduler {
    pub which: String,
    pub params: RawSchedulerParams,
}

/// `[training.scheduler.params]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedulerParams {
    pub num_warmup_steps: RawWarmup,
    pub num_cycles: f64,
}

/// `num_warmup_steps`: the TOML type carries the meaning (integer = step count,
/// float = fraction of all steps), so (de)serialization keeps it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RawWarmup {
    Steps(i64),
    Fraction(f64),
}

impl Serialize for RawWarmup {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Steps(steps) => serializer.serialize_i64(steps),
            Self::Fraction(fraction) => serializer.serialize_f64(fraction),
        }
    }
}

impl<'de> Deserialize<'de> for RawWarmup {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WarmupVisitor;

        impl Visitor<'_> for WarmupVisitor {
            type Value = RawWarmup;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer step count or a float fraction of all steps")
            }

            fn visit_i64<E: de::Error>(self, steps: i64) -> Result<RawWarmup, E> {
                Ok(RawWarmup::Steps(steps))
            }

            fn visit_u64<E: de::Error>(self, steps: u64) -> Result<RawWarmup, E> {
                i64::try_from(steps)
                    .map(RawWarmup::Steps)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(steps), &self))
            }

            fn visit_f64<E: de::Error>(self, fraction: f64) -> Result<RawWarmup, E> {
                Ok(RawWarmup::Fraction(fraction))
            }
        }

        deserializer.deserialize_any(WarmupVisitor)
    }
}

/// A path as TOML text (lossy for non-UTF-8 paths, which a config file cannot hold).
fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A count as a TOML integer; counts beyond `i64::MAX` cannot be written in TOML and
/// saturate (no validated config holds one).
fn int(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

impl From<&Config> for RawConfig {
    /// The raw form of a typed config; validating it gives the same config back.
    fn from(config: &Config) -> Self {
        let Config {
            infra,
            data,
            model,
            training,
            eval,
            cluster,
            metrics,
            security,
        } = config;
        let attack = &training.attack;
        let objective = &training.objective;
        let scheduler = &training.scheduler;
        Self {
            infra: RawInfra {
                seed: i64::try_from(infra.seed).unwrap_or(i64::MAX),
                out_dir: path_text(&infra.out_dir),
                threads: int(infra.threads),
                log_every: int(infra.log_every),
            },
            data: RawData {
                source: data.source.name().to_owned(),
                image_size: int(data.image_size),
                channels: int(data.channels),
                rand_aug_prob: data.rand_aug_prob,
                dynamic_aug: data.dynamic_aug,
                dynamic_aug_version: "v0".to_owned(),
                balance_study_per_class: data.balance_study_per_class,
                hidisc: RawHidisc {
                    num_slide_samples: int(data.hidisc.num_slide_samples),
                    num_patch_samples: int(data.hidisc.num_patch_samples),
                    num_transforms: int(data.hidisc.num_transforms),
                },
                synthetic: RawSynthetic {
                    num_patients: int(data.synthetic.num_patients),
                    num_classes: int(data.synthetic.num_classes),
                },
                db_root: path_text(&data.db_root),
                meta_json: data.meta_json.clone(),
                meta_split_json: data.meta_split_json.clone(),
                manifest: data.manifest.as_deref().map(path_text).unwrap_or_default(),
                loader: RawLoader {
                    threads: int(data.loader.threads),
                    prefetch: int(data.loader.prefetch),
                },
            },
            model: RawModel {
                backbone: model.backbone.name().to_owned(),
                mlp_hidden: model.mlp_hidden.iter().copied().map(int).collect(),
                num_embedding_out: int(model.num_embedding_out),
                proj_head: model.proj_head,
                init_checkpoint: model
                    .init_checkpoint
                    .as_deref()
                    .map(path_text)
                    .unwrap_or_default(),
            },
            training: RawTraining {
                batch_size: int(training.batch_size),
                num_epochs: int(training.num_epochs),
                only_adv: training.only_adv,
                dynamic_weights_lamda: training.dynamic_weights_lamda,
                optimizer: "adamw".to_owned(),
                learn_rate: training.optimizer.learn_rate,
                save_checkpoint_interval: int(training.save_checkpoint_interval),
                keep_checkpoints: int(training.keep_checkpoints),
                keep_checkpoint_every: i64::try_from(training.keep_checkpoint_every)
                    .unwrap_or(i64::MAX),
                async_checkpoints: training.async_checkpoints,
                sync_bn: training.sync_bn,
                loss_scope: training.loss_scope.name().to_owned(),
                adamw: RawAdamw {
                    betas: vec![training.optimizer.beta1, training.optimizer.beta2],
                    eps: training.optimizer.eps,
                    weight_decay: training.optimizer.weight_decay,
                },
                objective: RawObjective {
                    which: "hidisc".to_owned(),
                    params: RawObjectiveParams {
                        lambda_patient: objective.lambda_patient,
                        lambda_slide: objective.lambda_slide,
                        lambda_patch: objective.lambda_patch,
                        supcon_params: RawSupcon {
                            temperature: objective.temperature,
                            base_temperature: objective.base_temperature,
                            contrast_mode: "all".to_owned(),
                        },
                    },
                },
                attack: RawAttack {
                    name: attack.kind.name().to_owned(),
                    eps: attack.eps_255,
                    alpha: attack.alpha_255,
                    iters: int(attack.iters),
                    loss_type: attack.loss_type.name().to_owned(),
                    warmup_epochs: int(attack.warmup_epochs),
                },
                scheduler: RawScheduler {
                    which: scheduler.kind.name().to_owned(),
                    params: RawSchedulerParams {
                        num_warmup_steps: match scheduler.warmup {
                            WarmupSteps::Fraction(fraction) => RawWarmup::Fraction(fraction),
                            WarmupSteps::Steps(steps) => RawWarmup::Steps(int(steps)),
                        },
                        num_cycles: scheduler.num_cycles,
                    },
                },
            },
            eval: RawEval {
                knn_k: int(eval.knn_k),
                knn_temperature: eval.knn_temperature,
                batch_size: int(eval.batch_size),
                threads: int(eval.threads),
                attacks: eval
                    .attacks
                    .iter()
                    .map(|attack| attack.name())
                    .collect::<Vec<_>>()
                    .join(","),
                eps: eval.eps_255.clone(),
                alpha: eval.alpha_255,
                steps: int(eval.steps),
                fgsm_alpha: eval.fgsm_alpha_255,
                mifgsm_decay: eval.mifgsm_decay,
                apgd_steps: int(eval.apgd_steps),
                apgd_restarts: int(eval.apgd_restarts),
                attack_target: eval.attack_target.name().to_owned(),
                knn_device: eval.knn_device.name().to_owned(),
                knn_memory_mb: int(eval.knn_memory_mb),
            },
            cluster: RawCluster::from(cluster),
            metrics: RawMetrics::from(metrics),
            security: RawSecurity::from(security),
        }
    }
}
