//! Tests of the journal alerts task (issue 8 acceptance): hand-written journalctl JSON export
//! lines to exact v7 alerts, restart from the stored cursor, and a dying child process.

use super::*;
use crate::api::journal::{CommandSource, JournalLines};
use crate::model::{Digest, InstancePlacement, InstanceState, ReportedInstance, Reservation};
use serde_json::{Value, json};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, BufReader, ReadBuf};
use tokio::task::JoinHandle;

const NODE: &str = "main-node";
/// `sm_instance_id` of item-uuid/subject-uuid/2, computed independently (Python's
/// `uuid.uuid3(uuid.NAMESPACE_OID, "item-uuid:subject-uuid:2")`).
const ID_2: &str = "08a6ce43-0bd2-3cd2-9667-39fd2dbb0618";
/// `legacy_sm_instance_id` of item-uuid/subject-uuid/3 (sha256 of "item-uuid:subject-uuid:3").
const LEGACY_ID_3: &str = "4283441f9ceeb4f312d6195579582ba04f5e4b4e0751c5f4fea6726d4a8140be";

fn open_store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cm.redb")).unwrap();
    (dir, Arc::new(store))
}

fn placement(ident: &InstanceIdent, version: &str) -> InstancePlacement {
    InstancePlacement {
        ident: ident.clone(),
        node_id: NODE.into(),
        runtime_id: "crun-1".into(),
        runtime_type: "crun".into(),
        manifest_digest: Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap(),
        version: version.into(),
        uid: 5000,
        gid: 5000,
        requested: Reservation::default(),
        env: Vec::new(),
    }
}

fn reported(ident: &InstanceIdent, version: &str, preinstalled: bool) -> ReportedInstance {
    ReportedInstance {
        ident: ident.clone(),
        node_id: NODE.into(),
        runtime_id: "crun-1".into(),
        version: version.into(),
        state: InstanceState::Active,
        error: None,
        preinstalled,
    }
}

/// Instance 2 runs (reported at 1.2.3, placed at 1.2.2: the SM's report wins); instance 3 is
/// placed only.
fn seed_instances(store: &Store) {
    let i2 = InstanceIdent::new("item-uuid", "subject-uuid", 2);
    let i3 = InstanceIdent::new("item-uuid", "subject-uuid", 3);
    store
        .write(|tx| {
            tx.put_placement(&placement(&i2, "1.2.2"))?;
            tx.put_placement(&placement(&i3, "2.0.0"))?;
            tx.put_reported_instance(&reported(&i2, "1.2.3", false))
        })
        .unwrap();
}

fn cursor_of(line: &str) -> Option<String> {
    serde_json::from_str::<Value>(line)
        .ok()?
        .get("__CURSOR")?
        .as_str()
        .map(str::to_owned)
}

/// Serves its data, then stays open without data, like `journalctl --follow`.
struct OpenEnded(std::io::Cursor<Vec<u8>>);

impl AsyncRead for OpenEnded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.0.position() < this.0.get_ref().len() as u64 {
            Pin::new(&mut this.0).poll_read(cx, buf)
        } else {
            Poll::Pending
        }
    }
}

/// A recorded journal: each run serves the lines after the cursor it is given (all of them
/// without one) and then follows silently.
#[derive(Default)]
struct RecordedJournal {
    lines: Mutex<Vec<String>>,
    calls: Mutex<Vec<Option<String>>>,
}

impl RecordedJournal {
    fn push(&self, line: &str) {
        self.lines.lock().unwrap().push(line.to_owned());
    }

    fn calls(&self) -> Vec<Option<String>> {
        self.calls.lock().unwrap().clone()
    }
}

impl JournalSource for RecordedJournal {
    fn spawn(&self, after_cursor: Option<&str>) -> io::Result<JournalLines> {
        self.calls
            .lock()
            .unwrap()
            .push(after_cursor.map(str::to_owned));
        let lines = self.lines.lock().unwrap();
        let start = after_cursor.map_or(0, |c| {
            lines
                .iter()
                .position(|l| cursor_of(l).as_deref() == Some(c))
                .map_or(0, |i| i + 1)
        });
        let mut data = Vec::new();
        for line in &lines[start..] {
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
        }
        Ok(Box::new(BufReader::new(OpenEnded(std::io::Cursor::new(
            data,
        )))))
    }
}

