//! Redaction of echoed secrets in response bodies (`filters/src/parse/redact.rs` `Needles`,
//! streamed by `filters/src/stages/credentials.rs` `Redactor`).
//!
//! Input: `ctl` (chunk size: low 6 bits + 1), `n`, n bytes of secret, `m`, m bytes of Basic
//! user name, then a body template. In the template, `\x01` followed by a form byte `f` is
//! replaced by the secret in the form `f & 15` (parameter `f >> 4`): raw, base64 (padded,
//! unpadded, url-safe, inside a longer encoding at any alignment), the Basic token the proxy
//! produced, JSON string escapes (serde's, with `\/`, all `\uXXXX`), percent-encoding (either
//! case), `+` for spaces, or a per-character mix of these.
//!
//! The needles are built as the proxy builds them: the secret, and the Basic token
//! `base64(user:secret)` it produced. The body is pushed through the streaming redactor in
//! chunks.
//!
//! Invariants: no run of the output between two `[REDACTED]` markers contains the secret in a
//! form the module claims to redact (the raw secret, the Basic token, every inserted escaped
//! or percent-encoded form, the base64 cores of at least 8 characters that any base64 or
//! base64url encoding containing the secret carries); streaming gives the same output as
//! redacting the whole body at once.
#![no_main]

use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use portcullis_filters::parse::redact::{Needles, REDACTED};
use portcullis_filters::stages::credentials::Redactor;

/// Shortest base64 core the module claims to find (`MIN_CORE`).
const MIN_CORE: usize = 8;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

/// The part of the base64 (`engine`) encoding of `secret` preceded by `align` (mod 3) bytes
/// that is the same whatever precedes and follows it; `None` when shorter than `MIN_CORE`.
fn core(engine: &base64::engine::GeneralPurpose, secret: &[u8], align: usize) -> Option<Vec<u8>> {
    let align = align % 3;
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(secret);
    let enc = engine.encode(&padded);
    let skip = (align * 4).div_ceil(3);
    let whole = padded.len() / 3 * 4;
    (whole > skip && whole - skip >= MIN_CORE).then(|| enc.as_bytes()[skip..whole].to_vec())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn pct_byte(b: u8, upper: bool) -> String {
    match upper {
        true => format!("%{b:02X}"),
        false => format!("%{b:02x}"),
    }
}

fn u_escape(c: char, upper: bool) -> Option<String> {
    let cp = u32::from(c);
    (cp <= 0xFFFF).then(|| match upper {
        true => format!("\\u{cp:04X}"),
        false => format!("\\u{cp:04x}"),
    })
}

fn simple_escape(c: char) -> Option<&'static str> {
    Some(match c {
        '"' => "\\\"",
        '\\' => "\\\\",
        '/' => "\\/",
        '\n' => "\\n",
        '\t' => "\\t",
        '\r' => "\\r",
        '\u{8}' => "\\b",
        '\u{c}' => "\\f",
        _ => return None,
    })
}

