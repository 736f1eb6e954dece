//! Small SVG chart helpers for the dashboard and the compliance report:
//! drawn on the server, no script, every text HTML-escaped. Times are Unix
//! seconds (f64) and always shown in UTC.
//!
//! Colours: the Okabe-Ito palette (safe for the common colour-vision
//! deficiencies); what matters is also told by shape or text (a failed run
//! is a cross, a gap is hatched and labelled).

use std::fmt::Write;

use chrono::{DateTime, Utc};

pub const BLUE: &str = "#0072B2";
pub const ORANGE: &str = "#E69F00";
pub const SKY: &str = "#56B4E9";
pub const GREEN: &str = "#009E73";
pub const RED: &str = "#D55E00";
pub const PURPLE: &str = "#CC79A7";
pub const YELLOW: &str = "#F0E442";
pub const INK: &str = "#222222";
pub const GREY: &str = "#888888";

/// Escapes text for HTML and SVG content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            // Control characters have no business on a page.
            c if c.is_control() && c != '\n' && c != '\t' => o.push('\u{FFFD}'),
            c => o.push(c),
        }
    }
    o
}

/// A time as the pages show it: `2026-11-20 10:00 UTC` (seconds when `secs`).
pub fn utc(t: f64, secs: bool) -> String {
    match DateTime::<Utc>::from_timestamp(t.floor() as i64, 0) {
        Some(d) if secs => d.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Some(d) => d.format("%Y-%m-%d %H:%M UTC").to_string(),
        None => "?".into(),
    }
}

/// A duration in seconds as people read it: `45 s`, `12 min 5 s`, `3 h 20 min`, `2 d 4 h`.
pub fn duration(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let neg = s < 0.0;
    let s = s.abs();
    let t = if s < 1.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{} s", s.round() as u64)
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{} min {} s", s / 60, s % 60)
    } else if s < 86400.0 {
        let m = (s / 60.0).round() as u64;
        format!("{} h {} min", m / 60, m % 60)
    } else {
        let h = (s / 3600.0).round() as u64;
        format!("{} d {} h", h / 24, h % 24)
    };
    if neg {
        format!("-{t}")
    } else {
        t
    }
}

pub fn bytes(b: f64) -> String {
    if !b.is_finite() || b < 0.0 {
        return "?".into();
    }
    crate::commands::info::human(b as u64)
}

/// A horizontal time axis mapped onto `x0..x0+w` pixels.
#[derive(Clone, Copy, Debug)]
pub struct TimeAxis {
    pub t0: f64,
    pub t1: f64,
    pub x0: f64,
    pub w: f64,
}

impl TimeAxis {
    /// An axis over `t0..t1` (widened to at least 20 s, padded 2 %).
    pub fn new(t0: f64, t1: f64, x0: f64, w: f64) -> TimeAxis {
        let (mut t0, t1) = if t1 > t0 { (t0, t1) } else { (t1, t0) };
        // Widened into the past: the right edge is usually now.
        if t1 - t0 < 20.0 {
            t0 = t1 - 20.0;
        }
        let pad = (t1 - t0) * 0.02;
        TimeAxis {
            t0: t0 - pad,
            t1: t1 + pad,
            x0,
            w,
        }
    }

    pub fn x(&self, t: f64) -> f64 {
        let f = ((t - self.t0) / (self.t1 - self.t0)).clamp(0.0, 1.0);
        self.x0 + f * self.w
    }

    /// Tick positions and labels: at most about `max` of them, on round times.
    pub fn ticks(&self, max: usize) -> Vec<(f64, String)> {
        const STEPS: [f64; 17] = [
            1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0,
            86400.0, 172800.0, 604800.0, 2592000.0, 31536000.0,
        ];
        let span = self.t1 - self.t0;
        let step = STEPS
            .iter()
            .copied()
            .find(|s| span / s <= max.max(2) as f64)
            .unwrap_or(31536000.0);
        let fmt = if step < 60.0 {
            "%H:%M:%S"
        } else if span > 86400.0 && step < 86400.0 {
            "%m-%d %H:%M"
        } else if step < 86400.0 {
            "%H:%M"
        } else {
            "%Y-%m-%d"
        };
        let mut out = Vec::new();
        let mut t = (self.t0 / step).ceil() * step;
        while t <= self.t1 && out.len() < 64 {
            if let Some(d) = DateTime::<Utc>::from_timestamp(t as i64, 0) {
                out.push((self.x(t), d.format(fmt).to_string()));
            }
            t += step;
        }
        out
    }
}

