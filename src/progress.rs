//! Progress on stderr for the command line's long stages (`indicatif`):
//! a spinner naming the stage once it has taken about a second, and a
//! counted bar for loops (data sets checked, benchmark runs). Only when the
//! CLI turns it on (`enable`) and stderr is a terminal: piped or captured
//! output, the library and the Python package stay quiet.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// How long a stage runs before its progress shows.
const DELAY: Duration = Duration::from_secs(1);

/// Turns progress on for this process (the CLI does, at start).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn on() -> bool {
    ENABLED.load(Ordering::Relaxed) && std::io::stderr().is_terminal()
}

/// A stage or loop in progress; its bar clears when it is dropped.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Counts one step of a counted loop.
    pub fn step(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    /// Renames what is in progress.
    pub fn say(&self, what: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(what.into());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `bar` drawn on stderr from `DELAY` on, if it is still going then;
/// redrawn on a timer with `tick` (a spinner), else at each step (a
/// counted loop: no thread wakes between a benchmark's timed runs).
fn shown_later(bar: ProgressBar, tick: bool) -> Progress {
    let later = bar.clone();
    std::thread::spawn(move || {
        std::thread::sleep(DELAY);
        if !later.is_finished() {
            later.set_draw_target(ProgressDrawTarget::stderr());
            if tick {
                later.enable_steady_tick(Duration::from_millis(120));
            }
        }
    });
    Progress { bar: Some(bar) }
}

/// A stage (`what`: "importing model.onnx"), shown as a spinner with the
/// time it has taken.
pub fn stage(what: impl Into<String>) -> Progress {
    if !on() {
        return Progress { bar: None };
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    bar.set_message(what.into());
    shown_later(bar, true)
}

/// A loop of `total` steps (`what`: "checking"), shown as a bar.
pub fn counted(what: impl Into<String>, total: u64) -> Progress {
    if !on() {
        return Progress { bar: None };
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, {eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.into());
    shown_later(bar, false)
}
