//! Finding a secret in what an upstream sends back, in every form it can take there: its raw
//! bytes; the encodings the proxy itself produced when it substituted it (the whole Basic
//! `base64(user:secret)` token); and the common reflections of it: base64 and base64url (at
//! any alignment inside a longer encoding), JSON string escapes (`\/`, `\"`, `\uXXXX` for any
//! character, in any mix), percent-encoding (any case, any mix) and `+` for a space. Pure:
//! bytes in, spans out. Used streaming (a chunk may end inside a match: the caller holds back
//! only a tail that could still become one, so an SSE event is not delayed otherwise).

use base64::Engine as _;

pub const REDACTED: &[u8] = b"[REDACTED]";

/// Shortest base64 core searched for: shorter ones would match ordinary text.
const MIN_CORE: usize = 8;

/// What to look for: per secret, its bytes (matched through escapes) and its exact encodings.
/// Zeroized when dropped, like the secrets themselves.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Needles {
    /// Secrets, matched char by char where each char may also appear escaped.
    escaped: Vec<Vec<u8>>,
    /// Exact byte strings: base64 cores and the encodings the proxy produced.
    exact: Vec<Vec<u8>>,
    /// The bytes a match can start with (an escape's first byte included): every other byte
    /// is copied without looking further.
    starts: [bool; 256],
}

impl std::fmt::Debug for Needles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Needles({} secrets, [REDACTED])", self.escaped.len())
    }
}

/// The result of matching at one position: the longest match that ends within the data
/// (0: none), and whether a longer one may still end beyond it (the data ended while some
/// form still matched).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Match {
    full: usize,
    partial: bool,
}

impl Match {
    fn or(self, other: Match) -> Match {
        Match {
            full: self.full.max(other.full),
            partial: self.partial || other.partial,
        }
    }
}

impl Needles {
    /// `secrets`: the values substituted; `produced`: encodings the proxy wrote that contain
    /// them (a Basic token), looked for in every form too, and replaced whole.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = &'a [u8]>,
        produced: impl IntoIterator<Item = &'a [u8]>,
    ) -> Needles {
        let mut n = Needles {
            escaped: Vec::new(),
            exact: Vec::new(),
            starts: [false; 256],
        };
        for s in secrets
            .into_iter()
            .chain(produced)
            .filter(|s| !s.is_empty())
        {
            n.escaped.push(s.to_vec());
            n.exact.extend(base64_cores(s));
        }
        n.exact.sort();
        n.exact.dedup();
        if !n.is_empty() {
            // A secret's character may also be written escaped (`\`, `%`) or as `+`.
            for b in [b'\\', b'%', b'+'] {
                n.starts[usize::from(b)] = true;
            }
        }
        for needle in n.escaped.iter().chain(&n.exact) {
            n.starts[usize::from(needle[0])] = true;
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        self.escaped.is_empty() && self.exact.is_empty()
    }

    /// The matches at `i` (the whole Basic token wins over a core inside it).
    fn at(&self, data: &[u8], i: usize) -> Match {
        let rest = &data[i..];
        let mut m = Match::default();
        for e in &self.exact {
            if rest.starts_with(e) {
                m.full = m.full.max(e.len());
            }
            m.partial |= rest.len() < e.len() && e.starts_with(rest);
        }
        self.escaped
            .iter()
            .fold(m, |m, s| m.or(escaped_match(s, rest)))
    }

    /// `data` with every match replaced by [`REDACTED`], and how many bytes at its end must be
    /// held back (they may be the start of a match that the next bytes complete, or complete
    /// into a longer one than the data holds now: the same spans are redacted whether the
    /// data comes whole or in pieces). With `at_end`, nothing is held back.
    pub fn redact(&self, data: &[u8], at_end: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            let Some(next) = data[i..].iter().position(|&b| self.may_start(b)) else {
                out.extend_from_slice(&data[i..]);
                break;
            };
            out.extend_from_slice(&data[i..i + next]);
            i += next;
            match self.at(data, i) {
                Match { partial: true, .. } if !at_end => {
                    let held = data.len() - i;
                    out.extend_from_slice(&data[i..]);
                    return (out, held);
                }
                Match { full: 0, .. } => {
                    out.push(data[i]);
                    i += 1;
                }
                Match { full, .. } => {
                    out.extend_from_slice(REDACTED);
                    i += full;
                }
            }
        }
        (out, 0)
    }

    /// Whether `data` holds a whole match anywhere (what is cut off at its end does not count).
    pub fn found_in(&self, data: &[u8]) -> bool {
        (0..data.len()).any(|i| self.may_start(data[i]) && self.at(data, i).full > 0)
    }

    /// The longest any match can be: each byte of a secret written as a `\uXXXX` escape.
    pub fn longest(&self) -> usize {
        let escaped = self.escaped.iter().map(|s| s.len() * 6);
        let exact = self.exact.iter().map(Vec::len);
        escaped.chain(exact).max().unwrap_or(0)
    }

    fn may_start(&self, b: u8) -> bool {
        self.starts[usize::from(b)]
    }
}