/// A simple alert line: `PRIORITY=3` from an ordinary service.
fn line(cursor: &str, message: &str, ts: u64) -> String {
    json!({
        "__CURSOR": cursor,
        "__REALTIME_TIMESTAMP": ts.to_string(),
        "PRIORITY": "3",
        "_SYSTEMD_UNIT": "foo.service",
        "MESSAGE": message,
    })
    .to_string()
}

fn info_line(cursor: &str, ts: u64) -> String {
    json!({
        "__CURSOR": cursor,
        "__REALTIME_TIMESTAMP": ts.to_string(),
        "PRIORITY": "6",
        "_SYSTEMD_UNIT": "foo.service",
        "MESSAGE": "informational",
    })
    .to_string()
}

struct Running {
    alerts: mpsc::Receiver<AlertItem>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<JournalAlertsReport, JournalConfigError>>,
}

impl Running {
    fn start(settings: JournalAlertsSettings, store: &Arc<Store>) -> Self {
        let (sink, alerts) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_journal_alerts(
            settings,
            Arc::clone(store),
            sink,
            stop_rx,
        ));
        Self { alerts, stop, task }
    }

    async fn next(&mut self) -> AlertItem {
        tokio::time::timeout(Duration::from_secs(60), self.alerts.recv())
            .await
            .expect("an alert in time")
            .expect("the task is running")
    }

    async fn messages(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let value = serde_json::to_value(self.next().await).unwrap();
            out.push(value["message"].as_str().unwrap().to_owned());
        }
        out
    }

    /// Stops the task; returns its report and checks that no further alert was sent.
    async fn stop(mut self) -> JournalAlertsReport {
        self.stop.send(true).unwrap();
        let report = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the task stops")
            .unwrap()
            .unwrap();
        let rest: Vec<AlertItem> = std::iter::from_fn(|| self.alerts.try_recv().ok()).collect();
        assert!(rest.is_empty(), "unexpected alerts: {rest:?}");
        report
    }
}

fn settings(
    config: JournalAlertsConfig,
    source: impl JournalSource + Send + Sync + 'static,
) -> JournalAlertsSettings {
    JournalAlertsSettings::new(config, NODE).with_source(source)
}

// ----- acceptance 1: each case, exact v7 JSON ---------------------------------------------------

