//! Charts as SVG drawn on the server: no script, no library, nothing to
//! fetch, and they print and mail as they are. Each has a text title for
//! screen readers; the numbers are also in a table next to it.

use std::fmt::Write as _;

use super::html::esc;

/// One row of a forest plot: a point and its interval.
pub struct Row {
    pub label: String,
    pub point: Option<f64>,
    pub interval: Option<[f64; 2]>,
    /// CSS class of the mark (good, bad, neutral, muted).
    pub class: &'static str,
}

const W: f64 = 640.0;

fn extent(values: impl Iterator<Item = f64>, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = if include_zero {
        (0.0f64, 0.0f64)
    } else {
        (f64::INFINITY, f64::NEG_INFINITY)
    };
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 1.0, hi + 1.0);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// Points with their intervals on one axis, with the zero line: "the big
/// wins" right of it, losses left. The axis stays within `bounds` (an
/// interval past them is drawn to the edge).
pub fn forest(
    title: &str,
    rows: &[Row],
    bounds: (f64, f64),
    fmt: impl Fn(f64) -> String,
) -> String {
    let left = 170.0;
    let row_h = 26.0;
    let h = row_h * rows.len().max(1) as f64 + 40.0;
    let (lo, hi) = extent(
        rows.iter()
            .flat_map(|r| r.interval.into_iter().flatten().chain(r.point)),
        true,
    );
    let (lo, hi) = (lo.max(bounds.0), hi.min(bounds.1));
    let x = |v: f64| left + (v.clamp(lo, hi) - lo) / (hi - lo) * (W - left - 30.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {h}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = esc(title)
    );
    let zero = x(0.0);
    let _ = write!(
        s,
        r#"<line class="zero" x1="{zero:.1}" x2="{zero:.1}" y1="8" y2="{:.1}"/>"#,
        h - 24.0
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 20.0 + i as f64 * row_h;
        let _ = write!(
            s,
            r#"<text class="label" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 10.0,
            y + 4.0,
            esc(&r.label)
        );
        if let Some([a, b]) = r.interval {
            let _ = write!(
                s,
                r#"<line class="ci {}" x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/>"#,
                r.class,
                x(a),
                x(b)
            );
        }
        match r.point {
            Some(p) => {
                let _ = write!(
                    s,
                    r#"<circle class="pt {}" cx="{:.1}" cy="{y:.1}" r="5"><title>{}: {}</title></circle>"#,
                    r.class,
                    x(p),
                    esc(&r.label),
                    esc(&fmt(p))
                );
            }
            None => {
                let _ = write!(
                    s,
                    r#"<text class="na" x="{:.1}" y="{:.1}">no control group or too few customers</text>"#,
                    left,
                    y + 4.0
                );
            }
        }
    }
    for (v, anchor) in [(lo, "start"), (0.0, "middle"), (hi, "end")] {
        let _ = write!(
            s,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="{anchor}">{}</text>"#,
            x(v),
            h - 6.0,
            esc(&fmt(v))
        );
    }
    s.push_str("</svg>");
    s
}

/// One line of a [`lines`] chart.
pub struct Series<'a> {
    pub label: &'a str,
    pub class: &'static str,
    pub points: Vec<Option<f64>>,
}

