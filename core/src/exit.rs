//! Exit codes of `hsat coordinator`, `hsat worker`, `hsat run` and
//! `hsat-coordinator`: one table, so that a controller's failure policy (Kubernetes
//! `podFailurePolicy`, a systemd unit, a shell loop) can tell a finished job from one
//! worth restarting and from one that no restart can fix.
//!
//! | code | [`Exit`] | meaning | Kubernetes |
//! |---|---|---|---|
//! | 0 | [`Exit::Success`] | the job finished (a worker: the coordinator said so) | Complete |
//! | 1 | [`Exit::Failed`] | the job failed for good (diverged, checksums disagree, the coordinator ended it as failed) | FailJob |
//! | 2 | [`Exit::Usage`] | the command line is wrong (clap) | FailJob |
//! | 75 | [`Exit::Retryable`] | try again: coordinator unreachable after retries, a collective failed, drained on SIGTERM before the job finished, I/O errors, another coordinator holds the job's lock | counts against `backoffLimit` |
//! | 78 | [`Exit::Refused`] | permanent refusal: invalid config or flags, config differs from the job's ledger, registration refused (config, dataset, version), authentication refused or no token | FailJob |
//!
//! A process that is killed (SIGKILL: 137, OOM) is not in the table: it is
//! retryable for a controller. The mapping from each layer's errors lives beside
//! the error types ([`ExitClass`] implementations); this module only holds the
//! table, so every binary prints the same words ([`EXIT_CODES_HELP`]).

/// How a process ends, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    /// 0: the job finished.
    Success,
    /// 1: the job failed permanently.
    Failed,
    /// 2: a usage error (clap's own code for a bad command line).
    Usage,
    /// 75 (`EX_TEMPFAIL`): a retryable failure; starting the process again may work.
    Retryable,
    /// 78 (`EX_CONFIG`): a permanent refusal of the config, the flags or the
    /// credentials; fix them before starting again.
    Refused,
}

impl Exit {
    /// Every code, in the order of the table.
    pub const ALL: [Exit; 5] = [
        Exit::Success,
        Exit::Failed,
        Exit::Usage,
        Exit::Retryable,
        Exit::Refused,
    ];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Retryable => 75,
            Exit::Refused => 78,
        }
    }

    /// The variant of an exit status, `None` for a status outside the table.
    pub fn from_code(code: i32) -> Option<Exit> {
        Exit::ALL
            .into_iter()
            .find(|exit| i32::from(exit.code()) == code)
    }

    /// Whether a controller should start the process again (the job is not over
    /// and nothing says a restart cannot help).
    pub const fn is_retryable(self) -> bool {
        matches!(self, Exit::Retryable)
    }

    /// One lowercase word for logs: `success`, `failed`, `usage`, `retryable`,
    /// `refused`.
    pub const fn name(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Retryable => "retryable",
            Exit::Refused => "refused",
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

/// The table as `--help` shows it (after_help of `hsat coordinator`, `hsat worker`,
/// `hsat run` and `hsat-coordinator`).
pub const EXIT_CODES_HELP: &str = "\
Exit status:
   0  the job finished (a worker: only when the coordinator says the job finished)
   1  the job failed for good (diverged, checksums disagree, the coordinator ended it as failed)
   2  usage error (bad command line)
  75  retryable (EX_TEMPFAIL): coordinator unreachable after retries, a collective failed,
      stopped by SIGTERM before the job finished, I/O errors, another coordinator holds
      the job's lock (<out_dir>/coordinator/lock) past cluster.lock_wait_s
  78  permanent refusal (EX_CONFIG): invalid config or flags, config differs from the
      job's ledger, registration refused (config, dataset or version mismatch),
      authentication refused, no job token";

/// An error (or outcome) that knows which exit status it ends a process with.
pub trait ExitClass {
    /// The exit status.
    fn exit(&self) -> Exit;
}

/// An invalid config is a permanent refusal: the same file fails the same way.
impl ExitClass for crate::config::ConfigError {
    fn exit(&self) -> Exit {
        Exit::Refused
    }
}

/// A dataset that cannot be indexed (a wrong path, bad metadata) is refused; the
/// operator fixes the config or the volume.
impl ExitClass for crate::dataset::DatasetError {
    fn exit(&self) -> Exit {
        Exit::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_ones_and_round_trip() {
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, [0, 1, 2, 75, 78]);
        for exit in Exit::ALL {
            assert_eq!(Exit::from_code(i32::from(exit.code())), Some(exit));
        }
        assert_eq!(Exit::from_code(137), None);
        assert!(Exit::Retryable.is_retryable());
        assert!(!Exit::Refused.is_retryable() && !Exit::Failed.is_retryable());
    }

    #[test]
    fn the_help_text_lists_every_code_once() {
        for exit in Exit::ALL {
            let lines = EXIT_CODES_HELP
                .lines()
                .filter(|line| {
                    line.split_whitespace().next() == Some(exit.code().to_string().as_str())
                })
                .count();
            assert_eq!(lines, 1, "{exit} in:\n{EXIT_CODES_HELP}");
        }
    }

    #[test]
    fn the_module_table_names_every_code() {
        let docs = include_str!("exit.rs");
        for exit in Exit::ALL {
            assert!(
                docs.contains(&format!("//! | {} | [`Exit::", exit.code())),
                "the module table misses {exit}"
            );
        }
    }
}
