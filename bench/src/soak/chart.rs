//! The soak chart: one panel per series (proxy RSS, open fds, tokio tasks, latency) over the
//! run's time, the warm-up shaded, the post-warm-up trend line drawn over the data, labels in
//! a built-in 5×7 pixel font. Written as PNG by [`super::png`]; no font file, no system library.

use super::png;

/// Palette indices.
const WHITE: u8 = 0;
const BLACK: u8 = 1;
const GRID: u8 = 2;
const SHADE: u8 = 3;
const BLUE: u8 = 4;
const RED: u8 = 5;
const ORANGE: u8 = 6;
const PALETTE: [[u8; 3]; 7] = [
    [255, 255, 255],
    [30, 30, 30],
    [215, 215, 215],
    [238, 238, 238],
    [31, 90, 180],
    [200, 30, 30],
    [235, 130, 20],
];

const WIDTH: usize = 1000;
const PANEL_H: usize = 170;
const GAP: usize = 44;
const TOP: usize = 50;
const LEFT: usize = 96;
const RIGHT: usize = 24;
/// Text scale: each font pixel is drawn as a 2×2 block.
const SCALE: usize = 2;

/// One panel: its title and up to two lines of (seconds, value) points; `trend` is a line
/// (from, to) in the same units, drawn in red.
pub struct Panel {
    pub title: String,
    pub lines: Vec<Vec<(f64, f64)>>,
    pub trend: Option<((f64, f64), (f64, f64))>,
}

