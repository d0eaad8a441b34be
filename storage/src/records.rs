//! The tier's records: stored objects, copied files, ignored files and failures.
//! Single upserts keyed by unique constraints, so repeated or concurrent messages never
//! create duplicates.

use db::{AnyPool, Row};

/// Embedded migrations shared by both storage tiers.
pub static MIGRATOR: db::Migrator = db::sqlx::migrate!("./migrations");

/// Database access for one tier.
#[derive(Clone, Debug)]
pub struct Records {
    /// Reads.
    pool: AnyPool,
    /// Writes off the per-file path (failures, multipart bookkeeping).
    write: AnyPool,
    /// The per-file writes (claims, copies, releases), committed in groups.
    group: GroupCommit,
    /// How long an upload claim lasts unrenewed (see `tier::Claim`).
    claim_lease: std::time::Duration,
}

/// Most writes in one group commit (bounds a transaction's size, not the wait).
const MAX_GROUP: usize = 256;

/// The per-file writes, applied in batches: one task takes every write queued while
/// the previous commit ran and applies them in one transaction, so one fsync (SQLite's
/// synchronous = FULL) covers many files. Each caller is answered only after the
/// commit that holds its write returned, so nothing reports a copy before its record
/// is durable.
#[derive(Clone, Debug)]
struct GroupCommit {
    tx: tokio::sync::mpsc::UnboundedSender<(Write, Reply)>,
    /// On PostgreSQL, claim renewals commit apart from the other writes: a renewal
    /// touches only its own claim's row, but queued behind a batch held up by a row
    /// another replica locked (a replica paused or cut off mid-transaction keeps its locks
    /// for up to a minute) it waited out that batch's lock timeout and its writes' retries
    /// one by one — longer than the lease lets a renewal take — and every copy of the
    /// healthy replica on an S3 store gave up its claim, and its uploaded parts, together.
    renewals: Option<tokio::sync::mpsc::UnboundedSender<(Write, Reply)>>,
}

type Reply = tokio::sync::oneshot::Sender<Result<bool, db::sqlx::Error>>;

/// One write of the per-file path; its result is `true` for a claim taken.
#[derive(Debug)]
enum Write {
    Claim {
        key: String,
        owner: String,
        lease_ms: i64,
    },
    Renew {
        key: String,
        owner: String,
        lease_ms: i64,
    },
    Release {
        key: String,
        owner: String,
    },
    Copy(Box<CopyRow>),
}

/// A verified copy to record, and the claim its recording gives up.
#[derive(Debug)]
struct CopyRow {
    object: StoredObject,
    algorithm: String,
    original_path: String,
    mtime: String,
    imported_id: Option<String>,
    release: Option<(String, String)>,
}

impl GroupCommit {
    fn start(pool: AnyPool, is_sqlite: bool) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // SQLite has one writer whatever commits: a second committer would only wait
        // for the first's lock.
        let renewals = (!is_sqlite).then(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(committer(pool.clone(), is_sqlite, rx, RENEWAL_LOCK_WAITS));
            tx
        });
        tokio::spawn(committer(pool, is_sqlite, rx, WRITE_LOCK_WAITS));
        Self { tx, renewals }
    }

    async fn run(&self, w: Write) -> Result<bool, db::sqlx::Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || db::sqlx::Error::PoolClosed;
        let to = match (&w, &self.renewals) {
            (Write::Renew { .. }, Some(renewals)) => renewals,
            _ => &self.tx,
        };
        to.send((w, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// How long a committer's writes wait for a row another session holds (PostgreSQL).
#[derive(Debug, Clone, Copy)]
struct LockWaits {
    /// A batch's (None: the connection's lock timeout, 10 s).
    batch: Option<&'static str>,
    /// Each write's, when a failed batch is applied one write at a time.
    each: &'static str,
}

/// The per-file writes'.
const WRITE_LOCK_WAITS: LockWaits = LockWaits {
    batch: None,
    each: "1s",
};

/// Claim renewals': a renewal's own row is locked only by another replica's claim of the
/// key looking at it (a replica paused mid-transaction holds that for up to a minute). A
/// renewal given up fails alone, and the next, a few seconds on, is still within the
/// lease; waited for the whole lock timeout, one locked row took the whole of what the
/// lease lets a renewal take, and every renewal queued behind it with it (a batch
/// meeting j locked rows now takes about 0.5 + 0.2 j s).
const RENEWAL_LOCK_WAITS: LockWaits = LockWaits {
    batch: Some("500ms"),
    each: "200ms",
};

/// The group-commit task: runs until every [`Records`] clone is dropped, its writes
/// waiting for rows other sessions hold as `waits` says.
async fn committer(
    pool: AnyPool,
    is_sqlite: bool,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Write, Reply)>,
    waits: LockWaits,
) {
    let mut batch = Vec::new();
    // The writer connection's `synchronous` as last set (FULL when it opened).
    let mut full = true;
    while rx.recv_many(&mut batch, MAX_GROUP).await > 0 {
        // Bounded: a server that stopped answering would hold this one committer, and
        // with it every handler's claim and record, for ever.
        let applied = db::bounded(apply_waiting(
            &pool,
            is_sqlite,
            &mut full,
            batch.iter().map(|(w, _)| w),
            waits.batch,
        ))
        .await;
        match applied {
            Ok(results) => {
                for ((_, reply), r) in batch.drain(..).zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some((_, reply)) = batch.pop() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(e) if !about_one_write(&e) => {
                // The database is out of reach: each write alone would wait out the pool's
                // acquire timeout again, one after another (a batch of 16 took minutes,
                // claim renewals queued behind it expiring). Every write gets the error.
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(each_writes_share(&e)));
                }
            }
            Err(_) => {
                // One write failed the whole batch: each is applied alone, so only the
                // failing one reports an error. A row lock that held the batch up for
                // the whole lock timeout is not waited for as long again: every write
                // of this process queues behind this pass. The database going out of
                // reach midway fails the rest at once, as above.
                let mut gone: Option<db::sqlx::Error> = None;
                for (w, reply) in batch.drain(..) {
                    if let Some(e) = &gone {
                        let _ = reply.send(Err(each_writes_share(e)));
                        continue;
                    }
                    let once = std::iter::once(&w);
                    let r = db::bounded(apply_waiting(
                        &pool,
                        is_sqlite,
                        &mut full,
                        once,
                        Some(waits.each),
                    ))
                    .await
                    .map(|r| r.first().copied().unwrap_or(false));
                    if let Err(e) = &r
                        && !about_one_write(e)
                    {
                        gone = Some(each_writes_share(e));
                    }
                    let _ = reply.send(r);
                }
            }
        }
    }
}

/// A failure of a whole batch as each of its writes gets it (sqlx's errors are not
/// `Clone`): of the same kind, code and text, so a write is classified as it would be
/// alone — an outage waited out, the database's own error (a damaged SQLite file, a
/// transaction state) counted — where every write once got an I/O error, an outage.
fn each_writes_share(e: &db::sqlx::Error) -> db::sqlx::Error {
    use db::sqlx::Error as E;
    match e {
        E::Database(d) => E::Database(Box::new(BatchFailure {
            code: d.code().map(|c| c.into_owned()),
            message: d.message().to_owned(),
        })),
        E::Io(io) => E::Io(std::io::Error::new(io.kind(), io.to_string())),
        E::Tls(t) => E::Tls(t.to_string().into()),
        E::PoolTimedOut => E::PoolTimedOut,
        E::PoolClosed => E::PoolClosed,
        E::WorkerCrashed => E::WorkerCrashed,
        other => E::Protocol(other.to_string()),
    }
}

/// A database's error that failed a batch, as each write of the batch reports it.
#[derive(Debug)]
struct BatchFailure {
    code: Option<String>,
    message: String,
}

impl std::fmt::Display for BatchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BatchFailure {}

impl db::sqlx::error::DatabaseError for BatchFailure {
    fn message(&self) -> &str {
        &self.message
    }
    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.code.as_deref().map(std::borrow::Cow::Borrowed)
    }
    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }
    fn kind(&self) -> db::sqlx::error::ErrorKind {
        db::sqlx::error::ErrorKind::Other
    }
}

/// A producer's text (a path, an error quoting it) as a record keeps it: cut as `x-error`
/// is, since it can be of any length and PostgreSQL's index refuses long values; a NUL
/// written `\0`, since PostgreSQL's text refuses it (the failure of a message whose path
/// held one went unrecorded).
fn stored_text(s: &str) -> String {
    framework::headers::truncate(s, framework::headers::MAX_ERROR_BYTES).replace('\0', "\\0")
}

/// Whether a failed batch may have failed for one of its writes (a constraint, a lock
/// wait, a deadlock, a value out of range), so applying each alone isolates it; not when
/// the database itself is out of reach (no connection, connection lost, shutting down,
/// out of resources), which every write would meet again.
fn about_one_write(e: &db::sqlx::Error) -> bool {
    match e {
        db::sqlx::Error::Database(d) => {
            // SQLSTATEs (PostgreSQL) are five characters; SQLite's codes are numbers of at
            // most four digits, whose low byte is the primary code.
            let code = d.code().unwrap_or_default();
            if code.len() == 5 {
                // Class 25: the session's transaction state (read-only on a primary
                // demoted by a failover, ended for idling), not the write.
                return !(code.starts_with("08")
                    || code.starts_with("57P")
                    || code.starts_with("53")
                    || code.starts_with("25"));
            }
            // The file busy or locked by another process (after the busy timeout: each
            // write alone would wait it out again), out of memory, read-only, I/O, damaged,
            // full, cannot be opened: about the database, not one write.
            let primary = code.parse::<u32>().map_or(0, |c| c & 0xff);
            ![5, 6, 7, 8, 10, 11, 13, 14].contains(&primary)
        }
        _ => false,
    }
}

