//! The status page at `/`: server-rendered HTML of the recent runs (phases, steps,
//! per-node progress), the last success of each plan and the snapshots of the
//! watched stores; a little plain JavaScript keeps it live from `/v1/events`.

use super::{RunView, Service};
use crate::checks::human;
use crate::redact::redact;
use crate::state::Status;
use std::fmt::Write;

/// How many runs the page shows.
const RUNS_SHOWN: usize = 10;

/// Escape text for HTML (element content and quoted attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
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

fn ago(unix: i64) -> String {
    let secs = (chrono::Utc::now().timestamp() - unix).max(0);
    let d = std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    format!("{} ago", humantime::format_duration(d))
}

fn rfc3339_unix(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp())
}

/// One run: its heading and a table of steps per phase. The same markup is sent
/// as a fragment (`/runs/{id}/fragment`) when the script redraws a run.
pub fn run_block(v: &RunView) -> String {
    let r = &v.run;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<div class="run" id="run-{id}" data-run="{id}" data-status="{st}"><h3>run {id} · {plan} · snapshot {snap} · <span class="run-status st-{st}">{st}</span></h3><p class="meta">store {store} · started {created}{fin}</p>"#,
        id = r.id,
        st = r.status,
        plan = esc(&r.plan),
        snap = esc(&r.snapshot),
        store = esc(&redact(&r.store)),
        created = esc(&r.created_at),
        fin = r
            .finished_at
            .as_deref()
            .map(|f| format!(" · finished {}", esc(f)))
            .unwrap_or_default(),
    );
    if let Some(s) = &v.summary {
        let _ = write!(
            h,
            r#"<p class="summary">{} node(s), {} file(s), {} of data, {} stored, {:.1} s</p>"#,
            s.nodes,
            s.files,
            human(s.bytes),
            human(s.stored_bytes),
            s.duration_secs
        );
    }
    if let Some(e) = &r.error {
        let _ = write!(h, r#"<p class="error">{}</p>"#, esc(&redact(e)));
    }
    for p in &v.phases {
        let _ = write!(
            h,
            r#"<div class="phase" data-phase="{name}"><h4>{name}{strategy} <span class="phase-status st-{st}">{st}</span></h4><table>"#,
            name = esc(&p.name),
            strategy = p
                .strategy
                .as_deref()
                .map(|s| format!(" ({})", esc(s)))
                .unwrap_or_default(),
            st = p.status,
        );
        for s in &p.steps {
            let st = s.step.status;
            let (value, max) = match (s.bytes_done, s.bytes_total) {
                (Some(d), Some(t)) if t > 0 => (d, t),
                (_, _) if st == Status::Complete => (1, 1),
                (Some(d), _) => (d, 0),
                _ => (0, 0),
            };
            let bytes = match (s.bytes_done, s.bytes_total) {
                (Some(d), Some(t)) => format!("{} / {}", human(d), human(t)),
                (Some(d), None) => human(d),
                _ => String::new(),
            };
            let _ = write!(
                h,
                r#"<tr class="step st-{st}" data-step="{id}" data-status="{st}" data-seen="{st}"><td class="id">{id}</td><td class="status">{st}</td><td class="attempts">{att}</td><td><progress value="{value}" max="{max}"></progress> <span class="bytes">{bytes}</span></td><td class="err">{err}</td></tr>"#,
                id = esc(&s.step.id),
                att = s.step.attempts,
                max = max.max(1),
                err = s
                    .step
                    .error
                    .as_deref()
                    .map(|e| esc(&redact(e)))
                    .unwrap_or_default(),
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("</div>");
    h
}

/// The whole page.
pub async fn render(svc: &Service) -> crate::Result<String> {
    let mut h = String::from(HEAD);
    h.push_str(&last_section(svc)?);
    h.push_str(r#"<section id="runs"><h2>Runs <span id="live">connecting…</span></h2>"#);
    for r in svc.runs(RUNS_SHOWN)? {
        match svc.run_view(r.id) {
            Ok(v) => h.push_str(&run_block(&v)),
            Err(e) => {
                let _ = write!(
                    h,
                    "<p class=\"error\">run {}: {}</p>",
                    r.id,
                    esc(&redact(&e.to_string()))
                );
            }
        }
    }
    h.push_str("</section>");
    h.push_str(&snapshots_section(svc).await);
    h.push_str(SCRIPT);
    h.push_str("</body></html>\n");
    Ok(h)
}

/// The newest complete run of each plan and store, with its age.
pub fn last_section(svc: &Service) -> crate::Result<String> {
    let mut h = String::from(r#"<section id="last"><h2>Last successful run per plan</h2>"#);
    let last = svc.last_successes()?;
    if last.is_empty() {
        h.push_str("<p>none yet</p>");
    } else {
        h.push_str("<table><tr><th>plan</th><th>store</th><th>snapshot</th><th>finished</th></tr>");
        for r in last {
            let when = r.finished_at.clone().unwrap_or_default();
            let age = rfc3339_unix(&when).map(ago).unwrap_or_default();
            let _ = write!(
                h,
                r#"<tr class="last" data-plan="{plan}"><td>{plan}</td><td>{store}</td><td>{snap}</td><td title="{when}">{age}</td></tr>"#,
                plan = esc(&r.plan),
                store = esc(&redact(&r.store)),
                snap = esc(&r.snapshot),
                when = esc(&when),
                age = esc(&age),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
    Ok(h)
}

/// The snapshots of the watched stores, newest first (also sent as a fragment,
/// `/sections/fragment`, when a run ends).
pub async fn snapshots_section(svc: &Service) -> String {
    let mut h = String::from(r#"<section id="snapshots"><h2>Snapshots</h2>"#);
    if svc.cfg.stores.is_empty() {
        h.push_str("<p>no store watched (start the server with --store URL)</p>");
    }
    for store in &svc.cfg.stores {
        let _ = write!(h, "<h3>{}</h3>", esc(&redact(store)));
        match svc.snapshots(store).await {
            Err(e) => {
                let _ = write!(h, "<p class=\"error\">{}</p>", esc(&redact(&e.to_string())));
            }
            Ok(list) => {
                h.push_str("<table><tr><th>snapshot</th><th>state</th><th>age</th><th>data</th><th>stored</th><th>verified</th></tr>");
                for s in list.iter().rev() {
                    let state = if s.complete { "complete" } else { "incomplete" };
                    let age = crate::snapshots::when(s).map(ago).unwrap_or_default();
                    let verified = match &s.verified {
                        None => "never".to_string(),
                        Some(v) => format!(
                            "{} ({}) {}",
                            if v.ok { "ok" } else { "FAILED" },
                            v.mode,
                            rfc3339_unix(&v.at).map(ago).unwrap_or_default()
                        ),
                    };
                    let _ = write!(
                        h,
                        r#"<tr class="snapshot" data-name="{name}"><td>{name}</td><td>{state}</td><td>{age}</td><td>{data}</td><td>{stored}</td><td>{verified}</td></tr>"#,
                        name = esc(&s.name),
                        age = esc(&age),
                        data = s.bytes.map(human).unwrap_or_default(),
                        stored = human(s.stored_bytes),
                        verified = esc(&verified),
                    );
                }
                h.push_str("</table>");
            }
        }
    }
    h.push_str("</section>");
    h
}

const HEAD: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>cairn</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; } h3 { font-size: 1em; } h4 { margin: .6em 0 .2em; font-size: .95em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
.run { border: 1px solid #ddd; border-radius: 4px; padding: .2em .8em .8em; margin: .8em 0; }
.meta, .summary { color: #555; margin: .2em 0; } .error, .err { color: #a00; }
.st-COMPLETE { color: #080; } .st-RUNNING { color: #05a; font-weight: bold; } .st-FAILED, .st-REFUSED { color: #a00; }
.st-CANCELLED, .st-INTERRUPTED { color: #a60; } .st-PENDING, .st-SKIPPED { color: #777; }
progress { width: 14em; } #live { font-size: .75em; color: #777; font-weight: normal; }
</style></head><body><h1>cairn</h1>
"#;

/// Asked for when a token is required and none was given: the token goes into a
/// same-site cookie (the events stream cannot send a header).
pub const LOGIN: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cairn: token</title></head><body>
<h1>cairn</h1><form id="f"><label>Token <input id="t" type="password" autocomplete="off"></label> <button>Open</button></form>
<script>
document.getElementById('f').addEventListener('submit', function (e) {
  e.preventDefault();
  document.cookie = 'cairn_token=' + encodeURIComponent(document.getElementById('t').value) + '; path=/; SameSite=Strict' + (location.protocol === 'https:' ? '; Secure' : '');
  location.reload();
});
</script></body></html>
"#;

const SCRIPT: &str = r#"<script>
(function () {
  'use strict';
  var live = document.getElementById('live');
  function human(n) {
    var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + ' ' + u[i];
  }
  function row(block, id) {
    var rows = block.querySelectorAll('tr[data-step]');
    for (var i = 0; i < rows.length; i++) { if (rows[i].dataset.step === id) return rows[i]; }
    return null;
  }
  function seen(r, status) {
    var s = r.dataset.seen ? r.dataset.seen.split(' ') : [];
    if (s[s.length - 1] !== status) { s.push(status); }
    r.dataset.seen = s.join(' ');
  }
  function setStep(block, id, status, total, done) {
    var r = row(block, id);
    if (!r) { return; }
    if (status) {
      r.dataset.status = status;
      r.className = 'step st-' + status;
      r.querySelector('.status').textContent = status;
      seen(r, status);
      if (status === 'COMPLETE') { var b0 = r.querySelector('progress'); b0.value = b0.max; }
    }
    var bar = r.querySelector('progress');
    if (total) { bar.max = total; }
    if (done !== undefined && done !== null) {
      bar.value = done;
      r.querySelector('.bytes').textContent = human(done) + (total ? ' / ' + human(total) : '');
    }
    var rs = block.querySelector('.run-status');
    if (status === 'RUNNING' && rs.textContent !== 'RUNNING') {
      rs.textContent = 'RUNNING'; rs.className = 'run-status st-RUNNING'; block.dataset.status = 'RUNNING';
    }
  }
  function redraw(id) {
    return fetch('runs/' + id + '/fragment', { credentials: 'same-origin' }).then(function (res) {
      if (!res.ok) { return; }
      return res.text().then(function (html) {
        var t = document.createElement('template');
        t.innerHTML = html.trim();
        var el = t.content.firstElementChild;
        var old = document.getElementById('run-' + id);
        if (old) {
          var rows = old.querySelectorAll('tr[data-step]');
          for (var i = 0; i < rows.length; i++) {
            var n = row(el, rows[i].dataset.step);
            if (n) { n.dataset.seen = rows[i].dataset.seen; seen(n, n.dataset.status); }
          }
          old.replaceWith(el);
        } else {
          var h = document.querySelector('#runs h2');
          h.insertAdjacentElement('afterend', el);
        }
      });
    });
  }
  function redrawSnapshots() {
    fetch('sections/fragment', { credentials: 'same-origin' }).then(function (res) {
      if (!res.ok) { return; }
      return res.text().then(function (html) {
        var t = document.createElement('template');
        t.innerHTML = html.trim();
        ['last', 'snapshots'].forEach(function (id) {
          var fresh = t.content.getElementById(id), old = document.getElementById(id);
          if (fresh && old) { old.replaceWith(fresh); }
        });
      });
    });
  }
  function redrawActive() {
    var runs = document.querySelectorAll('.run');
    for (var i = 0; i < runs.length; i++) {
      var st = runs[i].dataset.status;
      if (st === 'RUNNING' || st === 'PENDING') { redraw(runs[i].dataset.run); }
    }
  }
  var es = new EventSource('v1/events');
  es.onopen = function () { live.textContent = 'live'; redrawActive(); };
  es.onerror = function () { live.textContent = 'reconnecting…'; };
  es.onmessage = function (m) {
    var ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    if (ev.type === 'lagged') { redrawActive(); return; }
    var block = document.getElementById('run-' + ev.run);
    if (ev.type === 'run_finished') { redrawSnapshots(); }
    if (!block || ev.type === 'run_started' || ev.type === 'run_finished') { redraw(ev.run); return; }
    if (ev.type === 'step_started') { setStep(block, ev.step, 'RUNNING', ev.total, 0); }
    else if (ev.type === 'bytes') { setStep(block, ev.step, null, ev.total, ev.done); }
    else if (ev.type === 'step_finished') { setStep(block, ev.step, ev.status); }
  };
})();
</script>
"#;
