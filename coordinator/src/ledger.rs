//! The durable record of a job: `<out_dir>/coordinator/ledger.jsonl`, one JSON
//! object per line, appended and fsynced in order by a writer thread, so RPC
//! handlers never wait for the disk. It is also what a restarted coordinator
//! rebuilds the job from ([`read`]).
//!
//! Records (field `kind`):
//!
//! - `header` (first line): job id, the config (JSON) and its fingerprint, the
//!   dataset fingerprint, total steps, hsat version, creation time.
//! - `start`: a coordinator (re)started: committed steps, the checkpoint it would
//!   resume from, its incarnation (0 for the first).
//! - `commit`: one committed step ([`crate::scheduler::LedgerEntry`]).
//! - `rollback`: committed steps from `rollback_to` on are void (and redone).
//! - `checkpoint`: rank 0 wrote a complete checkpoint holding `step` updates at `dir`.
//! - `end`: the job ended `finished`, `failed` or `cancelled`, with why and the
//!   committed steps. A failed or cancelled job may be resumed later (more records
//!   follow); a finished one is never trained again.
//!
//! A crash in the middle of an append leaves a torn last line: [`read`] reports it
//! (the job state is rebuilt without it) and [`LedgerWriter::open`] cuts it off
//! before appending. A torn line anywhere else is corruption and an error.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::CoordinatorError;

/// The ledger's file name inside `<out_dir>/coordinator`.
pub const LEDGER_FILE: &str = "ledger.jsonl";

/// The first record: which job this ledger belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Random id of the job (names its archive when a new job replaces it).
    pub job_id: String,
    /// The job's config, `Config::to_json_value`.
    pub config: Value,
    /// SHA-256 of the config's canonical JSON without worker-local keys.
    pub config_fingerprint: String,
    /// The dataset's fingerprint.
    pub dataset_fingerprint: String,
    /// Steps of the job.
    pub total_steps: u64,
    /// The hsat version that created the job.
    pub hsat_version: String,
    /// Seconds since the Unix epoch when the job was created.
    pub created_unix: u64,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndOutcome {
    /// Every step committed.
    Finished,
    /// Stopped on an error.
    Failed,
    /// Stopped on request (signal) or because every local worker died.
    Cancelled,
}

impl EndOutcome {
    /// `finished`, `failed`, `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// An `end` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndRecord {
    /// How it ended.
    pub outcome: EndOutcome,
    /// Why (empty when finished).
    pub reason: String,
    /// Committed steps at the end.
    pub committed: u64,
}

/// The last standing commit, as far as a restart needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCommit {
    /// The step.
    pub step: u64,
    /// The generation that trained it.
    pub generation: u64,
    /// Its world size.
    pub world_size: usize,
    /// The ranks' (equal) parameter checksum, if any rank reported one.
    pub checksum: Option<u64>,
}

/// The job state a ledger describes (see [`read`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerState {
    /// The header; `None` for a ledger written before headers existed.
    pub header: Option<Header>,
    /// Committed steps after applying rollbacks.
    pub committed: u64,
    /// The last standing commit.
    pub last_commit: Option<LastCommit>,
    /// The highest generation any record names.
    pub highest_generation: u64,
    /// Checkpoints recorded (steps held -> directory), without those a later
    /// rollback voided.
    pub checkpoints: BTreeMap<u64, PathBuf>,
    /// The last `end` record, unless records (a resumed run) follow it.
    pub end: Option<EndRecord>,
    /// The last `end` record, even if the job was resumed after it.
    pub last_end: Option<EndRecord>,
    /// `start` records: the next coordinator's incarnation number.
    pub starts: u64,
    /// Length of the file up to the end of its last complete line.
    pub valid_len: u64,
    /// Bytes of a torn last line (a crash mid-append), 0 if none.
    pub torn_bytes: u64,
}

/// Reads the ledger at `path` and rebuilds the job state; `Ok(None)` when the file
/// does not exist or is empty.
pub fn read(path: &Path) -> Result<Option<LedgerState>, CoordinatorError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CoordinatorError::Ledger {
                path: path.to_owned(),
                source,
            });
        }
    };
    parse(&bytes).map_err(|message| CoordinatorError::LedgerCorrupt {
        path: path.to_owned(),
        message,
    })
}

