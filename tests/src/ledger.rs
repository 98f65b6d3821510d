//! Reading and checking the coordinator's step ledger,
//! `<out_dir>/coordinator/ledger.jsonl`, from the outside, as an operator would.
//!
//! The ledger holds a header (the job), one JSON line per committed step (its epoch,
//! generation and every rank's shard and parameter checksum), one line per rollback
//! (`rollback_to`: committed steps from there on are void and are redone), and
//! `start`, `checkpoint` and `end` records (field `kind` names each). [`Ledger::check_complete`]
//! states the invariants a finished job must show: each step committed once and in
//! order, each epoch's patients exactly that epoch's balanced list, equal checksums
//! across the ranks of a step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hsat_core::config::{self, ConfigSources};
use hsat_core::dataset::{DatasetIndex, Split};
use hsat_core::sampler::{balanced_patients, steps_per_epoch};
use serde_json::Value;

/// Where the coordinator of a job writing to `out_dir` keeps its ledger.
pub fn ledger_path(out_dir: &Path) -> PathBuf {
    out_dir.join("coordinator").join("ledger.jsonl")
}

/// One rank's part of a committed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankCommit {
    /// The worker's name (`--name`).
    pub worker_name: String,
    /// Dataset indices of its shard's patients.
    pub patients: Vec<usize>,
    /// Its parameter checksum after the step (absent when a step recovered at a
    /// regroup lacks this rank's report).
    pub checksum: Option<u64>,
}

/// One committed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The global step.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// The generation (membership) that trained it.
    pub generation: u64,
    /// Every rank, in rank order.
    pub ranks: Vec<RankCommit>,
}

impl Commit {
    /// Every patient of the step, rank after rank.
    pub fn patients(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranks.iter().flat_map(|r| r.patients.iter().copied())
    }
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A committed step.
    Commit(Commit),
    /// Committed steps from `to_step` on are void; training resumes there.
    Rollback {
        /// The first voided step.
        to_step: u64,
    },
    /// The job's header (first line).
    Header {
        /// The job id.
        job_id: String,
    },
    /// A coordinator (re)started.
    Start {
        /// Its incarnation (0 = the first start).
        incarnation: u64,
    },
    /// A checkpoint holding `step` updates was recorded.
    Checkpoint {
        /// Steps it holds.
        step: u64,
    },
    /// The job ended (`finished`, `failed`, `cancelled`).
    End {
        /// How.
        outcome: String,
    },
}

/// A parsed ledger, its records in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Every record, in the order the coordinator wrote them.
    pub records: Vec<Record>,
}

impl Ledger {
    /// Reads the ledger of the job writing to `out_dir`; a missing file is an empty
    /// ledger (the coordinator creates it at start, a test may look earlier).
    pub fn read(out_dir: &Path) -> Result<Ledger, String> {
        let path = ledger_path(out_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ledger::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Parses ledger text. A last line without its newline is still being written
    /// by the coordinator and is left out (so a running job's ledger can be read).
    pub fn parse(text: &str) -> Result<Ledger, String> {
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        let mut records = Vec::new();
        for (number, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record =
                parse_record(line).map_err(|e| format!("line {}: {e}: {line}", number + 1))?;
            records.push(record);
        }
        Ok(Ledger { records })
    }

    /// The commit records, in file order (a step redone after a rollback appears
    /// twice).
    pub fn commits(&self) -> impl Iterator<Item = &Commit> {
        self.records.iter().filter_map(|r| match r {
            Record::Commit(c) => Some(c),
            _ => None,
        })
    }

    /// The steps that stand, by step: each step's last commit, without the steps a
    /// later rollback voided and nothing redid.
    pub fn committed(&self) -> BTreeMap<u64, &Commit> {
        let mut steps = BTreeMap::new();
        for record in &self.records {
            match record {
                Record::Commit(commit) => {
                    steps.insert(commit.step, commit);
                }
                Record::Rollback { to_step } => {
                    steps.retain(|step, _| step < to_step);
                }
                _ => {}
            }
        }
        steps
    }

    /// How many times a coordinator started on this job.
    pub fn starts(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r, Record::Start { .. }))
            .count()
    }

    /// The last `end` record's outcome, if the last record is one.
    pub fn end(&self) -> Option<&str> {
        match self.records.last() {
            Some(Record::End { outcome }) => Some(outcome),
            _ => None,
        }
    }

    /// The generations that committed a step.
    pub fn generations(&self) -> BTreeSet<u64> {
        self.commits().map(|c| c.generation).collect()
    }

