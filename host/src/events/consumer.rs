//! A subscription's consumer: every process runs one per subscription, in the subscription's
//! consumer group, and handles each event exactly once in effect.
//!
//! Due events go out in groups (up to `concurrency` at work, each up to [`GROUP_MAX`] events
//! of whole keys, so a key is in one group at a time and the next group of a key starts only
//! after the last one ended). A group is one transaction: for each event the host asks the
//! inbox to admit it (one statement on PostgreSQL; a duplicate or an older event is
//! acknowledged without running anything; one whose key has not applied its predecessor
//! waits), runs the handler (a savepoint is taken before the handler's first statement, none
//! if it makes none), and if the handler fails rolls back to that savepoint and takes the
//! admission back; so one commit carries the group's applied events with their inbox records,
//! then their broker entries are acknowledged. On PostgreSQL with ordering by key a group whose
//! runs follow on from their keys is admitted in one statement instead. A handler that fails
//! (`retry`, a trap, a timeout) is rolled back and tried again after a backoff that doubles,
//! with jitter; after `max_attempts` (or at once on `reject`) the event goes to the
//! dead-letter queue and, with `ordering = "key"`, its key waits (parked) while the others
//! keep flowing.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::broker::{Broker, Delivery};
use super::inbox::{self, Admission};
use crate::capabilities::FunctionCaps;
use crate::capabilities::db::{DbBackend, DbTransaction};
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
/// Tries that found an event's predecessor missing before a full consumer lets it go (about
/// 300 ms of waiting with [`EARLY`] doubling).
const RELEASE_EARLY: u32 = 4;
/// Batches read per round at most.
const READS_PER_ROUND: usize = 8;
/// How soon an event of a parked key is looked at again.
const PARKED: Duration = Duration::from_secs(1);
/// Events one transaction handles at most.
const GROUP_MAX: usize = 32;
/// Runs that made statements (each in a savepoint, and a guest's own transactions are
/// savepoints too) one transaction holds at most: PostgreSQL slows down once a transaction
/// has more than 64 subtransactions.
const MARKED_MAX: usize = 16;
/// Lanes whose applied sequences one query checks at most.
const CHECK_LANES: usize = 256;
/// How often a consumer claims entries left idle by another.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
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

impl Next {
    /// Try again shortly: the try could not be made or kept (no transaction, a lost one, a
    /// commit that failed, a conflict with another consumer), through no fault of the event.
    fn soon() -> Self {
        Self::Later(Instant::now() + Duration::from_millis(500))
    }
}

struct Waiting {
    /// Shared: the loop hands it to groups on every round, and a payload can be large.
    delivery: Arc<Delivery>,
    due: Instant,
    /// Tries that found the key's predecessor missing.
    early: u32,
}

impl Waiting {
    /// Holds `d`, due now, unless it is held already (a second delivery of an entry at work).
    fn hold(waiting: &mut HashMap<String, Waiting>, d: Delivery) {
        waiting.entry(d.entry.clone()).or_insert(Waiting {
            delivery: Arc::new(d),
            due: Instant::now(),
            early: 0,
        });
    }
}

/// One lane's due events (shared with the held ones), in sequence order once grouped.
type Run = Vec<Arc<Delivery>>;