/// [`read`] on the file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Option<LedgerState>, String> {
    let valid_len = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |end| end + 1);
    let torn = &bytes[valid_len..];
    // A last line without its newline is a torn append unless it parses whole
    // (a crash between the line and its newline cannot happen: both are one write).
    let torn_bytes = if torn.iter().all(u8::is_ascii_whitespace) {
        0
    } else {
        torn.len() as u64
    };
    let text = std::str::from_utf8(&bytes[..valid_len])
        .map_err(|_| "the ledger is not UTF-8 text".to_owned())?;
    let mut state = LedgerState {
        header: None,
        committed: 0,
        last_commit: None,
        highest_generation: 0,
        checkpoints: BTreeMap::new(),
        end: None,
        last_end: None,
        starts: 0,
        valid_len: valid_len as u64,
        torn_bytes,
    };
    // Commits standing, by step (for the last commit after a rollback).
    let mut commits: BTreeMap<u64, LastCommit> = BTreeMap::new();
    let mut lines = 0;
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let value: Value = serde_json::from_str(line)
            .map_err(|e| format!("line {} is not JSON ({e}): {line}", number + 1))?;
        let at = |what: &str| format!("line {}: {what}", number + 1);
        let kind = value.get("kind").and_then(Value::as_str);
        // Lines without `kind` come from ledgers written before the header existed.
        let kind = kind.unwrap_or(if value.get("rollback_to").is_some() {
            "rollback"
        } else {
            "commit"
        });
        if kind != "header" && state.header.is_none() && lines == 1 && value.get("kind").is_some() {
            return Err(at("the first record is not a header"));
        }
        if kind != "end" {
            state.end = None;
        }
        match kind {
            "header" => {
                if lines != 1 {
                    return Err(at("a header after the first record"));
                }
                let header: Header = serde_json::from_value(value)
                    .map_err(|e| at(&format!("unreadable header ({e})")))?;
                state.header = Some(header);
            }
            "start" => state.starts += 1,
            "commit" => {
                let step = value["step"]
                    .as_u64()
                    .ok_or_else(|| at("a commit without `step`"))?;
                let generation = value["generation"].as_u64().unwrap_or(0);
                let ranks = value["ranks"]
                    .as_array()
                    .ok_or_else(|| at("a commit without `ranks`"))?;
                let checksum = ranks.iter().find_map(|r| r["checksum"].as_u64());
                if step != state.committed {
                    return Err(at(&format!(
                        "step {step} committed where step {} was due",
                        state.committed
                    )));
                }
                state.highest_generation = state.highest_generation.max(generation);
                commits.insert(
                    step,
                    LastCommit {
                        step,
                        generation,
                        world_size: ranks.len(),
                        checksum,
                    },
                );
                state.committed = step + 1;
            }
            "rollback" => {
                let to = value["rollback_to"]
                    .as_u64()
                    .ok_or_else(|| at("a rollback without `rollback_to`"))?;
                if to > state.committed {
                    return Err(at(&format!(
                        "rollback to step {to}, beyond the {} committed steps",
                        state.committed
                    )));
                }
                commits.retain(|&step, _| step < to);
                state.checkpoints.retain(|&step, _| step <= to);
                state.committed = to;
            }
            "checkpoint" => {
                let step = value["step"]
                    .as_u64()
                    .ok_or_else(|| at("a checkpoint without `step`"))?;
                let dir = value["dir"]
                    .as_str()
                    .ok_or_else(|| at("a checkpoint without `dir`"))?;
                state.checkpoints.insert(step, PathBuf::from(dir));
            }
            "end" => {
                let end: EndRecord = serde_json::from_value(value)
                    .map_err(|e| at(&format!("unreadable end record ({e})")))?;
                state.end = Some(end.clone());
                state.last_end = Some(end);
            }
            other => return Err(at(&format!("unknown record kind `{other}`"))),
        }
    }
    if lines == 0 {
        // Nothing complete (a crash while writing the header): no job yet; the
        // writer cuts the torn bytes.
        return Ok(None);
    }
    state.last_commit = commits.into_values().next_back();
    Ok(Some(state))
}

/// The `start` record of a coordinator (re)start.
pub fn start_record(committed: u64, checkpoint: Option<&Path>, incarnation: u64) -> Value {
    serde_json::json!({
        "kind": "start",
        "committed": committed,
        "checkpoint": checkpoint,
        "incarnation": incarnation,
        "unix": unix_now(),
    })
}

/// The `header` record.
pub fn header_record(header: &Header) -> Value {
    let mut value = serde_json::to_value(header).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("kind".into(), "header".into());
    }
    value
}

/// The `end` record.
pub fn end_record(end: &EndRecord) -> Value {
    let mut value = serde_json::to_value(end).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("kind".into(), "end".into());
    }
    value
}

