//! Load-time errors. Every variant names the file (and for Rego, `file:line:col`) so
//! `portcullis check` can print one precise line; evaluation never returns an error
//! (it denies instead, see `Decision`).

use std::path::PathBuf;

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: unsupported policy file (expected .rego, .json, .yaml or .yml)", path.display())]
    UnsupportedFile { path: PathBuf },
    #[error("no .rego files found in {}", display_paths(paths))]
    NoPolicies { paths: Vec<PathBuf> },
    /// A Rego syntax or compile error with its position.
    #[error("{file}:{line}:{col}: {message}{excerpt}")]
    Compile {
        file: String,
        line: u32,
        col: u32,
        message: String,
        /// Source lines with a caret, each line prefixed by a newline (may be empty).
        excerpt: String,
    },
    /// A Rego error regorus reported without a position.
    #[error("rego: {0}")]
    Rego(String),
    #[error("{}: invalid data document: {message}", path.display())]
    Data { path: PathBuf, message: String },
    #[error("data conflict at {key}: set by both {} and {}", first.display(), second.display())]
    DataConflict {
        key: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("entrypoint {entrypoint}: {message}")]
    Entrypoint { entrypoint: String, message: String },
    /// The policy's own `test_` rules fail: such a policy is never served.
    #[error("the policy's own tests fail:\n{report}")]
    TestsFail { report: String },
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl PolicyError {
    /// Turns a regorus error (`\n--> file:line:col\n  |\n5 | src\n  | ^\nerror: msg`)
    /// into [`PolicyError::Compile`] with a one-line `file:line:col: msg` head.
    pub(crate) fn from_rego(err: &dyn std::fmt::Display) -> PolicyError {
        let text = err.to_string();
        let mut location = None;
        let mut message = Vec::new();
        let mut excerpt = String::new();
        for line in text.lines() {
            if let Some(loc) = line.strip_prefix("--> ") {
                location = parse_location(loc);
            } else if let Some(msg) = line.strip_prefix("error: ") {
                message.push(msg.trim().to_owned());
            } else if !message.is_empty() {
                // Continuation of a multi-line message.
                message.push(line.trim().to_owned());
            } else if location.is_some() && !line.trim().is_empty() {
                excerpt.push('\n');
                excerpt.push_str(line);
            }
        }
        match location {
            Some((file, line, col)) if !message.is_empty() => PolicyError::Compile {
                file,
                line,
                col,
                message: message.join(" ").trim().to_owned(),
                excerpt,
            },
            _ => PolicyError::Rego(text.trim().to_owned()),
        }
    }
}

fn parse_location(loc: &str) -> Option<(String, u32, u32)> {
    let mut parts = loc.trim().rsplitn(3, ':');
    let col = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    let file = parts.next()?.to_owned();
    Some((file, line, col))
}
