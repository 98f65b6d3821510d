//! The typed, validated configuration: what the rest of hsat reads.
//!
//! Every value here has passed [`validate`](super::validate); the invariants written
//! on each field hold for any `Config` produced by [`load`](super::load) or
//! [`Config::from_toml_str`]. The defaults, "(default x)", are the published ones
//! (the HiDisc/HSAT reference `main.yaml`) unless noted.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::cluster::ClusterConfig;
use super::metrics::MetricsConfig;
use super::security::SecurityConfig;
use crate::schedule;

/// A name in the configuration (backbone, loss type, scheduler, ...) that is not one of
/// the accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseNameError {
    /// What was being parsed, e.g. `"backbone"`.
    pub what: &'static str,
    /// The rejected text.
    pub value: String,
    /// Every accepted spelling.
    pub allowed: &'static [&'static str],
}

impl ParseNameError {
    /// The accepted spellings, quoted and comma separated: `"a", "b"`.
    pub fn allowed_list(&self) -> String {
        quoted_list(self.allowed)
    }
}

impl fmt::Display for ParseNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} {:?}: expected one of {}",
            self.what,
            self.value,
            self.allowed_list()
        )
    }
}

impl std::error::Error for ParseNameError {}

/// `"a", "b", "c"`.
pub(crate) fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("{name:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Declares a fieldless enum whose variants are spelled in config files by fixed
/// names, with `NAMES`, `ALL`, `name()`, `Display` and `FromStr`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            /// The accepted spellings, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The spelling used in config files.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = ParseNameError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|variant| variant.name() == text)
                    .ok_or_else(|| ParseNameError {
                        what: $what,
                        value: text.to_owned(),
                        allowed: Self::NAMES,
                    })
            }
        }
    };
}

/// The whole validated configuration of a training job.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Process-level settings: seed, output folder, threads, logging.
    pub infra: InfraConfig,
    /// Where patients come from and how one sample is drawn and augmented.
    pub data: DataConfig,
    /// Backbone and projection head.
    pub model: ModelConfig,
    /// Optimisation: batch, epochs, loss, attack, optimizer, schedule.
    pub training: TrainingConfig,
    /// `hsat eval`: kNN, attacks and batching of the robustness evaluation.
    pub eval: EvalConfig,
    /// Distributed jobs: membership, timing, collectives (per process, not part of
    /// the job's identity).
    pub cluster: ClusterConfig,
    /// Metrics endpoints and telemetry (per process, not part of the job's identity).
    pub metrics: MetricsConfig,
    /// Authentication and server limits of the control plane (per process).
    pub security: SecurityConfig,
}

/// Process-level settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfraConfig {
    /// Job seed (default 1000); every random draw derives its own seed from it.
    pub seed: u64,
    /// Folder for checkpoints and logs (default "runs/hsat"); never empty.
    pub out_dir: PathBuf,
    /// torch intra-op threads per worker; 0 = all cores (default 0).
    pub threads: usize,
    /// Print a progress line every `log_every` steps; >= 1 (default 1).
    pub log_every: usize,
}

named_enum! {
    /// Which dataset the patients come from (raw key `data.source`).
    pub enum DataSource ("data source") {
        /// Generated in memory from the seed; for tests and smoke runs.
        Synthetic => "synthetic",
        /// OpenSRH on disk: `<db_root>/meta/<meta_json>` lists patients, slides and
        /// patches, `<db_root>/meta/<meta_split_json>` the train/val split.
        OpenSrh => "opensrh",
        /// Any patient -> slide -> patch dataset listed in a CSV file
        /// (`patient,slide,path,label,split`), e.g. H&E tiles.
        Manifest => "manifest",
    }
}