/// The secret in form `f`; the substrings of it the redactor must not let through.
fn form(secret: &str, token: &str, f: u8) -> (Vec<u8>, Vec<Vec<u8>>) {
    let s = secret.as_bytes();
    let param = usize::from(f >> 4);
    let whole = |t: String| (t.clone().into_bytes(), vec![t.into_bytes()]);
    match f & 15 {
        1 => {
            let t = STANDARD.encode(s);
            (
                t.into_bytes(),
                core(&STANDARD_NO_PAD, s, 0).into_iter().collect(),
            )
        }
        2 => {
            let t = STANDARD_NO_PAD.encode(s);
            (
                t.into_bytes(),
                core(&STANDARD_NO_PAD, s, 0).into_iter().collect(),
            )
        }
        3 => {
            let t = URL_SAFE_NO_PAD.encode(s);
            (
                t.into_bytes(),
                core(&URL_SAFE_NO_PAD, s, 0).into_iter().collect(),
            )
        }
        4 | 13 => {
            // Inside a longer encoding: `param` bytes before, `param / 3` after.
            let engine = if f & 15 == 4 {
                &STANDARD
            } else {
                &URL_SAFE_NO_PAD
            };
            let bare = if f & 15 == 4 {
                &STANDARD_NO_PAD
            } else {
                &URL_SAFE_NO_PAD
            };
            let mut inner = vec![b'x'; param];
            inner.extend_from_slice(s);
            inner.extend(std::iter::repeat_n(b'y', param / 3));
            let t = engine.encode(&inner);
            let c = core(bare, s, param);
            if let Some(c) = &c {
                assert!(
                    t.as_bytes().windows(c.len()).any(|w| w == c.as_slice()),
                    "harness: the core is not in the encoding"
                );
            }
            (t.into_bytes(), c.into_iter().collect())
        }
        5 => (
            format!("Basic {token}").into_bytes(),
            vec![token.as_bytes().to_vec()],
        ),
        6 => {
            let q = serde_json::to_string(secret).expect("a string serializes");
            whole(q[1..q.len() - 1].to_owned())
        }
        7 => {
            let q = serde_json::to_string(secret).expect("a string serializes");
            whole(q[1..q.len() - 1].replace('/', "\\/"))
        }
        8 => whole(
            secret
                .chars()
                .map(|c| u_escape(c, param & 1 == 1).unwrap_or_else(|| c.to_string()))
                .collect(),
        ),
        9 | 10 => whole(s.iter().map(|&b| pct_byte(b, f & 15 == 10)).collect()),
        11 => whole(secret.replace(' ', "+")),
        12 => {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (param as u64 + 1));
            let mut t = String::new();
            for c in secret.chars() {
                match rng.next() % 6 {
                    0 => t.push(c),
                    1 | 2 => {
                        let mut buf = [0u8; 4];
                        for &b in c.encode_utf8(&mut buf).as_bytes() {
                            t.push_str(&pct_byte(b, rng.next() % 2 == 0));
                        }
                    }
                    3 => match u_escape(c, rng.next() % 2 == 0) {
                        Some(e) => t.push_str(&e),
                        None => t.push(c),
                    },
                    4 => match simple_escape(c) {
                        Some(e) => t.push_str(e),
                        None => t.push(c),
                    },
                    _ => match c {
                        ' ' => t.push('+'),
                        c => t.push(c),
                    },
                }
            }
            whole(t)
        }
        _ => whole(secret.to_owned()),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The runs of `out` between `[REDACTED]` markers.
fn segments(out: &[u8]) -> Vec<&[u8]> {
    let mut segs = Vec::new();
    let mut rest = out;
    while let Some(at) = rest.windows(REDACTED.len()).position(|w| w == REDACTED) {
        segs.push(&rest[..at]);
        rest = &rest[at + REDACTED.len()..];
    }
    segs.push(rest);
    segs
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let Some(&ctl) = take(&mut data, 1).first() else {
        return;
    };
    let n = take(&mut data, 1)
        .first()
        .map_or(0, |&n| usize::from(n % 64));
    let secret = String::from_utf8_lossy(take(&mut data, n)).into_owned();
    let m = take(&mut data, 1)
        .first()
        .map_or(0, |&m| usize::from(m % 16));
    let user = String::from_utf8_lossy(take(&mut data, m)).into_owned();
    if secret.is_empty() {
        return;
    }
    let token = STANDARD.encode(format!("{user}:{secret}"));

    // The body: the template with the secret's forms inserted.
    let mut body = Vec::new();
    let mut forbidden: Vec<Vec<u8>> = vec![secret.as_bytes().to_vec(), token.as_bytes().to_vec()];
    forbidden.extend(core(&STANDARD_NO_PAD, secret.as_bytes(), 0));
    let mut i = 0;
    while i < data.len() {
        if data[i] == 1 {
            let f = data.get(i + 1).copied().unwrap_or(0);
            let (text, claims) = form(&secret, &token, f);
            body.extend_from_slice(&text);
            forbidden.extend(claims);
            i += 2;
        } else {
            body.push(data[i]);
            i += 1;
        }
    }

    let needles = Arc::new(Needles::new([secret.as_bytes()], [token.as_bytes()]));
    let mut redactor = Redactor::new(needles.clone()).expect("a secret to look for");
    let size = usize::from(ctl & 0x3f) + 1;
    let mut streamed = Vec::new();
    for c in body.chunks(size) {
        streamed.extend(redactor.push(c));
    }
    streamed.extend(redactor.finish());

    for seg in segments(&streamed) {
        for f in &forbidden {
            assert!(
                !contains(seg, f),
                "leaked {:?} in {:?} ({size}-byte chunks)",
                String::from_utf8_lossy(f),
                String::from_utf8_lossy(seg)
            );
        }
    }

    let (whole, held) = needles.redact(&body, true);
    assert_eq!(held, 0);
    assert_eq!(
        String::from_utf8_lossy(&streamed),
        String::from_utf8_lossy(&whole),
        "streaming ({size}-byte chunks) redacts differently from the whole body"
    );
});
