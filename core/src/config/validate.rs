//! Raw -> typed: every range and cross-field check, collecting all problems.
//!
//! Each problem message starts with the full dotted key and the bad value, then says
//! what is allowed: `training.attack.eps = -1: must be in [0, 255] (units of 1/255;
//! the paper uses 8)`. Lowercase, no final period.

use std::path::PathBuf;
use std::str::FromStr;

use super::raw::{RawConfig, RawWarmup};
use super::types::{
    AttackConfig, AttackKind, Backbone, Config, DataConfig, DataSource, EvalAttack, EvalConfig,
    EvalTarget, HidiscSampling, InfraConfig, KnnDevice, LoaderConfig, LossScope, LossType,
    ModelConfig, ObjectiveConfig, OptimizerConfig, ParseNameError, ScheduleKind, SchedulerConfig,
    SyntheticConfig, TrainingConfig, WarmupSteps,
};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// The dotted key the problem is about (used to say where the value was set);
    /// may carry an index suffix such as `[1]`.
    pub key: String,
    /// The whole message, starting with the key.
    pub message: String,
}

/// Allowed values of a float key.
#[derive(Debug, Clone, Copy)]
enum Range {
    /// `[lo, hi]`
    Closed(f64, f64),
    /// `[lo, hi)`
    HalfOpen(f64, f64),
    /// finite and `> 0`
    Positive,
    /// finite and `>= 0`
    NonNegative,
    /// `(0, hi]`
    PositiveAtMost(f64),
}

impl Range {
    fn contains(self, value: f64) -> bool {
        value.is_finite()
            && match self {
                Self::Closed(lo, hi) => lo <= value && value <= hi,
                Self::HalfOpen(lo, hi) => lo <= value && value < hi,
                Self::Positive => value > 0.0,
                Self::NonNegative => value >= 0.0,
                Self::PositiveAtMost(hi) => 0.0 < value && value <= hi,
            }
    }

    fn describe(self) -> String {
        match self {
            Self::Closed(lo, hi) => format!("in [{lo}, {hi}]"),
            Self::HalfOpen(lo, hi) => format!("in [{lo}, {hi})"),
            Self::Positive => "a finite number > 0".to_owned(),
            Self::NonNegative => "a finite number >= 0".to_owned(),
            Self::PositiveAtMost(hi) => format!("in (0, {hi}]"),
        }
    }
}

const WHEN_PGD: &str = " when training.attack.name is \"pgd\" or \"pgd_2\"";

/// Collects problems while converting values.
#[derive(Debug, Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: &str, message: String) {
        self.problems.push(Problem {
            key: key.to_owned(),
            message,
        });
    }

    /// An integer in `[min, max]` (no upper bound when `max` is `None`); out-of-range
    /// values are reported and come back as 0.
    fn count(&mut self, key: &str, value: i64, min: i64, max: Option<i64>, note: &str) -> usize {
        if value < min || max.is_some_and(|max| value > max) {
            let range = match max {
                Some(max) => format!("in [{min}, {max}]"),
                None => format!(">= {min}"),
            };
            self.problem(key, format!("{key} = {value}: must be {range}{note}"));
            return 0;
        }
        usize::try_from(value).unwrap_or(0)
    }

    fn number(&mut self, key: &str, value: f64, range: Range, note: &str) -> f64 {
        if !range.contains(value) {
            let allowed = range.describe();
            self.problem(key, format!("{key} = {value}: must be {allowed}{note}"));
        }
        value
    }

    fn choice<T: FromStr<Err = ParseNameError>>(&mut self, key: &str, value: &str) -> Option<T> {
        match value.parse() {
            Ok(parsed) => Some(parsed),
            Err(err) => {
                let allowed = err.allowed_list();
                self.problem(key, format!("{key} = {value:?}: must be one of {allowed}"));
                None
            }
        }
    }

    /// A string key that has a single supported value (kept for the reference's layout).
    fn fixed(&mut self, key: &str, value: &str, only: &str, note: &str) {
        if value != only {
            self.problem(key, format!("{key} = {value:?}: must be {only:?}{note}"));
        }
    }
}

/// Checks every value of `raw` and converts it; `Err` holds every problem found.
pub(crate) fn validate(raw: &RawConfig) -> Result<Config, Vec<Problem>> {
    let mut checker = Checker::default();
    let infra = infra(&mut checker, raw);
    let data = data(&mut checker, raw);
    let model = model(&mut checker, raw);
    let training = training(&mut checker, raw);
    check_positive_pairs(&mut checker, raw, &training.attack);
    let eval = eval(&mut checker, raw);
    let cluster = super::cluster::validate(&raw.cluster).unwrap_or_else(|problems| {
        checker.problems.extend(problems);
        super::cluster::ClusterConfig::default()
    });
    let metrics = super::metrics::validate(&raw.metrics).unwrap_or_else(|problems| {
        checker.problems.extend(problems);
        super::metrics::MetricsConfig::default()
    });
    let security =
        super::security::validate(&raw.security, cluster.long_poll).unwrap_or_else(|problems| {
            checker.problems.extend(problems);
            super::security::SecurityConfig::default()
        });
    if checker.problems.is_empty() {
        Ok(Config {
            infra,
            data,
            model,
            training,
            eval,
            cluster,
            metrics,
            security,
        })
    } else {
        Err(checker.problems)
    }
}