/// Lines over labelled steps (days, or times since a decision), with an
/// optional band (lo, hi per step) drawn under them.
pub fn lines(
    title: &str,
    steps: &[String],
    series: &[Series<'_>],
    band: Option<&[Option<[f64; 2]>]>,
    zero: bool,
    fmt: impl Fn(f64) -> String,
) -> String {
    let h = 220.0;
    let (left, bottom, top) = (60.0, 30.0, 12.0);
    let values = series
        .iter()
        .flat_map(|s| s.points.iter().flatten().copied())
        .chain(
            band.into_iter()
                .flatten()
                .flatten()
                .flat_map(|[a, b]| [*a, *b]),
        );
    let (lo, hi) = extent(values, zero);
    let n = steps.len().max(2) as f64 - 1.0;
    let x = |i: usize| left + i as f64 / n * (W - left - 16.0);
    let y = |v: f64| top + (hi - v) / (hi - lo) * (h - top - bottom);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {h}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = esc(title)
    );
    if let Some(band) = band {
        let upper: Vec<String> = band
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|[_, hi]| format!("{:.1},{:.1}", x(i), y(hi))))
            .collect();
        let lower: Vec<String> = band
            .iter()
            .enumerate()
            .rev()
            .filter_map(|(i, b)| b.map(|[lo, _]| format!("{:.1},{:.1}", x(i), y(lo))))
            .collect();
        if !upper.is_empty() {
            let _ = write!(
                s,
                r#"<polygon class="band" points="{} {}"/>"#,
                upper.join(" "),
                lower.join(" ")
            );
        }
    }
    if zero && lo < 0.0 && hi > 0.0 {
        let _ = write!(
            s,
            r#"<line class="zero" x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}"/>"#,
            W - 16.0,
            y(0.0),
            y(0.0)
        );
    }
    for sr in series {
        let pts: Vec<String> = sr
            .points
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
            .collect();
        if !pts.is_empty() {
            let _ = write!(
                s,
                r#"<polyline class="line {}" points="{}"><title>{}</title></polyline>"#,
                sr.class,
                pts.join(" "),
                esc(sr.label)
            );
        }
    }
    for v in [lo, hi] {
        let _ = write!(
            s,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y(v) + 4.0,
            esc(&fmt(v))
        );
    }
    // At most about eight step labels, evenly spread.
    let every = steps.len().div_ceil(8).max(1);
    for (i, label) in steps.iter().enumerate() {
        if i % every == 0 || i + 1 == steps.len() {
            let _ = write!(
                s,
                r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x(i),
                h - 10.0,
                esc(label)
            );
        }
    }
    let mut lx = left;
    for sr in series {
        let _ = write!(
            s,
            r#"<text class="legend {}" x="{lx:.1}" y="10">■ {}</text>"#,
            sr.class,
            esc(sr.label)
        );
        lx += 14.0 + 8.0 * sr.label.chars().count() as f64;
    }
    s.push_str("</svg>");
    s
}

/// Bars, one per step.
pub fn bars(title: &str, steps: &[String], values: &[f64]) -> String {
    let h = 160.0;
    let (left, bottom) = (50.0, 26.0);
    let max = values.iter().copied().fold(0.0f64, f64::max).max(1.0);
    let n = values.len().max(1) as f64;
    let bw = (W - left - 10.0) / n;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {h}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = esc(title)
    );
    for (i, v) in values.iter().enumerate() {
        let bh = v / max * (h - bottom - 10.0);
        let label = steps.get(i).map_or("", String::as_str);
        let _ = write!(
            s,
            r#"<rect class="bar" x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}"><title>{}: {v}</title></rect>"#,
            left + i as f64 * bw + 1.0,
            h - bottom - bh,
            (bw - 2.0).max(1.0),
            esc(label)
        );
    }
    let _ = write!(
        s,
        r#"<text class="tick" x="{:.1}" y="16" text-anchor="end">{max}</text>"#,
        left - 6.0
    );
    let every = steps.len().div_ceil(8).max(1);
    for (i, label) in steps.iter().enumerate() {
        if i % every == 0 {
            let _ = write!(
                s,
                r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                left + (i as f64 + 0.5) * bw,
                h - 8.0,
                esc(label)
            );
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forest_plot_places_intervals_around_zero_and_escapes_labels() {
        let rows = [
            Row {
                label: "<b>win</b>".into(),
                point: Some(0.1),
                interval: Some([0.05, 0.15]),
                class: "good",
            },
            Row {
                label: "none".into(),
                point: None,
                interval: None,
                class: "muted",
            },
        ];
        let svg = forest("diff", &rows, (-1.0, 1.0), |v| format!("{v:.2}"));
        assert!(svg.contains("&lt;b&gt;win&lt;/b&gt;"));
        assert!(!svg.contains("<b>"));
        assert!(svg.contains(r#"class="zero""#));
        assert!(svg.contains("no control group"));
        assert_eq!(svg.matches("<circle").count(), 1);
    }

    #[test]
    fn lines_and_bars_draw_every_value() {
        let steps: Vec<String> = (1..=3).map(|d| format!("d{d}")).collect();
        let svg = lines(
            "t",
            &steps,
            &[Series {
                label: "treated",
                class: "treated",
                points: vec![Some(0.1), None, Some(0.3)],
            }],
            Some(&[Some([-0.1, 0.2]), None, Some([0.0, 0.4])]),
            true,
            |v| format!("{v:.1}"),
        );
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("<polygon"));
        let b = bars("b", &steps, &[1.0, 0.0, 4.0]);
        assert_eq!(b.matches("<rect").count(), 3);
    }
}