    /// Checks the ledger of a finished job against its config file (the dataset it
    /// names gives the balanced patient lists): every step of the job committed once,
    /// in order (a rollback restarts the count at its step); each epoch's patients
    /// exactly that epoch's balanced list; every step trained by a world size in
    /// `world_sizes`, and the ranks' parameter checksums of a step all equal.
    /// `Err` names the first violation.
    pub fn check_complete(&self, config_path: &Path, world_sizes: &[usize]) -> Result<(), String> {
        let cfg = config::load(&ConfigSources {
            file: Some(config_path.to_path_buf()),
            env: Default::default(),
            overrides: Vec::new(),
        })
        .map_err(|e| format!("cannot load {}: {e}", config_path.display()))?;
        let index = DatasetIndex::load(&cfg.data)
            .map_err(|e| format!("cannot index the job's dataset: {e}"))?;
        let balanced = balanced_patients(
            &index,
            Split::Train,
            cfg.infra.seed,
            cfg.data.balance_study_per_class,
        );
        let per_epoch = steps_per_epoch(balanced.len(), cfg.training.batch_size);
        let epochs = cfg.training.num_epochs as u64;
        self.check_against(&balanced, per_epoch, epochs, world_sizes)
    }

    /// [`Ledger::check_complete`] with the job's numbers given: `balanced` is every
    /// epoch's patient list (its order does not matter), `per_epoch` steps per epoch.
    pub fn check_against(
        &self,
        balanced: &[usize],
        per_epoch: u64,
        epochs: u64,
        world_sizes: &[usize],
    ) -> Result<(), String> {
        // Once and in order: each commit is the step after the previous one, or the
        // step a rollback restarted at.
        let mut next = 0;
        for record in &self.records {
            match record {
                Record::Commit(commit) if commit.step != next => {
                    return Err(format!(
                        "step {} committed where step {next} was due (a step committed twice or out of order)",
                        commit.step
                    ));
                }
                Record::Commit(_) => next += 1,
                Record::Rollback { to_step } if *to_step > next => {
                    return Err(format!(
                        "rollback to step {to_step}, which was never committed (next due {next})"
                    ));
                }
                Record::Rollback { to_step } => next = *to_step,
                _ => {}
            }
        }
        let total = per_epoch * epochs;
        let steps = self.committed();
        let committed: Vec<u64> = steps.keys().copied().collect();
        if committed != (0..total).collect::<Vec<_>>() {
            return Err(format!(
                "the job has steps 0..{total}, the ledger commits {committed:?}"
            ));
        }
        let mut sorted_balanced = balanced.to_vec();
        sorted_balanced.sort_unstable();
        for epoch in 0..epochs {
            let mut consumed: Vec<usize> = steps
                .values()
                .filter(|c| c.epoch == epoch)
                .flat_map(|c| c.patients())
                .collect();
            consumed.sort_unstable();
            if consumed != sorted_balanced {
                return Err(format!(
                    "epoch {epoch} consumed patients {consumed:?}, its balanced list is {sorted_balanced:?}"
                ));
            }
        }
        for (step, commit) in &steps {
            if !world_sizes.contains(&commit.ranks.len()) {
                return Err(format!(
                    "step {step}: {} ranks trained it, expected one of {world_sizes:?}",
                    commit.ranks.len()
                ));
            }
            let checksums: Vec<u64> = commit.ranks.iter().filter_map(|r| r.checksum).collect();
            if checksums.is_empty() {
                return Err(format!("step {step}: no rank reported a checksum"));
            }
            if !checksums.windows(2).all(|w| w[0] == w[1]) {
                return Err(format!(
                    "step {step}: ranks' parameters differ: checksums {checksums:?}"
                ));
            }
        }
        Ok(())
    }
}

