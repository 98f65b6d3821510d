//! The progress of long stages on stderr (printing is the CLI's job; the libraries
//! report `(done, total)` through callbacks).
//!
//! On a terminal it is one line redrawn in place (carriage return) at most every
//! 200 ms. Anywhere else (a file, a pipe, a container log) a redrawn line would
//! pile up as `\r` noise, so it prints plain lines instead: one every 10 % of the
//! work or every 5 s, whichever comes first, and the last one.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the terminal line is redrawn.
const REDRAW: Duration = Duration::from_millis(200);
/// Plain mode: a line at least this often while work is done...
const LINE_EVERY: Duration = Duration::from_secs(5);
/// ... and whenever this fraction of the work more is done.
const LINE_FRACTION: f64 = 0.1;

/// A progress display on stderr for one stage.
pub struct Progress {
    what: &'static str,
    started: Instant,
    last_draw: Option<Instant>,
    /// `done` at the last plain line.
    last_done: usize,
    drawn: bool,
    redraw_in_place: bool,
}

impl Progress {
    /// Starts a progress display for `what`: in place on a terminal, plain lines
    /// otherwise.
    pub fn new(what: &'static str) -> Self {
        Self::with_mode(what, std::io::stderr().is_terminal())
    }

    fn with_mode(what: &'static str, redraw_in_place: bool) -> Self {
        Progress {
            what,
            started: Instant::now(),
            last_draw: None,
            last_done: 0,
            drawn: false,
            redraw_in_place,
        }
    }

    /// Reports `done` of `total`.
    pub fn update(&mut self, done: usize, total: usize) {
        let now = Instant::now();
        if let Some(text) = self.text_at(now, done, total) {
            if self.redraw_in_place {
                eprint!("\r{text}   ");
            } else {
                eprintln!("{text}");
            }
            let _ = std::io::stderr().flush();
        }
    }

    /// The text to show now, if it is time to show one (and records that it was).
    fn text_at(&mut self, now: Instant, done: usize, total: usize) -> Option<String> {
        let due = match self.last_draw {
            None => true,
            Some(_) if done >= total => done != self.last_done || !self.drawn,
            Some(last) if self.redraw_in_place => now - last >= REDRAW,
            Some(last) => {
                let step = (total as f64 * LINE_FRACTION).ceil().max(1.0) as usize;
                now - last >= LINE_EVERY || done >= self.last_done + step
            }
        };
        if !due {
            return None;
        }
        self.last_draw = Some(now);
        self.last_done = done;
        self.drawn = true;
        let elapsed = (now - self.started).as_secs_f64();
        let rate = done as f64 / elapsed.max(1e-9);
        Some(if done == 0 {
            format!("{}: 0/{total}", self.what)
        } else {
            let eta = total.saturating_sub(done) as f64 / rate;
            format!(
                "{}: {done}/{total} ({rate:.0}/s, eta {eta:.0} s)",
                self.what
            )
        })
    }

    /// Ends the display (the in-place line gets its newline).
    pub fn finish(&mut self) {
        if self.drawn && self.redraw_in_place {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `done` values a plain display prints a line for, 100 updates 1 ms apart.
    fn plain_lines(total: usize) -> Vec<usize> {
        let mut progress = Progress::with_mode("work", false);
        let start = progress.started;
        (0..=total)
            .filter(|&done| {
                let now = start + Duration::from_millis(done as u64);
                progress.text_at(now, done, total).is_some()
            })
            .collect()
    }

    #[test]
    fn plain_mode_prints_every_tenth_and_the_end() {
        assert_eq!(
            plain_lines(100),
            vec![0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
        );
        // Fewer items than lines: one line each, never the same one twice.
        assert_eq!(plain_lines(3), vec![0, 1, 2, 3]);
    }

    #[test]
    fn plain_mode_prints_at_least_every_five_seconds() {
        let mut progress = Progress::with_mode("work", false);
        let start = progress.started;
        assert!(progress.text_at(start, 0, 1000).is_some());
        assert!(
            progress
                .text_at(start + Duration::from_secs(1), 1, 1000)
                .is_none()
        );
        let text = progress.text_at(start + Duration::from_secs(6), 2, 1000);
        assert_eq!(
            text.as_deref().map(|t| t.starts_with("work: 2/1000")),
            Some(true)
        );
    }

    #[test]
    fn terminal_mode_redraws_at_most_every_200_ms_and_always_the_end() {
        let mut progress = Progress::with_mode("work", true);
        let start = progress.started;
        assert!(progress.text_at(start, 0, 10).is_some());
        assert!(
            progress
                .text_at(start + Duration::from_millis(50), 5, 10)
                .is_none()
        );
        assert!(
            progress
                .text_at(start + Duration::from_millis(60), 10, 10)
                .is_some()
        );
    }
}
