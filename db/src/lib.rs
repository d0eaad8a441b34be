//! Database access shared by the services with state: one pool type for SQLite (the
//! embedded default, a file under `[storage] data_dir`) and PostgreSQL (production),
//! with migrations embedded in each service binary.
//!
//! Queries go through `sqlx::Any` and are checked at run time, so building never needs
//! a live database. SQL must therefore be portable between SQLite and PostgreSQL:
//! `TEXT`/`BIGINT` columns, `ON CONFLICT … DO UPDATE/NOTHING`, `RETURNING`, `$1` binds.

pub mod filesystem;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
pub use sqlx::migrate::Migrator;
pub use sqlx::{self, AnyPool, Row};

/// Database failures; all of them are transient from a message's point of view except
/// a bad URL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is not `sqlite:` or `postgres:`.
    #[error("unsupported database URL `{0}` (use sqlite://PATH or postgres://…)")]
    BadUrl(String),
    /// The SQLite file's directory could not be created.
    #[error("cannot create {0}: {1}")]
    Dir(String, std::io::Error),
    /// Connecting or querying failed: sqlx's own text, named as the database's where it
    /// does not say so itself ("pool timed out while waiting for an open connection").
    #[error("{}", sqlx_text(.0))]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed: {0}{hint}", hint = migrate_hint(.0))]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The PostgreSQL database stores text in an encoding that cannot hold every
    /// character a path or an error can carry.
    #[error(
        "the database is encoded in {0}, which cannot hold every character of a file name \
         or an error (a record with one it lacks would be refused and its message \
         dead-lettered): use a UTF8 database (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE \
         template0)"
    )]
    Encoding(String),
    /// The PostgreSQL database takes no writes: a standby (a read replica) or one set to
    /// `default_transaction_read_only`.
    #[error(
        "the database takes no writes ({0}): point database_url at the primary, or wait \
         for a failover to end"
    )]
    ReadOnly(&'static str),
}

/// sqlx's text of `e`, prefixed `database: ` unless it names the database already ("error
/// returned from database: …"): never the nested "database error: error returned from
/// database", never a pool's timeout that does not say whose pool.
fn sqlx_text(e: &sqlx::Error) -> String {
    let text = e.to_string();
    if matches!(e, sqlx::Error::PoolTimedOut) {
        // sqlx keeps the server's answer to itself: name what it most often is, as
        // "too many clients" from a server whose connections the other services' pools
        // (10 per replica) hold otherwise never appears in this service's log.
        format!(
            "database: {text} (none within {} s: the server down or slow, or refusing new \
             connections — PostgreSQL's \"too many clients\" when every connection it \
             allows is taken; each replica of a service holds up to 10: see docs/scaling.md)",
            ACQUIRE_TIMEOUT.as_secs()
        )
    } else if text.contains("database") {
        text
    } else {
        format!("database: {text}")
    }
}

/// What a migration error most likely means where sqlx's own words do not say: a
/// database holding one of this service's migration versions with other content belongs
/// to another service (their versions overlap), or its migration file was edited.
fn migrate_hint(e: &sqlx::migrate::MigrateError) -> &'static str {
    match e {
        sqlx::migrate::MigrateError::VersionMismatch(_) => {
            " (the database holds another migration under that number: it is another \
             service's database — each service needs one of its own — or a migration file \
             was edited after it was applied)"
        }
        _ => "",
    }
}

impl DbError {
    /// True when the database refused the data itself: see [`refuses_the_data`].
    pub fn refuses_the_data(&self) -> bool {
        matches!(self, DbError::Sqlx(e) if refuses_the_data(e))
    }

    /// True when a table looked at is not there: a database no migration of this service
    /// ran on (PostgreSQL's `undefined_table`, SQLite's "no such table").
    pub fn is_missing_table(&self) -> bool {
        matches!(self, DbError::Sqlx(sqlx::Error::Database(d))
            if d.code().as_deref() == Some("42P01") || d.message().starts_with("no such table"))
    }

    /// True when the database cannot serve (see [`is_outage`]), not this call's data.
    pub fn is_outage(&self) -> bool {
        matches!(self, DbError::Sqlx(e) if is_outage(e))
    }

    /// `reason` as a Retry of `ctx`'s message, an outage's when this error is one: a
    /// database down for hours does not dead-letter what arrived meanwhile.
    pub fn retry(
        &self,
        ctx: &framework::MessageContext,
        reason: impl std::fmt::Display,
    ) -> framework::Outcome {
        if self.is_outage() {
            ctx.retry_for_outage();
        }
        framework::Outcome::retry(reason)
    }

    /// Why PostgreSQL refused the login itself, if it did: the password, a role or a
    /// database that does not exist, a host `pg_hba.conf` does not admit. Waiting does not
    /// help: the configuration is wrong.
    pub fn refused_login(&self) -> Option<&'static str> {
        let DbError::Sqlx(sqlx::Error::Database(d)) = self else {
            return None;
        };
        match d.code()?.as_ref() {
            "28P01" => Some("the server refused the password"),
            "28000" => Some(
                "the server refused the login (no such role, or pg_hba.conf does not admit \
                 this host or user)",
            ),
            "3D000" => Some("the database does not exist"),
            _ => None,
        }
    }

    /// This error met while a service opens its database at `url` at start: a
    /// configuration error (exit 2) naming `<section>.database_url` — or
    /// `database_password_file` for a refused password read from one — where the server
    /// refused the login or the database is another service's (its first migration is
    /// not this service's); else itself, naming the database (exit 1: a later migration
    /// that differs is one edited after it was applied, not a setting).
    pub fn at_start(self, section: &str, password_file: bool, url: &str) -> framework::BoxError {
        if let DbError::Encoding(_) = &self {
            return Box::new(framework::config::ConfigError::new(
                format!("{section}.database_url"),
                format!("{}: {self}", redact_url(url)),
            ));
        }
        if matches!(
            &self,
            DbError::Migrate(sqlx::migrate::MigrateError::VersionMismatch(1))
        ) {
            return Box::new(framework::config::ConfigError::new(
                format!("{section}.database_url"),
                format!(
                    "{} is another service's database (its first migration is not this \
                     service's): each service needs a database of its own",
                    redact_url(url)
                ),
            ));
        }
        match self.refused_login() {
            Some(why) => {
                let refused_password = matches!(
                    &self,
                    DbError::Sqlx(sqlx::Error::Database(d)) if d.code().as_deref() == Some("28P01")
                );
                let key = if password_file && refused_password {
                    "database_password_file"
                } else {
                    "database_url"
                };
                Box::new(framework::config::ConfigError::new(
                    format!("{section}.{key}"),
                    format!("{why}: {self}"),
                ))
            }
            None => format!("cannot open database {}: {self}", redact_url(url)).into(),
        }
    }
}

/// True when PostgreSQL refused the data itself rather than failing to store it: a value
/// too large for its index (SQLSTATE class 54, e.g. a key of more than 2,704 bytes that
/// does not compress) or one it cannot hold (class 22, e.g. text it cannot encode). No
/// retry can store it, so the message is Permanent instead of retried to exhaustion.
/// (SQLite's result codes are decimal numbers, never five characters.)
pub fn refuses_the_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.len() == 5 && (c.starts_with("54") || c.starts_with("22"))),
        _ => false,
    }
}

/// True when the database itself is unreachable or unable to serve, not this call's data:
/// no connection (I/O, TLS, the pool timed out or closed), PostgreSQL's connection,
/// resource, shutdown and system classes (08, 53, 57P01–57P03, 58), a database not
/// accepting connections and a write refused as read-only (25006: a primary demoted in a
/// failover, still reached until the pool's connection to it is closed), a login or a
/// privilege refused at run time (class 28, 42501: a password rotated in the database before
/// the service's secret, a `pg_hba.conf` change, a `REVOKE` — the server refusing this
/// service, never this message's data; a restart with the right secret ends it), SQLite
/// busy, locked, out of disk, read-only, unable to open, or an I/O error. A processor waits
/// such an outage out (see `MessageContext::retry_for_outage`); another error (a decode, a
/// constraint, a serialisation race, a database dropped under the service) is the call's
/// own and retried as any.
pub fn is_outage(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            let c = c.as_ref();
            // PostgreSQL's SQLSTATE has five characters; SQLite's (extended) result codes
            // at most four digits, the primary code in the low byte.
            if c.len() == 5 {
                c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("58")
                    || c.starts_with("28")
                    || matches!(c, "57P01" | "57P02" | "57P03" | "25006" | "42501")
                    // `ALLOW_CONNECTIONS false`: a database taken offline for maintenance.
                    || (c == "55000" && d.message().contains("not currently accepting connections"))
            } else {
                c.parse::<u32>()
                    .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 8 | 10 | 13 | 14))
            }
        }),
        _ => false,
    }
}

/// Characters of a file path that an SQLite URL must escape: sqlx decodes `%XX` in the
/// path and ends it at `?` (a `data_dir` of `/srv/media%20tier` opened `/srv/media tier`).
const SQLITE_PATH_ESCAPED: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b'%').add(b'?').add(b'#');

/// The default database URL of a service: `sqlite://<data_dir>/<service>.db`, the path
/// escaped where sqlx would read it otherwise.
pub fn default_url(data_dir: &Path, service: &str) -> String {
    let path = data_dir.join(format!("{service}.db"));
    format!(
        "sqlite://{}",
        percent_encoding::utf8_percent_encode(&path.to_string_lossy(), SQLITE_PATH_ESCAPED)
    )
}

/// Hides the password of a database URL for logs and `check-config`.
pub fn redact_url(url: &str) -> String {
    framework::config::redacted_url(url)
}

/// True for an in-memory SQLite URL (`sqlite://:memory:`, `?mode=memory`).
pub fn in_memory(url: &str) -> bool {
    url.strip_prefix("sqlite:")
        .map(|p| p.trim_start_matches('/'))
        .is_some_and(|p| p.starts_with(":memory:") || p.contains("mode=memory"))
}