fn parse_record(line: &str) -> Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let number = |key: &str| {
        value[key]
            .as_u64()
            .ok_or_else(|| format!("no `{key}` number"))
    };
    match value["kind"].as_str() {
        Some("header") => {
            return Ok(Record::Header {
                job_id: value["job_id"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Some("start") => {
            return Ok(Record::Start {
                incarnation: number("incarnation")?,
            });
        }
        Some("checkpoint") => {
            return Ok(Record::Checkpoint {
                step: number("step")?,
            });
        }
        Some("end") => {
            return Ok(Record::End {
                outcome: value["outcome"]
                    .as_str()
                    .ok_or("an end record without `outcome`")?
                    .to_owned(),
            });
        }
        Some("commit" | "rollback") | None => {}
        Some(other) => return Err(format!("unknown record kind `{other}`")),
    }
    if let Some(to_step) = value.get("rollback_to") {
        let to_step = to_step.as_u64().ok_or("rollback_to is not a step")?;
        return Ok(Record::Rollback { to_step });
    }
    let ranks = value["ranks"]
        .as_array()
        .ok_or("neither a commit (`ranks`) nor a rollback (`rollback_to`)")?
        .iter()
        .map(parse_rank)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Record::Commit(Commit {
        step: number("step")?,
        epoch: number("epoch")?,
        generation: number("generation")?,
        ranks,
    }))
}

fn parse_rank(rank: &Value) -> Result<RankCommit, String> {
    let patients = rank["patients"]
        .as_array()
        .ok_or("a rank without `patients`")?
        .iter()
        .map(|p| {
            p.as_u64()
                .map(|p| p as usize)
                .ok_or_else(|| format!("patient {p} is not an index"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let checksum = match &rank["checksum"] {
        Value::Null => None,
        other => Some(
            other
                .as_u64()
                .ok_or_else(|| format!("checksum {other} is not a number"))?,
        ),
    };
    Ok(RankCommit {
        worker_name: rank["worker_name"].as_str().unwrap_or_default().to_owned(),
        patients,
        checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(step: u64, epoch: u64, shards: &[(&[usize], Option<u64>)]) -> String {
        let ranks: Vec<Value> = shards
            .iter()
            .map(|(patients, checksum)| {
                serde_json::json!({"worker_name": "w", "patients": patients, "checksum": checksum})
            })
            .collect();
        format!(
            "{}\n",
            serde_json::json!({"step": step, "epoch": epoch, "generation": 1, "ranks": ranks})
        )
    }

    /// Two epochs of two steps over patients 0..4, two ranks.
    fn complete() -> String {
        [
            commit(0, 0, &[(&[3], Some(7)), (&[0], Some(7))]),
            commit(1, 0, &[(&[1], Some(8)), (&[2], Some(8))]),
            commit(2, 1, &[(&[2], Some(9)), (&[1], Some(9))]),
            commit(3, 1, &[(&[0], Some(4)), (&[3], None)]),
        ]
        .concat()
    }

    fn check(text: &str) -> Result<(), String> {
        Ledger::parse(text)
            .unwrap()
            .check_against(&[0, 1, 2, 3], 2, 2, &[2])
    }

    #[test]
    fn a_complete_ledger_passes_and_a_rollback_redo_counts_once() {
        assert_eq!(check(&complete()), Ok(()));
        let mut redone = complete();
        redone.push_str("{\"rollback_to\":2,\"checkpoint\":null}\n");
        redone.push_str(&commit(2, 1, &[(&[2], Some(9)), (&[1], Some(9))]));
        redone.push_str(&commit(3, 1, &[(&[0], Some(4)), (&[3], Some(4))]));
        assert_eq!(check(&redone), Ok(()));
    }

    #[test]
    fn header_start_checkpoint_and_end_records_are_read_and_do_not_count_as_steps() {
        let mut text = String::from(
            "{\"kind\":\"header\",\"job_id\":\"j\"}\n{\"kind\":\"start\",\"incarnation\":0}\n",
        );
        text.push_str(&complete());
        text.push_str("{\"kind\":\"checkpoint\",\"step\":4,\"dir\":\"/c\"}\n");
        text.push_str(
            "{\"kind\":\"end\",\"outcome\":\"finished\",\"reason\":\"\",\"committed\":4}\n",
        );
        assert_eq!(check(&text), Ok(()));
        let ledger = Ledger::parse(&text).unwrap();
        assert_eq!((ledger.starts(), ledger.end()), (1, Some("finished")));
        assert_eq!(ledger.records[0], Record::Header { job_id: "j".into() });
    }

    #[test]
    fn a_half_written_last_line_is_left_out() {
        let mut text = complete();
        text.push_str("{\"step\":4,\"ep");
        assert_eq!(Ledger::parse(&text).unwrap().commits().count(), 4);
    }

    #[test]
    fn each_violation_is_named() {
        let twice = [
            complete(),
            commit(3, 1, &[(&[0], Some(4)), (&[3], Some(4))]),
        ]
        .concat();
        let err = check(&twice).unwrap_err();
        assert!(
            err.contains("step 3 committed where step 4 was due"),
            "{err}"
        );

        let missing = complete()
            .lines()
            .take(3)
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        let err = check(&missing).unwrap_err();
        assert!(err.contains("the ledger commits [0, 1, 2]"), "{err}");

        let repeated_patient = complete().replace("[3]", "[1]");
        let err = check(&repeated_patient).unwrap_err();
        assert!(
            err.contains("epoch 0 consumed patients [0, 1, 1, 2]"),
            "{err}"
        );

        let differing = complete().replacen("\"checksum\":9", "\"checksum\":10", 1);
        let err = check(&differing).unwrap_err();
        assert!(err.contains("step 2: ranks' parameters differ"), "{err}");

        let err = Ledger::parse(&complete())
            .unwrap()
            .check_against(&[0, 1, 2, 3], 2, 2, &[3])
            .unwrap_err();
        assert!(err.contains("step 0: 2 ranks trained it"), "{err}");
    }
}
