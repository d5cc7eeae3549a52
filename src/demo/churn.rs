//! `aos-cm demo --churn SECS`: after the bundled example has converged, the simulated cloud
//! keeps changing its mind. Every period it sends a new desired state (four variants in turn:
//! the example, one more instance of the first service, the example again, the example without
//! its last service) and waits for the unit to converge on it; every sixth period it also
//! drops the WebSocket connection (the CM runs service discovery again and reconnects), and
//! every sixth period, three periods later, one simulated SM loses its stream and connects
//! again. This is what `benches/soak.py` runs for an hour while it samples the process's RSS
//! and descriptors.
//!
//! The simulators' records (frames, received message kinds) are cleared after each period so
//! that the process's memory reflects the CM, not the test doubles' logs.

use super::{DemoError, connect_sm, setup};
use crate::daemon::Daemon;
use crate::sim::cloud::SimCloud;
use crate::sim::sm::SimSm;
use crate::sim::unit;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};

/// How long and how often the cloud changes the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Churn {
    pub every: Duration,
    pub run_for: Duration,
}

/// The desired state the cloud sends in period `n`, tagged with correlation ID `churn-n`.
pub fn variant(base: &Value, n: u64) -> Value {
    let mut data = base.clone();
    match n % 4 {
        1 => {
            if let Some(first) = data["instances"]
                .as_array_mut()
                .and_then(|list| list.first_mut())
            {
                let count = first["numInstances"].as_u64().unwrap_or(0);
                first["numInstances"] = Value::from(count + 1);
            }
        }
        3 => {
            // The last service item and its instance request go away.
            let last_service = data["items"].as_array().and_then(|items| {
                items
                    .iter()
                    .rev()
                    .find(|i| i["item"]["type"] == "service")
                    .and_then(|i| i["item"]["id"].as_str())
                    .map(str::to_owned)
            });
            if let Some(id) = last_service {
                if let Some(items) = data["items"].as_array_mut() {
                    items.retain(|i| i["item"]["id"] != id.as_str());
                }
                if let Some(list) = data["instances"].as_array_mut() {
                    list.retain(|i| i["item"]["id"] != id.as_str());
                }
            }
        }
        _ => {}
    }
    data["correlationId"] = Value::from(format!("churn-{n}"));
    data
}

/// What one period did.
#[derive(Debug, Default)]
struct Tally {
    periods: u64,
    converged: u64,
    cloud_drops: u64,
    sm_reconnects: u64,
    slowest: Duration,
}

/// Runs the churn until `churn.run_for` has passed; Err only when the setup breaks (a period
/// that does not converge in time is reported and counted, and the next one starts).
pub async fn run(
    churn: Churn,
    daemon: &Daemon,
    sims: &mut [SimSm],
    cloud: &SimCloud,
    base: &Value,
    out: &mut (impl Write + Send),
) -> Result<(), DemoError> {
    let _ = writeln!(
        out,
        "\nchurn: a new desired state every {} s for {} s; the cloud connection drops every sixth period, an SM reconnects every sixth",
        churn.every.as_secs_f64(),
        churn.run_for.as_secs()
    );
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut n = 0u64;
    while started.elapsed() < churn.run_for {
        n += 1;
        let period_start = tokio::time::Instant::now();
        let at = started.elapsed();
        let deadline = period_start + churn.every;
        let mut events = Vec::new();
        if n.is_multiple_of(6) {
            // The next desired state goes into the session the CM opens after the drop. (Not
            // "wait until disconnected": the CM can be back before the simulated cloud has
            // finished with the old session, and then no moment without a session is seen.)
            let sessions = cloud.sessions();
            cloud.drop_connection();
            let _ = tokio::time::timeout_at(deadline, cloud.wait_sessions(sessions + 1)).await;
            tally.cloud_drops += 1;
            events.push("cloud connection dropped".to_owned());
        }
        if n % 6 == 3 && !sims.is_empty() {
            let index = ((n / 6) as usize) % sims.len();
            let sim = &mut sims[index];
            sim.disconnect();
            connect_sm(daemon, sim).await?;
            tally.sm_reconnects += 1;
            events.push(format!("SM {} reconnected", sim.node_id));
        }
        let data = variant(base, n);
        let correlation = format!("churn-{n}");
        let sent = send_when_connected(cloud, data, deadline).await;
        let done = sent && converged_on(daemon, &correlation, deadline).await?;
        let took = period_start.elapsed();
        tally.periods += 1;
        let outcome = if done {
            tally.converged += 1;
            tally.slowest = tally.slowest.max(took);
            format!("converged in {} ms", took.as_millis())
        } else if sent {
            "did not converge within the period".to_owned()
        } else {
            "the cloud connection was not back within the period".to_owned()
        };
        let events = if events.is_empty() {
            String::new()
        } else {
            format!(" ({})", events.join(", "))
        };
        let _ = writeln!(
            out,
            "[{:>7.1} s] period {n}: variant {}{events}: {outcome}",
            at.as_secs_f64(),
            n % 4
        );
        cloud.clear_records();
        for sim in sims.iter() {
            sim.clear_records();
        }
        tokio::time::sleep_until(deadline).await;
    }
    let _ = writeln!(
        out,
        "\nchurn done: {} periods, {} converged within their period (slowest {} ms), {} cloud drops, {} SM reconnects",
        tally.periods,
        tally.converged,
        tally.slowest.as_millis(),
        tally.cloud_drops,
        tally.sm_reconnects
    );
    if tally.converged < tally.periods {
        return Err(DemoError::Setup(format!(
            "{} of {} churn periods did not converge within {} s",
            tally.periods - tally.converged,
            tally.periods,
            churn.every.as_secs_f64()
        )));
    }
    Ok(())
}

