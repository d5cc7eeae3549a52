//! Unit→cloud outgoing message queue with ACK/NACK semantics (protocol v7).
//!
//! This is a pure state machine: it performs no I/O and never reads the clock.
//! The caller passes the current [`Instant`] in, writes the frames returned by
//! [`Outbox::due`] to the link, arms a timer for [`Outbox::next_deadline`], and
//! feeds `ack`/`nack` messages and link state changes back in.
//!
//! Semantics (cloud-protocol.md §1.7, errata 20–21):
//!
//! * Every queued message is "expect-ack". Its first write happens at the first
//!   [`Outbox::due`] call while connected (normally at queue time).
//! * The ACK deadline counts from when the message was queued: if no `ack`
//!   arrives by `queued_at + response_wait` it is resent, then again every
//!   `response_wait` after that. A resend is byte-identical (the stored
//!   [`Outgoing::frame`] is written again, so txn and createdAt are unchanged).
//! * At most `max_resends` resends (4 writes in all with the default 3); when the
//!   deadline after the last write expires the message is dropped and counted in
//!   [`OutboxCounters::dropped_after_retries`].
//! * A `nack` re-queues the message to be written at `now + retry_after`; its ACK
//!   deadline then counts from that instant and no retry is consumed.
//! * [`Outbox::disconnected`] drops every message that is not
//!   [`Outgoing::important`] (counted in
//!   [`OutboxCounters::dropped_on_disconnect`]) and keeps the important ones.
//!   While disconnected nothing is due. [`Outbox::connected`] makes every kept
//!   message due at once (same txn, same bytes); the ACK deadline counts from
//!   the reconnect and a reconnect resend does not consume a retry.
//! * The queue is bounded to `capacity` messages; [`Outbox::push`] refuses more.
//!
//! A new [`Outbox`] starts **disconnected**: call [`Outbox::connected`] once the
//! link is up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One message to send to the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Header `txn`; `ack`/`nack` from the cloud are matched by it.
    pub txn: String,
    /// Data `messageType` (for logging).
    pub message_type: String,
    /// The exact bytes to write; every (re)send writes these same bytes.
    pub frame: Vec<u8>,
    /// Important messages survive a link drop (errata 21).
    pub important: bool,
}

/// Statistics of an [`Outbox`]. All counters are cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounters {
    /// First writes of messages.
    pub sent: u64,
    /// Later writes of the same messages (ACK timeout, after a NACK, after a
    /// reconnect). `sent + resent` is the total number of frames written.
    pub resent: u64,
    /// Messages removed by an `ack`.
    pub acked: u64,
    /// `nack`s that matched a queued message.
    pub nacked: u64,
    /// Messages dropped because the last allowed write was not acked in time.
    pub dropped_after_retries: u64,
    /// Messages refused by [`Outbox::push`] because the queue was full.
    pub dropped_full: u64,
    /// Non-important messages dropped by [`Outbox::disconnected`] or refused by
    /// [`Outbox::push`] while disconnected.
    pub dropped_on_disconnect: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Write at `at` (or at once if `at` is past); the ACK deadline after that
    /// write is `at + response_wait`. Such a write does not use a retry.
    Scheduled { at: Instant },
    /// Written; waiting for an `ack` until `deadline`.
    AwaitingAck { deadline: Instant },
}

#[derive(Debug)]
struct Entry {
    msg: Outgoing,
    phase: Phase,
    /// Timeout-driven resends used so far.
    resends: u32,
    /// Whether the message has been written at least once.
    written: bool,
}

/// The outgoing queue. See the module documentation.
#[derive(Debug)]
pub struct Outbox {
    response_wait: Duration,
    max_resends: u32,
    capacity: usize,
    connected: bool,
    queue: VecDeque<Entry>,
    counters: OutboxCounters,
}

/// `t + d`, saturating instead of panicking on (absurdly large) overflow.
fn add(t: Instant, d: Duration) -> Instant {
    const FALLBACK: Duration = Duration::from_secs(365 * 24 * 3600);
    t.checked_add(d)
        .or_else(|| t.checked_add(FALLBACK))
        .unwrap_or(t)
}

impl Outbox {
    /// `response_wait` is `cloudResponseWaitTimeout`, `max_resends` the number of
    /// resends after the first write (3 in protocol v7), `capacity` the maximum
    /// number of queued messages.
    pub fn new(response_wait: Duration, max_resends: u32, capacity: usize) -> Self {
        Self {
            response_wait,
            max_resends,
            capacity,
            connected: false,
            queue: VecDeque::new(),
            counters: OutboxCounters::default(),
        }
    }