/// Dataset and sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// Where patients come from (default synthetic).
    pub source: DataSource,
    /// Side in pixels of the square patch fed to the model (default 300); in 8..=1024.
    pub image_size: usize,
    /// Image channels (default 3); always 3.
    pub channels: usize,
    /// Probability of each random augmentation (default 0.3); in [0, 1].
    pub rand_aug_prob: f64,
    /// Scale augmentation magnitudes with the dynamic strength (HSAT) (default false).
    pub dynamic_aug: bool,
    /// Replicate patients of rare classes so all classes are equally frequent
    /// (default true).
    pub balance_study_per_class: bool,
    /// How many slides, patches and views one patient contributes.
    pub hidisc: HidiscSampling,
    /// Size of the generated dataset when `source` is synthetic.
    pub synthetic: SyntheticConfig,
    /// Dataset folder (default empty). Never empty when `source` is opensrh: patch
    /// paths of the metadata are relative to it. With `source` manifest, relative tile
    /// paths resolve against it when it is set, else against the manifest's folder.
    /// Relative values are relative to the working directory.
    pub db_root: PathBuf,
    /// OpenSRH metadata file, relative to `<db_root>/meta/` (default "opensrh.json");
    /// never empty.
    pub meta_json: String,
    /// OpenSRH split file, relative to `<db_root>/meta/` (default
    /// "train_val_split.json"); never empty.
    pub meta_split_json: String,
    /// The CSV manifest (default None); `Some` when `source` is manifest. Raw value
    /// `""` means `None`.
    pub manifest: Option<PathBuf>,
    /// How the workers read and augment patches.
    pub loader: LoaderConfig,
}

/// The workers' data loading pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Threads decoding and augmenting patches per worker; 0 = one per core
    /// (default 0).
    pub threads: usize,
    /// Batches prepared ahead of the training step (default 2); in 1..=64. Each one
    /// holds `batch_size * S * P * V` images in memory.
    pub prefetch: usize,
}

/// Shape of one patient's sample: `[S, P, V]` in the batch tensor `[B, S, P, V, C, H, W]`.
///
/// Each is in 1..=64, and `num_transforms >= 2` (the patch level of the training loss
/// needs two views of a patch to have a positive pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HidiscSampling {
    /// Slides drawn per patient, S (default 2).
    pub num_slide_samples: usize,
    /// Patches drawn per slide, P (default 2).
    pub num_patch_samples: usize,
    /// Augmented views per patch, V (default 2).
    pub num_transforms: usize,
}

/// Size of the synthetic dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Patients generated (default 8); >= 1.
    pub num_patients: usize,
    /// Classes the patients are spread over (default 2); in 1..=`num_patients`.
    pub num_classes: usize,
}

named_enum! {
    /// The encoder's backbone (raw key `model.backbone`).
    #[derive(Default)]
    pub enum Backbone ("backbone") {
        /// A tiny CNN with 16 features; for tests.
        SmallCnn => "small_cnn",
        /// torchvision ResNet-18 (512 features).
        ResNet18 => "resnet18",
        /// torchvision ResNet-34 (512 features).
        ResNet34 => "resnet34",
        /// torchvision ResNet-50 (2048 features); the paper's default.
        #[default]
        ResNet50 => "resnet50",
        /// torchvision ResNet-101 (2048 features).
        ResNet101 => "resnet101",
        /// torchvision Wide-ResNet-50-2 (2048 features).
        WideResNet50_2 => "wide_resnet50_2",
        /// The reference's dual-batch-norm ResNet-50 (2048 features): every batch norm
        /// has a `normal` branch (clean passes) and a `pgd` branch (the attack and the
        /// adversarial forward).
        ResNet50MultiBn => "resnet50_multi_bn",
        /// ResNet-18 with the same dual batch norm (512 features); the same code at a
        /// size tests can train.
        ResNet18MultiBn => "resnet18_multi_bn",
    }
}

impl Backbone {
    /// Length of the feature vector the backbone produces (input of the projection head).
    pub fn feature_dim(self) -> usize {
        match self {
            Self::SmallCnn => 16,
            Self::ResNet18 | Self::ResNet34 | Self::ResNet18MultiBn => 512,
            Self::ResNet50 | Self::ResNet101 | Self::WideResNet50_2 | Self::ResNet50MultiBn => 2048,
        }
    }