/// Applies `writes` in one transaction; their results once it committed. `full` is the
/// writer's `synchronous` mode as last set, so a batch pays no `PRAGMA` unless it changes.
#[cfg(test)]
async fn apply<'a>(
    pool: &AnyPool,
    is_sqlite: bool,
    full: &mut bool,
    writes: impl Iterator<Item = &'a Write>,
) -> Result<Vec<bool>, db::sqlx::Error> {
    apply_waiting(pool, is_sqlite, full, writes, None).await
}

/// [`apply`], waiting at most `lock_wait` (PostgreSQL) for a row another session holds
/// instead of the connection's lock timeout.
async fn apply_waiting<'a>(
    pool: &AnyPool,
    is_sqlite: bool,
    full: &mut bool,
    writes: impl Iterator<Item = &'a Write>,
    lock_wait: Option<&str>,
) -> Result<Vec<bool>, db::sqlx::Error> {
    let writes: Vec<&Write> = writes.collect();
    let mut acquired = pool.acquire().await?;
    let mut conn = Relaxed {
        conn: &mut acquired,
        unsafe_if_dropped: false,
    };
    let relaxed = is_sqlite && !writes.iter().any(|w| matches!(w, Write::Copy(_)));
    if is_sqlite && relaxed == *full {
        // Only a recorded copy must survive a power loss; claims are leases that a
        // restart outlives anyway. A batch of claims alone skips the WAL fsync (it is
        // still atomic and survives a crash); the next batch with a copy syncs the WAL,
        // earlier frames included.
        let mode = if relaxed { "NORMAL" } else { "FULL" };
        // Not known to be FULL until the PRAGMA returned (a batch given up meanwhile):
        // the next batch with a copy then sets FULL again.
        *full = false;
        conn.unsafe_if_dropped = true;
        db::sqlx::query(&format!("PRAGMA synchronous = {mode}"))
            .execute(&mut **conn.conn)
            .await?;
        conn.unsafe_if_dropped = relaxed;
        *full = !relaxed;
        #[cfg(test)]
        RELAXED_HERE.with(|r| r.set(relaxed));
    }
    let applied = apply_in(conn.conn, &writes, lock_wait).await;
    if let Err(e) = &applied
        && !about_one_write(e)
    {
        // A failure of the database can leave the connection unfit to serve on (after
        // SQLite's "disk full" the client believes a transaction still open, and every
        // later batch failed to begin for the 30 minutes the connection lived; a
        // PostgreSQL session on a primary demoted to read-only): a new one serves the
        // next batch. One write's failure (a lock wait, a constraint) leaves it fit.
        conn.conn.close_on_drop();
        // The next connection starts with `synchronous = FULL`.
        *full = true;
        return applied;
    }
    if relaxed {
        // Back to FULL before the connection goes back to the pool, whether or not the
        // batch committed: the writes made on it outside the group commit (an ignored
        // file, a multipart upload's id and parts) must survive a power loss too.
        let restored = db::sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut **conn.conn)
            .await;
        // Not known to be FULL: the next batch sets it again before anything else.
        *full = restored.is_ok();
        conn.unsafe_if_dropped = restored.is_err();
        restored?;
    }
    applied
}

#[cfg(test)]
thread_local! {
    /// Set where a batch on this thread made its connection `synchronous = NORMAL`: a test
    /// gives the batch up only once it did.
    static RELAXED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The writer's connection during a batch: closed instead of going back to the pool where
/// the batch ends (or is given up at its time limit) with it not known to be at
/// `synchronous = FULL` — a write made on it outside the group commit (an ignored file)
/// would skip the WAL fsync, and a power loss lose the record of an acked message. A new
/// connection starts at FULL.
struct Relaxed<'c> {
    conn: &'c mut db::sqlx::pool::PoolConnection<db::sqlx::Any>,
    unsafe_if_dropped: bool,
}

impl Drop for Relaxed<'_> {
    fn drop(&mut self) {
        if self.unsafe_if_dropped {
            self.conn.close_on_drop();
        }
    }
}

/// Set once the database refused `SET LOCAL lock_timeout` (a PostgreSQL-compatible server
/// without it): the per-transaction lock waits are not asked for again.
static LOCK_WAITS_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Applies `writes` in one transaction on `conn`; their results once it committed.
async fn apply_in(
    conn: &mut db::sqlx::pool::PoolConnection<db::sqlx::Any>,
    writes: &[&Write],
    lock_wait: Option<&str>,
) -> Result<Vec<bool>, db::sqlx::Error> {
    let clock = database_clock(conn.backend_name());
    let sqlite = conn.backend_name().eq_ignore_ascii_case("sqlite");
    // Rows are locked in one order by every batch, table by table and key by key: the
    // copies' objects, then their files (each multi-row statement in key order), then
    // every claim row — a copy's release among the claims, renewals and releases of the
    // batch, in key order. Two replicas' batches locking one table's rows in opposite
    // orders, or a claim row before an object row in one and after it in the other,
    // deadlocked on PostgreSQL (one waited out `deadlock_timeout`, then had every write of
    // its batch redone one commit at a time). A sort stable in the batch's order: one
    // key's claim writes keep theirs, after the release of a copy of that key.
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by_key(|&i| (!matches!(writes[i], Write::Copy(_)), writes[i].key()));
    let copies: Vec<&CopyRow> = order
        .iter()
        .map_while(|&i| match writes[i] {
            Write::Copy(c) => Some(&**c),
            _ => None,
        })
        .collect();
    let begin = db::begin_statement(conn.backend_name());
    let mut tx = db::sqlx::Connection::begin_with(&mut **conn, begin).await?;
    if let Some(wait) = lock_wait
        .filter(|_| !sqlite && !LOCK_WAITS_REFUSED.load(std::sync::atomic::Ordering::Relaxed))
    {
        let set = db::sqlx::query(&format!("SET LOCAL lock_timeout = '{wait}'"))
            .execute(&mut *tx)
            .await;
        if let Err(e) = set {
            // The server's own refusal (not a lost connection): not asked again, so that
            // one batch fails, not every renewal from now on.
            // Only the codes of a setting or statement the server does not have: an
            // outage's (a failover, a shutdown) passes.
            let unsupported = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| ["42704", "0A000", "42601", "22023"].contains(&c.as_ref()));
            if unsupported && !LOCK_WAITS_REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "the database refuses `SET LOCAL lock_timeout`: \
                    claim renewals wait on a locked row as long as other writes do");
            }
            return Err(e);
        }
    }
    if !copies.is_empty() {
        // In a few multi-row statements: each statement is a round trip to SQLite's
        // worker thread, and these are most of a busy batch.
        copies_in(&mut tx, &copies).await?;
    }
    let mut results = vec![true; copies.len()];
    let mut releases: Vec<(&str, &str)> = copies
        .iter()
        .filter_map(|c| c.release.as_ref().map(|(k, o)| (k.as_str(), o.as_str())))
        .collect();
    releases.sort_by_key(|(k, _)| *k);
    let mut releases = releases.into_iter().peekable();
    for &i in &order[copies.len()..] {
        let w = writes[i];
        while let Some((key, owner)) = releases.next_if(|(k, _)| *k <= w.key()) {
            release_in(&mut tx, key, owner).await?;
        }
        results.push(match w {
            Write::Claim {
                key,
                owner,
                lease_ms,
            } => claim_in(&mut tx, clock, key, owner, *lease_ms).await?,
            Write::Renew {
                key,
                owner,
                lease_ms,
            } => {
                db::sqlx::query(&format!(
                    "UPDATE upload_claims SET expires_at = {clock} + $3 \
                     WHERE object_key = $1 AND owner = $2"
                ))
                .bind(key)
                .bind(owner)
                .bind(*lease_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1
            }
            Write::Release { key, owner } => {
                release_in(&mut tx, key, owner).await?;
                true
            }
            Write::Copy(_) => unreachable!("copies are sorted first"),
        });
    }
    for (key, owner) in releases {
        release_in(&mut tx, key, owner).await?;
    }
    tx.commit().await?;
    let mut answers = vec![false; writes.len()];
    for (r, &i) in results.into_iter().zip(&order) {
        answers[i] = r;
    }
    Ok(answers)
}

impl Write {
    /// The key whose rows this write locks.
    fn key(&self) -> &str {
        match self {
            Write::Claim { key, .. } | Write::Renew { key, .. } | Write::Release { key, .. } => key,
            Write::Copy(c) => &c.object.object_key,
        }
    }
}

type Tx<'c> = db::sqlx::Transaction<'c, db::sqlx::Any>;

/// A lease in milliseconds, capped so that adding it to the clock cannot overflow.
fn lease_ms(lease: std::time::Duration) -> i64 {
    i64::try_from(lease.as_millis()).map_or(i64::MAX / 2, |ms| ms.min(i64::MAX / 2))
}

/// How long an expired upload claim stays before [`Records::prune_expired_claims`]
/// forgets it (an hour, in milliseconds): long past any lease, so only the abandoned go.
const EXPIRED_CLAIMS_KEPT_MS: i64 = 3_600_000;

/// The database's own clock, in milliseconds since 1970, as SQL. Claims are leased and
/// expired by it, not by the replicas' clocks: a replica whose clock ran a lease ahead of
/// another's took that one's live claim as expired, and both uploaded to one key at once.
fn database_clock(backend: &str) -> &'static str {
    if backend.eq_ignore_ascii_case("sqlite") {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)"
    } else {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    }
}