    /// Queues a message; it becomes due at `now` (if connected).
    ///
    /// Returns the message back when the queue is full (counted in
    /// `dropped_full`), or when a non-important message is pushed while
    /// disconnected (counted in `dropped_on_disconnect`). The caller logs.
    pub fn push(&mut self, msg: Outgoing, now: Instant) -> Result<(), Outgoing> {
        if !self.connected && !msg.important {
            self.counters.dropped_on_disconnect += 1;
            return Err(msg);
        }
        if self.queue.len() >= self.capacity {
            self.counters.dropped_full += 1;
            return Err(msg);
        }
        self.queue.push_back(Entry {
            msg,
            phase: Phase::Scheduled { at: now },
            resends: 0,
            written: false,
        });
        Ok(())
    }

    /// Frames to write now (new ones, due resends, NACK-delayed ones and those
    /// kept over a reconnect), in queue order; marks them written at `now`.
    /// Messages whose last allowed write went un-acked are dropped here.
    /// Returns nothing while disconnected.
    pub fn due(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        if !self.connected {
            return out;
        }
        let rw = self.response_wait;
        let max_resends = self.max_resends;
        let counters = &mut self.counters;
        self.queue.retain_mut(|e| match e.phase {
            Phase::Scheduled { at } => {
                if now < at {
                    return true;
                }
                if e.written {
                    counters.resent += 1;
                } else {
                    counters.sent += 1;
                    e.written = true;
                }
                let deadline = add(at, rw);
                e.phase = Phase::AwaitingAck {
                    deadline: if deadline < now {
                        add(now, rw)
                    } else {
                        deadline
                    },
                };
                out.push(e.msg.clone());
                true
            }
            Phase::AwaitingAck { deadline } => {
                if now < deadline {
                    return true;
                }
                if e.resends >= max_resends {
                    counters.dropped_after_retries += 1;
                    return false;
                }
                e.resends += 1;
                counters.resent += 1;
                let next = add(deadline, rw);
                // After a stall, do not fire several resends back to back.
                let next = if next <= now { add(now, rw) } else { next };
                e.phase = Phase::AwaitingAck { deadline: next };
                out.push(e.msg.clone());
                true
            }
        });
        out
    }