/// What a chart's values are: how its axis is stepped and labelled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    Seconds,
    Bytes,
    Count,
}

impl Unit {
    pub fn fmt(self, v: f64) -> String {
        match self {
            Unit::Seconds => duration(v),
            Unit::Bytes => bytes(v),
            Unit::Count => format!("{}", v.round() as i64),
        }
    }

    /// Round steps from 0 up to at least `max`, about `ticks` of them: (step, top).
    pub fn scale(self, max: f64, ticks: usize) -> (f64, f64) {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            0.0
        };
        let ticks = ticks.max(1) as f64;
        let candidates: Vec<f64> = match self {
            Unit::Seconds => [
                1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
                7200.0, 10800.0, 21600.0, 43200.0, 86400.0, 172800.0, 604800.0,
            ]
            .to_vec(),
            Unit::Bytes => (0..6)
                .flat_map(|k| {
                    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
                        .map(|m| m * 1024f64.powi(k))
                })
                .collect(),
            Unit::Count => (0..12)
                .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
                .collect(),
        };
        let step = candidates
            .iter()
            .copied()
            .find(|s| max / s <= ticks)
            .unwrap_or_else(|| (max / ticks).max(1.0));
        let top = ((max / step).ceil() * step).max(step);
        (step, top)
    }
}

/// Opens an SVG element: scalable, with an accessible title.
pub fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{t}\"><title>{t}</title>",
        t = esc(title)
    )
}

/// Vertical grid lines and time labels under `y_bottom`, and the axis name.
pub fn time_grid(axis: &TimeAxis, y_top: f64, y_bottom: f64, max_ticks: usize) -> String {
    let mut s = String::new();
    for (x, label) in axis.ticks(max_ticks) {
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{y_top}\" x2=\"{x:.1}\" y2=\"{y_bottom}\" stroke=\"#e3e3e3\"/>\
             <text x=\"{x:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
            y_bottom + 14.0,
            esc(&label)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">time (UTC)</text>",
        axis.x0 + axis.w,
        y_bottom + 28.0
    );
    s
}

/// How a series' points are marked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Marker {
    None,
    Dot,
    Cross,
}

/// One line (or scatter, with `line: false`) of a chart.
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub dash: Option<&'static str>,
    pub marker: Marker,
    pub line: bool,
}

/// A horizontal reference line (a target, a capacity).
pub struct HLine {
    pub value: f64,
    pub label: String,
    pub color: &'static str,
}

/// A line chart over time: `series` against a value axis from 0 (its
/// labels by `fmt`), with reference lines; the legend is the caller's.
pub fn line_chart(
    title: &str,
    t0: f64,
    t1: f64,
    series: &[Series],
    hlines: &[HLine],
    unit: Unit,
    (w, h): (f64, f64),
) -> String {
    let (left, right, top, bottom) = (78.0, 14.0, 12.0, 34.0);
    let axis = TimeAxis::new(t0, t1, left, w - left - right);
    let plot_h = h - top - bottom;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(hlines.iter().map(|l| l.value))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let (step, ymax) = unit.scale(max * 1.05, 4);
    let y = |v: f64| top + plot_h - (v / ymax).clamp(0.0, 1.05) * plot_h;
    let mut s = svg_open(w, h, title);
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{x2}\" y2=\"{yy:.1}\" stroke=\"#e3e3e3\"/>\
             <text x=\"{lx}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">{}</text>",
            esc(&unit.fmt(v)),
            yy = y(v),
            x2 = w - right,
            lx = left - 6.0,
            ty = y(v) + 4.0
        );
        v += step;
    }
    s.push_str(&time_grid(&axis, top, top + plot_h, 8));
    for l in hlines {
        let yy = y(l.value);
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{x2}\" y2=\"{yy:.1}\" stroke=\"{c}\" stroke-width=\"2\" stroke-dasharray=\"8 4\"><title>{t}</title></line>\
             <text x=\"{x2}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"{c}\">{t}</text>",
            c = l.color,
            t = esc(&l.label),
            x2 = w - right,
            ty = yy - 4.0
        );
    }
    for se in series {
        let mut pts: Vec<(f64, f64)> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| (axis.x(p.0), y(p.1)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if se.line && pts.len() > 1 {
            let d: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                s,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\"{} points=\"{}\"><title>{}</title></polyline>",
                se.color,
                se.dash
                    .map(|d| format!(" stroke-dasharray=\"{d}\""))
                    .unwrap_or_default(),
                d.join(" "),
                esc(&se.label)
            );
        }
        let marker = if se.marker == Marker::None && pts.len() == 1 {
            Marker::Dot
        } else {
            se.marker
        };
        for (x, y) in &pts {
            s.push_str(&mark(marker, *x, *y, se.color, &se.label));
        }
    }
    s.push_str("</svg>");
    s
}

