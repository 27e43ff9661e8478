//! The storage conformance suite: every test runs against PostgreSQL
//! (`postgres::*`) and SQLite (`sqlite::*`) through the same [`Store`]
//! interface, on a database of its own.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use switchyard_store::{
    AgentId, Broker, BrokerId, BrokerStatus, CancelOutcome, Conflict, IntentFilter, IntentId,
    IntentOutcome, IntentState, MessageId, MessageState, NewAgent, NewBrokerCall, NewEvent,
    NewIntent, NewMessage, Op, Phase, QueueDepth, ReplicaId, RequeuePolicy, SessionHeartbeat,
    SessionId, StatusReport, Store, StoreError, Transport, open,
};
use switchyard_testkit::{FromTestDb, TestDb};

/// A migrated database and a way to open more independent stores (separate
/// pools, so separate connections) on it, as separate replicas would.
struct Fixture {
    db: TestDb,
    store: Arc<dyn Store>,
}

impl Fixture {
    async fn replica(&self) -> Arc<dyn Store> {
        open(self.db.url()).await.expect("open another store")
    }
}

impl FromTestDb for Fixture {
    async fn from_test_db(db: TestDb) -> Self {
        let store = open(db.url()).await.expect("open");
        Fixture { db, store }
    }
}

switchyard_testkit::on_both_backends!(
    worker_threads = 4;
    migrations_are_idempotent,
    a_database_keeps_one_hub_id_and_another_database_has_another,
    a_reader_of_the_event_log_never_skips_an_event_appended_concurrently,
    pruning_the_event_log_raises_its_horizon_and_ids_are_never_reused,
    replica_registry_tracks_liveness,
    reaping_a_dead_replica_releases_its_affinities,
    affinity_claim_is_newest_wins_and_returns_previous_holder,
    a_poll_moves_its_session_to_its_replica_only_while_the_session_is_live,
    only_poll_sessions_lapse,
    a_poll_sends_again_what_was_not_acknowledged_but_not_a_received_dispatch,
    a_message_and_its_files_are_written_all_or_none_and_removed_once_final,
    concurrent_sends_of_files_with_one_key_write_one_message,
    late_release_of_superseded_session_changes_nothing,
    heartbeat_of_superseded_session_reports_superseded,
    release_replica_affinities_touches_only_that_replica,
    concurrent_flapping_ends_on_the_last_claim,
    broker_names_are_unique_and_delete_is_refused_while_agents_live,
    agent_definitions_validate_broker_and_name,
    agent_status_applies_only_newer_reports_from_its_own_broker,
    intent_idempotency_key_returns_the_original_row,
    concurrent_inserts_with_one_key_create_one_row,
    inserts_name_the_replica_holding_the_brokers_session,
    no_session_is_claimed_between_reading_the_holder_and_the_commit,
    intent_batch_with_one_invalid_item_inserts_nothing,
    intents_are_claimed_in_per_agent_order_in_batches,
    claim_skips_an_agent_with_work_in_flight_elsewhere,
    sixteen_claimers_claim_each_of_1000_intents_exactly_once,
    done_never_becomes_failed,
    racing_outcomes_leave_exactly_one,
    requeue_returns_dead_claimers_work_then_fails_after_max_attempts,
    requeue_returns_work_whose_lease_ran_out,
    intents_past_deadline_fail_and_finished_ones_stay,
    messages_keep_per_agent_fifo_order,
    message_batch_with_one_invalid_item_inserts_nothing,
    message_idempotency_and_idempotent_ack,
    a_key_reused_for_another_request_refuses_the_batch_and_writes_nothing,
    concurrent_lifecycle_calls_on_one_agent_write_one_intent,
    nothing_is_queued_behind_an_unfinished_delete,
    ack_from_another_broker_changes_nothing,
    batch_acks_deliver_their_own_and_report_the_rest,
    concurrent_message_claimers_deliver_each_once_in_order,
    messages_past_ttl_expire,
    expired_messages_are_never_claimed_and_delayed_ones_hold_back_their_agent,
    a_cancel_changes_only_pending_work_and_says_what_it_found,
    a_new_session_requeues_the_brokers_in_flight_work,
    work_sent_on_max_attempts_sessions_is_dead_lettered_and_its_agent_moves_on,
    intent_and_message_claims_for_one_broker_at_once_both_claim,
    operations_and_messages_of_one_agent_keep_one_order,
    a_superseded_session_claims_nothing,
    one_singleton_at_a_time_and_a_successor_when_it_goes,
    finished_rows_are_pruned_and_stuck_work_is_counted,
    queue_depths_count_unfinished_work_per_agent_and_broker_call,
    admin_tokens_and_handshake_nonces,
    agents_are_found_by_name_until_deleted,
);

// --- helpers ------------------------------------------------------------

async fn broker(store: &dyn Store, name: &str) -> Broker {
    store
        .create_broker(BrokerId::new(), name, "hash")
        .await
        .expect("create broker")
}

async fn agent(store: &dyn Store, broker: BrokerId, name: &str) -> AgentId {
    store
        .create_agent(NewAgent {
            id: AgentId::new(),
            name: name.into(),
            broker_id: broker,
            command: vec!["sleep".into(), "60".into()],
            env: BTreeMap::new(),
            labels: Default::default(),
        })
        .await
        .expect("create agent")
        .id
}

/// The broker's live session, opening one (on a fresh replica) if it has
/// none: claims only take work of a broker's current session.
async fn session_of(store: &dyn Store, broker: BrokerId) -> (BrokerId, SessionId) {
    let row = store.broker(broker).await.unwrap();
    if let Some(affinity) = row.affinity() {
        return (broker, affinity.session);
    }
    let session = SessionId::new();
    store
        .claim_affinity(broker, ReplicaId::new(), session, Transport::Ws)
        .await
        .unwrap();
    (broker, session)
}

fn intent(agent: AgentId, op: Op) -> NewIntent {
    NewIntent {
        id: IntentId::new(),
        agent_id: agent,
        op,
        name: (op == Op::Call).then(|| "inspect".to_owned()),
        args: json!({}),
        deadline: Utc::now() + chrono::Duration::minutes(5),
        idempotency_key: None,
        request_digest: None,
    }
}

fn message(agent: AgentId, body: serde_json::Value) -> NewMessage {
    NewMessage {
        id: MessageId::new(),
        agent_id: agent,
        body,
        expires_at: Utc::now() + chrono::Duration::minutes(5),
        deliver_after: None,
        idempotency_key: None,
        request_digest: None,
    }
}

fn policy(replica_stale_after: Duration, lease: Duration, max_attempts: i32) -> RequeuePolicy {
    RequeuePolicy {
        replica_stale_after,
        lease,
        poll_lease: LONG,
        max_attempts,
    }
}

const LONG: Duration = Duration::from_secs(3600);

// --- schema -------------------------------------------------------------

async fn migrations_are_idempotent(f: Fixture) {
    // `open` migrated once already; opening again re-runs the migrator.
    let again = f.replica().await;
    again.ping().await.expect("ping");
    let db = switchyard_store::Database::connect(f.db.url())
        .await
        .unwrap();
    db.migrate(f.db.url())
        .await
        .expect("second migrate is a no-op");
}

async fn a_database_keeps_one_hub_id_and_another_database_has_another(f: Fixture) {
    let hub = f.store.hub_id().await.unwrap();
    assert_eq!(f.replica().await.hub_id().await.unwrap(), hub);
    let other = if f.db.url().starts_with("postgres") {
        TestDb::postgres().await
    } else {
        TestDb::sqlite()
    };
    let other_hub = open(other.url()).await.unwrap().hub_id().await.unwrap();
    assert_ne!(other_hub, hub, "each database is a hub of its own");
}

// --- replicas -----------------------------------------------------------

async fn replica_registry_tracks_liveness(f: Fixture) {
    let s = &*f.store;
    let a = ReplicaId::new();
    let b = ReplicaId::new();
    s.register_replica(a, "127.0.0.1:1").await.unwrap();
    s.register_replica(b, "127.0.0.1:2").await.unwrap();
    // Registering again refreshes the row instead of failing.
    let again = s.register_replica(a, "127.0.0.1:3").await.unwrap();
    assert_eq!(again.address, "127.0.0.1:3");
    assert_eq!(s.live_replicas(LONG).await.unwrap().len(), 2);

    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(s.heartbeat_replica(a).await.unwrap());
    let live = s.live_replicas(Duration::from_millis(500)).await.unwrap();
    assert_eq!(
        live.iter().map(|r| r.instance_id).collect::<Vec<_>>(),
        vec![a]
    );

    let reaped = s
        .reap_dead_replicas(Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(reaped, vec![b]);
    assert!(
        !s.heartbeat_replica(b).await.unwrap(),
        "a reaped replica must re-register"
    );
}

async fn reaping_a_dead_replica_releases_its_affinities(f: Fixture) {
    let s = &*f.store;
    let (dead, live) = (ReplicaId::new(), ReplicaId::new());
    s.register_replica(dead, "dead").await.unwrap();
    let b1 = broker(s, "b1").await;
    let b2 = broker(s, "b2").await;
    s.claim_affinity(b1.id, dead, SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.register_replica(live, "live").await.unwrap();
    let s2 = SessionId::new();
    s.claim_affinity(b2.id, live, s2, Transport::Ws)
        .await
        .unwrap();

    assert_eq!(
        s.reap_dead_replicas(Duration::from_millis(500))
            .await
            .unwrap(),
        vec![dead]
    );
    let b1 = s.broker(b1.id).await.unwrap();
    assert_eq!(b1.status, BrokerStatus::Offline);
    assert_eq!(b1.affinity(), None);
    let b2 = s.broker(b2.id).await.unwrap();
    assert_eq!(
        b2.affinity().map(|a| (a.replica, a.session)),
        Some((live, s2))
    );
}

// --- affinity -----------------------------------------------------------

async fn affinity_claim_is_newest_wins_and_returns_previous_holder(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let (ra, rb) = (ReplicaId::new(), ReplicaId::new());
    let (s1, s2) = (SessionId::new(), SessionId::new());
    assert_eq!(
        s.claim_affinity(b.id, ra, s1, Transport::Ws).await.unwrap(),
        None
    );
    let prev = s
        .claim_affinity(b.id, rb, s2, Transport::Ws)
        .await
        .unwrap()
        .expect("previous");
    assert_eq!((prev.replica, prev.session), (ra, s1));
    let now = s.broker(b.id).await.unwrap();
    assert_eq!(now.status, BrokerStatus::Online);
    assert_eq!(
        (now.connected_replica, now.session_id),
        (Some(rb), Some(s2))
    );
    assert!(now.last_heartbeat.is_some());

    let err = s
        .claim_affinity(BrokerId::new(), ra, SessionId::new(), Transport::Ws)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(switchyard_store::Entity::Broker)),
        "{err:?}"
    );
}