/// True for a PostgreSQL URL.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `migrator` as run here: a database a newer release migrated further (in a rolling
/// upgrade its replicas start first) is accepted, not refused as `VersionMissing` — every
/// migration only adds or relaxes a column to nullable, so an older release works on the
/// newer schema (docs/operations.md, "Database schema across a rolling upgrade").
fn forward_compatible(m: &Migrator) -> Migrator {
    // (A database with versions this release lacks is reported by `note_newer_schema`.)
    Migrator {
        migrations: m.migrations.clone(),
        ignore_missing: true,
        locking: m.locking,
        no_tx: m.no_tx,
    }
}

/// Logs a warning when the database holds migrations this release does not know (a newer
/// release migrated it: expected during a rolling upgrade, not once it is over).
async fn note_newer_schema(pool: &AnyPool, migrator: &Migrator) {
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(pool)
            .await;
    if let Ok(Some(v)) = applied
        && v > known
    {
        tracing::warn!(
            database_version = v,
            release_version = known,
            "the database was migrated by a newer release; running on its schema"
        );
    }
}

/// True for a URL [`connect`] accepts: `sqlite://…` or `postgres://…`.
pub fn is_supported(url: &str) -> bool {
    url.starts_with("sqlite://") || is_postgres(url)
}

/// Opens a pool (creating the SQLite file and its directory) and runs `migrator`.
/// SQLite gets one connection (one writer at a time, so no SQLITE_BUSY under load);
/// see [`connect_split`] for concurrent readers beside it.
pub async fn connect(url: &str, migrator: &Migrator) -> Result<AnyPool, DbError> {
    let full = full_url(url)?;
    let sqlite = full.starts_with("sqlite:");
    let pool = open_pool(&full, if sqlite { 1 } else { 10 }, false).await?;
    if !sqlite {
        fit_to_serve(&pool).await?;
    }
    migrate(&pool, migrator, !sqlite).await?;
    note_newer_schema(&pool, migrator).await;
    if sqlite {
        flush_file_entry(&full);
        warn_network_filesystem(&full);
        watch_file(&full, vec![pool.clone()]);
    }
    Ok(pool)
}

/// The file of an SQLite `url` (`sqlite://path?…`), its path decoded as sqlx decodes it
/// (`%20` is a space); None for other URLs and an in-memory database.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = url.strip_prefix("sqlite://")?.split('?').next()?;
    if path == ":memory:" || in_memory(url) {
        return None;
    }
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

/// Warns where the SQLite file of `url` is on a network filesystem: SQLite's WAL index is
/// shared memory, local to each host, and its locks are only as good as the server's, so
/// two hosts (replicas given one shared volume) would write over each other's records.
/// One host alone works, hence a warning, not a refusal.
fn warn_network_filesystem(url: &str) {
    let Some(dir) =
        sqlite_file(url).and_then(|f| f.canonicalize().ok()?.parent().map(Path::to_path_buf))
    else {
        return;
    };
    if let Some(kind) = filesystem::of_path(&dir).and_then(filesystem::network_name) {
        tracing::warn!(
            database = %dir.display(),
            filesystem = kind,
            "the SQLite database is on a network filesystem: only one host may use it (two \
             replicas sharing the volume would corrupt its records); give replicas a \
             postgres:// database_url (docs/scaling.md)"
        );
    }
}

/// Flushes the directory holding the SQLite file of `url` (and the directories above
/// it): SQLite flushes the directory for its WAL and journals, not for the database file
/// it creates, and a power loss that took the file's entry would take the records with it.
/// Once per start: a few fsyncs.
fn flush_file_entry(url: &str) {
    let Some(file) = sqlite_file(url).and_then(|f| f.canonicalize().ok()) else {
        return;
    };
    for a in file.ancestors() {
        if let Some(parent) = a.parent()
            && let Err(e) = std::fs::File::open(parent).and_then(|d| d.sync_all())
        {
            tracing::debug!(dir = %parent.display(), error = %e, "could not flush a directory above the database");
        }
    }
}

/// How often a service's SQLite file is looked at (see [`watch_file`]).
const FILE_CHECK: Duration = Duration::from_secs(5);

/// Closes `pools` once the SQLite file of `url` is deleted or replaced under the running
/// service (an operator's `rm`, a restore copied over it): its connections would go on
/// writing into the deleted file, every write acknowledged, and all of it gone at the next
/// start. Closed, every database call fails (its message retried, not lost) and the log
/// says why and to restart.
fn watch_file(url: &str, pools: Vec<AnyPool>) {
    use std::os::unix::fs::MetadataExt;
    let Some(path) = sqlite_file(url) else {
        return;
    };
    let identity = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let Ok(opened) = identity(&path) else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FILE_CHECK);
        loop {
            tick.tick().await;
            if pools.iter().all(AnyPool::is_closed) {
                return;
            }
            let gone = match identity(&path) {
                Ok(now) => now != opened,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                // A look that failed otherwise (a share's brief I/O error) says nothing.
            };
            if gone {
                tracing::error!(file = %path.display(),
                    "the database file was deleted or replaced while the service ran: what \
                     was written since is not in the file there now. Its connections are \
                     closed, so every database call fails (messages are retried, not lost) \
                     until the service is restarted on the right file");
                for p in &pools {
                    p.close().await;
                }
                return;
            }
        }
    });
}

/// How often a migration still running is logged.
const MIGRATION_NOTICE: Duration = Duration::from_secs(30);

/// Runs `migrator` on a connection of its own. On PostgreSQL it waits as long as it takes
/// for the migration lock (another replica migrating: a table rebuilt can take longer than
/// [`LOCK_TIMEOUT`]), and the connection is closed after, not handed back with no limit.
async fn migrate(pool: &AnyPool, migrator: &Migrator, postgres: bool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    // Nothing to apply (every start but an upgrade's): no migration lock taken. Behind a
    // pooler in transaction mode (PgBouncer) the lock, a session's, and its release went
    // to different server connections: the release did nothing, and every replica
    // starting after waited for the lock until the pooler retired that connection.
    if !pending(&mut conn, migrator).await {
        return Ok(());
    }
    #[cfg(test)]
    tests::saw_pending(pool.connect_options().database_url.as_str());
    if postgres {
        conn.close_on_drop();
        sqlx::query("SET lock_timeout = 0")
            .execute(&mut *conn)
            .await?;
    }
    // SQLite has no migration lock: two instances starting at once on one file both see
    // a migration missing, and the one that applies it second fails ("table … already
    // exists", "duplicate column name"). Each migration commits with its row in `_sqlx_migrations`, so looking
    // again finds it applied: a few looks outlast another instance's migrations.
    let mut tries = 0;
    loop {
        let compatible = forward_compatible(migrator);
        let run = compatible.run_direct(&mut *conn);
        tokio::pin!(run);
        // A wait for another replica's migration lock says so, every half minute: the
        // replica shows only `storagetier_starting` 1 meanwhile.
        let mut said = tokio::time::interval_at(
            tokio::time::Instant::now() + MIGRATION_NOTICE,
            MIGRATION_NOTICE,
        );
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = said.tick() => tracing::warn!(
                    "still migrating the database: another replica's migration may hold the \
                     lock (a long one during an upgrade); waiting"
                ),
            }
        };
        match outcome {
            Err(e) if !postgres && tries < 20 && raced(&e) => {
                tries += 1;
                tracing::info!(error = %e, "a migration failed as if another instance applied it first: looking again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            r => return r.map_err(DbError::from),
        }
    }
}

/// Refuses a PostgreSQL database the service cannot run on, asked in one round trip:
///
/// - one whose encoding cannot hold every character: in LATIN1 (or any single-byte
///   encoding) a file name or an error in another script is refused (SQLSTATE 22P05), so
///   each such message was dead-lettered as Permanent while the rest passed. UTF8 holds
///   all; SQL_ASCII stores the client's UTF-8 bytes as they are.
/// - one that takes no writes — a URL naming a read replica, a database or role set
///   `default_transaction_read_only` — where the service ran on, every write waited out
///   as an outage (SQLSTATE 25006) for up to `max_outage_ms` while `/readyz` said ready.
///   Exit 1, not a setting's error: mid-failover the same URL can reach a standby for a
///   moment, and a restart then finds the new primary.
///
/// A PostgreSQL-compatible server that cannot answer is warned about, not refused (as a
/// session setting it refuses is); a server out of reach fails the migration next.
async fn fit_to_serve(pool: &AnyPool) -> Result<(), DbError> {
    let asked: Result<(String, String, bool), _> = sqlx::query_as(
        "SELECT current_setting('server_encoding'), current_setting('transaction_read_only'), \
         pg_is_in_recovery()",
    )
    .fetch_one(pool)
    .await;
    let (encoding, read_only, standby) = match asked {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "the database did not say its encoding and whether it takes writes: not checked");
            return Ok(());
        }
    };
    if !(encoding.eq_ignore_ascii_case("UTF8") || encoding.eq_ignore_ascii_case("SQL_ASCII")) {
        return Err(DbError::Encoding(encoding));
    }
    if standby {
        return Err(DbError::ReadOnly("the server is a standby"));
    }
    if read_only.eq_ignore_ascii_case("on") {
        return Err(DbError::ReadOnly(
            "transactions are read-only: default_transaction_read_only is on for this \
             database or role",
        ));
    }
    Ok(())
}

/// Whether `migrator` holds a migration the database has not applied, or applied from
/// other text (refused by the migrator, which says so): looked at without the lock.
async fn pending(conn: &mut sqlx::AnyConnection, migrator: &Migrator) -> bool {
    let applied: Vec<(i64, Vec<u8>)> =
        match sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            // No table yet: a new database.
            Err(_) => return true,
        };
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .any(|m| {
            !applied
                .iter()
                .any(|(v, sum)| *v == m.version && sum.as_slice() == m.checksum.as_ref())
        })
}

