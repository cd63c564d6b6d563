//! The crypto floor of an intercepted body: what AES-GCM alone costs per MiB on the machine
//! the bench runs on, so the `large` row is judged against what interception must spend
//! rather than against a blind tunnel. A downloaded MiB costs an intercepting proxy at least
//! one open (the upstream's TLS) and two seals (the inner TLS to the client, then the outer
//! TLS the tunnel runs in), in records of the size TLS uses.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use serde::Serialize;

/// The largest TLS record plaintext (RFC 8446 §5.1): what a bulk transfer is sealed in.
pub const RECORD_BYTES: usize = 16 * 1024;
const MIB: usize = 1 << 20;
/// MiB per timed pass; the floor is the fastest of [`PASSES`] passes (the one least
/// disturbed by anything else on the machine).
const MIB_PER_PASS: usize = 16;
const PASSES: usize = 7;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CryptoFloor {
    /// The AEAD: the proxy chooses TLS13_AES_128_GCM_SHA256, the cheapest suite it has, on
    /// every leg (earlier builds negotiated AES-256-GCM; the cheaper floor judges them
    /// more strictly).
    pub aead: &'static str,
    pub record_bytes: usize,
    /// µs to seal one MiB (copy in, encrypt, tag), one thread.
    pub seal_us_per_mib: f64,
    /// µs to open one MiB (copy in, verify, decrypt), one thread.
    pub open_us_per_mib: f64,
    /// One open and two seals: the least an intercepting proxy spends per downloaded MiB.
    pub download_us_per_mib: f64,
    /// The other measurement's `download_us_per_mib` (see [`stricter`]).
    pub other_download_us_per_mib: Option<f64>,
}

/// Of two measurements (before and after the scenarios: a shared host's speed drifts over
/// minutes), the faster one, which judges the proxy the more strictly; it keeps the other's
/// figure for the report.
pub fn stricter(a: CryptoFloor, b: CryptoFloor) -> CryptoFloor {
    let (mut low, high) = if a.download_us_per_mib <= b.download_us_per_mib {
        (a, b)
    } else {
        (b, a)
    };
    low.other_download_us_per_mib = Some(high.download_us_per_mib);
    low
}

/// Measures the floor (about a second).
pub fn measure() -> CryptoFloor {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &[0x42; 16])
            .unwrap_or_else(|_| unreachable!("a 16-byte key is a valid AES-128 key")),
    );
    let plain = vec![0x5a_u8; RECORD_BYTES];
    let mut sealed = plain.clone();
    let tag = key
        .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut sealed)
        .unwrap_or_else(|_| unreachable!("a record is within AES-GCM's bounds"));
    sealed.extend_from_slice(tag.as_ref());
    let records = MIB_PER_PASS * MIB / RECORD_BYTES;
    let mut space = vec![0u8; RECORD_BYTES + 16 + 2 * PAGE];
    let (seal_at, open_at) = (apart_from(&space, &plain), apart_from(&space, &sealed));

    let seal = fastest(|| {
        for i in 0..records {
            let record = &mut space[seal_at..seal_at + RECORD_BYTES];
            record.copy_from_slice(&plain);
            let tag = key.seal_in_place_separate_tag(nonce(i as u64), Aad::empty(), record);
            black_box((&record, tag.is_ok()));
        }
    });
    let open = fastest(|| {
        for _ in 0..records {
            let record = &mut space[open_at..open_at + sealed.len()];
            record.copy_from_slice(&sealed);
            let opened = key.open_in_place(nonce(0), Aad::empty(), record).is_ok();
            black_box(opened);
        }
    });
    let per_mib = |d: Duration| d.as_secs_f64() * 1e6 / MIB_PER_PASS as f64;
    let (seal_us_per_mib, open_us_per_mib) = (per_mib(seal), per_mib(open));
    CryptoFloor {
        aead: "AES-128-GCM (ring)",
        record_bytes: RECORD_BYTES,
        seal_us_per_mib,
        open_us_per_mib,
        download_us_per_mib: open_us_per_mib + 2.0 * seal_us_per_mib,
        other_download_us_per_mib: None,
    }
}

const PAGE: usize = 4096;

/// Where in `space` a record starts half a page away from `source` modulo the page size. A
/// copy between buffers at (nearly) the same offset in their pages is several times slower
/// on some CPUs (AMD Zen's `rep movsb`, which glibc < 2.39 uses for it); wherever the
/// allocator happened to put the two, the floor measures an ordinary copy, not that.
fn apart_from(space: &[u8], source: &[u8]) -> usize {
    let (dst, src) = (space.as_ptr() as usize, source.as_ptr() as usize);
    (src + PAGE / 2).wrapping_sub(dst) % PAGE
}

fn nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// The shortest of [`PASSES`] runs of `pass` (after one untimed warm-up run).
fn fastest(mut pass: impl FnMut()) -> Duration {
    pass();
    (0..PASSES)
        .map(|_| {
            let start = Instant::now();
            pass();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_positive_and_adds_up() {
        let f = measure();
        assert!(f.seal_us_per_mib > 0.0 && f.open_us_per_mib > 0.0, "{f:?}");
        let sum = f.open_us_per_mib + 2.0 * f.seal_us_per_mib;
        assert!((f.download_us_per_mib - sum).abs() < 1e-9);
    }

    #[test]
    fn records_are_half_a_page_from_their_source() {
        let space = vec![0u8; 3 * PAGE];
        let source = vec![1u8; 100];
        let at = apart_from(&space, &source);
        assert!(at < PAGE);
        let distance = (space.as_ptr() as usize + at).wrapping_sub(source.as_ptr() as usize);
        assert_eq!(distance % PAGE, PAGE / 2);
    }

    #[test]
    fn the_stricter_floor_is_the_faster_one() {
        let at = |d: f64| CryptoFloor {
            download_us_per_mib: d,
            ..measure()
        };
        for (a, b) in [(at(900.0), at(1200.0)), (at(1200.0), at(900.0))] {
            let f = stricter(a, b);
            assert_eq!(f.download_us_per_mib, 900.0);
            assert_eq!(f.other_download_us_per_mib, Some(1200.0));
        }
    }
}