fn infra(c: &mut Checker, raw: &RawConfig) -> InfraConfig {
    let r = &raw.infra;
    let seed = u64::try_from(r.seed).unwrap_or_else(|_| {
        c.problem(
            "infra.seed",
            format!("infra.seed = {}: must be >= 0", r.seed),
        );
        0
    });
    if r.out_dir.trim().is_empty() {
        c.problem(
            "infra.out_dir",
            format!(
                "infra.out_dir = {:?}: must not be empty (checkpoints and logs go there)",
                r.out_dir
            ),
        );
    }
    InfraConfig {
        seed,
        out_dir: PathBuf::from(&r.out_dir),
        threads: c.count("infra.threads", r.threads, 0, None, " (0 = all cores)"),
        log_every: c.count(
            "infra.log_every",
            r.log_every,
            1,
            None,
            " (steps between progress lines)",
        ),
    }
}

fn data(c: &mut Checker, raw: &RawConfig) -> DataConfig {
    let r = &raw.data;
    let source = c
        .choice::<DataSource>("data.source", &r.source)
        .unwrap_or(DataSource::Synthetic);
    let image_size = c.count(
        "data.image_size",
        r.image_size,
        8,
        Some(1024),
        " (side in pixels of the patch fed to the model; the paper uses 300)",
    );
    if r.channels != 3 {
        c.problem(
            "data.channels",
            format!(
                "data.channels = {}: must be 3 (the model and the augmentations expect three channels)",
                r.channels
            ),
        );
    }
    let rand_aug_prob = c.number(
        "data.rand_aug_prob",
        r.rand_aug_prob,
        Range::Closed(0.0, 1.0),
        " (a probability)",
    );
    let hidisc = HidiscSampling {
        num_slide_samples: c.count(
            "data.hidisc.num_slide_samples",
            r.hidisc.num_slide_samples,
            1,
            Some(64),
            " (slides drawn per patient)",
        ),
        num_patch_samples: c.count(
            "data.hidisc.num_patch_samples",
            r.hidisc.num_patch_samples,
            1,
            Some(64),
            " (patches drawn per slide)",
        ),
        num_transforms: c.count(
            "data.hidisc.num_transforms",
            r.hidisc.num_transforms,
            1,
            Some(64),
            " (augmented views per patch)",
        ),
    };
    let num_patients = c.count(
        "data.synthetic.num_patients",
        r.synthetic.num_patients,
        1,
        None,
        "",
    );
    let num_classes = if num_patients >= 1 {
        c.count(
            "data.synthetic.num_classes",
            r.synthetic.num_classes,
            1,
            Some(r.synthetic.num_patients),
            " (at most data.synthetic.num_patients: every class needs a patient)",
        )
    } else {
        c.count(
            "data.synthetic.num_classes",
            r.synthetic.num_classes,
            1,
            None,
            "",
        )
    };
    let files = data_files(c, raw, source);
    c.fixed(
        "data.dynamic_aug_version",
        &r.dynamic_aug_version,
        "v0",
        " (the reference's scripts all use v0, the dynamic augmentation hsat implements)",
    );
    DataConfig {
        source,
        image_size,
        channels: 3,
        rand_aug_prob,
        dynamic_aug: r.dynamic_aug,
        balance_study_per_class: r.balance_study_per_class,
        hidisc,
        synthetic: SyntheticConfig {
            num_patients,
            num_classes,
        },
        db_root: files.db_root,
        meta_json: files.meta_json,
        meta_split_json: files.meta_split_json,
        manifest: files.manifest,
        loader: loader(c, raw),
    }
}

/// Where a dataset on disk is: the checked file keys of `[data]`.
struct DataFiles {
    db_root: PathBuf,
    meta_json: String,
    meta_split_json: String,
    manifest: Option<PathBuf>,
}

/// The file keys of `[data]`, with the rules that tie them to `data.source`.
fn data_files(c: &mut Checker, raw: &RawConfig, source: DataSource) -> DataFiles {
    let r = &raw.data;
    let when = |name: &str| format!(" when data.source = {name:?}");
    if source == DataSource::OpenSrh && r.db_root.trim().is_empty() {
        c.problem(
            "data.db_root",
            format!(
                "data.db_root = {:?}: must be the OpenSRH folder (the one holding meta/{}){}",
                r.db_root,
                r.meta_json,
                when("opensrh")
            ),
        );
    }
    for (key, value, what) in [
        ("data.meta_json", &r.meta_json, "the patient metadata"),
        (
            "data.meta_split_json",
            &r.meta_split_json,
            "the train/val split",
        ),
    ] {
        if value.trim().is_empty() {
            c.problem(
                key,
                format!(
                    "{key} = {value:?}: must not be empty (the file under <data.db_root>/meta/ \
                     holding {what})"
                ),
            );
        }
    }
    if source == DataSource::Manifest && r.manifest.trim().is_empty() {
        c.problem(
            "data.manifest",
            format!(
                "data.manifest = {:?}: must be the path of the CSV file listing the patches \
                 (header patient,slide,path,label,split){}",
                r.manifest,
                when("manifest")
            ),
        );
    }
    DataFiles {
        db_root: PathBuf::from(&r.db_root),
        meta_json: r.meta_json.clone(),
        meta_split_json: r.meta_split_json.clone(),
        manifest: (!r.manifest.is_empty()).then(|| PathBuf::from(&r.manifest)),
    }
}