/// The statement that begins a write transaction on the backend named `backend`: on
/// SQLite `BEGIN IMMEDIATE`, which takes the write lock at once, waiting out the busy
/// timeout. A deferred `BEGIN` whose first statement reads fails at once ("database is
/// locked", the busy timeout not consulted) when it comes to write while another process
/// on the file holds the lock or has written since that read.
pub fn begin_statement(backend: &str) -> &'static str {
    if backend.eq_ignore_ascii_case("sqlite") {
        "BEGIN IMMEDIATE"
    } else {
        "BEGIN"
    }
}

/// Rows deleted per statement by [`delete_in_batches`].
pub const DELETE_BATCH: u64 = 5000;

/// Deletes the rows of `table` (key column `key`) whose `column` is below `before`,
/// [`DELETE_BATCH`] at a time, each statement [`bounded`]: a backlog never holds the write
/// lock (on SQLite, every other write) for long, nor takes longer than the bound and is
/// rolled back every time; a server that stopped answering never stops housekeeping for
/// good. How many rows.
pub async fn delete_in_batches(
    pool: &AnyPool,
    table: &str,
    key: &str,
    column: &str,
    before: &str,
) -> Result<u64, sqlx::Error> {
    // The condition again outside: a row updated meanwhile (its delete waited for it)
    // is checked anew, which the key's membership in the batch chosen before is not.
    let sql = format!(
        "DELETE FROM {table} WHERE {column} < $1 AND {key} IN \
         (SELECT {key} FROM {table} WHERE {column} < $1 LIMIT {DELETE_BATCH})"
    );
    let mut removed = 0;
    loop {
        let n = bounded(sqlx::query(&sql).bind(before).execute(pool))
            .await?
            .rows_affected();
        removed += n;
        // Until none is left: a batch whose rows were refreshed meanwhile deletes fewer.
        if n == 0 {
            return Ok(removed);
        }
    }
}

/// How long one database call (a query, a whole group-committed batch) may take before it
/// is given up as a transient failure: longer than any lock wait ([`LOCK_TIMEOUT`], SQLite's
/// busy timeout), so only a server that stopped answering (a host gone mid-failover, a
/// network that drops packets without a reset) reaches it. Without it such a call waited
/// for ever — and the storage tiers' one committer with it, so every handler.
pub const CALL_LIMIT: Duration = Duration::from_secs(60);

/// Runs one database call, failing it after [`CALL_LIMIT`] (a retry, never a hang).
pub async fn bounded<T, E: From<sqlx::Error>>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    bounded_by(CALL_LIMIT, call).await
}

async fn bounded_by<T, E: From<sqlx::Error>>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the database did not answer within {limit:?}"),
        ))
        .into()),
    }
}

/// A write transaction on a connection of its own (see [`begin_write`]). Its connection
/// goes back to the pool only after a commit or rollback that worked; a transaction that
/// failed or was dropped closes it instead. A connection a failure left in a bad state
/// would otherwise serve on: after SQLite's "database or disk is full" (SQLite rolls back
/// by itself, the client's rollback fails and it believes a transaction still open, so
/// every later begin failed until the connection aged out, 30 minutes), a SQLite file
/// opened read-only, a PostgreSQL session left on a primary demoted to read-only.
pub struct WriteTx {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    ended: bool,
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.conn
    }
}

impl WriteTx {
    /// Commits; the connection is closed if that fails.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.ended = true;
        Ok(())
    }

    /// Rolls back; the connection is closed if that fails.
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.ended = true;
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.ended {
            // Closing ends the transaction too (the server rolls it back).
            self.conn.close_on_drop();
        }
    }
}

/// Begins a write transaction on a connection of `pool` (see [`begin_statement`]).
pub async fn begin_write(pool: &AnyPool) -> Result<WriteTx, sqlx::Error> {
    // The guard first: dropped between its BEGIN and its return (a handler stopped, a
    // bounded call given up), the connection is closed, never handed back inside an open
    // transaction for the next writes to run in unseen.
    let mut tx = WriteTx {
        conn: pool.acquire().await?,
        ended: false,
    };
    let begin = begin_statement(tx.conn.backend_name());
    sqlx::query(begin).execute(&mut *tx.conn).await?;
    Ok(tx)
}

/// Whether a failed SQLite migration looks like another instance's applied first (its
/// table there already, its row in `_sqlx_migrations`, the file locked meanwhile), not
/// like a migration that fails on its own (which looking again would only delay).
fn raced(e: &sqlx::migrate::MigrateError) -> bool {
    let text = e.to_string();
    [
        "already exists",
        // An `ADD COLUMN` the other instance applied first (an upgrade, not a new file).
        "duplicate column name",
        "UNIQUE constraint failed",
        "database is locked",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// How long a PostgreSQL statement waits for a lock another session holds before it fails
/// (a retry): see [`open_pool`].
const LOCK_TIMEOUT: &str = "10s";

/// Opens `url` for reading only, as it is: no migration runs (an operator's look must not
/// change the schema under a running service of another version, and needs no rights to).
pub async fn connect_read_only(url: &str) -> Result<AnyPool, DbError> {
    let full = full_url_as(url, Access::ReadOnly)?;
    let sqlite = full.starts_with("sqlite:");
    open_pool(&full, if sqlite { 1 } else { 2 }, true).await
}

/// A database opened as separate read and write pools.
#[derive(Clone, Debug)]
pub struct Pools {
    /// For queries that only read.
    pub read: AnyPool,
    /// For every write. SQLite: its single writer connection (WAL lets the readers run
    /// beside it); PostgreSQL: the same pool as `read`.
    pub write: AnyPool,
}

/// Opens `url` as [`Pools`] and runs `migrator`. SQLite (WAL) gets one writer connection
/// and `readers` read-only connections, so lookups never queue behind a write and
/// writes never meet SQLITE_BUSY from each other; a `:memory:` database (one per
/// connection) gets a single shared connection.
pub async fn connect_split(url: &str, migrator: &Migrator, readers: u32) -> Result<Pools, DbError> {
    let full = full_url(url)?;
    if !full.starts_with("sqlite:") || full.contains(":memory:") {
        let pool = connect(url, migrator).await?;
        return Ok(Pools {
            read: pool.clone(),
            write: pool,
        });
    }
    let write = open_pool(&full, 1, false).await?;
    migrate(&write, migrator, false).await?;
    note_newer_schema(&write, migrator).await;
    flush_file_entry(&full);
    warn_network_filesystem(&full);
    let read = open_pool(&full, readers.max(1), true).await?;
    watch_file(&full, vec![write.clone(), read.clone()]);
    Ok(Pools { read, write })
}

/// How a database is opened: a service's own (created if missing) or an operator's look.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Own,
    ReadOnly,
}

/// SQLite `url` opened in `mode` unless its query names one: whatever else the query says
/// (`?cache=shared` alone left the file never created, and every first start failed).
fn with_mode(url: &str, mode: &str) -> String {
    match url.split_once('?') {
        None => format!("{url}?mode={mode}"),
        Some((_, query)) if query.split('&').any(|p| p.starts_with("mode=")) => url.to_string(),
        Some(_) => format!("{url}&mode={mode}"),
    }
}

/// `url` as sqlx takes it (SQLite: its directory created, `mode=rwc` by default).
fn full_url(url: &str) -> Result<String, DbError> {
    full_url_as(url, Access::Own)
}

/// `url` as sqlx takes it for `access`: a read-only look at SQLite creates nothing (a
/// mistyped path is an error, not a new empty database).
fn full_url_as(url: &str, access: Access) -> Result<String, DbError> {
    sqlx::any::install_default_drivers();
    if url.starts_with("sqlite://") {
        if access == Access::ReadOnly {
            return Ok(with_mode(url, "ro"));
        }
        if let Some(file) = sqlite_file(url)
            && let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
        {
            // Flushed into their parents once the database is open (`flush_file_entry`).
            std::fs::create_dir_all(dir).map_err(|e| DbError::Dir(dir.display().to_string(), e))?;
        }
        Ok(with_mode(url, "rwc"))
    } else if is_supported(url) {
        Ok(url.to_string())
    } else {
        Err(DbError::BadUrl(redact_url(url)))
    }
}

/// How long a query waits for a connection (and start-up for the first).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a PostgreSQL connection handed back to its pool may take to answer a ping
/// before it is given up: a healthy server answers in milliseconds.
const RELEASE_PING_LIMIT: Duration = Duration::from_secs(5);

/// Whether a PostgreSQL connection handed back to its pool still answers, within
/// [`RELEASE_PING_LIMIT`]. sqlx pings every returned connection without a bound, and a
/// call given up by [`bounded`] (a server gone silent: a host lost mid-failover, packets
/// dropped without a reset) hands its connection back in the middle of a query: that ping
/// waited for the kernel to give up on the socket, about 15 minutes, and held one of the
/// pool's connections all that time (all of them, after a few give-ups). A connection
/// that does not answer is dropped where it stands — its socket closed, nothing more
/// sent: sqlx's own close of it waits on the silent server as well (over TLS even its
/// "hard" close reads before it returns), so an in-memory SQLite connection takes its
/// place for sqlx to close.
async fn released_alive(conn: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    match tokio::time::timeout(RELEASE_PING_LIMIT, conn.ping()).await {
        Ok(Ok(())) => return Ok(true),
        Ok(Err(e)) => tracing::warn!(error = %e, "a database connection failed: closed"),
        Err(_) => tracing::warn!(
            "a database connection did not answer within {RELEASE_PING_LIMIT:?}: dropped"
        ),
    }
    match sqlx::AnyConnection::connect("sqlite::memory:").await {
        Ok(stand_in) => drop(std::mem::replace(conn, stand_in)),
        // Closed by sqlx then, as before.
        Err(e) => tracing::warn!(error = %e, "no stand-in for a dead database connection"),
    }
    Ok(false)
}

/// Why the connections to the PostgreSQL server at `url` do not check who it is (None when
/// they do, or it is this machine): anyone on the path could read and change every record,
/// and a password would be handed to them.
fn unverified_server(url: &str) -> Option<String> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let o = PgConnectOptions::from_str(url).ok()?;
    let local = o.get_socket().is_some()
        || framework::config::is_this_machine(o.get_host())
        || o.get_host().starts_with('/');
    let mode = o.get_ssl_mode();
    if local || matches!(mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull) {
        return None;
    }
    Some(format!(
        "sslmode={}",
        match mode {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer (the default)",
            PgSslMode::Require => "require",
            _ => "?",
        }
    ))
}

