//! Progress bars of training loops.

use indicatif::{ProgressBar, ProgressStyle};

/// A training progress bar (steps, the loss as its message, elapsed and ETA); hidden unless
/// `progress`.
pub fn step_bar(total_steps: usize, prefix: &str, progress: bool) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}
