//! The progress line several commands draw on stderr while they work (printing is
//! the CLI's job; the libraries report `(done, total)` through callbacks).

use std::io::Write;
use std::time::{Duration, Instant};

/// A progress line on stderr, redrawn at most every 200 ms.
pub struct Progress {
    what: &'static str,
    started: Instant,
    last_draw: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// Starts a progress line for `what`.
    pub fn new(what: &'static str) -> Self {
        Progress {
            what,
            started: Instant::now(),
            last_draw: None,
            drawn: false,
        }
    }

    /// Reports `done` of `total`.
    pub fn update(&mut self, done: usize, total: usize) {
        let now = Instant::now();
        if self
            .last_draw
            .is_some_and(|t| now - t < Duration::from_millis(200))
            && done < total
        {
            return;
        }
        self.last_draw = Some(now);
        self.drawn = true;
        let elapsed = (now - self.started).as_secs_f64();
        let rate = done as f64 / elapsed.max(1e-9);
        if done == 0 {
            eprint!("\r{}: 0/{total}   ", self.what);
        } else {
            let eta = total.saturating_sub(done) as f64 / rate;
            eprint!(
                "\r{}: {done}/{total} ({rate:.0}/s, eta {eta:.0} s)   ",
                self.what
            );
        }
        let _ = std::io::stderr().flush();
    }

    /// Ends the line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}