async fn open_pool(full: &str, max: u32, read_only: bool) -> Result<AnyPool, DbError> {
    let opts = AnyConnectOptions::from_str(full)?;
    let sqlite = full.starts_with("sqlite:");
    if let Some(mode) = (!sqlite).then(|| unverified_server(full)).flatten() {
        tracing::warn!(database = %redact_url(full), %mode,
            "the database server's certificate is not checked: add sslmode=verify-full \
             (and sslrootcert=/path/ca.pem for a private CA) to database_url");
    }
    let pool = AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_release(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    return Ok(true);
                }
                released_alive(conn).await
            })
        })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if !sqlite {
                    // A lock another session holds (a replica paused or cut off inside a
                    // transaction) fails the one write waiting on it, a retry, instead
                    // of hanging it and every write queued behind it until PostgreSQL's
                    // keepalive notices the other side, hours later; the other side's
                    // transaction ends once idle too long, and a dead client is noticed
                    // in about half a minute.
                    // A server or proxy that refuses one (another PostgreSQL-compatible
                    // database) still serves: warned, not fatal.
                    for set in [
                        format!("SET lock_timeout = '{LOCK_TIMEOUT}'"),
                        "SET idle_in_transaction_session_timeout = '60s'".into(),
                        "SET tcp_keepalives_idle = 15".into(),
                        "SET tcp_keepalives_interval = 5".into(),
                        "SET tcp_keepalives_count = 3".into(),
                    ] {
                        if let Err(e) = sqlx::query(&set).execute(&mut *conn).await {
                            tracing::warn!(error = %e, setting = %set, "PostgreSQL refused a session setting");
                        }
                    }
                    // A commit returns once it is on disk: a database or role tuned to
                    // `synchronous_commit = off` would lose the last commits of acked
                    // messages on a crash. Only `off` is raised; `local`, `remote_write`
                    // and `remote_apply` already flush locally, and are kept.
                    let commit: Result<String, _> = sqlx::query_scalar("SHOW synchronous_commit")
                        .fetch_one(&mut *conn)
                        .await;
                    if commit.is_ok_and(|c| c.eq_ignore_ascii_case("off"))
                        && let Err(e) = sqlx::query("SET synchronous_commit = on")
                            .execute(&mut *conn)
                            .await
                    {
                        tracing::warn!(error = %e, "PostgreSQL refused synchronous_commit = on: commits may be lost on a crash");
                    }
                }
                if sqlite {
                    // WAL: readers never block the writer nor it them. synchronous stays
                    // FULL (SQLite's default): every commit is on disk before it returns,
                    // so a recorded copy survives power loss, not only a process crash.
                    // Writers batch their commits instead (group commit) to pay for it.
                    // A reader finds the writer's WAL mode in the file; setting it would
                    // write to a database it only looks at.
                    if !read_only {
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    for pragma in [
                        "PRAGMA synchronous = FULL",
                        "PRAGMA busy_timeout = 5000",
                        "PRAGMA foreign_keys = ON",
                    ] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    if read_only {
                        sqlx::query("PRAGMA query_only = ON")
                            .execute(&mut *conn)
                            .await?;
                    }
                }
                Ok(())
            })
        })
        .connect_with(opts.clone())
        .await;
    match pool {
        Ok(pool) => Ok(pool),
        // The pool says only that it waited (a refused connection is retried until the
        // acquire timeout): one connection made by hand says why.
        Err(sqlx::Error::PoolTimedOut) => {
            // SQLite opens a damaged file without a word: the first read says what it is
            // ("file is not a database").
            let once = async {
                let mut c = sqlx::ConnectOptions::connect(&opts).await?;
                if sqlite {
                    sqlx::query("SELECT count(*) FROM sqlite_master")
                        .execute(&mut c)
                        .await?;
                }
                Ok::<(), sqlx::Error>(())
            };
            match tokio::time::timeout(ACQUIRE_TIMEOUT, once).await {
                Ok(Err(why)) => Err(why.into()),
                Ok(Ok(())) | Err(_) => Err(sqlx::Error::PoolTimedOut.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Test support: a fresh PostgreSQL database per test, dropped with [`TempPostgres::drop_db`].
pub mod testing {
    use super::*;

    /// Server URL for tests (`TEST_POSTGRES_URL` overrides), without a database name.
    pub fn postgres_server() -> String {
        std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
    }

    /// A uniquely named database on the test server; dropped with [`TempPostgres::drop_db`],
    /// or when the value is dropped (a test that failed before it got there).
    pub struct TempPostgres {
        /// URL of the new database.
        pub url: String,
        name: String,
        dropped: bool,
    }

    /// How long dropping a test database may take.
    const DROP_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

    impl Drop for TempPostgres {
        fn drop(&mut self) {
            if self.dropped {
                return;
            }
            let name = self.name.clone();
            // A runtime of its own, on a thread of its own: this may run inside the test's
            // runtime (unwinding from a failed assertion), where none may block.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                // Bounded: a server that stops answering must not hold the test for ever.
                // The timer is made inside the runtime: `timeout` needs one to exist.
                let drop_db = async {
                    if let Ok(admin) =
                        AnyPool::connect(&format!("{}/postgres", postgres_server())).await
                    {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&admin)
                                .await;
                        admin.close().await;
                    }
                };
                let dropped =
                    rt.block_on(async { tokio::time::timeout(DROP_BUDGET, drop_db).await });
                if dropped.is_err() {
                    eprintln!("test database {name}: no answer dropping it within {DROP_BUDGET:?}");
                }
            })
            .join();
        }
    }

    /// The test server's `postgres` database. A server that cannot be reached fails the
    /// test naming it and how to point at another: sqlx's own "pool timed out" named
    /// neither, in every PostgreSQL test at once.
    async fn admin() -> Result<AnyPool, DbError> {
        match AnyPool::connect(&format!("{}/postgres", postgres_server())).await {
            Err(e @ (sqlx::Error::PoolTimedOut | sqlx::Error::Io(_))) => panic!(
                "the test PostgreSQL server {} cannot be reached ({e}): start it (README, \
                 Testing), or set TEST_POSTGRES_URL to one",
                redact_url(&postgres_server())
            ),
            r => Ok(r?),
        }
    }

    impl TempPostgres {
        /// Creates `t_<uuid>` on the server.
        pub async fn create() -> Result<Self, DbError> {
            Self::create_with("").await
        }

        /// Creates `t_<uuid>` on the server with `options` of `CREATE DATABASE` (e.g. an
        /// `ENCODING`).
        pub async fn create_with(options: &str) -> Result<Self, DbError> {
            sqlx::any::install_default_drivers();
            let name = format!("t_{}", uuid::Uuid::new_v4().simple());
            let admin = admin().await?;
            sqlx::query(&format!("CREATE DATABASE {name} {options}"))
                .execute(&admin)
                .await?;
            admin.close().await;
            Ok(Self {
                url: format!("{}/{name}", postgres_server()),
                name,
                dropped: false,
            })
        }

        /// Drops the database (after the service's pool is closed).
        pub async fn drop_db(mut self) -> Result<(), DbError> {
            self.dropped = true;
            let admin = admin().await?;
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await?;
            admin.close().await;
            Ok(())
        }
    }

    /// Stops writes to `table` of `pool`'s PostgreSQL database part way until the returned
    /// transaction ends: a trigger (`when` the write, e.g. `BEFORE UPDATE`, for `each`
    /// `STATEMENT` or `ROW`) whose statements match `condition` (SQL, e.g. on
    /// `current_query()`) waits for a lock the transaction holds. A test places another
    /// session's step exactly there instead of hoping a sleep does.
    pub async fn hold_writes(
        pool: &AnyPool,
        table: &str,
        when: &str,
        each: &str,
        condition: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, DbError> {
        for ddl in [
            format!(
                "CREATE FUNCTION hold_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF {condition} THEN PERFORM pg_advisory_xact_lock(424242); END IF; \
                 RETURN NULL; END $$"
            ),
            format!(
                "CREATE TRIGGER hold_{table} {when} ON {table} FOR EACH {each} \
                 EXECUTE FUNCTION hold_{table}()"
            ),
        ] {
            sqlx::query(&ddl).execute(pool).await?;
        }
        let mut holder = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(424242)")
            .execute(&mut *holder)
            .await?;
        Ok(holder)
    }

    /// How many sessions of `pool`'s PostgreSQL database wait for a lock: a test holding a
    /// transaction still awaits this instead of sleeping, to know another is blocked on it.
    pub async fn sessions_waiting(pool: &AnyPool) -> Result<i64, DbError> {
        Ok(sqlx::query(
            "SELECT COUNT(DISTINCT l.pid) AS n FROM pg_locks l JOIN pg_stat_activity a \
             ON a.pid = l.pid WHERE NOT l.granted AND a.datname = current_database()",
        )
        .fetch_one(pool)
        .await?
        .try_get("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// How many migrations found something to apply, by database URL: a test racing two
    /// upgrades waits for both to have looked instead of sleeping.
    static PENDING_SEEN: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

    /// Counts a migration of the database at `url` that found something to apply.
    pub(super) fn saw_pending(url: &str) {
        let mut seen = PENDING_SEEN.lock().unwrap_or_else(|p| p.into_inner());
        *seen
            .get_or_insert_with(HashMap::new)
            .entry(url.to_owned())
            .or_default() += 1;
    }

    /// How many migrations of a database whose URL holds `path` found something to apply.
    fn pending_seen(path: &str) -> usize {
        let seen = PENDING_SEEN.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter()
            .flatten()
            .filter(|(url, _)| url.contains(path))
            .map(|(_, n)| n)
            .sum()
    }

    /// A SQLite database whose URL carries a query of its own (`?cache=shared`) is created
    /// on first start all the same; a mode it names stands.
    #[tokio::test]
    async fn a_sqlite_url_with_a_query_is_created_on_first_start() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!(
            "sqlite://{}?cache=shared",
            dir.path().join("q.db").display()
        );
        let pool = connect(&url, &Migrator::DEFAULT).await.expect("created");
        pool.close().await;
        assert!(dir.path().join("q.db").exists());
        assert_eq!(
            with_mode("sqlite:///x.db?mode=ro", "rwc"),
            "sqlite:///x.db?mode=ro"
        );
        assert_eq!(with_mode("sqlite:///x.db", "ro"), "sqlite:///x.db?mode=ro");
    }

    /// A database that cannot serve is an outage; a query's own failure, or a row the
    /// server refuses, is not.
    #[tokio::test]
    async fn only_a_database_that_cannot_serve_is_an_outage() {
        let dir = tempfile::tempdir().expect("temp");
        let url = format!("sqlite://{}", dir.path().join("o.db").display());
        let pool = connect(&url, &Migrator::DEFAULT).await.expect("pool");
        let own = sqlx::query("SELECT * FROM no_such_table")
            .execute(&pool)
            .await
            .expect_err("no table");
        assert!(!is_outage(&own), "{own}");
        pool.close().await;
        let closed = sqlx::query("SELECT 1")
            .execute(&pool)
            .await
            .expect_err("closed");
        assert!(is_outage(&closed), "{closed}");
    }

    /// PostgreSQL refusing the service at run time — a login (no such role; a rotated
    /// password or a `pg_hba.conf` change answers with the same class 28) or a privilege
    /// (42501, a `REVOKE`) — is an outage, waited out, not a counted retry that would
    /// dead-letter the backlog; an error of the statement itself (42P01, no such table) and
    /// a database dropped under the service (3D000) are not.
    #[tokio::test]
    async fn postgres_refusing_the_service_is_an_outage_its_own_errors_are_not() {
        sqlx::any::install_default_drivers();
        let t = testing::TempPostgres::create()
            .await
            .expect("a test database");
        let mut no_role = url::Url::parse(&t.url).expect("a URL");
        let role = format!("r_{}", uuid::Uuid::new_v4().simple());
        no_role.set_username(&role).expect("a user");
        let login = AnyPool::connect(no_role.as_str())
            .await
            .expect_err("no such role");
        assert!(
            matches!(&login, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("28"))),
            "{login}"
        );
        assert!(is_outage(&login), "{login}");
        let gone = AnyPool::connect(&format!("{}/n_{}", testing::postgres_server(), &role[2..]))
            .await
            .expect_err("no such database");
        assert!(!is_outage(&gone), "{gone}");
        let pool = AnyPool::connect(&t.url).await.expect("pool");
        let own = sqlx::query("SELECT * FROM no_such_table")
            .execute(&pool)
            .await
            .expect_err("no table");
        assert!(!is_outage(&own), "{own}");
        for ddl in [
            "CREATE TABLE guarded (id BIGINT)".to_string(),
            format!("CREATE ROLE {role} NOLOGIN"),
        ] {
            sqlx::query(&ddl).execute(&pool).await.expect("ddl");
        }
        let mut tx = pool.begin().await.expect("a transaction");
        sqlx::query(&format!("SET LOCAL ROLE {role}"))
            .execute(&mut *tx)
            .await
            .expect("role");
        let denied = sqlx::query("SELECT * FROM guarded")
            .execute(&mut *tx)
            .await
            .expect_err("no privilege");
        tx.rollback().await.expect("rolled back");
        sqlx::query(&format!("DROP ROLE {role}"))
            .execute(&pool)
            .await
            .expect("role dropped");
        pool.close().await;
        t.drop_db().await.expect("dropped");
        assert!(is_outage(&denied), "{denied}");
    }

    /// A password mounted as a file goes into a PostgreSQL URL (replacing one written
    /// there, special characters encoded); an empty or missing file, or one beside an
    /// SQLite URL, is refused with a message naming the file, never the password.
    #[test]
    fn a_password_file_goes_into_a_postgres_url() {
        let dir = tempfile::tempdir().expect("temp");
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cr:t@/x\n").expect("write");
        let url = with_password_file("postgres://app:old@db:5432/records", &f).expect("url");
        assert_eq!(url, "postgres://app:s3cr%3At%40%2Fx@db:5432/records");
        // A `%` is the password's own, not an escape: the driver decodes what it reads.
        std::fs::write(&f, "p%41ss\n").expect("write");
        let url = with_password_file("postgres://app@db/records", &f).expect("url");
        let parsed = url::Url::parse(&url).expect("a URL");
        assert_eq!(parsed.password(), Some("p%2541ss"), "decodes to p%41ss");
        std::fs::write(&f, "  \n").expect("write");
        let e = with_password_file("postgres://app@db/records", &f).expect_err("empty");
        assert!(e.contains("is empty") && !e.contains("s3cr"), "{e}");
        let e = with_password_file("postgres://app@db/r", &dir.path().join("none"))
            .expect_err("missing");
        assert!(e.contains("cannot read"), "{e}");
        assert!(with_password_file("sqlite:///var/x.db", &f).is_err());
    }

    #[test]
    fn a_remote_server_unchecked_is_named_a_checked_or_local_one_is_not() {
        for (url, warned) in [
            ("postgres://u@db.example/x", true),
            ("postgres://u@db.example/x?sslmode=require", true),
            ("postgres://u@10.0.0.5/x?sslmode=disable", true),
            ("postgres://u@db.example/x?sslmode=verify-full", false),
            ("postgres://u@db.example/x?sslmode=verify-ca", false),
            ("postgres://u@127.0.0.1:5432/x", false),
            ("postgres://u@localhost/x?sslmode=disable", false),
            ("postgres://u@/x?host=/var/run/postgresql", false),
        ] {
            assert_eq!(unverified_server(url).is_some(), warned, "{url}");
        }
    }

    /// Managed PostgreSQL services refuse plaintext: `sslmode=require` must connect over
    /// TLS (sqlx was built without TLS, and every such URL failed to start a service).
    #[tokio::test]
    async fn postgres_over_tls() {
        sqlx::any::install_default_drivers();
        let plain = AnyPool::connect(&format!("{}/postgres", testing::postgres_server()))
            .await
            .expect("PostgreSQL reachable");
        let ssl: String = sqlx::query_scalar("SHOW ssl")
            .fetch_one(&plain)
            .await
            .expect("asked");
        plain.close().await;
        assert_eq!(
            ssl, "on",
            "the test server must have ssl = on (Debian's default, with its snakeoil certificate)"
        );
        let url = format!("{}/postgres?sslmode=require", testing::postgres_server());
        let pool = connect_read_only(&url)
            .await
            .expect("connected with sslmode=require");
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await
                .expect("asked");
        assert!(ssl, "the connection is encrypted");
        pool.close().await;
    }

    /// A pool of one connection to the test server through a relay, over TLS or not,
    /// whose first connection has served a query.
    async fn one_connection_through_a_relay(
        tls: bool,
    ) -> (framework::testing::relay::Relay, AnyPool) {
        sqlx::any::install_default_drivers();
        let relay =
            framework::testing::relay::Relay::start_to(&testing::postgres_server(), 5432).await;
        let mode = if tls { "require" } else { "disable" };
        let url = format!(
            "{}/postgres?sslmode={mode}",
            relay.url.trim_end_matches('/')
        );
        let pool = open_pool(&url, 1, true).await.expect("connected");
        sqlx::query("SELECT 1")
            .execute(&pool)
            .await
            .expect("served");
        (relay, pool)
    }

    /// After a call given up on a server gone silent, the pool serves again once a new
    /// connection works: sqlx's unbounded ping of the connection handed back held the
    /// pool's only connection for the ~15 minutes the kernel takes to give up on it.
    async fn a_pool_serves_again_after_a_call_given_up_on_a_silent_server(tls: bool) {
        let (relay, pool) = one_connection_through_a_relay(tls).await;
        relay.freeze_existing();
        let given_up = bounded_by(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&pool),
        )
        .await;
        assert!(given_up.is_err(), "a silent server's call is given up");
        serves_again(&pool, tls).await;
    }

    /// Queries `pool` until one is answered; fails after far longer than a released
    /// connection's ping may take.
    async fn serves_again(pool: &AnyPool, tls: bool) {
        let start = std::time::Instant::now();
        loop {
            let r = bounded_by(
                Duration::from_secs(20),
                sqlx::query("SELECT 1").execute(pool),
            )
            .await;
            match r {
                Ok(_) => return,
                Err(e) if start.elapsed() > Duration::from_secs(120) => {
                    panic!("the pool (tls {tls}) still does not serve: {e}")
                }
                Err(_) => {}
            }
        }
    }

    #[tokio::test]
    async fn a_pool_serves_again_after_a_call_given_up_on_a_silent_server_plain() {
        a_pool_serves_again_after_a_call_given_up_on_a_silent_server(false).await;
    }

    #[tokio::test]
    async fn a_pool_serves_again_after_a_call_given_up_on_a_silent_server_tls() {
        a_pool_serves_again_after_a_call_given_up_on_a_silent_server(true).await;
    }

    /// A start with nothing to migrate takes no migration lock: behind a pooler in
    /// transaction mode, the lock of an earlier start stayed held on a pooled server
    /// connection (its release went to another), and every start after waited for it —
    /// here held by another session, which the second start must not wait for.
    #[tokio::test]
    async fn a_start_with_nothing_to_migrate_takes_no_migration_lock() {
        use sqlx::Connection as _;
        use sqlx::migrate::{Migrate as _, Migration, MigrationType};
        let t = testing::TempPostgres::create()
            .await
            .expect("a test database");
        let migrator = Migrator {
            migrations: std::borrow::Cow::Owned(vec![Migration::new(
                1,
                "one table".into(),
                MigrationType::Simple,
                "CREATE TABLE one (id BIGINT)".into(),
                false,
            )]),
            ignore_missing: false,
            locking: true,
            no_tx: false,
        };
        connect(&t.url, &migrator)
            .await
            .expect("the first start migrates")
            .close()
            .await;
        let mut holder = sqlx::PgConnection::connect(&t.url)
            .await
            .expect("another session");
        holder.lock().await.expect("the migration lock, held");
        let again = tokio::time::timeout(Duration::from_secs(20), connect(&t.url, &migrator))
            .await
            .expect("a start with nothing to migrate waited for the migration lock")
            .expect("connected");
        again.close().await;
        holder.unlock().await.expect("released");
        holder.close().await.expect("closed");
        t.drop_db().await.expect("dropped");
    }

    /// A row a batch of deletions picked while it was old, then updated by another session
    /// before the delete reached it (the delete waited for that row), is kept: PostgreSQL
    /// checks only the outer condition anew. Before, a receipt refreshed at that moment was
    /// deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_refreshed_while_a_batch_deletes_it_is_kept() {
        sqlx::any::install_default_drivers();
        let t = testing::TempPostgres::create()
            .await
            .expect("a test database");
        let pool = AnyPoolOptions::new()
            .max_connections(3)
            .connect(&t.url)
            .await
            .expect("connected");
        sqlx::query("CREATE TABLE r (k TEXT PRIMARY KEY, at TEXT NOT NULL)")
            .execute(&pool)
            .await
            .expect("table");
        sqlx::query("INSERT INTO r VALUES ('refreshed', '1'), ('old', '1')")
            .execute(&pool)
            .await
            .expect("rows");
        let mut refresh = pool.begin().await.expect("begin");
        sqlx::query("UPDATE r SET at = '9' WHERE k = 'refreshed'")
            .execute(&mut *refresh)
            .await
            .expect("refresh");
        let deleting = tokio::spawn({
            let pool = pool.clone();
            async move { delete_in_batches(&pool, "r", "k", "at", "5").await }
        });
        let limit = Duration::from_secs(60);
        tokio::time::timeout(limit, async {
            while testing::sessions_waiting(&pool).await.expect("locks") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the delete waits for the refreshed row");
        refresh.commit().await.expect("committed");
        let removed = tokio::time::timeout(limit, deleting)
            .await
            .expect("the delete ends")
            .expect("joined")
            .expect("deleted");
        assert_eq!(removed, 1);
        let left: Vec<String> = sqlx::query_scalar("SELECT k FROM r")
            .fetch_all(&pool)
            .await
            .expect("left");
        assert_eq!(left, ["refreshed"]);
        pool.close().await;
        t.drop_db().await.expect("dropped");
    }

    /// A database tuned to `synchronous_commit = off` would lose the last commits of
    /// acked messages on a crash: the services' sessions commit synchronously whatever
    /// the database's default (a stronger setting is kept).
    #[tokio::test]
    async fn sessions_commit_synchronously_on_a_database_tuned_not_to() {
        let t = testing::TempPostgres::create()
            .await
            .expect("a test database");
        let name = t
            .url
            .rsplit('/')
            .next()
            .expect("a database name")
            .to_string();
        let admin = connect(&t.url, &Migrator::DEFAULT)
            .await
            .expect("connected");
        for (default, kept) in [("off", "on"), ("remote_apply", "remote_apply")] {
            sqlx::query(&format!(
                "ALTER DATABASE \"{name}\" SET synchronous_commit = {default}"
            ))
            .execute(&admin)
            .await
            .expect("tuned");
            let pool = connect(&t.url, &Migrator::DEFAULT)
                .await
                .expect("connected");
            let got: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&pool)
                .await
                .expect("shown");
            assert_eq!(got, kept, "database default {default}");
            pool.close().await;
        }
        admin.close().await;
        t.drop_db().await.expect("dropped");
    }

    /// A connection whose write failed is not handed out again: here a PostgreSQL session
    /// left read-only (as on a primary demoted in a failover while the pool held it) — the
    /// same connection failed every write until it aged out, 30 minutes later.
    #[tokio::test]
    async fn a_failed_write_does_not_leave_its_connection_to_serve_on() {
        sqlx::any::install_default_drivers();
        let t = testing::TempPostgres::create()
            .await
            .expect("a test database");
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&t.url)
            .await
            .expect("connected");
        sqlx::query("CREATE TABLE t (id BIGINT)")
            .execute(&pool)
            .await
            .expect("table");
        sqlx::query("SET default_transaction_read_only = on")
            .execute(&pool)
            .await
            .expect("the pool's one session made read-only");
        let write = || async {
            let mut tx = begin_write(&pool).await?;
            sqlx::query("INSERT INTO t VALUES (1)")
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        let e = write().await.expect_err("read-only");
        assert!(e.to_string().contains("read-only"), "{e}");
        assert!(is_outage(&e), "a database that takes no writes: {e}");
        write()
            .await
            .expect("the next write is on a new connection");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&pool)
            .await
            .expect("counted");
        assert_eq!(n, 1);
        pool.close().await;
        t.drop_db().await.expect("dropped");
    }

    /// A URL the client cannot use is a config error at start (exit 2 naming the key), not a
    /// failed connect (exit 1); the password never in the message.
    #[test]
    fn a_url_the_client_cannot_parse_is_refused_as_config() {
        for url in [
            "postgres://u:secret@db.example:99999/x",
            "postgres://u:secret@db.example/x?sslmode=bogus",
        ] {
            let e = DatabaseUrl::try_from(url.to_string()).expect_err(url);
            assert!(
                e.contains("not a usable URL") && !e.contains("secret"),
                "{e}"
            );
        }
        assert!(
            DatabaseUrl::try_from(
                "postgres://u:p@db.example:5432/x?sslmode=verify-full".to_string()
            )
            .is_ok()
        );
        assert!(DatabaseUrl::try_from("sqlite:///var/lib/x.db".to_string()).is_ok());
        // A parameter the driver would ignore, warning with its value at every start (a
        // secret, or a typo of one it reads), is refused naming it, not its value.
        for (url, named) in [
            (
                "postgres://u@db.example/x?sslpassword=s3cret",
                "sslpassword",
            ),
            ("postgres://u@db.example/x?pasword=s3cret", "pasword"),
            (
                "postgres://u@db.example/x?connect_timeout=10",
                "connect_timeout",
            ),
        ] {
            let e = DatabaseUrl::try_from(url.to_string()).expect_err(url);
            assert!(e.contains(named) && !e.contains("s3cret"), "{e}");
        }
        for ok in [
            "postgres://u@db.example/x?application_name=a&sslmode=disable",
            // A server setting in the driver's own form.
            "postgres://u@db.example/x?options[search_path]=app",
            "postgres://u@db.example/x?options%5Bsearch_path%5D=app",
        ] {
            assert!(DatabaseUrl::try_from(ok.to_string()).is_ok(), "{ok}");
        }
        let e = DatabaseUrl::try_from("postgres://u@db.example/x?options[]=x".to_string())
            .expect_err("no setting named");
        assert!(e.contains("options[]"), "{e}");
    }

    /// A password holding `/`, `?` or `#` unencoded is read by URL parsers as host, port
    /// and path, so nothing was masked: refused without the URL, and redacted whole.
    #[test]
    fn a_password_with_a_slash_is_refused_and_never_shown() {
        for url in [
            "postgres://app:12/s3cret@host/db",
            "postgres://app:12?s3cret@host/db",
            "postgres://app:12#s3cret@host/db",
        ] {
            let e = DatabaseUrl::try_from(url.to_string()).expect_err(url);
            assert!(e.contains("percent-encode") && !e.contains("s3cret"), "{e}");
            let shown = redact_url(url);
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        assert!(DatabaseUrl::try_from("postgres://app:s%2F3@host/db".to_string()).is_ok());
        // An `@` that is no misread password: a SQLite path's, a query value after a user.
        for url in [
            "sqlite:///var/lib/storagetier@prod/archive.db",
            "postgres://app@host/db?application_name=me@host",
        ] {
            assert!(DatabaseUrl::try_from(url.to_string()).is_ok(), "{url}");
        }
        // A password holding `@` and `?`: its tail reads as a parameter, refused unnamed.
        let e = DatabaseUrl::try_from("postgres://app:p@ss?Zq9xk@host/db".to_string())
            .expect_err("a password's tail as a parameter");
        assert!(!e.contains("Zq9xk"), "{e}");
    }

    /// Two instances upgrading one SQLite file at once (both waiting for a third's write
    /// lock) both find an `ALTER TABLE … ADD COLUMN` migration missing; the one that applies
    /// it second meets the column ("duplicate column name"): it looks again and starts too,
    /// instead of exiting 1 in the middle of a rolling upgrade.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_upgrading_one_sqlite_file_at_once_both_start() {
        use sqlx::Connection;
        use sqlx::migrate::{Migration, MigrationType};
        use std::borrow::Cow;
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("up.db");
        let url = format!("sqlite://{}", path.display());
        let step = |v: i64, sql: &'static str| {
            Migration::new(
                v,
                Cow::Borrowed("step"),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        };
        let steps = [
            step(1, "CREATE TABLE t (a BIGINT)"),
            step(2, "ALTER TABLE t ADD COLUMN b BIGINT"),
        ];
        let upto = |n: usize| Migrator {
            migrations: Cow::Owned(steps[..n].to_vec()),
            ..Migrator::DEFAULT
        };
        connect(&url, &upto(1))
            .await
            .expect("first release")
            .close()
            .await;
        sqlx::any::install_default_drivers();
        let mut holder = sqlx::AnyConnection::connect(&url).await.expect("holder");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .expect("locked");
        let upgrade = || {
            let (url, m) = (url.clone(), upto(2));
            tokio::spawn(async move { connect(&url, &m).await })
        };
        let (a, b) = (upgrade(), upgrade());
        // Both found the migration missing, so both will apply it once the lock is free.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while pending_seen(&path.display().to_string()) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "both upgrades start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sqlx::query("COMMIT")
            .execute(&mut holder)
            .await
            .expect("released");
        for r in [a.await.expect("ran"), b.await.expect("ran")] {
            r.expect("both instances start").close().await;
        }
    }

    /// One service's database given to another (their migration numbers overlap) is
    /// named as such, not only as a "modified" migration.
    #[tokio::test]
    async fn another_services_database_is_named_as_such() {
        use sqlx::migrate::{Migration, MigrationType};
        use std::borrow::Cow;
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("mix.db");
        let url = format!("sqlite://{}", path.display());
        let one = |sql: &'static str| Migrator {
            migrations: Cow::Owned(vec![Migration::new(
                1,
                Cow::Borrowed("first"),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )]),
            ..Migrator::DEFAULT
        };
        connect(&url, &one("CREATE TABLE a (x BIGINT)"))
            .await
            .expect("first service")
            .close()
            .await;
        let e = connect(&url, &one("CREATE TABLE b (x BIGINT)"))
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("another service's database"), "{e}");
        // At start it is a setting to change (exit 2 naming the key), not a failure.
        let started = e.at_start("svc", false, &url);
        let c = started
            .downcast_ref::<framework::config::ConfigError>()
            .unwrap_or_else(|| panic!("a configuration error: {started}"));
        assert_eq!(c.key, "svc.database_url");
        assert!(c.message.contains("another service's database"), "{c}");
    }

    /// A PostgreSQL database in an encoding that cannot hold every character (LATIN1) is
    /// refused at start, naming the key, before any migration touches it — else every
    /// record with a name in another script was refused and its message dead-lettered
    /// while the rest passed. SQL_ASCII keeps the client's UTF-8 as it is: taken.
    #[tokio::test]
    async fn a_postgres_database_that_cannot_hold_every_character_is_refused() {
        use sqlx::migrate::{Migration, MigrationType};
        use std::borrow::Cow;
        let migrator = Migrator {
            migrations: Cow::Owned(vec![Migration::new(
                1,
                Cow::Borrowed("first"),
                MigrationType::Simple,
                Cow::Borrowed("CREATE TABLE names (name TEXT)"),
                false,
            )]),
            ..Migrator::DEFAULT
        };
        let locale = "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0";
        let latin1 = testing::TempPostgres::create_with(&format!("ENCODING 'LATIN1' {locale}"))
            .await
            .expect("a LATIN1 database");
        let e = connect(&latin1.url, &migrator)
            .await
            .expect_err("a LATIN1 database is refused");
        assert!(
            matches!(&e, DbError::Encoding(enc) if enc == "LATIN1"),
            "{e}"
        );
        let look = connect_read_only(&latin1.url).await.expect("look");
        let migrated: Option<String> = sqlx::query_scalar("SELECT to_regclass('names')::text")
            .fetch_one(&look)
            .await
            .expect("regclass");
        look.close().await;
        assert_eq!(migrated, None, "nothing is migrated on a refused database");
        let started = e.at_start("svc", false, &latin1.url);
        let c = started
            .downcast_ref::<framework::config::ConfigError>()
            .unwrap_or_else(|| panic!("a configuration error: {started}"));
        assert_eq!(c.key, "svc.database_url");
        assert!(
            c.message.contains("LATIN1") && c.message.contains("UTF8"),
            "{c}"
        );
        latin1.drop_db().await.expect("drop");

        let ascii = testing::TempPostgres::create_with(&format!("ENCODING 'SQL_ASCII' {locale}"))
            .await
            .expect("an SQL_ASCII database");
        let pool = connect(&ascii.url, &migrator)
            .await
            .expect("SQL_ASCII is taken");
        let name = "Пётр/北京/ß.mov";
        sqlx::query("INSERT INTO names (name) VALUES ($1)")
            .bind(name)
            .execute(&pool)
            .await
            .expect("any text is stored");
        let back: String = sqlx::query_scalar("SELECT name FROM names")
            .fetch_one(&pool)
            .await
            .expect("read back");
        assert_eq!(back, name);
        pool.close().await;
        ascii.drop_db().await.expect("drop");
    }

    /// A PostgreSQL database that takes no writes (here `default_transaction_read_only`, as
    /// a read replica's URL would) is refused at start, saying so, not run on with every
    /// write waited out as an outage; once it takes writes again it is opened.
    #[tokio::test]
    async fn a_postgres_database_that_takes_no_writes_is_refused_at_start() {
        let db = testing::TempPostgres::create().await.expect("database");
        let name = db.url.rsplit('/').next().unwrap_or_default().to_owned();
        let admin = AnyPool::connect(&format!("{}/postgres", testing::postgres_server()))
            .await
            .expect("admin");
        sqlx::query(&format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = on"
        ))
        .execute(&admin)
        .await
        .expect("read-only");
        let e = connect(&db.url, &Migrator::DEFAULT)
            .await
            .expect_err("a read-only database is refused");
        assert!(matches!(e, DbError::ReadOnly(_)), "{e}");
        let started = e.at_start("svc", false, &db.url);
        assert!(
            started
                .downcast_ref::<framework::config::ConfigError>()
                .is_none(),
            "not a setting's error (exit 1): {started}"
        );
        assert!(
            started.to_string().contains("takes no writes")
                && started
                    .to_string()
                    .contains("default_transaction_read_only"),
            "{started}"
        );
        sqlx::query(&format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = off"
        ))
        .execute(&admin)
        .await
        .expect("writable");
        admin.close().await;
        connect(&db.url, &Migrator::DEFAULT)
            .await
            .expect("a writable database is opened")
            .close()
            .await;
        db.drop_db().await.expect("drop");
    }

    /// A damaged SQLite file at start is reported as what it is, not as the pool's wait.
    #[tokio::test]
    async fn a_damaged_sqlite_file_is_reported_as_such() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("bad.db");
        std::fs::write(&path, vec![0x5a_u8; 8192]).expect("garbage");
        let e = connect(&format!("sqlite://{}", path.display()), &Migrator::DEFAULT).await;
        let e = e.expect_err("not a database");
        assert!(e.to_string().contains("not a database"), "{e}");
    }

    /// A SQLite file deleted under the running service: its pool is closed (every call an
    /// error, retried) instead of writing on into the deleted file, lost at the next start.
    #[tokio::test]
    async fn a_sqlite_file_deleted_under_the_service_closes_its_pool() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("rm.db");
        let pool = connect(&format!("sqlite://{}", path.display()), &Migrator::DEFAULT)
            .await
            .expect("opened");
        sqlx::query("CREATE TABLE t (id BIGINT)")
            .execute(&pool)
            .await
            .expect("written");
        std::fs::remove_file(&path).expect("deleted");
        let _ = std::fs::remove_file(path.with_extension("db-wal"));
        let _ = std::fs::remove_file(path.with_extension("db-shm"));
        let deadline = tokio::time::Instant::now() + FILE_CHECK * 6;
        while !pool.is_closed() {
            assert!(tokio::time::Instant::now() < deadline, "the pool is closed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(sqlx::query("SELECT 1").execute(&pool).await.is_err());
    }

    /// A call the database never answers is given up (a retry), never waited on for ever.
    #[tokio::test]
    async fn a_call_never_answered_is_given_up() {
        let never = std::future::pending::<Result<(), DbError>>();
        let e = bounded_by(Duration::from_millis(20), never)
            .await
            .expect_err("given up");
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(!e.refuses_the_data(), "transient: retried");
    }

    /// A data directory whose name holds what a URL reads otherwise (`%20`, `?`, `#`, a
    /// space): the default database is made there, not at the name decoded, and the file
    /// watch and a read-only look find it.
    #[tokio::test]
    async fn a_data_dir_named_like_url_text_holds_its_database() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("media%20tier ?a#b");
        let url = default_url(&data, "svc");
        assert_eq!(sqlite_file(&url), Some(data.join("svc.db")));
        let pool = connect(&url, &Migrator::DEFAULT).await.expect("opened");
        pool.close().await;
        assert!(
            data.join("svc.db").is_file(),
            "not made in {}",
            data.display()
        );
        assert!(!tmp.path().join("media tier ").exists());
        let ro = connect_read_only(&url).await.expect("found");
        ro.close().await;
    }

    /// `snapshot-status status` with a mistyped SQLite path: an error, and nothing made.
    #[tokio::test]
    async fn a_read_only_look_creates_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ro");
        let url = format!("sqlite://{}/x.db", dir.display());
        assert!(connect_read_only(&url).await.is_err());
        assert!(!dir.exists(), "{} was created", dir.display());
    }

    /// A database that cannot be reached at start is reported with its cause, not as the
    /// pool's wait ("pool timed out").
    #[tokio::test]
    async fn an_unreachable_database_is_reported_with_its_cause() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = free.local_addr().expect("addr").port();
        drop(free);
        let e = connect_read_only(&format!("postgres://postgres@127.0.0.1:{port}/test"))
            .await
            .expect_err("nothing listens there");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    }

    /// A pool's wait for a connection names what it most often is: sqlx's own words do not
    /// say whose pool, nor that the server may be refusing connections ("too many clients").
    #[test]
    fn a_pools_timeout_names_the_likely_cause() {
        let e = DbError::from(sqlx::Error::PoolTimedOut).to_string();
        assert!(
            e.starts_with("database: pool timed out")
                && e.contains("too many clients")
                && !e.contains("  "),
            "{e}"
        );
        let other = DbError::from(sqlx::Error::PoolClosed).to_string();
        assert!(!other.contains("too many clients"), "{other}");
    }

    #[test]
    fn an_in_memory_database_is_refused_as_config() {
        for url in [
            "sqlite://:memory:",
            "sqlite::memory:",
            "sqlite://x.db?mode=memory",
        ] {
            let e = DatabaseUrl::try_from(url.to_string()).expect_err(url);
            assert!(e.contains("in-memory"), "{e}");
        }
        assert!(DatabaseUrl::try_from("sqlite://./data/x.db".to_string()).is_ok());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgres://u:pw@h/db?password=again"),
            "postgres://u:***@h/db?password=***"
        );
        assert_eq!(redact_url("postgres://u:p?w@h/db"), "postgres://***");
        assert_eq!(
            redact_url("postgres://u@h/db?password=s3cret&application_name=me@host"),
            "postgres://u@h/db?password=***&application_name=me%40host"
        );
        assert_eq!(redact_url("sqlite://./data/x.db"), "sqlite://./data/x.db");
    }

    /// A configured SQLite file in a directory that does not exist (an unmounted volume)
    /// is refused naming `database_url`, not created as a new empty database, as is the
    /// default one under a configured `data_dir` that is missing (naming that key); a
    /// configured file in a directory that exists is accepted.
    #[test]
    fn a_configured_sqlite_file_in_a_missing_directory_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let url =
            |p: &Path| DatabaseUrl::try_from(format!("sqlite://{}", p.display())).expect("url");
        let check = |u: Option<&DatabaseUrl>, data: &Path| {
            DatabaseKeys {
                url: u,
                password_file: None,
                data_dir: data,
                service: "svc",
            }
            .check("svc_section")
        };
        let missing = url(&dir.path().join("unmounted/vol/x.db"));
        let e = check(Some(&missing), dir.path()).expect_err("accepted");
        assert_eq!(e.key, "svc_section.database_url");
        assert!(e.message.contains("no such directory"), "{e}");
        assert!(!dir.path().join("unmounted").exists());
        let present = url(&dir.path().join("x.db"));
        assert!(check(Some(&present), dir.path()).is_ok());
        // The default file under a configured data_dir that is missing: the same
        // unmounted volume. Only the built-in `./data` is made.
        let e = check(None, &dir.path().join("not-yet")).expect_err("accepted");
        assert_eq!(e.key, "storage.data_dir");
        assert!(check(None, dir.path()).is_ok());
        assert!(check(None, Path::new(framework::config::DEFAULT_DATA_DIR)).is_ok());
        let pg = DatabaseUrl::try_from("postgres://u@h/db".to_string()).expect("url");
        assert!(check(Some(&pg), dir.path()).is_ok());
    }

    #[test]
    fn default_url_lives_in_the_data_dir() {
        assert_eq!(
            default_url(Path::new("/tmp/x"), "svc"),
            "sqlite:///tmp/x/svc.db"
        );
    }
}

