//! HTML for people: escaping, numbers as people read them, the page frame.
//!
//! Every value that came from outside (customer ids, traits, campaign
//! files, plugin errors) goes through [`esc`]; pages are built from
//! strings, so that is the one rule that keeps them safe.

use std::fmt::Write as _;

use crate::config::Role;
use crate::stats::Interval;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a value for a URL's query string.
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// A count or amount, short: 950, 1.2k, 3.4M (a minus sign, not a hyphen).
pub fn short(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    let body = if a >= 1e9 {
        format!("{:.1}B", a / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", a / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", a / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", a / 1e3)
    } else if a >= 100.0 || a == a.trunc() {
        format!("{a:.0}")
    } else {
        format!("{a:.1}")
    };
    if v < 0.0 && body != "0" {
        format!("−{body}")
    } else {
        body
    }
}

/// A signed [`short`]: +1.2k, −30.
pub fn signed(v: f64) -> String {
    if v > 0.0 {
        format!("+{}", short(v))
    } else {
        short(v)
    }
}

pub fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "n/a".into(), f)
}

/// A rate as a percentage: 3.4%.
pub fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

/// A difference of rates in percentage points: +1.2 pt.
pub fn pts(v: f64) -> String {
    let p = v * 100.0;
    if p > 0.0 {
        format!("+{p:.1} pt")
    } else {
        format!("{} pt", format!("{p:.1}").replace('-', "−"))
    }
}

/// An interval as an interval: [−1.2, +3.4] with `f` for each end.
pub fn interval(iv: Option<Interval>, f: impl Fn(f64) -> String) -> String {
    iv.map_or_else(
        || "n/a".into(),
        |[lo, hi]| format!("[{}, {}]", f(lo), f(hi)),
    )
}

/// A point and its interval as people read them: "+12 (±30)".
pub fn plus_minus(v: Option<f64>, iv: Option<Interval>) -> String {
    match (v, iv) {
        (Some(v), Some([lo, hi])) => format!("{} ±{}", signed(v), short((hi - lo) / 2.0)),
        (Some(v), None) => signed(v),
        _ => "n/a".into(),
    }
}

/// Which page the navigation marks as current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Campaigns,
    Customer,
    Contact,
    Operations,
    None,
}

/// What a page needs to know about who is looking.
pub struct Viewer<'a> {
    pub name: &'a str,
    pub role: Role,
    pub csrf: &'a str,
}

impl Viewer<'_> {
    pub fn reads_results(&self) -> bool {
        matches!(self.role, Role::Viewer | Role::Operator)
    }

    pub fn is_agent(&self) -> bool {
        matches!(self.role, Role::Agent | Role::Operator)
    }

    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }

    /// The hidden field every state-changing form carries.
    pub fn csrf_field(&self) -> String {
        format!(
            r#"<input type="hidden" name="csrf" value="{}">"#,
            esc(self.csrf)
        )
    }
}

/// A whole page: head, navigation for the viewer's role, `body`.
pub fn page(title: &str, nav: Nav, who: Option<&Viewer<'_>>, body: &str) -> String {
    let mut links = String::new();
    if let Some(v) = who {
        let mut item = |n: Nav, href: &str, label: &str| {
            let current = if n == nav {
                r#" aria-current="page""#
            } else {
                ""
            };
            let _ = write!(links, r#"<li><a href="{href}"{current}>{label}</a></li>"#);
        };
        if v.reads_results() {
            item(Nav::Overview, "/ui/overview", "Overview");
            item(Nav::Campaigns, "/ui/campaigns", "Campaigns");
        }
        item(Nav::Customer, "/ui/customer", "Customer");
        if v.is_agent() {
            item(Nav::Contact, "/ui/contact", "Contact centre");
        }
        if v.is_operator() {
            item(Nav::Operations, "/ui/operations", "Operations");
        }
        let _ = write!(
            links,
            r#"<li class="who">{} <span class="badge">{}</span></li><li><form method="post" action="/ui/logout">{}<button type="submit" class="link">Log out</button></form></li>"#,
            esc(v.name),
            v.role.name(),
            v.csrf_field()
        );
    }
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Nudge</title>
<link rel="stylesheet" href="/ui/assets/style.css">
<script src="/ui/assets/app.js" defer></script>
</head>
<body>
<header><a class="brand" href="/ui/">Nudge</a><nav aria-label="Main"><ul>{links}</ul></nav></header>
<main id="main">
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"#,
        title = esc(title),
    )
}

/// The colour class of a verdict.
pub fn status_class(status: &str) -> &'static str {
    match status {
        "win" => "good",
        "loss" => "bad",
        "inconclusive" => "neutral",
        _ => "muted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_open_markup() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(url("a b/<c>"), "a%20b%2F%3Cc%3E");
    }

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(short(950.0), "950");
        assert_eq!(short(1234.0), "1.2k");
        assert_eq!(short(-12_600.0), "−13k");
        assert_eq!(short(3_400_000.0), "3.4M");
        assert_eq!(short(2.25), "2.2");
        assert_eq!(signed(3.0), "+3");
        assert_eq!(pct(0.034), "3.4%");
        assert_eq!(pts(0.012), "+1.2 pt");
        assert_eq!(pts(-0.012), "−1.2 pt");
        assert_eq!(plus_minus(Some(12.0), Some([-18.0, 42.0])), "+12 ±30");
        assert_eq!(interval(None, short), "n/a");
    }
}