    /// Whether every batch norm has two branches, `normal` and `pgd`.
    pub fn dual_bn(self) -> bool {
        matches!(self, Self::ResNet50MultiBn | Self::ResNet18MultiBn)
    }
}

/// Backbone and projection head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// The backbone, without its classifier (default resnet50).
    pub backbone: Backbone,
    /// Widths of the head's hidden Linear+ReLU layers [] (a single Linear); each >= 1.
    pub mlp_hidden: Vec<usize>,
    /// Embedding size after the head, before L2 normalisation (default 128); >= 1.
    /// With `proj_head` it must equal the backbone's feature size (the reference's
    /// head keeps the width; its HSAT runs set 2048).
    pub num_embedding_out: usize,
    /// The reference's three-layer projection head with batch norm instead of the MLP
    /// (default false): `Linear(d, d)`, BN, ReLU, `Linear(d, d, bias=False)`, BN, ReLU,
    /// `Linear(d, d, bias=False)`, BN with `d` the feature size; `mlp_hidden` must then
    /// be empty.
    pub proj_head: bool,
    /// Backbone weights to start from (default None = random init): a `.safetensors`
    /// file with torchvision key names. Raw value `""` means `None`.
    pub init_checkpoint: Option<PathBuf>,
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingConfig {
    /// Patients per optimizer step for the whole job (default 10); >= 1. The
    /// reference counts per GPU; hsat splits each step's patients across workers.
    pub batch_size: usize,
    /// Epochs to train (default 40000); >= 1. An epoch is one pass over the balanced
    /// patient list.
    pub num_epochs: usize,
    /// Train on adversarial views only [false, as the reference `main.yaml`; HSAT runs set true].
    pub only_adv: bool,
    /// `lambda_dyn` of the dynamic clean/adversarial weight (default 0.66); in [0, 1]. Spelled
    /// like the reference's key.
    pub dynamic_weights_lamda: f64,
    /// AdamW settings.
    pub optimizer: OptimizerConfig,
    /// Hierarchical contrastive loss settings.
    pub objective: ObjectiveConfig,
    /// Inner maximisation (adversarial attack) settings.
    pub attack: AttackConfig,
    /// Learning-rate schedule.
    pub scheduler: SchedulerConfig,
    /// Optimizer steps between checkpoints; 0 = only at the end (default 1000).
    pub save_checkpoint_interval: usize,
    /// Newest checkpoints kept (default 3); >= 1. Older ones are deleted once a newer
    /// one is complete, except those `keep_checkpoint_every` keeps and the one the
    /// ledger's last commit depends on.
    pub keep_checkpoints: usize,
    /// Checkpoints at multiples of this step count are kept for good (default 0 =
    /// none beyond the newest `keep_checkpoints`).
    pub keep_checkpoint_every: u64,
    /// Write checkpoints on a background thread from a host copy of the state taken
    /// at the step boundary, so training does not wait for the disk (default true).
    pub async_checkpoints: bool,
    /// Synchronised batch norm in distributed runs: batch statistics over every rank's
    /// shard, as the reference's `SyncBatchNorm` under DDP (default true; no effect on
    /// one worker).
    pub sync_bn: bool,
    /// Which patients a rank's loss compares (default global; see [`LossScope`]).
    pub loss_scope: LossScope,
}

named_enum! {
    /// Which patients the hierarchical loss of a distributed step compares (raw key
    /// `training.loss_scope`).
    pub enum LossScope ("loss scope") {
        /// Each rank's loss over its own shard, gradients averaged by shard size
        /// (the reference's DDP semantics: the negatives depend on the world size).
        Local => "local",
        /// One loss over the whole step on every rank (embeddings all-gathered),
        /// gradients summed: the update equals a single-process step on the whole batch.
        Global => "global",
    }
}

impl TrainingConfig {
    /// Which checkpoints to keep ([`crate::checkpoint::to_delete`]).
    pub fn retention(&self) -> crate::checkpoint::Retention {
        crate::checkpoint::Retention {
            keep_last: self.keep_checkpoints,
            keep_every: self.keep_checkpoint_every,
        }
    }

