//! The durable audit of a job: `<out_dir>/coordinator/ledger.jsonl`, one JSON object
//! per committed step (and per rollback), appended and fsynced in commit order by a
//! writer thread, so RPC handlers never wait for the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::CoordinatorError;

/// Appends records to the ledger file from a dedicated thread.
#[derive(Debug)]
pub struct LedgerWriter {
    path: PathBuf,
    sender: Option<mpsc::Sender<String>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl LedgerWriter {
    /// Opens (creates, appends to) `<dir>/ledger.jsonl`.
    pub fn open(dir: &Path) -> Result<Self, CoordinatorError> {
        let io = |source| CoordinatorError::Ledger {
            path: dir.join("ledger.jsonl"),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("ledger.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let (sender, receiver) = mpsc::channel::<String>();
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
    pub fn append(&self, record: &serde_json::Value) {
        if let Some(sender) = &self.sender {
            // A send fails only once the writer thread stopped on an error, which
            // `close` reports.
            let _ = sender.send(record.to_string());
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

fn write_loop(mut file: File, receiver: &mpsc::Receiver<String>) -> Result<(), String> {
    while let Ok(first) = receiver.recv() {
        // Batch what is queued into one write + fsync.
        let mut batch = first;
        batch.push('\n');
        while let Ok(more) = receiver.try_recv() {
            batch.push_str(&more);
            batch.push('\n');
        }
        file.write_all(batch.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|err| err.to_string())?;
    }
    Ok(())
}