fn loader(c: &mut Checker, raw: &RawConfig) -> LoaderConfig {
    let r = &raw.data.loader;
    LoaderConfig {
        threads: c.count(
            "data.loader.threads",
            r.threads,
            0,
            None,
            " (decoding and augmentation threads per worker; 0 = one per core)",
        ),
        prefetch: c.count(
            "data.loader.prefetch",
            r.prefetch,
            1,
            Some(64),
            " (batches prepared ahead of the training step)",
        ),
    }
}

fn model(c: &mut Checker, raw: &RawConfig) -> ModelConfig {
    let r = &raw.model;
    let backbone = c
        .choice::<Backbone>("model.backbone", &r.backbone)
        .unwrap_or_default();
    let mlp_hidden = r
        .mlp_hidden
        .iter()
        .enumerate()
        .map(|(index, &width)| {
            c.count(
                &format!("model.mlp_hidden[{index}]"),
                width,
                1,
                None,
                " (width of a hidden layer of the projection head)",
            )
        })
        .collect();
    let init_checkpoint = if r.init_checkpoint.is_empty() {
        None
    } else {
        if !r.init_checkpoint.ends_with(".safetensors") {
            c.problem(
                "model.init_checkpoint",
                format!(
                    "model.init_checkpoint = {:?}: must be \"\" (random init) or the path of a \
                     .safetensors file with torchvision key names",
                    r.init_checkpoint
                ),
            );
        }
        Some(PathBuf::from(&r.init_checkpoint))
    };
    let num_embedding_out = c.count(
        "model.num_embedding_out",
        r.num_embedding_out,
        1,
        None,
        " (embedding size; the paper uses 128)",
    );
    if r.proj_head {
        if !r.mlp_hidden.is_empty() {
            c.problem(
                "model.mlp_hidden",
                format!(
                    "model.mlp_hidden = {:?}: must be [] when model.proj_head = true (the \
                     projection head replaces the MLP)",
                    r.mlp_hidden
                ),
            );
        }
        let width = backbone.feature_dim();
        if num_embedding_out != 0 && num_embedding_out != width {
            c.problem(
                "model.num_embedding_out",
                format!(
                    "model.num_embedding_out = {num_embedding_out}: must be {width} (the \
                     feature size of {backbone}) when model.proj_head = true (the reference's \
                     projection head keeps the width; its HSAT runs set \
                     model.num_embedding_out=2048)"
                ),
            );
        }
    }
    ModelConfig {
        backbone,
        mlp_hidden,
        num_embedding_out,
        proj_head: r.proj_head,
        init_checkpoint,
    }
}

fn training(c: &mut Checker, raw: &RawConfig) -> TrainingConfig {
    let r = &raw.training;
    let batch_size = c.count(
        "training.batch_size",
        r.batch_size,
        1,
        None,
        " (patients per step for the whole job)",
    );
    let num_epochs = c.count("training.num_epochs", r.num_epochs, 1, None, "");
    let dynamic_weights_lamda = c.number(
        "training.dynamic_weights_lamda",
        r.dynamic_weights_lamda,
        Range::Closed(0.0, 1.0),
        " (the paper uses 0.66)",
    );
    let save_checkpoint_interval = c.count(
        "training.save_checkpoint_interval",
        r.save_checkpoint_interval,
        0,
        None,
        " (optimizer steps between checkpoints; 0 = only at the end)",
    );
    let keep_checkpoints = c.count(
        "training.keep_checkpoints",
        r.keep_checkpoints,
        1,
        None,
        " (the newest checkpoints kept; at least the newest one)",
    );
    let keep_checkpoint_every = c.count(
        "training.keep_checkpoint_every",
        r.keep_checkpoint_every,
        0,
        None,
        " (checkpoints at multiples of this step are kept for good; 0 = none)",
    ) as u64;
    TrainingConfig {
        batch_size,
        num_epochs,
        only_adv: r.only_adv,
        dynamic_weights_lamda,
        optimizer: optimizer(c, raw),
        objective: objective(c, raw),
        attack: attack(c, raw),
        scheduler: scheduler(c, raw),
        save_checkpoint_interval,
        keep_checkpoints,
        keep_checkpoint_every,
        async_checkpoints: r.async_checkpoints,
        sync_bn: r.sync_bn,
        loss_scope: c
            .choice::<LossScope>("training.loss_scope", &r.loss_scope)
            .unwrap_or(LossScope::Global),
    }
}

