//! Loading end to end: layers, precedence, key and type checks, round trips, the
//! example configs and the key reference in docs/config.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

fn sets(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn load_with(
    file: Option<&tempfile::NamedTempFile>,
    env_pairs: &[(&str, &str)],
    args: &[&str],
) -> Result<Config, ConfigError> {
    load(&ConfigSources {
        file: file.map(|file| file.path().to_path_buf()),
        env: env(env_pairs),
        overrides: sets(args),
    })
}

fn problems(result: Result<Config, ConfigError>) -> Vec<String> {
    match result {
        Err(ConfigError::Invalid(problems)) => problems,
        other => panic!("expected ConfigError::Invalid, got {other:?}"),
    }
}

#[test]
fn defaults_are_the_papers() {
    let config = load(&ConfigSources::default()).unwrap();
    assert_eq!(config, Config::default());
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
    assert_eq!(cluster, ClusterConfig::default());
    assert_eq!((metrics.listen, metrics.worker_listen), (None, None));
    assert_eq!(metrics.clean_loss_every, 1);
    assert_eq!(security, SecurityConfig::default());
    assert!(!security.insecure && security.token_file.is_none());
    assert_eq!(eval.knn_k, 200);
    assert_eq!(infra.seed, 1000);
    assert_eq!(infra.out_dir, PathBuf::from("runs/hsat"));
    assert_eq!((infra.threads, infra.log_every), (0, 1));
    assert_eq!(data.source, DataSource::Synthetic);
    assert_eq!((data.image_size, data.channels), (300, 3));
    assert_eq!(data.rand_aug_prob, 0.3);
    assert!(!data.dynamic_aug);
    assert!(data.balance_study_per_class);
    assert_eq!(
        data.hidisc,
        HidiscSampling {
            num_slide_samples: 2,
            num_patch_samples: 2,
            num_transforms: 2
        }
    );
    assert_eq!(
        (data.synthetic.num_patients, data.synthetic.num_classes),
        (8, 2)
    );
    assert_eq!(data.db_root, PathBuf::new());
    assert_eq!(data.meta_json, "opensrh.json");
    assert_eq!(data.meta_split_json, "train_val_split.json");
    assert_eq!(data.manifest, None);
    assert_eq!(
        data.loader,
        LoaderConfig {
            threads: 0,
            prefetch: 2
        }
    );
    assert_eq!(model.backbone, Backbone::ResNet50);
    assert_eq!(model.backbone.feature_dim(), 2048);
    assert!(model.mlp_hidden.is_empty());
    assert_eq!(model.num_embedding_out, 128);
    assert_eq!(model.init_checkpoint, None);
    assert_eq!((training.batch_size, training.num_epochs), (10, 40000));
    assert!(!training.only_adv);
    assert_eq!(training.dynamic_weights_lamda, 0.66);
    assert_eq!(training.save_checkpoint_interval, 1000);
    assert_eq!(
        training.optimizer,
        OptimizerConfig {
            learn_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01
        }
    );
    assert_eq!(
        training.objective,
        ObjectiveConfig {
            lambda_patient: 1.0,
            lambda_slide: 1.0,
            lambda_patch: 1.0,
            temperature: 0.07,
            base_temperature: 0.07
        }
    );
    let attack = training.attack;
    assert_eq!(attack.kind, AttackKind::None);
    assert_eq!((attack.eps, attack.alpha), (8.0 / 255.0, 2.0 / 255.0));
    assert_eq!((attack.eps_255, attack.alpha_255), (8.0, 2.0));
    assert_eq!(attack.iters, 5);
    assert_eq!(attack.loss_type, LossType::P_S_PT);
    assert_eq!(attack.warmup_epochs, 0);
    assert_eq!(training.scheduler.kind, ScheduleKind::CosWarmup);
    assert_eq!(training.scheduler.warmup, WarmupSteps::Fraction(0.1));
    assert_eq!(training.scheduler.num_cycles, 0.5);
}

#[test]
fn the_spec_layout_loads_to_the_defaults() {
    // The full raw layout, written out: every key name and nesting of the reference.
    let text = r#"
[infra]
seed = 1000
out_dir = "runs/hsat"
threads = 0
log_every = 1
[data]
source = "synthetic"
image_size = 300
channels = 3
rand_aug_prob = 0.3
dynamic_aug = false
balance_study_per_class = true
db_root = ""
meta_json = "opensrh.json"
meta_split_json = "train_val_split.json"
manifest = ""
[data.hidisc]
num_slide_samples = 2
num_patch_samples = 2
num_transforms = 2
[data.synthetic]
num_patients = 8
num_classes = 2
[data.loader]
threads = 0
prefetch = 2
[model]
backbone = "resnet50"
mlp_hidden = []
num_embedding_out = 128
init_checkpoint = ""
[training]
batch_size = 10
num_epochs = 40000
only_adv = false
dynamic_weights_lamda = 0.66
optimizer = "adamw"
learn_rate = 1.0e-3
save_checkpoint_interval = 1000
[training.adamw]
betas = [0.9, 0.999]
eps = 1.0e-8
weight_decay = 0.01
[training.objective]
which = "hidisc"
[training.objective.params]
lambda_patient = 1.0
lambda_slide = 1.0
lambda_patch = 1.0
[training.objective.params.supcon_params]
temperature = 0.07
base_temperature = 0.07
contrast_mode = "all"
[training.attack]
name = "none"
eps = 8.0
alpha = 2.0
iters = 5
loss_type = "p_s_pt"
warmup_epochs = 0
[training.scheduler]
which = "cos_warmup"
[training.scheduler.params]
num_warmup_steps = 0.1
num_cycles = 0.5
"#;
    assert_eq!(Config::from_toml_str(text).unwrap(), Config::default());
}

#[test]
fn file_then_env_then_set() {
    let file = toml_file("[training.attack]\neps = 2\n[infra]\nseed = 7\n");
    let eps = |config: Config| config.training.attack.eps_255;

    assert_eq!(eps(load_with(Some(&file), &[], &[]).unwrap()), 2.0);
    let env_pairs = [("HSAT__TRAINING__ATTACK__EPS", "4")];
    assert_eq!(eps(load_with(Some(&file), &env_pairs, &[]).unwrap()), 4.0);
    let config = load_with(Some(&file), &env_pairs, &["training.attack.eps=6"]).unwrap();
    assert_eq!(config.training.attack.eps_255, 6.0);
    assert_eq!(config.training.attack.eps, 6.0 / 255.0);
    // Keys set in one layer only keep their value through the others.
    assert_eq!(config.infra.seed, 7);
    // Without the file, env still beats the default and --set beats env.
    assert_eq!(eps(load_with(None, &env_pairs, &[]).unwrap()), 4.0);
    assert_eq!(
        eps(load_with(None, &env_pairs, &["training.attack.eps=6"]).unwrap()),
        6.0
    );
    // Later --set arguments win over earlier ones.
    let args = ["training.attack.eps=6", "training.attack.eps=3"];
    assert_eq!(eps(load_with(None, &[], &args).unwrap()), 3.0);
}

#[test]
fn tables_merge_key_by_key_across_layers() {
    let file = toml_file("[training.adamw]\nweight_decay = 0.05\n");
    let config = load_with(
        Some(&file),
        &[("HSAT__TRAINING__ADAMW__EPS", "1e-7")],
        &["training.adamw={betas = [0.8, 0.99]}"],
    )
    .unwrap();
    let optimizer = config.training.optimizer;
    assert_eq!(optimizer.weight_decay, 0.05);
    assert_eq!(optimizer.eps, 1e-7);
    assert_eq!((optimizer.beta1, optimizer.beta2), (0.8, 0.99));
    assert_eq!(optimizer.learn_rate, 1e-3);
}

#[test]
fn environment_keys_keep_their_underscores() {
    let config = load_with(
        None,
        &[
            ("HSAT__TRAINING__ATTACK__LOSS_TYPE", "pt"),
            ("HSAT__DATA__HIDISC__NUM_SLIDE_SAMPLES", "1"),
            ("HSAT__TRAINING__DYNAMIC_WEIGHTS_LAMDA", "0.5"),
            ("HSAT__DATA__DYNAMIC_AUG", "true"),
            ("HSAT__MODEL__BACKBONE", "resnet18"),
            ("HSAT__TRAINING__ATTACK__NAME", "pgd"),
            // Not ours: ignored.
            ("HOME", "/root"),
            ("HSAT_SINGLE", "x"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(config.training.attack.loss_type, "pt".parse().unwrap());
    assert_eq!(config.data.hidisc.num_slide_samples, 1);
    assert_eq!(config.training.dynamic_weights_lamda, 0.5);
    assert!(config.data.dynamic_aug);
    assert_eq!(config.model.backbone, Backbone::ResNet18);
    assert_eq!(config.training.attack.kind, AttackKind::Pgd);
}

#[test]
fn environment_lists_are_comma_separated() {
    let mlp = |value: &str| {
        load_with(None, &[("HSAT__MODEL__MLP_HIDDEN", value)], &[])
            .unwrap()
            .model
            .mlp_hidden
    };
    assert_eq!(mlp("256,128"), [256, 128]);
    assert_eq!(mlp("256, 128"), [256, 128]);
    assert_eq!(mlp("256"), [256]);
    assert_eq!(mlp(""), Vec::<usize>::new());
    let config = load_with(None, &[("HSAT__TRAINING__ADAMW__BETAS", "0.8,0.99")], &[]).unwrap();
    assert_eq!(
        (
            config.training.optimizer.beta1,
            config.training.optimizer.beta2
        ),
        (0.8, 0.99)
    );
    let wrong = problems(load_with(
        None,
        &[("HSAT__MODEL__MLP_HIDDEN", "256,wide")],
        &[],
    ));
    assert_eq!(
        wrong,
        [
            "model.mlp_hidden[1] = \"wide\": must be an integer (set by environment variable \
          HSAT__MODEL__MLP_HIDDEN)"
        ]
    );
}

#[test]
fn dataset_keys_from_every_layer() {
    let file = toml_file("[data]\nsource = \"opensrh\"\ndb_root = \"/data/from-file\"\n");
    let config = load_with(
        Some(&file),
        &[
            ("HSAT__DATA__DB_ROOT", "/data/opensrh"),
            ("HSAT__DATA__LOADER__THREADS", "4"),
            ("HSAT__DATA__META_SPLIT_JSON", "fold1.json"),
        ],
        &["data.loader.prefetch=3", "data.meta_json=2024.10"],
    )
    .unwrap();
    let data = config.data;
    assert_eq!(data.source, DataSource::OpenSrh);
    assert_eq!(data.db_root, PathBuf::from("/data/opensrh"));
    assert_eq!(data.meta_split_json, "fold1.json");
    // A string key keeps the text, even when it reads as a number.
    assert_eq!(data.meta_json, "2024.10");
    assert_eq!(
        data.loader,
        LoaderConfig {
            threads: 4,
            prefetch: 3
        }
    );

    let config = load_with(
        None,
        &[("HSAT__DATA__SOURCE", "manifest")],
        &["data.manifest=tiles/all.csv"],
    )
    .unwrap();
    assert_eq!(config.data.source, DataSource::Manifest);
    assert_eq!(config.data.manifest, Some(PathBuf::from("tiles/all.csv")));
}

#[test]
fn dataset_cross_key_problems_name_the_layer() {
    assert_eq!(
        problems(load_with(None, &[], &["data.source=opensrh"])),
        [
            "data.db_root = \"\": must be the OpenSRH folder (the one holding \
             meta/opensrh.json) when data.source = \"opensrh\""
        ]
    );
    assert_eq!(
        problems(load_with(
            None,
            &[
                ("HSAT__DATA__SOURCE", "manifest"),
                ("HSAT__DATA__MANIFEST", "")
            ],
            &[]
        )),
        [
            "data.manifest = \"\": must be the path of the CSV file listing the patches \
             (header patient,slide,path,label,split) when data.source = \"manifest\" (set by \
             environment variable HSAT__DATA__MANIFEST)"
        ]
    );
    assert_eq!(
        problems(load_with(
            None,
            &[],
            &["data.loader.prefetch=0", "data.loader.workers=2"]
        )),
        [
            "data.loader.workers: unknown key (set by --set data.loader.workers=2); the keys \
             of data.loader are prefetch, threads",
            "data.loader.prefetch = 0: must be in [1, 64] (batches prepared ahead of the \
             training step) (set by --set data.loader.prefetch=0)",
        ]
    );
}

#[test]
fn environment_strings_are_taken_as_written() {
    let config = load_with(None, &[("HSAT__INFRA__OUT_DIR", "2024.10")], &[]).unwrap();
    assert_eq!(config.infra.out_dir, PathBuf::from("2024.10"));
}

#[test]
fn unknown_keys_are_rejected_in_every_layer() {
    let file = toml_file("[training]\nbatchsize = 4\n");
    assert_eq!(
        problems(load_with(Some(&file), &[], &[])),
        [format!(
            "training.batchsize: unknown key (set by config file {}); did you mean \
             training.batch_size?",
            file.path().display()
        )]
    );
    assert_eq!(
        problems(load_with(None, &[("HSAT__TRAINING__ATTAK__EPS", "4")], &[])),
        [
            "training.attak.eps: unknown key (set by environment variable \
          HSAT__TRAINING__ATTAK__EPS); did you mean training.attack.eps?"
        ]
    );
    assert_eq!(
        problems(load_with(None, &[], &["training.lr=0.1"])),
        [
            "training.lr: unknown key (set by --set training.lr=0.1); the keys of training are \
          adamw, async_checkpoints, attack, batch_size, dynamic_weights_lamda, keep_checkpoint_every, \
          keep_checkpoints, learn_rate, loss_scope, num_epochs, objective, only_adv, optimizer, \
          save_checkpoint_interval, scheduler, sync_bn"
        ]
    );
    assert_eq!(
        problems(load_with(None, &[], &["trainer.seed=1"])),
        [
            "trainer.seed: unknown key (set by --set trainer.seed=1); the top-level sections are \
          cluster, data, eval, infra, metrics, model, security, training"
        ]
    );
}

#[test]
fn unknown_keys_are_rejected_by_from_toml_str() {
    let problems = problems(Config::from_toml_str(
        "[model]\nbackbone = \"resnet18\"\nhead = 3\n",
    ));
    assert_eq!(problems.len(), 1);
    assert!(problems[0].starts_with("model.head: unknown key (set by TOML text)"));
}

#[test]
fn wrong_types_name_key_value_and_layer() {
    let file = toml_file("[training]\nbatch_size = 2.5\nonly_adv = \"yes\"\n");
    let problems = problems(load_with(
        Some(&file),
        &[("HSAT__DATA__IMAGE_SIZE", "big")],
        &["model.mlp_hidden=wide"],
    ));
    let origin = file.path().display();
    assert_eq!(
        problems,
        [
            "data.image_size = \"big\": must be an integer (set by environment variable \
             HSAT__DATA__IMAGE_SIZE)"
                .to_owned(),
            "model.mlp_hidden = \"wide\": must be a list of integers, e.g. [256, 128] (set by \
             --set model.mlp_hidden=wide)"
                .to_owned(),
            format!("training.batch_size = 2.5: must be an integer (set by config file {origin})"),
            format!(
                "training.only_adv = \"yes\": must be true or false (set by config file {origin})"
            ),
        ]
    );
    // An integral float is still not an integer.
    let problems = problems_of_toml("[training]\nbatch_size = 10.0\n");
    assert_eq!(
        problems,
        ["training.batch_size = 10.0: must be an integer (set by TOML text)"]
    );
}

fn problems_of_toml(text: &str) -> Vec<String> {
    problems(Config::from_toml_str(text))
}

#[test]
fn float_keys_accept_integers() {
    let config = Config::from_toml_str(
        "[training]\nlearn_rate = 1\n[training.attack]\neps = 8\nalpha = 1\n[training.adamw]\nbetas = [0, 0]\n",
    )
    .unwrap();
    assert_eq!(config.training.optimizer.learn_rate, 1.0);
    assert_eq!(config.training.attack.eps, 8.0 / 255.0);
    assert_eq!(config.training.attack.alpha, 1.0 / 255.0);
    assert_eq!(config.training.optimizer.beta1, 0.0);
}

#[test]
fn warmup_steps_integer_and_float_differ() {
    let warmup = |text: &str| {
        Config::from_toml_str(text)
            .unwrap()
            .training
            .scheduler
            .warmup
    };
    assert_eq!(
        warmup("[training.scheduler.params]\nnum_warmup_steps = 100\n"),
        WarmupSteps::Steps(100)
    );
    assert_eq!(
        warmup("[training.scheduler.params]\nnum_warmup_steps = 0.1\n"),
        WarmupSteps::Fraction(0.1)
    );
    assert_eq!(
        warmup("[training.scheduler.params]\nnum_warmup_steps = 1.0\n"),
        WarmupSteps::Fraction(1.0)
    );
    assert_eq!(
        warmup("[training.scheduler.params]\nnum_warmup_steps = 1\n"),
        WarmupSteps::Steps(1)
    );
    let key = "HSAT__TRAINING__SCHEDULER__PARAMS__NUM_WARMUP_STEPS";
    let from_env = |value: &str| {
        load_with(None, &[(key, value)], &[])
            .unwrap()
            .training
            .scheduler
            .warmup
    };
    assert_eq!(from_env("100"), WarmupSteps::Steps(100));
    assert_eq!(from_env("0.25"), WarmupSteps::Fraction(0.25));
    let from_set = |arg: &str| {
        load_with(None, &[], &[arg])
            .unwrap()
            .training
            .scheduler
            .warmup
    };
    assert_eq!(
        from_set("training.scheduler.params.num_warmup_steps=7"),
        WarmupSteps::Steps(7)
    );
    assert_eq!(
        from_set("training.scheduler.params.num_warmup_steps=0.5"),
        WarmupSteps::Fraction(0.5)
    );
    // Same total, different meaning: 10 steps of 1000 vs 10% of 1000.
    assert_eq!(WarmupSteps::Steps(10).resolve(1000), 10);
    assert_eq!(WarmupSteps::Fraction(0.1).resolve(1000), 100);
}

#[test]
fn set_values_of_every_type() {
    let config = load_with(
        None,
        &[],
        &[
            "training.batch_size=4",
            "training.learn_rate=5e-4",
            "training.only_adv=true",
            "model.mlp_hidden=[256, 64]",
            "model.backbone=\"resnet34\"",
            "training.attack.loss_type=p_s",
            "infra.out_dir=runs/x y",
            "model.init_checkpoint=weights/r50.safetensors",
        ],
    )
    .unwrap();
    assert_eq!(config.training.batch_size, 4);
    assert_eq!(config.training.optimizer.learn_rate, 5e-4);
    assert!(config.training.only_adv);
    assert_eq!(config.model.mlp_hidden, [256, 64]);
    assert_eq!(config.model.backbone, Backbone::ResNet34);
    assert_eq!(config.training.attack.loss_type.name(), "p_s");
    assert_eq!(config.infra.out_dir, PathBuf::from("runs/x y"));
    assert_eq!(
        config.model.init_checkpoint,
        Some(PathBuf::from("weights/r50.safetensors"))
    );
}

#[test]
fn set_without_equals_is_a_bad_override() {
    let err = load_with(None, &[], &["training.batch_size"]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadOverride { arg, .. } if arg == "training.batch_size"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "bad override `--set training.batch_size`: expected section.key=value, e.g. --set \
         training.attack.eps=4"
    );
}

#[test]
fn bad_values_are_reported_together_with_their_layer() {
    let file = toml_file("[data]\nrand_aug_prob = 1.5\n[model]\nbackbone = \"resnet9\"\n");
    let err = load_with(
        Some(&file),
        &[("HSAT__TRAINING__ATTACK__EPS", "-1")],
        &["training.batch_size=0", "training.attack.loss_type=p_x"],
    )
    .unwrap_err();
    let origin = file.path().display();
    let expected = [
        format!(
            "data.rand_aug_prob = 1.5: must be in [0, 1] (a probability) (set by config file {origin})"
        ),
        format!(
            "model.backbone = \"resnet9\": must be one of \"small_cnn\", \"resnet18\", \
             \"resnet34\", \"resnet50\", \"resnet101\", \"wide_resnet50_2\", \
             \"resnet50_multi_bn\", \"resnet18_multi_bn\" (set by config file {origin})"
        ),
        "training.batch_size = 0: must be >= 1 (patients per step for the whole job) (set by --set \
         training.batch_size=0)"
            .to_owned(),
        "training.attack.eps = -1: must be in [0, 255] (units of 1/255; the paper uses 8) (set \
         by environment variable HSAT__TRAINING__ATTACK__EPS)"
            .to_owned(),
        "training.attack.loss_type = \"p_x\": must be one of \"p_s_pt\", \"s_pt\", \"p_pt\", \
         \"p_s\", \"p\", \"s\", \"pt\" (set by --set training.attack.loss_type=p_x)"
            .to_owned(),
    ];
    match &err {
        ConfigError::Invalid(problems) => assert_eq!(problems, &expected),
        other => panic!("{other:?}"),
    }
    // Display: a header, then one problem per line.
    let shown = err.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines[0], "invalid configuration:");
    assert_eq!(lines.len(), 1 + expected.len());
    for (line, problem) in lines[1..].iter().zip(&expected) {
        assert_eq!(line.trim_start(), problem);
    }
}

#[test]
fn type_and_range_problems_are_reported_together() {
    let problems = problems_of_toml("[training]\nbatch_size = \"ten\"\nnum_epochs = 0\n");
    assert_eq!(
        problems,
        [
            "training.batch_size = \"ten\": must be an integer (set by TOML text)",
            "training.num_epochs = 0: must be >= 1 (set by TOML text)",
        ]
    );
}

#[test]
fn unreadable_and_malformed_files() {
    let missing = PathBuf::from("/nonexistent/hsat/config.toml");
    let err = load(&ConfigSources {
        file: Some(missing.clone()),
        ..ConfigSources::default()
    })
    .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Read { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("cannot read config file /nonexistent/hsat/config.toml (check the path")
    );

    let file = toml_file("[training\nbatch_size = 4\n");
    match load_with(Some(&file), &[], &[]).unwrap_err() {
        ConfigError::Parse { origin, message } => {
            assert_eq!(origin, format!("config file {}", file.path().display()));
            assert!(message.contains("line 1"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_round_trip_through_toml_text() {
    let mut config = Config::default();
    config.infra.seed = 42;
    config.infra.out_dir = PathBuf::from("runs/round trip");
    config.data.dynamic_aug = true;
    config.data.hidisc.num_slide_samples = 1;
    config.data.source = DataSource::Manifest;
    config.data.db_root = PathBuf::from("/data/he tiles");
    config.data.meta_json = "meta v2.json".to_owned();
    config.data.meta_split_json = "folds/split_0.json".to_owned();
    config.data.manifest = Some(PathBuf::from("tiles/manifest.csv"));
    config.data.loader = LoaderConfig {
        threads: 3,
        prefetch: 5,
    };
    config.model.backbone = Backbone::WideResNet50_2;
    config.model.mlp_hidden = vec![512, 256];
    config.model.init_checkpoint = Some(PathBuf::from("w/init.safetensors"));
    config.training.only_adv = true;
    config.training.optimizer.learn_rate = 3.3e-4;
    config.training.attack.kind = AttackKind::Pgd;
    config.training.attack.eps_255 = 4.0;
    config.training.attack.eps = 4.0 / 255.0;
    config.training.attack.alpha_255 = 1.0 / 3.0;
    config.training.attack.alpha = (1.0 / 3.0) / 255.0;
    config.training.attack.loss_type = "s_pt".parse().unwrap();
    config.training.attack.warmup_epochs = 100;
    config.training.scheduler.warmup = WarmupSteps::Fraction(1.0);

    let json = config.to_json_value();
    assert_eq!(json["training"]["attack"]["eps"], 4.0);
    assert_eq!(
        json["training"]["adamw"]["betas"],
        serde_json::json!([0.9, 0.999])
    );
    assert_eq!(json["model"]["init_checkpoint"], "w/init.safetensors");
    assert_eq!(json["data"]["manifest"], "tiles/manifest.csv");
    assert_eq!(json["data"]["loader"]["prefetch"], 5);

    let text = toml::to_string(&toml::Value::try_from(&json).unwrap()).unwrap();
    let reloaded = Config::from_toml_str(&text).unwrap();
    assert_eq!(reloaded, config);
    assert_eq!(Config::from_json_value(&json).unwrap(), config);
    assert_eq!(
        Config::from_toml_str(&config.to_toml_string()).unwrap(),
        config
    );

    // A step count stays a step count.
    config.training.scheduler.warmup = WarmupSteps::Steps(100);
    let json = config.to_json_value();
    assert!(json["training"]["scheduler"]["params"]["num_warmup_steps"].is_i64());
    let text = toml::to_string(&toml::Value::try_from(&json).unwrap()).unwrap();
    assert_eq!(Config::from_toml_str(&text).unwrap(), config);
}

#[test]
fn default_json_is_the_raw_layout() {
    let json = Config::default().to_json_value();
    let training = &json["training"];
    assert_eq!(training["optimizer"], "adamw");
    assert_eq!(training["objective"]["which"], "hidisc");
    assert_eq!(
        training["objective"]["params"]["supcon_params"]["contrast_mode"],
        "all"
    );
    assert_eq!(training["attack"]["name"], "none");
    assert_eq!(training["attack"]["eps"], 8.0);
    assert_eq!(training["scheduler"]["which"], "cos_warmup");
    assert!(training["scheduler"]["params"]["num_warmup_steps"].is_f64());
    assert_eq!(json["model"]["init_checkpoint"], "");
    assert_eq!(json["data"]["source"], "synthetic");
    assert_eq!(json["data"]["db_root"], "");
    assert_eq!(json["data"]["manifest"], "");
    assert_eq!(json["data"]["loader"]["threads"], 0);
    let err = Config::from_json_value(&serde_json::json!([1, 2])).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { message, .. } if message == "expected an object at the top level"),
        "{err:?}"
    );
}

#[test]
fn process_env_keeps_only_hsat_variables() {
    let sources = ConfigSources::from_process_env(Some(PathBuf::from("a.toml")), sets(&["x=1"]));
    assert!(
        sources
            .env
            .keys()
            .all(|name| name.to_ascii_uppercase().starts_with("HSAT__")),
        "{:?}",
        sources.env.keys()
    );
    assert_eq!(sources.file, Some(PathBuf::from("a.toml")));
    assert_eq!(sources.overrides, ["x=1"]);
}

#[test]
fn quickstart_example_is_a_tiny_hsat_run() {
    let config = Config::from_toml_str(include_str!("../../../examples/quickstart.toml")).unwrap();
    assert_eq!(config.model.backbone, Backbone::ResNet18);
    assert_eq!(config.data.image_size, 64);
    assert_eq!(config.data.source, DataSource::OpenSrh);
    assert_eq!(config.data.db_root, PathBuf::from("runs/quickstart-data"));
    assert_eq!(
        (config.training.batch_size, config.training.num_epochs),
        (4, 15)
    );
    let attack = config.training.attack;
    assert_eq!(attack.kind, AttackKind::Pgd);
    assert_eq!(
        (attack.eps_255, attack.alpha_255, attack.iters),
        (8.0, 2.0, 5)
    );
    assert_eq!(attack.loss_type, LossType::P_S_PT);
    assert_eq!(attack.warmup_epochs, 1);
    assert!(config.training.only_adv);
    assert!(config.data.dynamic_aug);
    assert_eq!(config.training.save_checkpoint_interval, 15);
    assert_eq!(config.infra.out_dir, PathBuf::from("runs/quickstart"));
    // The quickstart's train bank has 96 patches: fewer than the paper's k = 200.
    assert_eq!(config.eval.knn_k, 10);
}

#[test]
fn paper_examples_differ_only_in_the_attack() {
    let hsat = Config::from_toml_str(include_str!("../../../examples/hsat_paper.toml")).unwrap();
    assert_eq!(hsat.model.backbone, Backbone::ResNet50);
    assert_eq!(hsat.data.image_size, 300);
    assert_eq!(hsat.data.source, DataSource::OpenSrh);
    assert_eq!(hsat.data.db_root, PathBuf::from("data/opensrh"));
    assert_eq!(
        (hsat.training.batch_size, hsat.training.num_epochs),
        (10, 40000)
    );
    assert_eq!(hsat.training.attack.kind, AttackKind::Pgd);
    assert_eq!(hsat.training.attack.eps, 8.0 / 255.0);
    assert_eq!(hsat.training.attack.warmup_epochs, 5000);
    assert!(hsat.training.only_adv);
    assert!(hsat.data.dynamic_aug);

    let hidisc =
        Config::from_toml_str(include_str!("../../../examples/hidisc_baseline.toml")).unwrap();
    assert_eq!(hidisc.training.attack.kind, AttackKind::None);
    assert!(!hidisc.training.only_adv);
    assert!(!hidisc.data.dynamic_aug);
    let mut without_attack = hsat.clone();
    without_attack.training.attack.kind = AttackKind::None;
    without_attack.training.attack.warmup_epochs = hidisc.training.attack.warmup_epochs;
    without_attack.training.only_adv = false;
    without_attack.data.dynamic_aug = false;
    without_attack.infra.out_dir = hidisc.infra.out_dir.clone();
    assert_eq!(without_attack, hidisc);
}

#[test]
fn manifest_example_is_the_paper_run_on_a_manifest() {
    let config = Config::from_toml_str(include_str!("../../../examples/manifest.toml")).unwrap();
    assert_eq!(config.data.source, DataSource::Manifest);
    assert_eq!(
        config.data.manifest,
        Some(PathBuf::from("data/tiles/manifest.csv"))
    );
    assert_eq!(config.data.image_size, 224);
    let hsat = Config::from_toml_str(include_str!("../../../examples/hsat_paper.toml")).unwrap();
    assert_eq!(config.training, hsat.training);
    assert_eq!(config.model, hsat.model);
    assert_eq!(config.data.hidisc, hsat.data.hidisc);
}

/// Every leaf key of the schema, dotted.
fn leaf_keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) => leaf_keys(inner, &key, out),
            _ => out.push(key),
        }
    }
}

#[test]
fn docs_describe_every_key() {
    let docs = include_str!("../../../docs/config.md");
    let mut keys = Vec::new();
    leaf_keys(&layers::schema().unwrap(), "", &mut keys);
    assert_eq!(keys.len(), 98);
    for key in keys {
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/config.md lacks `{key}`"
        );
        let env_name = layers::env_var_name(&key);
        assert!(docs.contains(&env_name), "docs/config.md lacks {env_name}");
    }
}

#[test]
fn metrics_addresses_load_and_a_bad_one_is_named_with_the_fix() {
    let cfg = Config::from_toml_str(
        "[metrics]\nlisten = \"0.0.0.0:9464\"\nworker_listen = \"127.0.0.1:0\"\nclean_loss_every = 10\n",
    )
    .unwrap();
    assert_eq!(cfg.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
    assert_eq!(
        cfg.metrics.worker_listen,
        Some("127.0.0.1:0".parse().unwrap())
    );
    assert!(cfg.metrics.clean_loss_at(20) && !cfg.metrics.clean_loss_at(21));
    let never = Config::from_toml_str("[metrics]\nclean_loss_every = 0\n").unwrap();
    assert!(!never.metrics.clean_loss_at(0));
    let problems = problems(load(&ConfigSources {
        overrides: vec![
            "metrics.listen=localhost".into(),
            "metrics.clean_loss_every=-1".into(),
        ],
        ..ConfigSources::default()
    }));
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("metrics.listen = \"localhost\": must be IP:PORT")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("metrics.clean_loss_every = -1")),
        "{problems:?}"
    );
    // Per process: a worker serving its metrics elsewhere still matches the job.
    let job = Config::default().to_json_value();
    assert!(config_differences(&cfg.to_json_value(), &job).is_empty());
}