    /// Learning rate of the `step`-th optimizer step (0-based) of a run of `total_steps`
    /// steps: `learn_rate` times the scheduler's multiplier.
    pub fn lr_at(&self, step: usize, total_steps: usize) -> f64 {
        match self.scheduler.kind {
            ScheduleKind::Constant => self.optimizer.learn_rate,
            ScheduleKind::CosWarmup => {
                let warmup = self.scheduler.warmup.resolve(total_steps);
                self.optimizer.learn_rate
                    * schedule::lr_multiplier(step, warmup, total_steps, self.scheduler.num_cycles)
            }
        }
    }
}

/// AdamW settings (PyTorch defaults except the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    /// Peak learning rate (default 1e-3); finite and > 0.
    pub learn_rate: f64,
    /// First-moment decay (default 0.9); in [0, 1).
    pub beta1: f64,
    /// Second-moment decay (default 0.999); in [0, 1).
    pub beta2: f64,
    /// Denominator epsilon (default 1e-8); finite and > 0.
    pub eps: f64,
    /// Decoupled weight decay (default 0.01); finite and >= 0.
    pub weight_decay: f64,
}

/// Weights and temperatures of the hierarchical (HiDisc) SupCon loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveConfig {
    /// Weight of the patient level (default 1.0); finite and >= 0.
    pub lambda_patient: f64,
    /// Weight of the slide level (default 1.0); finite and >= 0.
    pub lambda_slide: f64,
    /// Weight of the patch level (default 1.0); finite and >= 0. Not all three weights
    /// are 0.
    pub lambda_patch: f64,
    /// SupCon temperature T (default 0.07); finite and > 0.
    pub temperature: f64,
    /// SupCon base temperature T_base (default 0.07); finite and > 0.
    pub base_temperature: f64,
}

named_enum! {
    /// Which attack crafts the adversarial views (raw key `training.attack.name`).
    pub enum AttackKind ("attack") {
        /// No attack: plain HiDisc training (the reference `main.yaml` default).
        None => "none",
        /// Projected gradient descent on the hierarchical loss (HSAT).
        Pgd => "pgd",
        /// The reference's second PGD variant (`pgd_attack_2`): the uniform start is
        /// clamped so `x + delta` lies in [0, 1], and each step clamps `delta` into
        /// `[-x, 1 - x]` instead of clamping `x + delta`.
        Pgd2 => "pgd_2",
    }
}

/// Inner maximisation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttackConfig {
    /// The attack (default none).
    pub kind: AttackKind,
    /// L-infinity budget in pixel units (pixels are in [0, 1]): `eps_255 / 255`
    /// (default 8/255).
    pub eps: f64,
    /// PGD step size in pixel units: `alpha_255 / 255` (default 2/255); > 0 when `kind`
    /// is pgd.
    pub alpha: f64,
    /// PGD iterations (default 5); >= 1 when `kind` is pgd.
    pub iters: usize,
    /// Loss levels the attack maximises (default p_s_pt).
    pub loss_type: LossType,
    /// Epochs over which eps grows linearly from 1/255 to `eps` (default 0). More than
    /// `num_epochs` is accepted, as in the reference: eps then never reaches its
    /// maximum ([`AttackConfig::warmup_note`] says what it reaches).
    pub warmup_epochs: usize,
    /// The budget as written in the config, in units of 1/255 (default 8); in [0, 255].
    pub eps_255: f64,
    /// The step size as written in the config, in units of 1/255 (default 2); in [0, 255].
    pub alpha_255: f64,
}

impl AttackConfig {
    /// The budget (pixel units) of `epoch`, with the eps warm-up applied.
    pub fn eps_at(&self, epoch: usize) -> f64 {
        schedule::attack_eps(epoch, self.eps_255, self.warmup_epochs)
    }

    /// Whether an attack runs (`pgd` or `pgd_2`).
    pub fn is_pgd(&self) -> bool {
        matches!(self.kind, AttackKind::Pgd | AttackKind::Pgd2)
    }

