//! An org's usage (totals, a per-day chart in inline SVG, by model and by tier, recent requests,
//! CSV), billing, quickstart and audit log. All read-only.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use flex_shared::catalog::Provider;
use minijinja::context;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime, Time};

use super::org_pages::provider_name;
use super::session::Viewer;
use super::views::{money, thousands, when, when_str, Chrome};
use super::{Dash, Dashboard, OrgCtx, PageResult};
use crate::domain::BillingAggregate;
use crate::store::{UsageDailyRow, UsageTotals};
use crate::timefmt;

/// The ranges the usage page offers, in days.
const RANGES: [i64; 4] = [1, 7, 30, 90];

#[derive(Debug, Deserialize)]
pub(crate) struct RangeQuery {
    days: Option<i64>,
}

fn org_chrome<'a>(
    viewer: &'a Viewer,
    org: &'a OrgCtx,
    nav: &'static str,
    title: &str,
    notice: Option<String>,
) -> Chrome<'a> {
    Chrome {
        viewer,
        org: Some(org),
        nav,
        title: format!("{title} · {}", org.name),
        notice,
        error: None,
    }
}

/// `[from, to)`: the last `days` UTC days, today included.
fn range(days: i64, now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let today = now
        .to_offset(time::UtcOffset::UTC)
        .replace_time(Time::MIDNIGHT);
    (today - Duration::days(days - 1), today + Duration::days(1))
}

fn days_of(q: &RangeQuery) -> i64 {
    q.days.filter(|d| RANGES.contains(d)).unwrap_or(30)
}

fn day_key(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[derive(Debug, Clone, Default, Serialize)]
struct Sum {
    key: String,
    requests: u64,
    flex_requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost: i64,
    standard: i64,
    savings: i64,
}

impl Sum {
    fn add(&mut self, t: &UsageTotals) {
        self.requests += t.requests;
        self.flex_requests += t.flex_requests;
        self.input_tokens += t.input_tokens;
        self.output_tokens += t.output_tokens;
        self.cost = self.cost.saturating_add(t.cost_micros);
        self.standard = self.standard.saturating_add(t.standard_cost_micros);
        self.savings = self.standard.saturating_sub(self.cost);
    }
}

fn group(rows: &[UsageDailyRow], key: impl Fn(&UsageDailyRow) -> String) -> Vec<Sum> {
    let mut m: BTreeMap<String, Sum> = BTreeMap::new();
    for r in rows {
        let k = key(r);
        m.entry(k.clone())
            .or_insert_with(|| Sum {
                key: k,
                ..Sum::default()
            })
            .add(&r.totals);
    }
    m.into_values().collect()
}

/// A bar chart of each day's standard-tier cost, split into what was spent and what was saved,
/// as inline SVG (no script; a `<title>` per day for hover and screen readers).
fn chart_svg(days: &[Sum]) -> String {
    let (w, h, pad_l, pad_b) = (720.0_f64, 220.0_f64, 64.0_f64, 24.0_f64);
    let max = days
        .iter()
        .map(|d| d.standard.max(d.cost))
        .max()
        .unwrap_or(0)
        .max(1);
    let n = days.len().max(1) as f64;
    let slot = (w - pad_l) / n;
    let bar = (slot * 0.7).max(1.0);
    let plot_h = h - pad_b - 8.0;
    let scale = |v: i64| (v.max(0) as f64) / (max as f64) * plot_h;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-labelledby="chart-title chart-desc" preserveAspectRatio="none"><title id="chart-title">Spend and savings per day</title><desc id="chart-desc">Each bar is what the day's requests would have cost on the standard tier: the dark part is what they cost, the light part what flex saved.</desc>"#
    );
    let base = h - pad_b;
    let _ = write!(
        s,
        r#"<line class="axis" x1="{pad_l}" y1="{base}" x2="{w}" y2="{base}"/><text class="label" x="{}" y="14" text-anchor="end">{}</text><text class="label" x="{}" y="{base}" text-anchor="end">$0</text>"#,
        pad_l - 6.0,
        money(max),
        pad_l - 6.0
    );
    let every = (days.len() / 8).max(1);
    for (i, d) in days.iter().enumerate() {
        let x = pad_l + slot * i as f64 + (slot - bar) / 2.0;
        let spent = scale(d.cost);
        let saved = scale(d.savings);
        let _ = write!(
            s,
            r#"<g><title>{}: {} requests, spent {}, saved {} (standard {})</title><rect class="spend" x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{spent:.1}"/><rect class="saved" x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{saved:.1}"/></g>"#,
            d.key,
            d.requests,
            money(d.cost),
            money(d.savings),
            money(d.standard),
            base - spent,
            base - spent - saved,
        );
        if i % every == 0 {
            let _ = write!(
                s,
                r#"<text class="label" x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x + bar / 2.0,
                h - 6.0,
                d.key.get(5..).unwrap_or(&d.key)
            );
        }
    }
    s.push_str("</svg>");
    s
}

