//! A subscription's consumer: every process runs one per subscription, in the subscription's
//! consumer group, and handles each event exactly once in effect.
//!
//! For each event: the host opens a transaction, asks the inbox to admit the event (a
//! duplicate or an older event is acknowledged without running anything; one whose key has
//! not applied its predecessor waits), runs the handler inside that transaction, and commits
//! the handler's writes with the inbox record, then acknowledges the broker entry. A handler
//! that fails (`retry`, a trap, a timeout) is rolled back and tried again after a backoff that
//! doubles, with jitter; after `max_attempts` (or at once on `reject`) the event goes to the
//! dead-letter queue and, with `ordering = "key"`, its key waits (parked) while the others
//! keep flowing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

use super::broker::{Broker, Delivery};
use super::inbox::{self, Admission};
use crate::capabilities::FunctionCaps;
use crate::capabilities::db::DbBackend;
use crate::config::{MAX_BACKOFF, Ordering, SubscriptionConfig};
use crate::request_id::RequestId;
use crate::runtime::{Failure, Function, HandlerError};

/// Entries read from the broker at once.
const BATCH: usize = 64;
/// The pause when there was nothing to do.
const IDLE: Duration = Duration::from_millis(20);
/// How soon an event whose predecessor is missing is tried again the first time; it doubles
/// with each try, up to [`EARLY_MAX`].
const EARLY: Duration = Duration::from_millis(20);
const EARLY_MAX: Duration = Duration::from_secs(1);
/// Entries one consumer holds at most (waiting for their key's predecessor or a retry); it
/// reads no more until some are done.
const MAX_HELD: usize = 4096;
/// Batches read per round at most.
const READS_PER_ROUND: usize = 8;
/// How soon an event of a parked key is looked at again.
const PARKED: Duration = Duration::from_secs(1);
/// How often a consumer looks for dead letters asked to replay.
const REPLAYS_EVERY: Duration = Duration::from_millis(500);

/// What became of one try.
enum Next {
    /// Acknowledge it: handled, a duplicate, stale, or dead-lettered.
    Done,
    /// Keep it and try again at this time.
    Later(Instant),
    /// Its key has not applied its predecessor: try again after the early backoff.
    Early,
}

struct Waiting {
    delivery: Delivery,
    due: Instant,
    /// Tries that found the key's predecessor missing.
    early: u32,
}

/// The version a subscription's events run on: swapped by the deployer on reload.
pub type Target = Arc<arc_swap::ArcSwap<Function>>;

pub struct Consumer {
    sub: SubscriptionConfig,
    name: String,
    function: Target,
    caps: FunctionCaps,
    db: Arc<dyn DbBackend>,
    broker: Arc<dyn Broker>,
    /// This process's consumer name in the group.
    consumer: String,
}