    /// A warning when the eps warm-up is longer than the run (`warmup_epochs >
    /// num_epochs`), with the budget the last epoch reaches; `None` otherwise.
    pub fn warmup_note(&self, num_epochs: usize) -> Option<String> {
        if !self.is_pgd() || self.warmup_epochs <= num_epochs || num_epochs == 0 {
            return None;
        }
        let last = self.eps_at(num_epochs - 1) * 255.0;
        Some(format!(
            "training.attack.warmup_epochs = {} is more than training.num_epochs = {}: the \
             attack budget never reaches training.attack.eps = {}/255; the last epoch \
             attacks with eps = {last:.4}/255",
            self.warmup_epochs, num_epochs, self.eps_255
        ))
    }
}

/// Which levels of the hierarchical loss are on (raw spelling `p_s_pt`, `s_pt`, ...:
/// `p` patient, `s` slide, `pt` patch).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct LossType {
    /// Patient level: positives are all views of the same patient.
    pub patient: bool,
    /// Slide level: positives are all views of the same slide.
    pub slide: bool,
    /// Patch level: positives are the views of the same patch.
    pub patch: bool,
}

impl LossType {
    /// All three levels: HSAT's attack and the training loss.
    pub const P_S_PT: Self = Self {
        patient: true,
        slide: true,
        patch: true,
    };

    /// The accepted spellings.
    pub const NAMES: &'static [&'static str] = &["p_s_pt", "s_pt", "p_pt", "p_s", "p", "s", "pt"];

    /// The spelling of this set of levels; `"none"` when no level is on (that value
    /// cannot be parsed back: a loss needs at least one level).
    pub fn name(self) -> &'static str {
        match (self.patient, self.slide, self.patch) {
            (true, true, true) => "p_s_pt",
            (false, true, true) => "s_pt",
            (true, false, true) => "p_pt",
            (true, true, false) => "p_s",
            (true, false, false) => "p",
            (false, true, false) => "s",
            (false, false, true) => "pt",
            (false, false, false) => "none",
        }
    }
}

impl Default for LossType {
    fn default() -> Self {
        Self::P_S_PT
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = ParseNameError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (patient, slide, patch) = match text {
            "p_s_pt" => (true, true, true),
            "s_pt" => (false, true, true),
            "p_pt" => (true, false, true),
            "p_s" => (true, true, false),
            "p" => (true, false, false),
            "s" => (false, true, false),
            "pt" => (false, false, true),
            _ => {
                return Err(ParseNameError {
                    what: "loss type",
                    value: text.to_owned(),
                    allowed: Self::NAMES,
                });
            }
        };
        Ok(Self {
            patient,
            slide,
            patch,
        })
    }
}

named_enum! {
    /// Learning-rate schedule (raw key `training.scheduler.which`).
    pub enum ScheduleKind ("scheduler") {
        /// Linear warm-up, then cosine decay (the reference's `cos_warmup`).
        CosWarmup => "cos_warmup",
        /// `learn_rate` at every step.
        Constant => "constant",
    }
}

named_enum! {
    /// A white-box attack of `hsat eval` on the encoder's features (method.md §7.5;
    /// raw key `eval.attacks`, a comma-separated list of these names).
    pub enum EvalAttack ("eval attack") {
        /// PGD with a uniform random start in the eps ball.
        Pgd => "pgd",
        /// BIM (iterative FGSM) with a random start, clipped as the reference's BIM.
        Bim => "bim",
        /// MI-FGSM: momentum on the L1-normalised gradient, random start.
        MiFgsm => "mifgsm",
        /// FGSM with a random start ("fast" FGSM): one step of `fgsm_alpha`.
        Fgsm => "fgsm",
        /// APGD (Croce & Hein 2020): step size `2 eps` halved at checkpoints where the
        /// objective stagnates, momentum 0.75, `apgd_restarts` random starts, the best
        /// point kept per patch.
        Apgd => "apgd",
    }
}

named_enum! {
    /// Which output of the encoder the evaluation attacks (raw key `eval.attack_target`).
    pub enum EvalTarget ("attack target") {
        /// The backbone features kNN uses (method.md §7.5).
        Backbone => "backbone",
        /// The L2-normalised projection (what the reference's attack code calls).
        Projection => "projection",
    }
}

