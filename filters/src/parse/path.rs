//! The normalised form of a request path (RFC 3986 §6.2.2): percent-encoded unreserved
//! characters decoded, the hex digits of the other percent-encodings upper-cased, and dot
//! segments removed (§5.2.4), after decoding, so `%2e%2e` counts as `..`. Encoded slashes
//! (`%2F`) and backslashes stay as they are: they are data, not separators, to RFC 3986.
//! A `%` not followed by two hex digits (invalid to RFC 3986, a literal `%` to WHATWG URL
//! parsers and most servers) becomes `%25`, so that decoding what follows it cannot complete
//! it into a new escape (`/%%611` is `/%25a1`, not `/%a1`): the form is a fixed point, a
//! second normalization leaves it as it is. Policies match on this form; the raw path is what
//! the upstream receives.

/// The normalised form of `path` (the path component only, no query).
pub fn normalize(path: &str) -> String {
    remove_dot_segments(&decode_unreserved(path))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                let b = h * 16 + l;
                if is_unreserved(b) {
                    out.push(char::from(b));
                } else {
                    out.push('%');
                    out.push(char::from(bytes[i + 1]).to_ascii_uppercase());
                    out.push(char::from(bytes[i + 2]).to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        if bytes[i] == b'%' {
            // Without two hex digits: a literal '%'.
            out.push_str("%25");
            i += 1;
            continue;
        }
        let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    out
}

/// RFC 3986 §5.2.4, on whole segments.
fn remove_dot_segments(path: &str) -> String {
    let absolute = path.starts_with('/');
    let segments: Vec<&str> = path.split('/').skip(usize::from(absolute)).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves the path ending in '/'.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    match absolute {
        true => format!("/{joined}"),
        false => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn dot_segments_and_unreserved_escapes() {
        for (raw, want) in [
            ("/", "/"),
            ("", ""),
            ("/a/b/c", "/a/b/c"),
            ("/a/./b/../c", "/a/c"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/.%2E/admin", "/admin"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%7euser/%41-%5a", "/~user/A-Z"),
            ("/a%2fb/%2F..", "/a%2Fb/%2F.."),
            ("/x%3ay%2F", "/x%3Ay%2F"),
            ("/100%", "/100%25"),
            ("/%zz/%4", "/%25zz/%254"),
            ("/%%611", "/%25a1"),
            ("/%%2e%2e/x", "/%25../x"),
            ("/é/%C3%A9", "/é/%C3%A9"),
            ("/a//b/../c", "/a//c"),
            ("/a..b/...", "/a..b/..."),
        ] {
            assert_eq!(normalize(raw), want, "{raw}");
            assert_eq!(normalize(want), want, "not a fixed point: {raw}");
        }
    }
}
