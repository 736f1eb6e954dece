//! `/metrics`: the catalog's state in the Prometheus text format (0.0.4),
//! computed at scrape time. docs/operations.md, "Metrics", lists every
//! metric.

use std::time::Instant;

use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Gauge, Opts, TextEncoder};

use crate::catalog::Session;
use crate::error::Result;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn gauge(name: &str, help: &str, v: f64) -> MetricFamily {
    let g = Gauge::with_opts(Opts::new(name, help)).expect("static metric name and help are valid");
    g.set(v);
    use prometheus::core::Collector;
    g.collect().remove(0)
}

/// Everything the catalog holds, as metric families.
fn collect(_db: &mut postgres::Client) -> Result<Vec<MetricFamily>> {
    Ok(Vec::new())
}

/// One scrape: the catalog's metrics, plus whether the catalog could be
/// read and how long it took (so a broken catalog shows as a metric).
pub fn scrape(session: &mut Session) -> Vec<u8> {
    let started = Instant::now();
    let (mut families, up) = match session.with(collect) {
        Ok(f) => (f, 1.0),
        Err(e) => {
            tracing::warn!("/metrics: cannot read the catalog: {e}");
            (Vec::new(), 0.0)
        }
    };
    families.push(gauge(
        "pg_backup_catalog_up",
        "Whether the last scrape could read the catalog (1) or not (0).",
        up,
    ));
    families.push(gauge(
        "pg_backup_scrape_duration_seconds",
        "Seconds this scrape took to read the catalog.",
        started.elapsed().as_secs_f64(),
    ));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!("/metrics: encoding failed: {e}");
    }
    out
}