named_enum! {
    /// Where `hsat eval` computes the kNN (raw key `eval.knn_device`).
    pub enum KnnDevice ("kNN device") {
        /// On the model's device with libtorch: f32 similarities and top-k in chunks,
        /// then the selected neighbours rescored exactly in f64 (same results as
        /// `cpu_exact`).
        Auto => "auto",
        /// Every similarity in f64 on the CPU (the reference's arithmetic; slow for
        /// large banks).
        CpuExact => "cpu_exact",
    }
}

/// `hsat eval` settings (method.md §7). Attack sizes are in pixel units, with the
/// values as written (units of 1/255) kept beside them.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    /// Neighbours per query (default 200); >= 1, clipped to the train bank size.
    pub knn_k: usize,
    /// kNN temperature: weights `exp(sim / t)` (default 0.07); finite and > 0.
    pub knn_temperature: f64,
    /// Patches per forward pass (and per attack batch) (default 64); >= 1.
    pub batch_size: usize,
    /// Threads decoding patches; 0 = one per core (default 0).
    pub threads: usize,
    /// White-box attacks to run, in table order (default pgd, bim, mifgsm, fgsm,
    /// apgd); empty = clean evaluation only; no repeats.
    pub attacks: Vec<EvalAttack>,
    /// L-infinity budgets in units of 1/255 (default [4, 8]); each in (0, 255].
    pub eps_255: Vec<f64>,
    /// Step size of PGD, BIM and MI-FGSM in units of 1/255 (default 2); in (0, 255].
    pub alpha_255: f64,
    /// Steps of PGD, BIM and MI-FGSM (default 10); >= 1.
    pub steps: usize,
    /// FGSM's single step in units of 1/255 (default 10, the reference's FFGSM);
    /// in (0, 255].
    pub fgsm_alpha_255: f64,
    /// MI-FGSM momentum decay (default 1.0); finite and >= 0.
    pub mifgsm_decay: f64,
    /// APGD iterations per restart (default 100, AutoAttack's); >= 1. Its step-size
    /// checkpoints are fractions of this number.
    pub apgd_steps: usize,
    /// APGD random starts (default 1, AutoAttack's standard APGD-CE); >= 1.
    pub apgd_restarts: usize,
    /// Which output the attacks push away from the clean one (default backbone).
    pub attack_target: EvalTarget,
    /// Where the kNN runs (default auto: the model's device, exact f64 rescoring).
    pub knn_device: KnnDevice,
    /// Memory the device kNN's chunks may take, in MiB (default 512); >= 1.
    pub knn_memory_mb: usize,
}

/// Learning-rate schedule settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// The schedule (default cos_warmup).
    pub kind: ScheduleKind,
    /// Length of the linear warm-up (default 10% of all steps); used by `cos_warmup`.
    pub warmup: WarmupSteps,
    /// Cosine cycles after the warm-up (default 0.5 = half a cosine, down to 0); finite
    /// and > 0.
    pub num_cycles: f64,
}

/// Length of the learning-rate warm-up (raw key `training.scheduler.params.num_warmup_steps`).
///
/// As in the reference (`isinstance(x, float)`), a TOML float is a fraction of all
/// steps and a TOML integer an absolute count: `0.1` and `100` mean different things.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WarmupSteps {
    /// A fraction of all optimizer steps; in [0, 1].
    Fraction(f64),
    /// An absolute number of optimizer steps.
    Steps(usize),
}

impl WarmupSteps {
    /// Warm-up length in steps for a run of `total_steps` steps; a fraction is
    /// truncated like Python's `int(f * total)`.
    pub fn resolve(&self, total_steps: usize) -> usize {
        match *self {
            // Truncation toward zero is the point: Python's int() of a non-negative float.
            Self::Fraction(fraction) => (fraction * total_steps as f64).floor() as usize,
            Self::Steps(steps) => steps,
        }
    }
}