#[tokio::test(start_paused = true)]
async fn each_case_gives_its_exact_v7_alert() {
    let (_dir, store) = open_store();
    seed_instances(&store);
    let journal = Arc::new(RecordedJournal::default());
    // In journalctl's JSON export form, as `journalctl --output=json` writes them.
    let lines = [
        // 1. System alert: an error of an ordinary unit.
        r#"{"__CURSOR":"s=0a1b;i=101;b=b1;m=10;t=1;x=1","__REALTIME_TIMESTAMP":"1709210096000001","__MONOTONIC_TIMESTAMP":"1000","_BOOT_ID":"b1","PRIORITY":"3","_SYSTEMD_UNIT":"systemd-networkd.service","_SYSTEMD_CGROUP":"/system.slice/systemd-networkd.service","MESSAGE":"eth0: Could not bring up interface"}"#,
        // 2. Filtered out: matches `^bluetooth:`.
        r#"{"__CURSOR":"s=0a1b;i=102;b=b1;m=11;t=2;x=2","__REALTIME_TIMESTAMP":"1709210096000002","__MONOTONIC_TIMESTAMP":"1001","_BOOT_ID":"b1","PRIORITY":"3","_SYSTEMD_UNIT":"bluetooth.service","_SYSTEMD_CGROUP":"/system.slice/bluetooth.service","MESSAGE":"bluetooth: hci0: command 0x0c03 tx timeout"}"#,
        // 3. Core component alert: the CM itself.
        r#"{"__CURSOR":"s=0a1b;i=103;b=b1;m=12;t=3;x=3","__REALTIME_TIMESTAMP":"1709210096000003","__MONOTONIC_TIMESTAMP":"1002","_BOOT_ID":"b1","PRIORITY":"2","_SYSTEMD_UNIT":"aos-communicationmanager.service","_SYSTEMD_CGROUP":"/system.slice/aos-communicationmanager.service","MESSAGE":"can't connect to the cloud"}"#,
        // 4. Instance alert: the service unit of instance 2.
        r#"{"__CURSOR":"s=0a1b;i=104;b=b1;m=13;t=4;x=4","__REALTIME_TIMESTAMP":"1709210096000004","__MONOTONIC_TIMESTAMP":"1003","_BOOT_ID":"b1","PRIORITY":"3","_SYSTEMD_UNIT":"aos-service@08a6ce43-0bd2-3cd2-9667-39fd2dbb0618.service","_SYSTEMD_CGROUP":"/system.slice/system-aos\\x2dservice.slice/aos-service@08a6ce43-0bd2-3cd2-9667-39fd2dbb0618.service","MESSAGE":"segmentation fault"}"#,
        // 5. init.scope at priority 4: above systemAlertPriority (3), within
        //    serviceAlertPriority (4): an alert about its UNIT, here the SM.
        r#"{"__CURSOR":"s=0a1b;i=105;b=b1;m=14;t=5;x=5","__REALTIME_TIMESTAMP":"1709210096000005","__MONOTONIC_TIMESTAMP":"1004","_BOOT_ID":"b1","PRIORITY":"4","_SYSTEMD_UNIT":"init.scope","_SYSTEMD_CGROUP":"/init.scope","UNIT":"aos-servicemanager.service","MESSAGE":"aos-servicemanager.service: Failed with result 'exit-code'."}"#,
        // 6. init.scope at priority 5: beyond serviceAlertPriority, no alert.
        r#"{"__CURSOR":"s=0a1b;i=106;b=b1;m=15;t=6;x=6","__REALTIME_TIMESTAMP":"1709210096000006","__MONOTONIC_TIMESTAMP":"1005","_BOOT_ID":"b1","PRIORITY":"5","_SYSTEMD_UNIT":"init.scope","_SYSTEMD_CGROUP":"/init.scope","UNIT":"aos-servicemanager.service","MESSAGE":"aos-servicemanager.service: Consumed 1.5s CPU time."}"#,
        // 7. An info entry of an ordinary unit: no alert.
        r#"{"__CURSOR":"s=0a1b;i=107;b=b1;m=16;t=7;x=7","__REALTIME_TIMESTAMP":"1709210096000007","__MONOTONIC_TIMESTAMP":"1006","_BOOT_ID":"b1","PRIORITY":"6","_SYSTEMD_UNIT":"systemd-networkd.service","MESSAGE":"eth0: Gained carrier"}"#,
        // 8. cgroup fallback: a container payload logging without _SYSTEMD_UNIT; its cgroup
        //    names instance 3's unit, under the earlier SM's (SHA-256) instance ID.
        r#"{"__CURSOR":"s=0a1b;i=108;b=b1;m=17;t=8;x=8","__REALTIME_TIMESTAMP":"1709210096000008","__MONOTONIC_TIMESTAMP":"1007","_BOOT_ID":"b1","PRIORITY":"3","_SYSTEMD_CGROUP":"/system.slice/system-aos\\x2dservice.slice/aos-service@4283441f9ceeb4f312d6195579582ba04f5e4b4e0751c5f4fea6726d4a8140be.service","MESSAGE":"out of memory"}"#,
        // 9. cgroup fallback to an ordinary unit: a system alert.
        r#"{"__CURSOR":"s=0a1b;i=109;b=b1;m=18;t=9;x=9","__REALTIME_TIMESTAMP":"1709210096000009","__MONOTONIC_TIMESTAMP":"1008","_BOOT_ID":"b1","PRIORITY":"3","_SYSTEMD_CGROUP":"/system.slice/dnsmasq.service","MESSAGE":"failed to bind DHCP server socket"}"#,
    ];
    for l in lines {
        journal.push(l);
    }
    let config = JournalAlertsConfig {
        filter: vec!["^bluetooth:".into()],
        ..JournalAlertsConfig::default()
    };
    let mut run = Running::start(settings(config, Arc::clone(&journal)), &store);

    let expected = [
        json!({"tag": "systemAlert", "timestamp": "2024-02-29T12:34:56.000001Z",
               "node": {"codename": NODE}, "message": "eth0: Could not bring up interface"}),
        json!({"tag": "coreAlert", "timestamp": "2024-02-29T12:34:56.000003Z",
               "node": {"codename": NODE}, "coreComponent": "CM",
               "message": "can't connect to the cloud"}),
        json!({"tag": "updateItemInstanceAlert", "timestamp": "2024-02-29T12:34:56.000004Z",
               "item": {"id": "item-uuid"}, "subject": {"id": "subject-uuid"}, "instance": 2,
               "version": "1.2.3", "message": "segmentation fault"}),
        json!({"tag": "coreAlert", "timestamp": "2024-02-29T12:34:56.000005Z",
               "node": {"codename": NODE}, "coreComponent": "SM",
               "message": "aos-servicemanager.service: Failed with result 'exit-code'."}),
        json!({"tag": "updateItemInstanceAlert", "timestamp": "2024-02-29T12:34:56.000008Z",
               "item": {"id": "item-uuid"}, "subject": {"id": "subject-uuid"}, "instance": 3,
               "version": "2.0.0", "message": "out of memory"}),
        json!({"tag": "systemAlert", "timestamp": "2024-02-29T12:34:56.000009Z",
               "node": {"codename": NODE}, "message": "failed to bind DHCP server socket"}),
    ];
    for want in &expected {
        let got = serde_json::to_value(run.next().await).unwrap();
        assert_eq!(&got, want);
    }
    let report = run.stop().await;
    assert_eq!(report.forwarded, expected.len() as u64);
    assert_eq!(report.reader.lines, lines.len() as u64);
    assert_eq!(report.reader.alerts_sent, expected.len() as u64);
    assert_eq!(report.unconvertible, 0);
    // The position is the last entry handled, alert or not.
    assert_eq!(
        store.journal_cursor().unwrap().as_deref(),
        Some("s=0a1b;i=109;b=b1;m=18;t=9;x=9")
    );
}