async fn late_release_of_superseded_session_changes_nothing(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let (ra, rb) = (ReplicaId::new(), ReplicaId::new());
    let (old, new) = (SessionId::new(), SessionId::new());
    s.claim_affinity(b.id, ra, old, Transport::Ws)
        .await
        .unwrap();
    s.claim_affinity(b.id, rb, new, Transport::Ws)
        .await
        .unwrap();

    // A's socket teardown arrives after B's claim.
    assert!(!s.release_affinity(b.id, ra, old).await.unwrap());
    // Same session id from the wrong replica does not clear either.
    assert!(!s.release_affinity(b.id, ra, new).await.unwrap());
    let row = s.broker(b.id).await.unwrap();
    assert_eq!(row.status, BrokerStatus::Online);
    assert_eq!(
        row.affinity().map(|a| (a.replica, a.session)),
        Some((rb, new))
    );

    assert!(s.release_affinity(b.id, rb, new).await.unwrap());
    let row = s.broker(b.id).await.unwrap();
    assert_eq!(row.status, BrokerStatus::Offline);
    assert_eq!(row.affinity(), None);
    // Releasing twice is harmless.
    assert!(!s.release_affinity(b.id, rb, new).await.unwrap());
}

async fn heartbeat_of_superseded_session_reports_superseded(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let (old, new) = (SessionId::new(), SessionId::new());
    s.claim_affinity(b.id, ReplicaId::new(), old, Transport::Ws)
        .await
        .unwrap();
    assert_eq!(
        s.heartbeat_session(b.id, old).await.unwrap(),
        SessionHeartbeat::Current
    );
    s.claim_affinity(b.id, ReplicaId::new(), new, Transport::Ws)
        .await
        .unwrap();
    let before = s.broker(b.id).await.unwrap();
    assert_eq!(
        s.heartbeat_session(b.id, old).await.unwrap(),
        SessionHeartbeat::Superseded
    );
    assert_eq!(
        s.broker(b.id).await.unwrap(),
        before,
        "a stale heartbeat changes nothing"
    );
    assert_eq!(
        s.heartbeat_session(b.id, new).await.unwrap(),
        SessionHeartbeat::Current
    );
}

async fn release_replica_affinities_touches_only_that_replica(f: Fixture) {
    let s = &*f.store;
    let (ra, rb) = (ReplicaId::new(), ReplicaId::new());
    let b1 = broker(s, "b1").await;
    let b2 = broker(s, "b2").await;
    let b3 = broker(s, "b3").await;
    s.claim_affinity(b1.id, ra, SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    s.claim_affinity(b2.id, ra, SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    s.claim_affinity(b3.id, rb, SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    let mut released = s.release_replica_affinities(ra).await.unwrap();
    released.sort();
    let mut expected = vec![b1.id, b2.id];
    expected.sort();
    assert_eq!(released, expected);
    assert_eq!(s.broker(b3.id).await.unwrap().connected_replica, Some(rb));
}

async fn concurrent_flapping_ends_on_the_last_claim(f: Fixture) {
    // A broker flaps between replicas A and B 100 times. Each old socket's
    // release races with the next claim; whatever the interleaving, the
    // broker ends online on the last session.
    let b = broker(&*f.store, "flappy").await;
    let replicas = [ReplicaId::new(), ReplicaId::new()];
    let stores = [f.replica().await, f.replica().await];
    let mut last: Option<(usize, SessionId)> = None;
    let mut releases = Vec::new();
    for i in 0..100 {
        let side = i % 2;
        let session = SessionId::new();
        stores[side]
            .claim_affinity(b.id, replicas[side], session, Transport::Ws)
            .await
            .unwrap();
        if let Some((prev_side, prev_session)) = last {
            let store: Arc<dyn Store> = stores[prev_side].clone();
            let replica = replicas[prev_side];
            releases.push(tokio::spawn(async move {
                store.release_affinity(b.id, replica, prev_session).await
            }));
        }
        last = Some((side, session));
    }
    for r in releases {
        assert!(
            !r.await.unwrap().unwrap(),
            "a superseded release must not clear"
        );
    }
    let (side, session) = last.unwrap();
    let row = f.store.broker(b.id).await.unwrap();
    assert_eq!(row.status, BrokerStatus::Online);
    assert_eq!(
        row.affinity().map(|a| (a.replica, a.session)),
        Some((replicas[side], session))
    );
}

// --- brokers and agents -------------------------------------------------

async fn broker_names_are_unique_and_delete_is_refused_while_agents_live(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "edge-1").await;
    let err = s
        .create_broker(BrokerId::new(), "edge-1", "h")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.broker_by_name("edge-1").await.unwrap().id, b.id);
    let a = agent(s, b.id, "worker").await;
    s.insert_messages(vec![message(a, json!("hi"))])
        .await
        .unwrap();

    let err = s.delete_broker(b.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.list_brokers().await.unwrap().len(), 1);

    s.apply_agent_status(b.id, a, StatusReport::phase(Phase::Deleted, 1))
        .await
        .unwrap();
    let (replica, session) = (ReplicaId::new(), SessionId::new());
    s.claim_affinity(b.id, replica, session, Transport::Ws)
        .await
        .unwrap();
    let err = s.delete_broker(b.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "connected: {err:?}");
    s.release_affinity(b.id, replica, session).await.unwrap();
    s.delete_broker(b.id).await.unwrap();
    assert!(matches!(
        s.broker(b.id).await,
        Err(StoreError::NotFound(switchyard_store::Entity::Broker))
    ));
    assert!(matches!(
        s.delete_broker(b.id).await,
        Err(StoreError::NotFound(switchyard_store::Entity::Broker))
    ));
}

async fn agent_definitions_validate_broker_and_name(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "worker").await;
    let row = s.agent(a).await.unwrap();
    assert_eq!(row.phase, Phase::Created);
    assert_eq!(row.command.0, vec!["sleep".to_string(), "60".into()]);

    let new = |broker_id, name: &str, command: Vec<String>| NewAgent {
        id: AgentId::new(),
        name: name.into(),
        broker_id,
        command,
        env: BTreeMap::new(),
        labels: Default::default(),
    };
    let err = s
        .create_agent(new(BrokerId::new(), "x", vec!["true".into()]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(switchyard_store::Entity::Broker)),
        "{err:?}"
    );
    let err = s
        .create_agent(new(b.id, "worker", vec!["true".into()]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = s.create_agent(new(b.id, "y", vec![])).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(s.list_agents(None).await.unwrap().len(), 1);
    assert_eq!(s.list_agents(Some(b.id)).await.unwrap().len(), 1);
    assert_eq!(s.list_agents(Some(BrokerId::new())).await.unwrap().len(), 0);

    // A deleted agent's name can be used again.
    s.apply_agent_status(b.id, a, StatusReport::phase(Phase::Deleted, 1))
        .await
        .unwrap();
    agent(s, b.id, "worker").await;
}

async fn agent_status_applies_only_newer_reports_from_its_own_broker(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let other = broker(s, "other").await;
    let a = agent(s, b.id, "w").await;

    let (row, applied) = s
        .apply_agent_status(b.id, a, StatusReport::phase(Phase::Running, 2))
        .await
        .unwrap();
    assert!(applied);
    assert_eq!((row.phase, row.status_seq), (Phase::Running, 2));
    // An older report (reordered on the wire) is ignored.
    let (row, applied) = s
        .apply_agent_status(b.id, a, StatusReport::phase(Phase::Starting, 1))
        .await
        .unwrap();
    assert!(!applied);
    assert_eq!(row.phase, Phase::Running);
    // Another broker cannot report on this agent.
    let err = s
        .apply_agent_status(other.id, a, StatusReport::phase(Phase::Error, 9))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotOwned(switchyard_store::Entity::Agent)),
        "{err:?}"
    );
    assert_eq!(s.agent(a).await.unwrap().phase, Phase::Running);
}

// --- intents ------------------------------------------------------------

async fn intent_idempotency_key_returns_the_original_row(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let mut first = intent(a, Op::Start);
    first.idempotency_key = Some("start-1".into());
    let created = s.insert_intent(first.clone()).await.unwrap();
    assert!(created.created);
    assert_eq!(created.row.broker_id, b.id);
    assert_eq!(created.row.state, IntentState::Pending);

    let mut retry = intent(a, Op::Stop);
    retry.idempotency_key = Some("start-1".into());
    let again = s.insert_intent(retry).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.row, created.row);
    let all = s
        .list_intents(IntentFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);

    let mut dup = vec![intent(a, Op::Start), intent(a, Op::Stop)];
    dup[0].idempotency_key = Some("k".into());
    dup[1].idempotency_key = Some("k".into());
    let err = s.insert_intents(dup).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