impl Default for Config {
    /// The paper's defaults (the reference `main.yaml`), with a synthetic dataset.
    fn default() -> Self {
        Self {
            infra: InfraConfig {
                seed: 1000,
                out_dir: PathBuf::from("runs/hsat"),
                threads: 0,
                log_every: 1,
            },
            data: DataConfig {
                source: DataSource::Synthetic,
                image_size: 300,
                channels: 3,
                rand_aug_prob: 0.3,
                dynamic_aug: false,
                balance_study_per_class: true,
                hidisc: HidiscSampling {
                    num_slide_samples: 2,
                    num_patch_samples: 2,
                    num_transforms: 2,
                },
                synthetic: SyntheticConfig {
                    num_patients: 8,
                    num_classes: 2,
                },
                db_root: PathBuf::new(),
                meta_json: "opensrh.json".to_owned(),
                meta_split_json: "train_val_split.json".to_owned(),
                manifest: None,
                loader: LoaderConfig {
                    threads: 0,
                    prefetch: 2,
                },
            },
            model: ModelConfig {
                backbone: Backbone::ResNet50,
                mlp_hidden: Vec::new(),
                num_embedding_out: 128,
                proj_head: false,
                init_checkpoint: None,
            },
            training: TrainingConfig {
                batch_size: 10,
                num_epochs: 40000,
                only_adv: false,
                dynamic_weights_lamda: 0.66,
                optimizer: OptimizerConfig {
                    learn_rate: 1.0e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1.0e-8,
                    weight_decay: 0.01,
                },
                objective: ObjectiveConfig {
                    lambda_patient: 1.0,
                    lambda_slide: 1.0,
                    lambda_patch: 1.0,
                    temperature: 0.07,
                    base_temperature: 0.07,
                },
                attack: AttackConfig {
                    kind: AttackKind::None,
                    eps: 8.0 / 255.0,
                    alpha: 2.0 / 255.0,
                    iters: 5,
                    loss_type: LossType::P_S_PT,
                    warmup_epochs: 0,
                    eps_255: 8.0,
                    alpha_255: 2.0,
                },
                scheduler: SchedulerConfig {
                    kind: ScheduleKind::CosWarmup,
                    warmup: WarmupSteps::Fraction(0.1),
                    num_cycles: 0.5,
                },
                save_checkpoint_interval: 1000,
                keep_checkpoints: 3,
                keep_checkpoint_every: 0,
                async_checkpoints: true,
                sync_bn: true,
                loss_scope: LossScope::Global,
            },
            eval: EvalConfig {
                knn_k: 200,
                knn_temperature: 0.07,
                batch_size: 64,
                threads: 0,
                attacks: EvalAttack::ALL.to_vec(),
                eps_255: vec![4.0, 8.0],
                alpha_255: 2.0,
                steps: 10,
                fgsm_alpha_255: 10.0,
                mifgsm_decay: 1.0,
                apgd_steps: 100,
                apgd_restarts: 1,
                attack_target: EvalTarget::Backbone,
                knn_device: KnnDevice::Auto,
                knn_memory_mb: 512,
            },
            cluster: ClusterConfig::default(),
            metrics: MetricsConfig::default(),
            security: SecurityConfig::default(),
        }
    }
}

/// Cores this process may use (at least 1).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A thread-count setting where 0 means one per core: the one place that decides it.
fn threads_or_cores(configured: usize) -> usize {
    match configured {
        0 => available_cores(),
        n => n,
    }
}

impl InfraConfig {
    /// torch intra-op threads (`infra.threads`; 0 = all cores).
    pub fn torch_threads(&self) -> usize {
        threads_or_cores(self.threads)
    }
}

impl LoaderConfig {
    /// Decode/augment threads (`data.loader.threads`; 0 = one per core).
    pub fn decode_threads(&self) -> usize {
        threads_or_cores(self.threads)
    }
}