#[tokio::test(start_paused = true)]
async fn init_scope_about_an_instance_and_thresholds_from_the_config() {
    let (_dir, store) = open_store();
    seed_instances(&store);
    let journal = Arc::new(RecordedJournal::default());
    journal.push(&format!(
        r#"{{"__CURSOR":"c1","__REALTIME_TIMESTAMP":"1709210096000001","PRIORITY":"5","_SYSTEMD_UNIT":"init.scope","UNIT":"aos-service@{ID_2}.service","MESSAGE":"aos-service@{ID_2}.service: Main process exited, code=killed, status=9/KILL"}}"#
    ));
    // systemAlertPriority 2: a priority 3 error of an ordinary unit is no alert any more.
    journal.push(r#"{"__CURSOR":"c2","__REALTIME_TIMESTAMP":"1709210096000002","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":"minor"}"#);
    journal.push(r#"{"__CURSOR":"c3","__REALTIME_TIMESTAMP":"1709210096000003","PRIORITY":"2","_SYSTEMD_UNIT":"foo.service","MESSAGE":"critical"}"#);
    let config = JournalAlertsConfig {
        filter: vec![],
        service_alert_priority: 5,
        system_alert_priority: 2,
    };
    let mut run = Running::start(settings(config, Arc::clone(&journal)), &store);
    assert_eq!(
        serde_json::to_value(run.next().await).unwrap(),
        json!({"tag": "updateItemInstanceAlert", "timestamp": "2024-02-29T12:34:56.000001Z",
               "item": {"id": "item-uuid"}, "subject": {"id": "subject-uuid"}, "instance": 2,
               "version": "1.2.3",
               "message": format!("aos-service@{ID_2}.service: Main process exited, code=killed, status=9/KILL")})
    );
    assert_eq!(run.messages(1).await, ["critical"]);
    run.stop().await;
}

// ----- acceptance 2: restart ------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn restart_resumes_after_the_stored_cursor_without_duplicate_or_gap() {
    let (_dir, store) = open_store();
    let journal = Arc::new(RecordedJournal::default());
    journal.push(&line("c1", "one", 1_000_000));
    journal.push(&info_line("c2", 2_000_000));
    journal.push(&line("c3", "three", 3_000_000));

    let mut run = Running::start(
        settings(JournalAlertsConfig::default(), Arc::clone(&journal)),
        &store,
    );
    assert_eq!(run.messages(2).await, ["one", "three"]);
    let report = run.stop().await;
    assert_eq!(report.forwarded, 2);
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("c3"));

    // Written while the CM was down.
    journal.push(&info_line("c4", 4_000_000));
    journal.push(&line("c5", "five", 5_000_000));
    journal.push(&line("c6", "six", 6_000_000));

    let mut run = Running::start(
        settings(JournalAlertsConfig::default(), Arc::clone(&journal)),
        &store,
    );
    // Nothing again, nothing skipped.
    assert_eq!(run.messages(2).await, ["five", "six"]);
    let report = run.stop().await;
    assert_eq!(report.forwarded, 2);
    assert_eq!(report.reader.lines, 3);
    // First start at the journal's end (no cursor yet), then after the stored cursor.
    assert_eq!(journal.calls(), [None, Some("c3".to_owned())]);
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("c6"));
}