/// The `rollback` record.
pub fn rollback_record(to_step: u64, checkpoint: Option<&Path>) -> Value {
    serde_json::json!({"kind": "rollback", "rollback_to": to_step, "checkpoint": checkpoint})
}

/// The `checkpoint` record.
pub fn checkpoint_record(step: u64, dir: &Path) -> Value {
    serde_json::json!({"kind": "checkpoint", "step": step, "dir": dir})
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Work for the writer thread besides appending lines.
pub type Chore = Box<dyn FnOnce() + Send>;

enum Message {
    Line(String),
    Chore(Chore),
}

/// Appends records to the ledger file from a dedicated thread.
pub struct LedgerWriter {
    path: PathBuf,
    sender: Option<mpsc::Sender<Message>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl std::fmt::Debug for LedgerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl LedgerWriter {
    /// Opens (creates, appends to) `<dir>/ledger.jsonl`. `keep_len`: the length of
    /// the complete lines [`read`] found; a torn last line beyond it is cut off
    /// first, so the next record starts on a line of its own.
    pub fn open(dir: &Path, keep_len: Option<u64>) -> Result<Self, CoordinatorError> {
        let path = dir.join(LEDGER_FILE);
        let io = |source| CoordinatorError::Ledger {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let existing = match OpenOptions::new().write(true).open(&path) {
            Ok(file) => Some(file),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => return Err(io(err)),
        };
        if let (Some(keep), Some(file)) = (keep_len, existing) {
            let len = file.metadata().map_err(io)?.len();
            if len > keep {
                tracing::warn!(
                    ledger = %path.display(),
                    bytes = len - keep,
                    "the ledger's last line is torn (a crash mid-append): cutting it off"
                );
                file.set_len(keep).map_err(io)?;
                file.sync_all().map_err(io)?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let (sender, receiver) = mpsc::channel::<Message>();
        let thread = std::thread::Builder::new()
            .name("hsat-ledger".into())
            .spawn(move || write_loop(file, &receiver))
            .map_err(io)?;
        Ok(Self {
            path,
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record (a JSON value, written as one line).
    pub fn append(&self, record: &Value) {
        self.send(Message::Line(record.to_string()));
    }

    /// Runs `chore` on the writer thread after the records queued before it are
    /// written (slow file-system work off the async runtime: checkpoint retention).
    pub fn after_writes(&self, chore: Chore) {
        self.send(Message::Chore(chore));
    }

    fn send(&self, message: Message) {
        if let Some(sender) = &self.sender {
            // A send fails only once the writer thread stopped on an error, which
            // `close` reports.
            let _ = sender.send(message);
        }
    }

    /// Writes everything queued and reports a write error, if any.
    pub fn close(mut self) -> Result<(), CoordinatorError> {
        self.sender.take();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(message))) => Err(CoordinatorError::LedgerWrite {
                path: self.path.clone(),
                message,
            }),
            Some(Err(_)) => Err(CoordinatorError::LedgerWrite {
                path: self.path.clone(),
                message: "the ledger writer panicked".to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// A writer dropped without [`LedgerWriter::close`] (its job's tasks were dropped)
/// still writes what was queued before it goes: no record the job handed out is
/// left to a detached thread that could append after a successor opened the file.
impl Drop for LedgerWriter {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take()
            && let Ok(Err(message)) = thread.join()
        {
            tracing::error!(ledger = %self.path.display(), "ledger write failed: {message}");
        }
    }
}

fn write_loop(mut file: File, receiver: &mpsc::Receiver<Message>) -> Result<(), String> {
    let mut pending: Option<Message> = None;
    loop {
        let first = match pending.take() {
            Some(message) => message,
            None => match receiver.recv() {
                Ok(message) => message,
                Err(_) => return Ok(()),
            },
        };
        match first {
            Message::Chore(chore) => chore(),
            Message::Line(line) => {
                // Batch the lines queued behind it into one write + fsync.
                let mut batch = line;
                batch.push('\n');
                while let Ok(more) = receiver.try_recv() {
                    match more {
                        Message::Line(more) => {
                            batch.push_str(&more);
                            batch.push('\n');
                        }
                        chore @ Message::Chore(_) => {
                            pending = Some(chore);
                            break;
                        }
                    }
                }
                file.write_all(batch.as_bytes())
                    .and_then(|()| file.sync_data())
                    .map_err(|err| err.to_string())?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> String {
        let header = Header {
            job_id: "j1".into(),
            config: serde_json::json!({"training": {"batch_size": 2}}),
            config_fingerprint: "cf".into(),
            dataset_fingerprint: "df".into(),
            total_steps: 6,
            hsat_version: "0".into(),
            created_unix: 1,
        };
        format!("{}\n", header_record(&header))
    }

    fn commit(step: u64, generation: u64, checksum: u64, world: usize) -> String {
        let ranks: Vec<Value> = (0..world)
            .map(|rank| serde_json::json!({"rank": rank, "patients": [], "checksum": checksum}))
            .collect();
        format!(
            "{}\n",
            serde_json::json!({"kind": "commit", "step": step, "epoch": 0, "generation": generation, "ranks": ranks})
        )
    }

    fn state(text: &str) -> LedgerState {
        parse(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn the_state_follows_commits_rollbacks_checkpoints_and_ends() {
        let mut text = header();
        text.push_str(&format!("{}\n", start_record(0, None, 0)));
        for step in 0..4 {
            text.push_str(&commit(step, 1, 100 + step, 2));
        }
        text.push_str(&format!(
            "{}\n",
            checkpoint_record(2, Path::new("/c/step-2"))
        ));
        text.push_str(&format!(
            "{}\n",
            checkpoint_record(4, Path::new("/c/step-4"))
        ));
        text.push_str(&format!(
            "{}\n",
            rollback_record(2, Some(Path::new("/c/step-2")))
        ));
        text.push_str(&commit(2, 3, 7, 1));
        let s = state(&text);
        assert_eq!(s.header.as_ref().unwrap().job_id, "j1");
        assert_eq!(s.committed, 3);
        assert_eq!(
            s.last_commit,
            Some(LastCommit {
                step: 2,
                generation: 3,
                world_size: 1,
                checksum: Some(7)
            })
        );
        assert_eq!(s.highest_generation, 3);
        assert_eq!(
            s.checkpoints.into_iter().collect::<Vec<_>>(),
            [(2, PathBuf::from("/c/step-2"))],
            "the rollback voided the later checkpoint"
        );
        assert_eq!(s.starts, 1);
        assert_eq!(s.end, None);
        assert_eq!(s.torn_bytes, 0);
        assert_eq!(s.valid_len, text.len() as u64);

        // An end record counts only while it is the last word.
        let end = EndRecord {
            outcome: EndOutcome::Cancelled,
            reason: "signal".into(),
            committed: 3,
        };
        text.push_str(&format!("{}\n", end_record(&end)));
        assert_eq!(state(&text).end, Some(end.clone()));
        text.push_str(&format!("{}\n", start_record(3, None, 1)));
        let resumed = state(&text);
        assert_eq!(resumed.end, None);
        assert_eq!(resumed.last_end, Some(end));
        assert_eq!(resumed.starts, 2);
    }

    #[test]
    fn a_torn_last_line_is_reported_and_left_out_and_the_writer_cuts_it() {
        let mut text = header();
        text.push_str(&commit(0, 1, 5, 2));
        let complete = text.len() as u64;
        let torn = "{\"kind\":\"commit\",\"step\":1,\"ep";
        text.push_str(torn);
        let s = state(&text);
        assert_eq!((s.committed, s.valid_len), (1, complete));
        assert_eq!(s.torn_bytes, torn.len() as u64);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEDGER_FILE), &text).unwrap();
        let writer = LedgerWriter::open(dir.path(), Some(s.valid_len)).unwrap();
        writer.append(&serde_json::json!({"kind": "start", "committed": 1}));
        writer.close().unwrap();
        let after = read(&dir.path().join(LEDGER_FILE)).unwrap().unwrap();
        assert_eq!((after.committed, after.starts, after.torn_bytes), (1, 1, 0));
    }

    #[test]
    fn corruption_before_the_last_line_is_an_error_naming_the_line() {
        let mut text = header();
        text.push_str("{\"kind\":\"comm\n");
        text.push_str(&commit(0, 1, 5, 2));
        let err = parse(text.as_bytes()).unwrap_err();
        assert!(err.starts_with("line 2 is not JSON"), "{err}");

        let twice = [header(), commit(0, 1, 5, 2), commit(0, 1, 5, 2)].concat();
        let err = parse(twice.as_bytes()).unwrap_err();
        assert_eq!(err, "line 3: step 0 committed where step 1 was due");

        let headless = commit(0, 1, 5, 2).replace("\"kind\":\"commit\",", "");
        let legacy = parse(headless.as_bytes()).unwrap().unwrap();
        assert_eq!((legacy.header, legacy.committed), (None, 1));
    }

    #[test]
    fn an_empty_or_missing_ledger_is_no_job() {
        assert_eq!(parse(b"").unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join(LEDGER_FILE)).unwrap().is_none());
    }
}