async fn claim_in(
    tx: &mut Tx<'_>,
    clock: &str,
    key: &str,
    owner: &str,
    lease_ms: i64,
) -> Result<bool, db::sqlx::Error> {
    let r = db::sqlx::query(&format!(
        "INSERT INTO upload_claims (object_key, owner, expires_at) VALUES ($1, $2, {clock} + $3) \
         ON CONFLICT (object_key) DO UPDATE SET owner = excluded.owner, \
         expires_at = excluded.expires_at \
         WHERE upload_claims.owner = excluded.owner OR upload_claims.expires_at < {clock}"
    ))
    .bind(key)
    .bind(owner)
    .bind(lease_ms)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

async fn release_in(tx: &mut Tx<'_>, key: &str, owner: &str) -> Result<(), db::sqlx::Error> {
    db::sqlx::query("DELETE FROM upload_claims WHERE object_key = $1 AND owner = $2")
        .bind(key)
        .bind(owner)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

/// Records `copies` in order: each table's rows in multi-row upserts (the last row of a
/// key wins, as one upsert after another would leave it; PostgreSQL refuses a statement
/// that upserts one row twice). The claims they give up are released by the caller.
async fn copies_in(tx: &mut Tx<'_>, copies: &[&CopyRow]) -> Result<(), db::sqlx::Error> {
    let at = now();
    let objects = last_per_key(copies, |c| c.object.object_key.as_str());
    for chunk in power_of_two_chunks(&objects) {
        let sql = multi_row_upsert(
            "INSERT INTO stored_objects (object_key, size, algorithm, checksum, stored_at, \
             store_etag, store_version, store_checksum, content_sha256) VALUES ",
            9,
            chunk.len(),
            " ON CONFLICT (object_key) DO UPDATE SET size = excluded.size, \
             algorithm = excluded.algorithm, checksum = excluded.checksum, \
             store_etag = excluded.store_etag, store_version = excluded.store_version, \
             store_checksum = excluded.store_checksum, \
             content_sha256 = excluded.content_sha256",
        );
        let mut q = db::sqlx::query(&sql);
        for c in chunk {
            let object = &c.object;
            q = q
                .bind(&object.object_key)
                .bind(object.size as i64)
                .bind(&c.algorithm)
                .bind(&object.checksum)
                .bind(&at)
                .bind(object.store.etag.as_deref())
                .bind(object.store.version.as_deref())
                .bind(object.store.checksum.as_deref())
                .bind(object.content_sha256.as_deref());
        }
        q.execute(&mut **tx).await?;
    }
    let files = last_per_key(copies, |c| {
        (c.original_path.as_str(), c.object.object_key.as_str())
    });
    // As one upsert after another would leave it: a later row without a Pluto id keeps
    // the one an earlier row of the batch brought (the sweeper's `file.new` and its
    // `file.update` handled at once).
    let mut ids = std::collections::HashMap::new();
    for c in copies {
        if let Some(id) = &c.imported_id {
            ids.insert(
                (c.original_path.as_str(), c.object.object_key.as_str()),
                id.as_str(),
            );
        }
    }
    for chunk in power_of_two_chunks(&files) {
        let sql = multi_row_upsert(
            "INSERT INTO copied_files (original_path, object_key, size, mtime, imported_id, \
             recorded_at, checksum, content_sha256) VALUES ",
            8,
            chunk.len(),
            " ON CONFLICT (original_path, object_key) DO UPDATE SET size = excluded.size, \
             mtime = excluded.mtime, \
             imported_id = COALESCE(excluded.imported_id, copied_files.imported_id), \
             recorded_at = excluded.recorded_at, checksum = excluded.checksum, \
             content_sha256 = excluded.content_sha256",
        );
        let mut q = db::sqlx::query(&sql);
        for c in chunk {
            q = q
                .bind(&c.original_path)
                .bind(&c.object.object_key)
                .bind(c.object.size as i64)
                .bind(&c.mtime)
                .bind(
                    ids.get(&(c.original_path.as_str(), c.object.object_key.as_str()))
                        .copied(),
                )
                .bind(&at)
                .bind(&c.object.checksum)
                .bind(c.object.content_sha256.as_deref());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The last of `items` for each key, in the order of their keys. Sorted, because the
/// rows of one statement are locked in its order: two replicas' batches upserting the
/// same keys in opposite orders deadlocked on PostgreSQL (one waited out its
/// `deadlock_timeout`, then had every write of its batch redone one commit at a time).
fn last_per_key<'a, T, K: Ord>(items: &[&'a T], key: impl Fn(&'a T) -> K) -> Vec<&'a T> {
    let mut last = std::collections::BTreeMap::new();
    for i in items {
        last.insert(key(i), *i);
    }
    last.into_values().collect()
}

/// `items` in chunks of 32, 16, 8, 4, 2 and 1: a few statement shapes for the
/// connection's statement cache, however many rows a batch holds.
fn power_of_two_chunks<T>(mut items: &[T]) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let mut size = 32;
    while !items.is_empty() {
        while size > items.len() {
            size /= 2;
        }
        let (chunk, rest) = items.split_at(size);
        chunks.push(chunk);
        items = rest;
    }
    chunks
}

/// `head` + `rows` tuples of `columns` numbered placeholders + `tail`.
fn multi_row_upsert(head: &str, columns: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns * 5);
    sql.push_str(head);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", r * columns + c + 1));
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// A stored object as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// Key in the store.
    pub object_key: String,
    /// Verified size.
    pub size: u64,
    /// Verified digest.
    pub checksum: String,
    /// The content's SHA-256 (hex) where `checksum` is MD5 (see
    /// [`crate::copy::Digest::sha256`]); `None` where not known.
    pub content_sha256: Option<String>,
    /// What the store said about it when it was verified.
    pub store: StoreFacts,
}

/// The condition (over `copied_files f` joined to `stored_objects o`) under which the
/// object still holds what the file was copied as: its size, checksum and, where both are
/// known, SHA-256. An object of other content under the key (the key emptied and reused,
/// even by colliding MD5) is another file's, not this file's copy. A macro so the queries
/// stay literals (`concat!`).
macro_rules! still_its_copy {
    () => {
        "o.size = f.size AND (f.checksum IS NULL OR f.checksum = o.checksum) \
         AND (f.content_sha256 IS NULL OR o.content_sha256 IS NULL \
         OR f.content_sha256 = o.content_sha256)"
    };
}

/// An object recorded as a copy of a file, with what the copy's record says of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlierCopy {
    /// The object.
    pub object: StoredObject,
    /// The Pluto id recorded with the copy, if one came yet.
    pub imported_id: Option<String>,
}

/// What an S3 store reported for a verified object (all None for a local store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreFacts {
    /// ETag.
    pub etag: Option<String>,
    /// Version id (versioned buckets).
    pub version: Option<String>,
    /// The store's `ChecksumSHA256` (`<base64>` or `<base64>-<parts>`).
    pub checksum: Option<String>,
}

/// A multipart upload under way, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// Object key.
    pub object_key: String,
    /// The store's upload id.
    pub upload_id: String,
    /// Source size when the upload started.
    pub source_size: u64,
    /// Source mtime when the upload started.
    pub source_mtime: String,
    /// Part size used.
    pub part_size: u64,
    /// The source path it was started for (its metadata names it); None: recorded by an
    /// earlier release.
    pub source_path: Option<String>,
    /// Whether it was created with SHA-256 checksums (its parts must match); None:
    /// recorded by an earlier release.
    pub checksums: Option<bool>,
}

/// One stored part of a recorded upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRecord {
    /// 1-based part number.
    pub number: u64,
    /// ETag the store returned for it.
    pub etag: String,
    /// SHA-256 of its bytes, base64 (as S3 writes ChecksumSHA256).
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// Now, RFC 3339 UTC with milliseconds (the format of every recorded time).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whose a database's records are, where not this service's for its store.
#[derive(Debug, PartialEq, Eq)]
pub enum ForeignOwner {
    /// Another tier's (online-nearline's database given to online-archive).
    Service(String),
    /// This tier's, for this other store (staging's database given to production).
    Store(String),
}

impl Records {
    /// Connects and migrates.
    pub async fn open(url: &str) -> Result<Self, db::DbError> {
        // Readers beside the writer: lookups of concurrent handlers need not queue.
        let pools = db::connect_split(url, &MIGRATOR, 4).await?;
        Ok(Self {
            pool: pools.read,
            group: GroupCommit::start(pools.write.clone(), url.starts_with("sqlite:")),
            write: pools.write,
            claim_lease: crate::tier::CLAIM_LEASE,
        })
    }