#[derive(Debug, Serialize)]
struct RecentRow {
    at: String,
    model: String,
    served_tier: String,
    reason: String,
    status: u16,
    outcome: String,
    tokens: String,
    cost: i64,
    standard: i64,
    savings: i64,
    key_name: String,
}

pub(crate) async fn usage_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
    Query(q): Query<RangeQuery>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let days = days_of(&q);
    let now = timefmt::now();
    let (from, to) = range(days, now);
    let store = dash.cp.store();
    let rows = store.usage_daily(&org.org_id, from, to).await?;
    let mut total = Sum::default();
    for r in &rows {
        total.add(&r.totals);
    }
    let by_day = group(&rows, |r| r.day.clone());
    // Every day of the range, empty ones included.
    let mut per_day: Vec<Sum> = Vec::new();
    let mut d = from;
    while d < to {
        let key = day_key(d);
        per_day.push(
            by_day
                .iter()
                .find(|s| s.key == key)
                .cloned()
                .unwrap_or(Sum {
                    key,
                    ..Sum::default()
                }),
        );
        d += Duration::days(1);
    }
    let state = dash.cp.state();
    let recent: Vec<RecentRow> = store
        .usage_recent(&org.org_id, 25)
        .await?
        .into_iter()
        .map(|r| RecentRow {
            at: when(r.received_at),
            key_name: state
                .api_keys
                .get(&r.key_id)
                .map(|k| k.name.clone())
                .unwrap_or_default(),
            model: r.model,
            served_tier: r.served_tier,
            reason: r.reason,
            status: r.status,
            outcome: r.outcome,
            tokens: format!(
                "{} in / {} out",
                thousands(i64::try_from(r.input_tokens).unwrap_or(i64::MAX)),
                thousands(i64::try_from(r.output_tokens).unwrap_or(i64::MAX))
            ),
            cost: r.cost_micros,
            standard: r.standard_cost_micros,
            savings: r.standard_cost_micros.saturating_sub(r.cost_micros),
        })
        .collect();
    let flex_share = (total.flex_requests * 100)
        .checked_div(total.requests)
        .unwrap_or(0);
    let notice = dash.flash.take(&viewer.csrf).notice;
    dash.page(
        "usage.html",
        org_chrome(&viewer, &org, "usage", "Usage", notice),
        context! {
            days,
            ranges => RANGES,
            from => day_key(from),
            to => day_key(to - Duration::days(1)),
            total,
            flex_share,
            chart => minijinja::Value::from_safe_string(chart_svg(&per_day)),
            per_day => per_day.iter().rev().filter(|d| d.requests > 0).collect::<Vec<_>>(),
            by_model => group(&rows, |r| r.model.clone()),
            by_tier => group(&rows, |r| r.served_tier.clone()),
            recent,
        },
    )
}

/// A CSV field: quoted when it has to be, and never read as a formula by a spreadsheet.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Micro-dollars as a plain decimal for a spreadsheet (`0.000123`, `-3.000000`).
fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let a = micros.unsigned_abs();
    format!("{sign}{}.{:06}", a / 1_000_000, a % 1_000_000)
}

pub(crate) async fn usage_csv(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
    Query(q): Query<RangeQuery>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let (from, to) = range(days_of(&q), timefmt::now());
    let rows = dash.cp.store().usage_daily(&org.org_id, from, to).await?;
    let mut out = String::from(
        "date,model,served_tier,requests,flex_requests,input_tokens,output_tokens,cost_usd,standard_cost_usd,savings_usd\n",
    );
    for r in &rows {
        let t = &r.totals;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            csv_field(&r.day),
            csv_field(&r.model),
            csv_field(&r.served_tier),
            t.requests,
            t.flex_requests,
            t.input_tokens,
            t.output_tokens,
            usd(t.cost_micros),
            usd(t.standard_cost_micros),
            usd(t.standard_cost_micros.saturating_sub(t.cost_micros))
        );
    }
    let name = format!(
        "attachment; filename=\"flex-usage-{}-{}-{}.csv\"",
        org.org_id,
        day_key(from),
        day_key(to - Duration::days(1))
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        out,
    )
        .into_response())
}