/// The consumer's in-memory maps, hashed with foldhash: the loop looks up every held entry's
/// lane each round, and SipHash was a tenth of a busy consumer's time.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

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
        let mut waiting: HashMap<String, Waiting> = HashMap::default();
        // Groups at work (at most `concurrency`), each with the lanes it holds.
        let mut tasks = tokio::task::JoinSet::new();
        let mut busy: HashSet<String> = HashSet::default();
        // Lanes whose group just ended: their events waiting for a predecessor are due at once
        // (it may just have been applied), not after their backoff.
        let mut ended: HashSet<String> = HashSet::default();
        let mut replays_seen = Instant::now();
        let mut renewed = Instant::now();
        let mut appended = super::relay::APPENDED.watch();
        let mut claimed = Instant::now()
            .checked_sub(CLAIM_EVERY)
            .unwrap_or_else(Instant::now);
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
            // Full of events whose predecessors it has not seen for a while: let those go (not
            // acknowledged, no longer renewed, they come back after `redeliver_after`) and read
            // on, or a shuffled stream could fill every consumer with events that all wait. An
            // event only just early stays: concurrent publishers put a key's events slightly
            // out of order in the stream, and its predecessor is usually one read away (let go,
            // it would hold its key up for `redeliver_after`).
            if waiting.len() >= MAX_HELD {
                waiting.retain(|e, w| {
                    w.early < RELEASE_EARLY
                        || e.starts_with(inbox::REPLAY_ENTRY)
                        || busy.contains(this.lane(e, &w.delivery))
                });
                tracing::debug!(subscription = %this.name, held = waiting.len(), "released events waiting for their predecessors");
            }
            // Read while there is more and room to hold it (a key's events may be far apart),
            // a few batches per round so that handling keeps pace.
            for _ in 0..READS_PER_ROUND {
                if waiting.len() >= MAX_HELD {
                    break;
                }
                // Entries a stopped consumer left are looked for now and then: claiming scans
                // the group's pending entries, and they wait `redeliver_after` anyway.
                let claim = (claimed.elapsed() >= CLAIM_EVERY).then(|| {
                    claimed = Instant::now();
                    this.sub.redeliver_after
                });
                match this
                    .broker
                    .read(&this.sub.topic, &this.name, &this.consumer, BATCH, claim)
                    .await
                {
                    Ok(fresh) => {
                        let full = fresh.len() == BATCH;
                        fresh
                            .into_iter()
                            .for_each(|d| Waiting::hold(&mut waiting, d));
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
                        replays
                            .into_iter()
                            .for_each(|d| Waiting::hold(&mut waiting, d));
                    }
                    Err(e) => {
                        tracing::debug!(subscription = %this.name, error = ?e, "replays not read")
                    }
                }
            }
            // Due events of lanes no group is working on, as many whole runs (a lane's due
            // events, in sequence order) as the free groups take.
            let free = (this.sub.concurrency as usize).saturating_sub(tasks.len());
            let mut settled: Vec<(String, Next)> = Vec::new();
            if free > 0 {
                let now = Instant::now();
                let mut due: HashMap<&str, Vec<&Arc<Delivery>>> = HashMap::default();
                for (entry, w) in &waiting {
                    let lane = this.lane(entry, &w.delivery);
                    let woken = w.early > 0 && ended.contains(lane);
                    if (w.due <= now || woken) && !busy.contains(lane) {
                        due.entry(lane).or_default().push(&w.delivery);
                    }
                }
                ended.clear();
                // Checked a slice of lanes at a time (one query each), until the free groups
                // are full: in a shuffled stream most held events wait for a predecessor, and
                // those go back to wait without taking a group's place. A slice is about what
                // the free groups take (in an ordered stream nearly every lane can run), so a
                // group that just ended does not cost a look at every held key.
                let check = (free * GROUP_MAX).clamp(GROUP_MAX, CHECK_LANES);
                // Oldest first: the map's order is the same every round, and under a backlog
                // the lanes at its end would wait for all the others (seconds).
                let mut due: Vec<(&str, Vec<&Arc<Delivery>>)> = due.into_iter().collect();
                due.sort_unstable_by_key(|(_, run)| {
                    run.iter().map(|d| d.event.created_at).min().unwrap_or(0)
                });
                let mut runs: BTreeMap<String, Run> = BTreeMap::new();
                let mut taken = 0;
                for slice in due.chunks(check) {
                    if taken >= free * GROUP_MAX {
                        break;
                    }
                    let mut candidates: BTreeMap<String, Run> = slice
                        .iter()
                        .map(|(lane, run)| {
                            (
                                lane.to_string(),
                                run.iter().map(|d| Arc::clone(d)).collect(),
                            )
                        })
                        .collect();
                    if this.sub.ordering == Ordering::Key {
                        this.drop_applied(&mut candidates, &mut settled).await;
                    }
                    for (lane, run) in candidates {
                        if taken >= free * GROUP_MAX {
                            break;
                        }
                        taken += run.len();
                        runs.insert(lane, run);
                    }
                }
                if !runs.is_empty() {
                    for (lanes, group) in groups(runs, free) {
                        busy.extend(lanes.iter().cloned());
                        let this = this.clone();
                        tasks.spawn(async move { (lanes, this.handle_group(group).await) });
                    }
                }
            }
            this.settle(&mut waiting, settled).await;
            // Wait for a group to finish, this process's relay to append, or a moment (another
            // process may have appended).
            let first = if tasks.is_empty() {
                tokio::select! {
                    _ = appended.changed() => {}
                    _ = tokio::time::sleep(IDLE) => {}
                }
                None
            } else {
                tokio::select! {
                    finished = tasks.join_next() => finished,
                    _ = appended.changed() => None,
                    _ = tokio::time::sleep(IDLE) => None,
                }
            };
            let mut finished = first.into_iter().collect::<Vec<_>>();
            while let Some(more) = tasks.try_join_next() {
                finished.push(more);
            }
            let mut outcomes = Vec::new();
            ended.clear();
            for (lanes, group) in finished.into_iter().flatten() {
                for lane in &lanes {
                    busy.remove(lane);
                }
                ended.extend(lanes);
                outcomes.extend(group);
            }
            this.settle(&mut waiting, outcomes).await;
        }
    }

    /// Where an entry queues: its key with ordering by key, else the entry itself.
    fn lane<'a>(&self, entry: &'a str, d: &'a Delivery) -> &'a str {
        match self.sub.ordering {
            Ordering::Key => &d.event.key,
            Ordering::None => entry,
        }
    }

    /// Checks every due key's applied sequence in one query: what is already applied is
    /// settled (acknowledged), and a key whose next event is not among these waits, without a
    /// transaction each.
    async fn drop_applied(
        &self,
        runs: &mut BTreeMap<String, Run>,
        settled: &mut Vec<(String, Next)>,
    ) {
        let keys: Vec<&str> = runs.keys().map(String::as_str).collect();
        let applied = match inbox::key_sequences(
            self.db.as_ref(),
            &self.name,
            &self.sub.topic,
            &keys,
        )
        .await
        {
            Ok(applied) => applied,
            Err(e) => {
                tracing::debug!(subscription = %self.name, error = ?e, "key sequences not read; each event checks its own");
                return;
            }
        };
        runs.retain(|key, run| {
            let last = applied.get(key).copied().unwrap_or(0);
            run.sort_by_key(|d| d.event.sequence);
            run.retain(|d| {
                let old = d.event.sequence <= last && !d.entry.starts_with(inbox::REPLAY_ENTRY);
                if old {
                    settled.push((d.entry.clone(), Next::Done));
                }
                !old
            });
            match run.first() {
                Some(d) if d.event.sequence == last + 1 => true,
                Some(d) if d.entry.starts_with(inbox::REPLAY_ENTRY) => true,
                _ => {
                    settled.extend(run.iter().map(|d| (d.entry.clone(), Next::Early)));
                    false
                }
            }
        });
    }

    /// Applies what became of entries: the done ones leave (acknowledged; a replayed dead
    /// letter is marked replayed), the others are due again later.
    async fn settle(&self, waiting: &mut HashMap<String, Waiting>, outcomes: Vec<(String, Next)>) {
        let mut done = Vec::new();
        for (entry, next) in outcomes {
            match next {
                Next::Done => {
                    let w = waiting.remove(&entry);
                    match (entry.strip_prefix(inbox::REPLAY_ENTRY), w) {
                        (Some(_), Some(w)) => {
                            let _ =
                                inbox::replayed(self.db.as_ref(), &self.name, &w.delivery.event.id)
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
        if done.is_empty() {
            return;
        }
        if let Err(e) = self.broker.ack(&self.sub.topic, &self.name, &done).await {
            // Unacknowledged entries come back and are found in the inbox.
            tracing::warn!(subscription = %self.name, error = %e, "acknowledgement failed; the entries come back as duplicates");
        }
    }

    /// Tries `runs` (each one key's due events, in sequence order) in one transaction: one
    /// commit for the group, and a failing event takes back only its own work and its key's
    /// later events. On PostgreSQL with ordering by key the group's events are admitted in one
    /// statement ([`inbox::admit_runs`]) when each run follows on from what its key applied (what
    /// [`Consumer::drop_applied`] found); otherwise, or if that does not take, one at a time
    /// ([`Consumer::try_one`]), which also says what became of a duplicate or an early event.
    /// A key's later events wait when one of its events does not apply; events past
    /// [`GROUP_MAX`] (or past [`MARKED_MAX`] runs that made statements) stay due for the next
    /// round. What an event leaves (`Next::Done`) counts only once the group committed;
    /// failures are counted and dead letters written after the group's transaction ended (on
    /// SQLite it holds the only write lock).
    async fn handle_group(&self, runs: Vec<Run>) -> Vec<(String, Next)> {
        let everything_soon = |runs: &[Run]| {
            runs.iter()
                .flatten()
                .map(|d| (d.entry.clone(), Next::soon()))
                .collect::<Vec<_>>()
        };
        let mut tx = match self.begin_group().await {
            Ok(tx) => tx,
            Err(why) => {
                tracing::warn!(subscription = %self.name, error = %why, "no transaction for events; retrying");
                return everything_soon(&runs);
            }
        };
        let ids: Vec<&str> = runs.iter().flatten().map(|d| d.event.id.as_str()).collect();
        let attempts = match inbox::attempts_of(tx.as_mut(), &self.name, &ids).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = ?e, "tries of events not read; retrying");
                return everything_soon(&runs);
            }
        };
        let mut budget = GROUP_MAX;
        let fitting: Vec<&[Arc<Delivery>]> = runs
            .iter()
            .map_while(|run| {
                let n = run.len().min(budget);
                budget -= n;
                (n > 0).then(|| &run[..n])
            })
            .collect();
        let batch = self.batches(&fitting);
        let admitted = if batch {
            let admitted =
                inbox::admit_runs(tx.as_mut(), &self.name, &self.sub.topic, &fitting).await;
            if let Err(e) = &admitted {
                tracing::debug!(subscription = %self.name, error = ?e, "events not admitted together; one at a time");
            }
            admitted.unwrap_or(false)
        } else {
            false
        };
        let Tried {
            tx,
            mut settled,
            applied,
            failed,
        } = if admitted {
            self.try_runs(tx, &fitting, &attempts, true).await
        } else {
            if batch {
                // Something in it was not new or not next: one at a time says what.
                let _ = tx.rollback().await;
                tx = match self.begin_group().await {
                    Ok(tx) => tx,
                    Err(why) => {
                        tracing::warn!(subscription = %self.name, error = %why, "no transaction for events; retrying");
                        return everything_soon(&runs);
                    }
                };
            }
            self.try_runs(tx, &fitting, &attempts, false).await
        };
        let committed = match tx {
            Some(tx) => match tx.commit().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(subscription = %self.name, error = ?e, "events' transaction not committed; retrying them");
                    false
                }
            },
            None => false,
        };
        settled.extend(
            applied
                .into_iter()
                .map(|entry| (entry, if committed { Next::Done } else { Next::soon() })),
        );
        for (d, why, tries, reject) in failed {
            let next = if reject {
                self.bury(d, &format!("rejected: {why}"), tries).await
            } else {
                self.count_failure(d, &why).await
            };
            settled.push((d.entry.clone(), next));
        }
        settled
    }

    /// Whether `runs` can be admitted in one statement: on PostgreSQL, by key, every run
    /// of new deliveries of this subscription's topic with consecutive sequences.
    fn batches(&self, runs: &[&[Arc<Delivery>]]) -> bool {
        self.sub.ordering == Ordering::Key
            && self.db.kind() == "postgres"
            && runs.iter().all(|run| {
                run.iter().all(|d| {
                    d.event.topic == self.sub.topic && !d.entry.starts_with(inbox::REPLAY_ENTRY)
                }) && run
                    .windows(2)
                    .all(|w| w[1].event.sequence == w[0].event.sequence + 1)
            })
    }

    /// Tries the events of `runs` in `tx`, in order: runs the handlers of events `admitted`
    /// together, or admits and runs one at a time. A key's later events wait when one of its
    /// events does not apply (admitted together, they are taken back with it); past
    /// [`MARKED_MAX`] runs that made statements, what is left stays due (taken back first if
    /// it was admitted).
    async fn try_runs<'a>(
        &self,
        tx: Box<dyn DbTransaction>,
        runs: &[&'a [Arc<Delivery>]],
        attempts: &std::collections::HashMap<String, u32>,
        admitted: bool,
    ) -> Tried<'a> {
        let mut tried = Tried::new(tx);
        let mut marks = 0;
        'runs: for run in runs {
            for (i, d) in run.iter().enumerate() {
                let Some(held) = tried.tx.take() else {
                    break 'runs;
                };
                if marks >= MARKED_MAX {
                    tried.tx = if admitted {
                        take_back(held, &self.name, &run[i..], true).await
                    } else {
                        Some(held)
                    };
                    continue 'runs;
                }
                let tries = attempts.get(&d.event.id).copied().unwrap_or(0);
                let (back, step, marked) = if admitted {
                    self.run_tail(held, &run[i..], tries, true).await
                } else {
                    self.try_one(held, d, tries).await
                };
                marks += usize::from(marked);
                tried.tx = back;
                let go_on = match step {
                    Step::Applied => {
                        tried.applied.push(d.entry.clone());
                        true
                    }
                    Step::Settled(next) => {
                        let done = matches!(next, Next::Done);
                        tried.settled.push((d.entry.clone(), next));
                        done
                    }
                    Step::Failed(why, reject) => {
                        tried.failed.push((d, why, tries + 1, reject));
                        false
                    }
                };
                if !go_on && self.sub.ordering == Ordering::Key {
                    continue 'runs;
                }
            }
        }
        tried
    }

    /// Runs the first event of `tail` (the rest of its key's run, all admitted); if it fails,
    /// takes back the admission of the whole tail (with the key's move if `moved`).
    async fn run_tail(
        &self,
        tx: Box<dyn DbTransaction>,
        tail: &[Arc<Delivery>],
        tries: u32,
        moved: bool,
    ) -> (Option<Box<dyn DbTransaction>>, Step, bool) {
        let ran = self.run_handler(tx, &tail[0], tries).await;
        match ran.failed {
            None => (ran.tx, Step::Applied, ran.marked),
            Some((why, reject)) => {
                let tx = match ran.tx {
                    Some(tx) => take_back(tx, &self.name, tail, moved).await,
                    None => None,
                };
                (tx, Step::Failed(why, reject), ran.marked)
            }
        }
    }

    /// The group's transaction, with the lease set on PostgreSQL: a consumer stopped (paused,
    /// partitioned) mid-group for longer than `redeliver_after` has its session ended, so the
    /// transaction can never commit after another consumer took the events over, and its
    /// locks do not hold that consumer up.
    async fn begin_group(&self) -> Result<Box<dyn DbTransaction>, String> {
        let mut tx = self.db.begin().await.map_err(|e| format!("{e:?}"))?;
        if self.db.kind() == "postgres" {
            tx.execute(
                &format!(
                    "SET LOCAL idle_in_transaction_session_timeout = {}",
                    self.sub.redeliver_after.as_millis()
                ),
                vec![],
            )
            .await
            .map_err(|e| format!("the lease cannot be set: {e:?}"))?;
        }
        Ok(tx)
    }

    /// One try of `d` in `tx`: admitted, then run; gives the transaction back unless it was
    /// lost, and says whether the run took a savepoint. What the try wrote is taken back if it
    /// does not apply: the admission by [`inbox::unadmit`], the handler's own statements by
    /// rolling back to the savepoint taken before its first.
    async fn try_one(
        &self,
        mut tx: Box<dyn DbTransaction>,
        d: &Arc<Delivery>,
        tries: u32,
    ) -> (Option<Box<dyn DbTransaction>>, Step, bool) {
        let soon = Step::Settled(Next::soon());
        let by_key = self.sub.ordering == Ordering::Key;
        let admission = match inbox::admit(tx.as_mut(), self.db.kind(), &self.name, d, by_key).await
        {
            Ok(a) => a,
            Err(e) => {
                // Another consumer holds the key or the event (a lock, a unique conflict):
                // the statement failed, and with it the group's transaction.
                tracing::debug!(subscription = %self.name, error = ?e, "event not admitted; retrying");
                return (None, soon, false);
            }
        };
        let this = std::slice::from_ref(d);
        match admission {
            Admission::Apply => {}
            Admission::Duplicate => return (Some(tx), Step::Settled(Next::Done), false),
            Admission::Stale => {
                let tx = take_back(tx, &self.name, this, false).await;
                return (tx, Step::Settled(Next::Done), false);
            }
            Admission::Early => {
                let tx = take_back(tx, &self.name, this, false).await;
                let parked =
                    inbox::parked(self.db.as_ref(), &self.name, &d.event.topic, &d.event.key)
                        .await
                        .unwrap_or(false);
                let next = if parked {
                    Next::Later(Instant::now() + PARKED)
                } else {
                    Next::Early
                };
                return (tx, Step::Settled(next), false);
            }
        }
        self.run_tail(tx, this, tries, by_key).await
    }

    /// Runs the handler of `d` (admitted) in `tx`; a failed run is rolled back to its
    /// savepoint, if it took one.
    async fn run_handler(&self, tx: Box<dyn DbTransaction>, d: &Delivery, tries: u32) -> Ran {
        let mut caps = self.caps.instance();
        caps.db.hold_in(tx, Some(SAVEPOINT));
        let id = RequestId::new();
        let (ended_tx, ended) = oneshot::channel();
        let function = self.function.load_full();
        let verdict = function
            .handle_event(delivery(d, tries + 1), &id, caps, ended_tx)
            .await;
        let held = ended.await.ok().and_then(|e| e.held);
        let (why, reject) = match verdict {
            Ok(Ok(())) => match held {
                Some(held) => {
                    return Ran {
                        tx: Some(held.tx),
                        marked: held.marked,
                        failed: None,
                    };
                }
                None => ("the run's transaction was lost".to_string(), false),
            },
            Ok(Err(HandlerError::Reject(why))) => (why, true),
            Ok(Err(HandlerError::Retry(why))) => (why, false),
            Err(failure) => (failure_text(failure).to_string(), false),
        };
        tracing::info!(subscription = %self.name, event = %d.event.id, request_id = %id, tries = tries + 1, error = %why, "event handler failed");
        let marked = held.as_ref().is_some_and(|h| h.marked);
        let tx = match held {
            Some(mut held) if held.marked => {
                match held
                    .tx
                    .execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"), vec![])
                    .await
                {
                    Ok(_) => Some(held.tx),
                    Err(e) => {
                        tracing::debug!(error = ?e, "rollback to an event's savepoint failed");
                        None
                    }
                }
            }
            Some(held) => Some(held.tx),
            None => None,
        };
        Ran {
            tx,
            marked,
            failed: Some((why, reject)),
        }
    }

    /// Counts a failed try of `d`: tried again after the backoff, or a dead letter after
    /// `max_attempts`.
    async fn count_failure(&self, d: &Delivery, why: &str) -> Next {
        let tries = match inbox::failed(self.db.as_ref(), &self.name, &d.event.id, why).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = ?e, "a failed try not counted; retrying");
                return Next::Later(Instant::now() + Duration::from_secs(1));
            }
        };
        if tries >= self.sub.max_attempts {
            return self.bury(d, why, tries).await;
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

/// The savepoint an event's run takes before its first statement.
const SAVEPOINT: &str = "wasmgate_event";

/// Takes back the admission of `tail` (the end of one key's run, with its key's move if
/// `moved`) in the group's transaction. `None` if that failed: the transaction is unusable and
/// the whole group is tried again.
async fn take_back(
    mut tx: Box<dyn DbTransaction>,
    subscription: &str,
    tail: &[Arc<Delivery>],
    moved: bool,
) -> Option<Box<dyn DbTransaction>> {
    match inbox::unadmit(tx.as_mut(), subscription, tail, moved).await {
        Ok(()) => Some(tx),
        Err(e) => {
            tracing::debug!(error = ?e, "an event's admission was not taken back");
            None
        }
    }
}

/// What trying a group's events left: the transaction (unless lost), what was settled
/// whatever becomes of it, what applied in it, and what failed (with its tries, and whether it
/// was rejected).
struct Tried<'a> {
    tx: Option<Box<dyn DbTransaction>>,
    settled: Vec<(String, Next)>,
    applied: Vec<String>,
    failed: Vec<(&'a Delivery, String, u32, bool)>,
}

impl Tried<'_> {
    fn new(tx: Box<dyn DbTransaction>) -> Self {
        Self {
            tx: Some(tx),
            settled: Vec::new(),
            applied: Vec::new(),
            failed: Vec::new(),
        }
    }
}

