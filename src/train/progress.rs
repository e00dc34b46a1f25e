//! What a user sees during long work: a step bar whose spinner and clock keep ticking while a
//! step runs, one line per phase of work around the steps (sampling, judging, teacher caching,
//! reference precomputation, evaluation), left on screen with the time it took, and each
//! evaluation's metrics printed when they are computed, as TRL's log lines are.

use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often spinners and clocks redraw on their own.
const TICK: Duration = Duration::from_millis(120);

/// A run's progress display; everything is silent when quiet.
pub struct Progress {
    multi: MultiProgress,
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// A display on stderr, or a silent one.
    pub fn new(quiet: bool) -> Self {
        let multi =
            if quiet { MultiProgress::with_draw_target(ProgressDrawTarget::hidden()) } else { MultiProgress::new() };
        Self { multi, bar: None, quiet }
    }

    /// Show the step bar (or resize it) at `position` of `total` steps.
    pub fn steps(&mut self, position: u64, total: u64) {
        if self.quiet {
            return;
        }
        let multi = &self.multi;
        let bar = self.bar.get_or_insert_with(|| {
            let bar = multi.add(
                ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{spinner} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
                    )
                    .expect("valid template"),
                ),
            );
            bar.enable_steady_tick(TICK);
            bar
        });
        bar.set_length(total);
        bar.set_position(position);
    }

    /// Move the step bar to `position` with a message (the step's loss and speed).
    pub fn step_done(&self, position: u64, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(message);
        }
    }

    /// Start a phase of work: a ticking line above the step bar until [`Phase::done`].
    pub fn phase(&self, what: impl Into<String>) -> Phase {
        let what = what.into();
        let line = if self.quiet {
            ProgressBar::hidden()
        } else {
            let spinner = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]").expect("valid template"),
            );
            let spinner = match &self.bar {
                Some(bar) => self.multi.insert_before(bar, spinner),
                None => self.multi.add(spinner),
            };
            spinner.set_message(what.clone());
            spinner.enable_steady_tick(TICK);
            spinner
        };
        Phase { line, what, started: Instant::now() }
    }

    /// Print a line above the bars (on stderr; also when stderr is no terminal).
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    /// Stop the step bar where it stands.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// A running phase of work (see [`Progress::phase`]); dropped unfinished (on an error), its
/// line is cleared.
pub struct Phase {
    line: ProgressBar,
    what: String,
    started: Instant,
}

impl Phase {
    /// Mark the phase finished, leaving its line with the time it took.
    pub fn done(self) {
        self.line.finish_with_message(format!("{} (done in {:.1}s)", self.what, self.started.elapsed().as_secs_f64()));
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if !self.line.is_finished() {
            self.line.finish_and_clear();
        }
    }
}

/// Phases run one after another: starting the next marks the previous one done.
pub struct Phases<'a> {
    progress: &'a Progress,
    current: Option<Phase>,
}

impl<'a> Phases<'a> {
    /// No phase yet.
    pub fn new(progress: &'a Progress) -> Self {
        Self { progress, current: None }
    }

    /// Finish the running phase, if any, and start `what`.
    pub fn next(&mut self, what: impl Into<String>) {
        if let Some(phase) = self.current.take() {
            phase.done();
        }
        self.current = Some(self.progress.phase(what));
    }

    /// Finish the running phase.
    pub fn done(mut self) {
        if let Some(phase) = self.current.take() {
            phase.done();
        }
    }
}

/// An evaluation's metrics as one line: `step N eval: eval_loss 0.6931 | eval_x 0.5 | ...`.
pub fn eval_line(step: u64, fields: &serde_json::Map<String, serde_json::Value>) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| match v.as_f64() {
            Some(x) => format!("{k} {x:.4}"),
            None => format!("{k} {v}"),
        })
        .collect();
    format!("step {step} eval: {}", parts.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_lines_name_every_metric_with_four_decimals() {
        let fields =
            serde_json::json!({"eval_loss": 0.612_345_6, "eval_rewards/accuracies": 0.75}).as_object().unwrap().clone();
        assert_eq!(eval_line(3, &fields), "step 3 eval: eval_loss 0.6123 | eval_rewards/accuracies 0.7500");
    }

    #[test]
    fn a_quiet_display_runs_phases_without_drawing() {
        let mut p = Progress::new(true);
        p.steps(0, 3);
        assert!(p.bar.is_none());
        p.phase("sampling").done();
        p.println("not shown");
    }
}