fn optimizer(c: &mut Checker, raw: &RawConfig) -> OptimizerConfig {
    let r = &raw.training;
    c.fixed(
        "training.optimizer",
        &r.optimizer,
        "adamw",
        " (the only optimizer implemented; tune it under [training.adamw])",
    );
    let learn_rate = c.number(
        "training.learn_rate",
        r.learn_rate,
        Range::Positive,
        " (the paper uses 1e-3)",
    );
    let (beta1, beta2) = match r.adamw.betas[..] {
        [beta1, beta2] => (
            c.number(
                "training.adamw.betas[0]",
                beta1,
                Range::HalfOpen(0.0, 1.0),
                "",
            ),
            c.number(
                "training.adamw.betas[1]",
                beta2,
                Range::HalfOpen(0.0, 1.0),
                "",
            ),
        ),
        _ => {
            c.problem(
                "training.adamw.betas",
                format!(
                    "training.adamw.betas = {:?}: must hold exactly 2 numbers [beta1, beta2], \
                     each in [0, 1)",
                    r.adamw.betas
                ),
            );
            (0.9, 0.999)
        }
    };
    OptimizerConfig {
        learn_rate,
        beta1,
        beta2,
        eps: c.number("training.adamw.eps", r.adamw.eps, Range::Positive, ""),
        weight_decay: c.number(
            "training.adamw.weight_decay",
            r.adamw.weight_decay,
            Range::NonNegative,
            "",
        ),
    }
}

fn objective(c: &mut Checker, raw: &RawConfig) -> ObjectiveConfig {
    let r = &raw.training.objective;
    c.fixed(
        "training.objective.which",
        &r.which,
        "hidisc",
        " (the only objective implemented)",
    );
    let p = &r.params;
    let lambda_patient = c.number(
        "training.objective.params.lambda_patient",
        p.lambda_patient,
        Range::NonNegative,
        "",
    );
    let lambda_slide = c.number(
        "training.objective.params.lambda_slide",
        p.lambda_slide,
        Range::NonNegative,
        "",
    );
    let lambda_patch = c.number(
        "training.objective.params.lambda_patch",
        p.lambda_patch,
        Range::NonNegative,
        "",
    );
    if lambda_patient == 0.0 && lambda_slide == 0.0 && lambda_patch == 0.0 {
        c.problem(
            "training.objective.params",
            "training.objective.params.lambda_patient, lambda_slide and lambda_patch = 0: at \
             least one level needs a weight > 0 (the paper uses 1 each)"
                .to_owned(),
        );
    }
    let s = &p.supcon_params;
    c.fixed(
        "training.objective.params.supcon_params.contrast_mode",
        &s.contrast_mode,
        "all",
        " (every view is an anchor; the only mode implemented)",
    );
    ObjectiveConfig {
        lambda_patient,
        lambda_slide,
        lambda_patch,
        temperature: c.number(
            "training.objective.params.supcon_params.temperature",
            s.temperature,
            Range::Positive,
            " (the paper uses 0.07)",
        ),
        base_temperature: c.number(
            "training.objective.params.supcon_params.base_temperature",
            s.base_temperature,
            Range::Positive,
            " (the paper uses 0.07)",
        ),
    }
}

fn attack(c: &mut Checker, raw: &RawConfig) -> AttackConfig {
    let r = &raw.training.attack;
    let kind = c
        .choice::<AttackKind>("training.attack.name", &r.name)
        .unwrap_or(AttackKind::None);
    let pgd = matches!(kind, AttackKind::Pgd | AttackKind::Pgd2);
    let eps_255 = c.number(
        "training.attack.eps",
        r.eps,
        Range::Closed(0.0, 255.0),
        " (units of 1/255; the paper uses 8)",
    );
    let alpha_255 = c.number(
        "training.attack.alpha",
        r.alpha,
        Range::Closed(0.0, 255.0),
        " (units of 1/255; the paper uses 2)",
    );
    if pgd && alpha_255 == 0.0 {
        c.problem(
            "training.attack.alpha",
            format!(
                "training.attack.alpha = 0: must be > 0{WHEN_PGD} (the PGD step in units of \
                 1/255; the paper uses 2)"
            ),
        );
    }
    let iters = c.count(
        "training.attack.iters",
        r.iters,
        i64::from(pgd),
        None,
        if pgd {
            " when training.attack.name is \"pgd\" or \"pgd_2\" (the paper uses 5)"
        } else {
            ""
        },
    );
    let loss_type = c
        .choice::<LossType>("training.attack.loss_type", &r.loss_type)
        .unwrap_or_default();
    // More warm-up epochs than training epochs is accepted, as the reference does
    // (`linspace(1, eps, warmup)[:num_epochs]`): eps then never reaches its maximum,
    // which `AttackConfig::warmup_note` reports when training starts.
    let warmup_epochs = c.count(
        "training.attack.warmup_epochs",
        r.warmup_epochs,
        0,
        None,
        " (epochs of the eps warm-up)",
    );
    AttackConfig {
        kind,
        eps: eps_255 / 255.0,
        alpha: alpha_255 / 255.0,
        iters,
        loss_type,
        warmup_epochs,
        eps_255,
        alpha_255,
    }
}