/// What a handler's run left: the transaction (unless lost), whether the run took a
/// savepoint, and why it failed (`true`: it rejected the event).
struct Ran {
    tx: Option<Box<dyn DbTransaction>>,
    marked: bool,
    failed: Option<(String, bool)>,
}

/// What one try left.
enum Step {
    /// Applied in the group's transaction: done once it commits.
    Applied,
    /// Decided whatever becomes of the group (a duplicate, an early event...).
    Settled(Next),
    /// The handler failed (or, `true`, rejected the event): counted after the group.
    Failed(String, bool),
}

/// Splits the due runs (one per lane) into at most `slots` groups of about [`GROUP_MAX`]
/// events, each run whole in one group, with the lanes each holds: as many groups as there are
/// runs up to `slots` (a light load still runs in parallel); runs that do not fit wait.
fn groups(runs: BTreeMap<String, Run>, slots: usize) -> Vec<(Vec<String>, Vec<Run>)> {
    let n = slots.min(runs.len()).max(1);
    let mut groups: Vec<(Vec<String>, Vec<Run>, usize)> =
        (0..n).map(|_| (Vec::new(), Vec::new(), 0)).collect();
    for (i, (lane, mut run)) in runs.into_iter().enumerate() {
        let Some(g) = (0..n)
            .map(|k| (i + k) % n)
            .find(|&k| groups[k].2 < GROUP_MAX)
        else {
            break;
        };
        run.sort_by_key(|d| d.event.sequence);
        groups[g].2 += run.len();
        groups[g].0.push(lane);
        groups[g].1.push(run);
    }
    groups
        .into_iter()
        .filter(|g| !g.1.is_empty())
        .map(|(lanes, runs, _)| (lanes, runs))
        .collect()
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