/// The parts of a secret's base64 and base64url encodings that appear whatever precedes it in
/// the encoded data (three alignments), without the partial groups at either end.
fn base64_cores(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut cores = Vec::new();
    for engine in [
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for offset in 0..3usize {
            let mut padded = vec![0u8; offset];
            padded.extend_from_slice(secret);
            let encoded = engine.encode(&padded);
            // Skip the groups that mix in the unknown prefix, and the last partial group.
            let skip = (offset * 4).div_ceil(3);
            let whole = (padded.len() / 3) * 4;
            if whole > skip && whole - skip >= MIN_CORE {
                cores.push(encoded.as_bytes()[skip..whole].to_vec());
            }
        }
    }
    cores
}

fn hex(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

/// Match `secret` at the start of `data`, each character as itself or escaped. A data `%`,
/// `\\` or `+` may be the secret's own character or an escape of it: every reading is tried
/// (a search over (secret, data) positions, each visited once).
fn escaped_match(secret: &[u8], data: &[u8]) -> Match {
    let mut m = Match::default();
    // The reading being followed, and the others still to follow (no allocation until a
    // data byte has two readings, which takes a `%` or `\\` in the secret).
    let mut current = Some((0usize, 0usize));
    let mut others: Vec<(usize, usize)> = Vec::new();
    let mut seen: std::collections::HashSet<(usize, usize)> = std::collections::HashSet::new();
    while let Some((j, p)) = current.take().or_else(|| others.pop()) {
        if j == secret.len() {
            m.full = m.full.max(p);
            continue;
        }
        let Some(&b) = data.get(p) else {
            m.partial = true;
            continue;
        };
        let want = secret[j];
        let literal = (b == want || b == b'+' && want == b' ').then_some((j + 1, p + 1));
        let escape = match b {
            b'%' => percent_escape(want, &data[p..]),
            b'\\' => json_escape(secret, j, &data[p..]),
            _ => Ok(None),
        };
        let escape = escape
            .unwrap_or_else(|Partial| {
                m.partial = true;
                None
            })
            .map(|(used, read)| (j + used, p + read));
        match (literal, escape) {
            (Some(a), Some(b)) => {
                // Two readings: follow one, keep the other; from here on, a position may be
                // reached twice, and is followed once.
                for n in [a, b] {
                    if seen.insert(n) {
                        others.push(n);
                    }
                }
            }
            (Some(n), None) | (None, Some(n)) if seen.is_empty() || seen.insert(n) => {
                current = Some(n);
            }
            _ => {}
        }
    }
    m
}

/// The data ended inside an escape.
struct Partial;

/// A percent escape at the start of `data` standing for `want`: `(1, 3)`.
fn percent_escape(want: u8, data: &[u8]) -> Result<Option<(usize, usize)>, Partial> {
    match (data.get(1), data.get(2)) {
        (Some(&h), Some(&l)) => Ok(match (hex(h), hex(l)) {
            (Some(h), Some(l)) if h * 16 + l == u32::from(want) => Some((1, 3)),
            _ => None,
        }),
        (Some(&h), None) if hex(h).is_none() => Ok(None),
        _ => Err(Partial),
    }
}

/// A JSON escape at the start of `data` standing for the secret's character at `j`:
/// `(secret bytes it stands for, data bytes it takes)`.
fn json_escape(secret: &[u8], j: usize, data: &[u8]) -> Result<Option<(usize, usize)>, Partial> {
    let want = secret[j];
    let Some(&e) = data.get(1) else {
        return Err(Partial);
    };
    let simple = match e {
        b'"' | b'\\' | b'/' => Some(e),
        b'n' => Some(b'\n'),
        b't' => Some(b'\t'),
        b'r' => Some(b'\r'),
        b'b' => Some(0x08),
        b'f' => Some(0x0c),
        _ => None,
    };
    if let Some(c) = simple {
        return Ok((c == want).then_some((1, 2)));
    }
    if e != b'u' {
        return Ok(None);
    }
    if data.len() < 6 {
        let digits = &data[2..];
        return match digits.iter().all(|&d| hex(d).is_some()) {
            true => Err(Partial),
            false => Ok(None),
        };
    }
    let Some(code) = data[2..6]
        .iter()
        .try_fold(0u32, |acc, &d| Some(acc * 16 + hex(d)?))
    else {
        return Ok(None);
    };
    // The secret's character at `j`, compared as a code point (BMP only; `None` mid-char).
    let text = std::str::from_utf8(&secret[j..]).ok();
    let Some(c) = text.and_then(|t| t.chars().next()) else {
        return Ok(None);
    };
    Ok((u32::from(c) == code).then_some((c.len_utf8(), 6)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr/et+\"key é";

    fn needles() -> Needles {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{SECRET}"));
        Needles::new([SECRET.as_bytes()], [basic.as_bytes()])
    }

    fn redacted(text: &[u8]) -> String {
        String::from_utf8_lossy(&needles().redact(text, true).0).into_owned()
    }

    #[test]
    fn every_form_of_the_secret_is_redacted() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{SECRET}"));
        let inside = base64::engine::general_purpose::STANDARD.encode(format!("xy{SECRET}z"));
        let json = serde_json::to_string(SECRET).unwrap();
        let slash = json.replace('/', "\\/");
        let all_u: String = SECRET
            .chars()
            .map(|c| format!("\\u{:04X}", u32::from(c)))
            .collect();
        let pct: String = SECRET.bytes().map(|b| format!("%{b:02x}")).collect();
        let form = SECRET.replace(' ', "+");
        for form in [
            SECRET.to_owned(),
            b64,
            b64url,
            format!("Basic {basic}"),
            inside,
            json,
            slash,
            all_u,
            pct,
            form,
        ] {
            let text = format!("before {form} after");
            let out = redacted(text.as_bytes());
            assert!(
                out.starts_with("before ") && out.ends_with(" after"),
                "{out}"
            );
            assert!(out.contains("[REDACTED]"), "{form} -> {out}");
            for leftover in ["s3cr", "czNjc", "key"] {
                assert!(!out.contains(leftover), "{form} -> {out}");
            }
        }
        // The whole Basic token the proxy produced goes, not just the part that is the secret.
        assert_eq!(
            redacted(
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("bot:{SECRET}"))
                )
                .as_bytes()
            ),
            "Basic [REDACTED]"
        );
        assert_eq!(
            redacted(b"nothing to see: s3cr/e, %41, \\u0041"),
            "nothing to see: s3cr/e, %41, \\u0041"
        );
    }

    #[test]
    fn a_secret_holding_an_escape_character_is_found_escaped() {
        for (secret, echoed) in [
            ("a%b", "%61%25%62"),
            ("a%b", "a%25b"),
            ("a%25b", "a%25b"),
            ("a%25b", "a%2525b"),
            ("a\\b", "a\\\\b"),
            ("a\\b", "a\\u005cb"),
            ("a\\b", "a\\b"),
            ("a\\nb", "a\\\\nb"),
        ] {
            let n = Needles::new([secret.as_bytes()], []);
            let text = format!("<{echoed}>");
            let (out, _) = n.redact(text.as_bytes(), true);
            assert_eq!(out, b"<[REDACTED]>", "{secret} as {echoed}");
        }
    }

    /// One form a prefix of a longer one at the same place: where the data is cut changes
    /// nothing (the longer one is waited for, not cut short).
    #[test]
    fn streamed_and_whole_redact_the_same_spans() {
        let n = Needles::new([&b"abc"[..], b"abcdef"], []);
        let text = b"x abcdef y abc z abcde";
        let whole = n.redact(text, true).0;
        assert_eq!(whole, b"x [REDACTED] y [REDACTED] z [REDACTED]de");
        for cut in 0..text.len() {
            let (mut out, held) = n.redact(&text[..cut], false);
            out.truncate(out.len() - held);
            let rest = [&text[cut - held..]].concat();
            out.extend(n.redact(&rest, true).0);
            assert_eq!(out, whole, "cut at {cut}");
        }
    }

    #[test]
    fn only_a_possible_start_is_held_back() {
        let n = needles();
        assert_eq!(
            n.redact(b"data: ok\n\n", false),
            (b"data: ok\n\n".to_vec(), 0)
        );
        for tail in ["s3c", "s3cr%2", "s3cr\\u00", "s3cr\\"] {
            let text = format!("data: {tail}");
            let (_, held) = n.redact(text.as_bytes(), false);
            assert_eq!(held, tail.len(), "{tail}");
        }
    }
}