/// A database URL from config: usable by code, printed with its password as `***`.
/// Deserializing checks the scheme, so a bad URL is a config error naming its key
/// (exit 2) before start-up, in every service alike.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct DatabaseUrl(pub String);

/// The query parameters sqlx's PostgreSQL driver reads from a URL (sqlx-postgres 0.8).
const PG_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The first query parameter of a PostgreSQL `url` its driver does not read.
fn unknown_pg_parameter(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    u.query_pairs()
        .map(|(k, _)| k.into_owned())
        // `options[search_path]=app`: one server setting each, as the driver reads them.
        .find(|k| !PG_PARAMETERS.contains(&k.as_str()) && !is_option_setting(k))
}

/// Whether `k` is an `options[name]` parameter (a server setting, e.g. `search_path`).
fn is_option_setting(k: &str) -> bool {
    k.strip_prefix("options[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|name| !name.is_empty())
}

impl TryFrom<String> for DatabaseUrl {
    type Error = String;

    /// Accepts sqlite:// and postgres:// URLs; the message is safe to print (password hidden).
    fn try_from(url: String) -> Result<Self, String> {
        // A SQLite URL holds a path, no user: an `@` in it is a directory's.
        if !url.starts_with("sqlite:") && framework::config::userinfo_past_authority(&url) {
            // A password holding `/`, `?` or `#` unencoded: the driver would read it as
            // host, port and database name, and every log line would show it.
            Err(framework::config::misplaced_userinfo(
                "database_password_file",
            ))
        } else if in_memory(&url) {
            Err(format!(
                "`{url}` is an in-memory SQLite database: each connection gets its own and \
                 it is gone when the connection is recycled, with every record; use a file"
            ))
        } else if is_supported(&url) {
            // Parsed as the client will (a port out of range, an unknown `sslmode`): at
            // start-up, exit 2 naming the key, not exit 1 from the first connect.
            let parsed = if url.starts_with("sqlite:") {
                sqlx::sqlite::SqliteConnectOptions::from_str(&url).map(|_| ())
            } else if let Some(k) = unknown_pg_parameter(&url) {
                // The driver would ignore it with a warning quoting its value at every
                // start (`sslpassword=…`), and a typo (`pasword=`) would go unnoticed.
                // Not named where it may be a password's tail (`app:p@ss?word@host`).
                let shown = framework::config::parameter_shown("connection parameter", &k);
                return Err(format!(
                    "{shown} is not one the PostgreSQL driver takes (it would be ignored; a \
                     password holding `?` must be percent-encoded, %3F): it takes {}",
                    PG_PARAMETERS.join(", ")
                ));
            } else {
                sqlx::postgres::PgConnectOptions::from_str(&url).map(|_| ())
            };
            match parsed {
                Ok(()) => Ok(Self(url)),
                Err(e) => Err(format!("`{}` is not a usable URL: {e}", redact_url(&url))),
            }
        } else {
            Err(format!(
                "`{}` is not a sqlite:// or postgres:// URL",
                redact_url(&url)
            ))
        }
    }
}

impl DatabaseUrl {
    /// The URL in effect: `url` if configured, else SQLite `<data_dir>/<service>.db`.
    pub fn resolve(url: Option<&DatabaseUrl>, data_dir: &Path, service: &str) -> String {
        url.map_or_else(|| default_url(data_dir, service), |u| u.0.clone())
    }
}

/// A service's database keys as its settings hold them (`database_url`,
/// `database_password_file`), with where the default lives: what every database
/// service resolves, shows and checks in the same way.
#[derive(Debug, Clone, Copy)]
pub struct DatabaseKeys<'a> {
    /// `[section] database_url`, if configured.
    pub url: Option<&'a DatabaseUrl>,
    /// `[section] database_password_file`, if configured.
    pub password_file: Option<&'a Path>,
    /// `[storage] data_dir`, where the default SQLite file lives.
    pub data_dir: &'a Path,
    /// The service's name: the default file is `<data_dir>/<service>.db`.
    pub service: &'a str,
}