    /// The next instant at which [`Outbox::due`] has something to do (a write
    /// or a drop); may be in the past. `None` when empty or disconnected.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        self.queue
            .iter()
            .map(|e| match e.phase {
                Phase::Scheduled { at } => at,
                Phase::AwaitingAck { deadline } => deadline,
            })
            .min()
    }

    /// The cloud acked `txn`: forget the message. Returns whether it was queued.
    pub fn ack(&mut self, txn: &str) -> bool {
        match self.queue.iter().position(|e| e.msg.txn == txn) {
            Some(i) => {
                self.queue.remove(i);
                self.counters.acked += 1;
                true
            }
            None => false,
        }
    }

    /// Forgets `txn` without counting it acked (a request whose caller gave up). Returns whether
    /// it was queued.
    pub fn remove(&mut self, txn: &str) -> bool {
        match self.queue.iter().position(|e| e.msg.txn == txn) {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    /// The cloud nacked `txn`: write it again at `now + retry_after`, with the
    /// ACK deadline counting from then; no retry is consumed. Returns whether
    /// it was queued.
    pub fn nack(&mut self, txn: &str, retry_after: Duration, now: Instant) -> bool {
        match self.queue.iter_mut().find(|e| e.msg.txn == txn) {
            Some(e) => {
                e.phase = Phase::Scheduled {
                    at: add(now, retry_after),
                };
                self.counters.nacked += 1;
                true
            }
            None => false,
        }
    }

    /// The link dropped: drop what is not important, keep the rest for
    /// resending after reconnect.
    pub fn disconnected(&mut self) {
        self.connected = false;
        let before = self.queue.len();
        self.queue.retain(|e| e.msg.important);
        self.counters.dropped_on_disconnect += (before - self.queue.len()) as u64;
    }

    /// The link is up: every kept message becomes due at `now` (same txn and
    /// bytes); ACK deadlines count from `now`, retries are not consumed.
    pub fn connected(&mut self, now: Instant) {
        self.connected = true;
        for e in &mut self.queue {
            e.phase = Phase::Scheduled { at: now };
        }
    }

    /// Whether the link is currently considered up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> OutboxCounters {
        self.counters
    }

    /// Number of queued (un-acked) messages.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn msg(txn: &str, message_type: &str, important: bool) -> Outgoing {
        let frame = serde_json::to_vec(&serde_json::json!({
            "header": {"version": 7, "systemId": "unit", "createdAt": "2026-11-27T23:31:38Z", "txn": txn},
            "data": {"messageType": message_type}
        }))
        .unwrap();
        Outgoing {
            txn: txn.to_string(),
            message_type: message_type.to_string(),
            frame,
            important,
        }
    }

    fn txns(v: &[Outgoing]) -> Vec<&str> {
        v.iter().map(|m| m.txn.as_str()).collect()
    }

    fn connected_outbox(base: Instant) -> Outbox {
        let mut ob = Outbox::new(RW, 3, 16);
        ob.connected(base);
        ob
    }

    #[test]
    fn starts_disconnected_and_empty() {
        let ob = Outbox::new(RW, 3, 4);
        assert!(!ob.is_connected());
        assert!(ob.is_empty());
        assert_eq!(ob.len(), 0);
        assert_eq!(ob.next_deadline(), None);
        assert_eq!(ob.counters(), OutboxCounters::default());
    }

    #[test]
    fn unacked_message_written_four_times_then_dropped() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        let m = msg("t1", "alerts", true);
        ob.push(m.clone(), t0).unwrap();

        let mut writes = Vec::new();
        // Poll every 100 ms for 60 s.
        for i in 0..=600 {
            let now = t0 + ms(i * 100);
            for w in ob.due(now) {
                writes.push((now - t0, w));
            }
        }
        let at: Vec<Duration> = writes.iter().map(|(d, _)| *d).collect();
        assert_eq!(
            at,
            vec![ms(0), ms(10_000), ms(20_000), ms(30_000)],
            "writes at queue time and every response_wait after"
        );
        // Byte-identical resends.
        for (_, w) in &writes {
            assert_eq!(w, &m);
        }
        assert!(ob.is_empty());
        let c = ob.counters();
        assert_eq!(c.sent, 1);
        assert_eq!(c.resent, 3);
        assert_eq!(c.dropped_after_retries, 1);
        assert_eq!(c.acked, 0);
    }

    #[test]
    fn dropped_exactly_at_deadline_after_last_write() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("t1", "alerts", true), t0).unwrap();
        for k in 0..4 {
            assert_eq!(ob.due(t0 + RW * k).len(), 1, "write {k}");
        }
        assert_eq!(ob.next_deadline(), Some(t0 + RW * 4));
        assert!(ob.due(t0 + RW * 4 - ms(1)).is_empty());
        assert_eq!(ob.len(), 1);
        assert!(ob.due(t0 + RW * 4).is_empty());
        assert!(ob.is_empty());
        assert_eq!(ob.counters().dropped_after_retries, 1);
        assert_eq!(ob.next_deadline(), None);
    }

    #[test]
    fn deadline_counts_from_queue_time_not_write_time() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("t1", "alerts", true), t0).unwrap();
        // First write happens late (caller was busy).
        assert_eq!(ob.due(t0 + ms(3_000)).len(), 1);
        assert_eq!(ob.next_deadline(), Some(t0 + RW));
        assert!(ob.due(t0 + RW - ms(1)).is_empty());
        assert_eq!(ob.due(t0 + RW).len(), 1);
        assert_eq!(ob.next_deadline(), Some(t0 + RW * 2));
    }

    #[test]
    fn stalled_caller_gets_one_resend_not_a_burst() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("t1", "alerts", true), t0).unwrap();
        assert_eq!(ob.due(t0).len(), 1);
        // The caller wakes up 25 s late: one resend, next one response_wait later.
        assert_eq!(ob.due(t0 + ms(35_000)).len(), 1);
        assert!(ob.due(t0 + ms(35_001)).is_empty());
        assert_eq!(ob.next_deadline(), Some(t0 + ms(45_000)));
        assert_eq!(ob.counters().resent, 1);
    }

    #[test]
    fn ack_removes_message() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("t1", "alerts", true), t0).unwrap();
        ob.push(msg("t2", "monitoringData", false), t0).unwrap();
        assert_eq!(txns(&ob.due(t0)), vec!["t1", "t2"]);
        assert!(ob.ack("t1"));
        assert!(!ob.ack("t1"));
        assert!(!ob.ack("unknown"));
        assert_eq!(ob.len(), 1);
        assert_eq!(txns(&ob.due(t0 + RW)), vec!["t2"]);
        assert!(ob.ack("t2"));
        assert!(ob.is_empty());
        assert_eq!(ob.next_deadline(), None);
        let c = ob.counters();
        assert_eq!(c.acked, 2);
        assert_eq!(c.dropped_after_retries, 0);
    }

    #[test]
    fn ack_before_first_write_removes_message() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("t1", "alerts", true), t0).unwrap();
        assert!(ob.ack("t1"));
        assert!(ob.due(t0).is_empty());
        assert_eq!(ob.counters().sent, 0);
    }

    #[test]
    fn nack_delays_without_using_a_retry() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        let m = msg("t1", "pushLog", true);
        ob.push(m.clone(), t0).unwrap();
        assert_eq!(ob.due(t0).len(), 1); // write 1
        assert_eq!(ob.due(t0 + RW).len(), 1); // resend 1 (retry used)

        // NACK at 12 s with retryAfter 500 ms.
        assert!(ob.nack("t1", ms(500), t0 + ms(12_000)));
        assert!(!ob.nack("unknown", ms(500), t0 + ms(12_000)));
        assert_eq!(ob.next_deadline(), Some(t0 + ms(12_500)));
        assert!(ob.due(t0 + ms(12_499)).is_empty());
        // Not at the old deadline (20 s) either: the NACK replaced it.
        let w = ob.due(t0 + ms(12_500));
        assert_eq!(w, vec![m.clone()]);
        // Deadline counts from the NACK-delayed write instant.
        assert_eq!(ob.next_deadline(), Some(t0 + ms(22_500)));
        assert!(ob.due(t0 + ms(20_000)).is_empty());

        // Remaining: 2 more resends (3 in total, the NACK write not counted).
        let mut resend_at = Vec::new();
        for i in 0..=1000 {
            let now = t0 + ms(12_500 + i * 100);
            if !ob.due(now).is_empty() {
                resend_at.push(now - t0);
            }
        }
        assert_eq!(resend_at, vec![ms(22_500), ms(32_500)]);
        assert!(ob.is_empty());
        let c = ob.counters();
        assert_eq!(c.sent, 1);
        assert_eq!(c.resent, 4); // 1 timeout + 1 NACK + 2 timeout
        assert_eq!(c.nacked, 1);
        assert_eq!(c.dropped_after_retries, 1);
    }

    #[test]
    fn repeated_nacks_never_drop() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("t1", "alerts", true), t0).unwrap();
        let mut now = t0;
        for _ in 0..20 {
            assert_eq!(ob.due(now).len(), 1);
            assert!(ob.nack("t1", ms(500), now + ms(100)));
            now += ms(600);
        }
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.counters().dropped_after_retries, 0);
    }

    #[test]
    fn resends_are_byte_identical() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        let m = msg("t1", "overrideEnvVarsStatus", true);
        ob.push(m.clone(), t0).unwrap();
        let mut frames = Vec::new();
        frames.extend(ob.due(t0));
        frames.extend(ob.due(t0 + RW));
        assert!(ob.nack("t1", ms(500), t0 + RW + ms(1)));
        frames.extend(ob.due(t0 + RW + ms(501)));
        ob.disconnected();
        ob.connected(t0 + RW * 2);
        frames.extend(ob.due(t0 + RW * 2));
        assert_eq!(frames.len(), 4);
        for f in &frames {
            assert_eq!(f.frame, m.frame);
            assert_eq!(f.txn, "t1");
        }
    }

    #[test]
    fn disconnect_drops_unimportant_keeps_important_and_resends_on_connect() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        let alert = msg("a", "alerts", true);
        let mon = msg("m", "monitoringData", false);
        let log = msg("l", "pushLog", true);
        let status = msg("s", "unitStatus", false);
        for m in [&alert, &mon, &log, &status] {
            ob.push(m.clone(), t0).unwrap();
        }
        assert_eq!(txns(&ob.due(t0)), vec!["a", "m", "l", "s"]);

        ob.disconnected();
        assert!(!ob.is_connected());
        assert_eq!(ob.len(), 2);
        assert_eq!(ob.counters().dropped_on_disconnect, 2);
        // Nothing is due while disconnected, whatever the time.
        assert_eq!(ob.next_deadline(), None);
        assert!(ob.due(t0 + RW * 100).is_empty());
        // Unimportant pushes are refused while disconnected; important ones kept.
        assert_eq!(
            ob.push(msg("m2", "monitoringData", false), t0 + ms(5)),
            Err(msg("m2", "monitoringData", false))
        );
        assert_eq!(ob.counters().dropped_on_disconnect, 3);
        let state_req = msg("r", "stateRequest", true);
        ob.push(state_req.clone(), t0 + ms(5)).unwrap();

        let t1 = t0 + ms(500_000);
        ob.connected(t1);
        assert_eq!(ob.next_deadline(), Some(t1));
        let again = ob.due(t1);
        assert_eq!(again, vec![alert.clone(), log.clone(), state_req.clone()]);
        // Deadline counts from the reconnect; the reconnect write is not a retry.
        assert_eq!(ob.next_deadline(), Some(t1 + RW));
        let mut n = 0;
        for k in 1..=5 {
            n += ob.due(t1 + RW * k).len();
        }
        assert_eq!(n, 3 * 3, "three resends each after reconnect");
        assert!(ob.is_empty());
        let c = ob.counters();
        assert_eq!(c.sent, 5); // a, m, l, s before; r after reconnect
        assert_eq!(c.dropped_after_retries, 3);
    }

    #[test]
    fn order_preserved() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        for (i, t) in ["1", "2", "3", "4", "5"].iter().enumerate() {
            ob.push(msg(t, "alerts", true), t0 + ms(i as u64)).unwrap();
        }
        assert_eq!(txns(&ob.due(t0 + ms(10))), vec!["1", "2", "3", "4", "5"]);
        // NACK the first: the others resend in order, the first keeps its place.
        assert!(ob.nack("1", RW, t0 + ms(20)));
        assert!(ob.ack("3"));
        assert_eq!(txns(&ob.due(t0 + RW + ms(4))), vec!["2", "4", "5"]);
        assert_eq!(
            txns(&ob.due(t0 + RW * 2 + ms(20))),
            vec!["1", "2", "4", "5"]
        );
    }

    #[test]
    fn capacity_enforced() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(RW, 3, 2);
        ob.connected(t0);
        ob.push(msg("1", "alerts", true), t0).unwrap();
        ob.push(msg("2", "alerts", true), t0).unwrap();
        let rejected = ob.push(msg("3", "alerts", true), t0);
        assert_eq!(rejected, Err(msg("3", "alerts", true)));
        assert_eq!(ob.len(), 2);
        assert_eq!(ob.counters().dropped_full, 1);
        assert!(ob.ack("1"));
        ob.push(msg("3", "alerts", true), t0).unwrap();
        assert_eq!(txns(&ob.due(t0)), vec!["2", "3"]);

        let mut zero = Outbox::new(RW, 3, 0);
        zero.connected(t0);
        assert!(zero.push(msg("x", "alerts", true), t0).is_err());
        assert_eq!(zero.counters().dropped_full, 1);
    }

    #[test]
    fn next_deadline_correct() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        assert_eq!(ob.next_deadline(), None);
        ob.push(msg("1", "alerts", true), t0).unwrap();
        // New message: due at once.
        assert_eq!(ob.next_deadline(), Some(t0));
        ob.due(t0);
        assert_eq!(ob.next_deadline(), Some(t0 + RW));
        ob.push(msg("2", "alerts", true), t0 + ms(3_000)).unwrap();
        assert_eq!(ob.next_deadline(), Some(t0 + ms(3_000)));
        ob.due(t0 + ms(3_000));
        assert_eq!(ob.next_deadline(), Some(t0 + RW));
        // NACK "2" far out; "1" still earliest.
        ob.nack("2", ms(60_000), t0 + ms(4_000));
        assert_eq!(ob.next_deadline(), Some(t0 + RW));
        ob.ack("1");
        assert_eq!(ob.next_deadline(), Some(t0 + ms(64_000)));
        ob.disconnected();
        assert_eq!(ob.next_deadline(), None);
        ob.connected(t0 + ms(70_000));
        assert_eq!(ob.next_deadline(), Some(t0 + ms(70_000)));
    }

    #[test]
    fn zero_max_resends_and_zero_wait_are_safe() {
        let t0 = Instant::now();
        let mut ob = Outbox::new(RW, 0, 4);
        ob.connected(t0);
        ob.push(msg("1", "alerts", true), t0).unwrap();
        assert_eq!(ob.due(t0).len(), 1);
        assert!(ob.due(t0 + RW).is_empty());
        assert!(ob.is_empty());
        assert_eq!(ob.counters().dropped_after_retries, 1);

        let mut z = Outbox::new(Duration::ZERO, 3, 4);
        z.connected(t0);
        z.push(msg("1", "alerts", true), t0).unwrap();
        let total: usize = (0..10).map(|i| z.due(t0 + ms(i)).len()).sum();
        assert_eq!(total, 4);
        assert!(z.is_empty());
    }

    #[test]
    fn huge_retry_after_does_not_panic() {
        let t0 = Instant::now();
        let mut ob = connected_outbox(t0);
        ob.push(msg("1", "alerts", true), t0).unwrap();
        ob.due(t0);
        assert!(ob.nack("1", Duration::MAX, t0));
        assert!(ob.next_deadline().is_some());
        assert!(ob.due(t0 + RW * 10).is_empty());
    }
}