impl EvalConfig {
    /// Decode threads of the evaluation (`eval.threads`; 0 = one per core).
    pub fn decode_threads(&self) -> usize {
        threads_or_cores(self.threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_type_names_round_trip() {
        for name in LossType::NAMES {
            let parsed: LossType = name.parse().unwrap();
            assert_eq!(parsed.to_string(), *name);
        }
        assert_eq!("p_s_pt".parse::<LossType>().unwrap(), LossType::P_S_PT);
        let patch_only: LossType = "pt".parse().unwrap();
        assert_eq!(
            patch_only,
            LossType {
                patient: false,
                slide: false,
                patch: true
            }
        );
    }

    #[test]
    fn loss_type_rejects_unknown_spellings() {
        for bad in ["p_x", "", "pt_p", "P_S_PT", "none", "p_s_pt "] {
            let err = bad.parse::<LossType>().unwrap_err();
            assert_eq!(err.value, bad);
            assert!(err.to_string().contains("\"p_s_pt\""), "{err}");
        }
    }

    #[test]
    fn backbone_names_round_trip_and_feature_dims() {
        let expected = [
            ("small_cnn", 16),
            ("resnet18", 512),
            ("resnet34", 512),
            ("resnet50", 2048),
            ("resnet101", 2048),
            ("wide_resnet50_2", 2048),
            ("resnet50_multi_bn", 2048),
            ("resnet18_multi_bn", 512),
        ];
        assert_eq!(Backbone::NAMES.len(), expected.len());
        for (name, dim) in expected {
            let backbone: Backbone = name.parse().unwrap();
            assert_eq!(backbone.to_string(), name);
            assert_eq!(backbone.feature_dim(), dim);
        }
        let err = "resnet9".parse::<Backbone>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown backbone \"resnet9\": expected one of \"small_cnn\", \"resnet18\", \
             \"resnet34\", \"resnet50\", \"resnet101\", \"wide_resnet50_2\", \
             \"resnet50_multi_bn\", \"resnet18_multi_bn\""
        );
        let dual: Vec<&str> = Backbone::ALL
            .iter()
            .filter(|b| b.dual_bn())
            .map(|b| b.name())
            .collect();
        assert_eq!(dual, ["resnet50_multi_bn", "resnet18_multi_bn"]);
        assert_eq!(Backbone::default(), Backbone::ResNet50);
    }

    #[test]
    fn warmup_fraction_truncates_like_python_int() {
        // 0.1 * 30 = 3.0000000000000004 in f64, int() gives 3; 0.3 * 10 = 3.0000000000000004.
        assert_eq!(WarmupSteps::Fraction(0.1).resolve(30), 3);
        assert_eq!(WarmupSteps::Fraction(0.1).resolve(39), 3);
        assert_eq!(WarmupSteps::Fraction(0.7).resolve(10), 7);
        assert_eq!(WarmupSteps::Fraction(0.0).resolve(1000), 0);
        assert_eq!(WarmupSteps::Fraction(1.0).resolve(17), 17);
        assert_eq!(WarmupSteps::Steps(100).resolve(10), 100);
    }

    #[test]
    fn lr_at_follows_the_scheduler_kind() {
        let mut training = Config::default().training;
        // 100 steps, warm-up 10% = 10 steps.
        assert_eq!(training.lr_at(0, 100), 0.0);
        assert!((training.lr_at(5, 100) - 0.5e-3).abs() < 1e-18);
        assert_eq!(training.lr_at(10, 100), 1.0e-3);
        // Halfway through the cosine: step 55 of 90 decay steps -> progress 0.5.
        assert!((training.lr_at(55, 100) - 0.5e-3).abs() < 1e-15);
        training.scheduler.kind = ScheduleKind::Constant;
        assert_eq!(training.lr_at(0, 100), 1.0e-3);
        assert_eq!(training.lr_at(99, 100), 1.0e-3);
    }

    #[test]
    fn eps_at_applies_the_warm_up() {
        let mut attack = Config::default().training.attack;
        attack.warmup_epochs = 5;
        assert_eq!(attack.eps_at(0), 1.0 / 255.0);
        assert_eq!(attack.eps_at(4), 8.0 / 255.0);
        assert_eq!(attack.eps_at(100), 8.0 / 255.0);
    }
}