/// A point mark: a dot, or a cross (failures: told apart by shape too).
pub fn mark(m: Marker, x: f64, y: f64, color: &str, title: &str) -> String {
    match m {
        Marker::None => String::new(),
        Marker::Dot => format!(
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{color}\" stroke=\"#fff\"><title>{}</title></circle>",
            esc(title)
        ),
        Marker::Cross => format!(
            "<path d=\"M{a:.1},{b:.1}L{c:.1},{d:.1}M{a:.1},{d:.1}L{c:.1},{b:.1}\" stroke=\"{color}\" stroke-width=\"3\"><title>{}</title></path>",
            esc(title),
            a = x - 5.0,
            b = y - 5.0,
            c = x + 5.0,
            d = y + 5.0
        ),
    }
}

/// One day's stacked bar: (day start, [(value, colour, label)]).
pub type DayBar = (f64, Vec<(f64, &'static str, String)>);

/// Stacked bars, one per day.
pub fn day_bars(title: &str, days: &[DayBar], w: f64, h: f64) -> String {
    let (left, right, top, bottom) = (48.0, 10.0, 12.0, 34.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = days
        .iter()
        .map(|(_, parts)| parts.iter().map(|p| p.0).sum::<f64>())
        .fold(0.0f64, f64::max);
    let (step, ymax) = Unit::Count.scale(max.max(1.0), 4);
    let y = |v: f64| top + plot_h - (v / ymax).clamp(0.0, 1.0) * plot_h;
    let mut s = svg_open(w, h, title);
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{x2}\" y2=\"{yy:.1}\" stroke=\"#e3e3e3\"/>\
             <text x=\"{lx}\" y=\"{ty:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">{v}</text>",
            yy = y(v),
            x2 = w - right,
            lx = left - 6.0,
            ty = y(v) + 4.0
        );
        v += step;
    }
    let n = days.len().max(1) as f64;
    let slot = plot_w / n;
    let bw = (slot * 0.7).max(1.0);
    let every = (days.len() / 12).max(1);
    for (i, (day, parts)) in days.iter().enumerate() {
        let x = left + i as f64 * slot + (slot - bw) / 2.0;
        let mut base = 0.0;
        for (val, color, label) in parts {
            if *val <= 0.0 {
                continue;
            }
            let (ya, yb) = (y(base + val), y(base));
            let _ = write!(
                s,
                "<rect x=\"{x:.1}\" y=\"{ya:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}: {} {}</title></rect>",
                (yb - ya).max(0.5),
                esc(utc(*day, false).get(..10).unwrap_or("?")),
                val,
                esc(label)
            );
            base += val;
        }
        if i % every == 0 {
            let label = DateTime::<Utc>::from_timestamp(*day as i64, 0)
                .map(|d| d.format("%m-%d").to_string())
                .unwrap_or_default();
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
                x + bw / 2.0,
                top + plot_h + 14.0,
                esc(&label)
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">day (UTC)</text></svg>",
        w - right,
        top + plot_h + 28.0
    );
    s
}

/// Something drawn in a timeline lane.
pub enum Item {
    /// A bar from `t0` to `t1` (at least a few pixels wide), hatched when `hatch`.
    Span {
        t0: f64,
        t1: f64,
        color: &'static str,
        title: String,
        label: Option<String>,
        hatch: bool,
    },
    /// A cross at `t` (a failed run).
    Cross {
        t: f64,
        color: &'static str,
        title: String,
    },
    /// An arc linking the end of one mark (`from`) to the start of another (`to`).
    Link { from: f64, to: f64 },
    /// A translucent band behind everything (the restorable window).
    Band {
        t0: f64,
        t1: f64,
        color: &'static str,
        title: String,
    },
}

pub struct Lane {
    pub label: String,
    pub items: Vec<Item>,
    /// A heavier rule above: the first lane of a group (a repository).
    pub group_start: bool,
}

/// A marker over all lanes (a restore point).
pub struct Pin {
    pub t: f64,
    pub label: String,
    pub color: &'static str,
}

pub const LANE_H: f64 = 44.0;

/// Lanes of marks on one time axis, with pins across them all.
pub fn timeline(title: &str, t0: f64, t1: f64, lanes: &[Lane], pins: &[Pin], w: f64) -> String {
    let (left, right, top, bottom) = (190.0, 16.0, 30.0, 34.0);
    let axis = TimeAxis::new(t0, t1, left, w - left - right);
    let h = top + lanes.len() as f64 * LANE_H + bottom;
    let mut s = svg_open(w, h, title);
    s.push_str(
        "<defs><pattern id=\"hatch\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\">\
         <rect width=\"6\" height=\"6\" fill=\"#D55E00\"/><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#fff\" stroke-width=\"2\"/></pattern></defs>",
    );
    s.push_str(&time_grid(&axis, top, h - bottom, 10));
    for (i, lane) in lanes.iter().enumerate() {
        let y0 = top + i as f64 * LANE_H;
        // Labels that would overlap the previous one are left to the tooltip.
        let mut label_end = f64::MIN;
        let mid = y0 + LANE_H / 2.0 + 4.0;
        let _ = write!(
            s,
            "<line x1=\"0\" y1=\"{y0}\" x2=\"{w}\" y2=\"{y0}\" stroke=\"{}\" stroke-width=\"{}\"/>\
             <text x=\"6\" y=\"{:.1}\" font-size=\"12\" fill=\"#222\">{}</text>",
            if lane.group_start { "#999" } else { "#eee" },
            if lane.group_start { 1.5 } else { 1.0 },
            mid + 4.0,
            esc(&lane.label)
        );
        for it in &lane.items {
            if let Item::Band {
                t0,
                t1,
                color,
                title,
            } = it
            {
                let (a, b) = (axis.x(*t0), axis.x(*t1));
                let _ = write!(
                    s,
                    "<rect x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\" fill-opacity=\"0.18\" stroke=\"{color}\" stroke-opacity=\"0.6\"><title>{}</title></rect>",
                    y0 + 2.0,
                    (b - a).max(2.0),
                    LANE_H - 4.0,
                    esc(title)
                );
            }
        }
        for it in &lane.items {
            match it {
                Item::Span {
                    t0,
                    t1,
                    color,
                    title,
                    label,
                    hatch,
                } => {
                    let (a, b) = (axis.x(*t0), axis.x(*t1));
                    let wpx = (b - a).max(if *hatch { 8.0 } else { 5.0 });
                    let (ry, rh) = if *hatch {
                        (y0 + 4.0, LANE_H - 8.0)
                    } else {
                        (mid - 9.0, 18.0)
                    };
                    let fill = if *hatch {
                        "url(#hatch)".to_string()
                    } else {
                        color.to_string()
                    };
                    let _ = write!(
                        s,
                        "<rect x=\"{a:.1}\" y=\"{ry:.1}\" width=\"{wpx:.1}\" height=\"{rh:.1}\" fill=\"{fill}\" stroke=\"{color}\" rx=\"2\"><title>{}</title></rect>",
                        esc(title)
                    );
                    if let Some(l) = label
                        .as_ref()
                        .filter(|l| a > label_end + 4.0 && a + 6.2 * l.chars().count() as f64 <= w)
                    {
                        label_end = a + 6.2 * l.chars().count() as f64;
                        let _ = write!(
                            s,
                            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#333\">{}</text>",
                            a,
                            y0 + LANE_H - 1.0,
                            esc(l)
                        );
                    }
                }
                Item::Cross { t, color, title } => {
                    s.push_str(&mark(Marker::Cross, axis.x(*t), mid, color, title));
                }
                Item::Link { from, to } => {
                    let (a, b) = (axis.x(*from), axis.x(*to));
                    let ty = mid - 9.0;
                    let _ = write!(
                        s,
                        "<path d=\"M{a:.1},{ty:.1} C{a:.1},{c:.1} {b:.1},{c:.1} {b:.1},{ty:.1}\" fill=\"none\" stroke=\"#555\" stroke-width=\"1.5\"/>",
                        c = y0 + 1.0
                    );
                }
                Item::Band { .. } => {}
            }
        }
    }
    for p in pins {
        let x = axis.x(p.t);
        let yb = h - bottom;
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{yb}\" stroke=\"{c}\" stroke-width=\"1.5\" stroke-dasharray=\"3 3\"/>\
             <path d=\"M{x:.1},{a:.1}l6,7l-6,7l-6,-7z\" fill=\"{c}\"><title>{t}</title></path>\
             <text x=\"{tx:.1}\" y=\"{ty:.1}\" font-size=\"11\" fill=\"{c}\">{t}</text>",
            top - 12.0,
            c = p.color,
            a = top - 16.0,
            t = esc(&p.label),
            tx = x + 8.0,
            ty = top - 5.0
        );
    }
    s.push_str("</svg>");
    s
}

/// A legend entry: a swatch of `color` in a `shape` ("box", "line",
/// "dash", "cross", "hatch", "band", "pin"), then the label.
pub fn legend(items: &[(&str, &str, &str)]) -> String {
    let mut s = String::from("<div class=\"legend\">");
    for (color, shape, label) in items {
        let sw = match *shape {
            "line" => format!("<svg width=\"22\" height=\"10\"><line x1=\"0\" y1=\"5\" x2=\"22\" y2=\"5\" stroke=\"{color}\" stroke-width=\"3\"/></svg>"),
            "dash" => format!("<svg width=\"22\" height=\"10\"><line x1=\"0\" y1=\"5\" x2=\"22\" y2=\"5\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"5 3\"/></svg>"),
            "cross" => format!("<svg width=\"14\" height=\"14\"><path d=\"M2,2L12,12M2,12L12,2\" stroke=\"{color}\" stroke-width=\"3\"/></svg>"),
            "hatch" => "<svg width=\"22\" height=\"12\"><defs><pattern id=\"lh\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><rect width=\"6\" height=\"6\" fill=\"#D55E00\"/><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#fff\" stroke-width=\"2\"/></pattern></defs><rect width=\"22\" height=\"12\" fill=\"url(#lh)\"/></svg>".to_string(),
            "band" => format!("<svg width=\"22\" height=\"12\"><rect width=\"22\" height=\"12\" fill=\"{color}\" fill-opacity=\"0.18\" stroke=\"{color}\"/></svg>"),
            "pin" => format!("<svg width=\"14\" height=\"14\"><path d=\"M7,0l6,7l-6,7l-6,-7z\" fill=\"{color}\"/></svg>"),
            _ => format!("<svg width=\"16\" height=\"12\"><rect width=\"16\" height=\"12\" rx=\"2\" fill=\"{color}\"/></svg>"),
        };
        let _ = write!(s, "<span class=\"li\">{sw} {}</span>", esc(label));
    }
    s.push_str("</div>");
    s
}

/// A status badge: the word itself in a colour (never colour alone).
pub fn badge(status: &str) -> String {
    let class = match status {
        "ok" | "passed" | "succeeded" | "running" => "b-ok",
        "warning" | "never succeeded" | "disabled" | "lagging" => "b-warn",
        "failed" | "failing" | "critical" | "unavailable" => "b-fail",
        _ => "b-info",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(status))
}

/// The CSS both pages share.
pub const BASE_CSS: &str = "\
body{font-family:'DejaVu Sans',Helvetica,Arial,sans-serif;color:#1b1b1b;background:#f7f7f5;margin:0;padding:18px 26px;font-size:14px}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:22px 0 6px;border-bottom:2px solid #ddd;padding-bottom:3px}\
h3{font-size:14px;margin:10px 0 4px;color:#333}\
.sub{color:#555;font-size:13px}.note{color:#555;font-size:12px;margin:2px 0 6px}\
.empty{color:#555;font-style:italic;padding:12px;background:#fff;border:1px dashed #bbb}\
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px;margin-bottom:12px}\
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}\
.legend{font-size:12px;color:#333;margin:4px 0}.li{margin-right:16px;white-space:nowrap}.li svg{vertical-align:middle}\
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}\
th,td{border-bottom:1px solid #e4e4e4;padding:4px 8px;text-align:left;vertical-align:top}th{background:#efefec}\
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:bold;border:1px solid}\
.b-ok{background:#e0f2ea;color:#00573f;border-color:#009E73}.b-warn{background:#fff3d6;color:#6b4a00;border-color:#E69F00}\
.b-fail{background:#fbe3d6;color:#8a2f00;border-color:#D55E00}.b-info{background:#eef;color:#234;border-color:#8899bb}\
.big{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0}\
.tile{background:#fff;border:1px solid #ddd;border-left:6px solid #888;border-radius:6px;padding:8px 14px;min-width:170px}\
.tile .v{font-size:28px;font-weight:bold}.tile .k{font-size:12px;color:#555}\
.t-ok{border-left-color:#009E73}.t-warn{border-left-color:#E69F00}.t-fail{border-left-color:#D55E00}\
.alarm{background:#fbe3d6;border:2px solid #D55E00;color:#5a1f00;padding:6px 10px;border-radius:6px;margin:6px 0;font-weight:bold}\
svg.chart{max-width:100%;height:auto;background:#fff}\
.mono{font-family:'DejaVu Sans Mono',monospace;font-size:12px}";

/// A headline figure: a key, a big value and a line under it, coloured by `class` (ok, warn, bad).
pub fn tile(p: &mut String, key: &str, value: &str, sub: &str, class: &str) {
    let _ = std::fmt::Write::write_fmt(p, format_args!(
        "<div class=\"tile {class}\"><div class=\"k\">{}</div><div class=\"v\">{}</div><div class=\"k\">{}</div></div>",
        esc(key),
        esc(value),
        esc(sub)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_controls() {
        assert_eq!(
            esc("<script>alert('x')</script>&\"\u{7}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;\u{FFFD}"
        );
    }

    #[test]
    fn charts_escape_their_texts_and_survive_no_data() {
        let s = line_chart(
            "<b>",
            0.0,
            0.0,
            &[Series {
                label: "<i>".into(),
                color: BLUE,
                points: vec![(f64::NAN, 1.0)],
                dash: None,
                marker: Marker::Dot,
                line: true,
            }],
            &[HLine {
                value: 5.0,
                label: "<u>".into(),
                color: RED,
            }],
            Unit::Count,
            (600.0, 200.0),
        );
        assert!(!s.contains("<b>") && !s.contains("<i>") && !s.contains("<u>"));
        assert!(!s.contains("NaN"));
        let t = timeline(
            "x",
            100.0,
            50.0,
            &[Lane {
                label: "<lane>".into(),
                items: vec![Item::Cross {
                    t: 70.0,
                    color: RED,
                    title: "<t>".into(),
                }],
                group_start: true,
            }],
            &[Pin {
                t: 60.0,
                label: "<p>".into(),
                color: PURPLE,
            }],
            1000.0,
        );
        assert!(!t.contains("<lane>") && !t.contains("<t>") && !t.contains("<p>"));
        assert!(!t.contains("NaN"));
    }

    #[test]
    fn ticks_are_round_and_few() {
        let a = TimeAxis::new(1_700_000_000.0, 1_700_086_400.0, 0.0, 1000.0);
        let t = a.ticks(8);
        assert!(!t.is_empty() && t.len() <= 9, "{t:?}");
        assert_eq!(duration(3725.0), "1 h 2 min");
        assert_eq!(duration(42.0), "42 s");
    }
}