impl Consumer {
    pub fn new(
        sub: SubscriptionConfig,
        function: Target,
        caps: FunctionCaps,
        db: Arc<dyn DbBackend>,
        broker: Arc<dyn Broker>,
    ) -> Self {
        Self {
            name: sub.name(),
            sub,
            function,
            caps,
            db,
            broker,
            consumer: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Consumes until `owner` is dropped.
    pub async fn run<T: Send + Sync + 'static>(self, owner: Weak<T>) {
        let this = Arc::new(self);
        while let Err(e) = this.broker.create_group(&this.sub.topic, &this.name).await {
            tracing::warn!(subscription = %this.name, error = %e, "consumer group not created; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if owner.strong_count() == 0 {
                return;
            }
        }
        tracing::info!(subscription = %this.name, topic = %this.sub.topic, function = %this.sub.function, "consuming");
        let slots = Arc::new(Semaphore::new(this.sub.concurrency as usize));
        let mut waiting: HashMap<String, Waiting> = HashMap::new();
        let mut replays_seen = Instant::now();
        let mut renewed = Instant::now();
        loop {
            if owner.strong_count() == 0 {
                return;
            }
            // What this consumer still holds is renewed well before it would count as idle,
            // so only the entries of a consumer that stopped go to another.
            if renewed.elapsed() >= this.sub.redeliver_after / 3 {
                renewed = Instant::now();
                let held: Vec<String> = waiting
                    .keys()
                    .filter(|e| !e.starts_with(inbox::REPLAY_ENTRY))
                    .cloned()
                    .collect();
                for chunk in held.chunks(500) {
                    if let Err(e) = this
                        .broker
                        .renew(&this.sub.topic, &this.name, &this.consumer, chunk)
                        .await
                    {
                        tracing::warn!(subscription = %this.name, error = %e, "held entries not renewed; another consumer may take them over");
                    }
                }
            }
            // Full of events whose predecessors it has not seen: let those go (not acknowledged,
            // no longer renewed, they come back after `redeliver_after`) and read on, or a
            // shuffled stream could fill every consumer with events that all wait.
            if waiting.len() >= MAX_HELD {
                waiting.retain(|e, w| w.early == 0 || e.starts_with(inbox::REPLAY_ENTRY));
                tracing::debug!(subscription = %this.name, held = waiting.len(), "released events waiting for their predecessors");
            }
            // Read while there is more and room to hold it (a key's events may be far apart),
            // a few batches per round so that handling keeps pace.
            for _ in 0..READS_PER_ROUND {
                if waiting.len() >= MAX_HELD {
                    break;
                }
                match this
                    .broker
                    .read(
                        &this.sub.topic,
                        &this.name,
                        &this.consumer,
                        BATCH,
                        this.sub.redeliver_after,
                    )
                    .await
                {
                    Ok(fresh) => {
                        let full = fresh.len() == BATCH;
                        for d in fresh {
                            waiting.entry(d.entry.clone()).or_insert(Waiting {
                                delivery: d,
                                due: Instant::now(),
                                early: 0,
                            });
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(subscription = %this.name, error = %e, "cannot read from the broker; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                }
            }
            // Dead letters an operator asked to replay run like new deliveries.
            if replays_seen.elapsed() >= REPLAYS_EVERY {
                replays_seen = Instant::now();
                match inbox::replays(this.db.as_ref(), &this.name, BATCH as u32).await {
                    Ok(replays) => {
                        for d in replays {
                            waiting.entry(d.entry.clone()).or_insert(Waiting {
                                delivery: d,
                                due: Instant::now(),
                                early: 0,
                            });
                        }
                    }
                    Err(e) => {
                        tracing::debug!(subscription = %this.name, error = ?e, "replays not read")
                    }
                }
            }
            let now = Instant::now();
            // The due ones, by key in sequence order (each key's run is one task).
            let mut runs: BTreeMap<String, Vec<Delivery>> = BTreeMap::new();
            for (entry, w) in &waiting {
                if w.due <= now {
                    let lane = match this.sub.ordering {
                        Ordering::Key => w.delivery.event.key.clone(),
                        Ordering::None => entry.clone(),
                    };
                    runs.entry(lane).or_default().push(w.delivery.clone());
                }
            }
            if runs.is_empty() {
                tokio::time::sleep(IDLE).await;
                continue;
            }
            let mut settled: Vec<(String, Next)> = Vec::new();
            if this.sub.ordering == Ordering::Key {
                // One query for every due key: what is already applied is acknowledged, and a
                // key whose next event is not among these waits, without a transaction each.
                let keys: Vec<&str> = runs.keys().map(String::as_str).collect();
                match inbox::key_sequences(this.db.as_ref(), &this.name, &this.sub.topic, &keys)
                    .await
                {
                    Ok(applied) => {
                        runs.retain(|key, run| {
                            let last = applied.get(key).copied().unwrap_or(0);
                            run.sort_by_key(|d| d.event.sequence);
                            run.retain(|d| {
                                let old = d.event.sequence <= last
                                    && !d.entry.starts_with(inbox::REPLAY_ENTRY);
                                if old {
                                    settled.push((d.entry.clone(), Next::Done));
                                }
                                !old
                            });
                            match run.first() {
                                Some(d) if d.event.sequence == last + 1 => true,
                                Some(d) if d.entry.starts_with(inbox::REPLAY_ENTRY) => true,
                                _ => {
                                    settled
                                        .extend(run.iter().map(|d| (d.entry.clone(), Next::Early)));
                                    false
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::debug!(subscription = %this.name, error = ?e, "key sequences not read; each event checks its own");
                    }
                }
            }
            let mut tasks = tokio::task::JoinSet::new();
            if !settled.is_empty() {
                tasks.spawn(async move { settled });
            }
            for (_, mut run) in runs {
                run.sort_by_key(|d| d.event.sequence);
                let (this, slots) = (this.clone(), slots.clone());
                tasks.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let mut outcomes = Vec::new();
                    for d in run {
                        let next = this.handle(&d).await;
                        let stop = !matches!(next, Next::Done);
                        outcomes.push((d.entry.clone(), next));
                        // A key's later events wait for this one.
                        if stop && this.sub.ordering == Ordering::Key {
                            break;
                        }
                    }
                    outcomes
                });
            }
            let mut done = Vec::new();
            while let Some(outcomes) = tasks.join_next().await {
                for (entry, next) in outcomes.unwrap_or_default() {
                    match next {
                        Next::Done => {
                            let w = waiting.remove(&entry);
                            match (entry.strip_prefix(inbox::REPLAY_ENTRY), w) {
                                (Some(_), Some(w)) => {
                                    let _ = inbox::replayed(
                                        this.db.as_ref(),
                                        &this.name,
                                        &w.delivery.event.id,
                                    )
                                    .await;
                                }
                                (Some(_), None) => {}
                                (None, _) => done.push(entry),
                            }
                        }
                        Next::Later(at) => {
                            if let Some(w) = waiting.get_mut(&entry) {
                                w.due = at;
                            }
                        }
                        Next::Early => {
                            if let Some(w) = waiting.get_mut(&entry) {
                                w.due = Instant::now()
                                    + EARLY.saturating_mul(1 << w.early.min(8)).min(EARLY_MAX);
                                w.early += 1;
                            }
                        }
                    }
                }
            }
            if let Err(e) = this.broker.ack(&this.sub.topic, &this.name, &done).await {
                // Unacknowledged entries come back and are found in the inbox.
                tracing::warn!(subscription = %this.name, error = %e, "acknowledgement failed; the entries come back as duplicates");
            }
        }
    }

    /// One try of `d`.
    async fn handle(&self, d: &Delivery) -> Next {
        let retry_soon = Next::Later(Instant::now() + Duration::from_millis(500));
        let by_key = self.sub.ordering == Ordering::Key;
        let mut caps = self.caps.instance();
        if let Err(e) = caps.db.hold().await {
            tracing::warn!(subscription = %self.name, error = ?e, "no database transaction for an event; retrying");
            return retry_soon;
        }
        let held = caps.db.held_transaction().expect("held above");
        // The lease, enforced by PostgreSQL: a consumer stopped (paused, partitioned) mid-event
        // for longer than `redeliver_after` has its session ended, so the transaction can never
        // commit after another consumer took the event over, and its locks do not hold that
        // consumer up.
        if self.db.kind() == "postgres"
            && let Err(e) = held
                .execute(
                    &format!(
                        "SET LOCAL idle_in_transaction_session_timeout = {}",
                        self.sub.redeliver_after.as_millis()
                    ),
                    vec![],
                )
                .await
        {
            tracing::warn!(subscription = %self.name, error = ?e, "the event's lease cannot be set; retrying");
            return retry_soon;
        }
        let admission = match inbox::admit(held.as_mut(), &self.name, d, by_key).await {
            Ok(a) => a,
            Err(e) => {
                // Another consumer holds the key or the event (a lock, a unique conflict).
                tracing::debug!(subscription = %self.name, error = ?e, "event not admitted; retrying");
                abandon(&mut caps).await;
                return retry_soon;
            }
        };
        match admission {
            Admission::Apply => {}
            Admission::Duplicate | Admission::Stale => {
                abandon(&mut caps).await;
                return Next::Done;
            }
            Admission::Early => {
                // The admitting transaction ends here, before another query.
                abandon(&mut caps).await;
                let parked =
                    inbox::parked(self.db.as_ref(), &self.name, &d.event.topic, &d.event.key)
                        .await
                        .unwrap_or(false);
                return if parked {
                    Next::Later(Instant::now() + PARKED)
                } else {
                    Next::Early
                };
            }
        }
        // In the held transaction: a second connection per event could exhaust the pool.
        let held = caps.db.held_transaction().expect("held above");
        let attempts = inbox::attempts_in(held.as_mut(), &self.name, &d.event.id)
            .await
            .unwrap_or(0);
        let id = RequestId::new();
        let (ended_tx, ended) = oneshot::channel();
        let function = self.function.load_full();
        let verdict = function
            .handle_event(delivery(d, attempts + 1), &id, caps, ended_tx)
            .await;
        let mut tx = ended.await.ok().and_then(|e| e.held);
        let why = match verdict {
            Ok(Ok(())) => match tx.take() {
                Some(tx) => match tx.commit().await {
                    Ok(()) => return Next::Done,
                    Err(e) => format!("commit failed: {e:?}"),
                },
                None => "the run's transaction was lost".into(),
            },
            Ok(Err(HandlerError::Reject(why))) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.rollback().await;
                }
                return self
                    .bury(d, &format!("rejected: {why}"), attempts + 1)
                    .await;
            }
            Ok(Err(HandlerError::Retry(why))) => why,
            Err(failure) => failure_text(failure).into(),
        };
        if let Some(tx) = tx {
            let _ = tx.rollback().await;
        }
        let tries = match inbox::failed(self.db.as_ref(), &self.name, &d.event.id, &why).await {
            Ok(n) => n,
            Err(_) => attempts + 1,
        };
        tracing::info!(subscription = %self.name, event = %d.event.id, request_id = %id, tries, error = %why, "event handler failed");
        if tries >= self.sub.max_attempts {
            return self.bury(d, &why, tries).await;
        }
        Next::Later(Instant::now() + backoff(self.sub.backoff, tries))
    }

    /// To the dead-letter queue; acknowledged once it is there.
    async fn bury(&self, d: &Delivery, why: &str, attempts: u32) -> Next {
        match inbox::dead_letter(self.db.as_ref(), &self.name, d, why, attempts).await {
            Ok(()) => {
                tracing::warn!(subscription = %self.name, event = %d.event.id, key = %d.event.key, attempts, error = %why, "event moved to the dead-letter queue");
                Next::Done
            }
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = ?e, "dead letter not written; retrying");
                Next::Later(Instant::now() + Duration::from_secs(1))
            }
        }
    }
}

/// Rolls back the transaction a try held, at once: its inbox row (and any lock) stops holding
/// up the other consumers now, not when the connection is next used.
async fn abandon(caps: &mut crate::capabilities::RequestCaps) {
    if let Some(tx) = caps.db.release() {
        let _ = tx.rollback().await;
    }
}

fn failure_text(f: Failure) -> &'static str {
    match f {
        Failure::Trap => "the handler trapped",
        Failure::MemoryExceeded => "the handler went over its memory cap",
        Failure::Timeout => "the handler timed out",
        Failure::NoResponse => "the handler gave no answer",
        Failure::Overloaded => "no instance slot was free",
        Failure::Internal => "a host failure",
    }
}

/// `base * 2^(tries-1)`, at most [`MAX_BACKOFF`], with up to a quarter of jitter either way.
fn backoff(base: Duration, tries: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << tries.saturating_sub(1).min(20));
    let capped = exp.min(MAX_BACKOFF);
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).expect("the OS random source is available");
    let jitter = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.5 - 0.25;
    capped.mul_f64(1.0 + jitter)
}

fn delivery(d: &Delivery, attempt: u32) -> crate::runtime::Delivery {
    let e = &d.event;
    crate::runtime::Delivery {
        id: e.id.clone(),
        topic: e.topic.clone(),
        key: e.key.clone(),
        sequence: e.sequence,
        payload: e.payload.clone(),
        headers: e.headers.clone(),
        source: e.source.clone(),
        published_at: u64::try_from(e.created_at).unwrap_or(0),
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let base = Duration::from_millis(100);
        for (tries, nominal) in [(1, 100), (2, 200), (3, 400), (30, 300_000)] {
            let b = backoff(base, tries).as_millis() as f64;
            let n = nominal as f64;
            assert!((n * 0.75..=n * 1.25).contains(&b), "try {tries}: {b} ms");
        }
    }
}