#[test]
fn eval_section_defaults_layers_and_checks() {
    let cfg = Config::default();
    assert_eq!((cfg.eval.knn_k, cfg.eval.knn_temperature), (200, 0.07));
    assert_eq!(cfg.eval.attacks, EvalAttack::ALL.to_vec());
    assert_eq!(cfg.eval.eps_255, vec![4.0, 8.0]);
    assert_eq!((cfg.eval.alpha_255, cfg.eval.steps), (2.0, 10));
    // The adaptive attack runs by default, with AutoAttack's budget of iterations.
    assert_eq!(cfg.eval.attacks.last(), Some(&EvalAttack::Apgd));
    assert_eq!((cfg.eval.apgd_steps, cfg.eval.apgd_restarts), (100, 1));
    let file = toml_file("[eval]\nattacks = \"mifgsm, pgd\"\neps = [2, 8]\n");
    let cfg = load_with(
        Some(&file),
        &[("HSAT__EVAL__KNN_K", "20")],
        &["eval.attack_target=projection", "eval.apgd_restarts=3"],
    )
    .unwrap();
    assert_eq!(cfg.eval.apgd_restarts, 3);
    assert_eq!(cfg.eval.attacks, vec![EvalAttack::MiFgsm, EvalAttack::Pgd]);
    assert_eq!(cfg.eval.eps_255, vec![2.0, 8.0]);
    assert_eq!(cfg.eval.knn_k, 20);
    assert_eq!(cfg.eval.attack_target, EvalTarget::Projection);
    let env_list = load_with(None, &[("HSAT__EVAL__EPS", "1,2.5")], &["eval.attacks="]).unwrap();
    assert_eq!(env_list.eval.eps_255, vec![1.0, 2.5]);
    assert!(env_list.eval.attacks.is_empty());
    let found = problems(load_with(
        None,
        &[],
        &[
            "eval.attacks=pgd,cw,pgd",
            "eval.eps=[0, 300]",
            "eval.knn_k=0",
            "eval.apgd_steps=0",
            "eval.apgd_restarts=0",
        ],
    ));
    let text = found.join("\n");
    for needle in [
        "\"cw\"",
        "twice",
        "eval.eps[0] = 0",
        "eval.eps[1] = 300",
        "eval.knn_k = 0",
        "eval.apgd_steps = 0",
        "eval.apgd_restarts = 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    // Round trip through the raw form (checkpoints store it).
    let back = Config::from_json_value(&cfg.to_json_value()).unwrap();
    assert_eq!(back.eval, cfg.eval);
}

#[test]
fn knn_device_and_memory_keys() {
    let cfg = Config::default();
    assert_eq!(
        (cfg.eval.knn_device, cfg.eval.knn_memory_mb),
        (KnnDevice::Auto, 512)
    );
    let cfg = load_with(
        None,
        &[("HSAT__EVAL__KNN_MEMORY_MB", "64")],
        &["eval.knn_device=cpu_exact"],
    )
    .unwrap();
    assert_eq!(
        (cfg.eval.knn_device, cfg.eval.knn_memory_mb),
        (KnnDevice::CpuExact, 64)
    );
    let back = Config::from_json_value(&cfg.to_json_value()).unwrap();
    assert_eq!(back.eval, cfg.eval);
    let text = problems(load_with(
        None,
        &[],
        &["eval.knn_device=gpu", "eval.knn_memory_mb=0"],
    ))
    .join("\n");
    for needle in ["\"gpu\"", "eval.knn_memory_mb = 0"] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
}

#[test]
fn cluster_section_keys_from_every_layer() {
    let file = toml_file("[cluster]\nworkers = 3\nlease_s = 4\nheartbeat_s = 0.25\n");
    let cfg = load_with(
        Some(&file),
        &[("HSAT__CLUSTER__MIN_WORKERS", "2")],
        &["cluster.formation_wait_s=1.5", "cluster.bucket_mb=8"],
    )
    .unwrap();
    let c = &cfg.cluster;
    assert_eq!((c.workers, c.min_workers, c.bucket_mb), (3, 2, 8));
    assert_eq!(c.lease, Duration::from_secs(4));
    assert_eq!(c.heartbeat, Duration::from_millis(250));
    assert_eq!(c.formation_wait, Duration::from_millis(1500));
    assert_eq!(c.silent_after(), Duration::from_millis(750));
    assert_eq!(c.bucket_bytes(), 8 << 20);
    // Round trip through the raw form (checkpoints store it).
    let back = Config::from_json_value(&cfg.to_json_value()).unwrap();
    assert_eq!(back.cluster, cfg.cluster);
}

#[test]
fn cluster_rules_name_both_keys_and_the_layer() {
    let found = problems(load_with(
        None,
        &[],
        &[
            "cluster.workers=2",
            "cluster.min_workers=3",
            "cluster.heartbeat_s=2",
            "cluster.lease_s=5",
            "cluster.collective_timeout_s=60",
            "cluster.regroup_wait_s=50",
            "cluster.shutdown_grace_s=45",
        ],
    ));
    let text = found.join("\n");
    for needle in [
        "cluster.min_workers = 3 must be at most cluster.workers = 2",
        "cluster.lease_s = 5 must be more than 3 x cluster.heartbeat_s = 6",
        "cluster.collective_timeout_s = 60 must be less than cluster.regroup_wait_s = 50",
        "cluster.regroup_wait_s = 50 must be less than cluster.shutdown_grace_s = 45",
        "(set by --set cluster.min_workers=3)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
    assert_eq!(found.len(), 4, "{text}");
}

#[test]
fn cluster_values_out_of_range_name_their_key() {
    let found = problems(load_with(
        None,
        &[("HSAT__CLUSTER__HEARTBEAT_S", "0")],
        &["cluster.workers=0", "cluster.rpc_retry_deadline_s=-1"],
    ));
    let text = found.join("\n");
    for needle in [
        "cluster.heartbeat_s = 0: must be a number of seconds > 0",
        "cluster.workers = 0: must be >= 1",
        "cluster.rpc_retry_deadline_s = -1: must be a number of seconds >= 0",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
    // A zero retry deadline (no retries) and formation wait are fine.
    let cfg = load_with(
        None,
        &[],
        &[
            "cluster.rpc_retry_deadline_s=0",
            "cluster.formation_wait_s=0",
        ],
    )
    .unwrap();
    assert!(cfg.cluster.rpc_retry_deadline.is_zero());
}

#[test]
fn security_section_keys_from_every_layer() {
    let file = toml_file("[security]\ntoken_file = \"/run/secrets/hsat/token\"\n");
    let cfg = load_with(
        Some(&file),
        &[("HSAT__SECURITY__MAX_MESSAGE_BYTES", "1048576")],
        &["security.request_timeout_s=12.5", "security.insecure=true"],
    )
    .unwrap();
    let s = &cfg.security;
    assert_eq!(
        s.token_file.as_deref(),
        Some(std::path::Path::new("/run/secrets/hsat/token"))
    );
    assert!(s.insecure);
    assert_eq!(s.max_message_bytes, 1 << 20);
    assert_eq!(s.request_timeout, Duration::from_millis(12_500));
    assert_eq!(s.max_concurrent_requests, 4096);
    let back = Config::from_json_value(&cfg.to_json_value()).unwrap();
    assert_eq!(back.security, cfg.security);
    // Machines name their own token files: not part of the job's identity.
    let other = load_with(None, &[], &[]).unwrap();
    assert!(config_differences(&cfg.to_json_value(), &other.to_json_value()).is_empty());
}

#[test]
fn security_limits_are_checked_naming_the_key() {
    let found = problems(load_with(
        None,
        &[],
        &[
            "security.max_message_bytes=10",
            "security.request_timeout_s=0.5",
            "security.max_concurrent_requests=0",
            "security.tls_key=/etc/hsat/key.pem",
        ],
    ));
    let text = found.join("\n");
    for needle in [
        "security.max_message_bytes = 10: must be between 1024 and 1073741824",
        "security.request_timeout_s = 0.5 must be more than cluster.long_poll_s = 1",
        "security.max_concurrent_requests = 0: must be >= 1",
        "security.tls_cert and security.tls_key go together",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
    assert_eq!(found.len(), 4, "{text}");
}