fn scheduler(c: &mut Checker, raw: &RawConfig) -> SchedulerConfig {
    let r = &raw.training.scheduler;
    let kind = c
        .choice::<ScheduleKind>("training.scheduler.which", &r.which)
        .unwrap_or(ScheduleKind::CosWarmup);
    let key = "training.scheduler.params.num_warmup_steps";
    let warmup = match r.params.num_warmup_steps {
        RawWarmup::Fraction(fraction) => WarmupSteps::Fraction(c.number(
            key,
            fraction,
            Range::Closed(0.0, 1.0),
            " (a float is a fraction of all steps; write an integer such as 100 for a step count)",
        )),
        RawWarmup::Steps(steps) => WarmupSteps::Steps(c.count(
            key,
            steps,
            0,
            None,
            " (an integer is a step count; write a float such as 0.1 for a fraction of all steps)",
        )),
    };
    SchedulerConfig {
        kind,
        warmup,
        num_cycles: c.number(
            "training.scheduler.params.num_cycles",
            r.params.num_cycles,
            Range::Positive,
            " (0.5 = half a cosine, down to 0)",
        ),
    }
}

/// A loss level whose groups have a single member has no positive pair. The training
/// loss always uses all three levels (as the reference); the attack uses its
/// `loss_type`, a subset, so one message per level names both users.
fn eval(c: &mut Checker, raw: &RawConfig) -> EvalConfig {
    let r = &raw.eval;
    let mut attacks = Vec::new();
    for name in r
        .attacks
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        match c.choice::<EvalAttack>("eval.attacks", name) {
            Some(attack) if attacks.contains(&attack) => c.problem(
                "eval.attacks",
                format!(
                    "eval.attacks = {:?}: names {name:?} twice; list each attack once",
                    r.attacks
                ),
            ),
            Some(attack) => attacks.push(attack),
            None => {}
        }
    }
    let budget = Range::PositiveAtMost(255.0);
    let in_255 = " (units of 1/255)";
    for (i, &eps) in r.eps.iter().enumerate() {
        c.number(&format!("eval.eps[{i}]"), eps, budget, in_255);
    }
    if r.eps.is_empty() && !attacks.is_empty() {
        c.problem(
            "eval.eps",
            "eval.eps = []: list at least one budget, e.g. [4, 8], or set eval.attacks = \"\" for a clean evaluation only".to_owned(),
        );
    }
    EvalConfig {
        knn_k: c.count("eval.knn_k", r.knn_k, 1, None, " (neighbours per query)"),
        knn_temperature: c.number(
            "eval.knn_temperature",
            r.knn_temperature,
            Range::Positive,
            "",
        ),
        batch_size: c.count(
            "eval.batch_size",
            r.batch_size,
            1,
            None,
            " (patches per forward pass)",
        ),
        threads: c.count("eval.threads", r.threads, 0, None, " (0 = all cores)"),
        attacks,
        eps_255: r.eps.clone(),
        alpha_255: c.number("eval.alpha", r.alpha, budget, in_255),
        steps: c.count("eval.steps", r.steps, 1, None, " (attack iterations)"),
        fgsm_alpha_255: c.number("eval.fgsm_alpha", r.fgsm_alpha, budget, in_255),
        mifgsm_decay: c.number("eval.mifgsm_decay", r.mifgsm_decay, Range::NonNegative, ""),
        apgd_steps: c.count(
            "eval.apgd_steps",
            r.apgd_steps,
            1,
            None,
            " (APGD iterations)",
        ),
        apgd_restarts: c.count(
            "eval.apgd_restarts",
            r.apgd_restarts,
            1,
            None,
            " (APGD random starts)",
        ),
        attack_target: c
            .choice::<EvalTarget>("eval.attack_target", &r.attack_target)
            .unwrap_or(EvalTarget::Backbone),
        knn_device: c
            .choice::<KnnDevice>("eval.knn_device", &r.knn_device)
            .unwrap_or(KnnDevice::Auto),
        knn_memory_mb: c.count(
            "eval.knn_memory_mb",
            r.knn_memory_mb,
            1,
            None,
            " (MiB for the kNN's chunks)",
        ),
    }
}