/// Render the panels over `0..=duration_s` with `0..warmup_s` shaded.
pub fn render(title: &str, panels: &[Panel], duration_s: f64, warmup_s: f64) -> Vec<u8> {
    let height = TOP + panels.len() * (PANEL_H + GAP) + 30;
    let mut c = Canvas::new(WIDTH, height);
    c.text(LEFT, 14, title, BLACK);
    let (unit, div) = if duration_s >= 300.0 {
        ("MIN", 60.0)
    } else {
        ("S", 1.0)
    };
    let span = duration_s.max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    for (i, p) in panels.iter().enumerate() {
        let y0 = TOP + i * (PANEL_H + GAP) + 18;
        c.text(LEFT, y0 - 18, &p.title, BLACK);
        // Value range over every line (and the trend), padded.
        let values = p
            .lines
            .iter()
            .flatten()
            .map(|&(_, v)| v)
            .chain(p.trend.iter().flat_map(|(a, b)| [a.1, b.1]));
        let (mut lo, mut hi) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
        if lo > hi {
            (lo, hi) = (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.01).max(0.5);
        let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
        let x_of = |t: f64| LEFT as f64 + (t / span).clamp(0.0, 1.0) * plot_w as f64;
        let y_of = |v: f64| y0 as f64 + (1.0 - (v - lo) / (hi - lo)) * PANEL_H as f64;

        let warm_x = x_of(warmup_s) as usize;
        c.fill(LEFT, y0, warm_x.saturating_sub(LEFT), PANEL_H, SHADE);
        for k in 0..=4 {
            let v = lo + (hi - lo) * k as f64 / 4.0;
            let y = y_of(v) as usize;
            c.hline(LEFT, LEFT + plot_w, y, GRID);
            let label = number(v);
            let w = label.len() * 6 * SCALE;
            c.text(
                LEFT.saturating_sub(w + 8),
                y.saturating_sub(7),
                &label,
                BLACK,
            );
        }
        let step = tick_step(span / div);
        let mut t = 0.0;
        while t <= span / div + 1e-9 {
            let x = x_of(t * div) as usize;
            c.vline(x, y0, y0 + PANEL_H, GRID);
            let label = number(t);
            c.text(
                x.saturating_sub(label.len() * 6),
                y0 + PANEL_H + 6,
                &label,
                BLACK,
            );
            t += step;
        }
        c.rect(LEFT, y0, plot_w, PANEL_H, BLACK);
        for (line, colour) in p.lines.iter().zip([BLUE, ORANGE]) {
            for w in line.windows(2) {
                let (a, b) = ((x_of(w[0].0), y_of(w[0].1)), (x_of(w[1].0), y_of(w[1].1)));
                c.line(a, b, colour);
            }
        }
        if let Some((a, b)) = p.trend {
            c.line((x_of(a.0), y_of(a.1)), (x_of(b.0), y_of(b.1)), RED);
        }
    }
    // Under the last panel's tick labels.
    let axis = TOP + panels.len().saturating_sub(1) * (PANEL_H + GAP) + 18 + PANEL_H + 26;
    let label = format!("time ({unit})");
    c.text(WIDTH - RIGHT - label.len() * 6 * SCALE, axis, &label, BLACK);
    png::encode(WIDTH as u32, height as u32, &PALETTE, &c.px)
}

/// A tick step of 1, 2 or 5 × 10^k giving at most 10 ticks.
fn tick_step(span: f64) -> f64 {
    let mut step = 10f64.powf((span / 10.0).max(1e-9).log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if span / (step * m) <= 10.0 {
            return step * m;
        }
    }
    step *= 10.0;
    step
}

/// Short label: integers as such, small values with up to two decimals.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![WHITE; w * h],
        }
    }

    fn set(&mut self, x: usize, y: usize, c: u8) {
        if x < self.w && y < self.h {
            self.px[y * self.w + x] = c;
        }
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, c: u8) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    fn hline(&mut self, x0: usize, x1: usize, y: usize, c: u8) {
        (x0..=x1).for_each(|x| self.set(x, y, c));
    }

    fn vline(&mut self, x: usize, y0: usize, y1: usize, c: u8) {
        (y0..=y1).for_each(|y| self.set(x, y, c));
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: u8) {
        self.hline(x, x + w, y, c);
        self.hline(x, x + w, y + h, c);
        self.vline(x, y, y + h, c);
        self.vline(x + w, y, y + h, c);
    }

    /// A two-pixel-wide line (a step per pixel along the longer axis).
    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: u8) {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let f = i as f64 / steps as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f);
            let (x, y) = (x.round().max(0.0) as usize, y.round().max(0.0) as usize);
            self.set(x, y, c);
            self.set(x + 1, y, c);
            self.set(x, y + 1, c);
        }
    }

    /// Text in the 5×7 font at `SCALE`, upper-cased; unknown characters are left blank.
    fn text(&mut self, x: usize, y: usize, s: &str, c: u8) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            let gx = x + i * 6 * SCALE;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.fill(gx + col * SCALE, y + r * SCALE, SCALE, SCALE, c);
                    }
                }
            }
        }
    }
}

/// The rows of a 5×7 glyph, top to bottom, leftmost pixel in bit 4.
fn glyph(ch: char) -> [u8; 7] {
    match ch {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        _ => [0; 7],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_few() {
        assert_eq!(tick_step(60.0), 10.0);
        assert_eq!(tick_step(20.0), 2.0);
        assert_eq!(tick_step(120.0), 20.0);
        assert_eq!(tick_step(7.0), 1.0);
        for span in [0.5, 3.0, 33.0, 61.0, 999.0] {
            assert!(span / tick_step(span) <= 10.0, "{span}");
        }
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(number(52.0), "52");
        assert_eq!(number(52.26), "52.3");
        assert_eq!(number(0.126), "0.13");
        assert_eq!(number(1234.5), "1234");
    }

    #[test]
    fn a_chart_renders_to_a_png() {
        let points: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64, 50.0 + i as f64 % 7.0))
            .collect();
        let panel = Panel {
            title: "RSS MiB".into(),
            lines: vec![points],
            trend: Some(((10.0, 51.0), (100.0, 52.0))),
        };
        let png = render("soak", &[panel], 100.0, 10.0);
        assert!(png.starts_with(b"\x89PNG"));
        assert!(png.len() < 60_000, "{}", png.len());
    }
}
