//! Progress bars of long work that counts items (samples cached, images asked about): rate
//! and ETA, resumed runs starting at what they kept.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` `unit`s with `done` of them finished earlier; hidden unless `show`.
pub fn count_bar(show: bool, prefix: &str, unit: &str, total: usize, done: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar.set_position(done as u64);
    // The rate is this run's, not the resumed part's.
    bar.reset_eta();
    bar
}