/// Basis points as a percentage: 1000 → `10%`, 850 → `8.5%`, 1 → `0.01%`.
fn percent(bps: u32) -> String {
    let whole = bps / 100;
    match bps % 100 {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

#[derive(Debug, Serialize)]
struct InvoiceRow {
    invoice_id: String,
    period: String,
    amount: i64,
    paid: i64,
    open: i64,
    due: String,
    status: &'static str,
    savings: i64,
}

pub(crate) async fn billing_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let state = dash.cp.state();
    let now = timefmt::now();
    let default = BillingAggregate::default();
    let b = state.billing.get(&org.org_id).unwrap_or(&default);
    let invoices: Vec<InvoiceRow> = b
        .invoices
        .iter()
        .rev()
        .map(|i| InvoiceRow {
            invoice_id: i.invoice_id.clone(),
            period: format!("{} – {}", day_key(i.period_from), day_key(i.period_to)),
            amount: i.amount_micros,
            paid: i.paid_micros,
            open: i.open_micros(),
            due: when(i.due_at),
            status: i.status_at(now),
            savings: i.savings_micros,
        })
        .collect();
    let notice = dash.flash.take(&viewer.csrf).notice;
    dash.page(
        "billing.html",
        org_chrome(&viewer, &org, "billing", "Billing", notice),
        context! {
            status => b.status.as_str(),
            past_due => b.status == crate::domain::BillingStatus::PastDue,
            reason => b.status_reason.clone(),
            plan => b.plan.clone(),
            fee => percent(b.fee_bps),
            balance => b.balance_due_micros(),
            invoiced => b.invoiced_micros(),
            paid => b.paid_micros,
            invoices,
        },
    )
}

pub(crate) async fn quickstart_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let state = dash.cp.state();
    let configured = dash.cfg.api_base_url.clone();
    let base_url = configured
        .clone()
        .unwrap_or_else(|| "https://YOUR-FLEXINFERENCE-HOST/v1".to_string());
    let root_url = base_url.trim_end_matches("/v1").to_string();
    let providers: Vec<_> = Provider::ALL
        .iter()
        .map(|p| {
            context! {
                name => provider_name(*p),
                set => state.provider_keys.get(&(org.org_id.clone(), p.as_str().to_string())).is_some_and(|k| k.sealed.is_some()),
            }
        })
        .collect();
    let any_provider = state
        .provider_keys
        .values()
        .any(|k| k.org_id == org.org_id && k.sealed.is_some());
    let active_keys = state
        .api_keys
        .values()
        .filter(|k| k.org_id == org.org_id && k.status_at(timefmt::now()) == "active")
        .count();
    let notice = dash.flash.take(&viewer.csrf).notice;
    dash.page(
        "quickstart.html",
        org_chrome(&viewer, &org, "quickstart", "Quickstart", notice),
        context! {
            base_url,
            root_url,
            base_url_configured => configured.is_some(),
            providers,
            any_provider,
            active_keys,
        },
    )
}

#[derive(Debug, Serialize)]
struct AuditRow {
    at: String,
    actor: String,
    event_type: String,
    summary: String,
}

/// At most this many events on the audit page (newest first).
const AUDIT_LIMIT: usize = 500;

fn actor_label(dash: &Dashboard, actor: &str) -> String {
    if let Some(user_id) = actor.strip_prefix("user:") {
        return dash
            .cp
            .state()
            .accounts
            .users
            .get(user_id)
            .map(|u| u.email.clone())
            .unwrap_or_else(|| actor.to_string());
    }
    match actor {
        "admin" => "operator (flex admin)".to_string(),
        "system" => "FlexInference".to_string(),
        other => other.to_string(),
    }
}

pub(crate) async fn audit_page(
    State(dash): State<Dash>,
    viewer: Viewer,
    Path(org): Path<String>,
) -> PageResult {
    let org = dash.org(&viewer, &org).await?;
    let events = dash.cp.list_audit_events(&org.org_id).await?;
    let total = events.len();
    let rows: Vec<AuditRow> = events
        .iter()
        .rev()
        .take(AUDIT_LIMIT)
        .map(|e| AuditRow {
            at: when_str(&e.recorded_at),
            actor: actor_label(&dash, &e.actor),
            event_type: e.event_type.clone(),
            summary: e.summary.clone(),
        })
        .collect();
    let notice = dash.flash.take(&viewer.csrf).notice;
    dash.page(
        "audit.html",
        org_chrome(&viewer, &org, "audit", "Audit log", notice),
        context! { events => rows, total, limit => AUDIT_LIMIT },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("gpt-5.5"), "gpt-5.5");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(usd(123), "0.000123");
        assert_eq!(usd(-3_000_000), "-3.000000");
        assert_eq!(percent(1000), "10%");
        assert_eq!(percent(850), "8.5%");
        assert_eq!(percent(1), "0.01%");
    }

    #[test]
    fn the_range_ends_with_today() {
        let now = timefmt::parse("2026-03-10T15:00:00Z").unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let (from, to) = range(7, now);
        assert_eq!(day_key(from), "2026-03-04");
        assert_eq!(day_key(to), "2026-03-11");
        let chart = chart_svg(&[Sum {
            key: "2026-03-10".into(),
            requests: 2,
            cost: 50,
            standard: 100,
            savings: 50,
            ..Sum::default()
        }]);
        assert!(chart.starts_with("<svg"), "{chart}");
        assert!(chart.contains("spent $0.00005, saved $0.00005"), "{chart}");
    }
}