    /// These records with upload claims lasting `lease` unrenewed (renewed every quarter of
    /// it) instead of 20 s: a test that takes a claim over under a copy must not race its
    /// renewal.
    pub fn with_claim_lease(mut self, lease: std::time::Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// How long an upload claim lasts unrenewed.
    pub(crate) fn claim_lease(&self) -> std::time::Duration {
        self.claim_lease
    }

    /// Claims these records for `service` and its `store` if nothing has them yet (a
    /// release before migration 0008 named no store: this one is taken as theirs); whose
    /// they are where that is another service or another store (see migrations 0006 and
    /// 0008).
    pub async fn foreign_owner(
        &self,
        service: &str,
        store: &str,
    ) -> Result<Option<ForeignOwner>, db::sqlx::Error> {
        db::sqlx::query(
            "INSERT INTO records_owner (id, service, store) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(service)
        .bind(store)
        .execute(&self.write)
        .await?;
        db::sqlx::query(
            "UPDATE records_owner SET store = $2 WHERE id = 1 AND service = $1 AND store IS NULL",
        )
        .bind(service)
        .bind(store)
        .execute(&self.write)
        .await?;
        let (owner, owned): (String, Option<String>) =
            db::sqlx::query_as("SELECT service, store FROM records_owner WHERE id = 1")
                .fetch_one(&self.write)
                .await?;
        Ok(if owner != service {
            Some(ForeignOwner::Service(owner))
        } else {
            owned.filter(|o| o != store).map(ForeignOwner::Store)
        })
    }

    /// Whether the records' indexes hold keys of any length: SQLite's do; PostgreSQL's
    /// btree refuses an entry over 2,704 bytes (see `tier::MAX_RECORDED_BYTES`).
    pub fn indexes_any_length(&self) -> bool {
        self.write
            .connect_options()
            .database_url
            .scheme()
            .eq_ignore_ascii_case("sqlite")
    }

    /// Closes the database (tests: before dropping a PostgreSQL database).
    pub async fn close(&self) {
        self.pool.close().await;
        self.write.close().await;
    }

    /// The pool for reads (tests and operators' queries; read-only on SQLite).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Objects already holding `original_path` at this size and mtime. An object of
    /// other content under the key (its size or checksum not the one this file was
    /// copied as) is another file's — the key was emptied and reused — not this file's
    /// copy. Each comes with the Pluto id recorded with the copy.
    pub async fn copies_of(
        &self,
        original_path: &str,
        size: u64,
        mtime: &str,
    ) -> Result<Vec<EarlierCopy>, db::sqlx::Error> {
        db::bounded(async {
            let rows = db::sqlx::query(concat!(
                "SELECT o.object_key, o.size, o.checksum, o.store_etag, o.store_version, \
                     o.store_checksum, o.content_sha256, f.imported_id FROM copied_files f \
                     JOIN stored_objects o ON o.object_key = f.object_key \
                     WHERE f.original_path = $1 AND f.size = $2 AND f.mtime = $3 AND ",
                still_its_copy!()
            ))
            .bind(original_path)
            .bind(size as i64)
            .bind(mtime)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(EarlierCopy {
                        object: stored_object(r)?,
                        imported_id: r.try_get("imported_id")?,
                    })
                })
                .collect()
        })
        .await
    }

