//! Progress bars on stderr for the library's long operations.

use indicatif::{ProgressBar, ProgressStyle};
use llnode_models::progress::Progress;

pub struct Bar(ProgressBar);

impl Bar {
    pub fn new() -> Bar {
        let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        // Redrawn while a phase waits on one long step (a big segment loading).
        bar.enable_steady_tick(std::time::Duration::from_millis(250));
        Bar(bar)
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str, total: u64) {
        let style = if total > 0 {
            ProgressStyle::with_template("{msg:>20} [{bar:30}] {bytes}/{total_bytes} ({elapsed}, {eta} left)")
        } else {
            ProgressStyle::with_template("{msg:>20} {spinner}")
        };
        self.0.set_style(style.expect("valid template").progress_chars("=> "));
        self.0.set_message(name.to_string());
        self.0.set_length(total);
        self.0.set_position(0);
    }

    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