/// The cursor reaches the store every 10 s while running, so even a crash (no shutdown save)
/// only repeats what came after the last periodic save.
#[tokio::test(start_paused = true)]
async fn cursor_is_saved_periodically_and_a_crashed_reader_resumes_from_it() {
    let (_dir, store) = open_store();
    let journal = Arc::new(RecordedJournal::default());
    journal.push(&line("c1", "one", 1_000_000));
    journal.push(&line("c2", "two", 2_000_000));

    let start = |store: &Arc<Store>| {
        let (tx, rx) = mpsc::channel(16);
        let cursor = StoreCursor::new(Arc::clone(store));
        let reader = JournalReader::new(
            Arc::clone(&journal),
            cursor.clone(),
            StoreInstanceLookup::new(Arc::clone(store)),
            JournalAlertsConfig::default()
                .compile_for_node(NODE)
                .unwrap(),
            tx,
        );
        let task = tokio::spawn(reader.run(std::future::pending()));
        (rx, cursor, task)
    };
    let message = |v: Value| v["message"].as_str().unwrap().to_owned();

    let (mut rx, cursor, task) = start(&store);
    assert_eq!(message(rx.recv().await.unwrap()), "one");
    assert_eq!(message(rx.recv().await.unwrap()), "two");
    // Nothing saved before the period is over.
    tokio::time::sleep(Duration::from_secs(9)).await;
    cursor.flush().await;
    assert_eq!(store.journal_cursor().unwrap(), None);
    // Virtual time: the reader's 10 s tick records the cursor, flush waits for its commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cursor.flush().await;
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("c2"));

    // A crash: the task is gone without its shutdown save.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    journal.push(&line("c3", "three", 3_000_000));

    let (mut rx, _cursor, task) = start(&store);
    assert_eq!(message(rx.recv().await.unwrap()), "three");
    assert!(rx.try_recv().is_err());
    task.abort();
    assert_eq!(journal.calls(), [None, Some("c2".to_owned())]);
}

// ----- acceptance 3: the child process dies ---------------------------------------------------

/// A real child (`sh`) prints two entries, the second naming its PID; the test kills it with
/// SIGKILL. The reader restarts it (with backoff) after the last cursor, which the script
/// echoes back in its next entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_survives_its_child_being_killed_and_resumes_from_the_cursor() {
    let script = r#"