    /// Objects recorded as copies of `original_path` at this size (any size: `None`),
    /// each with the modification time the file had when it was copied: what a file no
    /// longer there was copied as, or its later versions.
    pub async fn copies_at(
        &self,
        original_path: &str,
        size: Option<u64>,
    ) -> Result<Vec<(StoredObject, String)>, db::sqlx::Error> {
        macro_rules! copies_of_path {
            ($size:literal) => {
                concat!(
                    "SELECT o.object_key, o.size, o.checksum, o.store_etag, o.store_version, \
                         o.store_checksum, o.content_sha256, f.mtime FROM copied_files f \
                         JOIN stored_objects o ON o.object_key = f.object_key \
                         WHERE f.original_path = $1 AND ",
                    $size,
                    still_its_copy!()
                )
            };
        }
        db::bounded(async {
            let rows = match size {
                Some(size) => db::sqlx::query(copies_of_path!("f.size = $2 AND "))
                    .bind(original_path)
                    .bind(size as i64),
                None => db::sqlx::query(copies_of_path!("")).bind(original_path),
            }
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| Ok((stored_object(r)?, r.try_get::<String, _>("mtime")?)))
                .collect()
        })
        .await
    }

    /// The object recorded at `key`, if any: what a copy verified was stored there.
    pub async fn object_at(&self, key: &str) -> Result<Option<StoredObject>, db::sqlx::Error> {
        db::bounded(async {
            let row = db::sqlx::query(
                "SELECT object_key, size, checksum, store_etag, store_version, store_checksum, \
                 content_sha256 FROM stored_objects WHERE object_key = $1",
            )
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(stored_object).transpose()
        })
        .await
    }

    /// Objects with this content: first those recorded as copies of `path` (a redelivered
    /// file is reported under its own object, not under whichever of another file's the
    /// database gave first), then by key, so every answer is the same.
    pub async fn objects_with(
        &self,
        checksum: &str,
        size: u64,
        path: &str,
    ) -> Result<Vec<StoredObject>, db::sqlx::Error> {
        db::bounded(async {
            let rows = db::sqlx::query(
                "SELECT o.object_key, o.size, o.checksum, o.store_etag, o.store_version, \
                 o.store_checksum, o.content_sha256 FROM stored_objects o \
                 WHERE o.checksum = $1 AND o.size = $2 \
                 ORDER BY CASE WHEN EXISTS (SELECT 1 FROM copied_files f \
                 WHERE f.original_path = $3 AND f.object_key = o.object_key) THEN 0 ELSE 1 END, \
                 o.object_key",
            )
            .bind(checksum)
            .bind(size as i64)
            .bind(path)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(stored_object).collect()
        })
        .await
    }

    /// Records the SHA-256 of `key`'s content, read back from the store, where the row
    /// still names that content (`checksum`, `size`) and holds none (a copy recorded
    /// meanwhile knows its own): the next look at the object then needs no download.
    pub async fn set_content_sha256(
        &self,
        key: &str,
        size: u64,
        checksum: &str,
        sha256: &str,
    ) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            db::sqlx::query(
                "UPDATE stored_objects SET content_sha256 = $1 \
                 WHERE object_key = $2 AND size = $3 AND checksum = $4 \
                 AND content_sha256 IS NULL",
            )
            .bind(sha256)
            .bind(key)
            .bind(size as i64)
            .bind(checksum)
            .execute(&self.write)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Replaces what the store says of the object at `key` (of `size` and `checksum` as
    /// recorded) with `facts`: read back whole and found unchanged after the store's facts
    /// of it changed, its next look is settled by one HEAD again.
    pub async fn set_store_facts(
        &self,
        key: &str,
        size: u64,
        checksum: &str,
        facts: &StoreFacts,
    ) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            db::sqlx::query(
                "UPDATE stored_objects SET store_etag = $1, store_version = $2, \
                 store_checksum = $3 WHERE object_key = $4 AND size = $5 AND checksum = $6",
            )
            .bind(&facts.etag)
            .bind(&facts.version)
            .bind(&facts.checksum)
            .bind(key)
            .bind(size as i64)
            .bind(checksum)
            .execute(&self.write)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Records a verified object and the file it holds (in a group commit: durable
    /// when this returns).
    pub async fn record_copy(
        &self,
        object: &StoredObject,
        algorithm: &str,
        original_path: &str,
        mtime: &str,
        imported_id: Option<&str>,
    ) -> Result<(), db::sqlx::Error> {
        self.record_copy_releasing(object, algorithm, original_path, mtime, imported_id, None)
            .await
    }

    /// [`Records::record_copy`], giving up the claim `(key, owner)` in the same
    /// transaction (one commit per file instead of two).
    pub async fn record_copy_releasing(
        &self,
        object: &StoredObject,
        algorithm: &str,
        original_path: &str,
        mtime: &str,
        imported_id: Option<&str>,
        release: Option<(&str, &str)>,
    ) -> Result<(), db::sqlx::Error> {
        self.group
            .run(Write::Copy(Box::new(CopyRow {
                object: object.clone(),
                algorithm: algorithm.to_string(),
                original_path: original_path.to_string(),
                mtime: mtime.to_string(),
                imported_id: imported_id.map(str::to_string),
                release: release.map(|(k, o)| (k.to_string(), o.to_string())),
            })))
            .await
            .map(|_| ())
    }

    /// The Pluto id recorded with the copy of `original_path` at `object_key`, if one came:
    /// a resent message without one (the sweeper's `file.new` after its `file.update`)
    /// reports the copy's id, not none.
    pub async fn recorded_imported_id(
        &self,
        original_path: &str,
        object_key: &str,
    ) -> Result<Option<String>, db::sqlx::Error> {
        db::bounded(async {
            db::sqlx::query_scalar::<_, Option<String>>(
                "SELECT imported_id FROM copied_files WHERE original_path = $1 AND object_key = $2",
            )
            .bind(original_path)
            .bind(object_key)
            .fetch_optional(&self.pool)
            .await
            .map(Option::flatten)
        })
        .await
    }

    /// Forgets the record of the object at `object_key` as it was recorded (`size`,
    /// `checksum`): the key was found holding other content. A record of it made since
    /// (other facts) stays; the copies recorded of it no longer name it.
    pub async fn forget_object(
        &self,
        object_key: &str,
        size: u64,
        checksum: &str,
    ) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            db::sqlx::query(
                "DELETE FROM stored_objects WHERE object_key = $1 AND size = $2 AND checksum = $3",
            )
            .bind(object_key)
            .bind(size as i64)
            .bind(checksum)
            .execute(&self.write)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Records an ignored file (idempotent).
    pub async fn record_ignored(
        &self,
        original_path: &str,
        imported_id: Option<&str>,
    ) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            db::sqlx::query(
                "INSERT INTO ignored_files (original_path, imported_id, recorded_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (original_path) DO UPDATE SET \
                 imported_id = COALESCE(excluded.imported_id, ignored_files.imported_id), \
                 recorded_at = excluded.recorded_at",
            )
            // Uncut, a long path made PostgreSQL refuse the record: the file dead-lettered.
            .bind(stored_text(original_path))
            .bind(imported_id.map(stored_text))
            .bind(now())
            .execute(&self.write)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Records one failed attempt.
    pub async fn record_failure(
        &self,
        original_path: &str,
        error: &str,
        permanent: bool,
        attempt: u32,
    ) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            db::sqlx::query(
                "INSERT INTO failures (id, original_path, error, permanent, attempt, failed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(uuid_v4())
            // Uncut, a 10 MiB path was stored twice per attempt (path and error).
            .bind(stored_text(original_path))
            .bind(stored_text(error))
            .bind(i64::from(permanent))
            .bind(i64::from(attempt))
            .bind(now())
            .execute(&self.write)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Deletes the failure records older than `age`; returns how many. A few thousand at
    /// a time, each its own statement, so a year of them never holds the write lock (on
    /// SQLite, every other write of the service) for long.
    pub async fn prune_failures(&self, age: std::time::Duration) -> Result<u64, db::sqlx::Error> {
        // An age before any date there is keeps everything.
        let Some(before) = chrono::Duration::from_std(age)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        else {
            return Ok(0);
        };
        let before = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        db::delete_in_batches(&self.write, "failures", "id", "failed_at", &before).await
    }

    /// Forgets upload claims expired for an hour or more (their holder was killed, lost its
    /// lease, or its release got no answer): free to take already, they were never
    /// deleted, a row per such key for good. How many.
    pub async fn prune_expired_claims(&self) -> Result<u64, db::sqlx::Error> {
        db::bounded(async {
            let mut conn = self.write.acquire().await?;
            let clock = database_clock(conn.backend_name());
            let expired = format!("expires_at < {clock} - {EXPIRED_CLAIMS_KEPT_MS}");
            // PostgreSQL: in key order, as every claim batch locks them, and passing those a
            // batch holds — a key claimed again meanwhile is no longer abandoned, and
            // locking in another order could deadlock with that batch.
            let sql = match conn.backend_name().eq_ignore_ascii_case("sqlite") {
                true => format!("DELETE FROM upload_claims WHERE {expired}"),
                false => format!(
                    "DELETE FROM upload_claims WHERE object_key IN (SELECT object_key FROM \
                     upload_claims WHERE {expired} ORDER BY object_key FOR UPDATE SKIP LOCKED) \
                     AND {expired}"
                ),
            };
            Ok(db::sqlx::query(&sql)
                .execute(&mut *conn)
                .await?
                .rows_affected())
        })
        .await
    }

    /// Takes (or renews) the upload claim on `key` for `owner` until `lease` from now
    /// by the database's clock; false when another owner holds an unexpired claim.
    pub async fn claim(
        &self,
        key: &str,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<bool, db::sqlx::Error> {
        self.group
            .run(Write::Claim {
                key: key.to_string(),
                owner: owner.to_string(),
                lease_ms: lease_ms(lease),
            })
            .await
    }

    /// Extends `owner`'s claim on `key` to `lease` from now; false when it is no longer
    /// theirs (expired and taken, or released: a renewal never brings a claim back).
    pub async fn renew(
        &self,
        key: &str,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<bool, db::sqlx::Error> {
        self.group
            .run(Write::Renew {
                key: key.to_string(),
                owner: owner.to_string(),
                lease_ms: lease_ms(lease),
            })
            .await
    }

    /// Gives up `owner`'s claim on `key` (nothing if it expired and was taken since).
    pub async fn release(&self, key: &str, owner: &str) -> Result<(), db::sqlx::Error> {
        self.group
            .run(Write::Release {
                key: key.to_string(),
                owner: owner.to_string(),
            })
            .await
            .map(|_| ())
    }

    /// The multipart upload recorded for `key`, if any.
    pub async fn upload_for(&self, key: &str) -> Result<Option<UploadRecord>, db::sqlx::Error> {
        db::bounded(async {
            let row = db::sqlx::query(
                "SELECT object_key, upload_id, source_size, source_mtime, part_size, \
                 source_path, checksums FROM multipart_uploads WHERE object_key = $1",
            )
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(upload_record).transpose()
        })
        .await
    }

    /// Records a multipart upload just created for `record.object_key` (replacing any
    /// earlier record of that key, whose upload the caller has dealt with).
    pub async fn start_upload(&self, record: &UploadRecord) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            // Stamped, like every age the sweep of abandoned uploads compares, by the
            // database's clock: a sweeping replica whose clock ran ahead of the uploading
            // one's aborted uploads waiting in a retry tier.
            let mut conn = self.write.acquire().await?;
            let clock = database_clock(conn.backend_name());
            db::sqlx::query(&format!(
                "INSERT INTO multipart_uploads (object_key, upload_id, source_size, source_mtime, \
                 part_size, started_at, touched_at, source_path, checksums) VALUES ($1, $2, \
                 $3, $4, $5, {clock}, {clock}, $6, $7) \
                 ON CONFLICT (object_key) DO UPDATE SET upload_id = excluded.upload_id, \
                 source_size = excluded.source_size, source_mtime = excluded.source_mtime, \
                 part_size = excluded.part_size, started_at = excluded.started_at, \
                 touched_at = excluded.touched_at, source_path = excluded.source_path, \
                 checksums = excluded.checksums"
            ))
            .bind(&record.object_key)
            .bind(&record.upload_id)
            .bind(record.source_size as i64)
            .bind(&record.source_mtime)
            .bind(record.part_size as i64)
            .bind(&record.source_path)
            .bind(record.checksums.map(i64::from))
            .execute(&mut *conn)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Records a stored part and marks its upload as alive.
    pub async fn record_part(
        &self,
        upload_id: &str,
        part: &PartRecord,
    ) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            let mut tx = db::begin_write(&self.write).await?;
            db::sqlx::query(
                "INSERT INTO multipart_parts (upload_id, part_number, etag, sha256, size) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (upload_id, part_number) DO UPDATE \
                 SET etag = excluded.etag, sha256 = excluded.sha256, size = excluded.size",
            )
            .bind(upload_id)
            .bind(part.number as i64)
            .bind(&part.etag)
            .bind(&part.sha256)
            .bind(part.size as i64)
            .execute(&mut *tx)
            .await?;
            let clock = database_clock(tx.backend_name());
            db::sqlx::query(&format!(
                "UPDATE multipart_uploads SET touched_at = {clock} WHERE upload_id = $1"
            ))
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await
    }

    /// The parts recorded for an upload.
    pub async fn parts_of(&self, upload_id: &str) -> Result<Vec<PartRecord>, db::sqlx::Error> {
        db::bounded(async {
            let rows = db::sqlx::query(
                "SELECT part_number, etag, sha256, size FROM multipart_parts WHERE upload_id = $1 \
                 ORDER BY part_number",
            )
            .bind(upload_id)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(PartRecord {
                        number: r.try_get::<i64, _>("part_number")?.max(0) as u64,
                        etag: r.try_get("etag")?,
                        sha256: r.try_get("sha256")?,
                        size: r.try_get::<i64, _>("size")?.max(0) as u64,
                    })
                })
                .collect()
        })
        .await
    }

    /// Forgets a completed or aborted upload and its parts.
    pub async fn forget_upload(&self, key: &str, upload_id: &str) -> Result<(), db::sqlx::Error> {
        db::bounded(async {
            let mut tx = db::begin_write(&self.write).await?;
            db::sqlx::query("DELETE FROM multipart_parts WHERE upload_id = $1")
                .bind(upload_id)
                .execute(&mut *tx)
                .await?;
            db::sqlx::query(
                "DELETE FROM multipart_uploads WHERE object_key = $1 AND upload_id = $2",
            )
            .bind(key)
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await
    }

    /// Uploads no part was stored for since `older_than` ago.
    pub async fn uploads_untouched_for(
        &self,
        older_than: std::time::Duration,
    ) -> Result<Vec<UploadRecord>, db::sqlx::Error> {
        db::bounded(async {
            // Capped so that the clock minus it cannot overflow (a century, in effect never).
            let age = i64::try_from(older_than.as_millis())
                .map_or(i64::MAX / 2, |ms| ms.min(i64::MAX / 2));
            let mut conn = self.pool.acquire().await?;
            let clock = database_clock(conn.backend_name());
            let rows = db::sqlx::query(&format!(
                "SELECT object_key, upload_id, source_size, source_mtime, part_size, \
                 source_path, checksums FROM multipart_uploads WHERE touched_at <= {clock} - $1 \
                 ORDER BY touched_at, object_key"
            ))
            .bind(age)
            .fetch_all(&mut *conn)
            .await?;
            rows.iter().map(upload_record).collect()
        })
        .await
    }

    /// Whether the upload `upload_id` at `key` is still recorded with no part stored for
    /// `older_than` (a sweep's list is minutes old by its last entries: a copy may have
    /// resumed the upload since).
    pub async fn still_untouched(
        &self,
        key: &str,
        upload_id: &str,
        older_than: std::time::Duration,
    ) -> Result<bool, db::sqlx::Error> {
        db::bounded(async {
            let age = i64::try_from(older_than.as_millis())
                .map_or(i64::MAX / 2, |ms| ms.min(i64::MAX / 2));
            let mut conn = self.pool.acquire().await?;
            let clock = database_clock(conn.backend_name());
            let row = db::sqlx::query(&format!(
                "SELECT upload_id FROM multipart_uploads WHERE object_key = $1 AND upload_id = $2 \
                 AND touched_at <= {clock} - $3"
            ))
            .bind(key)
            .bind(upload_id)
            .bind(age)
            .fetch_optional(&mut *conn)
            .await?;
            Ok(row.is_some())
        })
        .await
    }

    /// Counts rows of a table (tests and diagnostics); `table` must be one of ours.
    pub async fn count(&self, table: &str) -> Result<i64, db::sqlx::Error> {
        let t = match table {
            "stored_objects" | "copied_files" | "ignored_files" | "failures"
            | "multipart_uploads" | "multipart_parts" => table,
            _ => return Err(db::sqlx::Error::Protocol(format!("unknown table {table}"))),
        };
        let row = db::sqlx::query(&format!("SELECT COUNT(*) AS n FROM {t}"))
            .fetch_one(&self.pool)
            .await?;
        row.try_get::<i64, _>("n")
    }
}

fn stored_object(r: &db::sqlx::any::AnyRow) -> Result<StoredObject, db::sqlx::Error> {
    Ok(StoredObject {
        object_key: r.try_get("object_key")?,
        size: r.try_get::<i64, _>("size")?.max(0) as u64,
        checksum: r.try_get("checksum")?,
        content_sha256: r.try_get("content_sha256")?,
        store: StoreFacts {
            etag: r.try_get("store_etag")?,
            version: r.try_get("store_version")?,
            checksum: r.try_get("store_checksum")?,
        },
    })
}

fn upload_record(r: &db::sqlx::any::AnyRow) -> Result<UploadRecord, db::sqlx::Error> {
    Ok(UploadRecord {
        object_key: r.try_get("object_key")?,
        upload_id: r.try_get("upload_id")?,
        source_size: r.try_get::<i64, _>("source_size")?.max(0) as u64,
        source_mtime: r.try_get("source_mtime")?,
        part_size: r.try_get::<i64, _>("part_size")?.max(0) as u64,
        source_path: r.try_get("source_path")?,
        checksums: r.try_get::<Option<i64>, _>("checksums")?.map(|c| c != 0),
    })
}

fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {

    /// A database error with a given SQLSTATE (or SQLite code), as a driver reports it.
    fn coded(code: &str) -> db::sqlx::Error {
        db::sqlx::Error::Database(Box::new(BatchFailure {
            code: Some(code.to_owned()),
            message: format!("error {code}"),
        }))
    }

    /// A failure's path and error, and an ignored file's path, are stored cut, as
    /// `x-error` is: the path is a producer's text of any length.
    #[tokio::test]
    async fn failures_and_ignored_files_are_recorded_cut_to_size() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.expect("records");
        let long = "é".repeat(1 << 20);
        r.record_failure(&long, &format!("cannot read {long}"), true, 1)
            .await
            .expect("recorded");
        let (path, error): (String, String) =
            db::sqlx::query_as("SELECT original_path, error FROM failures")
                .fetch_one(r.pool())
                .await
                .expect("row");
        assert!(
            path.len() <= 1024 && path.starts_with("éé"),
            "{}",
            path.len()
        );
        assert!(error.len() <= 1024 && error.starts_with("cannot read é"));
        r.record_ignored(&long, Some(&long))
            .await
            .expect("recorded");
        let (path, id): (String, String) =
            db::sqlx::query_as("SELECT original_path, imported_id FROM ignored_files")
                .fetch_one(r.pool())
                .await
                .expect("row");
        assert!(path.len() <= 1024 && id.len() <= 1024);
    }

    /// Two objects of one content (a copy stored beside a damaged one, or content stored
    /// before reuse): a file's own comes first, whichever was stored first, so a redelivered
    /// file is reported under the same key every time.
    #[tokio::test]
    async fn a_files_own_object_of_its_content_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.expect("records");
        let obj = |key: &str| StoredObject {
            object_key: key.into(),
            size: 4,
            checksum: "same".into(),
            content_sha256: None,
            store: StoreFacts::default(),
        };
        let t = "2026-01-01T00:00:00Z";
        for (key, path) in [("k-a", "/p/a"), ("k-b", "/p/b")] {
            r.record_copy(&obj(key), "md5", path, t, None)
                .await
                .unwrap();
        }
        for (path, first) in [("/p/b", "k-b"), ("/p/a", "k-a"), ("/p/c", "k-a")] {
            let found = r.objects_with("same", 4, path).await.unwrap();
            assert_eq!(found.len(), 2);
            assert_eq!(found[0].object_key, first, "{path}");
        }
        r.close().await;
    }

    /// A file recorded again by a message without its asset's id (a replayed or retried
    /// `file.new` from before the asset was imported, handled after a `file.update` that
    /// named it) keeps the id recorded; a message naming one records it.
    #[tokio::test]
    async fn a_message_without_an_imported_id_keeps_the_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.expect("records");
        let obj = StoredObject {
            object_key: "k".into(),
            size: 4,
            checksum: "c".into(),
            content_sha256: None,
            store: StoreFacts::default(),
        };
        let id = async || -> (Option<String>, Option<String>) {
            let copied = db::sqlx::query_scalar("SELECT imported_id FROM copied_files")
                .fetch_one(r.pool())
                .await
                .expect("copied row");
            let ignored = db::sqlx::query_scalar("SELECT imported_id FROM ignored_files")
                .fetch_one(r.pool())
                .await
                .expect("ignored row");
            (copied, ignored)
        };
        let t = "2026-01-01T00:00:00Z";
        r.record_copy(&obj, "sha256", "/p", t, Some("VX-1"))
            .await
            .unwrap();
        r.record_ignored("/q", Some("VX-2")).await.unwrap();
        r.record_copy(&obj, "sha256", "/p", t, None).await.unwrap();
        r.record_ignored("/q", None).await.unwrap();
        assert_eq!(id().await, (Some("VX-1".into()), Some("VX-2".into())));
        r.record_copy(&obj, "sha256", "/p", t, Some("VX-3"))
            .await
            .unwrap();
        r.record_ignored("/q", Some("VX-4")).await.unwrap();
        assert_eq!(id().await, (Some("VX-3".into()), Some("VX-4".into())));
    }

    /// A failed batch is taken apart write by write only where one write may be the
    /// cause; a database out of reach fails every write of it at once.
    #[test]
    fn only_a_write_level_failure_splits_a_batch() {
        use db::sqlx::Error;
        for (code, one) in [
            ("23505", true),
            ("55P03", true),
            ("40P01", true),
            ("22003", true),
            ("19", true),
            ("531", true),
            ("2067", true),
            ("5", false),
            ("517", false),
            ("6", false),
            ("5386", false),
            ("13", false),
            ("08006", false),
            ("57P01", false),
            ("53300", false),
            ("25006", false),
            ("8", false),
        ] {
            assert_eq!(about_one_write(&coded(code)), one, "{code}");
        }
        assert!(!about_one_write(&Error::PoolTimedOut));
        assert!(!about_one_write(&Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
    }

    /// A failure shared by every write of a failed batch keeps its kind: an outage stays
    /// one (waited out), the database's own error (SQLite's CORRUPT, PostgreSQL's 25P02)
    /// stays counted as it is for a batch of one — once every write got an I/O error,
    /// waited out for ever where alone it was retried and dead-lettered.
    #[test]
    fn a_batch_failure_is_shared_as_what_it_is() {
        use db::sqlx::Error;
        for e in [
            coded("11"),
            coded("7"),
            coded("25P02"),
            coded("57P04"),
            coded("5"),
            coded("13"),
            coded("08006"),
            coded("53300"),
            coded("25006"),
            Error::PoolTimedOut,
            Error::PoolClosed,
            Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            Error::Protocol("unexpected".into()),
            Error::ColumnNotFound("x".into()),
        ] {
            let shared = each_writes_share(&e);
            assert_eq!(db::is_outage(&shared), db::is_outage(&e), "{e}");
            assert_eq!(about_one_write(&shared), about_one_write(&e), "{e}");
            assert!(
                shared.to_string().contains(&match &e {
                    Error::Database(d) => d.message().to_owned(),
                    Error::Io(io) => io.to_string(),
                    other => other.to_string(),
                }),
                "{e} → {shared}"
            );
        }
        // Counted where it is the database's own.
        assert!(!db::is_outage(&each_writes_share(&coded("11"))));
        assert!(!db::is_outage(&each_writes_share(&coded("25P02"))));
        assert!(db::is_outage(&each_writes_share(&coded("08006"))));
    }

    /// A batch of claims alone runs at `synchronous = NORMAL`; given up at its time limit
    /// midway (a stalled disk, a lock held), its connection must not go back to the pool
    /// at NORMAL: a write made on it outside the group commit (an ignored file's record)
    /// would then skip the WAL fsync, and a power loss lose the record of an acked message.
    #[tokio::test]
    async fn a_claim_batch_given_up_midway_leaves_no_connection_unsynced() {
        use db::sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.expect("records");
        let mut locker = db::sqlx::AnyConnection::connect(&url).await.unwrap();
        db::sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut locker)
            .await
            .unwrap();
        let claim = Write::Claim {
            key: "k".into(),
            owner: "o".into(),
            lease_ms: 20_000,
        };
        let mut full = true;
        RELAXED_HERE.with(|r| r.set(false));
        let mut batch = Box::pin(apply(&r.write, true, &mut full, [&claim].into_iter()));
        // Given up once it relaxed its connection and waits for the lock (at a set time
        // it could be given up before, on a slow machine, and show nothing).
        framework::testing::within(framework::testing::WAIT, "the batch relaxed", async {
            while !RELAXED_HERE.with(|r| r.get()) {
                tokio::select! {
                    r = &mut batch => panic!("waits for the lock: {r:?}"),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                }
            }
        })
        .await;
        drop(batch);
        db::sqlx::query("ROLLBACK")
            .execute(&mut locker)
            .await
            .unwrap();
        let synchronous: i64 = db::sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&r.write)
            .await
            .unwrap();
        assert_eq!(synchronous, 2, "FULL");
        r.close().await;
    }

    #[tokio::test]
    async fn records_belong_to_the_first_service_that_opens_them() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.expect("records");
        let (a, b) = ("file:///srv/a", "s3://b/p");
        assert_eq!(r.foreign_owner("online-archive", a).await.unwrap(), None);
        assert_eq!(r.foreign_owner("online-archive", a).await.unwrap(), None);
        assert_eq!(
            r.foreign_owner("online-nearline", a).await.unwrap(),
            Some(ForeignOwner::Service("online-archive".into()))
        );
        assert_eq!(
            r.foreign_owner("online-archive", b).await.unwrap(),
            Some(ForeignOwner::Store(a.into()))
        );
        // Records of a release that named no store are this one's, from now on.
        db::sqlx::query("UPDATE records_owner SET store = NULL")
            .execute(&r.write)
            .await
            .unwrap();
        assert_eq!(r.foreign_owner("online-archive", b).await.unwrap(), None);
        assert_eq!(
            r.foreign_owner("online-archive", a).await.unwrap(),
            Some(ForeignOwner::Store(b.into()))
        );
        r.close().await;
    }

    #[tokio::test]
    async fn an_older_release_starts_on_a_schema_a_newer_one_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        Records::open(&url).await.expect("migrated by this release");
        let older = db::Migrator {
            migrations: std::borrow::Cow::Owned(
                MIGRATOR.migrations[..MIGRATOR.migrations.len() - 1].to_vec(),
            ),
            ignore_missing: false,
            locking: true,
            no_tx: false,
        };
        db::connect(&url, &older)
            .await
            .expect("the release before starts on it");
    }

    use super::*;

    #[test]
    fn the_last_row_of_a_key_is_kept_in_key_order() {
        let rows = ["c1", "b1", "a1", "c2", "b2"];
        let refs: Vec<&&str> = rows.iter().collect();
        let kept = last_per_key(&refs, |r| &r[..1]);
        assert_eq!(
            kept.into_iter().copied().collect::<Vec<_>>(),
            ["a1", "b2", "c2"]
        );
    }

    #[test]
    fn chunks_are_powers_of_two_up_to_32_covering_everything() {
        for n in 0..100usize {
            let items: Vec<usize> = (0..n).collect();
            let chunks = power_of_two_chunks(&items);
            assert_eq!(chunks.concat(), items, "{n} items in order");
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= 32)
            );
        }
        assert_eq!(
            power_of_two_chunks(&[0; 37])
                .iter()
                .map(|c| c.len())
                .collect::<Vec<_>>(),
            [32, 4, 1]
        );
    }

    #[test]
    fn placeholders_are_numbered_row_after_row() {
        assert_eq!(
            multi_row_upsert(
                "INSERT INTO t (a, b) VALUES ",
                2,
                3,
                " ON CONFLICT DO NOTHING"
            ),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6) ON CONFLICT DO NOTHING"
        );
    }

    fn copy(key: &str, path: &str, checksum: &str) -> Write {
        Write::Copy(Box::new(CopyRow {
            object: StoredObject {
                object_key: key.into(),
                size: 4,
                checksum: checksum.into(),
                content_sha256: None,
                store: StoreFacts::default(),
            },
            algorithm: "sha256".into(),
            original_path: path.into(),
            mtime: "2026-01-01T00:00:00Z".into(),
            imported_id: None,
            release: None,
        }))
    }

    /// One batch holding two runs of copies around a claim (three statement shapes in the
    /// first run), with one key and one file thrice in one statement's rows.
    async fn a_batch_of_copies_lands_in_one_transaction(url: &str) {
        let r = Records::open(url).await.unwrap();
        let mut writes: Vec<Write> = (0..30)
            .map(|i| copy(&format!("k{i}"), &format!("/p/{i}"), "old"))
            .collect();
        writes.push(Write::Claim {
            key: "k-claimed".into(),
            owner: "me".into(),
            lease_ms: 60_000,
        });
        writes.push(copy("k3", "/p/3", "new"));
        writes.push(copy("k3", "/p/3", "newer"));
        writes.push(copy("k3", "/p/3-again", "newer"));
        writes.extend((30..34).map(|i| copy(&format!("k{i}"), &format!("/p/{i}"), "old")));
        let mut full = true;
        let results = apply(
            &r.write,
            url.starts_with("sqlite:"),
            &mut full,
            writes.iter(),
        )
        .await
        .expect("one transaction, no fallback to single writes");
        assert_eq!(results, vec![true; writes.len()]);
        let objects: i64 = db::sqlx::query_scalar("SELECT COUNT(*) FROM stored_objects")
            .fetch_one(r.pool())
            .await
            .unwrap();
        assert_eq!(objects, 34);
        let files: i64 = db::sqlx::query_scalar("SELECT COUNT(*) FROM copied_files")
            .fetch_one(r.pool())
            .await
            .unwrap();
        assert_eq!(files, 35);
        let k3 = r.objects_with("newer", 4, "/p/3").await.unwrap();
        assert_eq!(k3.len(), 1, "the later row of a key wins");
        assert_eq!(k3[0].object_key, "k3");
        let k20 = r
            .copies_of("/p/20", 4, "2026-01-01T00:00:00Z")
            .await
            .unwrap();
        assert_eq!(k20[0].object.object_key, "k20");
        assert_eq!(k20[0].object.checksum, "old");
        r.close().await;
    }

    #[tokio::test]
    async fn a_batch_of_copies_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        a_batch_of_copies_lands_in_one_transaction(&url).await;
    }

    /// A batch of claims alone commits without the WAL fsync, but leaves the writer at
    /// `synchronous = FULL` for every other write made on it (they were committed without
    /// fsync after such a batch).
    #[tokio::test]
    async fn claims_leave_the_writer_fully_synchronous() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.unwrap();
        assert!(
            r.claim("k", "me", std::time::Duration::from_secs(20))
                .await
                .unwrap()
        );
        let mode: i64 = db::sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&r.write)
            .await
            .unwrap();
        assert_eq!(mode, 2, "FULL");
        r.close().await;
    }

    /// Leases are counted by the database's clock on both databases (a replica's clock
    /// ahead of another's must not expire that one's live claim), and a claim expired by
    /// it is taken over and can no longer be renewed by its old owner.
    async fn leases_run_on_the_database_clock(url: &str, backend: &str) {
        let r = Records::open(url).await.unwrap();
        let lease = std::time::Duration::from_secs(20);
        assert!(r.claim("k", "a", lease).await.unwrap());
        let clock = database_clock(backend);
        let left: i64 = db::sqlx::query_scalar(&format!(
            "SELECT expires_at - {clock} FROM upload_claims WHERE object_key = 'k'"
        ))
        .fetch_one(&r.write)
        .await
        .unwrap();
        assert!((10_000..=20_000).contains(&left), "{left} ms left");
        assert!(!r.claim("k", "b", lease).await.unwrap(), "held");
        db::sqlx::query(&format!(
            "UPDATE upload_claims SET expires_at = {clock} - 1000"
        ))
        .execute(&r.write)
        .await
        .unwrap();
        assert!(r.claim("k", "b", lease).await.unwrap(), "expired: taken");
        assert!(!r.renew("k", "a", lease).await.unwrap(), "no longer a's");
        assert!(r.renew("k", "b", lease).await.unwrap());
        // Claims left behind (their holders killed) are forgotten an hour after they
        // expired; a live one, and one expired a moment ago, are kept.
        assert!(r.claim("gone", "c", lease).await.unwrap());
        assert!(r.claim("recent", "c", lease).await.unwrap());
        for (key, ago) in [("gone", 3_700_000), ("recent", 60_000)] {
            db::sqlx::query(&format!(
                "UPDATE upload_claims SET expires_at = {clock} - {ago} WHERE object_key = '{key}'"
            ))
            .execute(&r.write)
            .await
            .unwrap();
        }
        assert_eq!(r.prune_expired_claims().await.unwrap(), 1);
        let left: Vec<String> =
            db::sqlx::query_scalar("SELECT object_key FROM upload_claims ORDER BY object_key")
                .fetch_all(&r.write)
                .await
                .unwrap();
        assert_eq!(left, ["k", "recent"]);
        r.close().await;
    }

    /// A batch is applied in key order (every replica takes its locks in one order) and
    /// answered in its own: each write gets its own result, and one key's writes keep
    /// their order (the first claim of a key wins).
    #[tokio::test]
    async fn a_batch_is_applied_in_key_order_and_answered_in_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.unwrap();
        let claim = |key: &str, owner: &str| Write::Claim {
            key: key.into(),
            owner: owner.into(),
            lease_ms: 60_000,
        };
        let writes = [
            claim("k2", "a"),
            copy("k3", "/p/3", "c"),
            claim("k1", "b"),
            claim("k2", "c"),
        ];
        let mut full = true;
        let results = apply(&r.write, true, &mut full, writes.iter())
            .await
            .expect("applied");
        assert_eq!(results, [true, true, true, false]);
        r.close().await;
    }

    #[tokio::test]
    async fn leases_run_on_the_sqlite_clock() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        leases_run_on_the_database_clock(&url, "SQLite").await;
    }

    #[tokio::test]
    async fn leases_run_on_the_postgres_clock() {
        let pg = db::testing::TempPostgres::create().await.unwrap();
        leases_run_on_the_database_clock(&pg.url, "PostgreSQL").await;
    }

    /// A file's copy whose key now holds another file's object (the object was lost and
    /// the key taken again) is no copy of it: a redelivery copies it again instead of
    /// reporting the other file's size and checksum as its own.
    #[tokio::test]
    async fn a_key_reused_by_another_file_is_no_copy_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.unwrap();
        let mut other = copy("k", "/p1", "x");
        if let Write::Copy(c) = &mut other {
            c.object.size = 9;
        }
        let writes = [copy("k", "/p2", "c"), other];
        let mut full = true;
        apply(&r.write, true, &mut full, writes.iter())
            .await
            .expect("recorded");
        let mtime = "2026-01-01T00:00:00Z";
        assert!(r.copies_of("/p2", 4, mtime).await.unwrap().is_empty());
        assert_eq!(r.copies_of("/p1", 9, mtime).await.unwrap().len(), 1);
        r.close().await;
    }

    /// A nearline key whose object was lost and stored again for another file of the same
    /// size and MD5 (a collision) is no copy of the first file: with only the MD5 recorded
    /// for the first, a redelivery of its message once the file was gone was reported as
    /// copied, naming the other content's SHA-256.
    #[tokio::test]
    async fn a_key_stored_again_with_colliding_content_is_no_copy_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.unwrap();
        let with_sha = |path: &str, sha: &str| {
            let mut w = copy("k", path, "m");
            if let Write::Copy(c) = &mut w {
                c.algorithm = "md5".into();
                c.object.content_sha256 = Some(sha.into());
            }
            w
        };
        let mut full = true;
        apply(&r.write, true, &mut full, [with_sha("/a/x", "s1")].iter())
            .await
            .expect("recorded");
        assert_eq!(r.copies_at("/a/x", Some(4)).await.unwrap().len(), 1);
        apply(&r.write, true, &mut full, [with_sha("/b/x", "s2")].iter())
            .await
            .expect("recorded");
        assert!(r.copies_at("/a/x", Some(4)).await.unwrap().is_empty());
        let mtime = "2026-01-01T00:00:00Z";
        assert!(r.copies_of("/a/x", 4, mtime).await.unwrap().is_empty());
        assert_eq!(r.copies_at("/b/x", Some(4)).await.unwrap().len(), 1);
        r.close().await;
    }

    /// Two records of one file's copy in one batch (the sweeper's `file.new` without a
    /// Pluto id and its `file.update` with one, handled at once): the id is kept, as one
    /// upsert after the other keeps it, whichever came last.
    #[tokio::test]
    async fn a_batch_keeps_the_imported_id_an_earlier_row_brought() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let r = Records::open(&url).await.unwrap();
        let mut with_id = copy("k", "/p", "c");
        if let Write::Copy(c) = &mut with_id {
            c.imported_id = Some("VX-1".into());
        }
        let writes = [with_id, copy("k", "/p", "c")];
        let mut full = true;
        apply(&r.write, true, &mut full, writes.iter())
            .await
            .expect("recorded");
        let mtime = "2026-01-01T00:00:00Z";
        let found = r.copies_of("/p", 4, mtime).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].imported_id.as_deref(), Some("VX-1"));
        r.close().await;
    }

    /// Failure records older than the age kept are deleted, however many (in rounds of
    /// 5,000); younger ones stay.
    async fn old_failures_are_pruned(url: &str) {
        let r = Records::open(url).await.expect("records");
        let old = "2020-01-01T00:00:00.000Z";
        for chunk in 0..51 {
            let mut sql = String::from(
                "INSERT INTO failures (id, original_path, error, permanent, attempt, failed_at) VALUES ",
            );
            for i in 0..100 {
                let n = chunk * 100 + i;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("('old-{n}', '/p/{n}', 'e', 0, 1, '{old}')"));
            }
            db::sqlx::query(&sql)
                .execute(&r.write)
                .await
                .expect("old rows");
        }
        r.record_failure("/p/new", "just now", false, 1)
            .await
            .expect("recorded");
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(r.prune_failures(30 * day).await.expect("pruned"), 5100);
        assert_eq!(r.count("failures").await.unwrap(), 1, "the young one stays");
        assert_eq!(r.prune_failures(std::time::Duration::MAX).await.unwrap(), 0);
        assert_eq!(r.count("failures").await.unwrap(), 1);
        r.close().await;
    }

    #[tokio::test]
    async fn old_failures_are_pruned_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        old_failures_are_pruned(&format!("sqlite://{}", dir.path().join("r.db").display())).await;
    }

    /// A failure quoting a NUL (a message's path held one) is recorded, the NUL written
    /// `\0`: PostgreSQL refused the whole record.
    async fn a_failure_quoting_a_nul_is_recorded(url: &str) {
        let r = Records::open(url).await.expect("records");
        r.record_failure(
            "/a\0b",
            "field `parent_dir` contains a NUL: \"/a\0b\"",
            true,
            0,
        )
        .await
        .expect("recorded");
        let (path,): (String,) = db::sqlx::query_as("SELECT original_path FROM failures")
            .fetch_one(&r.write)
            .await
            .expect("row");
        assert_eq!(path, "/a\\0b");
        r.close().await;
    }

    #[tokio::test]
    async fn a_failure_quoting_a_nul_is_recorded_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        a_failure_quoting_a_nul_is_recorded(&format!(
            "sqlite://{}",
            dir.path().join("r.db").display()
        ))
        .await;
    }

    #[tokio::test]
    async fn a_failure_quoting_a_nul_is_recorded_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.unwrap();
        a_failure_quoting_a_nul_is_recorded(&pg.url).await;
        pg.drop_db().await.unwrap();
    }

    #[tokio::test]
    async fn old_failures_are_pruned_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.unwrap();
        old_failures_are_pruned(&pg.url).await;
        pg.drop_db().await.unwrap();
    }

    /// Multipart uploads are stamped and aged by the database's clock, on both backends.
    async fn uploads_are_aged_by_the_database_clock(url: &str) {
        let r = Records::open(url).await.expect("open");
        let upload = UploadRecord {
            object_key: "k".into(),
            upload_id: "u-1".into(),
            source_size: 10,
            source_mtime: "2026-01-01T00:00:00Z".into(),
            part_size: 5,
            source_path: Some("/online/a.mov".into()),
            checksums: Some(true),
        };
        r.start_upload(&upload).await.expect("start");
        let part = PartRecord {
            number: 1,
            etag: "e".into(),
            sha256: "s".into(),
            size: 5,
        };
        r.record_part("u-1", &part).await.expect("part");
        let hour = std::time::Duration::from_secs(3600);
        assert!(
            r.uploads_untouched_for(hour)
                .await
                .expect("aged")
                .is_empty()
        );
        assert_eq!(
            r.uploads_untouched_for(std::time::Duration::ZERO)
                .await
                .expect("aged")
                .len(),
            1
        );
        db::sqlx::query("UPDATE multipart_uploads SET touched_at = touched_at - 7200000")
            .execute(&r.write)
            .await
            .expect("two hours back");
        assert_eq!(r.uploads_untouched_for(hour).await.expect("aged").len(), 1);
        assert!(
            r.uploads_untouched_for(std::time::Duration::MAX)
                .await
                .expect("aged")
                .is_empty()
        );
        r.close().await;
    }

    #[tokio::test]
    async fn uploads_are_aged_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        uploads_are_aged_by_the_database_clock(&format!(
            "sqlite://{}",
            dir.path().join("r.db").display()
        ))
        .await;
    }

    #[tokio::test]
    async fn uploads_are_aged_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.unwrap();
        uploads_are_aged_by_the_database_clock(&pg.url).await;
        pg.drop_db().await.unwrap();
    }

    /// Two replicas' batches on PostgreSQL touching the same rows: A records copies of
    /// k1 (giving up its claim) and k2; B claims k1 and records a copy of k2 (nearline
    /// reusing an object, no claim). With a third session holding k2's object row, A
    /// waits for it first, then B; once it is let go, both commit — before, B held k1's
    /// claim row while waiting for k2 and A held k2 while waiting for k1's claim: a
    /// deadlock, one batch failed and was redone write by write.
    #[tokio::test]
    async fn two_batches_over_the_same_rows_never_deadlock_on_postgres() {
        use db::sqlx::Connection;
        use std::time::Duration;
        let obj = |key: &str| StoredObject {
            object_key: key.into(),
            size: 4,
            checksum: "c2".into(),
            content_sha256: None,
            store: StoreFacts::default(),
        };
        let pg = db::testing::TempPostgres::create().await.unwrap();
        let r = Records::open(&pg.url).await.unwrap();
        assert!(r.claim("k1", "A", Duration::from_secs(60)).await.unwrap());
        // Both rows exist, so the holder below can lock k2's.
        r.record_copy(&obj("k2"), "sha256", "/p/2", "m", None)
            .await
            .unwrap();
        let mut holder = db::sqlx::AnyConnection::connect(&pg.url).await.unwrap();
        db::sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        db::sqlx::query("SELECT 1 FROM stored_objects WHERE object_key = 'k2' FOR UPDATE")
            .execute(&mut holder)
            .await
            .unwrap();
        let waiting = async |n: i64| {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let blocked: i64 = db::sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(r.pool())
                .await
                .unwrap();
                if blocked >= n {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{n} batches waiting"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let mut a_copy = copy("k1", "/p/1", "c1");
        if let Write::Copy(c) = &mut a_copy {
            c.release = Some(("k1".into(), "A".into()));
        }
        let a_writes = [a_copy, copy("k2", "/p/2", "c2")];
        let b_writes = [
            Write::Claim {
                key: "k1".into(),
                owner: "B".into(),
                lease_ms: 60_000,
            },
            copy("k2", "/p/2b", "c2"),
        ];
        let pool = r.write.clone();
        let a = tokio::spawn({
            let pool = pool.clone();
            async move { apply(&pool, false, &mut true, a_writes.iter()).await }
        });
        waiting(1).await;
        let b = tokio::spawn({
            let pool = pool.clone();
            async move { apply(&pool, false, &mut true, b_writes.iter()).await }
        });
        waiting(2).await;
        db::sqlx::query("COMMIT")
            .execute(&mut holder)
            .await
            .unwrap();
        a.await.unwrap().expect("A's batch commits");
        b.await.unwrap().expect("B's batch commits");
        r.close().await;
        pg.drop_db().await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_of_copies_on_postgres() {
        let pg = db::testing::TempPostgres::create().await.unwrap();
        a_batch_of_copies_lands_in_one_transaction(&pg.url).await;
        pg.drop_db().await.unwrap();
    }
}
