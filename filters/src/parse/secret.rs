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
/// token character).
pub fn find_placeholders(text: &str) -> Vec<Placeholder> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find(PLACEHOLDER_PREFIX) {
        let start = i + pos;
        let glued = start > 0 && {
            let b = bytes[start - 1];
            b.is_ascii_alphanumeric() || b == b'_'
        };
        let end = start
            + PLACEHOLDER_PREFIX.len()
            + bytes[start + PLACEHOLDER_PREFIX.len()..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                .count();
        if !glued {
            if let Some(p) = Placeholder::parse(&text[start..end]) {
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