fn check_positive_pairs(c: &mut Checker, raw: &RawConfig, attack: &AttackConfig) {
    let h = &raw.data.hidisc;
    let (s, p, v) = (h.num_slide_samples, h.num_patch_samples, h.num_transforms);
    if s < 1 || p < 1 || v < 1 {
        return; // already reported as out of range
    }
    let attack_levels = attack.is_pgd().then_some(attack.loss_type);
    let per_slide = p.saturating_mul(v);
    let per_patient = s.saturating_mul(per_slide);
    let levels = [
        (
            "patient",
            attack_levels.is_some_and(|l| l.patient),
            per_patient,
            "data.hidisc",
            format!(
                "data.hidisc.num_slide_samples * num_patch_samples * num_transforms = \
                 {s} * {p} * {v} = {per_patient}"
            ),
            "views per patient",
        ),
        (
            "slide",
            attack_levels.is_some_and(|l| l.slide),
            per_slide,
            "data.hidisc",
            format!("data.hidisc.num_patch_samples * num_transforms = {p} * {v} = {per_slide}"),
            "views per slide",
        ),
        (
            "patch",
            attack_levels.is_some_and(|l| l.patch),
            v,
            "data.hidisc.num_transforms",
            format!("data.hidisc.num_transforms = {v}"),
            "views per patch",
        ),
    ];
    for (level, in_attack, members, key, shown, unit) in levels {
        if members >= 2 {
            continue;
        }
        let users = match attack_levels {
            Some(loss_type) if in_attack => {
                format!("the training loss and of training.attack.loss_type = \"{loss_type}\"")
            }
            _ => "the training loss".to_owned(),
        };
        c.problem(
            key,
            format!(
                "{shown}: must be >= 2: the {level} level of {users} needs at least 2 {unit} \
                 to form a positive pair"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_default() -> RawConfig {
        RawConfig::from(&Config::default())
    }

    fn messages(raw: &RawConfig) -> Vec<String> {
        validate(raw)
            .unwrap_err()
            .into_iter()
            .map(|problem| problem.message)
            .collect()
    }

    #[test]
    fn default_raw_validates_to_the_default_config() {
        assert_eq!(validate(&raw_default()).unwrap(), Config::default());
    }

    #[test]
    fn every_problem_is_reported_with_key_value_and_range() {
        let mut raw = raw_default();
        raw.training.attack.eps = -1.0;
        raw.training.batch_size = 0;
        raw.data.rand_aug_prob = 1.5;
        raw.model.backbone = "resnet9".to_owned();
        raw.training.adamw.betas = vec![0.9, 1.0];
        raw.infra.seed = -3;
        assert_eq!(
            messages(&raw),
            [
                "infra.seed = -3: must be >= 0",
                "data.rand_aug_prob = 1.5: must be in [0, 1] (a probability)",
                "model.backbone = \"resnet9\": must be one of \"small_cnn\", \"resnet18\", \
                 \"resnet34\", \"resnet50\", \"resnet101\", \"wide_resnet50_2\", \
                 \"resnet50_multi_bn\", \"resnet18_multi_bn\"",
                "training.batch_size = 0: must be >= 1 (patients per step for the whole job)",
                "training.adamw.betas[1] = 1: must be in [0, 1)",
                "training.attack.eps = -1: must be in [0, 255] (units of 1/255; the paper uses 8)",
            ]
        );
    }

    #[test]
    fn non_finite_floats_are_rejected() {
        let mut raw = raw_default();
        raw.training.learn_rate = f64::INFINITY;
        raw.training.objective.params.supcon_params.temperature = f64::NAN;
        assert_eq!(
            messages(&raw),
            [
                "training.learn_rate = inf: must be a finite number > 0 (the paper uses 1e-3)",
                "training.objective.params.supcon_params.temperature = NaN: must be a finite \
                 number > 0 (the paper uses 0.07)",
            ]
        );
    }

    #[test]
    fn pgd_needs_iterations_and_a_step() {
        let mut raw = raw_default();
        raw.training.attack.iters = 0;
        raw.training.attack.alpha = 0.0;
        // Without an attack the PGD settings are unused and may be 0.
        assert!(validate(&raw).is_ok());
        raw.training.attack.name = "pgd".to_owned();
        let problems = messages(&raw);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].starts_with("training.attack.alpha = 0: must be > 0 when"));
        assert_eq!(
            problems[1],
            "training.attack.iters = 0: must be >= 1 when training.attack.name is \"pgd\" \
             or \"pgd_2\" (the paper uses 5)"
        );
        raw.training.attack.name = "pgd_2".to_owned();
        assert_eq!(messages(&raw).len(), 2, "pgd_2 needs them too");
        raw.training.attack.iters = 3;
        raw.training.attack.alpha = 2.0;
        assert_eq!(
            validate(&raw).unwrap().training.attack.kind,
            AttackKind::Pgd2
        );
    }

    #[test]
    fn the_reference_scripts_dynamic_aug_version_is_accepted() {
        let mut raw = raw_default();
        assert_eq!(raw.data.dynamic_aug_version, "v0");
        raw.data.dynamic_aug_version = "v1".to_owned();
        assert_eq!(
            messages(&raw),
            [
                "data.dynamic_aug_version = \"v1\": must be \"v0\" (the reference's scripts all \
                 use v0, the dynamic augmentation hsat implements)"
            ]
        );
    }

    #[test]
    fn the_projection_head_keeps_the_feature_width() {
        let mut raw = raw_default();
        raw.model.proj_head = true;
        raw.model.backbone = "resnet50_multi_bn".to_owned();
        raw.model.num_embedding_out = 2048;
        let cfg = validate(&raw).expect("the reference's HSAT run: proj_head, 2048");
        assert!(cfg.model.proj_head && cfg.model.backbone.dual_bn());
        raw.model.num_embedding_out = 128;
        raw.model.mlp_hidden = vec![256];
        assert_eq!(
            messages(&raw),
            [
                "model.mlp_hidden = [256]: must be [] when model.proj_head = true (the \
                 projection head replaces the MLP)",
                "model.num_embedding_out = 128: must be 2048 (the feature size of \
                 resnet50_multi_bn) when model.proj_head = true (the reference's projection \
                 head keeps the width; its HSAT runs set model.num_embedding_out=2048)",
            ]
        );
        raw.model.backbone = "small_cnn".to_owned();
        raw.model.mlp_hidden.clear();
        raw.model.num_embedding_out = 16;
        assert!(validate(&raw).is_ok());
    }

    #[test]
    fn eps_warm_up_may_outlast_training_with_a_warning() {
        let mut raw = raw_default();
        raw.training.num_epochs = 3;
        raw.training.attack.name = "pgd".to_owned();
        raw.training.attack.warmup_epochs = 40;
        let cfg = validate(&raw).expect("a warm-up longer than the run is accepted");
        assert_eq!(cfg.training.attack.warmup_epochs, 40);
        // linspace(1, 8, 40)[2] = 1 + 2 * 7/39: the budget of the last epoch.
        let last = cfg.training.attack.eps_at(2) * 255.0;
        assert!((last - (1.0 + 2.0 * 7.0 / 39.0)).abs() < 1e-12, "{last}");
        let note = cfg.training.attack.warmup_note(3).expect("a warning");
        assert!(
            note.contains("warmup_epochs = 40 is more than training.num_epochs = 3")
                && note.contains("never reaches training.attack.eps = 8/255")
                && note.contains("eps = 1.3590/255"),
            "{note}"
        );
        // As long as the run, or no attack: nothing to say.
        assert_eq!(cfg.training.attack.warmup_note(40), None);
        raw.training.attack.warmup_epochs = 3;
        assert_eq!(validate(&raw).unwrap().training.attack.warmup_note(3), None);
        raw.training.attack.name = "none".to_owned();
        raw.training.attack.warmup_epochs = 40;
        assert_eq!(validate(&raw).unwrap().training.attack.warmup_note(3), None);
        // Negative stays refused.
        raw.training.attack.warmup_epochs = -1;
        assert_eq!(
            messages(&raw),
            ["training.attack.warmup_epochs = -1: must be >= 0 (epochs of the eps warm-up)"]
        );
    }

    #[test]
    fn single_view_patches_have_no_positive_pairs() {
        let mut raw = raw_default();
        raw.data.hidisc.num_transforms = 1;
        raw.training.attack.name = "pgd".to_owned();
        raw.training.attack.loss_type = "s_pt".to_owned();
        assert_eq!(
            messages(&raw),
            [
                "data.hidisc.num_transforms = 1: must be >= 2: the patch level of the training \
              loss and of training.attack.loss_type = \"s_pt\" needs at least 2 views per patch \
              to form a positive pair"
            ]
        );
        // All three levels degenerate at once.
        raw.data.hidisc.num_slide_samples = 1;
        raw.data.hidisc.num_patch_samples = 1;
        let problems = messages(&raw);
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].starts_with(
            "data.hidisc.num_slide_samples * num_patch_samples * num_transforms = 1 * 1 * 1 = 1"
        ));
        assert!(problems[0].contains("the patient level of the training loss needs"));
        assert!(problems[1].contains("the slide level of the training loss and of"));
    }

    #[test]
    fn hsat_patch_shape_is_accepted() {
        // HSAT-Patch: patch-level attack, one slide and one patch per patient.
        let mut raw = raw_default();
        raw.training.attack.name = "pgd".to_owned();
        raw.training.attack.loss_type = "pt".to_owned();
        raw.data.hidisc.num_slide_samples = 1;
        raw.data.hidisc.num_patch_samples = 1;
        let config = validate(&raw).unwrap();
        assert!(config.training.attack.loss_type.patch);
        assert!(!config.training.attack.loss_type.slide);
    }

    #[test]
    fn single_choice_keys_name_the_supported_value() {
        let mut raw = raw_default();
        raw.training.optimizer = "sgd".to_owned();
        raw.training.objective.which = "simclr".to_owned();
        raw.data.source = "tcga".to_owned();
        assert_eq!(
            messages(&raw),
            [
                "data.source = \"tcga\": must be one of \"synthetic\", \"opensrh\", \"manifest\"",
                "training.optimizer = \"sgd\": must be \"adamw\" (the only optimizer implemented; \
                 tune it under [training.adamw])",
                "training.objective.which = \"simclr\": must be \"hidisc\" (the only objective \
                 implemented)",
            ]
        );
    }

    #[test]
    fn opensrh_needs_its_folder() {
        let mut raw = raw_default();
        raw.data.source = "opensrh".to_owned();
        assert_eq!(
            messages(&raw),
            [
                "data.db_root = \"\": must be the OpenSRH folder (the one holding \
                 meta/opensrh.json) when data.source = \"opensrh\""
            ]
        );
        raw.data.db_root = "/data/opensrh".to_owned();
        let data = validate(&raw).unwrap().data;
        assert_eq!(data.source, DataSource::OpenSrh);
        assert_eq!(data.db_root, PathBuf::from("/data/opensrh"));
        assert_eq!(data.manifest, None);
        raw.data.meta_json = String::new();
        raw.data.meta_split_json = " ".to_owned();
        assert_eq!(
            messages(&raw),
            [
                "data.meta_json = \"\": must not be empty (the file under <data.db_root>/meta/ \
                 holding the patient metadata)",
                "data.meta_split_json = \" \": must not be empty (the file under \
                 <data.db_root>/meta/ holding the train/val split)",
            ]
        );
    }

    #[test]
    fn manifest_needs_its_csv_file() {
        let mut raw = raw_default();
        raw.data.source = "manifest".to_owned();
        assert_eq!(
            messages(&raw),
            [
                "data.manifest = \"\": must be the path of the CSV file listing the patches \
                 (header patient,slide,path,label,split) when data.source = \"manifest\""
            ]
        );
        raw.data.manifest = "tiles/manifest.csv".to_owned();
        let data = validate(&raw).unwrap().data;
        assert_eq!(data.source, DataSource::Manifest);
        assert_eq!(data.manifest, Some(PathBuf::from("tiles/manifest.csv")));
        // db_root is optional for a manifest (tile paths then resolve against its folder).
        assert_eq!(data.db_root, PathBuf::new());
    }

    #[test]
    fn loader_ranges() {
        let mut raw = raw_default();
        raw.data.loader.threads = -1;
        raw.data.loader.prefetch = 0;
        assert_eq!(
            messages(&raw),
            [
                "data.loader.threads = -1: must be >= 0 (decoding and augmentation threads per \
                 worker; 0 = one per core)",
                "data.loader.prefetch = 0: must be in [1, 64] (batches prepared ahead of the \
                 training step)",
            ]
        );
        raw.data.loader.threads = 6;
        raw.data.loader.prefetch = 64;
        let loader = validate(&raw).unwrap().data.loader;
        assert_eq!(
            loader,
            LoaderConfig {
                threads: 6,
                prefetch: 64
            }
        );
    }

    #[test]
    fn classes_need_patients() {
        let mut raw = raw_default();
        raw.data.synthetic.num_patients = 3;
        raw.data.synthetic.num_classes = 4;
        assert_eq!(
            messages(&raw),
            [
                "data.synthetic.num_classes = 4: must be in [1, 3] (at most \
              data.synthetic.num_patients: every class needs a patient)"
            ]
        );
    }

    #[test]
    fn init_checkpoint_empty_means_none() {
        let mut raw = raw_default();
        assert_eq!(validate(&raw).unwrap().model.init_checkpoint, None);
        raw.model.init_checkpoint = "weights/r50.safetensors".to_owned();
        assert_eq!(
            validate(&raw).unwrap().model.init_checkpoint,
            Some(PathBuf::from("weights/r50.safetensors"))
        );
        raw.model.init_checkpoint = "weights/r50.pt".to_owned();
        assert!(messages(&raw)[0].starts_with("model.init_checkpoint = \"weights/r50.pt\""));
    }

    #[test]
    fn warmup_steps_keep_their_meaning() {
        let mut raw = raw_default();
        raw.training.scheduler.params.num_warmup_steps = RawWarmup::Steps(100);
        let config = validate(&raw).unwrap();
        assert_eq!(config.training.scheduler.warmup, WarmupSteps::Steps(100));
        raw.training.scheduler.params.num_warmup_steps = RawWarmup::Fraction(100.0);
        assert_eq!(
            messages(&raw),
            [
                "training.scheduler.params.num_warmup_steps = 100: must be in [0, 1] (a float is a \
              fraction of all steps; write an integer such as 100 for a step count)"
            ]
        );
    }

    #[test]
    fn attack_units_are_converted_from_1_over_255() {
        let mut raw = raw_default();
        raw.training.attack.eps = 4.0;
        raw.training.attack.alpha = 1.0;
        let attack = validate(&raw).unwrap().training.attack;
        assert_eq!(attack.eps, 4.0 / 255.0);
        assert_eq!(attack.alpha, 1.0 / 255.0);
        assert_eq!(attack.eps_255, 4.0);
        assert_eq!(attack.alpha_255, 1.0);
    }
}