/// Sends `data` once the cloud has a session with the CM; false if none by `deadline`.
async fn send_when_connected(
    cloud: &SimCloud,
    data: Value,
    deadline: tokio::time::Instant,
) -> bool {
    tokio::time::timeout_at(deadline, cloud.wait_connected(true))
        .await
        .is_ok()
        && cloud.send_data(data).is_some()
}

/// Waits until the unit has converged on the desired state with `correlation`; false at
/// `deadline`.
async fn converged_on(
    daemon: &Daemon,
    correlation: &str,
    deadline: tokio::time::Instant,
) -> Result<bool, DemoError> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let waited = unit::wait_for(&daemon.store, left, |snap| {
        snap.desired
            .as_ref()
            .is_some_and(|d| d.correlation_id.as_deref() == Some(correlation))
            && unit::converged(snap)
    })
    .await;
    match waited {
        Ok(_) => Ok(true),
        Err(unit::SimUnitError::Store(e)) => Err(setup("reading the store")(e)),
        // Out of time.
        Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "messageType": "desiredStatus",
            "items": [
                {"item": {"id": "a", "type": "service"}, "version": "1"},
                {"item": {"id": "l", "type": "layer"}, "version": "1"},
                {"item": {"id": "b", "type": "service"}, "version": "1"},
                {"item": {"id": "f", "type": "component"}, "version": "1"},
            ],
            "instances": [
                {"item": {"id": "a"}, "numInstances": 2},
                {"item": {"id": "b"}, "numInstances": 1},
            ],
        })
    }

    #[test]
    fn the_variants_scale_the_first_request_and_drop_the_last_service_in_turn() {
        let base = base();
        let v0 = variant(&base, 4);
        assert_eq!(v0["correlationId"], "churn-4");
        assert_eq!(v0["instances"], base["instances"]);
        assert_eq!(v0["items"], base["items"]);

        let v1 = variant(&base, 5);
        assert_eq!(v1["instances"][0]["numInstances"], 3);
        assert_eq!(v1["instances"][1]["numInstances"], 1);
        assert_eq!(v1["items"], base["items"]);

        let v3 = variant(&base, 7);
        let ids: Vec<&str> = v3["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["item"]["id"].as_str())
            .collect();
        assert_eq!(ids, ["a", "l", "f"]);
        assert_eq!(v3["instances"].as_array().map(Vec::len), Some(1));
        assert_eq!(v3["instances"][0]["item"]["id"], "a");
        // The base is left as it was.
        assert_eq!(base["instances"][0]["numInstances"], 2);
    }
}