async fn concurrent_inserts_with_one_key_create_one_row(f: Fixture) {
    let b = broker(&*f.store, "b").await;
    let a = agent(&*f.store, b.id, "w").await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = f.replica().await;
        tasks.push(tokio::spawn(async move {
            let mut m = message(a, json!("once"));
            m.idempotency_key = Some("same-key".into());
            store.insert_messages(vec![m]).await.unwrap().remove(0)
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let row = t.await.unwrap();
        created += usize::from(row.created);
        ids.insert(row.row.id);
    }
    assert_eq!((created, ids.len()), (1, 1));
}

async fn intent_batch_with_one_invalid_item_inserts_nothing(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let batch = vec![
        intent(a, Op::Start),
        intent(AgentId::new(), Op::Start),
        intent(a, Op::Stop),
    ];
    let err = s.insert_intents(batch).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(switchyard_store::Entity::Agent)),
        "{err:?}"
    );
    let all = s
        .list_intents(IntentFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(all.is_empty(), "nothing of a failed batch is written");
    // The failed batch did not consume sequence numbers visible to later work.
    let ok = s.insert_intents(vec![intent(a, Op::Start)]).await.unwrap();
    assert_eq!(ok[0].row.seq, 1);
    assert!(matches!(
        s.insert_intents(vec![]).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn intents_are_claimed_in_per_agent_order_in_batches(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let other = broker(s, "other").await;
    let a1 = agent(s, b.id, "a1").await;
    let a2 = agent(s, b.id, "a2").await;
    let elsewhere = agent(s, other.id, "x").await;
    let ops = [Op::Create, Op::Start, Op::Stop, Op::Restart, Op::Delete];
    let mut batch = Vec::new();
    for op in ops {
        batch.push(intent(a1, op));
        batch.push(intent(a2, op));
    }
    batch.push(intent(elsewhere, Op::Start));
    s.insert_intents(batch).await.unwrap();

    let mut seen: HashMap<AgentId, Vec<(i64, Op)>> = HashMap::new();
    let mut batches = 0;
    loop {
        let claimed = s
            .claim_intents(&[session_of(&*f.store, b.id).await], me, 3)
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        batches += 1;
        assert!(claimed.len() <= 3);
        for c in claimed {
            assert_eq!(c.state, IntentState::InProgress);
            assert_eq!((c.claimed_by, c.attempts), (Some(me), 1));
            assert_eq!(c.broker_id, b.id, "only the named brokers' work");
            seen.entry(c.agent_id.expect("an agent's intent"))
                .or_default()
                .push((c.seq, c.op));
        }
    }
    assert!(batches >= 4);
    for a in [a1, a2] {
        let got = &seen[&a];
        assert_eq!(got.iter().map(|(_, op)| *op).collect::<Vec<_>>(), ops);
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "seq order: {got:?}"
        );
    }
    assert!(s.claim_intents(&[], me, 10).await.unwrap().is_empty());
}

async fn claim_skips_an_agent_with_work_in_flight_elsewhere(f: Fixture) {
    let s = &*f.store;
    let (ra, rb) = (ReplicaId::new(), ReplicaId::new());
    let b = broker(s, "b").await;
    let busy = agent(s, b.id, "busy").await;
    let free = agent(s, b.id, "free").await;
    s.insert_intents(vec![intent(busy, Op::Start)])
        .await
        .unwrap();
    assert_eq!(
        s.claim_intents(&[session_of(&*f.store, b.id).await], ra, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    s.insert_intents(vec![intent(busy, Op::Stop), intent(free, Op::Start)])
        .await
        .unwrap();
    // B may not overtake A's in-flight start of `busy`...
    let got = s
        .claim_intents(&[session_of(&*f.store, b.id).await], rb, 10)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|i| i.agent_id).collect::<Vec<_>>(),
        vec![Some(free)]
    );
    // ...but A, which holds it, may send the next op right behind it.
    let got = s
        .claim_intents(&[session_of(&*f.store, b.id).await], ra, 10)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|i| (i.agent_id, i.op)).collect::<Vec<_>>(),
        vec![(Some(busy), Op::Stop)]
    );
}

async fn sixteen_claimers_claim_each_of_1000_intents_exactly_once(f: Fixture) {
    let b = broker(&*f.store, "b").await;
    let mut agents = Vec::new();
    for i in 0..50 {
        agents.push(agent(&*f.store, b.id, &format!("a{i}")).await);
    }
    let batch: Vec<NewIntent> = (0..1000)
        .map(|i| intent(agents[i % 50], Op::Start))
        .collect();
    f.store.insert_intents(batch).await.unwrap();

    let live = session_of(&*f.store, b.id).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = f.replica().await;
        let me = ReplicaId::new();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut idle = 0;
            // Claim, then finish what was claimed (as an owner would), until
            // a few empty rounds in a row say the backlog is gone.
            while idle < 5 {
                let claimed = store.claim_intents(&[live], me, 25).await.unwrap();
                if claimed.is_empty() {
                    idle += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                idle = 0;
                for c in claimed {
                    assert!(
                        store
                            .finish_intent(c.id, IntentOutcome::Done(json!({})))
                            .await
                            .unwrap(),
                        "the claimer finishes its own row"
                    );
                    mine.push(c.id);
                }
            }
            mine
        }));
    }
    let mut count: HashMap<IntentId, usize> = HashMap::new();
    let mut claimers_with_work = 0;
    for t in tasks {
        let mine = t.await.unwrap();
        claimers_with_work += usize::from(!mine.is_empty());
        for id in mine {
            *count.entry(id).or_default() += 1;
        }
    }
    assert_eq!(count.len(), 1000, "every intent claimed");
    assert!(count.values().all(|&n| n == 1), "no intent claimed twice");
    assert!(claimers_with_work > 1, "the claimers really raced");
    let done = f
        .store
        .list_intents(IntentFilter {
            state: Some(IntentState::Done),
            limit: 2000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(done.len(), 1000);
    assert!(done.iter().all(|i| i.attempts == 1));
}

async fn done_never_becomes_failed(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    s.register_replica(me, "here").await.unwrap();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let row = s.insert_intent(intent(a, Op::Start)).await.unwrap().row;
    s.claim_intents(&[session_of(&*f.store, b.id).await], me, 1)
        .await
        .unwrap();
    assert!(
        s.finish_intent(row.id, IntentOutcome::Done(json!({"pid": 1})))
            .await
            .unwrap()
    );
    assert!(
        !s.finish_intent(row.id, IntentOutcome::failed("late"))
            .await
            .unwrap()
    );
    assert!(
        !s.finish_intent(row.id, IntentOutcome::Done(json!({"pid": 2})))
            .await
            .unwrap()
    );
    // Neither the sweeper's requeue nor expiry touches a finished row.
    s.requeue_abandoned(policy(Duration::ZERO, Duration::ZERO, 1))
        .await
        .unwrap();
    s.expire_intents().await.unwrap();
    let after = s.intent(row.id).await.unwrap();
    assert_eq!(after.state, IntentState::Done);
    assert_eq!(after.result.map(|r| r.0), Some(json!({"pid": 1})));
    assert_eq!(after.error, None);

    let failed = s.insert_intent(intent(a, Op::Stop)).await.unwrap().row;
    assert!(
        s.finish_intent(failed.id, IntentOutcome::failed("boom"))
            .await
            .unwrap()
    );
    assert!(
        !s.finish_intent(failed.id, IntentOutcome::Done(json!({})))
            .await
            .unwrap()
    );
    assert_eq!(
        s.intent(failed.id).await.unwrap().state,
        IntentState::Failed
    );
    assert!(matches!(
        s.finish_intent(IntentId::new(), IntentOutcome::Done(json!({})))
            .await,
        Err(StoreError::NotFound(switchyard_store::Entity::Intent))
    ));
}

async fn racing_outcomes_leave_exactly_one(f: Fixture) {
    let b = broker(&*f.store, "b").await;
    let a = agent(&*f.store, b.id, "w").await;
    let batch: Vec<NewIntent> = (0..50).map(|_| intent(a, Op::Start)).collect();
    let rows = f.store.insert_intents(batch).await.unwrap();
    let (s1, s2) = (f.replica().await, f.replica().await);
    let mut tasks = Vec::new();
    for r in &rows {
        let id = r.row.id;
        let (s1, s2) = (s1.clone(), s2.clone());
        tasks.push(tokio::spawn(async move {
            let done = tokio::spawn(async move {
                s1.finish_intent(id, IntentOutcome::Done(json!({})))
                    .await
                    .unwrap()
            });
            let failed = tokio::spawn(async move {
                s2.finish_intent(id, IntentOutcome::failed("x"))
                    .await
                    .unwrap()
            });
            (id, done.await.unwrap(), failed.await.unwrap())
        }));
    }
    for t in tasks {
        let (id, done_won, failed_won) = t.await.unwrap();
        assert!(done_won ^ failed_won, "exactly one outcome wins");
        let state = f.store.intent(id).await.unwrap().state;
        assert_eq!(
            state,
            if done_won {
                IntentState::Done
            } else {
                IntentState::Failed
            }
        );
    }
}

async fn requeue_returns_dead_claimers_work_then_fails_after_max_attempts(f: Fixture) {
    let s = &*f.store;
    let (dead, live) = (ReplicaId::new(), ReplicaId::new());
    s.register_replica(live, "live").await.unwrap();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    // The message to another agent: one agent's would wait for its start.
    let a2 = agent(s, b.id, "w2").await;
    let row = s.insert_intent(intent(a, Op::Start)).await.unwrap().row;
    let m = s
        .insert_messages(vec![message(a2, json!(1))])
        .await
        .unwrap()[0]
        .row
        .clone();

    // Claimed by a replica with no registry row: dead.
    assert_eq!(
        s.claim_intents(&[session_of(&*f.store, b.id).await], dead, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.claim_messages(&[session_of(&*f.store, b.id).await], dead, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let report = s.requeue_abandoned(policy(LONG, LONG, 2)).await.unwrap();
    assert_eq!((report.intents_requeued, report.messages_requeued), (1, 1));
    let back = s.intent(row.id).await.unwrap();
    assert_eq!(
        (back.state, back.claimed_by, back.attempts),
        (IntentState::Pending, None, 1)
    );
    assert_eq!(s.message(m.id).await.unwrap().state, MessageState::Pending);

    // Work of a live claimer within its lease is left alone.
    assert_eq!(
        s.claim_intents(&[session_of(&*f.store, b.id).await], live, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let report = s.requeue_abandoned(policy(LONG, LONG, 2)).await.unwrap();
    assert_eq!(report.intents_requeued + report.intents_failed, 0);

    // Second attempt's claimer dies too: max attempts reached, so it fails.
    s.deregister_replica(live).await.unwrap();
    let report = s.requeue_abandoned(policy(LONG, LONG, 2)).await.unwrap();
    assert_eq!((report.intents_requeued, report.intents_failed), (0, 1));
    let failed = s.intent(row.id).await.unwrap();
    assert_eq!(failed.state, IntentState::Failed);
    assert!(failed.error.unwrap().contains("2 attempt"));
}

async fn requeue_returns_work_whose_lease_ran_out(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    s.register_replica(me, "here").await.unwrap();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    s.insert_intent(intent(a, Op::Start)).await.unwrap();
    s.claim_intents(&[session_of(&*f.store, b.id).await], me, 1)
        .await
        .unwrap();
    let report = s.requeue_abandoned(policy(LONG, LONG, 3)).await.unwrap();
    assert_eq!(report.intents_requeued, 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let report = s
        .requeue_abandoned(policy(LONG, Duration::from_millis(100), 3))
        .await
        .unwrap();
    assert_eq!(report.intents_requeued, 1);
    let again = s
        .claim_intents(&[session_of(&*f.store, b.id).await], me, 1)
        .await
        .unwrap();
    assert_eq!(again[0].attempts, 2);
}

async fn intents_past_deadline_fail_and_finished_ones_stay(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let mut late = intent(a, Op::Start);
    late.deadline = Utc::now() - chrono::Duration::seconds(1);
    let mut finished = intent(a, Op::Stop);
    finished.deadline = late.deadline;
    let current = intent(a, Op::Restart);
    s.insert_intents(vec![late.clone(), finished.clone(), current.clone()])
        .await
        .unwrap();
    s.finish_intent(finished.id, IntentOutcome::Done(json!({})))
        .await
        .unwrap();
    assert_eq!(s.expire_intents().await.unwrap(), vec![late.id]);
    let row = s.intent(late.id).await.unwrap();
    assert_eq!(
        (row.state, row.error.as_deref()),
        (IntentState::Failed, Some("deadline exceeded"))
    );
    assert_eq!(
        s.intent(finished.id).await.unwrap().state,
        IntentState::Done
    );
    assert_eq!(
        s.intent(current.id).await.unwrap().state,
        IntentState::Pending
    );
}

// --- messages -----------------------------------------------------------

async fn messages_keep_per_agent_fifo_order(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a1 = agent(s, b.id, "a1").await;
    let a2 = agent(s, b.id, "a2").await;
    for chunk in 0..4 {
        let batch: Vec<NewMessage> = (0..25)
            .map(|i| message(if i % 3 == 0 { a2 } else { a1 }, json!(chunk * 25 + i)))
            .collect();
        s.insert_messages(batch).await.unwrap();
    }
    let mut got: HashMap<AgentId, Vec<i64>> = HashMap::new();
    loop {
        let claimed = s
            .claim_messages(&[session_of(&*f.store, b.id).await], me, 7)
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        for m in claimed {
            assert_eq!(m.state, MessageState::Dispatched);
            got.entry(m.agent_id)
                .or_default()
                .push(m.body.0.as_i64().unwrap());
        }
    }
    let expect =
        |a2_side: bool| -> Vec<i64> { (0..100).filter(|i| (i % 25 % 3 == 0) == a2_side).collect() };
    assert_eq!(got[&a1], expect(false));
    assert_eq!(got[&a2], expect(true));
}

async fn message_batch_with_one_invalid_item_inserts_nothing(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let err = s
        .insert_messages(vec![
            message(a, json!(1)),
            message(AgentId::new(), json!(2)),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(switchyard_store::Entity::Agent)),
        "{err:?}"
    );
    assert!(
        s.claim_messages(&[session_of(&*f.store, b.id).await], me, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A deleted agent takes no new messages either.
    s.apply_agent_status(b.id, a, StatusReport::phase(Phase::Deleted, 1))
        .await
        .unwrap();
    let err = s
        .insert_messages(vec![message(a, json!(3))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(switchyard_store::Entity::Agent)),
        "{err:?}"
    );
}

/// The ledger rule: a key answers with its row only for the request that
/// created it (same digest); any other request carrying it is refused
/// whole, wherever the key sits in the batch, and takes no sequence number.
async fn a_key_reused_for_another_request_refuses_the_batch_and_writes_nothing(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let keyed = |body: serde_json::Value, digest: &str| {
        let mut m = message(a, body);
        m.idempotency_key = Some("k".into());
        m.request_digest = Some(digest.into());
        m
    };
    let first = s
        .insert_messages(vec![keyed(json!(1), "d1")])
        .await
        .unwrap();
    assert!(first[0].created);
    for batch in [
        vec![keyed(json!(2), "d2")],
        vec![message(a, json!("fresh")), keyed(json!(2), "d2")],
        vec![keyed(json!(2), "d2"), message(a, json!("fresh"))],
    ] {
        match s.insert_messages(batch).await {
            Err(StoreError::Conflict(Conflict::KeyReused(key))) => assert_eq!(key, "k"),
            other => panic!("expected KeyReused, got {other:?}"),
        }
    }
    let again = s
        .insert_messages(vec![keyed(json!(1), "d1")])
        .await
        .unwrap();
    assert!(!again[0].created);
    assert_eq!(again[0].row.id, first[0].row.id);
    let next = s
        .insert_messages(vec![message(a, json!("next"))])
        .await
        .unwrap();
    assert_eq!(next[0].row.seq, 2, "the refused batches wrote nothing");

    let mut start = intent(a, Op::Start);
    start.idempotency_key = Some("k".into());
    start.request_digest = Some("d1".into());
    s.insert_intent(start.clone()).await.unwrap();
    let mut other = intent(a, Op::Stop);
    other.idempotency_key = Some("k".into());
    other.request_digest = Some("d2".into());
    assert!(matches!(
        s.insert_intent(other).await,
        Err(StoreError::Conflict(Conflict::KeyReused(_)))
    ));
}

/// The phase check, the join of an open dispatch and the insert are one
/// step: concurrent starts of one agent make one intent (they used to make
/// 6 to 43 of 100), a phase that forbids the operation writes nothing, and
/// a later different operation is a new intent.
async fn concurrent_lifecycle_calls_on_one_agent_write_one_intent(f: Fixture) {
    const STARTABLE: &[Phase] = &[Phase::Created, Phase::Stopped, Phase::Error];
    let b = broker(&*f.store, "b").await;
    let a = agent(&*f.store, b.id, "w").await;
    let calls = (0..100).map(|_| {
        let store = f.store.clone();
        tokio::spawn(async move {
            store
                .insert_lifecycle(intent(a, Op::Start), STARTABLE)
                .await
        })
    });
    let results = futures::future::join_all(calls).await;
    let rows: Vec<_> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(rows.iter().filter(|r| r.created).count(), 1);
    assert!(
        rows.iter().all(|r| r.row.id == rows[0].row.id),
        "all joined one dispatch"
    );

    let stop = f
        .store
        .insert_lifecycle(intent(a, Op::Stop), &[Phase::Created])
        .await
        .unwrap();
    assert!(stop.created, "another operation is a new intent");
    let again = f
        .store
        .insert_lifecycle(intent(a, Op::Start), STARTABLE)
        .await
        .unwrap();
    assert!(
        again.created,
        "the open start is no longer the latest: a new one"
    );
    match f
        .store
        .insert_lifecycle(intent(a, Op::Stop), &[Phase::Running])
        .await
    {
        Err(StoreError::Conflict(Conflict::Phase(Phase::Created))) => {}
        other => panic!("expected a phase conflict, got {other:?}"),
    }
    let all = f
        .store
        .list_intents(IntentFilter {
            broker_id: Some(b.id),
            state: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
}

/// The dead-letter rule of a new session's requeue: after a session that
/// ended by itself, the oldest row of an agent in flight, claimed
/// `max_attempts` times, fails with a reason instead of going back; the
/// rows sent behind it go back uncounted, and the agent's next row becomes
/// claimable. After a superseded session nothing counts.
async fn work_sent_on_max_attempts_sessions_is_dead_lettered_and_its_agent_moves_on(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let poison = s
        .insert_messages(vec![message(a, json!("poison"))])
        .await
        .unwrap();
    s.insert_messages(vec![message(a, json!("next"))])
        .await
        .unwrap();
    // The dispatch for another agent: one agent's would wait behind its
    // messages (one order per agent).
    let a2 = agent(s, b.id, "w2").await;
    let start = s.insert_intent(intent(a2, Op::Start)).await.unwrap();
    // A superseded session's claims never count.
    for _ in 0..5 {
        let session = session_of(s, b.id).await;
        s.claim_messages(&[session], me, 10).await.unwrap();
        let report = s.requeue_broker_in_flight(b.id, None).await.unwrap();
        assert_eq!((report.requeued(), report.messages_failed), (2, 0));
    }
    assert_eq!(s.message(poison[0].row.id).await.unwrap().attempts, 0);
    for attempt in 1..=3 {
        let session = session_of(s, b.id).await;
        let claimed = s.claim_messages(&[session], me, 10).await.unwrap();
        assert_eq!(claimed.len(), 2, "attempt {attempt}: both are sent");
        assert_eq!(claimed[0].id, poison[0].row.id, "attempt {attempt}");
        s.claim_intents(&[session], me, 1).await.unwrap();
        let report = s.requeue_broker_in_flight(b.id, Some(3)).await.unwrap();
        let failed = attempt == 3;
        assert_eq!(
            (report.messages_failed, report.intents_failed),
            (u64::from(failed), u64::from(failed))
        );
    }
    let row = s.message(poison[0].row.id).await.unwrap();
    assert_eq!(row.state, MessageState::Failed);
    assert!(row.error.unwrap().contains("session ended"));
    let intent = s.intent(start.row.id).await.unwrap();
    assert_eq!(intent.state, IntentState::Failed);
    let session = session_of(s, b.id).await;
    let claimed = s.claim_messages(&[session], me, 1).await.unwrap();
    assert_eq!(claimed[0].body.0, json!("next"), "the queue moved on");
    assert_eq!(
        claimed[0].attempts, 1,
        "sent behind the poison, its earlier claims did not count"
    );
}

/// A drain claims a broker's intents and messages at the same time; each
/// claim must get its rows. (With one claim lock per broker, the loser
/// claimed nothing: its work waited for the backstop, and messages
/// overtook the dispatches written before them.)
async fn intent_and_message_claims_for_one_broker_at_once_both_claim(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    // Two agents: one agent's message would wait for its restart.
    let a2 = agent(s, b.id, "w2").await;
    let session = [session_of(s, b.id).await];
    for round in 0..50 {
        let i = s.insert_intent(intent(a, Op::Restart)).await.unwrap();
        let m = s
            .insert_messages(vec![message(a2, json!(round))])
            .await
            .unwrap();
        let (intents, messages) = tokio::join!(
            s.claim_intents(&session, me, 10),
            s.claim_messages(&session, me, 10),
        );
        assert_eq!(intents.unwrap().len(), 1, "round {round}: the intent");
        assert_eq!(messages.unwrap().len(), 1, "round {round}: the message");
        s.finish_intent(i.row.id, IntentOutcome::Done(json!({})))
            .await
            .unwrap();
        s.ack_message(b.id, m[0].row.id).await.unwrap();
    }
}

/// One order per agent across operations and messages: an operation waits
/// for the messages written before it to be delivered, and the messages
/// written after it wait for its outcome.
async fn operations_and_messages_of_one_agent_keep_one_order(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let session = [session_of(s, b.id).await];
    let m1 = s
        .insert_messages(vec![message(a, json!("m1"))])
        .await
        .unwrap();
    let restart = s.insert_intent(intent(a, Op::Restart)).await.unwrap();
    s.insert_messages(vec![message(a, json!("m2"))])
        .await
        .unwrap();

    let bodies = |rows: Vec<switchyard_store::Message>| -> Vec<serde_json::Value> {
        rows.into_iter().map(|m| m.body.0).collect()
    };
    assert!(
        s.claim_intents(&session, me, 10).await.unwrap().is_empty(),
        "m1 first"
    );
    let first = s.claim_messages(&session, me, 10).await.unwrap();
    assert_eq!(bodies(first), [json!("m1")], "m2 waits behind the restart");
    assert!(
        s.claim_intents(&session, me, 10).await.unwrap().is_empty(),
        "m1 is not delivered yet"
    );
    s.ack_message(b.id, m1[0].row.id).await.unwrap();
    let ops = s.claim_intents(&session, me, 10).await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].id, restart.row.id);
    assert!(
        s.claim_messages(&session, me, 10).await.unwrap().is_empty(),
        "the restart is not done"
    );
    s.finish_intent(restart.row.id, IntentOutcome::Done(json!({})))
        .await
        .unwrap();
    let last = s.claim_messages(&session, me, 10).await.unwrap();
    assert_eq!(bodies(last), [json!("m2")]);
}

async fn message_idempotency_and_idempotent_ack(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let mut m = message(a, json!("hello"));
    m.idempotency_key = Some("msg-1".into());
    let first = s.insert_messages(vec![m.clone()]).await.unwrap().remove(0);
    let mut retry = message(a, json!("hello"));
    retry.idempotency_key = Some("msg-1".into());
    let fresh = message(a, json!("second"));
    let second = s.insert_messages(vec![retry, fresh.clone()]).await.unwrap();
    assert!(first.created);
    assert!(!second[0].created);
    assert_eq!(second[0].row.id, first.row.id);
    assert!(second[1].created);

    let claimed = s
        .claim_messages(&[session_of(&*f.store, b.id).await], me, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2, "the retried key made no second row");
    assert!(s.ack_message(b.id, first.row.id).await.unwrap());
    assert!(
        !s.ack_message(b.id, first.row.id).await.unwrap(),
        "second ack is a no-op"
    );
    let row = s.message(first.row.id).await.unwrap();
    assert_eq!(row.state, MessageState::Delivered);
    assert!(row.delivered_at.is_some());
    assert!(matches!(
        s.ack_message(b.id, MessageId::new()).await,
        Err(StoreError::NotFound(switchyard_store::Entity::Message))
    ));
}

async fn ack_from_another_broker_changes_nothing(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let intruder = broker(s, "intruder").await;
    let a = agent(s, b.id, "w").await;
    let m = s
        .insert_messages(vec![message(a, json!(1))])
        .await
        .unwrap()
        .remove(0)
        .row;
    let err = s.ack_message(intruder.id, m.id).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotOwned(switchyard_store::Entity::Message)),
        "{err:?}"
    );
    assert_eq!(s.message(m.id).await.unwrap().state, MessageState::Pending);
}

async fn concurrent_message_claimers_deliver_each_once_in_order(f: Fixture) {
    let b = broker(&*f.store, "b").await;
    let mut agents = Vec::new();
    for i in 0..8 {
        agents.push(agent(&*f.store, b.id, &format!("a{i}")).await);
    }
    let batch: Vec<NewMessage> = (0..800).map(|i| message(agents[i % 8], json!(i))).collect();
    f.store.insert_messages(batch).await.unwrap();

    let live = session_of(&*f.store, b.id).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = f.replica().await;
        let me = ReplicaId::new();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut idle = 0;
            while idle < 5 {
                let claimed = store.claim_messages(&[live], me, 20).await.unwrap();
                if claimed.is_empty() {
                    idle += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                idle = 0;
                for m in claimed {
                    // Ack right away, as a broker would once the agent has it.
                    assert!(store.ack_message(b.id, m.id).await.unwrap());
                    got.push((m.agent_id, m.seq));
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        // Each claimer saw every agent's messages in increasing seq order.
        let mut last: HashMap<AgentId, i64> = HashMap::new();
        for (agent, seq) in &got {
            let prev = last.insert(*agent, *seq).unwrap_or(0);
            assert!(*seq > prev, "out of order within one claimer");
        }
        all.extend(got);
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(
        (all.len(), unique.len()),
        (800, 800),
        "each message exactly once"
    );
}

async fn messages_past_ttl_expire(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let mut stale = message(a, json!("old"));
    stale.expires_at = Utc::now() - chrono::Duration::seconds(1);
    let mut delivered = message(a, json!("got it"));
    delivered.expires_at = stale.expires_at;
    let live = message(a, json!("new"));
    s.insert_messages(vec![delivered.clone(), stale.clone(), live.clone()])
        .await
        .unwrap();
    s.ack_message(b.id, delivered.id).await.unwrap();
    assert_eq!(
        s.expire_messages()
            .await
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        vec![stale.id]
    );
    assert_eq!(
        s.message(stale.id).await.unwrap().state,
        MessageState::Expired
    );
    assert_eq!(
        s.message(delivered.id).await.unwrap().state,
        MessageState::Delivered
    );
    let claimed = s
        .claim_messages(&[session_of(&*f.store, b.id).await], me, 10)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![live.id]
    );
    assert!(
        !s.ack_message(b.id, stale.id).await.unwrap(),
        "expired stays expired"
    );
}

/// An expired message is never claimed, even before the sweeper marks it;
/// a message not due yet is not claimed and holds back its agent's later
/// messages and operations, and goes once it is due.
async fn expired_messages_are_never_claimed_and_delayed_ones_hold_back_their_agent(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let (expiring, delayed, due) = (
        agent(s, b.id, "expiring").await,
        agent(s, b.id, "delayed").await,
        agent(s, b.id, "due").await,
    );
    let mut stale = message(expiring, json!("stale"));
    stale.expires_at = Utc::now() - chrono::Duration::seconds(1);
    let fresh = message(expiring, json!("fresh"));
    let mut later = message(delayed, json!("later"));
    later.deliver_after = Some(Utc::now() + chrono::Duration::hours(1));
    let behind = message(delayed, json!("behind"));
    let mut ready = message(due, json!("ready"));
    ready.deliver_after = Some(Utc::now() - chrono::Duration::seconds(1));
    s.insert_messages(vec![
        stale.clone(),
        fresh.clone(),
        later.clone(),
        behind.clone(),
        ready.clone(),
    ])
    .await
    .unwrap();
    let op = s
        .insert_intent(intent(delayed, Op::Start))
        .await
        .unwrap()
        .row;
    let session = [session_of(s, b.id).await];
    let mut claimed: Vec<MessageId> = s
        .claim_messages(&session, me, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    claimed.sort();
    let mut expected = vec![fresh.id, ready.id];
    expected.sort();
    assert_eq!(claimed, expected);
    let intents = s.claim_intents(&session, me, 10).await.unwrap();
    assert!(
        intents.iter().all(|i| i.id != op.id),
        "an operation behind a delayed message waits"
    );
    // An expired message holds back nothing, even before the sweeper
    // marks it: an operation written after it is claimed.
    s.ack_message(b.id, fresh.id).await.unwrap();
    let after_stale = s
        .insert_intent(intent(expiring, Op::Start))
        .await
        .unwrap()
        .row;
    let intents = s.claim_intents(&session, me, 10).await.unwrap();
    assert!(
        intents.iter().any(|i| i.id == after_stale.id),
        "an operation behind an expired message goes"
    );
    assert_eq!(
        s.message(later.id).await.unwrap().state,
        MessageState::Pending
    );
    assert_eq!(
        s.message(behind.id).await.unwrap().state,
        MessageState::Pending
    );
}

/// A cancel moves `pending` to `cancelled` once; again it finds it
/// cancelled already; claimed work is not pending and stays as it is.
async fn a_cancel_changes_only_pending_work_and_says_what_it_found(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let (w1, w2) = (agent(s, b.id, "w1").await, agent(s, b.id, "w2").await);
    let queued = message(w1, json!("queued"));
    let sent = message(w2, json!("sent"));
    s.insert_messages(vec![queued.clone(), sent.clone()])
        .await
        .unwrap();
    let (row, outcome) = s.cancel_message(queued.id).await.unwrap();
    assert_eq!(
        (row.state, outcome),
        (MessageState::Cancelled, CancelOutcome::Cancelled)
    );
    let (_, outcome) = s.cancel_message(queued.id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::AlreadyCancelled);
    let session = [session_of(s, b.id).await];
    let claimed = s.claim_messages(&session, me, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![sent.id]
    );
    let (row, outcome) = s.cancel_message(sent.id).await.unwrap();
    assert_eq!(
        (row.state, outcome),
        (MessageState::Dispatched, CancelOutcome::NotPending)
    );
    let op = s.insert_intent(intent(w1, Op::Start)).await.unwrap().row;
    let (row, outcome) = s.cancel_intent(op.id).await.unwrap();
    assert_eq!(
        (row.state, outcome),
        (IntentState::Cancelled, CancelOutcome::Cancelled)
    );
    assert!(matches!(
        s.cancel_intent(IntentId::new()).await,
        Err(StoreError::NotFound(_))
    ));
}

// --- sessions, auth, names ---------------------------------------------

async fn a_new_session_requeues_the_brokers_in_flight_work(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let other = broker(s, "other").await;
    let a = agent(s, b.id, "w").await;
    let x = agent(s, other.id, "x").await;
    // Messages to other agents: one agent's message would wait for its
    // start (one order per agent).
    let a2 = agent(s, b.id, "w2").await;
    let x2 = agent(s, other.id, "x2").await;
    s.insert_intents(vec![intent(a, Op::Start), intent(x, Op::Start)])
        .await
        .unwrap();
    s.insert_messages(vec![message(a2, json!(1)), message(x2, json!(2))])
        .await
        .unwrap();
    s.claim_intents(
        &[
            session_of(&*f.store, b.id).await,
            session_of(&*f.store, other.id).await,
        ],
        me,
        10,
    )
    .await
    .unwrap();
    s.claim_messages(
        &[
            session_of(&*f.store, b.id).await,
            session_of(&*f.store, other.id).await,
        ],
        me,
        10,
    )
    .await
    .unwrap();
    assert_eq!(
        s.requeue_broker_in_flight(b.id, Some(5))
            .await
            .unwrap()
            .requeued(),
        2
    );
    let again = s
        .claim_messages(
            &[
                session_of(&*f.store, b.id).await,
                session_of(&*f.store, other.id).await,
            ],
            me,
            10,
        )
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "only b's message went back");
    assert_eq!((again[0].agent_id, again[0].attempts), (a2, 2));
    assert_eq!(
        s.claim_intents(
            &[
                session_of(&*f.store, b.id).await,
                session_of(&*f.store, other.id).await
            ],
            me,
            10
        )
        .await
        .unwrap()
        .len(),
        1
    );
}

async fn admin_tokens_and_handshake_nonces(f: Fixture) {
    let s = &*f.store;
    assert!(!s.has_admin_tokens().await.unwrap());
    s.add_admin_token("digest-1").await.unwrap();
    s.add_admin_token("digest-1").await.unwrap();
    assert!(s.has_admin_tokens().await.unwrap());
    assert!(s.admin_token_exists("digest-1").await.unwrap());
    assert!(!s.admin_token_exists("digest-2").await.unwrap());

    let b = broker(s, "b").await;
    let other = broker(s, "other").await;
    assert!(s.record_nonce(b.id, "n-1", LONG).await.unwrap());
    assert!(!s.record_nonce(b.id, "n-1", LONG).await.unwrap(), "replay");
    assert!(
        s.record_nonce(other.id, "n-1", LONG).await.unwrap(),
        "per broker"
    );
    // Old nonces are forgotten once the timestamp window refuses them anyway.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        s.record_nonce(b.id, "n-2", Duration::from_millis(100))
            .await
            .unwrap()
    );
    assert!(
        s.record_nonce(b.id, "n-1", Duration::from_millis(100))
            .await
            .unwrap()
    );
}

async fn agents_are_found_by_name_until_deleted(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "named").await;
    assert_eq!(s.agent_by_name("named").await.unwrap().id, a);
    let deleted = s.mark_agent_deleted(a).await.unwrap();
    assert_eq!(deleted.phase, Phase::Deleted);
    assert!(matches!(
        s.agent_by_name("named").await,
        Err(StoreError::NotFound(switchyard_store::Entity::Agent))
    ));
    assert_eq!(
        s.agent(a).await.unwrap().phase,
        Phase::Deleted,
        "the row stays"
    );
    let (row, applied) = s
        .apply_agent_status(b.id, a, StatusReport::phase(Phase::Running, i64::MAX))
        .await
        .unwrap();
    assert!(!applied, "reports about a deleted agent are ignored");
    assert_eq!(row.phase, Phase::Deleted);
    assert!(matches!(
        s.mark_agent_deleted(AgentId::new()).await,
        Err(StoreError::NotFound(switchyard_store::Entity::Agent))
    ));
}

async fn a_superseded_session_claims_nothing(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    // Messages to another agent: one agent's message would wait for its
    // start (one order per agent).
    let a2 = agent(s, b.id, "w2").await;
    let (old, new) = (SessionId::new(), SessionId::new());
    let (ra, rb) = (ReplicaId::new(), ReplicaId::new());
    s.claim_affinity(b.id, ra, old, Transport::Ws)
        .await
        .unwrap();
    s.claim_affinity(b.id, rb, new, Transport::Ws)
        .await
        .unwrap();
    s.insert_intents(vec![intent(a, Op::Start)]).await.unwrap();
    s.insert_messages(vec![message(a2, json!(1))])
        .await
        .unwrap();
    assert!(
        s.claim_intents(&[(b.id, old)], ra, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.claim_messages(&[(b.id, old)], ra, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.claim_intents(&[(b.id, new)], rb, 10).await.unwrap().len(),
        1
    );
    assert_eq!(
        s.claim_messages(&[(b.id, new)], rb, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // No session at all: nothing is claimed either.
    s.release_affinity(b.id, rb, new).await.unwrap();
    s.insert_messages(vec![message(a2, json!(2))])
        .await
        .unwrap();
    assert!(
        s.claim_messages(&[(b.id, new)], rb, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn one_singleton_at_a_time_and_a_successor_when_it_goes(f: Fixture) {
    let other_replica = f.replica().await;
    let mut first = f.store.singleton();
    let mut second = other_replica.singleton();
    assert!(first.hold().await.unwrap());
    assert!(first.hold().await.unwrap(), "holding it again is fine");
    let exclusive = f.store.backend() == "postgres";
    assert_eq!(second.hold().await.unwrap(), !exclusive);
    drop(first);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !second.hold().await.unwrap() {
        assert!(std::time::Instant::now() < until, "no successor took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finished_rows_are_pruned_and_stuck_work_is_counted(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let done = s.insert_intent(intent(a, Op::Start)).await.unwrap().row;
    let open_intent = s.insert_intent(intent(a, Op::Stop)).await.unwrap().row;
    let delivered = s.insert_messages(vec![message(a, json!(1))]).await.unwrap()[0]
        .row
        .clone();
    let pending = s.insert_messages(vec![message(a, json!(2))]).await.unwrap()[0]
        .row
        .clone();
    s.finish_intent(done.id, IntentOutcome::Done(json!({})))
        .await
        .unwrap();
    s.ack_message(b.id, delivered.id).await.unwrap();
    assert_eq!(s.count_stuck(LONG).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(s.count_stuck(Duration::from_millis(100)).await.unwrap(), 2);
    assert_eq!(s.prune_finished(LONG).await.unwrap(), 0);
    assert_eq!(
        s.prune_finished(Duration::from_millis(100)).await.unwrap(),
        2
    );
    assert!(matches!(
        s.intent(done.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.message(delivered.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.intent(open_intent.id).await.unwrap().state,
        IntentState::Pending
    );
    assert_eq!(
        s.message(pending.id).await.unwrap().state,
        MessageState::Pending
    );
}

/// An operator's queue view: per agent, what is pending or in flight
/// (finished and cancelled work is not counted); a broker's own calls are
/// counted under the broker with no agent.
async fn queue_depths_count_unfinished_work_per_agent_and_broker_call(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let other = broker(s, "other").await;
    let a = agent(s, b.id, "w").await;
    let x = agent(s, other.id, "x").await;
    let idle = agent(s, b.id, "idle").await;
    assert_eq!(s.queue_depths_by_agent().await.unwrap(), vec![]);

    let done = s.insert_intent(intent(a, Op::Start)).await.unwrap().row;
    s.insert_intent(intent(a, Op::Stop)).await.unwrap();
    let sent = s
        .insert_messages(vec![
            message(a, json!(1)),
            message(a, json!(2)),
            message(a, json!(3)),
        ])
        .await
        .unwrap();
    let cancelled = s.insert_messages(vec![message(x, json!(3))]).await.unwrap()[0]
        .row
        .id;
    s.insert_messages(vec![message(x, json!(4))]).await.unwrap();
    s.insert_broker_call(NewBrokerCall {
        id: IntentId::new(),
        broker_id: other.id,
        name: "runtime.info".into(),
        args: json!({}),
        deadline: Utc::now() + chrono::Duration::minutes(5),
        idempotency_key: None,
        request_digest: None,
    })
    .await
    .unwrap();
    s.finish_intent(done.id, IntentOutcome::Done(json!({})))
        .await
        .unwrap();
    s.ack_message(b.id, sent[0].row.id).await.unwrap();
    s.cancel_message(cancelled).await.unwrap();
    // In flight still counts: the stop is claimed.
    let claimed = s
        .claim_intents(&[session_of(s, b.id).await], ReplicaId::new(), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);

    let mut depths = s.queue_depths_by_agent().await.unwrap();
    depths.sort_by_key(|d| (d.broker_id.0, d.agent_id.map(|a| a.0)));
    let mut want = vec![
        QueueDepth {
            broker_id: b.id,
            agent_id: Some(a),
            depth: 3,
        },
        QueueDepth {
            broker_id: other.id,
            agent_id: Some(x),
            depth: 1,
        },
        QueueDepth {
            broker_id: other.id,
            agent_id: None,
            depth: 1,
        },
    ];
    want.sort_by_key(|d| (d.broker_id.0, d.agent_id.map(|a| a.0)));
    assert_eq!(depths, want);
    assert!(depths.iter().all(|d| d.agent_id != Some(idle)));
}

async fn batch_acks_deliver_their_own_and_report_the_rest(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let other = broker(s, "other").await;
    let a = agent(s, b.id, "w").await;
    let x = agent(s, other.id, "x").await;
    let mine = s
        .insert_messages(vec![message(a, json!(1)), message(a, json!(2))])
        .await
        .unwrap();
    let theirs = s.insert_messages(vec![message(x, json!(3))]).await.unwrap();
    s.ack_message(b.id, mine[1].row.id).await.unwrap();
    let ghost = MessageId::new();
    let acked = s
        .ack_messages(
            b.id,
            &[mine[0].row.id, mine[1].row.id, theirs[0].row.id, ghost],
        )
        .await
        .unwrap();
    assert_eq!(acked.delivered, 1, "only the one still pending");
    assert_eq!(acked.not_found, vec![theirs[0].row.id, ghost]);
    assert_eq!(
        s.message(mine[0].row.id).await.unwrap().state,
        MessageState::Delivered
    );
    assert_eq!(
        s.message(theirs[0].row.id).await.unwrap().state,
        MessageState::Pending
    );
}

async fn inserts_name_the_replica_holding_the_brokers_session(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let alone = s.insert_messages(vec![message(a, json!(1))]).await.unwrap();
    assert_eq!(alone[0].owner, None, "no session yet");

    let replica = ReplicaId::new();
    s.claim_affinity(b.id, replica, SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    let mut keyed = message(a, json!(2));
    keyed.idempotency_key = Some("k".into());
    let held = s.insert_messages(vec![keyed.clone()]).await.unwrap();
    assert_eq!(held[0].owner, Some(replica));
    let intents = s.insert_intents(vec![intent(a, Op::Start)]).await.unwrap();
    assert_eq!(intents[0].owner, Some(replica));

    let mut retry = keyed;
    retry.id = MessageId::new();
    let replayed = s.insert_messages(vec![retry]).await.unwrap();
    assert!(!replayed[0].created);
    assert_eq!(replayed[0].owner, None, "only created rows are routed");
}

/// The routing argument of `Inserted::owner`: a row whose insert read an
/// older holder (or none) committed before the new session's claim did, so
/// the new session's first drain sees it. Checked by listing the intents
/// right after the claim returns: every row that did not name the new
/// holder must already be there.
async fn no_session_is_claimed_between_reading_the_holder_and_the_commit(f: Fixture) {
    let s = f.store.clone();
    let b = broker(&*s, "b").await;
    let a = agent(&*s, b.id, "w").await;
    s.claim_affinity(b.id, ReplicaId::new(), SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let store = f.replica().await;
        writers.spawn(async move {
            let mut rows = Vec::new();
            for i in 0..25 {
                let mut item = intent(a, Op::Restart);
                item.idempotency_key = Some(format!("{w}-{i}"));
                rows.extend(store.insert_intents(vec![item]).await.unwrap());
            }
            rows
        });
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let newcomer = ReplicaId::new();
    s.claim_affinity(b.id, newcomer, SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    let visible: HashSet<IntentId> = s
        .list_intents(IntentFilter {
            broker_id: Some(b.id),
            state: None,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    let mut written = Vec::new();
    while let Some(rows) = writers.join_next().await {
        written.extend(rows.unwrap());
    }
    assert_eq!(written.len(), 200);
    for row in &written {
        assert!(row.created);
        if row.owner != Some(newcomer) {
            assert!(
                visible.contains(&row.row.id),
                "intent {} named {:?}, yet committed after {newcomer} claimed the session",
                row.row.id,
                row.owner
            );
        }
    }
}

async fn a_poll_moves_its_session_to_its_replica_only_while_the_session_is_live(f: Fixture) {
    let s = &*f.store;
    let b = broker(s, "poller").await;
    let (ra, rb) = (ReplicaId::new(), ReplicaId::new());
    let (old, new) = (SessionId::new(), SessionId::new());
    s.claim_affinity(b.id, ra, old, Transport::Poll)
        .await
        .unwrap();
    assert_eq!(s.broker(b.id).await.unwrap().transport, Transport::Poll);
    assert_eq!(
        s.resume_session(b.id, rb, old).await.unwrap(),
        SessionHeartbeat::Current
    );
    let row = s.broker(b.id).await.unwrap();
    assert_eq!(
        row.affinity().map(|a| (a.replica, a.session)),
        Some((rb, old))
    );
    // A newer session (a socket here) took over: the old session's poll
    // moves nothing, and the old holder's release clears nothing.
    s.claim_affinity(b.id, ra, new, Transport::Ws)
        .await
        .unwrap();
    assert_eq!(
        s.resume_session(b.id, rb, old).await.unwrap(),
        SessionHeartbeat::Superseded
    );
    assert!(!s.release_affinity(b.id, rb, old).await.unwrap());
    let row = s.broker(b.id).await.unwrap();
    assert_eq!(
        row.affinity().map(|a| (a.replica, a.session)),
        Some((ra, new))
    );
    assert_eq!(row.transport, Transport::Ws);
}

async fn only_poll_sessions_lapse(f: Fixture) {
    let s = &*f.store;
    let polling = broker(s, "polling").await;
    let socket = broker(s, "socket").await;
    s.claim_affinity(
        polling.id,
        ReplicaId::new(),
        SessionId::new(),
        Transport::Poll,
    )
    .await
    .unwrap();
    s.claim_affinity(socket.id, ReplicaId::new(), SessionId::new(), Transport::Ws)
        .await
        .unwrap();
    assert!(
        s.release_lapsed_sessions(Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "both heartbeats are fresh"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lapsed = s
        .release_lapsed_sessions(Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(lapsed, vec![polling.id]);
    assert_eq!(
        s.broker(polling.id).await.unwrap().status,
        BrokerStatus::Offline
    );
    assert_eq!(
        s.broker(socket.id).await.unwrap().status,
        BrokerStatus::Online
    );
}

async fn a_poll_sends_again_what_was_not_acknowledged_but_not_a_received_dispatch(f: Fixture) {
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let (a1, a2) = (agent(s, b.id, "w1").await, agent(s, b.id, "w2").await);
    let received = s.insert_intent(intent(a1, Op::Start)).await.unwrap().row.id;
    let lost = s.insert_intent(intent(a2, Op::Start)).await.unwrap().row.id;
    let session = session_of(s, b.id).await;
    assert_eq!(s.claim_intents(&[session], me, 10).await.unwrap().len(), 2);
    let other = broker(s, "other").await;
    assert_eq!(
        s.receive(other.id, &[received.0]).await.unwrap(),
        vec![received.0],
        "another broker's dispatch is not received"
    );
    assert!(s.receive(b.id, &[received.0]).await.unwrap().is_empty());
    let report = s.requeue_unacknowledged(b.id, 5).await.unwrap();
    assert_eq!(report.requeued(), 1, "{report:?}");
    assert_eq!(
        s.intent(received).await.unwrap().state,
        IntentState::InProgress
    );
    assert_eq!(s.intent(lost).await.unwrap().state, IntentState::Pending);
    // Claimed again, the receipt of the earlier claim does not count.
    assert_eq!(s.claim_intents(&[session], me, 10).await.unwrap().len(), 1);
    s.requeue_unacknowledged(b.id, 5).await.unwrap();
    assert_eq!(s.intent(lost).await.unwrap().state, IntentState::Pending);
    // A session's requeue takes the received one too.
    s.requeue_broker_in_flight(b.id, None).await.unwrap();
    assert_eq!(
        s.intent(received).await.unwrap().state,
        IntentState::Pending
    );

    // Messages alike: a received one stays in flight until its ack.
    let a3 = agent(s, b.id, "w3").await;
    let kept = s
        .insert_messages(vec![message(a3, json!(1))])
        .await
        .unwrap()[0]
        .row
        .id;
    let resent = s
        .insert_messages(vec![message(a3, json!(2))])
        .await
        .unwrap()[0]
        .row
        .id;
    s.claim_messages(&[session], me, 10).await.unwrap();
    assert!(s.receive(b.id, &[kept.0]).await.unwrap().is_empty());
    s.requeue_unacknowledged(b.id, 5).await.unwrap();
    assert_eq!(
        s.message(kept).await.unwrap().state,
        MessageState::Dispatched
    );
    assert_eq!(
        s.message(resent).await.unwrap().state,
        MessageState::Pending
    );
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(s.receive(b.id, &[unknown]).await.unwrap(), vec![unknown]);
    // A receipt that arrives after the ack changes nothing and is no error.
    s.ack_messages(b.id, &[kept]).await.unwrap();
    assert!(s.receive(b.id, &[kept.0]).await.unwrap().is_empty());
    assert_eq!(
        s.message(kept).await.unwrap().state,
        MessageState::Delivered
    );
}

async fn a_message_and_its_files_are_written_all_or_none_and_removed_once_final(f: Fixture) {
    use switchyard_store::{ATTACHMENT_CHUNK, AttachmentId, NewAttachment};
    let s = &*f.store;
    let me = ReplicaId::new();
    let b = broker(s, "b").await;
    let a = agent(s, b.id, "w").await;
    let file = |name: &str, data: Vec<u8>, size: u64| NewAttachment {
        id: AttachmentId::new(),
        name: name.to_owned(),
        size,
        sha256: "digest".to_owned(),
        content: Box::new(std::io::Cursor::new(data)),
    };
    let big = vec![7u8; ATTACHMENT_CHUNK * 2 + 3];
    let short = s
        .insert_message_with_attachments(
            message(a, json!("short")),
            vec![
                file("a", big.clone(), big.len() as u64),
                file("b", vec![1, 2], 3),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(short, StoreError::Invalid(_)), "{short:?}");
    assert_eq!(s.attachment_bytes().await.unwrap(), 0, "no file was kept");
    let session = session_of(s, b.id).await;
    assert!(
        s.claim_messages(&[session], me, 10)
            .await
            .unwrap()
            .is_empty(),
        "nor the message"
    );

    let first = file("a", big.clone(), big.len() as u64);
    let first_id = first.id;
    let sent = s
        .insert_message_with_attachments(
            message(a, json!("files")),
            vec![first, file("b", vec![1, 2], 2)],
        )
        .await
        .unwrap();
    assert_eq!(sent.row.attachments, 2);
    let files = s.attachments_of(&[sent.row.id]).await.unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let mut read = Vec::new();
    let mut n = 0;
    while let Some(chunk) = s.attachment_chunk(first_id, n).await.unwrap() {
        assert!(chunk.len() <= ATTACHMENT_CHUNK);
        read.extend(chunk);
        n += 1;
    }
    assert_eq!((n, read), (3, big));
    let other = broker(s, "other").await;
    assert!(matches!(
        s.attachment(other.id, first_id).await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    s.claim_messages(&[session], me, 10).await.unwrap();
    assert_eq!(
        s.remove_finished_attachments().await.unwrap(),
        0,
        "not final yet"
    );
    s.ack_messages(b.id, &[sent.row.id]).await.unwrap();
    assert_eq!(s.remove_finished_attachments().await.unwrap(), 2);
    assert_eq!(s.attachment_bytes().await.unwrap(), 0);
    assert!(s.attachment_chunk(first_id, 0).await.unwrap().is_none());
}

async fn concurrent_sends_of_files_with_one_key_write_one_message(f: Fixture) {
    use switchyard_store::{AttachmentId, NewAttachment};
    let b = broker(&*f.store, "b").await;
    let a = agent(&*f.store, b.id, "w").await;
    let sends = (0..8)
        .map(|_| {
            let store = f.store.clone();
            let mut keyed = message(a, json!("once"));
            keyed.idempotency_key = Some("k-files".to_owned());
            keyed.request_digest = Some("same".to_owned());
            // The file arrives slowly: each transaction stays open after its
            // insert, so the others read no row for the key and then collide.
            let (mut writer, reader) = tokio::io::duplex(64);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = writer.write_all(&[1, 2, 3]).await;
            });
            let file = NewAttachment {
                id: AttachmentId::new(),
                name: "f".to_owned(),
                size: 3,
                sha256: "digest".to_owned(),
                content: Box::new(reader),
            };
            tokio::spawn(async move {
                store
                    .insert_message_with_attachments(keyed, vec![file])
                    .await
            })
        })
        .collect::<Vec<_>>();
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for send in sends {
        let inserted = send.await.unwrap().expect("every send is answered");
        ids.insert(inserted.row.id);
        created += usize::from(inserted.created);
    }
    assert_eq!((ids.len(), created), (1, 1), "one message, created once");
    assert_eq!(f.store.attachment_bytes().await.unwrap(), 3, "and one file");
}

fn event(n: usize) -> NewEvent {
    NewEvent {
        kind: "test".into(),
        agent_id: None,
        data: format!("{{\"n\":{n}}}"),
    }
}

/// The event log's invariant: ids are handed out in commit order, so a
/// reader that asks for the events after the last id it saw, while four
/// writers (separate pools, as separate replicas) append concurrently,
/// sees every event exactly once. Without the ordered append a later id
/// can commit first and the reader steps over the earlier one.
async fn a_reader_of_the_event_log_never_skips_an_event_appended_concurrently(f: Fixture) {
    const WRITERS: usize = 4;
    const BATCHES: usize = 60;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = f.replica().await;
        writers.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let n = (w * BATCHES + b) * 2;
                store
                    .append_events(&[event(n), event(n + 1)])
                    .await
                    .unwrap();
            }
        }));
    }
    let total = WRITERS * BATCHES * 2;
    let reader = f.replica().await;
    let mut cursor = 0;
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < total {
        assert!(
            tokio::time::Instant::now() < until,
            "{} of {total}",
            seen.len()
        );
        for e in reader.events_after(cursor, 7).await.unwrap() {
            assert!(e.id > cursor);
            cursor = e.id;
            seen.push(e.data);
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), total, "each event once");
    assert!(reader.events_after(cursor, 10).await.unwrap().is_empty());
    let all = reader.events_after(0, 1000).await.unwrap();
    assert_eq!(all.len(), total, "the tailing reader missed none");
    let bounds = reader.event_bounds().await.unwrap();
    assert_eq!((bounds.last, bounds.pruned_through), (cursor, 0));
}

async fn pruning_the_event_log_raises_its_horizon_and_ids_are_never_reused(f: Fixture) {
    let s = &f.store;
    let empty = s.event_bounds().await.unwrap();
    assert_eq!((empty.last, empty.pruned_through), (0, 0));
    s.append_events(&[event(1), event(2), event(3)])
        .await
        .unwrap();
    let all = s.events_after(0, 10).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(
        s.events_after(all[0].id, 1).await.unwrap(),
        vec![all[1].clone()]
    );
    assert_eq!(
        s.prune_events(Duration::from_secs(3600)).await.unwrap(),
        0,
        "nothing is old"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.prune_events(Duration::ZERO).await.unwrap(), 3);
    let pruned = s.event_bounds().await.unwrap();
    assert_eq!(pruned.pruned_through, all[2].id);
    assert_eq!(
        pruned.last, all[2].id,
        "the newest id is remembered when the log is empty"
    );
    s.append_events(&[event(4)]).await.unwrap();
    let next = s.events_after(0, 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert!(next[0].id > all[2].id, "ids are never reused after pruning");
}

/// An agent whose delete is pending or in flight takes no other op: in
/// its one order the op would reach a broker that no longer has it. A
/// second delete joins the open one.
async fn nothing_is_queued_behind_an_unfinished_delete(f: Fixture) {
    const ANY: &[Phase] = &[Phase::Created, Phase::Running, Phase::Stopped];
    let b = broker(&*f.store, "b").await;
    let a = agent(&*f.store, b.id, "w").await;
    let delete = f
        .store
        .insert_lifecycle(intent(a, Op::Delete), ANY)
        .await
        .unwrap();
    for op in [Op::Start, Op::Stop, Op::Restart, Op::Call] {
        match f.store.insert_lifecycle(intent(a, op), ANY).await {
            Err(StoreError::Conflict(Conflict::Phase(Phase::Deleted))) => {}
            other => panic!("{op:?} behind a delete: {other:?}"),
        }
    }
    let again = f
        .store
        .insert_lifecycle(intent(a, Op::Delete), ANY)
        .await
        .unwrap();
    assert_eq!((again.created, again.row.id), (false, delete.row.id));
    f.store
        .finish_intent(
            delete.row.id,
            IntentOutcome::Failed {
                error: "refused".into(),
                code: None,
            },
        )
        .await
        .unwrap();
    let start = f
        .store
        .insert_lifecycle(intent(a, Op::Start), ANY)
        .await
        .unwrap();
    assert!(start.created, "a failed delete holds nothing back");
}
