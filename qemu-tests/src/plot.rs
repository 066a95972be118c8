//! Plots for the demo report and the benchmark report, drawn as self-contained SVG (no scripts,
//! no fonts or styles fetched from anywhere).
//!
//! Two kinds: [`latency_over_time`] (one dot per request, with vertical markers for events such
//! as checkpoints, the kill and the promotion) and [`cdf`] (one step line per series).

use std::fmt::Write as _;

/// Plot area and margins, in SVG user units.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;
/// Series colours, in order.
const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// A vertical event marker on a time axis.
#[derive(Clone, Debug)]
pub struct Marker {
    /// Where, in the x unit of the plot.
    pub x: f64,
    /// Its label (drawn for [`MarkerKind::Major`] only, to keep the plot readable).
    pub label: String,
    /// How prominent.
    pub kind: MarkerKind,
}

/// How a marker is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerKind {
    /// A thin grey tick at the top (e.g. each checkpoint).
    Minor,
    /// A labelled red line across the plot (e.g. the kill, the promotion).
    Major,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`.
fn nice_ceiling(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|v| *v >= max).unwrap_or(10.0 * magnitude)
}

struct Frame {
    svg: String,
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn new(title: &str, x_label: &str, y_label: &str, x_max: f64, y_max: f64) -> Self {
        let (x_max, y_max) = (nice_ceiling(x_max), nice_ceiling(y_max));
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(svg, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
        let _ = write!(
            svg,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
            WIDTH / 2.0,
            escape(title)
        );
        let (x0, y0, x1, y1) = (LEFT, HEIGHT - BOTTOM, WIDTH - RIGHT, TOP);
        let _ = write!(svg, r##"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="#333" fill="none"/>"##);
        for i in 0..=5 {
            let f = f64::from(i) / 5.0;
            let (x, y) = (x0 + f * (x1 - x0), y0 - f * (y0 - y1));
            let _ = write!(svg, r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{}" stroke="#333"/>"##, y0 + 4.0);
            let _ = write!(svg, r#"<text x="{x}" y="{}" text-anchor="middle">{}</text>"#, y0 + 18.0, tick(f * x_max));
            let _ = write!(svg, r##"<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#eee"/>"##);
            let _ =
                write!(svg, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, x0 - 6.0, y + 4.0, tick(f * y_max));
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            HEIGHT - 10.0,
            escape(x_label)
        );
        let _ = write!(
            svg,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            escape(y_label)
        );
        Self { svg, x_max, y_max }
    }

    fn x(&self, v: f64) -> f64 {
        LEFT + (v / self.x_max).clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        (HEIGHT - BOTTOM) - (v / self.y_max).clamp(0.0, 1.0) * (HEIGHT - BOTTOM - TOP)
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

fn tick(v: f64) -> String {
    if v == 0.0 || v.abs() >= 10.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One dot per `(x, y)` point (values above the axis are drawn on its top edge), with markers.
pub fn latency_over_time(
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
    markers: &[Marker],
) -> String {
    let finite = |v: &f64| v.is_finite();
    let x_max = points.iter().map(|p| p.0).chain(markers.iter().map(|m| m.x)).filter(finite).fold(0.0, f64::max);
    let mut ys: Vec<f64> = points.iter().map(|p| p.1).filter(finite).collect();
    ys.sort_by(f64::total_cmp);
    // The y axis shows up to the largest value; a single huge stall stays visible at the top.
    let y_max = ys.last().copied().unwrap_or(1.0);
    let mut f = Frame::new(title, x_label, y_label, x_max, y_max);
    for m in markers.iter().filter(|m| m.x.is_finite()) {
        let x = f.x(m.x);
        match m.kind {
            MarkerKind::Minor => {
                let _ =
                    write!(f.svg, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#999"/>"##, TOP + 8.0);
            }
            MarkerKind::Major => {
                let _ = write!(
                    f.svg,
                    r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#d62728" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#d62728">{}</text>"##,
                    HEIGHT - BOTTOM,
                    x + 3.0,
                    TOP + 20.0,
                    escape(&m.label)
                );
            }
        }
    }
    let mut dots = String::new();
    for &(x, y) in points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
        let _ = write!(dots, "M{:.1},{:.1}h0.01", f.x(x), f.y(y));
    }
    let _ = write!(
        f.svg,
        r#"<path d="{dots}" stroke="{}" stroke-width="2.5" stroke-linecap="round" fill="none"/>"#,
        COLOURS[0]
    );
    f.finish()
}

/// Empirical CDFs, one step line per `(name, values)` series, with a legend.
pub fn cdf(title: &str, x_label: &str, series: &[(&str, Vec<f64>)]) -> String {
    let x_max = series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let mut f = Frame::new(title, x_label, "fraction of requests", x_max, 1.0);
    for (i, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if !v.is_empty() {
            let n = v.len() as f64;
            let mut d = format!("M{:.1},{:.1}", f.x(v[0]), f.y(0.0));
            // At most ~600 steps: every value for small series, evenly spaced ranks for large ones.
            let step = (v.len() / 600).max(1);
            for (k, value) in v.iter().enumerate().step_by(step).chain(std::iter::once((v.len() - 1, &v[v.len() - 1])))
            {
                let _ = write!(d, " L{:.1},{:.1}", f.x(*value), f.y((k + 1) as f64 / n));
            }
            let _ = write!(f.svg, r#"<path d="{d}" stroke="{colour}" stroke-width="2" fill="none"/>"#);
        }
        let ly = TOP + 16.0 * i as f64 + 10.0;
        let _ = write!(
            f.svg,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            WIDTH - RIGHT - 200.0,
            ly - 4.0,
            WIDTH - RIGHT - 184.0,
            ly,
            escape(name)
        );
    }
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
    }

    #[test]
    fn latency_plot_has_every_point_and_marker() {
        let points: Vec<(f64, f64)> = (0..100).map(|i| (f64::from(i) * 0.1, 1.0 + f64::from(i % 7))).collect();
        let markers = vec![
            Marker { x: 3.0, label: "checkpoint".into(), kind: MarkerKind::Minor },
            Marker { x: 5.0, label: "kill <primary>".into(), kind: MarkerKind::Major },
        ];
        let svg = latency_over_time("latency", "s", "ms", &points, &markers);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("h0.01").count(), 100);
        assert!(svg.contains("kill &lt;primary&gt;"), "labels are escaped");
        assert_eq!(svg.matches("stroke-dasharray").count(), 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn cdf_has_a_line_and_legend_per_series() {
        let svg = cdf("CDF", "ms", &[("colo", vec![1.0, 2.0, 3.0]), ("buffered", vec![25.0, 30.0]), ("empty", vec![])]);
        assert_eq!(svg.matches("<path d=\"M").count(), 1 + 2, "axes plus two non-empty series");
        for name in ["colo", "buffered", "empty"] {
            assert!(svg.contains(&format!(">{name}</text>")));
        }
        assert!(!svg.contains("NaN"));
    }
}
