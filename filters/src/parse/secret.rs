//! Secret values and placeholders. A [`SecretValue`] is zeroized on drop and has no `Debug` or
//! `Display` of its content, so it cannot reach a log line, a span or a panic message by
//! accident. A [`Placeholder`] is what agents hold instead (`pcx_<name>`): harmless on its own.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A real credential. Read it only with [`SecretValue::expose`], at the point of use.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: String) -> SecretValue {
        SecretValue(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([REDACTED])")
    }
}

/// The prefix every placeholder starts with; any `pcx_` token is treated as one.
pub const PLACEHOLDER_PREFIX: &str = "pcx_";

/// `pcx_` followed by ASCII letters, digits or `_`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placeholder(String);

impl Placeholder {
    pub fn parse(s: &str) -> Option<Placeholder> {
        let rest = s.strip_prefix(PLACEHOLDER_PREFIX)?;
        (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .then(|| Placeholder(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every placeholder token in `text` (maximal runs of `pcx_[A-Za-z0-9_]+` not preceded by a
/// token character). Bytes: a placeholder in a value that is not UTF-8 counts too.
pub fn find_placeholders(text: impl AsRef<[u8]>) -> Vec<Placeholder> {
    let bytes = text.as_ref();
    let prefix = PLACEHOLDER_PREFIX.as_bytes();
    let is_tok = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(prefix.len()).position(|w| w == prefix) {
        let start = i + pos;
        let glued = start > 0 && is_tok(&bytes[start - 1]);
        let end = start
            + prefix.len()
            + bytes[start + prefix.len()..]
                .iter()
                .take_while(|b| is_tok(b))
                .count();
        if !glued {
            // ASCII by construction.
            if let Some(p) = std::str::from_utf8(&bytes[start..end])
                .ok()
                .and_then(Placeholder::parse)
            {
                out.push(p);
            }
        }
        i = end.max(start + 1);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = SecretValue::new("sk-very-secret".into());
        assert_eq!(format!("{s:?}"), "SecretValue([REDACTED])");
        assert_eq!(s.expose(), "sk-very-secret");
    }

    #[test]
    fn placeholders_are_found_as_whole_tokens() {
        let found = find_placeholders("Bearer pcx_github, x=pcx_a1&y=notpcx_b pcx_ pcx_c-d");
        let names: Vec<&str> = found.iter().map(|p| p.as_str()).collect();
        assert_eq!(names, ["pcx_github", "pcx_a1", "pcx_c"]);
        assert!(find_placeholders("no tokens here").is_empty());
        assert!(Placeholder::parse("pcx_").is_none());
        assert!(Placeholder::parse("pcx_a b").is_none());
    }
}