if [ -z "$JOURNAL_AFTER_CURSOR" ]; then
  printf '%s\n' '{"__CURSOR":"k1","__REALTIME_TIMESTAMP":"1000000","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":"first"}'
  printf '{"__CURSOR":"k2","__REALTIME_TIMESTAMP":"2000000","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":"pid %s"}\n' "$$"
  exec sleep 600
fi
printf '{"__CURSOR":"k3","__REALTIME_TIMESTAMP":"3000000","PRIORITY":"2","_SYSTEMD_UNIT":"foo.service","MESSAGE":"resumed after %s"}\n' "$JOURNAL_AFTER_CURSOR"
exec sleep 600
"#;
    let (_dir, store) = open_store();
    let reader = ReaderSettings {
        restart_min_delay: Duration::from_millis(10),
        restart_max_delay: Duration::from_millis(100),
        ..ReaderSettings::default()
    };
    let settings = settings(
        JournalAlertsConfig::default(),
        CommandSource::new("sh", ["-c", script]),
    )
    .with_reader_settings(reader);
    let mut run = Running::start(settings, &store);

    assert_eq!(run.messages(1).await, ["first"]);
    let second = run.messages(1).await.remove(0);
    let pid = second.strip_prefix("pid ").expect("the child's PID");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", pid])
        .status()
        .unwrap();
    assert!(killed.success());

    assert_eq!(run.messages(1).await, ["resumed after k2"]);
    let report = run.stop().await;
    assert_eq!(report.forwarded, 3);
    assert_eq!(report.reader.restarts, 1);
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("k3"));
}

// ----- the task's edges -----------------------------------------------------------------------