impl DatabaseKeys<'_> {
    /// The URL in effect ([`DatabaseUrl::resolve`]), its password read from the password
    /// file where one is named (a secret mounted as a file, as `[amqp] password_file`).
    /// The message of an error is safe to print.
    pub fn resolve(&self) -> Result<String, String> {
        let url = DatabaseUrl::resolve(self.url, self.data_dir, self.service);
        match self.password_file {
            Some(f) => with_password_file(&url, f),
            None => Ok(url),
        }
    }

    /// [`DatabaseKeys::resolve`] where the password file can be read, else the URL
    /// without it: for opening after validation refused such a file, and for showing.
    pub fn resolve_lenient(&self) -> String {
        self.resolve()
            .unwrap_or_else(|_| DatabaseUrl::resolve(self.url, self.data_dir, self.service))
    }

    /// Checks `[section] database_url` and `database_password_file`, naming the key: a
    /// configured SQLite file's directory must exist (a missing one is an unmounted
    /// volume, and a new empty database there would start the service without its
    /// records; only the default under `data_dir` is created, and a configured `data_dir`
    /// holding it must exist), and the password file must be readable.
    pub fn check(&self, section: &str) -> Result<(), framework::config::ConfigError> {
        if self.url.is_none() {
            framework::config::check_data_dir(
                self.data_dir,
                &format!("the SQLite database ({section}.database_url)"),
            )?;
        }
        if let Some(dir) = self
            .url
            .and_then(|u| sqlite_file(&u.0))
            .and_then(|f| f.parent().map(Path::to_path_buf))
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            return Err(framework::config::ConfigError::new(
                format!("{section}.database_url"),
                format!(
                    "{}: no such directory (an unmounted volume?): create it, or leave the key \
                     unset for the default under data_dir",
                    dir.display()
                ),
            ));
        }
        self.resolve().map(drop).map_err(|e| {
            framework::config::ConfigError::new(format!("{section}.database_password_file"), e)
        })
    }
}

/// `url` (PostgreSQL) with its password read from `file` (its line ending dropped): an empty one (a secret
/// not mounted yet) is refused, as is a file beside an SQLite URL, which has no password.
pub fn with_password_file(url: &str, file: &Path) -> Result<String, String> {
    if !is_postgres(url) {
        return Err("a password file is for a postgres:// database_url".into());
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            framework::config::secret_path_shown(file)
        )
    })?;
    let pw = framework::config::secret_of_file(&text);
    if pw.trim().is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    let mut u = url::Url::parse(url).map_err(|e| format!("database_url: {e}"))?;
    // `set_password` leaves `%` as it is, and the driver percent-decodes the password:
    // `p%41ss` in the file would log in as `pAss`.
    u.set_password(Some(&pw.replace('%', "%25")))
        .map_err(|()| "database_url cannot hold a password (no host)".to_string())?;
    Ok(u.to_string())
}

impl serde::Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_url(&self.0))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}
