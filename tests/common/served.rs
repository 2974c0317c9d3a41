//! A running `mmkd serve` for the tests of the black-box path.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// A running `mmkd serve`, killed when dropped.
pub struct Served {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Served {
    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `model` (named `teacher`) on a free loopback port.
pub fn serve(model: &str) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .args(["serve", model, "--port", "0", "--name", "teacher"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.strip_suffix("/v1"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Served { child, addr }
}