#[tokio::test]
async fn an_invalid_filter_is_an_error_naming_the_entry() {
    let (_dir, store) = open_store();
    let config = JournalAlertsConfig {
        filter: vec!["ok".into(), "(".into()],
        ..JournalAlertsConfig::default()
    };
    let (sink, _alerts) = mpsc::channel(1);
    let (_stop, stop_rx) = watch::channel(false);
    let err = run_journal_alerts(
        settings(config, RecordedJournal::default()),
        store,
        sink,
        stop_rx,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("alerts.journalAlerts.filter[1]"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_closed_sink_stops_the_task() {
    let (_dir, store) = open_store();
    let journal = Arc::new(RecordedJournal::default());
    journal.push(&line("c1", "one", 1_000_000));
    journal.push(&line("c2", "two", 2_000_000));
    let (sink, alerts) = mpsc::channel(4);
    drop(alerts);
    let (_stop, stop_rx) = watch::channel(false);
    // Virtual time: an hour passes in an instant if the task does not stop by itself.
    let report = tokio::time::timeout(
        Duration::from_secs(3600),
        run_journal_alerts(
            settings(JournalAlertsConfig::default(), Arc::clone(&journal)),
            Arc::clone(&store),
            sink,
            stop_rx,
        ),
    )
    .await
    .expect("the task stops when its sink is closed")
    .unwrap();
    assert_eq!(report.forwarded, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stop_sender_stops_the_task() {
    let (_dir, store) = open_store();
    let journal = Arc::new(RecordedJournal::default());
    journal.push(&line("c1", "one", 1_000_000));
    let (sink, mut alerts) = mpsc::channel(4);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_journal_alerts(
        settings(JournalAlertsConfig::default(), Arc::clone(&journal)),
        Arc::clone(&store),
        sink,
        stop_rx,
    ));
    assert!(alerts.recv().await.is_some());
    drop(stop);
    let report = tokio::time::timeout(Duration::from_secs(3600), task)
        .await
        .expect("the task stops when its stop sender is gone")
        .unwrap()
        .unwrap();
    assert_eq!(report.forwarded, 1);
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("c1"));
}

// ----- store-backed cursor and lookup ---------------------------------------------------------

#[tokio::test]
async fn store_cursor_commits_the_newest_cursor() {
    let (_dir, store) = open_store();
    let cursor = StoreCursor::new(Arc::clone(&store));
    assert_eq!(cursor.load(), None);
    for i in 0..50 {
        cursor.save(&format!("c{i}"));
    }
    cursor.flush().await;
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("c49"));
    assert_eq!(cursor.load().as_deref(), Some("c49"));
    assert_eq!(cursor.failures(), 0);
}

#[test]
fn store_cursor_commits_inline_without_a_runtime() {
    let (_dir, store) = open_store();
    let cursor = StoreCursor::new(Arc::clone(&store));
    cursor.save("x");
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("x"));
}

#[test]
fn lookup_finds_instances_by_the_sms_instance_id() {
    let (_dir, store) = open_store();
    seed_instances(&store);
    let pre = InstanceIdent::new("rootfs", "", 0);
    store
        .write(|tx| tx.put_reported_instance(&reported(&pre, "5.0", true)))
        .unwrap();
    let lookup = StoreInstanceLookup::new(Arc::clone(&store));
    let info = |item: &str, instance: u64, version: &str, preinstalled: bool| InstanceInfo {
        item_id: item.into(),
        subject_id: if preinstalled { "" } else { "subject-uuid" }.into(),
        instance,
        version: version.into(),
        preinstalled,
    };
    // Reported by the SM: its version wins over the placement's.
    assert_eq!(
        lookup.lookup(ID_2),
        Some(info("item-uuid", 2, "1.2.3", false))
    );
    assert_eq!(
        lookup.lookup(&ID_2.to_uppercase()),
        Some(info("item-uuid", 2, "1.2.3", false))
    );
    // Placed only, under either ID form.
    let i3 = InstanceIdent::new("item-uuid", "subject-uuid", 3);
    assert_eq!(
        lookup.lookup(&sm_instance_id(&i3)),
        Some(info("item-uuid", 3, "2.0.0", false))
    );
    assert_eq!(
        lookup.lookup(LEGACY_ID_3),
        Some(info("item-uuid", 3, "2.0.0", false))
    );
    assert_eq!(
        lookup.lookup(&sm_instance_id(&pre)),
        Some(info("rootfs", 0, "5.0", true))
    );
    assert_eq!(lookup.lookup("08a6ce43-0000-3cd2-9667-39fd2dbb0618"), None);
}

#[test]
fn instance_ids_match_the_sm() {
    let i2 = InstanceIdent::new("item-uuid", "subject-uuid", 2);
    assert_eq!(sm_instance_id(&i2), ID_2);
    assert_eq!(
        sm_instance_id(&InstanceIdent::new("svc/a", "subj/1", 0)),
        "8fba2040-714c-3b86-807e-e3111a60c563"
    );
    let i3 = InstanceIdent::new("item-uuid", "subject-uuid", 3);
    assert_eq!(legacy_sm_instance_id(&i3), LEGACY_ID_3);
    assert!(is_instance_id(ID_2, &i2));
    assert!(!is_instance_id(ID_2, &i3));
}

#[test]
fn md5_rfc_1321_vectors() {
    let hex = |bytes: [u8; 16]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let vectors: [(&str, &str); 7] = [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "abcdefghijklmnopqrstuvwxyz",
            "c3fcd3d76192e4007dfb496cca67e13b",
        ),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "d174ab98d277d9f5a5611c2c9f419d9f",
        ),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ];
    for (input, want) in vectors {
        assert_eq!(hex(md5(input.as_bytes())), want, "{input:?}");
    }
    // The padding boundary (55, 56 and 64 bytes).
    let padded = [
        (55usize, "04364420e25c512fd958a70738aa8f72"),
        (56, "668a72d5ba17f08e62dabcafad6db14b"),
        (63, "7dc2ca208106a2f703567bdff99d8981"),
        (64, "c1bb4f81d892b2d57947682aeb252456"),
        (65, "1bc932052302d074bdec39795fe00cf6"),
        (119, "ab347a5f68c8a443cfcddc633f12c24f"),
        (120, "fb98667f98096de92620b64f46e1c5b5"),
    ];
    for (n, want) in padded {
        assert_eq!(hex(md5(&vec![b'x'; n])), want, "{n} bytes");
    }
}
